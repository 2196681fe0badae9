"""Why a zero-shot segmentation is good or bad: the final groups of a trained model on the
embedded synthetic val split, taken apart.

    python bench/groups_diag.py --checkpoint output/default [--images 200]

Prints (and writes ``groups_diag.json`` beside the checkpoint):

- ``oracle``: mIoU when every final group is labelled with its true majority class (what perfect
  naming of these groups would reach; an upper bound for the protocol);
- ``oracle-bg``: the model's own names for the groups whose majority is an object, with the
  background groups given (naming alone, without the background rule);
- ``naming``: share of object-majority groups that the protocol's class probabilities name right;
- ``fg P / bg P``: median of the protocol's max class probability for object-majority and
  background-majority groups (the background threshold needs bg P well below fg P);
- ``groups``: final groups owning pixels per image; ``pooled top-1``: the pooled embedding's class
  on single-object scenes; the learned logit scales;
- ``oracle stage 1`` / ``stage-1 groups``: the same oracle for the first stage's groups (hard
  maps, each labelled with its patches' true majority class), and how many of them an image uses:
  what the second stage has to merge from;
- ``fg P / bg P (1 object)``: the medians on scenes with a single object class, where the
  background rule has the least excuse; ``fg P (2 classes)`` / ``fg P (3+ classes)``: the object
  groups' median on scenes with more classes (one group holding several objects must share one
  name among them);
- ``owned / unowned groups naming the class (1 object)``: on single-object scenes, the share of
  final groups that own a patch (hard maps) and of those that own none whose projected embedding
  is nearest to the scene's class prompt. Groups that own nothing still enter the official pooled
  embedding, so the image-level losses can be met by them (README, stop 23);
- ``class pairs split (stage 2)`` / ``(stage 1)``: on scenes with two or more object classes,
  the share of pairs of classes whose pixels' majority group differs (a group that holds two
  classes can name only one of them); ``group tokens in use``: how many of the final group
  tokens own a patch in at least 5% of the images, ``group token use``: each token's share of
  images (tokens that never own a patch get no gradient from any group-level loss: README, stop 24).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F


def diagnose(model, n_images: int = 200, dataset_kw=None, img_scale=None):
    from groupvit_fast.seg.datasets import build_dataset
    from groupvit_fast.seg.metrics import IoUAccumulator
    from groupvit_fast.seg.segmenter import ZeroShotSegmenter
    from groupvit_fast.seg.transforms import feat_grid
    val = build_dataset("synthetic", None, split="val", **(dataset_kw or {}))
    names = list(val.class_names)
    C = len(names)
    seg = ZeroShotSegmenter(model, names, img_scale=img_scale, mode="whole")
    oracle, oracle_bg = IoUAccumulator(C), IoUAccumulator(C)
    fgP, bgP, named, n_fg_groups, used = [], [], 0, 0, []
    fgP1, bgP1, used1 = [], [], []
    fgP_by_k = {2: [], 3: []}  # object groups' max probability, scenes of 2 / 3+ classes
    owned_ok, owned_n, unowned_ok, unowned_n = 0, 0, 0, 0
    oracle1 = IoUAccumulator(C)
    pairs = split2 = split1 = 0
    token_use = None
    pooled_ok = pooled_n = 0
    n = min(n_images, len(val))
    samples = [val[i] for i in range(n)]
    model.eval()
    with torch.no_grad():
        for c0 in range(0, n, 50):
            chunk = samples[c0:c0 + 50]
            xs = [seg.preprocess(s[0])[0] for s in chunk]
            per_image = seg._fast_encode(xs)
            # one pass for the pooled embedding and the stage-1 hard maps
            enc = model.encode_image(torch.stack(xs), return_feat=True, return_attn=True,
                                     as_dict=True)
            pooled = F.normalize(enc["image_x"], dim=-1)
            pooled_cls = (pooled @ seg.text_embedding.T).argmax(-1) + 1
            group_cls = (F.normalize(enc["image_feat"], dim=-1) @ seg.text_embedding.T
                         ).argmax(-1) + 1  # [B,G]
            owns = model.owned_groups(enc["attn_dicts"])  # [B,G]
            token_use = owns.float().sum(0) + (0 if token_use is None else token_use)  # [G]
            first = enc["attn_dicts"][0]["hard"][:, 0]  # [B,1,G1,N] -> [B,G1,N]
            for (img, mask), x, wins, pc, h1, gc, ow in zip(chunk, xs, per_image, pooled_cls,
                                                            first, group_cls, owns):
                mask = np.asarray(mask).astype(np.int64)
                classes = set(np.unique(mask).tolist()) - {0}
                single = len(classes) == 1
                (_, gidx, P) = wins[0]
                g = to_mask(gidx, mask.shape)
                Pm = P.cpu().numpy()  # [G,N_fg]
                pred_or, majority = majority_labels(g, mask, C)
                pred_obg = np.zeros_like(mask)
                gs = np.unique(g)
                used.append(len(gs))
                # stage-1 groups on the encoder's token grid
                gh, gw = feat_grid(*x.shape[-2:], h1.shape[-1])
                g1 = to_mask(h1.argmax(0).reshape(gh, gw), mask.shape)
                used1.append(len(np.unique(g1)))
                oracle1.update(majority_labels(g1, mask, C)[0], mask)
                if len(classes) > 1:
                    k2, d2 = class_pair_split(g, mask)
                    d1 = class_pair_split(g1, mask)[1]
                    pairs, split2, split1 = pairs + k2, split2 + d2, split1 + d1
                for k in gs:
                    sel = g == k
                    maj = majority[k]
                    best = float(Pm[k].max())
                    if maj > 0:
                        n_fg_groups += 1
                        guess = int(Pm[k].argmax()) + 1
                        named += guess == maj
                        pred_obg[sel] = guess
                        fgP.append(best)
                        if single:
                            fgP1.append(best)
                        else:
                            fgP_by_k[min(len(classes), 3)].append(best)
                    else:
                        bgP.append(best)
                        if single:
                            bgP1.append(best)
                oracle.update(pred_or, mask)
                oracle_bg.update(pred_obg, mask)
                if single:
                    pooled_n += 1
                    pooled_ok += int(pc) in classes
                    right = np.isin(gc.cpu().numpy(), list(classes))
                    ow = ow.cpu().numpy()
                    owned_ok += int(right[ow].sum())
                    owned_n += int(ow.sum())
                    unowned_ok += int(right[~ow].sum())
                    unowned_n += int((~ow).sum())
    med = lambda v: float(np.median(v)) if v else float("nan")  # noqa: E731
    out = {
        "images": n,
        "oracle": oracle.summary(names)["mIoU"],
        "oracle-bg": oracle_bg.summary(names)["mIoU"],
        "naming": named / max(n_fg_groups, 1),
        "fg P": med(fgP), "bg P": med(bgP),
        "groups": float(np.mean(used)),
        "oracle stage 1": oracle1.summary(names)["mIoU"],
        "stage-1 groups": float(np.mean(used1)),
        "fg P (1 object)": med(fgP1), "bg P (1 object)": med(bgP1),
        "fg P (2 classes)": med(fgP_by_k[2]), "fg P (3+ classes)": med(fgP_by_k[3]),
        "owned groups naming the class (1 object)": owned_ok / max(owned_n, 1),
        "unowned groups naming the class (1 object)":
            unowned_ok / unowned_n if unowned_n else float("nan"),
        "pooled top-1 (single-object scenes)": pooled_ok / max(pooled_n, 1),
        "class pairs split (stage 2)": split2 / pairs if pairs else float("nan"),
        "class pairs split (stage 1)": split1 / pairs if pairs else float("nan"),
        "group tokens in use": int(((token_use / n) >= 0.05).sum()),
        "group token use": [round(float(u) / n, 3) for u in token_use],
        "logit_scale": float(model.get_logit_scale().detach()),
        "multi_label_logit_scale": float(model.get_multi_label_logit_scale().detach())
        if model.with_multi_label else None,
    }
    t = seg.text_embedding
    out["class prompt cosine (max off-diagonal)"] = float(
        (t @ t.T - 2 * torch.eye(len(t))).max())
    return out


def class_pair_split(g: np.ndarray, mask: np.ndarray):
    """(pairs, split): the pairs of object classes in ``mask`` (0 = background) and how many of
    them have different majority groups in the group map ``g`` (same shape)."""
    classes = sorted(set(np.unique(mask).tolist()) - {0})
    major = [np.bincount(g[mask == c].ravel()).argmax() for c in classes]
    n = len(classes)
    pairs = n * (n - 1) // 2
    split = sum(major[i] != major[j] for i in range(n) for j in range(i + 1, n))
    return pairs, int(split)


def to_mask(gmap: torch.Tensor, shape) -> np.ndarray:
    """Group index map [h,w] at the mask's size (nearest)."""
    if tuple(gmap.shape) != tuple(shape):
        gmap = F.interpolate(gmap[None, None].float(), size=shape, mode="nearest")[0, 0]
    return gmap.long().cpu().numpy()


def majority_labels(g: np.ndarray, mask: np.ndarray, n_classes: int):
    """Every group of the index map g labelled with its pixels' true majority class: (label map
    like mask, {group: class})."""
    pred, majority = np.zeros_like(mask), {}
    for k in np.unique(g):
        sel = g == k
        majority[k] = int(np.bincount(mask[sel], minlength=n_classes).argmax())
        pred[sel] = majority[k]
    return pred, majority


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a .pth or a training run directory")
    p.add_argument("--images", type=int, default=200)
    from groupvit_fast.seg.emergence import (latest_export, short_side_scale,
                                             trained_synthetic_options)
    p.add_argument("--img-scale", type=short_side_scale, default=None, metavar="SHORT",
                   help="resize the scenes so their short side is SHORT first (0: own size)")
    args = p.parse_args(argv)
    from groupvit_fast.checkpoint import load_checkpoint, read_checkpoint
    ckpt = latest_export(args.checkpoint) if os.path.isdir(args.checkpoint) else args.checkpoint
    obj = read_checkpoint(ckpt)
    syn = trained_synthetic_options(obj.get("config") if isinstance(obj, dict) else None)
    model = load_checkpoint(obj)
    scale = args.img_scale
    res = diagnose(model, args.images, {"cfg": syn} if syn else None, img_scale=scale)
    for k, v in res.items():
        print(f"{k:40s} {v if not isinstance(v, float) else round(v, 4)}")
    out = os.path.join(os.path.dirname(os.path.abspath(ckpt)),
                       f"groups_diag_s{scale[1]}.json" if scale else "groups_diag.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
