"""Cross-rank BatchNorm for the projection heads that works on every backend (gloo included,
where torch.nn.SyncBatchNorm is CUDA-only).

Each rank computes per-channel [count, Σx, Σx²], the three are all-gathered *with autograd*
(groupvit_fast.distributed.gather_with_grad) and summed, so the normalisation uses the
global-batch mean and biased variance and the backward pass carries the gradient through the
statistics of every rank: 2 ranks × batch b give the loss and gradients of 1 rank × batch 2b.
Running statistics are updated with the unbiased global variance, like nn.BatchNorm1d.

Numerics: statistics are accumulated in fp32 around a per-rank shift (the local channel mean,
detached) so Σx² − (Σx)²/n does not cancel catastrophically for large activations."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import gather_with_grad, get_world_size


class DistBatchNorm1d(nn.BatchNorm1d):
    """Drop-in ``nn.BatchNorm1d`` ([N,C] or [N,C,L]) with global-batch statistics in training
    when torch.distributed is initialised with more than one rank. Same parameters, buffers and
    state_dict keys as BatchNorm1d."""

    def _local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Plain BatchNorm1d, also when input, affine parameters and running statistics have
        different dtypes (DeepSpeed bf16/fp16 engines; the CPU kernel needs them equal):
        computed in fp32, running statistics updated in their own dtype."""
        rm, rv = self.running_mean, self.running_var
        dts = {x.dtype} | ({self.weight.dtype} if self.affine else set()) | \
            ({rm.dtype} if rm is not None else set())
        if len(dts) == 1:
            return super().forward(x)
        mom = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            mom = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or rm is None
        track = rm is not None and (not self.training or self.track_running_stats)
        rmf = rm.float() if track else None
        rvf = rv.float() if track else None
        y = F.batch_norm(x.float(), rmf, rvf, self.weight.float() if self.affine else None,
                         self.bias.float() if self.affine else None, use_batch, mom, self.eps)
        if track and self.training and rmf is not rm:  # (autograd saved rm when it is rmf)
            with torch.no_grad():
                rm.copy_(rmf)
                rv.copy_(rvf)
        return y.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or get_world_size() == 1:
            return self._local_forward(x)
        if x.ndim not in (2, 3):
            raise ValueError(f"DistBatchNorm1d: expected [N,C] or [N,C,L], got {tuple(x.shape)}")
        C = x.shape[1]
        xf = x.float()
        dims = [0] if x.ndim == 2 else [0, 2]
        shape = (1, C, 1) if x.ndim == 3 else (1, C)
        n_local = x.numel() // C
        # any constant shift is exact; the local mean keeps the sums well conditioned
        shift = xf.detach().mean(dim=dims) if n_local > 0 else xf.new_zeros(C)  # [C]
        xc = xf - shift.reshape(shape)
        cnt = torch.full((C,), float(n_local), dtype=torch.float32, device=x.device)
        stats = torch.stack([cnt, shift, xc.sum(dim=dims), (xc * xc).sum(dim=dims)])  # [4,C]
        g = gather_with_grad(stats[None].contiguous())  # [W,4,C]
        n, shifts, s1, s2 = g[:, 0], g[:, 1], g[:, 2], g[:, 3]  # each [W,C]
        tot_n = n.sum(0)  # [C]
        if bool((tot_n <= 1).any()):
            raise ValueError(f"DistBatchNorm1d: need more than 1 value per channel across all "
                             f"ranks in training, got local input {tuple(x.shape)}")
        mean = (n * shifts + s1).sum(0) / tot_n  # [C]
        d = mean[None] - shifts  # [W,C]
        # Σ_r Σ (x − mean)² with (x − mean) = (x − shift_r) − d_r
        m2 = (s2 - 2 * d * s1 + n * d * d).sum(0)  # [C]
        var = m2 / tot_n  # biased: what normalises, as in nn.BatchNorm1d
        if self.training and self.track_running_stats:
            with torch.no_grad():
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                if self.momentum is None:
                    mom = 1.0 / float(self.num_batches_tracked)
                else:
                    mom = self.momentum
                unbiased = m2 / (tot_n - 1)
                self.running_mean.mul_(1 - mom).add_(mean.detach().to(self.running_mean.dtype),
                                                     alpha=mom)
                self.running_var.mul_(1 - mom).add_(unbiased.detach().to(self.running_var.dtype),
                                                    alpha=mom)
        inv = torch.rsqrt(var + self.eps)
        y = (xf - mean.reshape(shape)) * inv.reshape(shape)
        if self.affine:
            y = y * self.weight.float().reshape(shape) + self.bias.float().reshape(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` in ``module`` by ``DistBatchNorm1d`` (in place for
    children; returns the possibly new root). Parameters and buffers are moved over, not
    copied, so state_dict keys, values and optimizer references are unchanged."""
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, DistBatchNorm1d):
        new = DistBatchNorm1d(module.num_features, eps=module.eps, momentum=module.momentum,
                              affine=module.affine,
                              track_running_stats=module.track_running_stats,
                              device=None, dtype=None)
        if module.affine:
            new.weight = module.weight
            new.bias = module.bias
        if module.track_running_stats:
            new.running_mean = module.running_mean
            new.running_var = module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module
