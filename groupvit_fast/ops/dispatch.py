"""The one place that chooses a backend for the grouping op.

Backends: ``triton`` (CUDA tensors, Triton installed), ``cuda`` (compiled extension, CUDA
tensors), ``cpu`` (compiled C++/OpenMP extension, CPU tensors) and ``reference`` (plain torch).
``GROUPVIT_FAST_BACKEND=triton|cuda|cpu|reference`` forces one; a forced backend that cannot run
is an error, never a silent fallback.

(The fused backends are plugged in by the kernel work; until then everything runs the reference.)
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .reference import gumbel_assign_merge_reference

BACKENDS = ("triton", "cuda", "cpu", "reference")


def available_backends(device: Optional[torch.device] = None):
    return ["reference"]


def get_backend(q: torch.Tensor) -> str:
    forced = os.environ.get("GROUPVIT_FAST_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"GROUPVIT_FAST_BACKEND={forced!r}: expected one of {BACKENDS}")
        if forced not in available_backends(q.device):
            raise RuntimeError(f"GROUPVIT_FAST_BACKEND={forced!r} is not available for "
                               f"{q.device.type} tensors here")
        return forced
    return "reference"


def gumbel_assign_merge(q, k, v, *, scale, gumbel, tau=1.0, eps=1.0, seed=None, hard=True,
                        return_attn=False):
    """Grouping assignment + merge; see ``reference.gumbel_assign_merge_reference``."""
    return gumbel_assign_merge_reference(q, k, v, scale=scale, gumbel=gumbel, tau=tau, eps=eps,
                                         seed=seed, hard=hard, return_attn=return_attn)
