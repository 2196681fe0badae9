"""Contrastive objectives of the official ``MultiLabelContrastive`` (ref §4.3), written as
local losses over gathered negatives: each rank scores its rows against the W·B gathered
columns, so gradients equal those of the global-batch loss (the gather's backward sums every
rank's copy back to the owner).

Two numerically equivalent paths:

* plain: the local logits [rows, W·B·L] are materialised and fed to a cross-entropy;
* chunked: an autograd Function computes the row log-sum-exp of ``s·A·Bᵀ`` a block of rows at a
  time and recomputes each block in the backward pass, so at most ``chunk × columns`` logits
  exist at once. The positive (target) term of every row is a plain dot product with the row's
  own partner(s), so the one-hot / soft-target matrix is never built on either path.

Everything runs in fp32 with autocast disabled: the features are only [B, D] and the
log-sum-exp over thousands of columns, the temperature and its gradient are where bf16/fp16
rounding would hurt.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..distributed import gather_with_grad, get_rank

# Logit matrices with more elements than this take the chunked path (64 MiB of fp32 logits).
CHUNK_THRESHOLD = 1 << 24
# Target number of logits per chunk of rows on the chunked path.
CHUNK_ELEMS = 1 << 22

_chunk_size: Optional[int] = None


def set_loss_chunk_size(rows: Optional[int]) -> None:
    """Force the chunked path with ``rows`` rows per block (0 forces the plain path; None restores
    the automatic choice by logit-matrix size)."""
    global _chunk_size
    if rows is not None and rows < 0:
        raise ValueError(f"loss chunk size must be >= 0 or None, got {rows}")
    _chunk_size = rows


def _pick_chunk(rows: int, cols: int, chunk_size: Optional[int]) -> int:
    """Rows per block, or 0 for the plain path."""
    forced = chunk_size if chunk_size is not None else _chunk_size
    if forced is not None:
        return int(forced)
    if rows * cols <= CHUNK_THRESHOLD:
        return 0
    return max(1, CHUNK_ELEMS // max(cols, 1))


class _ChunkedRowLSE(torch.autograd.Function):
    """lse[i] = log Σ_j exp(s · a_i·b_j) for a [M,D], b [N,D] (fp32), ``chunk`` rows at a time.

    Backward, with p = softmax row of the recomputed block and g the incoming [M] gradient:
    dL/dlogits = g_i·p_ij, so da = s·(g∘p) b, db = s·(g∘p)ᵀ a, ds = Σ (g∘p)∘(a bᵀ).
    """

    @staticmethod
    def forward(ctx, a, b, scale, chunk):
        M = a.shape[0]
        lse = a.new_empty(M)
        bt = b.t()
        with torch.autocast(a.device.type, enabled=False):
            for i in range(0, M, chunk):
                logits = torch.mm(a[i:i + chunk], bt) * scale  # [c,N]
                lse[i:i + chunk] = torch.logsumexp(logits, dim=1)
        ctx.save_for_backward(a, b, scale, lse)
        ctx.chunk = chunk
        return lse

    @staticmethod
    def backward(ctx, grad_lse):
        a, b, scale, lse = ctx.saved_tensors
        chunk = ctx.chunk
        need_a, need_b, need_s = ctx.needs_input_grad[:3]
        grad_a = torch.empty_like(a) if need_a else None
        grad_b = torch.zeros_like(b) if need_b else None
        grad_s = torch.zeros((), dtype=a.dtype, device=a.device) if need_s else None
        bt = b.t()
        grad_lse = grad_lse.float()
        # backward() may be called inside an autocast region: keep the recomputation in fp32
        with torch.autocast(a.device.type, enabled=False):
            for i in range(0, a.shape[0], chunk):
                a_c = a[i:i + chunk]
                dots = torch.mm(a_c, bt)  # [c,N]
                # dL/dlogits of this block: g_i · softmax_ij
                p = torch.exp(dots * scale - lse[i:i + chunk, None]) * grad_lse[i:i + chunk, None]
                if need_s:
                    grad_s += (p * dots).sum()
                if need_a:
                    grad_a[i:i + chunk] = torch.mm(p, b) * scale
                if need_b:
                    grad_b += torch.mm(p.t(), a_c) * scale
        if need_s:
            grad_s = grad_s.reshape(scale.shape)
        return grad_a, grad_b, grad_s, None


def row_logsumexp(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                  chunk: int = 0) -> torch.Tensor:
    """log Σ_j exp(scale · a_i·b_j) per row of a: [M,D] x [N,D] -> [M] (fp32). ``chunk`` > 0
    bounds the live logits to chunk × N; 0 materialises them."""
    scale = torch.as_tensor(scale, dtype=a.dtype, device=a.device)
    if chunk and chunk > 0:
        return _ChunkedRowLSE.apply(a, b, scale, int(chunk))
    return torch.logsumexp(torch.mm(a, b.t()) * scale, dim=1)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return F.normalize(t.float(), dim=-1)


def image_text_loss(image_x: torch.Tensor, text_x: torch.Tensor, logit_scale: torch.Tensor, *,
                    chunk_size: Optional[int] = None):
    """½·(CE(s·I·gather(T)ᵀ) + CE(s·T·gather(I)ᵀ)) with targets rank·B + arange(B).
    Inputs are raw [B,D] embeddings; ``logit_scale`` is the already clamped scale s."""
    if image_x.ndim != 2 or image_x.shape != text_x.shape:
        raise ValueError(f"image_text_loss: expected image_x and text_x of equal shape [B,D], got "
                         f"{tuple(image_x.shape)} and {tuple(text_x.shape)}")
    B = image_x.shape[0]
    with torch.autocast(image_x.device.type, enabled=False):
        s = torch.as_tensor(logit_scale, device=image_x.device).float()
        img = _fp32(image_x)
        txt = _fp32(text_x)
        all_txt = gather_with_grad(txt)  # [W·B,D]
        all_img = gather_with_grad(img)  # [W·B,D]
        chunk = _pick_chunk(B, all_txt.shape[0], chunk_size)
        if chunk == 0:
            labels = torch.arange(B, device=img.device) + B * get_rank()
            logits_img = torch.mm(img, all_txt.t()) * s  # [B,W·B]
            logits_txt = torch.mm(txt, all_img.t()) * s  # [B,W·B]
            return 0.5 * (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels))
        # CE row = lse(row) − logit(own pair); the own pair of image i is text i on this rank
        # (the gathered copy's gradient is summed back to the same local tensor).
        pos = (img * txt).sum(dim=-1) * s  # [B]
        lse_img = row_logsumexp(img, all_txt, s, chunk)
        lse_txt = row_logsumexp(txt, all_img, s, chunk)
        return 0.5 * (lse_img.mean() + lse_txt.mean()) - pos.mean()


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
                     logit_scale: torch.Tensor, *, chunk_size: Optional[int] = None):
    """Multi-label contrastive loss: image_feat [B,L1,D] (L1 = 1: the pooled embedding),
    text_feat [B,L2,D] (L2 = K prompts). Image rows weight 1/L2 on each own prompt; prompt rows
    weight 1/L1 on their own image(s). ½·(image rows + text rows)."""
    if image_feat.ndim != 3 or text_feat.ndim != 3 or image_feat.shape[0] != text_feat.shape[0] \
            or image_feat.shape[2] != text_feat.shape[2]:
        raise ValueError(f"multi_label_loss: expected image_feat [B,L1,D] and text_feat [B,L2,D], "
                         f"got {tuple(image_feat.shape)} and {tuple(text_feat.shape)}")
    B, L1, _ = image_feat.shape
    L2 = text_feat.shape[1]
    with torch.autocast(image_feat.device.type, enabled=False):
        s = torch.as_tensor(logit_scale, device=image_feat.device).float()
        image_feat = _fp32(image_feat)
        text_feat = _fp32(text_feat)
        image_x = image_feat.reshape(B * L1, -1)  # [(B L1), D]
        text_x = text_feat.reshape(B * L2, -1)  # [(B L2), D]
        all_txt = gather_with_grad(text_x)  # [(W B L2), D]
        all_img = gather_with_grad(image_x)  # [(W B L1), D]
        chunk = _pick_chunk(B * max(L1, L2), max(all_txt.shape[0], all_img.shape[0]), chunk_size)
        if chunk == 0:
            logits_img = torch.mm(image_x, all_txt.t()) * s
            logits_txt = torch.mm(text_x, all_img.t()) * s
            loss_img = _soft_target_ce_own_block(logits_img, B, L1, L2)
            loss_txt = _soft_target_ce_own_block(logits_txt, B, L2, L1)
            return 0.5 * (loss_img + loss_txt)
        # Soft-target CE row = lse(row) − mean of its own partners' logits. Averaged over rows,
        # both sides' positive terms equal s · mean over (b, l1, l2) of <I_b,l1, T_b,l2>.
        pos = torch.einsum("bic,bjc->bij", image_feat, text_feat).mean() * s  # [B,L1,L2] -> ()
        lse_img = row_logsumexp(image_x, all_txt, s, chunk)
        lse_txt = row_logsumexp(text_x, all_img, s, chunk)
        return 0.5 * (lse_img.mean() + lse_txt.mean()) - pos


def _group_noun_shapes_ok(group_feat, owned, noun_feat, valid) -> bool:
    """The shapes every group-level loss takes: group_feat [B,G,D], owned [B,G], noun_feat
    [B,K,D], valid [B,K] with one B (each loss names its own tensors in its error)."""
    return (group_feat.ndim == 3 and noun_feat.ndim == 3 and owned.shape == group_feat.shape[:2]
            and valid.shape == noun_feat.shape[:2] and group_feat.shape[0] == noun_feat.shape[0])


def group_multi_label_loss(group_feat: torch.Tensor, owned: torch.Tensor, text_feat: torch.Tensor,
                           valid: torch.Tensor, logit_scale: torch.Tensor):
    """Group-level multi-label contrastive loss: a recipe option, *not* part of the paper.

    The paper's losses only see the mean of the output groups; measured on the embedded recipe,
    groups that own no pixel name the scene's class about as well as the object's own group
    (the grouping block's cross-attention gives every group token the whole image), so the
    protocol, which names each group from its own token, has little to work with. Here an image
    scores a prompt by its *best owned group*: score(b, t) = max over groups g that own at least
    one patch of <ĝ_bg, t̂>, the same per-group reading the segmentation protocol makes.

    group_feat [B,G,D] projected group tokens; owned [B,G] bool (group owns >= 1 patch in the
    training assignment); text_feat [B,K,D] projected noun prompts; valid [B,K] bool (False for
    the caption copies that pad captions with fewer than K nouns). Image rows: soft-target CE
    over all gathered valid prompts, uniform on their own; prompt rows: CE over gathered images
    with their own image as the target. ½·(image rows + prompt rows). Materialises
    [B, G, W·B·K] similarities: sized for small recipes, not for the release batch."""
    if not _group_noun_shapes_ok(group_feat, owned, text_feat, valid):
        raise ValueError(f"group_multi_label_loss: expected group_feat [B,G,D], owned [B,G], "
                         f"text_feat [B,K,D], valid [B,K]; got {tuple(group_feat.shape)}, "
                         f"{tuple(owned.shape)}, {tuple(text_feat.shape)}, {tuple(valid.shape)}")
    B, G, _ = group_feat.shape
    K = text_feat.shape[1]
    with torch.autocast(group_feat.device.type, enabled=False):
        s = torch.as_tensor(logit_scale, device=group_feat.device).float()
        g = _fp32(group_feat)  # [B,G,D]
        t = _fp32(text_feat).reshape(B * K, -1)  # [B,K,D] -> [(B K),D]
        all_t = gather_with_grad(t)  # [(W B K),D]
        all_valid = gather_with_grad(valid.reshape(-1).float()) > 0.5  # [(W B K)]
        all_g = gather_with_grad(g)  # [(W B),G,D]
        all_own = gather_with_grad(owned.float()) > 0.5  # [(W B),G]
        neg = torch.finfo(torch.float32).min
        # image rows: best owned group of image b for every gathered prompt
        sim = torch.einsum("bgd,nd->bgn", g, all_t)  # [B,G,(W B K)]
        sim = sim.masked_fill(~owned[:, :, None], neg).amax(dim=1) * s  # [B,(W B K)]
        sim = sim.masked_fill(~all_valid[None], float("-inf"))
        own_cols = get_rank() * B * K + torch.arange(B * K, device=g.device).view(B, K)  # [B,K]
        own_logit = sim.gather(1, own_cols)  # [B,K]
        n_own = valid.sum(dim=1)  # [B]
        rows = n_own > 0
        if not bool(rows.any()):
            return g.sum() * 0.0  # no noun prompt in the whole batch
        pos_img = (own_logit.masked_fill(~valid, 0.0).sum(dim=1) / n_own.clamp(min=1))[rows]
        loss_img = (torch.logsumexp(sim[rows], dim=1) - pos_img).mean()
        # prompt rows: every gathered image scored by its best owned group for prompt (b, k)
        sim_t = torch.einsum("nd,cgd->ncg", t, all_g)  # [(B K),(W B),G]
        sim_t = sim_t.masked_fill(~all_own[None], neg).amax(dim=2) * s  # [(B K),(W B)]
        target = get_rank() * B + torch.arange(B, device=g.device).repeat_interleave(K)
        vrows = valid.reshape(-1)
        loss_txt = F.cross_entropy(sim_t[vrows], target[vrows])
        return 0.5 * (loss_img + loss_txt)


def claim_log_probs(group_feat: torch.Tensor, noun_feat: torch.Tensor, valid: torch.Tensor,
                    bg_feat: Optional[torch.Tensor], logit_scale: torch.Tensor):
    """Each group's log-softmax over its own image's claim candidates (valid nouns, then the
    background prompt when given): (logp [B,G,K(+1)] fp32, candidate mask [B,K(+1)])."""
    B, _, D = group_feat.shape
    s = torch.as_tensor(logit_scale, device=group_feat.device).float()
    cand, cvalid = _fp32(noun_feat), valid  # [B,K,D], [B,K]
    if bg_feat is not None:
        cand = torch.cat([cand, _fp32(bg_feat).expand(B, 1, D)], dim=1)  # [B,K+1,D]
        cvalid = torch.cat([valid, valid.new_ones(B, 1)], dim=1)  # [B,K+1]
    logits = torch.einsum("bgd,bkd->bgk", _fp32(group_feat), cand) * s  # [B,G,K+1]
    logits = logits.masked_fill(~cvalid[:, None, :], float("-inf"))
    return torch.log_softmax(logits, dim=-1), cvalid


def group_claim_loss(group_feat: torch.Tensor, owned: torch.Tensor, noun_feat: torch.Tensor,
                     valid: torch.Tensor, bg_feat: Optional[torch.Tensor],
                     logit_scale: torch.Tensor):
    """Group claim loss: a recipe option, *not* part of the paper.

    The segmentation protocol names every final group from its own token and calls a group
    background when no class stands out. The paper's losses only see the mean of the groups, and
    mean pooling hands every group the same gradient, so nothing makes a group carry its *own*
    pixels' class, and background groups end up naming the scene's objects. Here every image's
    candidate names are its caption's noun prompts plus one background prompt shared by all
    images; each owned group spreads a softmax over its own image's candidates, and every
    candidate must be *claimed*: some owned group must put its mass on it,
    loss = −mean over (image, candidate) of max over owned groups of log p(candidate | group).
    Within one image it is symmetric, across images it is not: the background prompt is the same
    in every scene, so only what all scenes share (their background) can claim it consistently.
    Each noun needs its own group, which also asks for as many groups as there are named things.

    group_feat [B,G,D] projected group tokens; owned [B,G] bool; noun_feat [B,K,D] projected noun
    prompts; valid [B,K] bool (False for caption copies and repeated prompts); bg_feat [D] the
    projected background prompt, or None: the nouns alone are the candidates (an image with one
    noun then costs nothing; with several, each needs a group of its own). Per-image only (no
    gathered negatives): the official losses already contrast images and prompts across the
    batch."""
    if not _group_noun_shapes_ok(group_feat, owned, noun_feat, valid) \
            or (bg_feat is not None and bg_feat.shape != group_feat.shape[2:]):
        raise ValueError(f"group_claim_loss: expected group_feat [B,G,D], owned [B,G], "
                         f"noun_feat [B,K,D], valid [B,K], bg_feat [D]; got "
                         f"{tuple(group_feat.shape)}, {tuple(owned.shape)}, "
                         f"{tuple(noun_feat.shape)}, {tuple(valid.shape)}, "
                         f"{None if bg_feat is None else tuple(bg_feat.shape)}")
    with torch.autocast(group_feat.device.type, enabled=False):
        logp, cvalid = claim_log_probs(group_feat, noun_feat, valid, bg_feat, logit_scale)
        neg = torch.finfo(torch.float32).min
        claim = logp.masked_fill(~owned[:, :, None], neg).amax(dim=1)  # [B,K+1]
        rows = owned.any(dim=1)[:, None] & cvalid  # images with no owned group: nothing to claim
        if not bool(rows.any()):
            return group_feat.sum() * 0.0
        return -claim[rows].mean()


def content_claim_loss(group_feat: torch.Tensor, owned: torch.Tensor, content_feat: torch.Tensor,
                       noun_feat: torch.Tensor, valid: torch.Tensor, logit_scale: torch.Tensor,
                       margin: float = 0.1):
    """Content claim loss: a recipe option, *not* part of the paper.

    Every group token attends to the whole scene, so which of an image's groups carries a
    caption noun is not tied to the group's pixels: measured on the embedded recipe, about half
    the seeds settle with the *background* group named after the object and the object's group
    flat (the protocol then paints the class over the background). ``content_feat`` is the
    model's own reading of each group's pixels alone (the pooled embedding of an image tiled
    with that group's patches, no gradient); per image and caption noun, the group whose pixels
    match the noun best is its claimant, and the group tokens must agree: a softmax over the
    image's owned groups of s·<ĝ, n̂> with the claimant as target. Scores are compared within an
    image, so an offset shared by all the teacher's embeddings does not move the choice. Only
    (image, noun) pairs whose claimant leads the runner-up by ``margin`` in cosine take part: an
    untrained teacher's near-ties are noise, and a CE to noisy targets is met best by making
    every group alike. The nouns are targets here, not trained (through this term the prompts
    collapsed onto one direction in a measured run).

    group_feat [B,G,D] projected group tokens; owned [B,G] bool; content_feat [B,G,D] (rows of
    unowned groups are ignored); noun_feat [B,K,D] projected noun prompts; valid [B,K] bool.
    Returns (loss, claimed [B,G] bool: owned groups that are some valid noun's claimant)."""
    if not _group_noun_shapes_ok(group_feat, owned, noun_feat, valid) \
            or content_feat.shape != group_feat.shape:
        raise ValueError(f"content_claim_loss: expected group_feat [B,G,D], owned [B,G], "
                         f"content_feat [B,G,D], noun_feat [B,K,D], valid [B,K]; got "
                         f"{tuple(group_feat.shape)}, {tuple(owned.shape)}, "
                         f"{tuple(content_feat.shape)}, {tuple(noun_feat.shape)}, "
                         f"{tuple(valid.shape)}")
    with torch.autocast(group_feat.device.type, enabled=False):
        s = torch.as_tensor(logit_scale, device=group_feat.device).float()
        n = F.normalize(_fp32(noun_feat), dim=-1).detach()  # [B,K,D]
        with torch.no_grad():
            teach = torch.einsum("bgd,bkd->bgk", F.normalize(_fp32(content_feat), dim=-1), n)
            teach = teach.masked_fill(~owned[:, :, None], float("-inf"))  # [B,G,K]
            top2 = teach.topk(min(2, teach.shape[1]), dim=1).values  # [B,2,K]
            claimant = teach.argmax(dim=1)  # [B,K]
            lead = top2[:, 0] - top2[:, -1]  # [B,K]; with G == 1 the one column against itself
        # images with one owned group have nothing to choose (lead -inf - -inf = nan fails >=)
        rows = valid & (owned.sum(dim=1, keepdim=True) > 1) & (lead >= margin)  # [B,K]
        G = owned.shape[1]
        claimed = (F.one_hot(claimant, G).bool() & rows[..., None]).any(dim=1) & owned  # [B,G]
        if not bool(rows.any()):
            return group_feat.sum() * 0.0, claimed
        logits = torch.einsum("bgd,bkd->bkg", F.normalize(_fp32(group_feat), dim=-1), n) * s
        logits = logits.masked_fill(~owned[:, None, :], float("-inf"))  # [B,K,G]
        loss = F.cross_entropy(logits[rows], claimant[rows])
        return loss, claimed


def flat_class_loss(rows: torch.Tensor, weights: torch.Tensor, prompts: torch.Tensor,
                    prompt_valid: torch.Tensor, logit_scale: torch.Tensor):
    """Flatness loss: a recipe option, *not* part of the paper.

    The protocol calls a group background when its softmax over the class prompts is flat. What
    all images share (the background's direction in the joint space) is a common offset of every
    pooled embedding, which no contrastive loss constrains, so one class ends up nearest to it and
    names the background everywhere. Here rows that stand for the background are asked to give
    every prompt the same probability: weighted mean over rows of
    CE(uniform over the valid prompts, softmax_p(s·<row, prompt_p>)).

    rows [R,D], weights [R] (>= 0, not differentiated), prompts [P,D], prompt_valid [P] bool."""
    if rows.ndim != 2 or prompts.ndim != 2 or weights.shape != rows.shape[:1] \
            or prompt_valid.shape != prompts.shape[:1] or rows.shape[1] != prompts.shape[1]:
        raise ValueError(f"flat_class_loss: expected rows [R,D], weights [R], prompts [P,D], "
                         f"prompt_valid [P]; got {tuple(rows.shape)}, {tuple(weights.shape)}, "
                         f"{tuple(prompts.shape)}, {tuple(prompt_valid.shape)}")
    with torch.autocast(rows.device.type, enabled=False):
        s = torch.as_tensor(logit_scale, device=rows.device).float()
        t = _fp32(prompts)[prompt_valid]  # [P',D]
        w = weights.detach().float()
        if t.shape[0] < 2 or float(w.sum()) <= 0:
            return rows.sum() * 0.0
        logp = torch.log_softmax(_fp32(rows) @ t.T * s, dim=-1)  # [R,P']
        ce = -logp.mean(dim=-1)  # CE to uniform, minimal (log P') when flat
        return (w * ce).sum() / w.sum() - math.log(t.shape[0])


def assign_info_loss(soft: torch.Tensor, balance: float = 1.0, scope: str = "image",
                     select: Optional[torch.Tensor] = None, drop: Optional[torch.Tensor] = None):
    """Assignment-information loss: a recipe option, *not* part of the paper.

    soft [B,S,N]: each token's soft assignment over the S groups (softmax over dim 1, no
    Gumbel noise). Returns 1 - I(token; group) / log S averaged over images, with
    I = H(mean_n p_n) - mean_n H(p_n): 0 when every token picks one group for sure and the
    groups share the image evenly, 1 when tokens are spread the same way (no grouping) or
    all go to one group. The information-maximisation objective of discriminative clustering
    (RIM, IIC), per image. ``balance`` weighs the H(mean) term: 0 leaves only the sharpness
    term, mean_n H(p_n) / log S (then one group taking every token also costs 0).
    ``scope='batch'`` takes the H(mean) term over the whole local batch instead of each image
    (the codebook-usage term of vector quantisation): every group must be used by *some*
    images, not by every image, so groups may specialise (one per kind of object) rather than
    cut each image into equal parts.

    select [B,N] bool: only these tokens take part (None: all); drop [B,S] bool: groups left
    out of each image's distributions, which are renormalised over the others, and log S
    becomes log(S - most groups dropped in an image). Together they restrict the term to part
    of the image, e.g. the stage-1 groups outside the image's largest final group (the
    background; ``MultiLabelContrastive``'s ``assign_info_scope='objects'``). An image with no
    selected token costs ``balance``, what one group taking every token costs: if it cost
    nothing, putting every token in one group would be the cheapest way to meet the term (a
    measured run of the 'objects' scope collapsed so within 1,500 steps).

    Why it was tried: on the embedded recipe, the runs whose first stage groups well assign
    their tokens sharply and those that group badly do not, so the Gumbel noise decides their
    groups. Measured (README, stop 21): with balance 1 the first stage met the term by tiling
    every image into positional blocks, with balance 0 it collapsed onto a few groups; neither
    is in the default."""
    if soft.ndim != 3 or soft.shape[1] < 2:
        raise ValueError(f"assign_info_loss: expected soft [B,S,N] with S >= 2, got "
                         f"{tuple(soft.shape)}")
    if scope not in ("image", "batch"):
        raise ValueError(f"assign_info_loss: scope must be 'image' or 'batch', got {scope!r}")
    B, S, N = soft.shape
    if select is not None and tuple(select.shape) != (B, N):
        raise ValueError(f"assign_info_loss: select must be [B,N] = {(B, N)}, got "
                         f"{tuple(select.shape)}")
    if drop is not None and tuple(drop.shape) != (B, S):
        raise ValueError(f"assign_info_loss: drop must be [B,S] = {(B, S)}, got "
                         f"{tuple(drop.shape)}")
    with torch.autocast(soft.device.type, enabled=False):
        p = soft.float()
        k = S
        if drop is not None:
            k = S - int(drop.sum(dim=1).max())
            if k < 2:
                raise ValueError(f"assign_info_loss: at most S - 2 = {S - 2} groups may be "
                                 f"dropped per image, got {S - k}")
            p = p.masked_fill(drop[:, :, None], 0.0)
            p = p / p.sum(dim=1, keepdim=True).clamp(min=1e-12)
        p = p.clamp(min=1e-12)
        w = (torch.ones(B, N, device=p.device) if select is None
             else select.float())  # [B,N] token weights
        rows = w.sum(dim=1) > 0  # [B] images with a selected token
        if not bool(rows.any()):
            return soft.sum() * 0.0 + balance
        h = -(p * p.log()).sum(dim=1)  # [B,N] H(p_n)
        if scope == "image":
            wn = w[rows] / w[rows].sum(dim=1, keepdim=True)  # [b,N]
            cond = (h[rows] * wn).sum(dim=1)  # [b]
            pbar = (p[rows] * wn[:, None]).sum(dim=2)  # [b,S]
        else:
            wn = w / w.sum()  # [B,N]
            cond = (h * wn).sum()[None]  # [1]
            pbar = (p * wn[:, None]).sum(dim=(0, 2))[None]  # [1,S]
        marg = -(pbar * pbar.clamp(min=1e-12).log()).sum(dim=1)  # [b] or [1]
        term = balance - (balance * marg.mean() - cond.mean()) / math.log(k)
        # images without a selected token cost `balance` each (no gradient: nothing to move)
        frac = rows.float().mean()
        return frac * term + (1.0 - frac) * balance


__all__ = ["image_text_loss", "assign_info_loss", "multi_label_loss", "group_multi_label_loss",
           "group_claim_loss", "content_claim_loss",
           "claim_log_probs", "flat_class_loss", "row_logsumexp", "set_loss_chunk_size"]
