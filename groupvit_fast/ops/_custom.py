"""``torch.library`` registration of the fused grouping op.

Two custom ops, so ``torch.compile`` traces through the op (fake implementations give the
shapes) and autograd calls our own backward:

* ``groupvit_fast::assign_merge_fwd(q, k, v, seed, ...) -> (out, idx, cnt, hard_map, soft_map)``
* ``groupvit_fast::assign_merge_bwd(dout, q, k, v, idx, cnt, seed, ...) -> (dq, dk, dv)``

What autograd saves between them (the "bytes saved for backward"): the inputs q, k, v (no
copies), ``idx`` int32 [B,N] (argmax group of each token), ``cnt`` fp32 [B,S] (member count of
each group; soft row sums when ``hard=False``) and the 1-element int64 seed tensor. Nothing
[B,S,N]-sized: backward recomputes the logits with one matmul and regenerates the Gumbel noise
from the seed (counter-based Philox: the same uniform stream in the CPU, CUDA and Triton
kernels; their log implementations differ in the last bits, so noise agrees to ~1e-6).

``seed`` is a CPU int64 tensor of one element rather than a Python int so that drawing a fresh
seed from the global generator (``torch.randint``) stays inside a compiled graph.
``backend`` is the name dispatch chose (``cpu``, ``cuda`` or ``triton``).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

_NATIVE = None


def native():
    """The compiled extension ``groupvit_fast._C`` or None when it was not built."""
    global _NATIVE
    if _NATIVE is None:
        try:
            from groupvit_fast import _C  # noqa: F401
            _NATIVE = _C
        except ImportError:
            _NATIVE = False
    return _NATIVE or None


def _triton_module():
    from groupvit_fast.kernels import grouping_triton
    return grouping_triton


def _seed_int(seed: Tensor) -> int:
    return int(seed.reshape(-1)[0].item())


@torch.library.custom_op("groupvit_fast::assign_merge_fwd", mutates_args=())
def assign_merge_fwd(q: Tensor, k: Tensor, v: Tensor, seed: Tensor, scale: float, gumbel: bool,
                     tau: float, eps: float, hard: bool, return_attn: bool,
                     backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    s = _seed_int(seed)
    if backend == "cpu":
        out = native().cpu_forward(q, k, v, scale, gumbel, tau, eps, s, hard, return_attn)
    elif backend == "cuda":
        out = native().cuda_forward(q, k, v, scale, gumbel, tau, eps, s, return_attn)
    elif backend == "triton":
        out = _triton_module().forward(q, k, v, scale=scale, gumbel=gumbel, tau=tau, eps=eps,
                                       seed=s, return_attn=return_attn)
    else:
        raise ValueError(f"groupvit_fast::assign_merge_fwd: unknown backend {backend!r}")
    return tuple(out)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@assign_merge_fwd.register_fake
def _(q, k, v, seed, scale, gumbel, tau, eps, hard, return_attn, backend):
    B, S, C = q.shape
    N = k.shape[1]
    out = q.new_empty((B, S, C))
    idx = q.new_empty((B, N), dtype=torch.int32)
    cnt = q.new_empty((B, S), dtype=_acc_dtype(q.dtype))
    if return_attn:
        maps = (q.new_empty((B, S, N)), q.new_empty((B, S, N)))
    else:
        maps = (q.new_empty((0,)), q.new_empty((0,)))
    return out, idx, cnt, maps[0], maps[1]


@torch.library.custom_op("groupvit_fast::assign_merge_bwd", mutates_args=())
def assign_merge_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, idx: Tensor, cnt: Tensor,
                     seed: Tensor, scale: float, gumbel: bool, tau: float, eps: float, hard: bool,
                     backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    s = _seed_int(seed)
    if backend == "cpu":
        grads = native().cpu_backward(dout, q, k, v, idx, cnt, scale, gumbel, tau, eps, s, hard)
    elif backend == "cuda":
        grads = native().cuda_backward(dout, q, k, v, idx, cnt, scale, gumbel, tau, eps, s)
    elif backend == "triton":
        grads = _triton_module().backward(dout, q, k, v, idx, cnt, scale=scale, gumbel=gumbel,
                                          tau=tau, eps=eps, seed=s)
    else:
        raise ValueError(f"groupvit_fast::assign_merge_bwd: unknown backend {backend!r}")
    return tuple(grads)


@assign_merge_bwd.register_fake
def _(dout, q, k, v, idx, cnt, seed, scale, gumbel, tau, eps, hard, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, seed, scale, gumbel, tau, eps, hard, return_attn, backend = inputs
    _, idx, cnt, hard_map, soft_map = output
    ctx.save_for_backward(q, k, v, idx, cnt, seed)
    ctx.args = (scale, gumbel, tau, eps, hard, backend)
    ctx.mark_non_differentiable(idx, cnt, hard_map, soft_map)


def _backward(ctx, dout, _didx, _dcnt, _dhard, _dsoft):
    q, k, v, idx, cnt, seed = ctx.saved_tensors
    scale, gumbel, tau, eps, hard, backend = ctx.args
    if dout is None:
        dout = torch.zeros_like(q)
    # A backward run inside an autocast region hands us the gradient in the autocast dtype and
    # would let autocast recast the kernels' internal matmuls; the backward runs in the dtype the
    # forward ran in.
    dout = dout.to(q.dtype)
    with torch.autocast(q.device.type, enabled=False):
        dq, dk, dv = assign_merge_bwd(dout.contiguous(), q, k, v, idx, cnt, seed, scale, gumbel,
                                      tau, eps, hard, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None


assign_merge_fwd.register_autograd(_backward, setup_context=_setup_context)
