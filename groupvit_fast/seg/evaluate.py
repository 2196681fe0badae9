"""Zero-shot segmentation evaluation with the official protocol (ref §5), no mmseg.

    python -m groupvit_fast.seg.evaluate --dataset voc --data-root VOCdevkit/VOC2012 \\
        --checkpoint CKPT [--out report.json] [--baselines]

Multi-process: launch with torchrun (or any launcher setting RANK/WORLD_SIZE/MASTER_ADDR/PORT);
images are sharded by rank (i % world_size) and the intersect/union sums are all-reduced, so the
result does not depend on the number of processes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, Optional, Sequence

import numpy as np

from .classes import BG_THRESH
from .metrics import IoUAccumulator, format_table


def _dist_info():
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:  # pragma: no cover
        pass
    return 0, 1


def _progress(it, total, enable, desc):
    if not enable:
        return it
    try:
        from tqdm import tqdm
        return tqdm(it, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        return it


def evaluate_dataset(segment_fn, dataset, num_classes: Optional[int] = None, *,
                     class_names: Optional[Sequence[str]] = None, ignore_index: int = 255,
                     images_per_batch: int = 1, rank: Optional[int] = None,
                     world_size: Optional[int] = None, progress: bool = False,
                     limit: Optional[int] = None, desc: str = 'seg eval',
                     observers: Sequence = ()) -> Dict:
    """mIoU of ``segment_fn`` over ``dataset``.

    segment_fn: image uint8 [H,W,3] -> label map [H,W]; or an object with ``predict_batch``
        (e.g. ZeroShotSegmenter), which then gets ``images_per_batch`` images per call.
    dataset: indexable, yields (image, mask); ``class_names`` defaults to dataset.class_names.
    observers: further accumulators with ``update(pred, mask)`` (and optionally
        ``all_reduce()``, called after the loop) that ride the same predictions, so a second
        statistic never costs a second encoder pass over the split.
    Returns the metrics summary: mIoU, mAcc, aAcc (x100), per_class {name: {IoU, Acc}},
    num_images, plus 'iou' (per-class list, x100, None for NaN).
    """
    names = list(class_names) if class_names is not None else list(getattr(dataset, 'class_names', []) or [])
    if num_classes is None:
        if not names:
            raise ValueError('evaluate_dataset: give num_classes or class names')
        num_classes = len(names)
    if not names:
        names = [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f'{len(names)} class names for num_classes={num_classes}')
    r0, w0 = _dist_info()
    rank = r0 if rank is None else rank
    world_size = w0 if world_size is None else world_size
    n = len(dataset) if limit is None else min(limit, len(dataset))
    mine = list(range(rank, n, world_size))
    acc = IoUAccumulator(num_classes, ignore_index)
    batched = hasattr(segment_fn, 'predict_batch')
    step = max(1, images_per_batch) if batched else 1
    t0 = time.perf_counter()
    bar = _progress(range(0, len(mine), step), (len(mine) + step - 1) // step,
                    progress and rank == 0, desc)
    for k in bar:
        idx = mine[k:k + step]
        samples = [dataset[i] for i in idx]
        if batched:
            preds = segment_fn.predict_batch([s[0] for s in samples])
        else:
            preds = [segment_fn(samples[0][0])]
        for (img, mask), pred in zip(samples, preds):
            pred = np.asarray(pred)
            mask = np.asarray(mask)
            if pred.shape != mask.shape:
                raise ValueError(f'prediction shape {pred.shape} != label shape {mask.shape}')
            acc.update(pred, mask)
            for obs in observers:
                obs.update(pred, mask)
    elapsed = time.perf_counter() - t0
    acc.all_reduce()
    for obs in observers:
        if hasattr(obs, 'all_reduce'):
            obs.all_reduce()
    out = acc.summary(names)
    out['iou'] = [out['per_class'][c]['IoU'] for c in names]
    out['seconds'] = elapsed
    return out


DEFAULT_BG_CANDIDATES = (0.05, 0.1, 0.2, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def select_bg_thresh(segmenter, dataset, candidates: Sequence[float] = DEFAULT_BG_CANDIDATES, *,
                     images_per_batch: int = 4, limit: Optional[int] = None,
                     progress: bool = False) -> Dict:
    """Choose the background threshold with the best mIoU on a validation split.

    One encoder pass per image serves every candidate (only the background channel depends on
    the threshold). Sharded and all-reduced like evaluate_dataset. Returns
    {'bg_thresh': best, 'mIoU_by_thresh': {thr: mIoU}}; ties go to the smaller threshold.
    """
    names = list(dataset.class_names)
    rank, world = _dist_info()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    mine = list(range(rank, n, world))
    accs = [IoUAccumulator(len(names)) for _ in candidates]
    step = max(1, images_per_batch)
    for k in _progress(range(0, len(mine), step), (len(mine) + step - 1) // step,
                       progress and rank == 0, 'bg threshold'):
        samples = [dataset[i] for i in mine[k:k + step]]
        preds = segmenter.predict_thresholds([s[0] for s in samples], candidates)
        for acc, per_thr in zip(accs, preds):
            for (_, mask), p in zip(samples, per_thr):
                acc.update(p, mask)
    table = {}
    for t, acc in zip(candidates, accs):
        acc.all_reduce()
        table[float(t)] = acc.summary(names)['mIoU']
    valid = [(v, -t) for t, v in table.items() if v is not None]
    if not valid:
        raise ValueError('select_bg_thresh: no labelled pixels in the validation split')
    best = -max(valid)[1]
    return {'bg_thresh': best, 'mIoU_by_thresh': table}


def zero_shot_report(model, dataset='synthetic', *, data_root=None, test_split: str = 'test',
                     val_split: Optional[str] = 'val', bg_thresh: Optional[float] = None,
                     baselines: bool = True, limit: Optional[int] = None,
                     images_per_batch: int = 4, progress: bool = False,
                     dataset_kw: Optional[dict] = None, observers: Sequence = (),
                     **segmenter_kw) -> Dict:
    """One call for a training job's final evaluation on a registry data set with splits
    (default: the embedded synthetic one): the background threshold is chosen on ``val_split``
    (unless ``bg_thresh`` is given), GroupViT is evaluated on ``test_split`` and, with
    ``baselines``, the pixel-wise and K-means baselines with the same prompts and threshold.

    observers ride GroupViT's test predictions (see evaluate_dataset).
    segmenter_kw go to ZeroShotSegmenter (e.g. img_scale=None, mode='whole' for 64-px scenes).
    Returns {'bg_thresh', 'bg_selection', 'groupvit', 'pixelwise', 'kmeans'} (metric dicts as
    evaluate_dataset returns them).
    """
    from .baselines import make_segment_fn
    from .datasets import build_dataset
    from .segmenter import ZeroShotSegmenter
    dkw = dict(dataset_kw or {})
    if isinstance(dataset, str):
        test = build_dataset(dataset, data_root, split=test_split, **dkw)
    else:
        test = dataset
    names = list(test.class_names)
    out: Dict = {}
    if bg_thresh is None and val_split is not None and isinstance(dataset, str):
        val = build_dataset(dataset, data_root, split=val_split, **dkw)
        probe = ZeroShotSegmenter(model, names, **segmenter_kw)
        sel = select_bg_thresh(probe, val, images_per_batch=images_per_batch, limit=limit,
                               progress=progress)
        bg_thresh = sel['bg_thresh']
        out['bg_selection'] = {'split': val_split, **sel}
    if bg_thresh is None:
        bg_thresh = getattr(test, 'bg_thresh', None) or 0.95
    out['bg_thresh'] = bg_thresh
    seg = ZeroShotSegmenter(model, names, bg_thresh=bg_thresh, **segmenter_kw)
    out['groupvit'] = evaluate_dataset(seg, test, len(names), images_per_batch=images_per_batch,
                                       limit=limit, progress=progress, desc='GroupViT',
                                       observers=observers)
    if baselines:
        for kind in ('pixelwise', 'kmeans'):
            fn = make_segment_fn(kind, model, seg.text_embedding, with_bg=seg.with_bg,
                                 bg_thresh=bg_thresh, img_scale=seg.img_scale)
            out[kind] = evaluate_dataset(fn, test, len(names), limit=limit, progress=progress,
                                         desc=kind)
    return out


# ------------------------------------------------------------------------------------ CLI
def _init_distributed():
    """Join the process group a launcher describes (RANK/WORLD_SIZE/MASTER_*); returns device."""
    import torch
    import torch.distributed as dist
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1 and not dist.is_initialized():
        backend = 'nccl' if torch.cuda.is_available() else 'gloo'
        dist.init_process_group(backend=backend)
    if torch.cuda.is_available():
        local = int(os.environ.get('LOCAL_RANK', '0'))
        torch.cuda.set_device(local % torch.cuda.device_count())
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def load_model(checkpoint: str, device='cpu'):
    """A MultiLabelContrastive with weights from ``checkpoint`` (groupvit_fast.load_checkpoint:
    official .pth, our saves, HF files/directories), in eval mode on ``device``.
    A checkpoint without the text encoder is refused with one clear message."""
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f'checkpoint not found: {checkpoint}')
    from groupvit_fast.checkpoint import (extract_state_dict, load_checkpoint, read_checkpoint,
                                          to_official_state_dict)
    sd, _ = to_official_state_dict(extract_state_dict(read_checkpoint(checkpoint), source=checkpoint),
                                   source=checkpoint)
    missing = [p for p in ('img_encoder.', 'text_encoder.', 'img_projector.', 'text_projector.')
               if not any(k.startswith(p) for k in sd)]
    if missing:
        raise ValueError(f'{checkpoint}: no {", ".join(m[:-1] for m in missing)} weights in this '
                         'checkpoint; zero-shot segmentation needs the full image-text model '
                         '(image and text encoders with both projectors), e.g. the official '
                         'group_vit_gcc_yfcc_30e release')
    del sd
    model = load_checkpoint(checkpoint, map_location='cpu')
    check_text_encoder(model, checkpoint)
    return model.to(device).eval()


def check_text_encoder(model, source: str = 'model') -> None:
    for attr in ('img_encoder', 'img_projector', 'text_encoder', 'text_projector'):
        if getattr(model, attr, None) is None:
            raise ValueError(f'{source}: no {attr} in the loaded model; zero-shot segmentation '
                             'needs the full image-text model (a checkpoint with the text encoder '
                             'and both projectors)')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m groupvit_fast.seg.evaluate',
                                description='Zero-shot semantic segmentation mIoU (official GroupViT protocol)')
    p.add_argument('--dataset', required=True, choices=['voc', 'context', 'coco_object', 'synthetic'])
    p.add_argument('--data-root', default=None, help='dataset folder (VOC2012, VOC2010 or coco root)')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--out', default=None, help='JSON report path (default: seg-<dataset>.json)')
    p.add_argument('--mode', default='slide', choices=['slide', 'whole'])
    p.add_argument('--crop', type=int, default=448)
    p.add_argument('--stride', type=int, default=224)
    p.add_argument('--bg-thresh', default=None,
                   help="background threshold (default: VOC 0.95, Context 0.35, COCO-Object 0.95; "
                        "synthetic: 'auto' = best mIoU on its val split, then evaluate on test); "
                        "'auto' works for any dataset with --val-split")
    p.add_argument('--split', default=None,
                   help="synthetic only: split to evaluate (default 'test')")
    p.add_argument('--val-split', default=None,
                   help="synthetic only: split that chooses the threshold (default 'val')")
    p.add_argument('--short-side', type=int, default=448,
                   help='keep-ratio resize: short side (official 448); 0 keeps the input size')
    p.add_argument('--long-side', type=int, default=2048)
    p.add_argument('--template', default='simple', help="prompt set: 'simple' (official) or 'subset'")
    p.add_argument('--protocol', default='fast', choices=['fast', 'official'])
    p.add_argument('--batch-size', type=int, default=16, help='windows per encoder call (fast protocol)')
    p.add_argument('--images-per-batch', type=int, default=2)
    p.add_argument('--limit', type=int, default=None, help='evaluate only the first N images')
    p.add_argument('--device', default=None)
    p.add_argument('--baselines', action='store_true',
                   help='also evaluate the pixel-wise and K-means baselines')
    p.add_argument('--no-progress', action='store_true')
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from .baselines import make_segment_fn
    from .datasets import build_dataset
    from .segmenter import ZeroShotSegmenter

    device = _init_distributed() if args.device is None else torch.device(args.device)
    rank, world = _dist_info()
    synthetic = args.dataset == 'synthetic'
    if (args.split or args.val_split) and not synthetic:
        raise SystemExit('--split/--val-split apply to --dataset synthetic only')
    split_kw = {'split': args.split or 'test'} if synthetic else {}
    dataset = build_dataset(args.dataset, args.data_root, **split_kw)
    names = list(dataset.class_names)
    bg = args.bg_thresh
    auto = bg == 'auto' or (bg is None and synthetic)
    if bg is None:
        bg = getattr(dataset, 'bg_thresh', None)
        if bg is None:
            bg = BG_THRESH.get(args.dataset, 0.95)
    elif not auto:
        try:
            bg = float(bg)
        except ValueError:
            raise SystemExit(f"--bg-thresh: expected a number or 'auto', got {bg!r}") from None
    img_scale = (args.long_side, args.short_side) if args.short_side > 0 else None
    model = load_model(args.checkpoint, device)
    show = not args.no_progress
    report = {'dataset': args.dataset, 'data_root': args.data_root, 'checkpoint': args.checkpoint,
              'mode': args.mode, 'crop': args.crop, 'stride': args.stride,
              'img_scale': img_scale, 'template': args.template, 'protocol': args.protocol,
              'world_size': world, 'class_names': names}
    if auto:
        if not synthetic:
            raise SystemExit("--bg-thresh auto needs a validation split (--dataset synthetic)")
        val = build_dataset(args.dataset, args.data_root, split=args.val_split or 'val')
        probe = ZeroShotSegmenter(model, names, templates=args.template, mode=args.mode,
                                  crop=args.crop, stride=args.stride, batch_size=args.batch_size,
                                  img_scale=img_scale)
        sel = select_bg_thresh(probe, val, images_per_batch=args.images_per_batch,
                               limit=args.limit, progress=show)
        bg = sel['bg_thresh']
        report['bg_selection'] = {'split': args.val_split or 'val', **sel}
        if rank == 0:
            print(f"background threshold {bg} chosen on the {args.val_split or 'val'} split")
    report['bg_thresh'] = bg
    if synthetic:
        report['split'] = split_kw['split']
    seg = ZeroShotSegmenter(model, names, templates=args.template, bg_thresh=bg, mode=args.mode,
                            crop=args.crop, stride=args.stride, protocol=args.protocol,
                            batch_size=args.batch_size, img_scale=img_scale)
    res = evaluate_dataset(seg, dataset, len(names), images_per_batch=args.images_per_batch,
                           progress=show, limit=args.limit, desc=f'GroupViT {args.dataset}')
    report['groupvit'] = res
    tables = [format_table(res, f'GroupViT zero-shot, {args.dataset} ({args.mode})')]
    if args.baselines:
        for kind in ('pixelwise', 'kmeans'):
            fn = make_segment_fn(kind, model, seg.text_embedding, with_bg=seg.with_bg,
                                 bg_thresh=bg, img_scale=seg.img_scale)
            r = evaluate_dataset(fn, dataset, len(names), progress=show, limit=args.limit,
                                 desc=f'{kind} {args.dataset}')
            report[kind] = r
            tables.append(format_table(r, f'{kind} baseline'))
    if rank == 0:
        print('\n\n'.join(tables))
        if args.baselines:
            print('\nmIoU: ' + ', '.join(f"{k} {report[k]['mIoU']:.2f}" for k in
                                         ('groupvit', 'pixelwise', 'kmeans')
                                         if report[k]['mIoU'] is not None))
        out = args.out or f'seg-{args.dataset}.json'
        tmp = out + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, out)
        print(f'report written to {out}')
    from ..distributed import shutdown
    shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())
