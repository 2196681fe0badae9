"""Attention backends for the transformer blocks (image self-attention, pre-assign
cross-attention, causal text attention). The assignment attention is *not* here: its softmax runs
over the query (group) axis, which no attention kernel covers (see ``ops.gumbel_assign_merge``).

Backends:

* ``sdpa`` (default): ``torch.nn.functional.scaled_dot_product_attention``; PyTorch picks a
  flash / memory-efficient kernel (a real flash kernel on CPU too), so the [L, L] probability
  matrix is never kept for backward.
* ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA tensors, xformers installed).
  Selecting it where it cannot run is an error, never a silent fallback.
* ``math``: the exact eager formula of the official code, softmax(q kᵀ · scale) v; the reference
  the other backends are tested against.

Select with ``set_attention_backend(name)``, the ``attention_backend(name)`` context manager,
or the environment variable ``GROUPVIT_FAST_ATTN`` (read at call time, like timm's
``TIMM_FUSED_ATTN``). The setter wins over the environment.

Causal masks are top-left aligned (query i sees keys 0..i) in every backend, which is what
SDPA's ``is_causal`` and xformers' ``LowerTriangularMask`` mean; GroupViT only uses them with
Lq == Lk (the text encoder).
"""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional

import torch
import torch.nn.functional as F

ATTN_BACKENDS = ("sdpa", "xformers", "math")
ENV_VAR = "GROUPVIT_FAST_ATTN"

_backend: Optional[str] = None
_xops = None
_xops_checked = False


def _xformers_ops():
    """The xformers.ops module when it imports *and* its compiled ops load (the PyPI wheel is
    built for one CUDA; with another torch its _C.so fails to load), else None. Cached."""
    global _xops, _xops_checked
    if not _xops_checked:
        _xops_checked = True
        try:
            import xformers.ops as xops
            _xops = xops
        except Exception:  # ImportError, or a _C.so built for another CUDA (see toolchain notes)
            _xops = None
    return _xops


def available_attention_backends(device: Optional[torch.device] = None) -> List[str]:
    """Backends that can run on ``device`` (default: CUDA when available, else CPU)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    out = ["sdpa"]
    if device.type == "cuda" and _xformers_ops() is not None:
        out.append("xformers")
    out.append("math")
    return out


def set_attention_backend(name: Optional[str]) -> None:
    """Force an attention backend for subsequent calls (None = environment / default)."""
    global _backend
    if name is not None:
        name = name.strip().lower()
        if name not in ATTN_BACKENDS:
            raise ValueError(f"attention backend {name!r}: expected one of {ATTN_BACKENDS}")
    _backend = name


def get_attention_backend() -> str:
    if _backend is not None:
        return _backend
    env = os.environ.get(ENV_VAR, "").strip().lower()
    if env:
        if env not in ATTN_BACKENDS:
            raise ValueError(f"{ENV_VAR}={env!r}: expected one of {ATTN_BACKENDS}")
        return env
    return "sdpa"


@contextlib.contextmanager
def attention_backend(name: Optional[str]):
    """Temporarily select an attention backend (restores the previous setter value)."""
    global _backend
    prev = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        _backend = prev


def attention_math(q, k, v, *, causal: bool = False, scale: Optional[float] = None):
    """Exact eager attention: softmax(q kᵀ · scale [+ causal -inf]) v, as the official code
    (scale applied to the logits after the matmul, softmax in the input dtype)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = torch.matmul(q, k.transpose(-2, -1)) * scale  # [B,H,Lq,Lk]
    if causal:
        lq, lk = attn.shape[-2:]
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu_(1)
        attn = attn.masked_fill(mask, float("-inf"))
    attn = attn.softmax(dim=-1)
    return torch.matmul(attn, v)


def _check(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: expected q/k/v [B,H,L,D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:-1] != v.shape[:-1] or q.shape[:2] != k.shape[:2] \
            or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} (need equal B,H; q/k head dim; k/v length)")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: Optional[float] = None, backend: Optional[str] = None) -> torch.Tensor:
    """q [B,H,Lq,D], k/v [B,H,Lk,D] -> [B,H,Lq,D]."""
    _check(q, k, v)
    backend = backend or get_attention_backend()
    if backend == "math":
        return attention_math(q, k, v, causal=causal, scale=scale)
    if backend == "xformers":
        xops = _xformers_ops()
        if xops is None or not q.is_cuda:
            raise RuntimeError("attention backend 'xformers' needs xformers (with loadable CUDA "
                               "ops) and CUDA tensors; found "
                               f"xformers={'yes' if xops is not None else 'no'}, "
                               f"device={q.device.type}. Use 'sdpa' or 'math'")
        bias = xops.LowerTriangularMask() if causal else None
        # xformers layout is [B,L,H,D]: a transpose view, only the last stride must be 1
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), attn_bias=bias, scale=scale)
        return out.transpose(1, 2)  # [B,Lq,H,D] -> [B,H,Lq,D]
    if backend != "sdpa":
        raise ValueError(f"attention backend {backend!r}: expected one of {ATTN_BACKENDS}")
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


__all__ = ["ATTN_BACKENDS", "attention", "attention_math", "attention_backend",
           "available_attention_backends", "get_attention_backend", "set_attention_backend"]
