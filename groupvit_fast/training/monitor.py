"""Rank-0 monitoring: progress bar (tqdm) with ETA, loss, LR and images/s; TensorBoard scalars;
peak memory per rank."""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from typing import Dict, Optional

import torch


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; training stopped and the last good checkpoint was kept."""


def peak_memory_mib(device: torch.device) -> float:
    """Peak accelerator memory on GPU, else peak resident set size of this process (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Monitor:
    def __init__(self, *, enabled: bool, total_steps: int, start_step: int, progress: bool,
                 tensorboard_dir: Optional[str], log_every: int = 1,
                 metrics_path: Optional[str] = None):
        self.enabled = enabled
        self.metrics_path = metrics_path
        self.log_every = max(1, log_every)
        self.bar = None
        self.writer = None
        if not enabled:
            return
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True, file=sys.stdout, mininterval=0.5,
                            smoothing=0.1, desc="train")
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                os.makedirs(tensorboard_dir, exist_ok=True)
                self.writer = SummaryWriter(tensorboard_dir)
            except ImportError as e:  # tensorboard is in the 'train' extra
                print(f"[train] TensorBoard disabled: {e}", flush=True)

    def step(self, step: int, scalars: Dict[str, float]):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{scalars['loss/total']:.4f}", lr=f"{scalars['lr']:.3g}",
                                 img_s=f"{scalars['images_per_s']:.1f}", refresh=False)
            self.bar.update(1)
        elif step % self.log_every == 0:
            print(f"[train] step {step} loss {scalars['loss/total']:.4f} lr {scalars['lr']:.3g} "
                  f"{scalars['images_per_s']:.1f} img/s", flush=True)
        if self.metrics_path:
            # one JSON line per step (appended across resumes): the machine-readable log
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
        if self.writer is not None and step % self.log_every == 0:
            for k, v in scalars.items():
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(k, v, step)

    def scalar(self, key: str, value: float, step: int):
        if self.enabled and self.writer is not None:
            self.writer.add_scalar(key, value, step)

    def write(self, msg: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
