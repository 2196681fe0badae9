"""``groupvit-seg``: zero-shot segmentation of image files into free-text classes.

    groupvit-seg IMAGE... --classes cat,dog,grass --checkpoint CKPT --out DIR

writes DIR/<image stem>.png: the input, the prediction overlay with a legend of class colours,
and the stage-1/stage-2 group maps. ``--vis MODE...`` also writes the official single views
(input, pred, input_pred, input_pred_label, all_groups, first_group, final_group) as
DIR/<stem>_<mode>.png. A 'background' class is added and filled by the threshold rule unless
``--no-background``; inference uses the official demo's 'whole' mode unless ``--mode slide``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from .visualize import VIS_MODES


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def parse_classes(spec: str) -> List[str]:
    names = [c.strip() for c in (spec or '').split(',')]
    names = [c for c in names if c]
    if not names:
        raise CLIError(f'--classes: no class names in {spec!r}; give a comma-separated list '
                       'such as --classes cat,dog,grass')
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:
        raise CLIError(f'--classes: duplicated class names {dup}')
    if 'background' in names:
        raise CLIError("--classes: 'background' is added automatically (threshold rule); "
                       'use --no-background to segment into the listed classes only')
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='groupvit-seg', description=__doc__.split('\n\n')[0])
    p.add_argument('images', nargs='+', metavar='IMAGE')
    p.add_argument('--classes', required=True, help='comma-separated class names')
    p.add_argument('--checkpoint', required=True)
    p.add_argument('--out', required=True, help='output folder')
    p.add_argument('--bg-thresh', type=float, default=0.95)
    p.add_argument('--no-background', action='store_true')
    p.add_argument('--mode', default='whole', choices=['whole', 'slide'])
    p.add_argument('--template', default='simple')
    p.add_argument('--vis', nargs='*', default=[], choices=VIS_MODES,
                   help='extra official visualisation modes to write')
    p.add_argument('--device', default=None)
    return p


def run(model, images: Sequence[str], classes: Sequence[str], out_dir: str, *,
        with_bg: bool = True, bg_thresh: float = 0.95, mode: str = 'whole',
        template='simple', vis: Sequence[str] = (), text_embedding=None,
        img_scale=None, crop=448, stride=224) -> List[str]:
    """Segment ``images`` with ``model`` and write pictures; returns the written paths."""
    from .segmenter import ZeroShotSegmenter
    from .transforms import IMG_SCALE, load_image
    from .visualize import render_panel, save_vis
    if not classes:
        raise CLIError('no class names given')
    arrays = []
    for path in images:  # read everything first: one clear error before any work is done
        try:
            arrays.append(load_image(path))
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(str(e)) from None
    names = (['background'] if with_bg else []) + list(classes)
    seg = ZeroShotSegmenter(model, names, templates=template, bg_thresh=bg_thresh, mode=mode,
                            text_embedding=text_embedding, crop=crop, stride=stride,
                            img_scale=img_scale or IMG_SCALE)
    num_groups = list(getattr(model.img_encoder, 'num_output_groups', []) or []) or None
    os.makedirs(out_dir, exist_ok=True)
    written, stems = [], {}
    for path, arr in zip(images, arrays):
        stem = os.path.splitext(os.path.basename(path))[0]
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:  # two inputs with the same name from different folders
            stem = f'{stem}_{stems[stem] - 1}'
        res = seg.predict(arr, return_groups=True)
        panel = render_panel(arr, res.labels, names, res.groups, with_bg=with_bg,
                             num_groups=num_groups)
        out = os.path.join(out_dir, f'{stem}.png')
        tmp = out + '.tmp.png'
        panel.save(tmp, 'PNG')
        os.replace(tmp, out)
        written.append(out)
        for m in vis:
            written += save_vis(os.path.join(out_dir, f'{stem}_{m}.png'), m, arr, res.labels,
                                names, with_bg, res.groups, num_groups)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        classes = parse_classes(args.classes)
        for path in args.images:
            if not os.path.isfile(path):
                raise CLIError(f'image file not found: {path}')
        import torch
        from .evaluate import load_model
        device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
        try:
            model = load_model(args.checkpoint, device)
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(str(e)) from None
        written = run(model, args.images, classes, args.out, with_bg=not args.no_background,
                      bg_thresh=args.bg_thresh, mode=args.mode, template=args.template,
                      vis=args.vis)
    except CLIError as e:
        print(f'groupvit-seg: error: {e}', file=sys.stderr)
        return 2
    for w in written:
        print(w)
    return 0


if __name__ == '__main__':
    sys.exit(main())
