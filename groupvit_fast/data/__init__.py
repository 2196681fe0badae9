"""Data: offline CLIP tokenizer, multi-label prompts, webdataset loaders (DALI and plain PyTorch),
shard tools and the embedded synthetic dataset.

Heavy optional parts (DALI, webdataset) are imported lazily so ``import groupvit_fast.data`` stays
light and works on machines without them.
"""
from .tokenizer import tokenize  # noqa: F401

_LAZY = {
    "build_prompts": ("groupvit_fast.data.prompts", "build_prompts"),
    "PromptBuilder": ("groupvit_fast.data.prompts", "PromptBuilder"),
    "extract_words": ("groupvit_fast.data.prompts", "extract_words"),
    "DataConfig": ("groupvit_fast.data.config", "DataConfig"),
    "build_train_loader": ("groupvit_fast.data.loader", "build_train_loader"),
    "build_eval_loader": ("groupvit_fast.data.loader", "build_eval_loader"),
    "SyntheticConfig": ("groupvit_fast.data.synthetic", "SyntheticConfig"),
    "SYNTHETIC_CLASSES": ("groupvit_fast.data.synthetic", "SYNTHETIC_CLASSES"),
    "DATASETS": ("groupvit_fast.data.registry", "DATASETS"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'groupvit_fast.data' has no attribute {name!r}")
