"""Non-grouping zero-shot baselines in the style of the paper's Table 4, needing no training.

The paper labels the output features of a CLIP-trained ViT; here the same recipe is applied to
GroupViT's own *patch* features: the stage-1 image tokens (the last tokens that still map
one-to-one onto patches, taken just before the first GroupingBlock), passed through the final
LayerNorm and the image projector into the joint image-text space.

- ``pixelwise_segment``: every patch is its own group and is classified independently.
- ``kmeans_segment``: K-means (cosine, k-means++ seeding, fixed seed) of the patch features;
  each cluster's mean feature is projected and classified.

Both use the same class scoring as GroupViT's protocol without the top-5 gate (softmax of
logit_scale·cos over the foreground classes) and the same background rule (a unit is background
when its best class probability is below min(bg_thresh, best probability in the image)).
Images go through the same keep-ratio resize (short side 448), as one whole image.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .evaluate import evaluate_dataset  # noqa: F401  (re-exported for the training job)
from .transforms import IMG_SCALE, ImageLike, feat_grid, preprocess

__all__ = ['patch_features', 'pixelwise_segment', 'kmeans_segment', 'evaluate_dataset']


@torch.no_grad()
def patch_features(model, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """x [B,3,h,w] normalised image -> (LayerNorm'd stage-1 patch tokens [B,N,C], grid (hf, wf))."""
    enc = model.img_encoder
    first = enc.layers[0]
    captured = {}
    target = first.downsample if getattr(first, 'downsample', None) is not None else None

    if target is not None:
        def hook(_mod, args, kwargs=None):
            captured['x'] = args[0]
        handle = target.register_forward_pre_hook(hook)
    else:
        def hook(_mod, _args, out):
            captured['x'] = out[0]
        handle = first.register_forward_hook(hook)
    was = model.training
    model.eval()
    try:
        enc(x)
    finally:
        handle.remove()
        model.train(was)
    feats = captured['x']  # [B,N,C]
    if feats.shape[-1] != enc.norm.normalized_shape[0]:
        raise ValueError(f'stage-1 width {feats.shape[-1]} differs from the final width '
                         f'{enc.norm.normalized_shape[0]} (embed_factors != 1): the projector '
                         'cannot embed patch features of this model')
    feats = enc.norm(feats)
    return feats, feat_grid(x.shape[-2], x.shape[-1], feats.shape[1])


def _project(model, feats: torch.Tensor) -> torch.Tensor:
    # [B,L,C] -> [B,L,D], unit norm; the projector's BN runs in eval mode (per-channel affine)
    return F.normalize(model.img_projector(feats), dim=-1)


def _logit_scale(model):
    return model.get_logit_scale() if hasattr(model, 'get_logit_scale') else torch.tensor(100.)


def _unit_scores(model, emb: torch.Tensor, text_emb: torch.Tensor, with_bg: bool,
                 bg_thresh: float) -> torch.Tensor:
    """emb [U,D] unit embeddings -> scores [C,U] (C = 1 + N_fg with background)."""
    t = F.normalize(text_emb.to(emb), dim=-1)
    p = F.softmax(emb @ t.T * _logit_scale(model), dim=-1)  # [U,N]
    if not with_bg:
        return p.T
    best = p.max(dim=-1).values
    thr = min(bg_thresh, best.max().item())
    bg = (best < thr).to(p.dtype)
    return torch.cat([bg[None], p.T], dim=0)


def _to_labels(scores_grid: torch.Tensor, ori: Tuple[int, int]) -> np.ndarray:
    up = F.interpolate(scores_grid[None], size=ori, mode='bilinear', align_corners=False)[0]
    return up.argmax(dim=0).cpu().numpy().astype(np.int64)


@torch.no_grad()
def pixelwise_segment(model, image: ImageLike, text_emb: torch.Tensor, *, with_bg: bool = True,
                      bg_thresh: float = 0.95, img_scale=IMG_SCALE) -> np.ndarray:
    """Label map [H,W]: each patch classified on its own (index 0 = background when with_bg)."""
    dev = next(model.parameters()).device
    x, ori = preprocess(image, img_scale)
    feats, (hf, wf) = patch_features(model, x[None].to(dev))
    emb = _project(model, feats)[0]  # [N,D]
    sc = _unit_scores(model, emb, text_emb, with_bg, bg_thresh)  # [C,N]
    return _to_labels(sc.reshape(-1, hf, wf), ori)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Cosine K-means of rows of x [N,C] with k-means++ seeding; returns assignments [N]."""
    n = x.shape[0]
    k = min(k, n)
    x = F.normalize(x.float(), dim=-1)
    g = torch.Generator(device='cpu').manual_seed(seed)
    idx = [int(torch.randint(n, (1,), generator=g))]
    d = 1 - x @ x[idx[0]]
    for _ in range(1, k):
        w = d.clamp_min(0).cpu()
        if float(w.sum()) <= 0:
            break
        j = int(torch.multinomial(w, 1, generator=g))
        idx.append(j)
        d = torch.minimum(d, 1 - x @ x[j])
    c = x[idx].clone()
    assign = (x @ c.T).argmax(dim=-1)
    for _ in range(iters):
        onehot = F.one_hot(assign, c.shape[0]).to(x.dtype)  # [N,k]
        sums = onehot.T @ x
        keep = onehot.sum(0) > 0
        c = torch.where(keep[:, None], F.normalize(sums, dim=-1), c)
        new = (x @ c.T).argmax(dim=-1)
        if torch.equal(new, assign):
            break
        assign = new
    return assign


@torch.no_grad()
def kmeans_segment(model, image: ImageLike, text_emb: torch.Tensor, *, k: int = 8,
                   iters: int = 20, seed: int = 0, with_bg: bool = True, bg_thresh: float = 0.95,
                   img_scale=IMG_SCALE) -> np.ndarray:
    """Label map [H,W]: K-means of patch features (k = 8, like GroupViT's 8 output groups), each
    cluster labelled by its mean feature's text similarity."""
    dev = next(model.parameters()).device
    x, ori = preprocess(image, img_scale)
    feats, (hf, wf) = patch_features(model, x[None].to(dev))
    f = feats[0]  # [N,C]
    assign = kmeans(f, k, iters, seed)
    used = torch.unique(assign)
    means = torch.stack([f[assign == u].mean(dim=0) for u in used])  # [U,C]
    emb = _project(model, means[None])[0]  # [U,D]
    sc = _unit_scores(model, emb, text_emb, with_bg, bg_thresh)  # [C,U]
    remap = torch.full((int(assign.max()) + 1,), -1, dtype=torch.long, device=assign.device)
    remap[used] = torch.arange(len(used), device=assign.device)
    per_patch = sc[:, remap[assign]]  # [C,N]
    return _to_labels(per_patch.reshape(-1, hf, wf), ori)


def make_segment_fn(kind: str, model, text_emb: torch.Tensor, *, with_bg: bool = True,
                    bg_thresh: float = 0.95, img_scale=IMG_SCALE, **kw):
    """'pixelwise' | 'kmeans' -> segment_fn(image) -> labels, for evaluate_dataset."""
    fn = {'pixelwise': pixelwise_segment, 'kmeans': kmeans_segment}.get(kind)
    if fn is None:
        raise ValueError(f"unknown baseline {kind!r}; expected 'pixelwise' or 'kmeans'")
    return lambda image: fn(model, image, text_emb, with_bg=with_bg, bg_thresh=bg_thresh,
                            img_scale=img_scale, **kw)


def text_embedding_for(segmenter) -> Tuple[torch.Tensor, bool, float, Optional[tuple]]:
    """(text_emb, with_bg, bg_thresh, img_scale) of a ZeroShotSegmenter, to run the baselines
    with exactly the same prompts and thresholds."""
    return segmenter.text_embedding, segmenter.with_bg, segmenter.bg_thresh, segmenter.img_scale
