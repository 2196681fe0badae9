"""Process-group helpers. Everything degrades to single-process behaviour when torch.distributed
is not initialised, so the model and its losses run unchanged in tests, notebooks and eval."""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def shutdown() -> None:
    """Destroy the process group while the interpreter is whole (pytorch/pytorch#190489): left
    to interpreter finalization, gloo's worker threads can be destroyed still joinable and a
    rank that finished its work dies with "terminate called without an active exception".
    Call it only where every rank arrives together (a normal end): after an error on one rank
    the others may still be inside a collective, and destroying would deadlock
    (pytorch/torchtitan#1342)."""
    if is_dist():
        dist.destroy_process_group()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 *with* gradient: the backward reduce-scatters (sums) every rank's
    gradient of its copy back to the owner, so a local loss over gathered negatives has the
    gradient of the global-batch loss (the official diffdist semantics)."""
    if get_world_size() == 1:
        return x
    try:
        from torch.distributed._functional_collectives import all_gather_tensor_autograd
        return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)
    except ImportError:  # older torch
        from torch.distributed.nn.functional import all_gather
        return torch.cat(all_gather(x.contiguous()), dim=0)
