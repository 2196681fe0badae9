"""Official AdamW parameter groups (ref §7): no weight decay for 1-D parameters and names ending
in ``.bias``; decay for everything else — including the 0-dim ``logit_scale`` /
``multi_label_logit_scale``, ``pos_embed``, group tokens and the token/positional embeddings."""
from __future__ import annotations

from typing import List, Tuple

import torch.nn as nn


def is_no_decay(name: str, param) -> bool:
    return param.ndim == 1 or name.endswith(".bias")


def split_decay(model: nn.Module) -> Tuple[List[str], List[str]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if is_no_decay(name, p) else decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Two AdamW groups in the official order: [decay, no_decay]."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if is_no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
