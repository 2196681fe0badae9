"""groupvit_fast: the GroupViT model (CVPR 2022), bit-compatible with the official checkpoints,
with fused grouping kernels, DeepSpeed training and zero-shot segmentation."""
from .config import ImageEncoderConfig, ModelConfig, TextEncoderConfig, build_model  # noqa: F401
from .models import GroupViT, MultiLabelContrastive, TextTransformer  # noqa: F401
from .ops import gumbel_assign_merge  # noqa: F401

__version__ = "0.1.0"

_LAZY = {
    "tokenize": ("groupvit_fast.data.tokenizer", "tokenize"),
    "load_checkpoint": ("groupvit_fast.checkpoint", "load_checkpoint"),
    "save_checkpoint": ("groupvit_fast.checkpoint", "save_checkpoint"),
    "ZeroShotSegmenter": ("groupvit_fast.seg", "ZeroShotSegmenter"),
}


def __getattr__(name):
    # optional parts are imported on first use so `import groupvit_fast` stays light
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'groupvit_fast' has no attribute {name!r}")
