"""The end of ``make train``: zero-shot segmentation of the embedded data set's held-out split,
shown beside the two non-grouping baselines and a random-init model of the same architecture.

    python -m groupvit_fast.seg.emergence --checkpoint output/default   # a run dir or a .pth

The background threshold of every model is chosen on the *val* split, never on *test*. Writes
``emergence.json`` (all numbers) and ``emergence.png`` (inputs, ground truth, predictions and the
stage-1 / stage-2 group maps) and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


def _row(name: str, res: Dict, names: Sequence[str]) -> List[str]:
    ious = [res["per_class"][c]["IoU"] for c in names]
    fmt = lambda v: "  -  " if v is None else f"{v:5.1f}"  # noqa: E731
    return [name] + [fmt(v) for v in ious] + [fmt(res["mIoU"])]


def format_table(results: Dict[str, Dict], names: Sequence[str]) -> str:
    header = ["model"] + [n[:10] for n in names] + ["mIoU"]
    rows = [header] + [_row(k, v, names) for k, v in results.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def save_grid(path: str, segmenter, dataset, n: int = 8) -> str:
    """Rows: input | ground truth | prediction | stage-1 groups | stage-2 groups (upscaled)."""
    from PIL import Image, ImageDraw
    from .visualize import class_palette, colorize, group_palettes
    names = list(dataset.class_names)
    pal = class_palette(len(names), True)
    n = min(n, len(dataset))
    samples = [dataset[i] for i in range(n)]
    outs = segmenter.predict_batch([s[0] for s in samples], return_groups=True)
    H, W = samples[0][1].shape
    scale = max(1, 96 // max(H, W))
    th, tw = H * scale, W * scale
    cols = ["input", "ground truth", "prediction", "stage-1 groups", "stage-2 groups"]
    gap, title = 4, 16
    width = len(cols) * (tw + gap) + gap
    # legend entries wrap onto as many 18-px lines as the width needs
    spots, x, y = [], gap, 0
    for name in names:
        w = 13 + 7 * len(name) + 10
        if x + w > width and x > gap:
            x, y = gap, y + 18
        spots.append((x, y))
        x += w
    legend_h = y + 18
    canvas = Image.new("RGB", (width, title + n * (th + gap) + legend_h + gap), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for j, c in enumerate(cols):
        d.text((gap + j * (tw + gap), 2), c, fill=(0, 0, 0))
    for i, ((img, mask), out) in enumerate(zip(samples, outs)):
        groups = out.groups or []
        gpals = group_palettes([int(g.max()) + 1 for g in groups]) if groups else []
        tiles = [np.asarray(img), colorize(mask, pal), colorize(out.labels, pal)]
        tiles += [gp[np.asarray(g) % len(gp)] for g, gp in zip(groups, gpals)]
        for j, t in enumerate(tiles[:len(cols)]):
            im = Image.fromarray(t.astype(np.uint8)).resize((tw, th), Image.NEAREST)
            canvas.paste(im, (gap + j * (tw + gap), title + i * (th + gap)))
    top = title + n * (th + gap)
    for k, (name, (x, y)) in enumerate(zip(names, spots)):
        d.rectangle([x, top + y + 3, x + 10, top + y + 13], fill=tuple(int(v) for v in pal[k]))
        d.text((x + 13, top + y + 2), name, fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    canvas.save(tmp, "PNG")
    os.replace(tmp, path)
    return path


BASELINE_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9, 0.95)
#: val images used to choose a baseline's threshold (each candidate is a full pass per image)
BASELINE_VAL_IMAGES = 100


def _select_baseline_thresh(kind, model, text_emb, val, *, img_scale, limit, candidates):
    """Background threshold of a baseline chosen on val, like GroupViT's: every method gets its
    own best threshold, so the comparison is not tilted by a threshold tuned for another."""
    from .baselines import make_segment_fn
    from .evaluate import evaluate_dataset
    scores = {}
    for t in candidates:
        fn = make_segment_fn(kind, model, text_emb, with_bg=True, bg_thresh=t,
                             img_scale=img_scale)
        scores[float(t)] = evaluate_dataset(fn, val, len(val.class_names), limit=limit)["mIoU"]
    best = max(scores, key=lambda t: (scores[t], -t))
    return best, scores


class ErrorBreakdown:
    """Where a model's pixel errors are: object pixels called background, object pixels called
    another class (overall and by the scene's number of object classes: a final group that
    holds two objects can give them only one name), background pixels called an object.
    Label 0 is background, ``ignore`` is left out."""

    def __init__(self, ignore: int = 255):
        self.ignore = ignore
        self.obj = self.obj_bg = self.obj_wrong = self.bg = self.bg_obj = 0
        self.by_classes = {}  # scene's object classes (3 = 3+) -> [wrong-class px, object px]

    def update(self, pred: np.ndarray, mask: np.ndarray):
        pred, mask = np.asarray(pred), np.asarray(mask)
        if pred.shape != mask.shape:
            raise ValueError(f"ErrorBreakdown: prediction {pred.shape} and mask {mask.shape} "
                             f"differ in shape")
        obj = (mask > 0) & (mask != self.ignore)
        bg = mask == 0
        wrong = int((obj & (pred > 0) & (pred != mask)).sum())
        self.obj += int(obj.sum())
        self.obj_bg += int((obj & (pred == 0)).sum())
        self.obj_wrong += wrong
        self.bg += int(bg.sum())
        self.bg_obj += int((bg & (pred > 0)).sum())
        k = min(len(np.unique(mask[obj])), 3)
        if k:
            row = self.by_classes.setdefault(k, [0, 0])
            row[0] += wrong
            row[1] += int(obj.sum())

    def all_reduce(self) -> None:
        """Sum the counts over torch.distributed ranks (each saw its shard), if initialised."""
        from .metrics import all_reduce_sum
        flat = [self.obj, self.obj_bg, self.obj_wrong, self.bg, self.bg_obj]
        for k in (1, 2, 3):
            flat += self.by_classes.get(k, [0, 0])
        v = [int(round(x)) for x in
             all_reduce_sum(torch.tensor(flat, dtype=torch.float64)).tolist()]
        self.obj, self.obj_bg, self.obj_wrong, self.bg, self.bg_obj = v[:5]
        self.by_classes = {k: v[5 + 2 * (k - 1):7 + 2 * (k - 1)] for k in (1, 2, 3)
                           if v[6 + 2 * (k - 1)] > 0}

    def summary(self) -> Dict:
        frac = lambda a, b: a / b if b else float("nan")  # noqa: E731
        return {"object px called background": frac(self.obj_bg, self.obj),
                "object px called another class": frac(self.obj_wrong, self.obj),
                "background px called an object": frac(self.bg_obj, self.bg),
                "object px called another class, by object classes in the scene": {
                    ("3+" if k == 3 else str(k)): frac(a, b)
                    for k, (a, b) in sorted(self.by_classes.items())}}


def emergence_report(model, *, random_model=None, out_dir: Optional[str] = None,
                     dataset: str = "synthetic", dataset_kw: Optional[dict] = None,
                     limit: Optional[int] = None, grid_images: int = 8, log=print,
                     **segmenter_kw) -> Dict:
    """Evaluate ``model`` (and ``random_model``) on the held-out test split with thresholds
    chosen on val; returns the results dict and writes JSON + PNG into ``out_dir``."""
    from .baselines import make_segment_fn
    from .datasets import build_dataset
    from .evaluate import evaluate_dataset, zero_shot_report
    from .metrics import IoUAccumulator
    from .segmenter import ZeroShotSegmenter
    segmenter_kw = {"img_scale": None, "mode": "whole", **segmenter_kw}
    dkw = dict(dataset_kw or {})
    model.eval()
    # where the trained model's errors are, at its val-chosen threshold: counted on the same
    # test predictions that give its IoU (one encoder pass over the test split)
    errors = ErrorBreakdown()
    rep = zero_shot_report(model, dataset, baselines=False, limit=limit, dataset_kw=dkw,
                           observers=[errors], **segmenter_kw)
    results = {"GroupViT (trained)": rep["groupvit"]}
    thresholds = {"GroupViT (trained)": rep["bg_thresh"]}
    val = build_dataset(dataset, None, split="val", **dkw)
    test = build_dataset(dataset, None, split="test", **dkw)
    names = list(test.class_names)
    seg = ZeroShotSegmenter(model, names, bg_thresh=rep["bg_thresh"], **segmenter_kw)
    for kind, label in (("pixelwise", "pixel-wise baseline"), ("kmeans", "K-means baseline")):
        val_limit = BASELINE_VAL_IMAGES if limit is None else min(limit, BASELINE_VAL_IMAGES)
        thr, _ = _select_baseline_thresh(kind, model, seg.text_embedding, val,
                                         img_scale=seg.img_scale, limit=val_limit,
                                         candidates=BASELINE_THRESHOLDS)
        fn = make_segment_fn(kind, model, seg.text_embedding, with_bg=True, bg_thresh=thr,
                             img_scale=seg.img_scale)
        results[label] = evaluate_dataset(fn, test, len(names), limit=limit)
        thresholds[label] = thr
    if random_model is not None:
        random_model.eval()
        rnd = zero_shot_report(random_model, dataset, baselines=False, limit=limit,
                               dataset_kw=dkw, **segmenter_kw)
        results["GroupViT (random init)"] = rnd["groupvit"]
        thresholds["GroupViT (random init)"] = rnd["bg_thresh"]
    # the trivial "everything is background" prediction, for scale
    acc = IoUAccumulator(len(names))
    n = len(test) if limit is None else min(limit, len(test))
    for i in range(n):
        _, mask = test[i]
        acc.update(np.zeros_like(np.asarray(mask)), np.asarray(mask))
    results["all background"] = acc.summary(names)
    table = format_table(results, names)
    best_baseline = max(results["pixel-wise baseline"]["mIoU"], results["K-means baseline"]["mIoU"])
    summary = {
        "dataset": dataset, "split": "test", "images": n, "bg_thresh (chosen on val)": thresholds,
        "img_scale": segmenter_kw["img_scale"],
        "mIoU": {k: v["mIoU"] for k, v in results.items()},
        "margin_over_best_baseline": results["GroupViT (trained)"]["mIoU"] - best_baseline,
        "per_class": {k: v["per_class"] for k, v in results.items()},
        "errors (GroupViT trained)": errors.summary(),
        "table": table,
    }
    log(f"\nZero-shot segmentation, held-out '{dataset}' test split ({n} images; background "
        f"thresholds chosen on val), IoU %:\n{table}")
    e = summary["errors (GroupViT trained)"]
    by = ", ".join(f"{k}: {v:.2f}" for k, v in
                   e["object px called another class, by object classes in the scene"].items())
    log(f"[emergence] trained model's errors: object pixels called background "
        f"{e['object px called background']:.2f}, another class "
        f"{e['object px called another class']:.2f} (by object classes in the scene: {by}); "
        f"background pixels called an object {e['background px called an object']:.2f}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        png = save_grid(os.path.join(out_dir, "emergence.png"), seg, test, n=grid_images)
        summary["picture"] = png
        path = os.path.join(out_dir, "emergence.json")
        with open(path + ".tmp", "w") as f:
            json.dump(summary, f, indent=1, default=str)
        os.replace(path + ".tmp", path)
        log(f"[emergence] picture: {png}\n[emergence] numbers: {path}")
    return summary


def latest_export(run_dir: str) -> str:
    """Newest consolidated export (``<run_dir>/export/*.pth``) of a training run."""
    import glob
    files = sorted(glob.glob(os.path.join(run_dir, "export", "*.pth")), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no exported checkpoint under {run_dir}/export/ (did the "
                                f"training run finish?)")
    return files[-1]


def trained_synthetic_options(cfg) -> Optional[dict]:
    """The ``SyntheticConfig`` fields of a training config dict (``TrainConfig.to_dict()``, which
    our exports carry under ``config``): ``data.options.synthetic``, so the held-out scenes come
    from the generator the run trained on. None for official configs and the default scenes."""
    if not isinstance(cfg, dict):
        return None
    data = cfg.get("data") or {}
    if not isinstance(data, dict) or data.get("dataset") != "synthetic":
        return None
    syn = (data.get("options") or {}).get("synthetic")
    return dict(syn) if isinstance(syn, dict) and syn else None


def short_side_scale(text: str) -> Optional[Tuple[int, int]]:
    """argparse type of ``--img-scale SHORT``: the segmenter's keep-ratio ``img_scale`` (long,
    short) for a short side of SHORT (the long side may reach 4x it), or None for 0 (the scenes'
    own size)."""
    short = int(text)
    if short < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {short}")
    return (4 * short, short) if short else None


#: the segmenter's geometry keys of a recipe's ``monitor.eval_options`` that the emergence step
#: follows, so it segments the held-out scenes as the run's own evaluation does
GEOMETRY_KEYS = ("img_scale", "mode", "crop", "stride")


def recipe_eval_geometry(cfg) -> dict:
    """``img_scale`` / ``mode`` / ``crop`` / ``stride`` of a training config dict's
    ``monitor.eval_options`` (lists become tuples) when that eval is of the embedded scenes
    (``monitor.eval_dataset: synthetic``); {} otherwise: a run evaluated on VOC carries VOC's
    448-px geometry, which would blow the 64-px scenes up sevenfold."""
    if not isinstance(cfg, dict):
        return {}
    monitor = cfg.get("monitor") or {}
    if not isinstance(monitor, dict) or monitor.get("eval_dataset") != "synthetic":
        return {}
    opts = monitor.get("eval_options") or {}
    if not isinstance(opts, dict):
        return {}
    out = {}
    for k in GEOMETRY_KEYS:
        if k in opts:
            v = opts[k]
            out[k] = tuple(v) if isinstance(v, list) else v
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="trained checkpoint (.pth, official layout) or a training run directory "
                        "(its newest export/*.pth is used)")
    p.add_argument("--out", default=None, help="folder for emergence.json / emergence.png "
                                               "(default: the checkpoint's folder)")
    p.add_argument("--limit", type=int, default=None, help="at most this many images per split")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-init comparison model")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--img-scale", type=short_side_scale, default=argparse.SUPPRESS,
                   metavar="SHORT",
                   help="resize the scenes so their short side is SHORT before segmenting (0: "
                        "their own size); default: the run's monitor.eval_options.img_scale")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ..checkpoint import load_checkpoint, read_checkpoint
    from ..config import build_model
    ckpt = latest_export(args.checkpoint) if os.path.isdir(args.checkpoint) else args.checkpoint
    obj = read_checkpoint(ckpt)
    run_cfg = obj.get("config") if isinstance(obj, dict) else None
    syn = trained_synthetic_options(run_cfg)
    geometry = recipe_eval_geometry(run_cfg)
    if "img_scale" in vars(args):  # given: overrides the recipe's, 0 included
        geometry["img_scale"] = args.img_scale
    model = load_checkpoint(obj)
    torch.manual_seed(args.seed)
    # load_checkpoint builds through build_model, which keeps the config: the twin gets the
    # trained model's options too (assign_scale, heads are not in the weights)
    random_model = build_model(model.model_config)
    out = args.out or (args.checkpoint if os.path.isdir(args.checkpoint)
                       else os.path.dirname(os.path.abspath(ckpt)))
    sel = obj.get("selection") if isinstance(obj, dict) else None
    if isinstance(sel, dict) and sel.get("best"):
        b = sel["best"]
        print(f"emergence: the weights of step {b['step']}, selected on val (mIoU "
              f"{b['mIoU']:.2f}) among steps {[r['step'] for r in sel['history']]}", flush=True)
    if syn:
        print(f"emergence: held-out scenes from the run's generator options {syn}", flush=True)
    if geometry.get("img_scale"):
        print(f"emergence: scenes resized to img_scale {geometry['img_scale']} (long, short) "
              f"before segmenting", flush=True)
    emergence_report(model, random_model=random_model, out_dir=out, limit=args.limit,
                     dataset_kw={"cfg": syn} if syn else None, **geometry)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
