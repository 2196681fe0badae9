"""The embedded synthetic dataset: the default of ``make train`` (no download needed).

Design (driven by what went wrong in the naive recipe measured for issue 9):

* **Captions never name colours.**  Every object gets a random hue, so colour carries no class
  information; the only way to match a caption word to an image is through the object it names.
* **Each class is visible locally and globally**: a distinctive outline (circle, square, triangle,
  star, ring, cross, heart, diamond) *and* a class-specific fill texture (solid, checker, stripes,
  dots, concentric bands, grid, ...), drawn in two tones of the object's random colour.  Textures
  are computed in the object's own rotated frame, so they rotate with it.  A patch inside an
  object therefore already says which class it belongs to, which is what lets groups be named.
* **Background is clearly different**: low-saturation colours mixed by smooth value noise plus
  fine grain, never a regular pattern, so objects (saturated, regular texture) stand out.
* **Masks stay real**: 1-4 objects, varied sizes/positions/rotations, painted back to front with
  occlusion; every object keeps at least ``min_visible`` of its area (else the scene is re-drawn),
  so the caption never names an invisible object.  Mask values: 0 = background, ``1..n`` = class.
* **Captions are natural and varied**: counts and plurals ("two stars and a ring"), random object
  order, a few connectives, rarely a background phrase.  Class words are the only nouns, except
  "background" in the rare background phrase, so the multi-label prompt builder picks class nouns.

Everything is deterministic from ``SyntheticConfig.seed``: sample *i* of split *s* is rendered from
``np.random.default_rng([seed, split_id, i])`` regardless of sharding.  :func:`ensure_shards`
writes webdataset shards once (cached under a hash of the config), so training always goes through
the real shard -> loader path.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

RENDER_VERSION = 3  # bump when the renderer changes: it invalidates cached shards

# Class name -> (plural, fill texture, radius scale).  The radius scale evens out the areas of
# the outlines (a triangle inscribed in the unit circle covers 1.3, a disc 3.1), so that no class
# is systematically too small to cover whole 8x8 patches.
_CLASS_TABLE = {
    "circle": ("circles", "solid", 0.9),
    "square": ("squares", "checker", 1.0),
    "triangle": ("triangles", "stripes", 1.35),
    "star": ("stars", "dots", 1.2),
    "ring": ("rings", "bands", 1.0),
    "cross": ("crosses", "grid", 1.1),
    "heart": ("hearts", "split", 1.0),
    "diamond": ("diamonds", "zigzag", 1.3),
}
ALL_CLASSES: Tuple[str, ...] = tuple(_CLASS_TABLE)
DEFAULT_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
#: label index i -> name i, background first (the segmentation evaluator's convention)
SYNTHETIC_CLASSES: Tuple[str, ...] = ("background",) + DEFAULT_CLASSES

SPLITS = ("train", "val", "test")
_SPLIT_ID = {"train": 0, "val": 1, "test": 2}
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
_BG_ADJ = ("cloudy", "grainy", "smooth", "dusty", "pale", "soft")
#: captions of object-free train scenes (``empty_train_prob``): one noun, the background's
_EMPTY_ADJ = ("bare", "plain", "empty", "just", "only")  # "just sand"
_EMPTY_ADJ_ARTICLE = _EMPTY_ADJ[:3]  # "an empty background"; "a just background" is not English
#: nameable background kinds (``SyntheticConfig.named_backgrounds``): noun -> caption phrases
BACKGROUND_KINDS = {
    "clouds": ("under clouds", "in the clouds", "against clouds"),
    "sand": ("on sand", "in the sand", "on the sand"),
    "water": ("on water", "in the water", "over water"),
    "fog": ("in fog", "in the fog", "through fog"),
}


@dataclass
class SyntheticConfig:
    seed: int = 0
    image_size: int = 64
    n_train: int = 20000
    n_val: int = 500
    n_test: int = 500
    classes: Tuple[str, ...] = DEFAULT_CLASSES
    #: probabilities of 1, 2, 3, 4 objects in a scene
    object_count_probs: Tuple[float, ...] = (0.4, 0.35, 0.2, 0.05)
    #: object diameter as a fraction of the image side (before the per-class area correction)
    min_size: float = 0.35
    max_size: float = 0.65
    #: each object must keep this fraction of its own area visible after occlusion
    min_visible: float = 0.5
    #: probability that an object repeats a class already in the scene ("two stars")
    repeat_prob: float = 0.2
    #: class-specific fill textures (False: every object solid, shape is the only cue)
    class_textures: bool = True
    #: probability that the caption mentions the background ("... on a cloudy background")
    bg_caption_prob: float = 0.1
    #: backgrounds of nameable kinds (clouds, sand, water, fog; ``BACKGROUND_KINDS``) that the
    #: caption names with probability ``bg_caption_prob``, instead of one anonymous noise kind
    named_backgrounds: bool = False
    #: probability that a *train* scene holds no object at all; its caption names only the
    #: background ("bare sand", "an empty background"). Val and test scenes always hold objects.
    #: A recipe option: it shows the model what the background alone is called, so the groups
    #: that own background have a caption of their own to match.
    empty_train_prob: float = 0.0
    #: probability that a *train* scene is drawn as if seen at ``zoom_train_factor`` times the
    #: size: objects that much larger, at most two of them, allowed further past the frame. Val
    #: and test scenes never are. A recipe option for segmenting at a larger size than training
    #: (objects then span more patches than any training scene showed); unlike zoomed crops, the
    #: caption stays true, since no named object is cut out of the picture
    zoom_train_prob: float = 0.0
    zoom_train_factor: float = 1.5
    jpeg_quality: int = 95
    shard_size: int = 2000

    def __post_init__(self):
        self.classes = tuple(self.classes)
        unknown = [c for c in self.classes if c not in _CLASS_TABLE]
        if unknown:
            raise ValueError(f"SyntheticConfig.classes: unknown class(es) {unknown}; "
                             f"choose from {list(ALL_CLASSES)}")
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(f"SyntheticConfig.classes must be distinct and non-empty, got {self.classes}")
        if self.image_size < 16:
            raise ValueError(f"SyntheticConfig.image_size must be >= 16, got {self.image_size}")
        self.object_count_probs = tuple(float(p) for p in self.object_count_probs)
        if not 0.0 <= float(self.empty_train_prob) < 1.0:
            raise ValueError(f"SyntheticConfig.empty_train_prob must be in [0, 1), got "
                             f"{self.empty_train_prob}")
        if not 0.0 <= float(self.zoom_train_prob) <= 1.0:
            raise ValueError(f"SyntheticConfig.zoom_train_prob must be in [0, 1], got "
                             f"{self.zoom_train_prob}")
        if not 1.0 <= float(self.zoom_train_factor) <= 3.0:
            raise ValueError(f"SyntheticConfig.zoom_train_factor must be in [1, 3], got "
                             f"{self.zoom_train_factor}")
        if not (0 < self.min_size <= self.max_size <= 1):
            raise ValueError(f"need 0 < min_size <= max_size <= 1, got {self.min_size}, {self.max_size}")

    @property
    def class_names(self) -> Tuple[str, ...]:
        """Label index -> name, 'background' first."""
        return ("background",) + self.classes

    def n(self, split: str) -> int:
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def config_hash(self) -> str:
        d = dataclasses.asdict(self)
        if not d["empty_train_prob"]:
            del d["empty_train_prob"]  # added later: at 0 the earlier caches stay valid
        if not d["zoom_train_prob"]:
            del d["zoom_train_prob"], d["zoom_train_factor"]  # likewise
        d["_render_version"] = RENDER_VERSION
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------- rendering

def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB in [0, 1] (inputs broadcastable arrays)."""
    h = np.asarray(h, np.float32) * 6.0
    i = np.floor(h).astype(np.int32) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], -1).astype(np.float32)


def _value_noise(rng, h, w, cells):
    """Smooth noise in [0, 1]: a random (cells+1)^2 lattice, bilinearly upsampled (smoothstep)."""
    lat = rng.random((cells + 1, cells + 1), dtype=np.float32)
    y = (np.arange(h, dtype=np.float32) + 0.5) / h * cells
    x = (np.arange(w, dtype=np.float32) + 0.5) / w * cells
    y0 = np.minimum(np.floor(y).astype(np.int32), cells - 1)
    x0 = np.minimum(np.floor(x).astype(np.int32), cells - 1)
    fy, fx = y - y0, x - x0
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    a = lat[y0][:, x0]
    b = lat[y0][:, x0 + 1]
    c = lat[y0 + 1][:, x0]
    d = lat[y0 + 1][:, x0 + 1]
    top = a + (b - a) * fx[None, :]
    bot = c + (d - c) * fx[None, :]
    return top + (bot - top) * fy[:, None]


def _background(rng, size):
    # low saturation, mid value: objects (saturated, regular texture) always stand out
    hues = rng.random(2)
    sats = rng.uniform(0.0, 0.3, 2)
    vals = rng.uniform(0.35, 0.9, 2)
    c = _hsv_to_rgb(hues, sats, vals)  # [2, 3]
    t = _value_noise(rng, size, size, int(rng.integers(2, 6)))
    return _mix_tones(rng, c, t, rng.uniform(0.01, 0.04))


def _mix_tones(rng, c, t, grain):
    """Two tones c [2,3] mixed by t [H,W] in [0,1], plus grey grain of std ``grain``."""
    img = c[0][None, None] * (1 - t[..., None]) + c[1][None, None] * t[..., None]
    return img + rng.normal(0, grain, t.shape + (1,)).astype(np.float32)


def _background_named(rng, size, kind):
    """A background of a nameable kind (``BACKGROUND_KINDS``), low saturation like
    :func:`_background` so objects still stand out, but each kind with its own spatial statistics:
    the caption names it, so the groups that own background have something of their own to mean,
    as sky or grass do in real captions."""
    hues = rng.random(2)
    sats = rng.uniform(0.0, 0.3, 2)
    # one dark and one light tone, so waves and gradients are visible whatever the colours
    vals = rng.permutation([rng.uniform(0.3, 0.5), rng.uniform(0.65, 0.9)])
    c = _hsv_to_rgb(hues, sats, vals)  # [2, 3]
    if kind in ("water", "fog"):
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if kind == "clouds":  # smooth blobs
        t = _value_noise(rng, size, size, int(rng.integers(2, 5)))
        grain = rng.uniform(0.005, 0.02)
    elif kind == "sand":  # nearly flat tone, strong per-pixel speckle
        t = 0.5 + 0.2 * (_value_noise(rng, size, size, 2) - 0.5)
        grain = rng.uniform(0.07, 0.1)
    elif kind == "water":  # long smooth waves, wavelength 1/3-1/2 of the frame, warped
        th = rng.uniform(0, np.pi)
        wl = rng.uniform(1 / 3, 1 / 2)
        warp = 0.08 * _value_noise(rng, size, size, 3)
        ph = (np.cos(th) * xx + np.sin(th) * yy + warp) / wl
        t = 0.5 + 0.5 * np.sin(2 * np.pi * ph + rng.uniform(0, 2 * np.pi))
        grain = rng.uniform(0.005, 0.015)
    elif kind == "fog":  # one linear gradient across the frame
        th = rng.uniform(0, 2 * np.pi)
        t = np.cos(th) * (xx - 0.5) + np.sin(th) * (yy - 0.5)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        grain = rng.uniform(0.005, 0.015)
    else:
        raise KeyError(kind)
    return _mix_tones(rng, c, np.clip(t, 0.0, 1.0).astype(np.float32), grain)


def _shape_mask(name, u, v):
    """Inside-test of class ``name`` in normalised local coordinates (unit radius)."""
    r2 = u * u + v * v
    if name == "circle":
        return r2 <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.78
    if name == "triangle":
        # equilateral, circumradius 1: three half-planes with outward normals 120 degrees apart
        m = v <= 0.5
        for a in (np.pi / 6, 5 * np.pi / 6):
            m &= (-np.cos(a) * u - np.sin(a) * v) <= 0.5
        return m
    if name == "star":
        ang = np.arctan2(v, u)
        frac = (ang / (2 * np.pi) * 5) % 1.0
        rad = 0.42 + 0.58 * np.abs(frac - 0.5) * 2  # 5 points, inner radius 0.42
        return np.sqrt(r2) <= rad
    if name == "ring":
        return (r2 <= 1.0) & (r2 >= 0.5 ** 2)
    if name == "cross":
        a, b = np.abs(u), np.abs(v)
        return ((a <= 0.3) & (b <= 0.95)) | ((b <= 0.3) & (a <= 0.95))
    if name == "heart":
        x, y = u * 1.25, -v * 1.25 + 0.15
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    if name == "diamond":
        return np.abs(u) / 0.6 + np.abs(v) <= 1.0
    raise KeyError(name)


def _texture(kind, pu, pv, period):
    """Second-tone selector (bool) for a fill texture, in pixel units of the object's frame."""
    if kind == "solid":
        return np.zeros(pu.shape, bool)
    if kind == "checker":
        return ((np.floor(pu / period) + np.floor(pv / period)) % 2) == 1
    if kind == "stripes":
        return (np.floor(pu / period) % 2) == 1
    if kind == "dots":
        du = (pu % period) - period / 2
        dv = (pv % period) - period / 2
        return du * du + dv * dv <= (0.3 * period) ** 2
    if kind == "bands":
        return (np.floor(np.sqrt(pu * pu + pv * pv) / (0.7 * period)) % 2) == 1
    if kind == "grid":
        w = max(1.0, 0.3 * period)
        return ((pu % period) < w) | ((pv % period) < w)
    if kind == "split":
        return pu > 0
    if kind == "zigzag":
        return (np.floor((pu + np.abs((pv % period) - period / 2)) / period) % 2) == 1
    raise KeyError(kind)


def _object_layer(rng, name, size, cfg, yy, xx, zoom: float = 1.0):
    """One object at a random pose and colour: (inside mask [H,W] bool, rgb [n_inside, 3] float).

    Only the object's bounding box is evaluated (every outline lies within 1.5 r of its centre) and
    colours only for the covered pixels: ~3x faster than full-frame layers, same pixels.
    """
    diam = rng.uniform(cfg.min_size, cfg.max_size) * size * zoom
    r = diam / 2 * _CLASS_TABLE[name][2]
    # the outline may cross the frame border by up to 0.15 r: edge objects stay recognisable
    # (a zoomed object with 0.85 r past half the frame has no such room: it is centred)
    lo, hi = min(0.85 * r, size / 2), max(size - 0.85 * r, size / 2)
    cx, cy = rng.uniform(lo, hi), rng.uniform(lo, hi)
    th = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(th), np.sin(th)
    ext = 1.5 * r + 1
    y0, y1 = max(0, int(cy - ext)), min(size, int(cy + ext) + 1)
    x0, x1 = max(0, int(cx - ext)), min(size, int(cx + ext) + 1)
    dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
    pu = c * dx + s * dy
    pv = -s * dx + c * dy
    box = _shape_mask(name, pu / r, pv / r)
    inside = np.zeros((size, size), bool)
    inside[y0:y1, x0:x1] = box
    pu, pv = pu[box], pv[box]
    hue = rng.random()
    col_a = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
    col_b = col_a * rng.uniform(0.2, 0.45)  # dark second tone: texture contrast for any hue
    if cfg.class_textures:
        period = max(3.0, size / 12.0) * rng.uniform(0.85, 1.2)
        sel = _texture(_CLASS_TABLE[name][1], pu, pv, period)
    else:
        sel = np.zeros(pu.shape, bool)
    rgb = np.where(sel[..., None], col_b, col_a)
    # mild directional shading so solid fills are not perfectly flat
    shade = 1.0 + 0.12 * (pu / r) * rng.uniform(-1, 1)
    rgb = rgb * shade[..., None]
    return inside, rgb


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(rng, counts: Sequence[Tuple[str, int]], cfg: SyntheticConfig,
                 background: Optional[str] = None) -> str:
    """Natural caption naming each visible class once, with counts/plurals; never a colour."""
    phrases = []
    for name, k in counts:
        if k == 1:
            phrases.append(f"{_article(name)} {name}")
        else:
            phrases.append(f"{_NUMBER_WORDS.get(k, 'several')} {_CLASS_TABLE[name][0]}")
    order = rng.permutation(len(phrases))
    phrases = [phrases[i] for i in order]
    if len(phrases) == 1:
        text = phrases[0]
    elif len(phrases) == 2:
        conj = ("and", "and", "and", "with", "beside", "near")[int(rng.integers(6))]
        text = f"{phrases[0]} {conj} {phrases[1]}"
    else:
        text = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if background is not None:
        if rng.random() < cfg.bg_caption_prob:
            phrases = BACKGROUND_KINDS[background]
            text += " " + phrases[int(rng.integers(len(phrases)))]
    elif rng.random() < cfg.bg_caption_prob:
        text += f" on a {_BG_ADJ[int(rng.integers(len(_BG_ADJ)))]} background"
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.3:
        text += "."
    return text


def _draw_background(rng, cfg: SyntheticConfig) -> Tuple[np.ndarray, Optional[str]]:
    """(float image [H,W,3], its nameable kind or None for the anonymous noise kind)."""
    if cfg.named_backgrounds:
        kind = tuple(BACKGROUND_KINDS)[int(rng.integers(len(BACKGROUND_KINDS)))]
        return _background_named(rng, cfg.image_size, kind), kind
    return _background(rng, cfg.image_size), None


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _empty_scene(rng, cfg: SyntheticConfig) -> Tuple[np.ndarray, np.ndarray, str]:
    """An object-free scene: background only, all-zero mask, a caption naming the background."""
    if cfg.named_backgrounds:
        adj = _EMPTY_ADJ[int(rng.integers(len(_EMPTY_ADJ)))]
        img, kind = _draw_background(rng, cfg)
        caption = f"{adj} {kind}"
    else:
        img, _ = _draw_background(rng, cfg)
        adj = _EMPTY_ADJ_ARTICLE[int(rng.integers(len(_EMPTY_ADJ_ARTICLE)))]
        caption = f"{_article(adj)} {adj} background"
    return _to_uint8(img), np.zeros((cfg.image_size,) * 2, np.uint8), caption


def render_scene(rng: np.random.Generator, cfg: SyntheticConfig, split: str = "train"
                 ) -> Tuple[np.ndarray, np.ndarray, str]:
    """Render one scene: (image uint8 [H,W,3], mask uint8 [H,W] with 0=background, caption)."""
    size = cfg.image_size
    # the draw happens only with the option on, so configs without it render the same scenes
    if split == "train" and cfg.empty_train_prob and rng.random() < cfg.empty_train_prob:
        return _empty_scene(rng, cfg)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    probs = np.asarray(cfg.object_count_probs, np.float64)
    n_obj = int(rng.choice(len(probs), p=probs / probs.sum())) + 1
    zoom = 1.0
    # drawn only with the option on and only for train, so other configs render the same scenes
    if split == "train" and cfg.zoom_train_prob and rng.random() < cfg.zoom_train_prob:
        zoom, n_obj = float(cfg.zoom_train_factor), min(n_obj, 2)
    n_cls = len(cfg.classes)
    for _attempt in range(30):
        names: List[str] = []
        for _ in range(n_obj):
            if names and rng.random() < cfg.repeat_prob:
                names.append(names[int(rng.integers(len(names)))])
            else:
                names.append(cfg.classes[int(rng.integers(n_cls))])
        img, bg_kind = _draw_background(rng, cfg)
        img = img.astype(np.float64)
        inst = np.zeros((size, size), np.int16)  # 0 = background, k+1 = object k (topmost wins)
        areas = []
        for k, name in enumerate(names):
            inside, rgb = _object_layer(rng, name, size, cfg, yy, xx, zoom)
            img[inside] = rgb
            inst[inside] = k + 1
            areas.append(int(inside.sum()))
        visible = np.bincount(inst.ravel(), minlength=n_obj + 1)[1:]
        ok = all(a > 0 and v >= cfg.min_visible * a and v >= 0.01 * size * size
                 for a, v in zip(areas, visible))
        if ok:
            break
        if _attempt >= 10 and n_obj > 1:
            n_obj -= 1  # crowded: fewer objects rather than an endless retry
    else:  # pragma: no cover - one object always fits after n_obj shrinks to 1
        raise RuntimeError("render_scene: could not place objects")
    lut = np.zeros(n_obj + 1, np.uint8)
    for k, name in enumerate(names):
        lut[k + 1] = cfg.classes.index(name) + 1
    mask = lut[inst]
    counts: Dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    caption = make_caption(rng, list(counts.items()), cfg, background=bg_kind)
    return _to_uint8(img), mask, caption


def sample_rng(cfg: SyntheticConfig, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(cfg.seed), _SPLIT_ID[split], int(index)])


def render_sample(cfg: SyntheticConfig, split: str, index: int):
    """Deterministic sample ``index`` of ``split`` (independent of sharding and of other samples)."""
    return render_scene(sample_rng(cfg, split, index), cfg, split)


# ----------------------------------------------------------------------------------- shards

def _encode(image: np.ndarray, fmt: str, quality: int = 95) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    if fmt == "jpg":
        # 4:4:4 keeps the thin class textures crisp at 64 px (4:2:0 would blur the chroma)
        Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    else:
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def default_cache_dir() -> str:
    return os.environ.get("GROUPVIT_FAST_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "groupvit_fast"))


def _split_dir(cfg: SyntheticConfig, cache_dir: Optional[str]) -> str:
    return os.path.join(cache_dir or default_cache_dir(), "synthetic", cfg.config_hash())


def _encoded_sample(cfg: SyntheticConfig, split: str, i: int) -> Dict[str, object]:
    image, mask, caption = render_sample(cfg, split, i)
    sample: Dict[str, object] = {"jpg": _encode(image, "jpg", cfg.jpeg_quality), "txt": caption}
    if split != "train":
        sample["mask.png"] = _encode(mask, "png")
        present = sorted(int(c) for c in np.unique(mask) if c)
        sample["json"] = json.dumps({"index": i, "classes": present})
    return sample


def _encoded_chunk(args):
    cfg, split, lo, hi = args
    return [_encoded_sample(cfg, split, i) for i in range(lo, hi)]


def write_split(cfg: SyntheticConfig, split: str, out_dir: str, verbose: bool = False,
                workers: Optional[int] = None) -> List[str]:
    """Render ``split`` into ``out_dir/<split>-%06d.tar`` (+ DALI .idx). Eval splits carry masks.

    Large splits are rendered by a process pool (``workers``, default: the CPU count, at most 8);
    each sample has its own seed, so the shards are byte-identical for any worker count.
    """
    from .shards import ShardWriter
    n = cfg.n(split)
    if n <= 0:
        return []
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if n >= 2000 else 1
    chunk = 256
    jobs = [(cfg, split, lo, min(n, lo + chunk)) for lo in range(0, n, chunk)]
    pool = None
    if workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(workers)
        chunks = pool.imap(_encoded_chunk, jobs)
    else:
        chunks = map(_encoded_chunk, jobs)
    try:
        with ShardWriter(os.path.join(out_dir, f"{split}-%06d.tar"), maxcount=cfg.shard_size) as w:
            i = 0
            for samples in chunks:
                for sample in samples:
                    w.write(f"{split}{i:08d}", sample)
                    i += 1
                    if verbose and i % 5000 == 0:
                        print(f"synthetic: {split} {i}/{n}", flush=True)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return w.closed_shards


def ensure_shards(cfg: Optional[SyntheticConfig] = None, cache_dir: Optional[str] = None,
                  splits: Sequence[str] = SPLITS, verbose: bool = True) -> Dict[str, List[str]]:
    """Write the dataset's webdataset shards once and return ``{split: [shard paths]}``.

    Shards live in ``<cache_dir>/synthetic/<config hash>/``; a ``manifest.json`` written last marks a
    complete split set, so an interrupted generation is redone, and several processes (ranks) that
    call this at once wait on a file lock instead of writing the same files twice.
    """
    cfg = cfg or SyntheticConfig()
    out_dir = _split_dir(cfg, cache_dir)
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, "manifest.json")
    import fcntl
    with open(os.path.join(out_dir, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        manifest = {}
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                manifest = json.load(f)
        result = {}
        changed = False
        for split in splits:
            entry = manifest.get("splits", {}).get(split)
            if entry is not None and all(os.path.exists(os.path.join(out_dir, p)) for p in entry):
                result[split] = [os.path.join(out_dir, p) for p in entry]
                continue
            if verbose:
                print(f"synthetic: rendering {cfg.n(split)} {split} scenes into {out_dir}", flush=True)
            paths = write_split(cfg, split, out_dir, verbose=verbose)
            manifest.setdefault("splits", {})[split] = [os.path.basename(p) for p in paths]
            result[split] = paths
            changed = True
        if changed:
            manifest["config"] = dataclasses.asdict(cfg)
            manifest["class_names"] = list(cfg.class_names)
            tmp = manifest_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1)
            os.replace(tmp, manifest_path)
    return result


# ----------------------------------------------------------------------------------- held-out reading

class SyntheticSegDataset:
    """Held-out (image uint8 [H,W,3], mask int64 [H,W]) pairs read back from the cached shards.

    Reading the shards (not re-rendering) means evaluation sees exactly the JPEG-decoded pixels a
    model sees in training.  ``class_names`` has 'background' first; ``bg_thresh`` is the evaluator's
    background threshold (VOC-like handling: background never gets a text prompt).
    """

    name = "synthetic"

    def __init__(self, cfg: Optional[SyntheticConfig] = None, split: str = "val",
                 cache_dir: Optional[str] = None, bg_thresh: Optional[float] = 0.95,
                 limit: Optional[int] = None):
        if split not in ("val", "test"):
            raise ValueError(f"SyntheticSegDataset: split must be 'val' or 'test' (masks), got {split!r}")
        from PIL import Image
        from .shards import iter_tar_samples
        self.cfg = cfg or SyntheticConfig()
        self.class_names = self.cfg.class_names
        self.bg_thresh = bg_thresh
        self.split = split
        shards = ensure_shards(self.cfg, cache_dir, splits=(split,), verbose=False)[split]
        self.images: List[np.ndarray] = []
        self.masks: List[np.ndarray] = []
        self.captions: List[str] = []
        for shard in shards:
            for key, s in iter_tar_samples(shard):
                if "mask.png" not in s or "jpg" not in s:
                    raise ValueError(f"{shard}:{key}: synthetic eval sample lacks jpg/mask.png, "
                                     f"found {sorted(s)}")
                self.images.append(np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")))
                self.masks.append(np.asarray(Image.open(io.BytesIO(s["mask.png"]))).astype(np.int64))
                self.captions.append(s.get("txt", b"").decode("utf-8"))
                if limit is not None and len(self.images) >= limit:
                    return

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        return self.images[i], self.masks[i]

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        for i in range(len(self)):
            yield self[i]


def iterate_heldout(cfg: Optional[SyntheticConfig] = None, split: str = "val",
                    cache_dir: Optional[str] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    return iter(SyntheticSegDataset(cfg, split, cache_dir))


def save_grid(path: str, cfg: Optional[SyntheticConfig] = None, n: int = 16, split: str = "val",
              scale: int = 3) -> str:
    """PNG grid of ``n`` scenes: image row above a colour-coded mask row, caption-free (for viewing)."""
    from PIL import Image
    cfg = cfg or SyntheticConfig()
    pal = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240], [240, 50, 230]], np.uint8)
    cols = []
    for i in range(n):
        img, mask, _ = render_sample(cfg, split, i)
        cols.append(np.concatenate([img, pal[mask % len(pal)]], 0))
    grid = np.concatenate(cols, 1)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.NEAREST).save(path)
    return path


def main(argv=None) -> int:
    """``python -m groupvit_fast.data.synthetic``: render (and cache) the shards, save a PNG grid."""
    import argparse
    p = argparse.ArgumentParser(
        prog="python -m groupvit_fast.data.synthetic",
        description="Render the embedded synthetic dataset into cached webdataset shards and/or save "
                    "a PNG grid of scenes (images above their colour-coded masks).",
        epilog="example: python -m groupvit_fast.data.synthetic --grid scenes.png --n 16 --no-shards")
    p.add_argument("--cache-dir", default=None, help="default: $GROUPVIT_FAST_CACHE or ~/.cache/groupvit_fast")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--n-train", type=int, default=SyntheticConfig.n_train)
    p.add_argument("--grid", default=None, help="write a PNG grid of the first --n val scenes here")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--no-shards", action="store_true", help="only draw the grid")
    a = p.parse_args(argv)
    cfg = SyntheticConfig(seed=a.seed, image_size=a.image_size, n_train=a.n_train)
    if not a.no_shards:
        out = ensure_shards(cfg, a.cache_dir)
        for split, paths in out.items():
            print(f"{split}: {cfg.n(split)} samples in {len(paths)} shard(s), e.g. {paths[0] if paths else '-'}")
    if a.grid:
        print(f"grid: {save_grid(a.grid, cfg, n=a.n)}")
        for i in range(a.n):
            print(f"  {i:2d}: {render_sample(cfg, 'val', i)[2]}")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
