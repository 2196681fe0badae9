"""COCO-Object annotations from COCO-Stuff-164k label PNGs (ref §5.3).

COCO-Stuff PNGs store 0-based COCO category ids minus one (things 0..89 with gaps, stuff 91..181,
255 unlabeled). COCO-Object keeps the 80 thing classes as 1..80 and turns every stuff id and
255 into 0 = background, so the result has no ignore pixels. Ids absent from the table (the
unused COCO ids 11, 25, 28, ...) are left unchanged, as the official converter does; they do
not occur in real COCO-Stuff data.

    python -m groupvit_fast.seg.coco_object COCO_STUFF_ROOT [-o OUT] [--nproc N]

reads COCO_STUFF_ROOT/annotations/{train2017,val2017}/*.png (files containing 'TrainIds' are
skipped) and writes OUT/annotations/<split>/<name>_instanceTrainIds.png; images are copied to
OUT/images when OUT differs from the input root.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
from typing import Optional

import numpy as np

# 0-based COCO thing ids (the 80 used ones, in COCO order) -> 1..80.
_THING_IDS = [i for i in range(90) if i not in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82)]
assert len(_THING_IDS) == 80


def build_lut() -> np.ndarray:
    """uint8 [256] lookup table raw id -> COCO-Object train id."""
    lut = np.arange(256, dtype=np.uint8)
    for tr, cid in enumerate(_THING_IDS):
        lut[cid] = tr + 1
    # stuff (91..181) and 'unlabeled' 255 become background. Like the official table, 90 and
    # 182..254 are not listed and stay unchanged (they never occur in COCO-Stuff).
    lut[91:182] = 0
    lut[255] = 0
    return lut


LUT = build_lut()


def convert_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.dtype != np.uint8:
        if mask.min() < 0 or mask.max() > 255:
            raise ValueError(f'COCO-Stuff label values must lie in 0..255, got '
                             f'{mask.min()}..{mask.max()}')
        mask = mask.astype(np.uint8)
    return LUT[mask]


def out_name(mask_path: str) -> str:
    return os.path.basename(mask_path).split('.')[0] + '_instanceTrainIds.png'


def convert_file(mask_path: str, out_dir: str) -> str:
    from PIL import Image
    with Image.open(mask_path) as im:
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f'{mask_path}: expected a single-channel label PNG, got shape {arr.shape}')
    dst = os.path.join(out_dir, out_name(mask_path))
    tmp = dst + '.tmp.png'
    Image.fromarray(convert_mask(arr)).save(tmp, 'PNG')
    os.replace(tmp, dst)
    return dst


def convert_dataset(coco_path: str, out_dir: Optional[str] = None, nproc: int = 1,
                    splits=('train2017', 'val2017'), progress: bool = True) -> int:
    """Convert every split present; returns the number of masks written."""
    out_dir = out_dir or coco_path
    todo = []
    for split in splits:
        src = os.path.join(coco_path, 'annotations', split)
        if not os.path.isdir(src):
            continue
        files = sorted(f for f in glob.glob(os.path.join(src, '*.png')) if 'TrainIds' not in f)
        dst = os.path.join(out_dir, 'annotations', split)
        os.makedirs(dst, exist_ok=True)
        todo += [(f, dst) for f in files]
    if not todo:
        raise FileNotFoundError(f'no COCO-Stuff label PNGs under {coco_path}/annotations/'
                                f'{{{",".join(splits)}}}/')
    if os.path.abspath(out_dir) != os.path.abspath(coco_path):
        src_img = os.path.join(coco_path, 'images')
        if os.path.isdir(src_img) and not os.path.exists(os.path.join(out_dir, 'images')):
            shutil.copytree(src_img, os.path.join(out_dir, 'images'))
    it = todo
    if nproc > 1:
        from multiprocessing import Pool
        with Pool(nproc) as pool:
            for _ in _progress(pool.imap_unordered(_convert_star, todo, chunksize=16), len(todo), progress):
                pass
    else:
        for f, d in _progress(it, len(todo), progress):
            convert_file(f, d)
    return len(todo)


def _convert_star(args):
    return convert_file(*args)


def _progress(it, total, enable):
    if not enable:
        return it
    try:
        from tqdm import tqdm
        return tqdm(it, total=total, desc='coco-object', file=sys.stderr)
    except ImportError:  # pragma: no cover
        return it


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description='Convert COCO-Stuff-164k annotations to COCO-Object '
                                            '(*_instanceTrainIds.png)')
    p.add_argument('coco_path', help='COCO-Stuff root with images/ and annotations/{train2017,val2017}')
    p.add_argument('-o', '--out-dir', default=None, help='output root (default: in place)')
    p.add_argument('--nproc', type=int, default=1)
    a = p.parse_args(argv)
    n = convert_dataset(a.coco_path, a.out_dir, a.nproc)
    print(f'wrote {n} COCO-Object masks')
    return 0


if __name__ == '__main__':
    sys.exit(main())
