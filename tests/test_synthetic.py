"""The embedded synthetic dataset: scenes, masks, captions, cached shards, held-out split, registry."""
import json
import os
import re

import numpy as np
import pytest

from groupvit_fast.data.synthetic import (ALL_CLASSES, SYNTHETIC_CLASSES, SyntheticConfig, _CLASS_TABLE,
                                          ensure_shards, render_sample, render_scene, save_grid)

COLOUR_WORDS = {"red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "grey",
                "gray", "brown", "cyan", "magenta", "violet", "colored", "coloured"}


def _tiny(**kw):
    base = dict(n_train=64, n_val=24, n_test=8, shard_size=32)
    base.update(kw)
    return SyntheticConfig(**base)


def test_render_types_and_determinism():
    cfg = SyntheticConfig()
    img, mask, cap = render_scene(np.random.default_rng(3), cfg)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert mask.shape == (64, 64) and mask.dtype == np.uint8
    assert mask.max() <= len(cfg.classes) and (mask > 0).any() and (mask == 0).any()
    img2, mask2, cap2 = render_scene(np.random.default_rng(3), cfg)
    assert np.array_equal(img, img2) and np.array_equal(mask, mask2) and cap == cap2
    img3, _, _ = render_sample(SyntheticConfig(seed=1), "train", 0)
    assert not np.array_equal(render_sample(cfg, "train", 0)[0], img3)
    # samples are independent of each other: sample 5 is the same whatever was rendered before
    assert np.array_equal(render_sample(cfg, "val", 5)[1], render_sample(cfg, "val", 5)[1])
    big = SyntheticConfig(image_size=96)
    assert render_sample(big, "train", 0)[0].shape == (96, 96, 3)


def test_captions_name_visible_classes_never_colours():
    cfg = SyntheticConfig(classes=ALL_CLASSES)
    plural_seen = 0
    for i in range(300):
        _, mask, cap = render_sample(cfg, "train", i)
        words = set(re.findall(r"[a-z]+", cap.lower()))
        assert not words & COLOUR_WORDS, cap
        present = {cfg.class_names[c] for c in np.unique(mask) if c}
        named = {n for n in ALL_CLASSES if n in words or _CLASS_TABLE[n][0] in words}
        assert named == present, (cap, present)
        if re.search(r"\b(two|three|four|several) \w+", cap.lower()):
            plural_seen += 1
            for m in re.finditer(r"\b(?:two|three|four|several) (\w+)", cap.lower()):
                assert m.group(1) in {v[0] for v in _CLASS_TABLE.values()}, cap
    assert plural_seen > 10


def test_scene_statistics_make_real_masks():
    cfg = SyntheticConfig()
    n = 300
    fg, multi, class_scenes = [], 0, np.zeros(len(cfg.classes) + 1)
    colour = {c: [] for c in range(1, len(cfg.classes) + 1)}
    for i in range(n):
        img, mask, _ = render_sample(cfg, "train", i)
        fg.append((mask > 0).mean())
        present = [c for c in np.unique(mask) if c]
        multi += len(present) >= 2
        class_scenes[present] += 1
        for c in present:
            px = img[mask == c].reshape(-1, 3).astype(np.float64)
            colour[c].append(px.sum(0) / max(px.sum(), 1))  # chromaticity: hue, not brightness
    assert 0.1 < np.mean(fg) < 0.6  # objects cover several 8x8 patches, background stays
    assert multi / n > 0.3
    assert (class_scenes[1:] / n > 0.1).all()  # every class is common
    # colour is uninformative: per-class mean chromaticities agree (random hue per object;
    # brightness differs by design, through each class's two-tone texture)
    allv = np.concatenate([np.stack(v) for v in colour.values()])
    grand = allv.mean(0)
    for c, v in colour.items():
        v = np.stack(v)
        z = np.abs(v.mean(0) - grand) / (v.std(0) / np.sqrt(len(v)) + 1e-9)
        assert z.max() < 5, (c, v.mean(0), grand, z)  # a colour tied to a class gives z >> 5


def test_occlusion_happens():
    # an object painted later covers part of an earlier one: visible area < drawn area for some
    from groupvit_fast.data import synthetic as S
    cfg = SyntheticConfig(object_count_probs=(0, 0, 1, 0))
    occluded = 0
    for i in range(40):
        rng = S.sample_rng(cfg, "train", i)
        size = cfg.image_size
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        # replay the renderer's first attempt layer by layer
        rng.choice(4, p=np.asarray(cfg.object_count_probs) / 1.0)
        names = [cfg.classes[int(rng.integers(len(cfg.classes)))]]
        for _ in range(2):
            if rng.random() < cfg.repeat_prob:
                names.append(names[int(rng.integers(len(names)))])
            else:
                names.append(cfg.classes[int(rng.integers(len(cfg.classes)))])
        S._background(rng, size)
        layers = [S._object_layer(rng, nm, size, cfg, yy, xx)[0] for nm in names]
        if (layers[0] & (layers[1] | layers[2])).any():
            occluded += 1
    assert occluded >= 5


def test_config_validation():
    with pytest.raises(ValueError, match="unknown class"):
        SyntheticConfig(classes=("circle", "dog"))
    with pytest.raises(ValueError, match="min_size"):
        SyntheticConfig(min_size=0.8, max_size=0.5)
    assert SYNTHETIC_CLASSES[0] == "background" and SyntheticConfig().class_names == SYNTHETIC_CLASSES
    assert SyntheticConfig().config_hash() != SyntheticConfig(seed=1).config_hash()


def test_ensure_shards_writes_once_and_caches(tmp_path):
    cfg = _tiny()
    out = ensure_shards(cfg, str(tmp_path), verbose=False)
    assert [len(out[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    mtimes = {p: os.path.getmtime(p) for ps in out.values() for p in ps}
    again = ensure_shards(cfg, str(tmp_path), verbose=False)
    assert again == out
    assert all(os.path.getmtime(p) == t for p, t in mtimes.items())
    from groupvit_fast.data.shards import iter_tar_samples, shard_sample_count
    assert sum(shard_sample_count(p) for p in out["train"]) == 64
    key, s = next(iter(iter_tar_samples(out["train"][0])))
    assert set(s) == {"jpg", "txt"} and s["jpg"][:2] == b"\xff\xd8"
    key, s = next(iter(iter_tar_samples(out["val"][0])))
    assert set(s) == {"jpg", "txt", "mask.png", "json"}
    assert json.loads(s["json"])["index"] == 0
    # a different config gets its own directory
    other = ensure_shards(_tiny(seed=5), str(tmp_path), splits=("val",), verbose=False)
    assert os.path.dirname(other["val"][0]) != os.path.dirname(out["val"][0])


def test_heldout_split_and_registry(tmp_path):
    from groupvit_fast.data.registry import DATASETS
    entry = DATASETS["synthetic"]
    assert entry.class_names[0] == "background" and entry.background_index == 0
    cfg = _tiny()
    ds = entry.build(root=str(tmp_path), split="val", cfg=cfg)
    assert len(ds) == 24 and ds.class_names == cfg.class_names and ds.bg_thresh is not None
    for i in (0, 7, 23):
        img, mask = ds[i]
        ref_img, ref_mask, ref_cap = render_sample(cfg, "val", i)
        assert np.array_equal(mask, ref_mask)  # PNG masks are lossless
        assert np.abs(img.astype(int) - ref_img).mean() < 6  # JPEG q95, 4:4:4
        assert ds.captions[i] == ref_cap
    pairs = list(iter(ds))
    assert len(pairs) == 24 and pairs[0][1].dtype == np.int64
    with pytest.raises(ValueError, match="split"):
        entry.build(root=str(tmp_path), split="train", cfg=cfg)


def test_segmentation_evaluator_sees_it_like_voc(tmp_path):
    seg = pytest.importorskip("groupvit_fast.seg.datasets")
    ds = seg.build_dataset("synthetic", str(tmp_path), cfg=dict(n_train=8, n_val=6, n_test=2, shard_size=8))
    img, lab = ds[0]
    assert img.shape[:2] == lab.shape and ds.class_names[0] == "background"
    assert ds.bg_thresh is not None


def test_save_grid(tmp_path):
    from PIL import Image
    p = save_grid(str(tmp_path / "g.png"), SyntheticConfig(), n=4, scale=1)
    im = Image.open(p)
    assert im.size == (4 * 64, 2 * 64)


def test_parallel_rendering_is_byte_identical(tmp_path):
    from groupvit_fast.data.synthetic import write_split
    cfg = _tiny(n_val=300, shard_size=1000)
    a = write_split(cfg, "val", str(tmp_path / "a"), workers=1)
    b = write_split(cfg, "val", str(tmp_path / "b"), workers=2)
    assert [open(p, "rb").read() for p in a] == [open(p, "rb").read() for p in b]


def test_cli_grid(tmp_path, capsys):
    from groupvit_fast.data.synthetic import main
    assert main(["--grid", str(tmp_path / "g.png"), "--n", "3", "--no-shards"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "g.png").exists() and out.count("\n") >= 4


def test_named_backgrounds_are_captioned_and_distinct():
    from groupvit_fast.data.prompts import extract_words
    from groupvit_fast.data.synthetic import BACKGROUND_KINDS, _background_named
    cfg = SyntheticConfig(named_backgrounds=True, bg_caption_prob=1.0)
    kinds_seen = set()
    for i in range(60):
        _, mask, cap = render_sample(cfg, "train", i)
        words = set(extract_words(cap))
        bg = words & set(BACKGROUND_KINDS)
        assert len(bg) == 1, cap  # exactly one background noun, and the tagger keeps it
        kinds_seen |= bg
        present = {cfg.class_names[c] for c in np.unique(mask) if c}
        named = {n for n in ALL_CLASSES if n in words or _CLASS_TABLE[n][0] in words}
        assert named == present, cap  # objects are still named exactly
    assert kinds_seen == set(BACKGROUND_KINDS)
    # each kind has its own spatial statistics: fine speckle (sand) vs smooth (fog, water)
    rough = {}
    for kind in BACKGROUND_KINDS:
        imgs = [_background_named(np.random.default_rng(s), 64, kind).mean(-1) for s in range(8)]
        rough[kind] = float(np.mean([np.abs(np.diff(im, axis=1)).mean() for im in imgs]))
    assert rough["sand"] > 3 * max(rough["fog"], rough["water"], rough["clouds"]), rough
    # the option is off by default and then captions keep the anonymous background phrase
    assert not SyntheticConfig().named_backgrounds
    caps = [render_sample(_tiny(bg_caption_prob=1.0), "train", i)[2] for i in range(5)]
    assert all(c.rstrip(".").endswith("background") for c in caps), caps


@pytest.mark.parametrize("named", [False, True])
def test_empty_train_scenes_name_only_the_background(named):
    from groupvit_fast.data.prompts import extract_words
    from groupvit_fast.data.synthetic import BACKGROUND_KINDS
    cfg = SyntheticConfig(named_backgrounds=named, bg_caption_prob=1.0, empty_train_prob=0.25)
    empty = 0
    for i in range(200):
        img, mask, cap = render_sample(cfg, "train", i)
        if mask.any():
            continue
        empty += 1
        words = extract_words(cap)
        # one noun, the background's: the multi-label prompts of such a scene name nothing else
        assert len(words) == 1, cap
        assert (words[0] in BACKGROUND_KINDS) if named else (words[0] == "background"), cap
        assert img.shape == (64, 64, 3) and img.std() > 1  # a real background, not a blank frame
    assert 30 <= empty <= 70, empty  # about a quarter of 200
    # held-out splits keep their objects: the evaluation scenes do not change with the option
    for split in ("val", "test"):
        for i in range(40):
            a, b = render_sample(cfg, split, i), render_sample(
                SyntheticConfig(named_backgrounds=named, bg_caption_prob=1.0), split, i)
            assert b[1].any() and np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    # off by default, and at 0 the cache key (and so every cached shard) is what it was
    assert SyntheticConfig().empty_train_prob == 0
    assert SyntheticConfig(empty_train_prob=0.0).config_hash() == SyntheticConfig().config_hash()
    assert cfg.config_hash() != SyntheticConfig(named_backgrounds=named,
                                                bg_caption_prob=1.0).config_hash()
    with pytest.raises(ValueError, match="empty_train_prob"):
        SyntheticConfig(empty_train_prob=1.0)


def test_zoomed_train_scenes_hold_larger_objects_and_leave_heldout_alone():
    plain, zoomed = SyntheticConfig(), SyntheticConfig(zoom_train_prob=1.0, zoom_train_factor=1.5)
    fg = {"plain": [], "zoomed": []}
    for i in range(120):
        for name, cfg in (("plain", plain), ("zoomed", zoomed)):
            img, mask, cap = render_sample(cfg, "train", i)
            # area of one object's class; 1-class scenes only, so occlusion does not count
            if len(np.unique(mask[mask > 0])) == 1 and not re.search(r"\b(two|three|four)\b", cap):
                fg[name].append((mask > 0).mean())
            if name == "zoomed":
                assert len(np.unique(mask[mask > 0])) <= 2, cap  # at most two objects
                assert mask.any()
    # 1.5x the diameter is ~2.25x the area, less what the frame cuts off
    ratio = np.mean(fg["zoomed"]) / np.mean(fg["plain"])
    assert 1.6 < ratio < 2.4, ratio
    # val and test scenes are the same with or without the option
    for split in ("val", "test"):
        for i in range(30):
            a, b = render_sample(zoomed, split, i), render_sample(plain, split, i)
            assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    # off by default; at 0 the cache key is what it was, whatever the factor
    assert SyntheticConfig(zoom_train_factor=2.0).config_hash() == plain.config_hash()
    assert zoomed.config_hash() != plain.config_hash()
    with pytest.raises(ValueError, match="zoom_train_prob"):
        SyntheticConfig(zoom_train_prob=1.5)
    with pytest.raises(ValueError, match="zoom_train_factor"):
        SyntheticConfig(zoom_train_factor=0.5)
