"""The full GroupViT model: image and text encoders, projection heads, learnable temperatures
and the image-text + multi-label contrastive losses (official ``MultiLabelContrastive``)."""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .group_vit import GroupViT, final_group_owners, owned_final_groups, patchify, unpatchify
from .layers import Result
from .losses import (assign_info_loss, claim_log_probs, content_claim_loss, flat_class_loss,
                     group_claim_loss, group_multi_label_loss, image_text_loss, multi_label_loss)
from .transformer import TextTransformer

MODELS = {"GroupViT": GroupViT, "TextTransformer": TextTransformer}

#: recipe-option loss weights that read the per-group tokens
GROUP_TOKEN_LOSSES = ("group_loss_weight", "claim_loss_weight", "flat_loss_weight",
                      "content_claim_weight")
#: recipe-option loss weights that read more than the pooled embedding (the per-group tokens or
#: the assignment maps), so an embedding cache of pooled features (GradCache) cannot serve them
BEYOND_POOLED_LOSSES = GROUP_TOKEN_LOSSES + ("assign_info_weight",)


def build_module(spec: Union[nn.Module, dict]) -> nn.Module:
    """A module instance, or an official-style ``dict(type='GroupViT', **kwargs)``."""
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, dict) or "type" not in spec:
        raise TypeError(f"expected an nn.Module or a dict with a 'type' key, got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("type")
    if name not in MODELS:
        raise ValueError(f"unknown encoder type {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](**kwargs)


class ProjectMLP(nn.Module):
    """Projection head with the official 1×1 Conv1d weights (keys and 3-D [out,in,1] shapes
    kept), computed as Linear layers over rows. A [B,C] input is one token per sample; [B,L,C]
    is projected per token, BatchNorm statistics then pool over B and L."""

    def __init__(self, in_dim=256, inner_dim=4096, out_dim=256, num_layers=2):
        super().__init__()
        hidden = []
        for i in range(num_layers - 1):
            hidden += [nn.Conv1d(in_dim if i == 0 else inner_dim, inner_dim, kernel_size=1),
                       nn.BatchNorm1d(inner_dim), nn.ReLU(inplace=True)]
        self.linear_hidden = nn.Sequential(*hidden)
        self.linear_out = (nn.Conv1d(in_dim if num_layers == 1 else inner_dim, out_dim,
                                     kernel_size=1) if num_layers >= 1 else nn.Identity())

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # [B,C] or [B,L,C] -> [N,C], N = B or B*L
        # A 1x1 Conv1d over [B,C,L] is a Linear over [B*L,C], and BatchNorm over (B, L) is
        # BatchNorm over the B*L rows: the same sums as the official layout, without its two
        # transposes and the slow channels-first BatchNorm kernels (measured 42 -> 29 ms per
        # forward+backward of the 256-row text head, width 64, on one CPU thread).
        for layer in (*self.linear_hidden, self.linear_out):
            if isinstance(layer, nn.Conv1d):
                x = F.linear(x, layer.weight.squeeze(-1), layer.bias)  # [out,in,1] -> [out,in]
            else:
                x = layer(x)
        return x.reshape(*lead, x.shape[-1])  # [N,C'] -> [B,C'] or [B,L,C']


class MultiLabelContrastive(nn.Module):
    def __init__(self, img_encoder, text_encoder, output_dim=256, contrast_temperature=0.07,
                 proj_num_layers=2, multi_label=0, share_temperature=False,
                 multi_label_loss_weight=1.0, group_loss_weight=0.0, claim_loss_weight=0.0,
                 claim_background_tokens=None, flat_loss_weight=0.0, flat_rows="mean",
                 flat_groups_only=False,
                 content_claim_weight=0.0, content_claim_images=16, content_claim_margin=0.1,
                 assign_info_weight=0.0, assign_info_stages=(0,), assign_info_balance=1.0,
                 assign_info_scope="image"):
        super().__init__()
        self.img_encoder = build_module(img_encoder)
        self.text_encoder = build_module(text_encoder)
        self.contrast_temperature = contrast_temperature
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / contrast_temperature))
        self.proj_num_layers = proj_num_layers
        self.multi_label = multi_label
        self.output_dim = output_dim
        if proj_num_layers > 0:
            # Official wraps these in SyncBatchNorm; single-process BN is identical, and the
            # trainer swaps in a cross-rank BN (same state_dict keys) when distributed.
            self.img_projector = ProjectMLP(in_dim=self.img_encoder.width,
                                            num_layers=proj_num_layers, out_dim=output_dim)
            self.text_projector = ProjectMLP(in_dim=self.text_encoder.width,
                                             num_layers=proj_num_layers, out_dim=output_dim)
        else:
            self.img_projector = nn.Identity()
            self.text_projector = nn.Identity()
        self.share_temperature = share_temperature
        if self.with_multi_label and not share_temperature:
            self.multi_label_logit_scale = nn.Parameter(
                torch.ones([]) * math.log(1 / contrast_temperature))
        self.multi_label_loss_weight = multi_label_loss_weight
        # recipe option, not in the paper (0 = official): group_multi_label_loss on the noun
        # prompts, with the multi-label temperature; adds no parameters
        if group_loss_weight and not self.with_multi_label:
            raise ValueError("group_loss_weight > 0 needs multi_label > 0 (it scores the noun "
                             "prompts)")
        if group_loss_weight < 0:
            raise ValueError(f"group_loss_weight must be >= 0, got {group_loss_weight}")
        self.group_loss_weight = float(group_loss_weight)
        # recipe option, not in the paper (0 = official): group_claim_loss over each image's noun
        # prompts plus one background prompt, given as tokens [1, context_length]; a
        # non-persistent buffer, so checkpoints keep the official keys
        if claim_loss_weight < 0:
            raise ValueError(f"claim_loss_weight must be >= 0, got {claim_loss_weight}")
        if claim_loss_weight and not self.with_multi_label:
            raise ValueError("claim_loss_weight > 0 needs multi_label > 0 (it reads the noun "
                             "prompts)")
        self.claim_loss_weight = float(claim_loss_weight)
        if claim_loss_weight and claim_background_tokens is not None:
            tok = torch.as_tensor(claim_background_tokens, dtype=torch.long).reshape(1, -1)
            self.register_buffer("claim_background_tokens", tok, persistent=False)
        else:  # no background candidate: the nouns alone compete for the groups
            self.claim_background_tokens = None
        # recipe option, not in the paper (0 = official): flat_class_loss on the batch's noun
        # prompts for the rows that stand for the background: 'mean' = the mean owned group of
        # the batch (what every image shares), 'pixels' = the same mean with each owned group
        # weighted by the patches it owns (the batch's mean patch, mostly background: unlike
        # 'mean', it does not press an object's small group as hard as the background's large
        # one), 'share' = every group on its own, weighted by its share of its image's patches
        # (a background group that carries a name is pressed in every image, not only on
        # average), 'background' = each owned group weighted by its claim probability of the
        # background prompt (needs claim_loss_weight > 0)
        if flat_loss_weight < 0:
            raise ValueError(f"flat_loss_weight must be >= 0, got {flat_loss_weight}")
        if flat_rows not in ("mean", "pixels", "share", "background", "content"):
            raise ValueError(f"flat_rows must be 'mean', 'pixels', 'share', 'background' or "
                             f"'content', got {flat_rows!r}")
        if flat_loss_weight and not self.with_multi_label:
            raise ValueError("flat_loss_weight > 0 needs multi_label > 0 (it reads the noun prompts)")
        if flat_loss_weight and flat_rows == "background" and (
                not claim_loss_weight or claim_background_tokens is None):
            raise ValueError("flat_rows='background' needs claim_loss_weight > 0 and a claim "
                             "background prompt")
        if flat_groups_only and not flat_loss_weight:
            raise ValueError("flat_groups_only needs flat_loss_weight > 0 (it only changes what "
                             "the flatness term may move)")
        # recipe option, not in the paper (0 = official): content_claim_loss, each caption noun
        # must be carried by the group whose pixels alone show it (read by the model itself on
        # an image tiled with that group's patches); flat_rows='content' then flattens every
        # owned group that claims no noun
        if content_claim_weight < 0:
            raise ValueError(f"content_claim_weight must be >= 0, got {content_claim_weight}")
        if content_claim_weight and not self.with_multi_label:
            raise ValueError("content_claim_weight > 0 needs multi_label > 0 (it reads the noun "
                             "prompts)")
        if flat_loss_weight and flat_rows == "content" and not content_claim_weight:
            raise ValueError("flat_rows='content' needs content_claim_weight > 0")
        self.content_claim_weight = float(content_claim_weight)
        # the teacher reads one mosaic per owned group (~2 per image): over a whole batch that
        # costs more than the training step itself, so only the first images of each local
        # batch (the loader shuffles) take part; None = all
        if content_claim_images is not None and content_claim_images < 1:
            raise ValueError(f"content_claim_images must be >= 1 or None, got "
                             f"{content_claim_images}")
        self.content_claim_images = content_claim_images
        self.content_claim_margin = float(content_claim_margin)
        self.flat_loss_weight = float(flat_loss_weight)
        self.flat_rows = flat_rows
        # the flatness term's targets (noun prompts, multi-label temperature) as constants: the
        # uniform distribution is then reached only by moving the groups, not by pulling the
        # prompts together or cooling the temperature, which would dull every group's naming
        self.flat_groups_only = bool(flat_groups_only)
        # recipe option, not in the paper (0 = official): assign_info_loss on the soft
        # assignment of the grouping stages listed in assign_info_stages (0 = the first)
        if assign_info_weight < 0:
            raise ValueError(f"assign_info_weight must be >= 0, got {assign_info_weight}")
        self.assign_info_weight = float(assign_info_weight)
        self.assign_info_stages = tuple(int(i) for i in assign_info_stages)
        if not 0.0 <= assign_info_balance <= 1.0:
            raise ValueError(f"assign_info_balance must be in [0, 1], got {assign_info_balance}")
        self.assign_info_balance = float(assign_info_balance)
        if assign_info_scope not in ("image", "batch", "objects"):
            raise ValueError(f"assign_info_scope must be 'image', 'batch' or 'objects', got "
                             f"{assign_info_scope!r}")
        self.assign_info_scope = assign_info_scope
        blocks = self.img_encoder.grouping_blocks
        bad = [i for i in self.assign_info_stages if not 0 <= i < len(blocks)]
        if bad or not self.assign_info_stages:
            raise ValueError(f"assign_info_stages must name grouping stages 0..{len(blocks) - 1}, "
                             f"got {list(assign_info_stages)}")
        for i in self.assign_info_stages:
            blocks[i].assign.track_soft = bool(self.assign_info_weight)
        small = [i for i in self.assign_info_stages if blocks[i].num_output_group < 3]
        if self.assign_info_weight and assign_info_scope == "objects" and small:
            raise ValueError(f"assign_info_scope='objects' leaves out each image's largest group "
                             f"and needs >= 3 groups at every stage it reads; stage(s) {small} "
                             f"have fewer")

    @property
    def with_multi_label(self):
        return self.multi_label > 0

    # -- temperatures -------------------------------------------------------------------------
    def get_logit_scale(self):
        return torch.clamp(self.logit_scale.float().exp(), max=100)

    def get_multi_label_logit_scale(self):
        src = self.logit_scale if self.share_temperature else self.multi_label_logit_scale
        return torch.clamp(src.float().exp(), max=100)

    # -- losses -------------------------------------------------------------------------------
    def loss(self, image_x, text_x):
        return image_text_loss(image_x, text_x, self.get_logit_scale())

    def multi_label_loss(self, image_feat, text_feat):
        return multi_label_loss(image_feat, text_feat, self.get_multi_label_logit_scale())

    # -- encoders -----------------------------------------------------------------------------
    def encode_image(self, image, *, return_feat=False, return_attn=False, as_dict=False):
        """image [B,3,H,W] -> image_x [B,D] (pooled groups, projected); with ``return_feat`` also
        image_feat [B,G,D] (each final group, projected); with ``return_attn`` also the encoder's
        attn_dicts (the stage assignments)."""
        outs = Result(as_dict)
        img_outs = self.img_encoder(image, return_feat=return_feat, return_attn=return_attn,
                                    as_dict=True)
        if return_feat:
            # pooled and group tokens go through the projector in one call: in training its BN
            # then updates its statistics once, over all B·(1+G) rows, as the text side pools
            # captions and prompts; in eval the rows are independent and nothing changes
            both = self.img_projector(
                torch.cat([img_outs["x"].unsqueeze(1), img_outs["feat"]], dim=1))  # [B,1+G,D]
            outs.append(both[:, 0], "image_x")
            outs.append(both[:, 1:], "image_feat")
        else:
            outs.append(self.img_projector(img_outs["x"]), "image_x")
        if return_attn:
            outs.append(img_outs["attn_dicts"], "attn_dicts")
        if as_dict and "owners" in img_outs:
            outs.append(img_outs["owners"], "owners")
        return outs.as_return()

    def encode_text(self, text, *, as_dict=False):
        if text.ndim not in (2, 3):
            raise ValueError(f"encode_text: expected tokens [B,77] or [B,1+K,77], got shape "
                             f"{tuple(text.shape)}")
        num_text = 1
        squeeze = text.ndim == 3
        if squeeze:
            num_text = text.shape[1]
            text = text.reshape(-1, text.shape[-1])  # [B,1+K,L] -> [(B 1+K),L]
        outs = Result(as_dict=as_dict)
        # caption and prompts go through the projector together: its BN statistics pool
        # over all B·(1+K) texts, as in training
        text_x = self.text_projector(self.text_encoder(text))
        outs.append(text_x, "text_x")
        if squeeze:
            text_x = text_x.reshape(-1, num_text, text_x.shape[-1])  # [B,1+K,D]
            outs.update(text_x=text_x[:, 0], text_multi_label_x=text_x[:, 1:])
        return outs.as_return()

    # -- forward ------------------------------------------------------------------------------
    @staticmethod
    def patch_owners(attn_dicts) -> torch.Tensor:
        """[B,G,N] 0/1: which final group owns each patch (``final_group_owners``)."""
        return final_group_owners(attn_dicts)

    @staticmethod
    def owned_groups(attn_dicts=None, *, owners=None) -> torch.Tensor:
        """[B,G] bool: final groups that own at least one patch, from ``attn_dicts`` or from
        their ``patch_owners`` already chained."""
        if owners is None:
            owners = MultiLabelContrastive.patch_owners(attn_dicts)
        return owned_final_groups(owners)

    def _encode_text_and_background(self, text):
        """Texts [B,1+K,L] and the claim background prompt in one text-encoder call (its BN
        statistics pool over both): (text_outs dict, background embedding [D])."""
        if text.ndim != 3:
            raise ValueError(f"claim_loss_weight needs texts [B,1+K,L], got shape "
                             f"{tuple(text.shape)}")
        B, T, L = text.shape
        bg = self.claim_background_tokens
        if bg.shape[-1] != L:
            raise ValueError(f"claim background prompt has {bg.shape[-1]} tokens, the texts {L}")
        both = torch.cat([text.reshape(B * T, L), bg.to(text.device)], dim=0)  # [B·T+1,L]
        emb = self.text_projector(self.text_encoder(both))  # [B·T+1,D]
        text_x = emb[:-1].reshape(B, T, -1)  # [B,1+K,D]
        return dict(text_x=text_x[:, 0], text_multi_label_x=text_x[:, 1:]), emb[-1]

    def group_mosaics(self, image, owners):
        """One image per owned final group, tiled with that group's patches alone (drawn with
        replacement, positions shuffled): what the group's pixels show without the rest of the
        scene. image [B,3,H,W], owners [B,G,N] (``patch_owners``) -> (mosaics [M,3,H',W'],
        batch index [M], group index [M]) with H', W' the patch-aligned crop the encoder sees."""
        ph, pw = self.img_encoder.patch_embed.proj.kernel_size
        patches, (h, w) = patchify(image, ph, pw)  # [B,N,C*ph*pw]
        N = h * w
        if owners.shape[-1] != N:
            raise ValueError(f"group_mosaics: the assignment covers {owners.shape[-1]} patches, "
                             f"the image {N}")
        bi, gi = self.owned_groups(owners=owners).nonzero(as_tuple=True)  # [M], [M]
        pick = torch.multinomial(owners[bi, gi], N, replacement=True)  # [M,N] patch indices
        tiles = patches[bi[:, None], pick]  # [M,N,C*ph*pw]
        return unpatchify(tiles, h, w, image.shape[1], ph, pw), bi, gi

    @torch.no_grad()
    def group_content(self, image, owners):
        """[B,G,D] pooled embedding of each owned group's mosaic (zeros for unowned groups),
        read in eval mode (running BN statistics, no Gumbel noise, as the protocol reads the
        model) and without gradient: a teacher, not a second training view."""
        mosaics, bi, gi = self.group_mosaics(image, owners)
        was_training = self.training
        self.eval()
        try:
            emb = self.encode_image(mosaics)  # [M,D]
        finally:
            self.train(was_training)
        out = emb.new_zeros(owners.shape[:2] + emb.shape[-1:])  # [B,G,D]
        out[bi, gi] = emb
        return out

    def _flat_loss(self, group_feat, owners, owned, noun_feat, valid, bg_x, claimed=None):
        """flat_class_loss rows and weights for ``flat_rows`` (see __init__); owners [B,G,N]
        from ``patch_owners``, owned [B,G] from ``owned_groups``."""
        D = group_feat.shape[-1]
        g = F.normalize(group_feat.float(), dim=-1)  # [B,G,D]
        s = self.get_multi_label_logit_scale()
        if self.flat_rows == "content":
            n = claimed.shape[0]  # only the images the content claim read
            rows = g[:n].reshape(-1, D)  # [n·G,D]
            weights = (owned[:n] & ~claimed).float().reshape(-1)  # [n·G]
        elif self.flat_rows in ("mean", "pixels"):
            # 'mean': one vote per owned group; 'pixels': one per owned patch
            votes = owned.float() if self.flat_rows == "mean" else owners.sum(dim=-1)  # [B,G]
            w = votes[..., None]  # [B,G,1]
            rows = ((g * w).sum(dim=(0, 1)) / w.sum().clamp(min=1))[None]  # [1,D]
            weights = rows.new_ones(1)
        elif self.flat_rows == "share":
            # every group flattened on its own, weighted by its share of its image's patches:
            # unlike a mean row, a background group that carries the object's name cannot hide
            # in the batch average, and the image's largest group is pressed hardest. The
            # shares are not differentiated (flat_class_loss detaches weights), so no group
            # gains by shrinking
            rows = g.reshape(-1, D)  # [B·G,D]
            weights = (owners.sum(dim=-1) / owners.shape[-1]).reshape(-1)  # [B·G]
        else:
            # each owned group's probability of claiming the background among its image's
            # candidates (as in group_claim_loss), not differentiated: it only picks the rows
            logp, _ = claim_log_probs(group_feat, noun_feat, valid, bg_x, s)
            p_bg = logp[..., -1].detach().exp() * owned.float()  # [B,G]
            rows, weights = g.reshape(-1, D), p_bg.reshape(-1)  # [B·G,D], [B·G]
        prompts = noun_feat.reshape(-1, D)  # [B·K,D]
        if self.flat_groups_only:
            prompts, s = prompts.detach(), s.detach()
        return flat_class_loss(rows, weights, prompts, valid.reshape(-1), s)

    def _assign_info(self, stages, i):
        """assign_info_loss of grouping stage ``i`` (stages: the encoder's attn_dicts)."""
        soft = stages[i]["soft_grad"]  # [B,S,N]
        if self.assign_info_scope != "objects":
            return assign_info_loss(soft, self.assign_info_balance, self.assign_info_scope)
        select, drop = self.object_tokens(stages, i)
        return assign_info_loss(soft, self.assign_info_balance, "batch", select=select,
                                drop=drop)

    @staticmethod
    @torch.no_grad()
    def object_tokens(stages, i):
        """For ``assign_info_scope='objects'``: which input tokens of grouping stage ``i`` lie
        outside the image's largest group of that stage (taken as the background: it holds
        most patches in scenes of a few objects), as select [B,N] (inputs that hold a patch and
        are assigned elsewhere), and that group as drop [B,S] (one-hot). The usage term then
        asks the other groups to share the *objects* over the batch, one kind of object per
        group, while the background keeps one group. Read from the training (Gumbel) hard
        assignments, no gradient."""
        hard = stages[i]["hard"][:, 0].float()  # [B,1,S,N] -> [B,S,N]
        size = hard.new_ones(hard.shape[0], stages[0]["hard"].shape[-1])  # [B,patches]
        for d in stages[:i]:  # -> [B,N] patches held by each input token of stage i
            size = torch.einsum("bsn,bn->bs", d["hard"][:, 0].float(), size)
        group_size = torch.einsum("bsn,bn->bs", hard, size)  # [B,S]
        bg = group_size.argmax(dim=1)  # [B]
        drop = F.one_hot(bg, hard.shape[1]).bool()  # [B,S]
        select = (hard.argmax(dim=1) != bg[:, None]) & (size > 0)  # [B,N]
        return select, drop

    def forward_train(self, image, text):
        claim = bool(self.claim_loss_weight)
        flat = bool(self.flat_loss_weight)
        # the group-token losses read the projected groups (projected with the pooled rows in
        # one call, so BN sees both); the assignment-information loss reads only the maps
        per_group = any(getattr(self, opt) for opt in GROUP_TOKEN_LOSSES)
        bg_x = None
        if claim and self.claim_background_tokens is not None:
            text_outs, bg_x = self._encode_text_and_background(text)
        else:
            text_outs = self.encode_text(text, as_dict=True)
        img_outs = self.encode_image(image, return_feat=per_group,
                                     return_attn=per_group or bool(self.assign_info_weight),
                                     as_dict=True)
        image_x = img_outs["image_x"]
        group_loss = claim_loss = flat_loss = content_loss = claimed = None
        if self.assign_info_weight:
            stages = [d for d in img_outs["attn_dicts"] if d is not None]
            info = sum(self._assign_info(stages, i) for i in self.assign_info_stages)
        if per_group:
            if "text_multi_label_x" not in text_outs:
                raise ValueError(f"group_loss_weight / claim_loss_weight need texts [B,1+K,L], "
                                 f"got shape {tuple(text.shape)}")
            # prompts that are copies of the caption (captions with fewer than K nouns) name
            # the whole scene, not one object: left out
            valid = (text[:, 1:] != text[:, :1]).any(dim=-1)  # [B,K]
            owners = img_outs.get("owners")  # chained by a pool_owned encoder, [B,G,N]
            if owners is None:
                owners = self.patch_owners(img_outs["attn_dicts"])  # [B,G,N]
            owned = self.owned_groups(owners=owners)
        if claim:
            claim_loss = group_claim_loss(img_outs["image_feat"], owned,
                                          text_outs["text_multi_label_x"], valid, bg_x,
                                          self.get_multi_label_logit_scale())
        if self.content_claim_weight:
            n = image.shape[0] if self.content_claim_images is None else \
                min(image.shape[0], self.content_claim_images)
            content = self.group_content(image[:n], owners[:n])
            content_loss, claimed = content_claim_loss(
                img_outs["image_feat"][:n], owned[:n], content,
                text_outs["text_multi_label_x"][:n], valid[:n],
                self.get_multi_label_logit_scale(), margin=self.content_claim_margin)
        if flat:
            flat_loss = self._flat_loss(img_outs["image_feat"], owners, owned,
                                        text_outs["text_multi_label_x"], valid,
                                        bg_x, claimed)
        if self.group_loss_weight:
            group_loss = group_multi_label_loss(
                img_outs["image_feat"], owned,
                text_outs["text_multi_label_x"], valid, self.get_multi_label_logit_scale())
        losses = dict(loss=self.loss(image_x, text_outs["text_x"]))
        if self.with_multi_label:
            if "text_multi_label_x" not in text_outs:
                raise ValueError(f"multi_label={self.multi_label} needs texts [B,1+K,77], got "
                                 f"shape {tuple(text.shape)}")
            losses["multi_label_loss"] = self.multi_label_loss(
                image_x.unsqueeze(1), text_outs["text_multi_label_x"]) * \
                self.multi_label_loss_weight
        if group_loss is not None:
            losses["group_loss"] = group_loss * self.group_loss_weight
        if claim_loss is not None:
            losses["claim_loss"] = claim_loss * self.claim_loss_weight
        if flat_loss is not None:
            losses["flat_loss"] = flat_loss * self.flat_loss_weight
        if content_loss is not None:
            losses["content_claim_loss"] = content_loss * self.content_claim_weight
        if self.assign_info_weight:
            losses["assign_info_loss"] = info * self.assign_info_weight
        return losses

    def forward_test(self, image, text):
        return self.zero_shot_pred(image, text)

    def forward(self, image, text):
        if self.training:
            return self.forward_train(image, text)
        return self.forward_test(image, text)

    @torch.no_grad()
    def build_text_embedding(self, text):
        """tokens [N_cls, T, L] -> [N_cls, D]: mean over templates *before* L2 normalisation
        (the official recipe, unlike CLIP's normalise-average-renormalise)."""
        if text.ndim != 3:
            raise ValueError(f"build_text_embedding: expected [N_cls, T, L], got {tuple(text.shape)}")
        text = text.to(next(self.parameters()).device)
        n, t = text.shape[:2]
        emb = self.encode_text(text.reshape(n * t, -1))  # [(N T),D]
        emb = emb.reshape(n, t, -1).mean(dim=1)  # [N,D]
        return F.normalize(emb, dim=-1)

    def zero_shot_pred(self, image, text):
        image_features = F.normalize(self.encode_image(image), dim=-1)
        return image_features @ text.t()
