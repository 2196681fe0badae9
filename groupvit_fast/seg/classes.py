"""Class-name tables, prompt templates, background thresholds and palettes of the official
zero-shot segmentation protocol (ref §5.2-§5.3).

Label index i of a dataset corresponds to name i; 'background' first means the background
channel comes from the threshold rule, never from a text prompt.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np

# Renamed from mmseg's diningtable / pottedplant / tvmonitor, as in the official eval.
VOC_CLASSES: Tuple[str, ...] = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
    'cow', 'table', 'dog', 'horse', 'motorbike', 'person', 'plant', 'sheep', 'sofa', 'train',
    'monitor')

# mmseg 0.18 PascalContext 60-class label order (alphabetical), official renames.
CONTEXT_CLASSES: Tuple[str, ...] = (
    'background', 'airplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat',
    'book', 'bottle', 'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth',
    'computer', 'cow', 'cup', 'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food',
    'grass', 'ground', 'horse', 'keyboard', 'light', 'motorbike', 'mountain', 'mouse', 'person',
    'plate', 'platform', 'plant', 'road', 'rock', 'sheep', 'shelves', 'sidewalk', 'sign', 'sky',
    'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck', 'monitor', 'wall', 'water',
    'window', 'wood')

COCO_OBJECT_CLASSES: Tuple[str, ...] = (
    'background', 'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck',
    'boat', 'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat',
    'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack',
    'umbrella', 'handbag', 'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball',
    'kite', 'baseball bat', 'baseball glove', 'skateboard', 'surfboard', 'tennis racket',
    'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon', 'bowl', 'banana', 'apple',
    'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake', 'chair',
    'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse', 'remote',
    'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book',
    'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')

# Official code values (not the paper's; ref §5.2, issue #56).
BG_THRESH: Dict[str, float] = {'voc': 0.95, 'context': 0.35, 'coco_object': 0.95}

DATASET_CLASSES: Dict[str, Tuple[str, ...]] = {
    'voc': VOC_CLASSES,
    'context': CONTEXT_CLASSES,
    'coco_object': COCO_OBJECT_CLASSES,
}

TEMPLATES: Dict[str, Tuple[str, ...]] = {
    # Segmentation eval uses the single 'simple' template (evaluate.seg.template: simple).
    'simple': ('a photo of a {}.',),
    # ImageNet zero-shot subset (ref §5.3).
    'subset': ('itap of a {}.', 'a bad photo of a {}.', 'a origami {}.',
               'a photo of the large {}.', 'a {} in a video game.', 'art of the {}.',
               'a photo of the small {}.'),
}


def resolve_templates(templates) -> Tuple[str, ...]:
    """A template-set name ('simple', 'subset') or an explicit sequence of '{}' strings."""
    if isinstance(templates, str):
        if templates in TEMPLATES:
            return TEMPLATES[templates]
        if '{}' in templates:
            return (templates,)
        raise ValueError(f"unknown template set {templates!r}; expected one of "
                         f"{sorted(TEMPLATES)} or a string containing '{{}}'")
    out = tuple(templates)
    if not out:
        raise ValueError('templates: expected at least one template, got an empty sequence')
    for t in out:
        if not isinstance(t, str) or '{}' not in t:
            raise ValueError(f"template {t!r} must be a string containing '{{}}'")
    return out


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: bits of the label spread over the high bits of R, G, B.
    Index 0 is black, which suits a background class. Returns uint8 [n, 3]."""
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c = i
        r = g = b = 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def group_palette(n: int, seed: int = 0) -> np.ndarray:
    """Distinct, saturated colours for group maps (uint8 [n, 3]); golden-ratio hue steps keep
    neighbouring group indices far apart in hue, the seeded jitter varies value/saturation."""
    import colorsys
    rng = np.random.RandomState(seed)
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        h = (i * 0.618033988749895) % 1.0
        s = 0.55 + 0.45 * rng.rand()
        v = 0.65 + 0.35 * rng.rand()
        out[i] = [int(round(255 * x)) for x in colorsys.hsv_to_rgb(h, s, v)]
    return out


def split_background(class_names: Sequence[str]) -> Tuple[bool, List[str]]:
    """(with_bg, foreground names): 'background' first means it is not prompted (ref §5.2)."""
    names = list(class_names)
    if names and names[0] == 'background':
        return True, names[1:]
    return False, names
