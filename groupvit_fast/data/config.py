"""Data configuration.  Defaults are the released GroupViT recipe (ref §6.2-§6.4)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

from .synthetic import SyntheticConfig


def _synthetic_config(value) -> SyntheticConfig:
    """A SyntheticConfig from itself or a mapping of its fields; anything else is refused by
    name (a command-line value that did not parse arrives as a string)."""
    if isinstance(value, SyntheticConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"DataConfig.synthetic must be a mapping of SyntheticConfig fields "
                        f"(e.g. data.options.synthetic.n_train=256), got "
                        f"{type(value).__name__} {value!r}")
    fields = {f.name for f in dataclasses.fields(SyntheticConfig)}
    unknown = sorted(set(value) - fields)
    if unknown:
        raise ValueError(f"DataConfig.synthetic has field(s) {unknown} that SyntheticConfig "
                         f"does not know; valid: {sorted(fields)}")
    return SyntheticConfig(**value)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    #: webdataset shards: list, glob, directory or brace pattern; None = the embedded synthetic set
    shards: Optional[Union[str, List[str]]] = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    #: where the synthetic shards (and filtered DALI indices) are cached; None = ~/.cache/groupvit_fast
    cache_dir: Optional[str] = None
    #: 'auto' (DALI when importable, else torch) | 'dali' | 'torch'
    loader: str = "auto"
    #: DALI decode device: 'auto' (mixed = nvJPEG when CUDA is available, else cpu) | 'cpu' | 'mixed'
    dali_device: str = "auto"
    image_size: int = 224
    # RandomResizedCrop (timm/torchvision semantics)
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    #: a recipe option, not in the release: each training sample takes its crop area from
    #: zoom_crop_scale instead of crop_scale with probability zoom_p (0 = off, the release), so
    #: part of every batch sees objects enlarged as they are when a scene is segmented at a
    #: larger size than it was trained at
    zoom_p: float = 0.0
    zoom_crop_scale: Tuple[float, float] = (0.25, 1.0)
    hflip: float = 0.5
    # RandAugment 'rand-m9-mstd0.5-inc1': n=2 ops, magnitude 9 of 10
    randaugment: bool = True
    randaugment_n: int = 2
    randaugment_m: int = 9
    #: interpolation of RandAugment's geometric ops: 'linear' (timm: bilinear/bicubic) or 'nearest'
    #: (an opt-in speed-up: DALI's CPU warp costs ~2.8 ms per 224^2 image linear, ~0.3 ms nearest)
    randaugment_interp: str = "linear"
    # RandomErasing mode 'pixel', count 1, area 0.02-1/3, log-aspect 0.3-3.3
    erasing_p: float = 0.25
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    #: K multi-label prompts per caption (texts [B, 1+K, 77]); 0 = caption only ([B, 77])
    multi_label: int = 3
    context_length: int = 77
    #: templates of the multi-label prompts: 'full' (CLIP's 80, official) or 'simple'
    #: ("a photo of a {}.", a recipe option for small text encoders; see data.prompts)
    prompt_templates: str = "full"
    #: sample shuffle buffer (DALI initial_fill); the torch loader shuffles globally
    shuffle_buffer: int = 10000
    #: DALI CPU threads / torch DataLoader workers
    num_threads: int = 2
    #: samples per epoch over all ranks (the official per-dataset lengths); None = count the shards
    length: Optional[int] = None
    #: decode-check every image when the loader is built (slow; make_shards already validates)
    validate_images: bool = False
    #: eval transform: resize the shorter side to image_size * eval_resize_ratio, centre-crop
    eval_resize_ratio: float = 256 / 224

    def __post_init__(self):
        from .prompts import template_set
        template_set(self.prompt_templates)  # an unknown name fails here, not in a worker
        if self.loader not in ("auto", "dali", "torch"):
            raise ValueError(f"DataConfig.loader must be 'auto', 'dali' or 'torch', got {self.loader!r}")
        if self.dali_device not in ("auto", "cpu", "mixed"):
            raise ValueError(f"DataConfig.dali_device must be 'auto', 'cpu' or 'mixed', got {self.dali_device!r}")
        self.synthetic = _synthetic_config(self.synthetic)
        self.crop_scale = tuple(self.crop_scale)
        self.crop_ratio = tuple(self.crop_ratio)
        self.zoom_crop_scale = tuple(self.zoom_crop_scale)
        for name in ("crop_scale", "zoom_crop_scale"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not (0 < lo_hi[0] <= lo_hi[1] <= 1):
                raise ValueError(f"DataConfig.{name} must be (lo, hi) with 0 < lo <= hi <= 1, got {lo_hi}")
        if not 0 <= self.zoom_p <= 1:
            raise ValueError(f"DataConfig.zoom_p is a probability in [0, 1], got {self.zoom_p}")
        if not 0 <= self.erasing_p <= 1 or not 0 <= self.hflip <= 1:
            raise ValueError("DataConfig.erasing_p and hflip are probabilities in [0, 1]")
        if self.randaugment_interp not in ("linear", "nearest"):
            raise ValueError(f"DataConfig.randaugment_interp must be 'linear' or 'nearest', "
                             f"got {self.randaugment_interp!r}")
        if self.randaugment and not 0 <= self.randaugment_m <= 10:
            raise ValueError(f"DataConfig.randaugment_m is on timm's 0..10 scale, got {self.randaugment_m}")

    @classmethod
    def synthetic_recipe(cls, **overrides) -> "DataConfig":
        """Suggested settings for the embedded 64x64 scenes: the official crop (scale down to 0.08)
        would often cut every named object out of a small scene, so crops stay large; RandAugment
        and erasing are off (they would also hide or distort the few objects)."""
        syn = _synthetic_config(overrides.pop("synthetic", None) or SyntheticConfig())
        kw = dict(synthetic=syn, image_size=syn.image_size, crop_scale=(0.7, 1.0),
                  randaugment=False, erasing_p=0.0)
        kw.update(overrides)
        return cls(**kw)
