"""DALI (CPU) and torch fallback loaders: contract, augmentation statistics, resume, rank split and
every kind of bad input on fabricated shards."""
import io
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from groupvit_fast.data.config import DataConfig
from groupvit_fast.data.loader import build_eval_loader, build_train_loader, dali_available
from groupvit_fast.data.shards import ShardWriter
from groupvit_fast.data.synthetic import SyntheticConfig, ensure_shards
from groupvit_fast.data.tokenizer import decode

BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not dali_available(),
                                                                    reason="nvidia-dali not installed"))]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("syncache"))
    cfg = SyntheticConfig(n_train=256, n_val=16, n_test=0, shard_size=64)
    ensure_shards(cfg, cache, verbose=False)
    return cfg, cache


@pytest.fixture(scope="module")
def raw_train(syn):
    """Every train scene's decoded pixels, uint8 [N, H, W, 3], in shard order (decoded once)."""
    from groupvit_fast.data.shards import iter_tar_samples
    return np.stack([np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
                     for p in ensure_shards(syn[0], syn[1], splits=("train",))["train"]
                     for _, s in iter_tar_samples(p)])


def _cfg(syn, backend, **kw):
    cfg, cache = syn
    base = dict(synthetic=cfg, cache_dir=cache, loader=backend, num_threads=1)
    base.update(kw)
    return DataConfig.synthetic_recipe(**base)


def _captions(texts):
    # CLIP's BPE decodes "13" as "1 3" (digits are separate words): compare without spaces
    t = texts[:, 0] if texts.dim() == 3 else texts
    return [decode(row).replace(" ", "") for row in t]


@pytest.mark.parametrize("backend", BACKENDS)
def test_contract_shapes_epoch_and_stats(syn, backend):
    L = build_train_loader(_cfg(syn, backend), batch_size=32, seed=0)
    assert len(L) == 256 // 32
    n = 0
    for images, texts in L:
        assert images.shape == (32, 3, 64, 64) and images.dtype == torch.float32
        assert texts.shape == (32, 4, 77) and texts.dtype == torch.int64
        assert (texts[:, :, 0] == 49406).all()
        n += 1
    assert n == len(L)
    assert L.state_dict()["epoch"] == 1 and L.stats.good == 256 and L.stats.n_skipped == 0
    # K=0: caption tokens only
    L0 = build_train_loader(_cfg(syn, backend, multi_label=0), batch_size=16, seed=0)
    _, texts = next(iter(L0))
    assert texts.shape == (16, 77)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalisation_matches_decoded_pixels(syn, raw_train, backend):
    # no crop/flip/RA/erasing: the loader's output is exactly normalised pixels
    L = build_train_loader(_cfg(syn, backend, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0),
                           batch_size=256, seed=0)
    images, _ = next(iter(L))
    raw = raw_train.astype(np.float64) / 255
    want = (raw.mean((0, 1, 2)) - np.array(L.cfg.mean)) / np.array(L.cfg.std)
    got = images.double().mean((0, 2, 3)).numpy()
    np.testing.assert_allclose(got, want, atol=0.02)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zoom_p_zooms_that_share_of_samples(syn, raw_train, backend):
    # full-image crops pass every scene through unchanged; zoomed ones (a quarter of the area,
    # upscaled 2x) match no scene. The share of unmatched images is zoom_p, drawn per sample
    raw = torch.from_numpy(raw_train).float().div(255).permute(0, 3, 1, 2)  # [N, 3, 64, 64]
    shares = {}
    for zoom_p in (0.0, 0.5, 1.0):
        cfg = _cfg(syn, backend, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0,
                   zoom_p=zoom_p, zoom_crop_scale=(0.25, 0.25))
        images, _ = next(iter(build_train_loader(cfg, batch_size=256, seed=0)))
        pix = images * torch.tensor(cfg.std).view(1, 3, 1, 1) + torch.tensor(cfg.mean).view(1, 3, 1, 1)
        # mean |difference| to the nearest scene, in 0..1 pixel units: [256]
        dist = torch.cdist(pix.flatten(1), raw.flatten(1), p=1).min(1).values / pix[0].numel()
        shares[zoom_p] = (dist > 0.02).float().mean().item()
    assert shares[0.0] == 0.0 and shares[1.0] == 1.0, shares
    assert 0.35 < shares[0.5] < 0.65, shares
    with pytest.raises(ValueError, match="zoom_crop_scale"):
        DataConfig(zoom_crop_scale=(0.5, 0.25))
    with pytest.raises(ValueError, match="zoom_p"):
        DataConfig(zoom_p=1.5)


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_and_torch_agree_in_distribution(syn):
    # the official augmentation (RRC 0.08-1, flip, RandAugment m9, erasing 0.25) on both loaders
    stats = {}
    for backend in ("dali", "torch"):
        cfg = _cfg(syn, backend, crop_scale=(0.08, 1.0), randaugment=True, erasing_p=0.25, num_threads=2)
        L = build_train_loader(cfg, batch_size=64, seed=1)
        x = torch.cat([im for im, _ in L])
        stats[backend] = (x.mean((0, 2, 3)), x.std((0, 2, 3)),
                          (x - x.mean((2, 3), keepdim=True)).abs().mean())
    (m1, s1, c1), (m2, s2, c2) = stats["dali"], stats["torch"]
    assert (m1 - m2).abs().max() < 0.15, (m1, m2)
    assert ((s1 / s2) - 1).abs().max() < 0.15, (s1, s2)
    assert abs(c1 / c2 - 1) < 0.2, (c1, c2)  # within-image contrast: crop scale and RA strength


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_continues_same_order(syn, backend):
    cfg = _cfg(syn, backend, randaugment=False, erasing_p=0.25)

    def take(L, n):
        out = []
        for im, tx in L:
            out.append((im.clone(), tx.clone()))
            if len(out) == n:
                break
        return out

    full = take(build_train_loader(cfg, batch_size=32, seed=3), 5)
    L = build_train_loader(cfg, batch_size=32, seed=3)
    take(L, 2)
    sd = L.state_dict()
    assert sd["position"] == 2 and sd["epoch"] == 0
    L2 = build_train_loader(cfg, batch_size=32, seed=3)
    L2.load_state_dict(sd)
    rest = take(L2, 3)
    for (a, ta), (b, tb) in zip(full[2:], rest):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    # a different seed is a different order
    other = take(build_train_loader(cfg, batch_size=32, seed=4), 1)
    assert not torch.equal(other[0][1], full[0][1])
    # the next epoch is reshuffled
    L3 = build_train_loader(cfg, batch_size=32, seed=3)
    e0 = [_captions(t) for _, t in L3]
    e1 = [_captions(t) for _, t in L3]
    assert e0 != e1 and sorted(sum(e0, [])) != [] and L3.state_dict()["epoch"] == 2
    with pytest.raises(ValueError, match="batch_size"):
        build_train_loader(cfg, batch_size=16, seed=3).load_state_dict(sd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_see_disjoint_samples(syn, backend):
    cfg = _cfg(syn, backend, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0, multi_label=0)
    seen = []
    for rank in range(2):
        L = build_train_loader(cfg, rank=rank, world_size=2, batch_size=32, seed=0)
        assert len(L) == 4
        imgs = torch.cat([im for im, _ in L])
        # identify samples by their (exact) pixels: captions repeat in the synthetic set
        seen.append({hash(im.numpy().tobytes()) for im in imgs})
    assert len(seen[0]) == 128 and len(seen[1]) == 128
    assert not seen[0] & seen[1]


# ------------------------------------------------------------------------------------ bad inputs

def _jpeg(rng, size=32):
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture()
def bad_shards(tmp_path):
    """Three shards of 40 samples with one of each kind of bad input, the last tar truncated."""
    rng = np.random.default_rng(0)
    d = tmp_path / "bad"
    expected_bad = {}
    with ShardWriter(str(d / "s-%03d.tar"), maxcount=40) as w:
        for i in range(120):
            key = f"k{i:05d}"
            s = {"jpg": _jpeg(rng), "txt": f"a photo of item number {i}"}
            if i == 5:
                s["jpg"] = b"\xff\xd8\xff\xe0" + b"garbage" * 20  # corrupt JPEG
                expected_bad[key] = "corrupt_image"
            elif i == 50:
                s["jpg"] = s["jpg"][: len(s["jpg"]) // 2]  # truncated JPEG
                expected_bad[key] = "corrupt_image"
            elif i == 7:
                del s["txt"]
                expected_bad[key] = "missing_caption"
            elif i == 9:
                s["txt"] = ""
                expected_bad[key] = "empty_caption"
            elif i == 11:
                s["txt"] = "  \n "  # whitespace-only: only visible after reading the caption
                expected_bad[key] = "empty_caption"
            elif i == 60:
                s = {"txt": "caption without image", "cls": b"3"}
                expected_bad[key] = "missing_image"
            w.write(key, s)
    last = d / "s-002.tar"
    size = os.path.getsize(last)
    with open(last, "r+b") as f:
        f.truncate(size // 2)  # a tar cut in the middle (a copy interrupted)
    good_caps = {f"aphotoofitemnumber{i}" for i in range(80)
                 if f"k{i:05d}" not in expected_bad}
    return str(d), expected_bad, good_caps


@pytest.mark.parametrize("index", ["scan", "idx"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_are_skipped_counted_and_reported(bad_shards, backend, index, tmp_path):
    d, expected_bad, good_caps = bad_shards
    if index == "idx":
        # the DALI index written with the shard is newer than the truncation: trust it and find the
        # lost samples from offsets beyond the end of the file
        for p in os.listdir(d):
            if p.endswith(".idx"):
                os.utime(os.path.join(d, p))
    else:
        for p in os.listdir(d):
            if p.endswith(".idx"):
                os.remove(os.path.join(d, p))  # no index: the tar is scanned
    cfg = DataConfig(shards=d, loader=backend, image_size=32, crop_scale=(0.5, 1.0), randaugment=False,
                     cache_dir=str(tmp_path / "cache"), num_threads=1)
    L = build_train_loader(cfg, batch_size=8, seed=0)
    seen = set()
    for epoch in range(2):
        for images, texts in L:
            assert images.shape == (8, 3, 32, 32) and torch.isfinite(images).all()
            caps = _captions(texts)
            assert all(c.startswith("aphotoofitemnumber") for c in caps)
            seen.update(caps)
    reported = {b.key: b for b in L.stats.bad}
    for key, kind in expected_bad.items():
        assert key in reported, (key, kind, L.stats.summary())
        assert reported[key].shard.endswith(".tar")
    sk = L.stats.skipped
    assert sk["corrupt_image"] == 2 and sk["empty_caption"] == 2
    assert sk["missing_caption"] == 1 and sk["missing_image"] == 1
    assert sk["truncated_tar"] == 1
    if index == "idx":  # the index knows how many samples the cut removed
        assert sk["truncated_sample"] > 0
    # every good sample of the intact shards was delivered: nothing good was lost
    assert good_caps <= seen, sorted(good_caps - seen)[:5]
    if backend == "dali":
        assert L.stats.pipeline_restarts >= 1  # the corrupt JPEG really hit DALI's decoder
    # counted once per sample, however many epochs met it
    assert sum(1 for b in L.stats.bad if b.key == "k00011") == 1


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_falls_back_to_torch_when_failure_cannot_be_located(bad_shards, tmp_path, monkeypatch):
    from groupvit_fast.data import loader as loader_mod
    d, _, _ = bad_shards
    monkeypatch.setattr(loader_mod.DaliTrainLoader, "_locate_bad_images", lambda self, c: [])
    cfg = DataConfig(shards=d, loader="dali", image_size=32, randaugment=False,
                     cache_dir=str(tmp_path / "cache"), num_threads=1)
    L = build_train_loader(cfg, batch_size=8, seed=0)
    with pytest.warns(UserWarning, match="falls back"):
        n = sum(1 for _ in L)
    assert n == len(L) and L.backend == "dali->torch" and L.stats.skipped["corrupt_image"] >= 1


def test_no_usable_samples_is_one_clear_error(tmp_path):
    with ShardWriter(str(tmp_path / "e-%03d.tar"), maxcount=10) as w:
        for i in range(3):
            w.write(f"k{i}", {"txt": "no image here"})
    with pytest.raises(ValueError, match="no usable samples"):
        build_train_loader(DataConfig(shards=str(tmp_path), loader="torch"), batch_size=2)
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        build_train_loader(DataConfig(shards=str(tmp_path / "nothing-*.tar"), loader="torch"))


def test_config_validation():
    with pytest.raises(ValueError, match="loader"):
        DataConfig(loader="fast")
    with pytest.raises(ValueError, match="crop_scale"):
        DataConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="randaugment_interp"):
        DataConfig(randaugment_interp="cubic")
    d = DataConfig()
    assert (d.image_size, d.crop_scale, d.randaugment, d.erasing_p, d.multi_label) == (224, (0.08, 1.0), True,
                                                                                      0.25, 3)


def test_random_erasing():
    from groupvit_fast.data.transforms import random_erasing_
    x = torch.zeros(64, 3, 32, 32)
    random_erasing_(x, 1.0, torch.Generator().manual_seed(0))
    frac = (x != 0).float().mean((1, 2, 3))
    assert ((frac > 0.015) & (frac < 0.34)).float().mean() > 0.9  # area 0.02-1/3 of the image
    y = torch.zeros(8, 3, 32, 32)
    random_erasing_(y, 0.0)
    assert (y == 0).all()
    z = torch.zeros(400, 1, 16, 16)
    random_erasing_(z, 0.25, torch.Generator().manual_seed(1))
    assert 0.18 < (z != 0).flatten(1).any(1).float().mean() < 0.32


def test_eval_loader(syn):
    cfg, cache = syn
    ev = build_eval_loader(DataConfig(synthetic=cfg, cache_dir=cache, image_size=64, eval_resize_ratio=1.0),
                           batch_size=5)
    batches = list(ev)
    assert len(batches) == len(ev) == 4 and sum(b[0].shape[0] for b in batches) == 16
    assert batches[0][1].shape == (5, 77)


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_eval_pipeline_matches_torch_eval_transform(syn):
    from groupvit_fast.data.loader import build_dali_pipeline, index_shards, write_filtered_indices
    from groupvit_fast.data.shards import DataStats
    cfg, cache = syn
    dc = DataConfig(synthetic=cfg, cache_dir=cache, image_size=56, eval_resize_ratio=64 / 56)
    val = ensure_shards(cfg, cache, splits=("val",))["val"]
    refs = index_shards(val, DataStats())
    paths, idxs = write_filtered_indices(refs, os.path.join(cache, "idx"))
    pipe = build_dali_pipeline(dc, paths, idxs, batch_size=16, shard_id=0, num_shards=1, seed=0,
                               train=False, num_threads=1)
    img, txt, info = pipe.run()
    dali = torch.from_numpy(np.array(img.as_tensor()))
    assert dali.shape == (16, 3, 56, 56)
    # same order as the torch eval loader (no shuffling): centre crops of the same pictures
    ev = torch.cat([b[0] for b in build_eval_loader(dc, val, batch_size=16)])
    assert (dali - ev).abs().mean() < 0.05
