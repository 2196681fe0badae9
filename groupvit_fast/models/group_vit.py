"""GroupViT image encoder (Xu et al., CVPR 2022), drop-in for the official ``GroupViT``: same
constructor arguments and defaults, forward signature, outputs and state_dict keys.

    image ─patch_embed─▶ x [B,N,C] (+pos) ─▶ stage 0: [x ; G₀(64)] ─6 blocks─▶ GroupingBlock ─▶ 64 segments
                                           stage 1: [x ; G₁(8)+proj(G₀)] ─3 blocks─▶ GroupingBlock ─▶ 8 segments
                                           stage 2: 3 blocks ─▶ norm ─▶ mean ─▶ x [B,C]
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import gumbel_assign_merge
from .layers import (AttnBlock, CrossAttnBlock, MixerMlp, Mlp, Result, checkpointed,
                     trunc_normal_)


class AssignAttention(nn.Module):
    """Single-head assignment of image tokens to groups: the softmax runs over the *group* axis
    (Gumbel + straight-through one-hot in training, argmax one-hot in eval), each group then takes
    the mean of its members with a +``assign_eps`` in the denominator. The whole chain is the
    fused op ``ops.gumbel_assign_merge``."""

    def __init__(self, dim, num_heads=1, qkv_bias=False, qk_scale=None, attn_drop=0.0,
                 proj_drop=0.0, hard=True, gumbel=False, gumbel_tau=1.0, sum_assign=False,
                 assign_eps=1.0, cosine=False):
        super().__init__()
        if num_heads != 1:
            raise ValueError("AssignAttention supports num_heads=1 only (as every release)")
        if sum_assign:
            raise ValueError("sum_assign=True is not supported (False in every release)")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        # the configured scale; a training schedule may run below it (assign_scale_factor)
        self.base_scale = self.scale
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hard = hard
        self.gumbel = gumbel
        self.gumbel_tau = gumbel_tau
        self.assign_eps = assign_eps
        self.cosine = bool(cosine)
        # set by MultiLabelContrastive when its assignment-information loss reads this stage:
        # the training attn_dict then also carries the differentiable soft assignment
        self.track_soft = False

    def forward(self, query, key, *, return_attn=False):
        q = self.q_proj(query)  # [B,S,C]
        k = self.k_proj(key)  # [B,N,C]
        if self.cosine:
            # recipe option: bounded logits keep the softmax's gradient alive (a saturated
            # softmax passes none to the straight-through assignment)
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        v = self.v_proj(key)  # [B,N,C]
        kwargs = dict(scale=self.scale, gumbel=self.gumbel and self.training,
                      tau=self.gumbel_tau, eps=self.assign_eps, hard=self.hard,
                      return_attn=return_attn)
        if torch.is_autocast_enabled(q.device.type):
            # Mixed precision: the hard assignment is an argmax over the group logits, and
            # bf16/fp16 rounding flips near-ties; the op is ~2% of the FLOPs, so it runs in fp32.
            with torch.autocast(q.device.type, enabled=False):
                res = gumbel_assign_merge(q.float(), k.float(), v.float(), **kwargs)
        else:
            res = gumbel_assign_merge(q, k, v, **kwargs)
        attn_dict = None
        if return_attn:
            out, hard_map, soft_map = res
            # official maps carry a head axis: [B,S,N] -> [B,1,S,N]
            attn_dict = {"hard": hard_map.unsqueeze(1), "soft": soft_map.unsqueeze(1)}
            if self.track_soft and self.training:
                # the fused op's maps carry no gradient and the loss needs one, so the
                # noise-free softmax over groups is recomputed here (B·S·N, a few % of the op)
                logits = torch.einsum("bsc,bnc->bsn", q.float(), k.float()) * self.scale
                attn_dict["soft_grad"] = torch.softmax(logits, dim=1)  # [B,S,N]
        else:
            out = res
        return self.proj_drop(self.proj(out)), attn_dict


class GroupingBlock(nn.Module):
    """Merges image tokens into ``num_output_group`` segments (official order of operations,
    ref §2.1): LN tokens & x, token-MLP S_in→S_out, pre-assign cross-attention, assignment,
    + residual, channel MLP."""

    def __init__(self, *, dim, out_dim, num_heads, num_group_token, num_output_group,
                 norm_layer=nn.LayerNorm, mlp_ratio=(0.5, 4.0), hard=True, gumbel=True,
                 sum_assign=False, assign_eps=1.0, gumbel_tau=1.0, assign_scale=None,
                 assign_cosine=False):
        super().__init__()
        self.dim = dim
        self.hard = hard
        self.gumbel = gumbel
        self.sum_assign = sum_assign
        self.num_output_group = num_output_group
        self.norm_tokens = norm_layer(dim)
        tokens_dim, channels_dim = int(mlp_ratio[0] * dim), int(mlp_ratio[1] * dim)
        self.mlp_inter = Mlp(num_group_token, tokens_dim, num_output_group)
        self.norm_post_tokens = norm_layer(dim)
        self.norm_x = norm_layer(dim)
        self.pre_assign_attn = CrossAttnBlock(dim=dim, num_heads=num_heads, mlp_ratio=4,
                                              qkv_bias=True, norm_layer=norm_layer,
                                              post_norm=True)
        self.assign = AssignAttention(dim=dim, num_heads=1, qkv_bias=True, hard=hard,
                                      gumbel=gumbel, gumbel_tau=gumbel_tau,
                                      sum_assign=sum_assign, assign_eps=assign_eps,
                                      qk_scale=assign_scale, cosine=assign_cosine)
        self.norm_new_x = norm_layer(dim)
        self.mlp_channels = Mlp(dim, channels_dim, out_dim)
        if out_dim is not None and dim != out_dim:
            self.reduction = nn.Sequential(norm_layer(dim), nn.Linear(dim, out_dim, bias=False))
        else:
            self.reduction = nn.Identity()

    def project_group_token(self, group_tokens):
        # token-mixing along the group axis: [B,S_in,C] -> [B,S_out,C]
        projected = self.mlp_inter(group_tokens.transpose(1, 2)).transpose(1, 2)
        return self.norm_post_tokens(projected)

    def forward(self, x, group_tokens, return_attn=False):
        group_tokens = self.norm_tokens(group_tokens)
        x = self.norm_x(x)
        projected = self.project_group_token(group_tokens)
        projected = self.pre_assign_attn(projected, x)
        new_x, attn_dict = self.assign(projected, x, return_attn=return_attn)
        new_x = new_x + projected
        new_x = self.reduction(new_x) + self.mlp_channels(self.norm_new_x(new_x))
        return new_x, attn_dict


class GroupingLayer(nn.Module):
    """One stage: transformer blocks over [image tokens ; group tokens], then (optionally) a
    GroupingBlock. Returns (segments, the pre-grouping group tokens, attn_dict)."""

    def __init__(self, *, dim, num_input_token, depth, num_heads, num_group_token, mlp_ratio=4.0,
                 qkv_bias=True, qk_scale=None, drop=0.0, attn_drop=0.0, drop_path=0.0,
                 norm_layer=nn.LayerNorm, downsample=None, use_checkpoint=False,
                 group_projector=None, zero_init_group_token=False):
        super().__init__()
        self.dim = dim
        self.input_length = num_input_token
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        self.num_group_token = num_group_token
        if num_group_token > 0:
            self.group_token = nn.Parameter(torch.zeros(1, num_group_token, dim))
            if not zero_init_group_token:
                trunc_normal_(self.group_token, std=0.02)
        else:
            self.group_token = None
        dpr = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList([
            AttnBlock(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                      qk_scale=qk_scale, drop=drop, attn_drop=attn_drop, drop_path=dpr[i],
                      norm_layer=norm_layer)
            for i in range(depth)])
        self.downsample = downsample
        self.group_projector = group_projector

    @property
    def with_group_token(self):
        return self.group_token is not None

    def forward(self, x, prev_group_token=None, return_attn=False):
        B = x.shape[0]
        if self.with_group_token:
            group_token = self.group_token.expand(B, -1, -1)  # [B,S,C]
            if self.group_projector is not None:
                group_token = group_token + self.group_projector(prev_group_token)
            cat_x = torch.cat([x, group_token], dim=1)  # [B,N+S,C]: groups after the patches
        else:
            group_token = None
            cat_x = x
        for blk in self.blocks:
            cat_x = checkpointed(blk, cat_x) if self.use_checkpoint and self.training else blk(cat_x)
        if self.with_group_token:
            n = cat_x.shape[1] - self.num_group_token
            x, group_token = cat_x[:, :n], cat_x[:, n:]
        else:
            x = cat_x
        attn_dict = None
        if self.downsample is not None:
            x, attn_dict = self.downsample(x, group_token, return_attn=return_attn)
        return x, group_token, attn_dict


class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, kernel_size=16, stride=16, padding=0, in_chans=3,
                 embed_dim=768, norm_layer=None):
        super().__init__()
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patches_resolution = (
            int((self.img_size[0] + 2 * padding - kernel_size) / stride + 1),
            int((self.img_size[1] + 2 * padding - kernel_size) / stride + 1))
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride,
                              padding=padding)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else None

    @property
    def num_patches(self):
        return self.patches_resolution[0] * self.patches_resolution[1]

    def _project(self, x):
        """The patch projection as one GEMM when patches do not overlap (kernel == stride, no
        padding; every release): the same sums as the convolution, but oneDNN's direct
        convolution runs a 3-channel input several times slower than a GEMM on CPU (forward
        and backward), and the GEMM needs no [B,C,h,w] -> [B,h*w,C] transpose afterwards."""
        conv = self.proj
        (kh, kw), (sh, sw), pad = conv.kernel_size, conv.stride, conv.padding
        if (kh, kw) != (sh, sw) or pad != (0, 0) or conv.groups != 1 or conv.dilation != (1, 1):
            x = conv(x)  # [B,C,h,w]
            return x.flatten(2).transpose(1, 2), x.shape[2:]  # [B,C,h,w] -> [B,h*w,C]
        x, (h, w) = patchify(x, kh, kw)  # [B,h*w,Cin*kh*kw]
        weight = conv.weight.reshape(conv.out_channels, -1)  # [C,Cin,kh,kw] -> [C,Cin*kh*kw]
        return F.linear(x, weight, conv.bias), torch.Size((h, w))

    def forward(self, x):
        B, C, H, W = x.shape
        if self.training and (H, W) != self.img_size:
            raise ValueError(f"GroupViT: training input must be {self.img_size[0]}x"
                             f"{self.img_size[1]} (the learned pos_embed grid), got {H}x{W}; "
                             f"switch to eval() for other resolutions")
        x, hw_shape = self._project(x)  # [B,h*w,C]
        if self.norm is not None:
            x = self.norm(x)
        return x, hw_shape


def patchify(x: torch.Tensor, kh: int, kw: int):
    """Non-overlapping kh x kw patches as rows: [B,C,H,W] -> ([B,h*w,C*kh*kw], (h, w)), row-major
    over the grid, each row in the (C, kh, kw) order of a Conv2d weight. A remainder narrower than
    a patch is dropped, as the stride-kh convolution drops it."""
    B, C, H, W = x.shape
    h, w = H // kh, W // kw
    x = x[:, :, :h * kh, :w * kw]
    # [B,C,h*kh,w*kw] -> [B,C,h,kh,w,kw] -> [B,h,w,C,kh,kw] -> [B,h*w,C*kh*kw]
    return x.reshape(B, C, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * kh * kw), (h, w)


def unpatchify(rows: torch.Tensor, h: int, w: int, C: int, kh: int, kw: int) -> torch.Tensor:
    """Inverse of ``patchify``: [B,h*w,C*kh*kw] -> [B,C,h*kh,w*kw]."""
    # [B,h*w,C*kh*kw] -> [B,h,w,C,kh,kw] -> [B,C,h,kh,w,kw] -> [B,C,h*kh,w*kw]
    return rows.reshape(-1, h, w, C, kh, kw).permute(0, 3, 1, 4, 2, 5).reshape(-1, C, h * kh, w * kw)


def _per_stage(value, n_stages: int, name: str, scalar_types) -> list:
    """A per-grouping-stage option: one value (or None) for every stage, or a list of exactly
    one value per stage."""
    if value is None or isinstance(value, scalar_types):
        return [value] * n_stages
    values = list(value)
    if len(values) != n_stages:
        raise ValueError(f"GroupViT: {name} has {len(values)} entries, expected {n_stages} "
                         f"(one per GroupingBlock) or a single value")
    return values


def build_2d_sincos_position_embedding(h, w, embed_dim, temperature=10000.0):
    """Fixed 2-D sin-cos table ('fourier' pos_embed_type, unused by the releases)."""
    grid_w = torch.arange(w, dtype=torch.float32)
    grid_h = torch.arange(h, dtype=torch.float32)
    grid_w, grid_h = torch.meshgrid(grid_w, grid_h, indexing="ij")
    assert embed_dim % 4 == 0, "embed_dim must be divisible by 4 for the sin-cos table"
    pos_dim = embed_dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = grid_w.flatten()[:, None] * omega[None]
    out_h = grid_h.flatten()[:, None] * omega[None]
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)[None]
    return emb  # [1,h*w,C]


def final_group_owners(attn_dicts) -> torch.Tensor:
    """[B,G,N] 0/1: which final group owns each patch under the hard assignments of
    ``attn_dicts`` (stage maps [B,1,G_l,N_l], chained patches -> stage-1 -> stage-2 groups),
    without gradient."""
    own = None
    for d in attn_dicts:
        if d is None:
            continue
        hard = d["hard"].detach()[:, 0].float()  # [B,1,G,N] -> [B,G,N]
        own = hard if own is None else torch.bmm(hard, own)  # [B,G_l,N_patches]
    if own is None:
        raise ValueError("the image encoder has no grouping stage")
    return own


def owned_final_groups(owners: torch.Tensor) -> torch.Tensor:
    """[B,G] bool: the final groups that own at least one patch, from ``final_group_owners``
    [B,G,N] (0/1, so > 0.5 is exact)."""
    return owners.sum(dim=-1) > 0.5


class GroupViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=0, embed_dim=384,
                 embed_factors=(1, 1, 1), depths=(6, 3, 3), num_heads=(6, 6, 6),
                 num_group_tokens=(64, 8, 0), num_output_groups=(64, 8), hard_assignment=True,
                 mlp_ratio=4.0, qkv_bias=True, qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0,
                 drop_path_rate=0.1, patch_norm=True, use_checkpoint=False,
                 pos_embed_type="simple", freeze_patch_embed=False, gumbel_tau=1.0,
                 gumbel=None, assign_scale=None, assign_cosine=False, pool_owned=False):
        super().__init__()
        if patch_size not in (4, 8, 16):
            raise ValueError(f"GroupViT: patch_size must be 4, 8 or 16, got {patch_size}")
        depths, num_heads = list(depths), list(num_heads)
        num_group_tokens, num_output_groups = list(num_group_tokens), list(num_output_groups)
        embed_factors = list(embed_factors)
        n = len(depths)
        for name, val in (("num_heads", num_heads), ("num_group_tokens", num_group_tokens),
                          ("embed_factors", embed_factors)):
            if len(val) != n:
                raise ValueError(f"GroupViT: {name} has {len(val)} entries, expected {n} "
                                 f"(one per stage, len(depths))")
        if len(num_output_groups) != n - 1:
            raise ValueError(f"GroupViT: num_output_groups has {len(num_output_groups)} entries, "
                             f"expected {n - 1} (one per GroupingBlock)")
        self.num_classes = num_classes
        self.num_layers = n
        self.embed_dim = embed_dim
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * embed_factors[-1])
        self.mlp_ratio = mlp_ratio
        self.qkv_bias = qkv_bias
        self.qk_scale = qk_scale
        self.drop_rate = drop_rate
        self.attn_drop_rate = attn_drop_rate
        self.drop_path_rate = drop_path_rate
        self.num_group_tokens = num_group_tokens
        self.num_output_groups = num_output_groups
        self.pos_embed_type = pos_embed_type
        # recipe option, not in the paper (False = official mean over all final groups): the
        # pooled embedding averages only the final groups that own a patch under the hard
        # assignment. A group that owns nothing is a second global token (its features come
        # from cross-attention to the whole scene), and measured on the embedded recipe such
        # groups carried the scene's class name more often than the groups the protocol
        # segments with, so the image-level losses never asked the segmenting groups for it
        if pool_owned and not hard_assignment:
            raise ValueError("GroupViT: pool_owned needs hard_assignment=True (a soft "
                             "assignment gives every group a share of every patch)")
        self.pool_owned = bool(pool_owned)
        norm_layer = nn.LayerNorm

        self.patch_embed = PatchEmbed(img_size=img_size, kernel_size=patch_size, stride=patch_size,
                                      padding=0, in_chans=in_chans, embed_dim=embed_dim,
                                      norm_layer=norm_layer if patch_norm else None)
        num_patches = self.patch_embed.num_patches
        self.patches_resolution = self.patch_embed.patches_resolution
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        if pos_embed_type == "simple":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
            trunc_normal_(self.pos_embed, std=0.02)
        elif pos_embed_type == "fourier":
            h, w = self.patches_resolution
            self.pos_embed = nn.Parameter(build_2d_sincos_position_embedding(h, w, embed_dim),
                                          requires_grad=False)
        else:
            raise ValueError(f"GroupViT: unknown pos_embed_type {pos_embed_type!r}")
        if freeze_patch_embed:
            for p in self.patch_embed.parameters():
                p.requires_grad = False
            self.pos_embed.requires_grad = False
        self.pos_drop = nn.Dropout(p=drop_rate)

        # stochastic depth linearly spaced over all blocks
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        embed_dims = [int(embed_dim * f) for f in embed_factors]
        assign_scales = _per_stage(assign_scale, n - 1, "assign_scale", (int, float))
        # official: Gumbel noise exactly when hard; small recipes may train with the noise-free
        # argmax, at every stage or only some
        gumbels = [hard_assignment if g is None else bool(g)
                   for g in _per_stage(gumbel, n - 1, "gumbel", bool)]
        cosines = [bool(c) for c in _per_stage(assign_cosine, n - 1, "assign_cosine", bool)]
        bad = [a for a in assign_scales if a is not None and not a > 0]
        if bad:
            raise ValueError(f"GroupViT: assign_scale must be > 0 (None = the official "
                             f"dim**-0.5), got {assign_scale}")
        self.layers = nn.ModuleList()
        num_input_token = num_patches
        num_output_token = num_input_token
        for i in range(n):
            dim = embed_dims[i]
            downsample = None
            if i < n - 1 and num_group_tokens[i] > 0:
                downsample = GroupingBlock(dim=dim, out_dim=embed_dims[i + 1],
                                           num_heads=num_heads[i],
                                           num_group_token=num_group_tokens[i],
                                           num_output_group=num_output_groups[i],
                                           norm_layer=norm_layer, hard=hard_assignment,
                                           gumbel=gumbels[i],
                                           gumbel_tau=gumbel_tau,
                                           # None: dim**-0.5, the official scale
                                           assign_scale=assign_scales[i],
                                           assign_cosine=cosines[i])
                num_output_token = num_output_groups[i]
            group_projector = None
            if i > 0 and num_group_tokens[i] > 0:
                prev_dim = embed_dims[i - 1]
                mods = [norm_layer(prev_dim),
                        MixerMlp(num_group_tokens[i - 1], prev_dim // 2, num_group_tokens[i])]
                if dim != prev_dim:
                    mods += [norm_layer(prev_dim), nn.Linear(prev_dim, dim, bias=False)]
                group_projector = nn.Sequential(*mods)
            self.layers.append(GroupingLayer(
                dim=dim, num_input_token=num_input_token, depth=depths[i],
                num_heads=num_heads[i], num_group_token=num_group_tokens[i],
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                norm_layer=norm_layer, downsample=downsample, use_checkpoint=use_checkpoint,
                group_projector=group_projector,
                # group tokens are zero-initialised exactly when a projector feeds them
                zero_init_group_token=group_projector is not None))
            num_input_token = num_output_token
        self.norm = norm_layer(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._pos_cache = None
        self.apply(self._init_weights)

    @property
    def width(self):
        return self.num_features

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @property
    def grouping_blocks(self) -> List["GroupingBlock"]:
        """The GroupingBlocks in stage order (stage i = the i-th grouping stage)."""
        return [l.downsample for l in self.layers if l.downsample is not None]

    @property
    def gumbel_tau(self) -> float:
        taus = [b.assign.gumbel_tau for b in self.grouping_blocks]
        return taus[0] if taus else 1.0

    @gumbel_tau.setter
    def gumbel_tau(self, tau: float):
        """Gumbel temperature of every GroupingBlock (official 1.0; a schedule is a recipe
        option, not a release setting)."""
        if tau <= 0:
            raise ValueError(f"gumbel_tau must be > 0, got {tau}")
        for b in self.grouping_blocks:
            b.assign.gumbel_tau = float(tau)

    @property
    def assign_scale_factor(self) -> List[float]:
        """Per grouping stage: the assignment logits' scale as a multiple of the configured one."""
        return [b.assign.scale / b.assign.base_scale for b in self.grouping_blocks]

    @assign_scale_factor.setter
    def assign_scale_factor(self, factors: Sequence[float]):
        """Run each grouping stage's assignment at ``factor`` x its configured scale (a training
        schedule, ``train.assign_ramp_*``; 1 = as configured). Only the ratio of the logits to
        the Gumbel noise changes: below 1 the noise decides more assignments, so group tokens
        that would never win a token still win some and get gradient. Not in the weights."""
        assigns = [b.assign for b in self.grouping_blocks]
        factors = [float(f) for f in factors]
        if len(factors) != len(assigns) or not all(f > 0 for f in factors):
            raise ValueError(f"assign_scale_factor: expected {len(assigns)} factors > 0 (one per "
                             f"grouping stage), got {factors}")
        for a, f in zip(assigns, factors):
            a.scale = a.base_scale * f

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # A checkpoint trained at another square resolution: resize its pos_embed bicubically
        # (the official load_state_dict override does the same).
        key = prefix + "pos_embed"
        if key in state_dict and self.pos_embed_type == "simple":
            src = state_dict[key]
            if src.ndim == 3 and src.shape != self.pos_embed.shape \
                    and src.shape[-1] == self.pos_embed.shape[-1]:
                n_src = src.shape[1]
                s = int(math.isqrt(n_src))
                if s * s == n_src:
                    h, w = self.patches_resolution
                    state_dict = dict(state_dict)
                    state_dict[key] = self._resize_pos(src, s, s, h, w)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._pos_cache = None

    @staticmethod
    def _resize_pos(pos, h0, w0, h, w):
        C = pos.shape[-1]
        # [1,h0*w0,C] -> [1,C,h0,w0] -> bicubic -> [1,h*w,C]
        grid = pos.reshape(1, h0, w0, C).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(int(h), int(w)), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, int(h) * int(w), C)

    def get_pos_embed(self, B, H, W):
        if self.training:
            return self.pos_embed
        h0, w0 = self.patches_resolution
        if (H, W) == (h0, w0):
            return self.pos_embed
        # Eval at another resolution: bicubic resize, cached per grid size while the parameter
        # is unchanged (no autograd through the cache).
        if torch.is_grad_enabled() and self.pos_embed.requires_grad:
            return self._resize_pos(self.pos_embed, h0, w0, H, W)
        key = (int(H), int(W), self.pos_embed._version, self.pos_embed.data_ptr(),
               self.pos_embed.dtype, self.pos_embed.device)
        if self._pos_cache is None or self._pos_cache[0] != key:
            with torch.no_grad():
                self._pos_cache = (key, self._resize_pos(self.pos_embed, h0, w0, H, W))
        return self._pos_cache[1]

    def forward_features(self, x, *, return_attn=False):
        B = x.shape[0]
        x, hw_shape = self.patch_embed(x)  # [B,N,C], (h,w)
        x = x + self.get_pos_embed(B, *hw_shape)
        x = self.pos_drop(x)
        group_token = None
        attn_dicts: List[Optional[dict]] = []
        for layer in self.layers:
            x, group_token, attn_dict = layer(x, group_token, return_attn=return_attn)
            attn_dicts.append(attn_dict)
        x = self.norm(x)  # [B,G,C]
        return x, group_token, attn_dicts

    def forward_image_head(self, x, owned=None):
        """Mean over the final segment tokens, [B,G,C] -> [B,C]; with ``owned`` [B,G] bool only
        over the groups it marks (at least one per image: every patch has an owner)."""
        if owned is None:
            return self.head(x.mean(dim=1))
        w = owned.to(x.dtype)[..., None]  # [B,G,1]
        return self.head((x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1))

    def forward(self, x, *, return_feat=False, return_attn=False, as_dict=False):
        x, _, attn_dicts = self.forward_features(x, return_attn=return_attn or self.pool_owned)
        outs = Result(as_dict=as_dict)
        owners = final_group_owners(attn_dicts) if self.pool_owned else None  # [B,G,N]
        owned = owned_final_groups(owners) if self.pool_owned else None  # [B,G]
        outs.append(self.forward_image_head(x, owned), name="x")
        if return_feat:
            outs.append(x, name="feat")
        if return_attn:
            outs.append(attn_dicts, name="attn_dicts")
        if as_dict and owners is not None:
            # already chained for the pooling: handed on so the group losses need not chain the
            # maps again (dict outputs only, the official tuple outputs keep their arity)
            outs.append(owners, name="owners")
        return outs.as_return()
