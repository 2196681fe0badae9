"""mIoU exactly as mmseg 0.18 computes it (ref §5.4): per-image intersect/union histograms
accumulated over the dataset, IoU_c = sum I / sum U, mIoU = nanmean over classes (background
included), ignore index 255, no zero-label reduction.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """``values`` (float64, any shape) summed over torch.distributed ranks; itself when not
    initialised or on one rank. Counts of pixels stay exact in float64 up to 2**53."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    dev = (torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl'
           else torch.device('cpu'))
    buf = values.to(dev).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.cpu()


def intersect_and_union(pred, label, num_classes: int, ignore_index: int = 255):
    """Per-class (intersect, union, area_pred, area_label) of one image as float64 [C] tensors.

    Like mmseg, pixels whose label is ignore_index are dropped, and labels/predictions outside
    [0, C) do not enter any histogram bin (torch.histc drops out-of-range values).
    """
    pred = torch.as_tensor(np.asarray(pred)).long().reshape(-1)
    label = torch.as_tensor(np.asarray(label)).long().reshape(-1)
    if pred.numel() != label.numel():
        raise ValueError(f'prediction has {pred.numel()} pixels but the label map has '
                         f'{label.numel()}')
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    inter = pred[pred == label]

    def hist(x):
        x = x[(x >= 0) & (x < num_classes)]
        return torch.bincount(x, minlength=num_classes).double()

    a_i, a_p, a_l = hist(inter), hist(pred), hist(label)
    return a_i, a_p + a_l - a_i, a_p, a_l


class IoUAccumulator:
    """Sums intersect/union/pred/label areas per class; all_reduce() merges ranks."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes <= 0:
            raise ValueError(f'num_classes must be positive, got {num_classes}')
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.area = torch.zeros(4, num_classes, dtype=torch.float64)  # inter, union, pred, label
        self.num_images = 0

    def update(self, pred, label) -> None:
        i, u, p, l_ = intersect_and_union(pred, label, self.num_classes, self.ignore_index)
        self.area += torch.stack([i, u, p, l_])
        self.num_images += 1

    def all_reduce(self) -> None:
        """Sum the areas (and image counts) over torch.distributed ranks, if initialised."""
        buf = all_reduce_sum(torch.cat([self.area.reshape(-1),
                                        torch.tensor([float(self.num_images)],
                                                     dtype=torch.float64)]))
        self.area = buf[:-1].reshape(4, self.num_classes).clone()
        self.num_images = int(round(buf[-1].item()))

    def iou(self) -> np.ndarray:
        """Per-class IoU in [0,1]; NaN for classes absent from both predictions and labels."""
        inter, union = self.area[0].numpy(), self.area[1].numpy()
        with np.errstate(divide='ignore', invalid='ignore'):
            return inter / union

    def acc(self) -> np.ndarray:
        inter, lab = self.area[0].numpy(), self.area[3].numpy()
        with np.errstate(divide='ignore', invalid='ignore'):
            return inter / lab

    def summary(self, class_names: Optional[Sequence[str]] = None) -> Dict:
        """JSON-friendly report, values x100 as mmseg prints them (NaN -> None)."""
        iou, acc = self.iou(), self.acc()
        names = list(class_names) if class_names is not None else [str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f'{len(names)} class names for {self.num_classes} classes')

        def f(x):
            return None if np.isnan(x) else float(x * 100)
        valid = ~np.isnan(iou)
        total_label = float(self.area[3].sum())
        return {
            'mIoU': float(np.nanmean(iou) * 100) if valid.any() else None,
            'mAcc': float(np.nanmean(acc) * 100) if (~np.isnan(acc)).any() else None,
            'aAcc': float(self.area[0].sum() / total_label * 100) if total_label > 0 else None,
            'per_class': {n: {'IoU': f(iou[c]), 'Acc': f(acc[c])} for c, n in enumerate(names)},
            'num_images': self.num_images,
        }


def format_table(summary: Dict, title: str = '') -> str:
    """Plain-text per-class table plus the mIoU line."""
    rows: List[str] = []
    if title:
        rows.append(title)
    names = list(summary['per_class'])
    width = max([len(n) for n in names] + [5])
    rows.append(f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}")
    for n in names:
        v = summary['per_class'][n]
        iou = '   nan' if v['IoU'] is None else f"{v['IoU']:6.2f}"
        acc = '   nan' if v['Acc'] is None else f"{v['Acc']:6.2f}"
        rows.append(f'{n:<{width}}  {iou}  {acc}')
    m = summary['mIoU']
    rows.append(f"mIoU {'nan' if m is None else f'{m:.2f}'}  ({summary['num_images']} images)")
    return '\n'.join(rows)
