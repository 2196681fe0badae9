"""Attention backends for the transformer blocks (image self-attention, pre-assign
cross-attention, causal text attention). The assignment attention is *not* here: its softmax runs
over the query (group) axis, which no attention kernel covers (see ``ops.gumbel_assign_merge``).

Backends: ``sdpa`` (torch.nn.functional.scaled_dot_product_attention, default), ``xformers``
(memory_efficient_attention, CUDA only, when installed) and ``math`` (the exact eager formula of
the official code, the reference). Select with ``set_attention_backend`` or the environment
variable ``GROUPVIT_FAST_ATTN``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F

ATTN_BACKENDS = ("sdpa", "xformers", "math")

_backend: Optional[str] = None


def _xformers_ops():
    try:
        import xformers.ops as xops  # noqa: F401
        return xops
    except Exception:  # ImportError, or a _C.so built for another CUDA (see toolchain notes)
        return None


def set_attention_backend(name: Optional[str]) -> None:
    """Force an attention backend for subsequent calls (None = default/env)."""
    global _backend
    if name is not None and name not in ATTN_BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {ATTN_BACKENDS}")
    _backend = name


def get_attention_backend() -> str:
    if _backend is not None:
        return _backend
    env = os.environ.get("GROUPVIT_FAST_ATTN", "").strip().lower()
    if env:
        if env not in ATTN_BACKENDS:
            raise ValueError(f"GROUPVIT_FAST_ATTN={env!r}: expected one of {ATTN_BACKENDS}")
        return env
    return "sdpa"


def attention_math(q, k, v, *, causal: bool = False, scale: Optional[float] = None):
    """Exact eager attention: softmax(q kᵀ · scale [+ causal -inf]) v, as the official code."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B,H,Lq,Lk]
    if causal:
        lq, lk = attn.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu_(1 + lk - lq)
        attn = attn.masked_fill(mask, float("-inf"))
    attn = attn.softmax(dim=-1)
    return torch.matmul(attn, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None) -> torch.Tensor:
    """q [B,H,Lq,D], k/v [B,H,Lk,D] -> [B,H,Lq,D]."""
    backend = get_attention_backend()
    if backend == "math":
        return attention_math(q, k, v, causal=causal, scale=scale)
    if backend == "xformers":
        xops = _xformers_ops()
        if xops is None or not q.is_cuda:
            raise RuntimeError("attention backend 'xformers' needs xformers installed and CUDA "
                               "tensors; use 'sdpa' or 'math'")
        bias = xops.LowerTriangularMask() if causal else None
        # xformers layout is [B, L, H, D]
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), attn_bias=bias, scale=scale)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
