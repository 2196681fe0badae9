"""Zero-shot semantic segmentation: the official GroupViT protocol without mmseg (ref §5)."""
from .classes import (BG_THRESH, COCO_OBJECT_CLASSES, CONTEXT_CLASSES, DATASET_CLASSES,  # noqa: F401
                      TEMPLATES, VOC_CLASSES)
from .datasets import (ArrayDataset, COCOObjectDataset, ContextDataset, VOCDataset,  # noqa: F401
                       build_dataset)
from .metrics import IoUAccumulator, intersect_and_union  # noqa: F401
from .segmenter import SegOutput, ZeroShotSegmenter, build_class_embedding  # noqa: F401
