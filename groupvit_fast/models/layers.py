"""Transformer building blocks shared by the image and text encoders (official names kept so
state_dict keys match the released checkpoints)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.attention import attention


class Result:
    """Collects named outputs and returns a dict, a single tensor or a tuple, as the official
    ``as_dict`` convention does."""

    def __init__(self, as_dict: bool = False):
        self.as_dict = as_dict
        self.outs = {} if as_dict else []

    def append(self, value, name=None):
        if self.as_dict:
            self.outs[name] = value
        else:
            self.outs.append(value)

    def update(self, **kwargs):
        if self.as_dict:
            self.outs.update(**kwargs)
        else:
            self.outs.extend(kwargs.values())

    def as_return(self):
        if self.as_dict:
            return self.outs
        return self.outs[0] if len(self.outs) == 1 else tuple(self.outs)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    """Stochastic depth per sample (drawn from torch's global RNG, so RNG replay reproduces it)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self):
        return f"drop_prob={self.drop_prob:.4f}"


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU,
                 drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class MixerMlp(Mlp):
    """Token-mixing MLP: the Mlp runs along the token axis."""

    def forward(self, x):
        # [B,S_in,C] -> [B,C,S_in] -> [B,C,S_out] -> [B,S_out,C]
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention. ``qkv_fuse=True`` (stage blocks) keeps the official fused ``qkv``
    Linear with layout [q | k | v], heads of ``head_dim`` contiguous channels; ``qkv_fuse=False``
    (pre-assign cross-attention) has separate ``q_proj``/``k_proj``/``v_proj``."""

    def __init__(self, dim, num_heads=8, out_dim=None, qkv_bias=False, qk_scale=None,
                 attn_drop=0.0, proj_drop=0.0, qkv_fuse=False):
        super().__init__()
        out_dim = out_dim or dim
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv_fuse = qkv_fuse
        if qkv_fuse:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, t):
        B, L, C = t.shape
        # [B,L,C] -> [B,H,L,C/H]
        return t.reshape(B, L, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, query, key=None, *, value=None):
        B, N, C = query.shape
        if self.qkv_fuse:
            assert key is None and value is None
            # [B,N,3C] -> [3,B,H,N,C/H]
            qkv = self.qkv(query).reshape(B, N, 3, self.num_heads, C // self.num_heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            key = query if key is None else key
            value = key if value is None else value
            q = self._heads(self.q_proj(query))
            k = self._heads(self.k_proj(key))
            v = self._heads(self.v_proj(value))
        if self.attn_drop > 0 and self.training:
            raise NotImplementedError("attn_drop_rate > 0 is not supported (0 in all releases)")
        out = attention(q, k, v, scale=self.scale)  # [B,H,N,C/H]
        out = out.transpose(1, 2).reshape(B, N, -1)  # [B,N,C]
        return self.proj_drop(self.proj(out))


class AttnBlock(nn.Module):
    """Pre-norm ViT block with fused qkv."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop, qkv_fuse=True)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttnBlock(nn.Module):
    """Cross-attention block of the GroupingBlock. With ``post_norm`` (the release) q/k get no
    pre-norm and a LayerNorm follows the block."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0,
                 attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 post_norm=False):
        super().__init__()
        if post_norm:
            self.norm_post = norm_layer(dim)
            self.norm_q = nn.Identity()
            self.norm_k = nn.Identity()
        else:
            self.norm_q = norm_layer(dim)
            self.norm_k = norm_layer(dim)
            self.norm_post = nn.Identity()
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop, qkv_fuse=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, query, key):
        x = query + self.drop_path(self.attn(self.norm_q(query), self.norm_k(key)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return self.norm_post(x)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


def checkpointed(module: nn.Module, *args):
    """Activation checkpointing of one block (non-reentrant: works with kwargs-free blocks and
    keeps RNG state so drop-path masks replay identically)."""
    from torch.utils.checkpoint import checkpoint
    return checkpoint(module, *args, use_reentrant=False)


def trunc_normal_(t, std=0.02):
    # timm's convention (used by the official init): the cut-off [-2, 2] is absolute, not in stds
    return nn.init.trunc_normal_(t, mean=0.0, std=std, a=-2.0, b=2.0)


__all__ = ["Result", "DropPath", "Mlp", "MixerMlp", "Attention", "AttnBlock", "CrossAttnBlock",
           "QuickGELU", "checkpointed", "trunc_normal_"]
