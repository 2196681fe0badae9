"""Image transforms shared by both loaders (the torch side of the augmentation).

Random erasing runs on the finished, normalised batch on its device for *both* loaders (DALI's
``fn.erase`` only fills constants, timm's 'pixel' mode fills with N(0, 1) noise), so the two
loaders apply exactly the same erasing code.  The PIL transform is the fallback loader's copy of
the DALI graph: RandomResizedCrop (bilinear) -> flip -> RandAugment(2, 9/10) -> normalise.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import DataConfig


def random_erasing_(x: torch.Tensor, p: float, generator: Optional[torch.Generator] = None,
                    scale=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3)),
                    attempts: int = 10) -> torch.Tensor:
    """timm RandomErasing(mode='pixel', count=1) on a normalised batch ``[B, C, H, W]`` in place.

    The rectangle geometry is drawn on the CPU generator (cheap scalars); the noise is drawn on the
    batch's device.
    """
    if p <= 0:
        return x
    b, c, h, w = x.shape
    area = h * w
    g = generator
    coins = torch.rand(b, generator=g)
    for i in range(b):
        if coins[i].item() >= p:
            continue
        for _ in range(attempts):
            u = torch.rand(4, generator=g)
            target = (scale[0] + (scale[1] - scale[0]) * u[0].item()) * area
            aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1].item())
            eh = int(round(math.sqrt(target * aspect)))
            ew = int(round(math.sqrt(target / aspect)))
            if 0 < eh < h and 0 < ew < w:
                top = int(u[2].item() * (h - eh + 1)) % (h - eh + 1)
                left = int(u[3].item() * (w - ew + 1)) % (w - ew + 1)
                noise = torch.randn((c, eh, ew), generator=g).to(x.device, x.dtype)
                x[i, :, top:top + eh, left:left + ew] = noise
                break
    return x


def pil_train_transform(cfg: DataConfig):
    """torchvision/PIL training transform (fallback loader): RRC, flip, RandAugment, normalise."""
    from torchvision import transforms as T
    def rrc(scale):
        return T.RandomResizedCrop(cfg.image_size, scale=scale, ratio=cfg.crop_ratio,
                                   interpolation=T.InterpolationMode.BILINEAR)
    crop = rrc(cfg.crop_scale)
    if cfg.zoom_p > 0:
        crop = T.RandomChoice([crop, rrc(cfg.zoom_crop_scale)], p=[1 - cfg.zoom_p, cfg.zoom_p])
    ops = [crop, T.RandomHorizontalFlip(cfg.hflip)]
    if cfg.randaugment:
        # torchvision's magnitude is on 0..num_magnitude_bins-1; 11 bins makes m9 = 9/10 like timm
        ops.append(T.RandAugment(num_ops=cfg.randaugment_n, magnitude=cfg.randaugment_m,
                                 num_magnitude_bins=11,
                                 interpolation=(T.InterpolationMode.NEAREST
                                                if cfg.randaugment_interp == "nearest"
                                                else T.InterpolationMode.BILINEAR),
                                 fill=[int(255 * m) for m in cfg.mean]))
    ops += [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    return T.Compose(ops)


def pil_eval_transform(cfg: DataConfig):
    from torchvision import transforms as T
    return T.Compose([T.Resize(int(round(cfg.image_size * cfg.eval_resize_ratio)),
                               interpolation=T.InterpolationMode.BILINEAR),
                      T.CenterCrop(cfg.image_size), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
