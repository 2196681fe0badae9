"""Test-time geometry of the official protocol without mmcv (ref §5.1): image IO (Pillow),
keep-ratio rescale, normalisation, sliding-window grid, group-map grid inference.
"""
from __future__ import annotations

import os
from typing import List, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
# mmseg img_scale=(2048, 448): long side <= 2048, short side <= 448, keep ratio.
IMG_SCALE = (2048, 448)

ImageLike = Union[str, os.PathLike, np.ndarray, 'PIL.Image.Image']  # noqa: F821


def load_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read an image file as RGB uint8 [H,W,3].

    EXIF orientation is applied because cv2.imread (used by mmcv's LoadImageFromFile) applies it
    too; grey/palette/alpha images become 3-channel RGB like cv2's IMREAD_COLOR.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'image file not found: {path}')
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert('RGB'), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f'cannot read image {path}: {e}') from None


def load_label(path: Union[str, os.PathLike]) -> np.ndarray:
    """Read a label PNG unchanged (palette indices for VOC, raw ids otherwise) as [H,W] int64."""
    from PIL import Image, UnidentifiedImageError
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'label file not found: {path}')
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f'cannot read label map {path}: {e}') from None
    if arr.ndim == 3:
        # A colour-coded annotation would silently evaluate garbage; refuse it clearly.
        raise ValueError(f'label map {path} has shape {arr.shape}; expected a single-channel '
                         f'(index/palette) PNG of shape [H,W]')
    return arr.astype(np.int64)


def as_rgb_array(image: ImageLike) -> np.ndarray:
    """Path, PIL image or uint8 [H,W,3] array -> RGB uint8 [H,W,3]."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image)
    try:
        from PIL import Image
        if isinstance(image, Image.Image):
            return np.asarray(image.convert('RGB'), dtype=np.uint8).copy()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f'image: expected an RGB array of shape [H,W,3], got {arr.shape}')
    if arr.dtype != np.uint8:
        raise ValueError(f'image: expected dtype uint8 (RGB 0-255), got {arr.dtype}')
    return arr


def rescale_size(h: int, w: int, scale: Tuple[int, int] = IMG_SCALE) -> Tuple[int, int]:
    """mmcv.rescale_size with keep_ratio: factor = min(long_max/long, short_max/short), each side
    rounded as int(x * f + 0.5). Returns (new_h, new_w)."""
    long_max, short_max = max(scale), min(scale)
    f = min(long_max / max(h, w), short_max / min(h, w))
    return int(h * float(f) + 0.5), int(w * float(f) + 0.5)


def resize_rgb(img: np.ndarray, size_hw: Tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a uint8 RGB image to float32 [3,h,w] holding integer values.

    mmcv resizes with cv2 INTER_LINEAR on uint8: half-pixel centres, no antialiasing, result
    rounded back to uint8. F.interpolate(bilinear, align_corners=False, antialias=False) has the
    same sampling; rounding to uint8 afterwards mirrors cv2 (cv2's fixed-point weights can still
    differ by one grey level on some pixels). Pillow's resize is *not* used because it
    antialiases when downscaling.
    """
    h, w = img.shape[:2]
    t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float()  # [H,W,3] -> [3,H,W]
    if (h, w) == tuple(size_hw):
        return t
    t = F.interpolate(t[None], size=size_hw, mode='bilinear', align_corners=False)[0]
    return t.round_().clamp_(0, 255)


def normalize(t: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std per RGB channel on the 0-255 scale; t is [3,H,W] or [B,3,H,W]."""
    mean = torch.tensor(MEAN, dtype=t.dtype, device=t.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=t.dtype, device=t.device).view(3, 1, 1)
    return (t - mean) / std


def preprocess(image: ImageLike, scale: Tuple[int, int] = IMG_SCALE) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Full test pipeline: RGB uint8 -> keep-ratio rescale -> normalise.
    Returns (float32 [3,h,w], original (H, W))."""
    img = as_rgb_array(image)
    H, W = img.shape[:2]
    if H == 0 or W == 0:
        raise ValueError(f'image has an empty side: {img.shape}')
    h, w = rescale_size(H, W, scale) if scale is not None else (H, W)
    return normalize(resize_rgb(img, (h, w))), (H, W)


def slide_windows(h: int, w: int, crop: Tuple[int, int], stride: Tuple[int, int]) -> List[Tuple[int, int, int, int]]:
    """mmseg 0.x slide_inference grid, raster order (rows outer): list of (y1, y2, x1, x2).

    grids = max(H - crop + stride - 1, 0) // stride + 1; windows are shifted back inside the
    image, so every window has size (min(h, crop_h), min(w, crop_w)).
    """
    ch, cw = crop
    sh, sw = stride
    if min(ch, cw, sh, sw) <= 0:
        raise ValueError(f'crop {crop} and stride {stride} must be positive')
    h_grids = max(h - ch + sh - 1, 0) // sh + 1
    w_grids = max(w - cw + sw - 1, 0) // sw + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * sh, wi * sw
            y2, x2 = min(y1 + ch, h), min(x1 + cw, w)
            y1, x1 = max(y2 - ch, 0), max(x2 - cw, 0)
            out.append((y1, y2, x1, x2))
    return out


def feat_grid(h: int, w: int, n: int) -> Tuple[int, int]:
    """Token grid (h_feat, w_feat) of a window of h x w pixels with n tokens, inferred as the
    official resize_attn_map does: scale = sqrt(h*w // n), the shorter side is divided by
    round(scale) (W // round(scale), not HF's round(W / scale)), the other side is n // that.
    Python's round() is half-to-even like np.round."""
    scale = (h * w // n) ** 0.5
    r = int(round(scale))
    if r <= 0:
        raise ValueError(f'cannot infer the token grid of a {h}x{w} window with {n} tokens')
    if h > w:
        wf = w // r
        hf = n // wf if wf else 0
    else:
        hf = h // r
        wf = n // hf if hf else 0
    if hf * wf == n:
        return hf, wf
    # The official code asserts here (e.g. a 125x96 window with 16-px patches has a 7x6 grid but
    # the formula gives 8x5). Only in that case, look for the integer patch size whose
    # floor-divided grid has n tokens, which is what a stride-p patch embedding produces.
    for p in sorted(range(1, max(h, w) + 1), key=lambda p: abs(p - scale)):
        if (h // p) * (w // p) == n:
            return h // p, w // p
    raise ValueError(f'{n} tokens do not form a token grid for a {h}x{w} window')
