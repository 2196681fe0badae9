"""Pixel-wise and K-means zero-shot baselines (paper Table 4 style) and evaluate_dataset."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from groupvit_fast.seg import baselines
from groupvit_fast.seg.datasets import ArrayDataset
from groupvit_fast.seg.transforms import preprocess
from test_seg_common import blocky_image, model  # noqa: F401


def _patch_embeddings(model, im):
    x, _ = preprocess(im, None)
    feats, grid = baselines.patch_features(model, x[None])
    with torch.no_grad():
        return F.normalize(model.img_projector(feats), dim=-1)[0], grid


def test_patch_features_are_stage1_tokens(model):
    im = blocky_image(np.random.RandomState(0), 64, 96)
    x, _ = preprocess(im, None)
    feats, grid = baselines.patch_features(model, x[None])
    assert grid == (4, 6) and feats.shape == (1, 24, 32)
    # LayerNorm'd: zero mean / unit variance per token before the affine (weights are 1, 0)
    torch.testing.assert_close(feats.mean(-1), torch.zeros(1, 24), atol=1e-5, rtol=0)
    assert not model.training


def test_pixelwise_labels_each_patch_by_its_own_embedding(model):
    im = blocky_image(np.random.RandomState(1), 64, 64)
    emb, (hf, wf) = _patch_embeddings(model, im)
    picks = [0, 5, 10, 15]  # patches (0,0), (1,1), (2,2), (3,3)
    text = emb[picks]
    lab = baselines.pixelwise_segment(model, im, text, with_bg=False, img_scale=None)
    assert lab.shape == (64, 64)
    for c, p in enumerate(picks):
        r, q = divmod(p, wf)
        # at the patch centre the upsampled score is ~ the patch's own: its class wins
        assert lab[r * 16 + 8, q * 16 + 8] == c
    # with background: the unit with the highest confidence is never background
    lab_bg = baselines.pixelwise_segment(model, im, text, with_bg=True, bg_thresh=0.99,
                                         img_scale=None)
    assert lab_bg.max() <= 4 and (lab_bg > 0).any()


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 16, generator=g), dim=-1) * 10
    x = torch.cat([c + 0.1 * torch.randn(20, 16, generator=g) for c in centres])
    a = baselines.kmeans(x, 3, seed=0)
    truth = torch.arange(3).repeat_interleave(20)
    # same partition up to relabelling
    for k in range(3):
        assert len(torch.unique(a[truth == k])) == 1
    assert len(torch.unique(a)) == 3


def test_kmeans_segment_is_piecewise_constant_per_cluster(model):
    im = blocky_image(np.random.RandomState(2), 64, 80)
    emb, _ = _patch_embeddings(model, im)
    text = emb[[0, 7, 13]]
    lab = baselines.kmeans_segment(model, im, text, k=4, with_bg=True, bg_thresh=0.95,
                                   img_scale=None)
    assert lab.shape == (64, 80) and lab.min() >= 0 and lab.max() <= 3
    assert len(np.unique(lab)) >= 2
    # deterministic with the same seed
    np.testing.assert_array_equal(lab, baselines.kmeans_segment(
        model, im, text, k=4, with_bg=True, bg_thresh=0.95, img_scale=None))


def test_evaluate_dataset_with_baseline_fn(model):
    rng = np.random.RandomState(3)
    ims = [blocky_image(rng, 48, 64) for _ in range(3)]
    emb, _ = _patch_embeddings(model, ims[0])
    fn = baselines.make_segment_fn('pixelwise', model, emb[[0, 9]], with_bg=True, img_scale=None)
    preds = [fn(im) for im in ims]
    ds = ArrayDataset([(im, p) for im, p in zip(ims, preds)], ['background', 'u', 'v'])
    r = baselines.evaluate_dataset(fn, ds, 3)
    assert r['num_images'] == 3
    present = {int(c) for p in preds for c in np.unique(p)}
    assert all(r['per_class'][n]['IoU'] == pytest.approx(100.0)
               for i, n in enumerate(['background', 'u', 'v']) if i in present)
    with pytest.raises(ValueError, match='baseline'):
        baselines.make_segment_fn('spectral', model, emb[:2])
