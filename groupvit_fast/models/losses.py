"""Contrastive objectives of the official ``MultiLabelContrastive`` (ref §4.3), written as
local losses over gathered negatives: each rank scores its B rows against the W·B gathered
columns, so memory is O(B·W·B) and gradients equal those of the global-batch loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import gather_with_grad, get_rank


def image_text_loss(image_x: torch.Tensor, text_x: torch.Tensor, logit_scale: torch.Tensor):
    """½·(CE(s·I·gather(T)ᵀ) + CE(s·T·gather(I)ᵀ)) with targets rank·B + arange(B).
    Inputs are raw [B,D] embeddings; ``logit_scale`` is the already clamped scale s."""
    B = image_x.shape[0]
    image_x = F.normalize(image_x, dim=-1)
    text_x = F.normalize(text_x, dim=-1)
    labels = torch.arange(B, device=image_x.device) + B * get_rank()
    # softmax/log-sum-exp in fp32 whatever the autocast dtype
    logits_img = (image_x @ gather_with_grad(text_x).t()).float() * logit_scale
    logits_txt = (text_x @ gather_with_grad(image_x).t()).float() * logit_scale
    return 0.5 * (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels))


def _soft_target_ce_own_block(logits: torch.Tensor, B: int, L_row: int, L_col: int):
    """Mean over rows of −Σ target·log_softmax, where row (b, i) puts weight 1/L_col on each of
    the L_col columns of its own sample b on this rank (the official one-hot tensor
    [B,L1,B,L2,W] never needs to be built)."""
    logp = torch.log_softmax(logits, dim=-1)  # [B*L_row, W*B*L_col]
    rank = get_rank()
    rows = torch.arange(B * L_row, device=logits.device)
    b = rows // L_row  # sample of each row
    cols = (rank * B + b)[:, None] * L_col + torch.arange(L_col, device=logits.device)[None]
    own = logp.gather(1, cols)  # [B*L_row, L_col]
    return -(own.sum(dim=1) / L_col).mean()


def multi_label_loss(image_feat: torch.Tensor, text_feat: torch.Tensor,
                     logit_scale: torch.Tensor):
    """Multi-label contrastive loss: image_feat [B,L1,D] (L1 = 1: the pooled embedding),
    text_feat [B,L2,D] (L2 = K prompts). Image rows weight 1/K on each own prompt; prompt rows
    weight 1/L1 on their own image. ½·(image rows + text rows)."""
    B, L1, _ = image_feat.shape
    L2 = text_feat.shape[1]
    image_feat = F.normalize(image_feat, dim=-1)
    text_feat = F.normalize(text_feat, dim=-1)
    image_x = image_feat.reshape(B * L1, -1)  # [(B L1), D]
    text_x = text_feat.reshape(B * L2, -1)  # [(B L2), D]
    logits_img = (image_x @ gather_with_grad(text_x).t()).float() * logit_scale
    logits_txt = (text_x @ gather_with_grad(image_x).t()).float() * logit_scale
    loss_img = _soft_target_ce_own_block(logits_img, B, L1, L2)
    loss_txt = _soft_target_ce_own_block(logits_txt, B, L2, L1)
    return 0.5 * (loss_img + loss_txt)
