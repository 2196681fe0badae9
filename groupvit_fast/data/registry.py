"""Registry of the data sets the segmentation evaluator knows about besides the folder readers.

``DATASETS['synthetic']`` describes the embedded synthetic data set like VOC: class names with
'background' at index 0, background handled by the evaluator's threshold rule (no text prompt for
it), and ``build(root=None, split='val', **kw)`` returning the held-out (image, mask) pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    class_names: Tuple[str, ...]
    #: background threshold of the evaluator (VOC uses 0.95); index 0 is background
    bg_thresh: Optional[float]
    background_index: int
    build: Callable
    description: str = ""


def _build_synthetic(root=None, split: str = "val", cfg=None, limit=None, bg_thresh=0.95, **kw):
    """Held-out split of the synthetic data set; ``root`` is the cache dir (None: the default)."""
    from .synthetic import SyntheticConfig, SyntheticSegDataset
    if cfg is None:
        cfg = SyntheticConfig(**kw)
    elif isinstance(cfg, dict):
        cfg = SyntheticConfig(**cfg)
    return SyntheticSegDataset(cfg, split=split, cache_dir=root, bg_thresh=bg_thresh, limit=limit)


def _synthetic_entry() -> DatasetEntry:
    from .synthetic import SYNTHETIC_CLASSES
    return DatasetEntry(
        name="synthetic", class_names=SYNTHETIC_CLASSES, bg_thresh=0.95, background_index=0,
        build=_build_synthetic,
        description="embedded procedural scenes (groupvit_fast.data.synthetic), held-out val/test "
                    "splits with pixel masks; default SyntheticConfig")


DATASETS = {"synthetic": _synthetic_entry()}
