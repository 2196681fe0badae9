"""Readers for the standard evaluation folder layouts (mmseg 0.18 conventions, ref §5.3).

Every dataset yields ``(image uint8 [H,W,3] RGB, label int64 [H,W])`` and carries
``class_names`` (index i = name i, 'background' first), ``bg_thresh`` and ``name``.

Layouts (``root`` is the folder shown):

- VOC2012:        JPEGImages/<id>.jpg, SegmentationClass/<id>.png,
                  ImageSets/Segmentation/val.txt
- Pascal Context: VOC2010/JPEGImages/<id>.jpg, SegmentationClassContext/<id>.png,
                  ImageSets/SegmentationContext/val.txt
- COCO-Object:    images/val2017/<id>.jpg, annotations/val2017/<id>_instanceTrainIds.png
                  (no split file: every .jpg under the image folder, sorted, like mmseg's scandir)
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .classes import BG_THRESH, COCO_OBJECT_CLASSES, CONTEXT_CLASSES, VOC_CLASSES
from .transforms import load_image, load_label


class SegFolderDataset:
    """Image/annotation pairs named by ids from a split file or a folder scan."""

    name = 'custom'
    class_names: Tuple[str, ...] = ()
    bg_thresh: Optional[float] = None

    def __init__(self, root, img_dir: str, ann_dir: str, split: Optional[str] = None,
                 img_suffix: str = '.jpg', seg_map_suffix: str = '.png',
                 class_names: Optional[Sequence[str]] = None, bg_thresh: Optional[float] = None):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f'{self.name}: data root not found: {self.root}')
        self.img_dir = os.path.join(self.root, img_dir)
        self.ann_dir = os.path.join(self.root, ann_dir)
        self.img_suffix, self.seg_map_suffix = img_suffix, seg_map_suffix
        if class_names is not None:
            self.class_names = tuple(class_names)
        if bg_thresh is not None:
            self.bg_thresh = bg_thresh
        for d, what in ((self.img_dir, 'image'), (self.ann_dir, 'annotation')):
            if not os.path.isdir(d):
                raise FileNotFoundError(f'{self.name}: {what} folder not found: {d} '
                                        f'(expected layout: {self._layout_hint()})')
        if split is not None:
            split_path = os.path.join(self.root, split)
            if not os.path.isfile(split_path):
                raise FileNotFoundError(f'{self.name}: split file not found: {split_path} '
                                        f'(expected layout: {self._layout_hint()})')
            with open(split_path) as f:
                self.ids: List[str] = [ln.strip() for ln in f if ln.strip()]
        else:
            found = []
            for dirpath, _, files in os.walk(self.img_dir):
                for fn in files:
                    if fn.endswith(img_suffix):
                        rel = os.path.relpath(os.path.join(dirpath, fn), self.img_dir)
                        found.append(rel[:-len(img_suffix)])
            self.ids = sorted(found)
        if not self.ids:
            raise ValueError(f'{self.name}: no images found under {self.img_dir}'
                             + (f' for split {split}' if split else ''))

    def _layout_hint(self) -> str:
        return f'{self.img_dir}/<id>{self.img_suffix}, {self.ann_dir}/<id>{self.seg_map_suffix}'

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> str:
        return os.path.join(self.img_dir, self.ids[i] + self.img_suffix)

    def label_path(self, i: int) -> str:
        return os.path.join(self.ann_dir, self.ids[i] + self.seg_map_suffix)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        img = load_image(self.image_path(i))
        lab = load_label(self.label_path(i))
        if lab.shape != img.shape[:2]:
            raise ValueError(f'{self.name}: label {self.label_path(i)} has shape {lab.shape} '
                             f'but image {self.image_path(i)} is {img.shape[:2]}')
        return img, lab


class VOCDataset(SegFolderDataset):
    name = 'voc'
    class_names = VOC_CLASSES
    bg_thresh = BG_THRESH['voc']

    def __init__(self, root, split: str = 'ImageSets/Segmentation/val.txt', **kw):
        super().__init__(_maybe_sub(root, 'VOC2012', 'ImageSets'), 'JPEGImages',
                         'SegmentationClass', split, **kw)


class ContextDataset(SegFolderDataset):
    name = 'context'
    class_names = CONTEXT_CLASSES
    bg_thresh = BG_THRESH['context']

    def __init__(self, root, split: str = 'ImageSets/SegmentationContext/val.txt', **kw):
        super().__init__(_maybe_sub(root, 'VOC2010', 'ImageSets'), 'JPEGImages',
                         'SegmentationClassContext', split, **kw)


class COCOObjectDataset(SegFolderDataset):
    name = 'coco_object'
    class_names = COCO_OBJECT_CLASSES
    bg_thresh = BG_THRESH['coco_object']

    def __init__(self, root, img_dir: str = 'images/val2017', ann_dir: str = 'annotations/val2017', **kw):
        super().__init__(root, img_dir, ann_dir, None, img_suffix='.jpg',
                         seg_map_suffix='_instanceTrainIds.png', **kw)


def _maybe_sub(root, sub: str, marker: str) -> str:
    """Accept both VOCdevkit/ and VOCdevkit/VOC2012/ as the root."""
    root = os.fspath(root)
    if not os.path.isdir(os.path.join(root, marker)) and os.path.isdir(os.path.join(root, sub, marker)):
        return os.path.join(root, sub)
    return root


class ArrayDataset:
    """Wraps any sequence/iterable of (image uint8 [H,W,3], mask [H,W]) pairs plus class names."""

    def __init__(self, samples, class_names: Sequence[str], bg_thresh: Optional[float] = None,
                 name: str = 'custom'):
        self.samples = samples if hasattr(samples, '__getitem__') else list(samples)
        self.class_names = tuple(class_names)
        self.bg_thresh = bg_thresh
        self.name = name

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img, mask = self.samples[i][:2]
        return np.asarray(img), np.asarray(mask)


DATASET_READERS = {'voc': VOCDataset, 'context': ContextDataset, 'coco_object': COCOObjectDataset}


def build_dataset(name: str, data_root=None, **kw):
    """'voc' | 'context' | 'coco_object' (folder readers) or 'synthetic' (the embedded data set
    from groupvit_fast.data.registry)."""
    if name in DATASET_READERS:
        if data_root is None:
            raise ValueError(f'dataset {name!r} needs --data-root')
        return DATASET_READERS[name](data_root, **kw)
    if name == 'synthetic':
        return _synthetic(data_root, **kw)
    raise ValueError(f"unknown dataset {name!r}; expected one of "
                     f"{sorted(DATASET_READERS) + ['synthetic']}")


def _synthetic(data_root=None, split: str = 'val', **kw):
    """The data teammate's registry entry: ``build(root, split, **kw)`` returns (image, mask)
    pairs with ``class_names`` ('background' first) and ``bg_thresh``; ``data_root`` is its
    cache folder (None: the default cache)."""
    try:
        from groupvit_fast.data.registry import DATASETS
    except ImportError as e:
        raise RuntimeError("dataset 'synthetic' needs groupvit_fast.data.registry, which is not "
                           f"importable: {e}") from None
    if 'synthetic' not in DATASETS:
        raise RuntimeError("groupvit_fast.data.registry.DATASETS has no 'synthetic' entry")
    entry = DATASETS['synthetic']
    ds = entry.build(root=data_root, split=split, **kw)
    if getattr(ds, 'class_names', None) is None:
        return ArrayDataset(ds, entry.class_names, entry.bg_thresh, name='synthetic')
    return ds
