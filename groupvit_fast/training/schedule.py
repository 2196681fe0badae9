"""Per-step LR schedule of the official recipe: timm ``CosineLRScheduler`` with
``t_in_epochs=False``, ``cycle_limit=1`` and **no warmup prefix** (ref §7), re-implemented so timm
is not needed at run time.

    f(t) = warmup_lr + t·(base_lr − warmup_lr)/warmup_steps                 t < warmup_steps
    f(t) = min_lr + ½(base_lr − min_lr)(1 + cos(π t / total_steps))         warmup ≤ t < total
    f(t) = min_lr                                                           t ≥ total

The cosine is measured from step 0, so it steps down slightly from base_lr when warm-up ends.
The official loop calls ``step_update(global_step)`` *after* each optimizer step and timm sets
``warmup_lr`` at construction, so optimizer step s runs with f(max(s − 1, 0)):
``lr_for_step`` returns that."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    base_lr: float
    min_lr: float
    warmup_lr: float
    total_steps: int
    warmup_steps: int

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"CosineSchedule: total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"CosineSchedule: warmup_steps must be in [0, {self.total_steps}], "
                             f"got {self.warmup_steps}")

    def value(self, t: int) -> float:
        """timm's ``get_update_values(t)``."""
        if t < self.warmup_steps:
            return self.warmup_lr + t * (self.base_lr - self.warmup_lr) / self.warmup_steps
        if t >= self.total_steps:
            return self.min_lr
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (
            1 + math.cos(math.pi * t / self.total_steps))

    def lr_for_step(self, step: int) -> float:
        """LR that the official loop applies at optimizer step ``step`` (0-based)."""
        return self.value(max(step - 1, 0))


def build_schedule(train_cfg, steps_per_epoch: int, global_batch: int) -> CosineSchedule:
    from .batching import scale_lr
    ref = train_cfg.lr_reference_batch
    return CosineSchedule(
        base_lr=scale_lr(train_cfg.base_lr, global_batch, ref),
        min_lr=scale_lr(train_cfg.min_lr, global_batch, ref),
        warmup_lr=scale_lr(train_cfg.warmup_lr, global_batch, ref),
        total_steps=train_cfg.epochs * steps_per_epoch,
        warmup_steps=train_cfg.warmup_epochs * steps_per_epoch)


def assign_scale_factors(start, step: int, ramp_steps: int):
    """Per grouping stage, the multiple of the configured assignment scale at optimizer step
    ``step`` (0-based): ``start[i]`` at step 0, rising linearly to 1 at ``ramp_steps`` and 1
    after (``train.assign_ramp_*``). A function of the step alone, so a resumed run continues
    the ramp exactly. Empty ``start``: no ramp (all ones is the caller's default)."""
    if ramp_steps < 1:
        raise ValueError(f"assign_scale_factors: ramp_steps must be >= 1, got {ramp_steps}")
    a = min(max(step, 0) / ramp_steps, 1.0)
    return [float(s0) + (1.0 - float(s0)) * a for s0 in start]
