"""Batch arithmetic: global batch = micro batch per rank × gradient accumulation × world size,
and the official linear LR scaling (ref §7)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional


class BatchConfigError(ValueError):
    """The requested global batch cannot be split over this world size."""


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    micro_batch: int  # per rank, per forward/backward
    grad_accum: int
    world_size: int

    @property
    def per_rank_batch(self) -> int:
        """Samples one rank contributes to one optimizer step."""
        return self.micro_batch * self.grad_accum

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = micro {self.micro_batch} × accumulation "
                f"{self.grad_accum} × world {self.world_size}")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def plan_batch(global_batch: int, world_size: int, micro_batch: Optional[int] = None,
               grad_accum: Optional[int] = None) -> BatchPlan:
    """Split ``global_batch`` over ``world_size`` ranks.

    - micro and accumulation given: they must multiply out exactly;
    - only micro: accumulation = global / (micro × world);
    - only accumulation: micro = global / (accumulation × world);
    - neither: accumulation 1, micro = global / world.
    Any split that does not divide exactly raises BatchConfigError naming the numbers and the
    values that would work."""
    for name, v in (("global batch", global_batch), ("world size", world_size),
                    ("micro batch", micro_batch), ("gradient accumulation", grad_accum)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise BatchConfigError(f"{name} must be a positive integer, got {v!r}")
    if global_batch % world_size:
        ok = [w for w in _divisors(global_batch) if w <= 4 * world_size]
        raise BatchConfigError(
            f"global batch {global_batch} (train.batch_size) is not divisible by the world size "
            f"{world_size}: every rank must see the same number of samples. Use a world size "
            f"that divides it (e.g. {ok[-6:]}) or change train.batch_size.")
    per_rank = global_batch // world_size
    if micro_batch is not None and grad_accum is not None:
        if micro_batch * grad_accum * world_size != global_batch:
            raise BatchConfigError(
                f"micro batch {micro_batch} × accumulation {grad_accum} × world {world_size} = "
                f"{micro_batch * grad_accum * world_size}, but train.batch_size is {global_batch}; "
                f"set only one of train.micro_batch_size / train.grad_accum_steps and let the "
                f"other be derived")
        return BatchPlan(global_batch, micro_batch, grad_accum, world_size)
    if micro_batch is not None:
        if per_rank % micro_batch:
            ok = [d for d in _divisors(per_rank) if d <= max(micro_batch, 1) * 2]
            raise BatchConfigError(
                f"global batch {global_batch} is not divisible by micro batch {micro_batch} × "
                f"world size {world_size} = {micro_batch * world_size}: each of the "
                f"{world_size} ranks gets {per_rank} samples per step, which {micro_batch} does "
                f"not divide. Micro batches that work here: {ok[-8:]} "
                f"(train.micro_batch_size), or change train.batch_size.")
        return BatchPlan(global_batch, micro_batch, per_rank // micro_batch, world_size)
    if grad_accum is not None:
        if per_rank % grad_accum:
            raise BatchConfigError(
                f"global batch {global_batch} is not divisible by accumulation {grad_accum} × "
                f"world size {world_size}; accumulation steps that work: "
                f"{_divisors(per_rank)[:12]}")
        return BatchPlan(global_batch, per_rank // grad_accum, grad_accum, world_size)
    return BatchPlan(global_batch, per_rank, 1, world_size)


def scale_lr(lr: float, global_batch: int, reference_batch: int = 4096) -> float:
    """Official linear scaling: lr × (batch_per_gpu × world × accumulation) / 4096."""
    return lr * global_batch / reference_batch
