"""Build webdataset shards (with DALI index files) for GroupViT training.

Two sources:

* an image folder plus a captions file (CSV or TSV, as distributed for CC3M/CC12M, with or without
  a header) naming, per row, an image file (relative to the folder) and its caption;
* existing shards, e.g. img2dataset output (``key.jpg`` + ``key.txt`` + ``key.json``), re-sharded.

Every image is fully decoded once here (DALI's decoder aborts a whole pipeline on a corrupt image,
so bad files must not reach the shards); images in formats other than JPEG/PNG are re-encoded as
JPEG; captions are stripped and must have at least ``--min-words`` words.  Whatever is dropped is
counted by reason and listed (file/shard + key) on stdout and in ``<out>/make_shards_report.json``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from typing import Dict, Iterator, List, Optional, Tuple

from .shards import IMAGE_EXTS, TEXT_EXTS, DataStats, ShardWriter, expand_shards, iter_tar_samples

EXAMPLES = """examples:
  # CC3M-style: a TSV with a header "image<TAB>caption", images under ./cc3m/images
  python -m groupvit_fast.data.make_shards --images cc3m/images --captions cc3m/train.tsv \\
      --out shards/cc3m --prefix cc3m-train --shard-size 10000

  # headerless CSV: column 0 = caption, column 1 = file name
  python -m groupvit_fast.data.make_shards --images imgs --captions caps.csv --no-header \\
      --caption-column 0 --image-column 1 --out shards/mine

  # CC3M's own TSV (caption<TAB>url, no header), images saved as 000000000.jpg, 000000001.jpg, ...
  python -m groupvit_fast.data.make_shards --images cc3m/images --captions Train_GCC-training.tsv \
      --no-header --caption-column 0 --image-template '{index:09d}.jpg' --out shards/cc3m

  # re-shard img2dataset output, dropping undecodable images and empty captions
  python -m groupvit_fast.data.make_shards --from-shards 'img2dataset_out/*.tar' --out shards/clean

Train on them with DataConfig(shards='shards/cc3m/cc3m-train-{000000..000009}.tar').
"""

_IMAGE_COLS = ("image", "file", "filename", "file_name", "path", "filepath", "image_path", "key", "jpg")
_CAPTION_COLS = ("caption", "text", "title", "txt", "description")


def check_image(data: bytes, max_size: Optional[int] = None) -> Tuple[Optional[bytes], str, str]:
    """(bytes to store or None, ext, reason).  Decodes fully; re-encodes unusual formats as JPEG
    and (with ``max_size``) images whose longer side exceeds it."""
    from PIL import Image
    try:
        img = Image.open(io.BytesIO(data))
        fmt = (img.format or "").upper()
        img.load()
        if img.width < 1 or img.height < 1:
            return None, "", "empty image"
    except Exception as e:
        return None, "", f"undecodable image ({type(e).__name__}: {e})"
    too_big = max_size is not None and max(img.size) > max_size
    if fmt in ("JPEG", "PNG") and not too_big:
        return data, "jpg" if fmt == "JPEG" else "png", ""
    img = img.convert("RGB")
    if too_big:
        scale = max_size / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), "jpg", ""


def check_caption(text, min_words: int) -> Tuple[Optional[str], str]:
    if text is None:
        return None, "missing caption"
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None, "caption is not UTF-8"
    text = " ".join(text.split())
    if not text:
        return None, "empty caption"
    if len(text.split()) < min_words:
        return None, f"caption shorter than {min_words} words"
    return text, ""


def _sniff_delimiter(path: str) -> str:
    if path.endswith((".tsv", ".tab")):
        return "\t"
    if path.endswith(".csv"):
        return ","
    with open(path, newline="", encoding="utf-8") as f:
        head = f.readline()
    return "\t" if head.count("\t") >= head.count(",") else ","


def _column(spec: Optional[str], header: Optional[List[str]], candidates, what: str) -> int:
    if spec is not None and spec.isdigit():
        return int(spec)
    if header is None:
        raise SystemExit(f"make_shards: --{what}-column must be a column index when --no-header is given")
    lower = [h.strip().lower() for h in header]
    if spec is not None:
        if spec.lower() not in lower:
            raise SystemExit(f"make_shards: column {spec!r} not in header {header}")
        return lower.index(spec.lower())
    for c in candidates:
        if c in lower:
            return lower.index(c)
    raise SystemExit(f"make_shards: cannot find the {what} column in header {header}; "
                     f"pass --{what}-column NAME or an index")


def iter_folder_captions(images: str, captions: str, image_column: Optional[str],
                         caption_column: Optional[str], header: bool, stats: DataStats,
                         image_template: Optional[str] = None
                         ) -> Iterator[Tuple[str, str, Optional[bytes], Optional[str]]]:
    """(source, key, image bytes or None, caption or None) per row of the captions file.

    ``image_template`` names the image from the row number instead of a column, for caption files
    without file names (CC3M's ``caption<TAB>url``): e.g. ``{index:09d}.jpg``.
    """
    delim = _sniff_delimiter(captions)
    csv.field_size_limit(10 ** 8)
    with open(captions, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delim)
        head = next(reader) if header else None
        ci = -1 if image_template else _column(image_column, head, _IMAGE_COLS, "image")
        cc = _column(caption_column, head, _CAPTION_COLS, "caption")
        for row_no, row in enumerate(reader):
            if not row:
                continue
            if max(ci, cc) >= len(row):
                stats.add_bad(captions, f"row{row_no}", f"row has {len(row)} columns", "bad_row")
                continue
            rel = image_template.format(index=row_no) if image_template else row[ci].strip()
            path = os.path.join(images, rel)
            data = None
            if os.path.isfile(path):
                with open(path, "rb") as g:
                    data = g.read()
            yield path, rel, data, row[cc]


def iter_shard_samples(spec, stats: DataStats):
    for shard in expand_shards(spec):
        for key, s in iter_tar_samples(shard, stats):
            img = next((s[e] for e in IMAGE_EXTS if e in s), None)
            if img is None:
                for e in ("webp", "bmp", "gif", "tif", "tiff"):
                    if e in s:
                        img = s[e]
                        break
            txt = next((s[e] for e in TEXT_EXTS if e in s), None)
            yield shard, key, img, txt


def _process(item, min_words, max_size):
    src, key, data, text = item
    if data is None:
        return src, key, None, None, None, "missing image"
    cap, why = check_caption(text, min_words)
    if cap is None:
        return src, key, None, None, None, why
    out, ext, why = check_image(data, max_size)
    if out is None:
        return src, key, None, None, None, why
    return src, key, out, ext, cap, ""


def make_shards(items, out_dir: str, prefix: str = "shard", shard_size: int = 10000,
                min_words: int = 1, max_size: Optional[int] = None, workers: int = 1,
                stats: Optional[DataStats] = None, verbose: bool = True) -> dict:
    """Validate ``items`` (source, key, image bytes, caption) and write shards; returns the report."""
    stats = stats or DataStats()
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    args = ((it, min_words, max_size) for it in items)
    if workers > 1:
        import multiprocessing as mp
        pool = mp.get_context("fork").Pool(workers)
        results = pool.imap(_star_process, args, chunksize=64)
    else:
        pool = None
        results = map(_star_process, args)
    n = 0
    try:
        with ShardWriter(pattern, maxcount=shard_size) as w:
            for src, key, data, ext, cap, why in results:
                if data is None:
                    kind = why.split(" (")[0].replace(" ", "_")
                    stats.add_bad(src, key, why, kind)
                    continue
                w.write(f"{n:09d}", {ext: data, "txt": cap,
                                     "json": json.dumps({"source": src, "key": key})})
                stats.good += 1
                n += 1
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    report = dict(out_dir=out_dir, shards=[os.path.basename(p) for p in w.closed_shards],
                  samples_per_shard=w.counts, written=stats.good, dropped=stats.n_skipped,
                  dropped_by_reason=dict(stats.skipped),
                  dropped_samples=[dict(source=b.shard, key=b.key, reason=b.reason) for b in stats.bad])
    tmp = os.path.join(out_dir, "make_shards_report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "make_shards_report.json"))
    if verbose:
        print(f"make_shards: wrote {stats.good} samples in {len(w.closed_shards)} shard(s) to {out_dir}; "
              f"dropped {stats.n_skipped} ({', '.join(f'{k}={v}' for k, v in sorted(stats.skipped.items())) or 'none'})")
        for b in stats.bad[:20]:
            print(f"  dropped {b.shard} [{b.key}]: {b.reason}")
        if len(stats.bad) > 20:
            print(f"  ... {len(stats.bad) - 20} more in make_shards_report.json")
    return report


def _star_process(a):
    return _process(*a)


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m groupvit_fast.data.make_shards",
        description="Build validated webdataset shards (+ DALI .idx files) for GroupViT training "
                    "from an image folder and a CSV/TSV captions file, or re-shard existing shards "
                    "(img2dataset output).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", help="CSV/TSV file with an image-file column and a caption column")
    src.add_argument("--from-shards", help="existing shards: directory, glob or {000..009} pattern")
    p.add_argument("--images", help="folder the captions file's image paths are relative to")
    p.add_argument("--image-column", help="name or 0-based index of the image column (default: auto)")
    p.add_argument("--caption-column", help="name or 0-based index of the caption column (default: auto)")
    p.add_argument("--image-template", default=None,
                   help="image file name from the 0-based row number instead of a column, "
                        "e.g. '{index:09d}.jpg' (CC3M's TSV has only caption and url)")
    p.add_argument("--no-header", action="store_true", help="the captions file has no header row")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--prefix", default="shard", help="shard name prefix (default: shard)")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard (default: 10000)")
    p.add_argument("--min-words", type=int, default=1,
                   help="drop captions with fewer words (the official YFCC converter uses 2)")
    p.add_argument("--max-size", type=int, default=None,
                   help="re-encode images whose longer side exceeds this many pixels")
    p.add_argument("--workers", type=int, default=1, help="processes validating images")
    a = p.parse_args(argv)
    stats = DataStats()
    if a.captions:
        if not a.images:
            p.error("--captions needs --images")
        items = iter_folder_captions(a.images, a.captions, a.image_column, a.caption_column,
                                     not a.no_header, stats, a.image_template)
    else:
        if not expand_shards(a.from_shards):
            p.error(f"--from-shards {a.from_shards!r} matches no files")
        items = iter_shard_samples(a.from_shards, stats)
    report = make_shards(items, a.out, a.prefix, a.shard_size, a.min_words, a.max_size, a.workers, stats)
    return 0 if report["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
