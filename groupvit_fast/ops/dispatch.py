"""The one place that chooses a backend for the grouping op.

Backends: ``triton`` (CUDA tensors with Triton; CPU tensors only under ``TRITON_INTERPRET=1``,
and only when forced), ``cuda`` (compiled extension built with CUDA, CUDA tensors), ``cpu``
(compiled C++/OpenMP extension, CPU tensors) and ``reference`` (plain torch).
``GROUPVIT_FAST_BACKEND=triton|cuda|cpu|reference`` forces one; a forced backend that cannot run
the call is an error, never a silent fallback.

Automatic choice (by measurement, see ``bench/grouping.py`` and ``bench/results/``):

* CUDA tensors: ``triton``, else ``cuda``, else ``reference``; the fused GPU kernels implement
  the released ``hard=True`` assignment only, so ``hard=False`` runs the reference.
* CPU tensors: ``cpu`` when the extension is built, except for calls that need gradients at
  small assignment sizes (S·N <= SMALL_GRAD_SN, the stage-2 shape S=8, N=64), which run the
  reference. Measured with ``bench/grouping.py --threads 1 --clock thread`` (fp32, CPU time,
  bench/results/grouping-cpu-fp32-pt2.14.1-1thread.csv, B=256): forward 2.93x (stage 1) and
  2.05x (stage 2) the reference, forward+backward 1.65x and 1.66x. The stage-2 exception
  predates the per-image fused kernel, which made the CPU kernel faster there too; routing
  those calls to it was tried and reverted because it moved a two-rank gradient comparison
  (tests/test_train_dist.py, soft assignment) just past its bound, and whether the bound or the
  kernel's soft path is at fault is not settled yet.

Seeds: with ``gumbel=True`` and ``seed=None`` a fresh seed is drawn from torch's global CPU
generator (``torch.randint``), so ``torch.manual_seed`` makes runs reproducible, and the seed of
every call is recorded (``last_call()``) so a micro batch can be replayed with ``seed=...``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import _custom
from .reference import gumbel_assign_merge_reference

BACKENDS = ("triton", "cuda", "cpu", "reference")
ENV_VAR = "GROUPVIT_FAST_BACKEND"
SEED_HIGH = 2**31 - 1  # seeds are non-negative int31 so they fit every backend's int argument

_LAST = {"backend": None, "seed": None}
# Below this many [S,N] logits per image a gradient-carrying CPU call runs the reference
# (measured tie, see the module docstring); forward-only calls always use the extension.
SMALL_GRAD_SN = 1024


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        from groupvit_fast.kernels import grouping_triton  # noqa: F401
        return True
    except Exception:  # pragma: no cover - depends on the install
        return False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: Optional[torch.device] = None):
    """Backends that can run tensors on ``device`` here (default: CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    out = []
    nat = _custom.native()
    if dev.type == "cuda":
        if _triton_importable() and not _interpreting():
            out.append("triton")
        if nat is not None and nat.has_cuda():
            out.append("cuda")
    elif dev.type == "cpu":
        if _interpreting() and _triton_importable():
            out.append("triton")
        if nat is not None:
            out.append("cpu")
    out.append("reference")
    return out


def _unsupported_reason(backend: str, q: torch.Tensor, hard: bool) -> Optional[str]:
    if backend in ("triton", "cuda") and not hard:
        return f"backend {backend!r} implements hard=True only (hard=False runs the reference)"
    return None


def get_backend(q: torch.Tensor, *, hard: bool = True, num_tokens: Optional[int] = None,
                needs_grad: bool = False) -> str:
    """The backend a call with ``q`` [B,S,C] and ``num_tokens`` N would use (honours
    ``GROUPVIT_FAST_BACKEND``); ``needs_grad``: whether autograd will run its backward."""
    avail = available_backends(q.device)
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={forced!r}: expected one of {BACKENDS}")
        if forced not in avail:
            raise RuntimeError(f"{ENV_VAR}={forced!r} is not available for {q.device.type} "
                               f"tensors here (available: {avail})")
        why = _unsupported_reason(forced, q, hard)
        if why:
            raise NotImplementedError(f"{ENV_VAR}={forced!r}: {why}")
        return forced
    for name in avail:
        if name == "triton" and q.device.type != "cuda":
            continue  # the interpreter is a test vehicle, never an automatic choice
        if (name == "cpu" and needs_grad and num_tokens is not None
                and q.shape[1] * num_tokens <= SMALL_GRAD_SN
                and not torch.compiler.is_compiling()):
            # measured: no faster than the reference here (module docstring). Under
            # torch.compile the custom op stays: the reference's seeded generator would need
            # the seed as a Python int, i.e. a graph break.
            continue
        if _unsupported_reason(name, q, hard) is None:
            return name
    return "reference"


def last_call() -> dict:
    """``{"backend": name, "seed": int or None}`` of the most recent eager call."""
    out = dict(_LAST)
    if isinstance(out["seed"], torch.Tensor):
        out["seed"] = int(out["seed"].reshape(-1)[0])
    return out


def last_backend() -> Optional[str]:
    return _LAST["backend"]


def _check(q, k, v, tau):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"gumbel_assign_merge: expected q [B,S,C], k [B,N,C], v [B,N,C]; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if (q.shape[0] != k.shape[0] or k.shape[0] != v.shape[0] or q.shape[2] != k.shape[2]
            or k.shape[1] != v.shape[1]):
        raise ValueError(f"gumbel_assign_merge: shape mismatch: q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)} (expected q [B,S,C], "
                         f"k and v [B,N,C] with the same B and C)")
    if q.shape[1] == 0:
        raise ValueError(f"gumbel_assign_merge: q {tuple(q.shape)} has no groups (S = 0); "
                         f"the assignment needs at least one group")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"gumbel_assign_merge: q, k, v dtypes differ: {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if not tau > 0:
        raise ValueError(f"gumbel_assign_merge: tau must be > 0, got {tau}")


def gumbel_assign_merge(q, k, v, *, scale, gumbel, tau=1.0, eps=1.0, seed=None, hard=True,
                        return_attn=False):
    """Grouping assignment + merge (semantics: ``reference.gumbel_assign_merge_reference``).

    q [B,S,C] group queries, k/v [B,N,C] tokens. Returns ``out`` [B,S,C] or, with
    ``return_attn``, ``(out, hard [B,S,N], soft [B,S,N])``. ``seed`` (int or int64 tensor)
    keys the Gumbel noise; ``None`` draws one from the global CPU generator.
    """
    _check(q, k, v, tau)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                              or v.requires_grad)
    backend = get_backend(q, hard=hard, num_tokens=k.shape[1], needs_grad=needs_grad)
    compiling = torch.compiler.is_compiling()
    if gumbel:
        if seed is None:
            seed_t = torch.randint(0, SEED_HIGH, (1,), dtype=torch.int64)
        elif isinstance(seed, torch.Tensor):
            seed_t = seed.reshape(1).to(device="cpu", dtype=torch.int64)
        else:
            seed_t = torch.tensor([int(seed)], dtype=torch.int64)
    else:
        seed_t = torch.zeros(1, dtype=torch.int64)  # unused: no noise, no RNG consumed
    if not compiling:
        _LAST["backend"] = backend
        _LAST["seed"] = seed_t if gumbel else None
    if backend == "reference":
        ref_seed = int(seed_t[0]) if gumbel else None
        return gumbel_assign_merge_reference(q, k, v, scale=scale, gumbel=gumbel, tau=tau,
                                             eps=eps, seed=ref_seed, hard=hard,
                                             return_attn=return_attn)
    out, _idx, _cnt, hard_map, soft_map = _custom.assign_merge_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), seed_t, float(scale), bool(gumbel),
        float(tau), float(eps), bool(hard), bool(return_attn), backend)
    if return_attn:
        return out, hard_map, soft_map
    return out
