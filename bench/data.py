"""Loader throughput and peak memory: DALI (cpu, and mixed = nvJPEG when a GPU is present) vs the
plain-PyTorch fallback, per CPU thread count, with the official 224^2 training augmentation
(RandomResizedCrop 0.08-1, flip, RandAugment m9, normalise, random erasing 0.25) and multi-label
prompts (K=3) built from the captions.

    python bench/data.py                      # writes bench/results/data-<device>-fp32-pt<ver>.csv
    python bench/data.py --threads 1 2 --batches 30 --batch-size 64

Input: JPEGs whose longer side is 512 like the official img2dataset shards (upscaled synthetic
scenes, written once and cached); ``--source-size 256`` for small inputs.  Each configuration
runs in a fresh subprocess so peak RSS is its own; ``peak_child_rss_mb`` is the largest child
(DataLoader worker) of the torch loader.  Timing starts after two warm-up batches (pipeline build,
worker start-up, tagger load are excluded and reported separately as ``first_batch_s``).
Wall-clock images/s depend on what else runs on the machine; ``images_per_cpu_s`` (images per
CPU-second of this process, its DALI threads and its live DataLoader workers) is the load-independent
figure: on k otherwise idle cores a loader reaches at most about k times it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def bench_shards(n: int, source_size: int, cache_dir=None) -> str:
    """Folder of shards with ``n`` JPEGs whose longer side is ``source_size`` (the official shards
    are img2dataset output resized to 512, keep-ratio): synthetic 128^2 scenes, upscaled to a
    random aspect ratio between 3:4 and 4:3 and re-encoded at quality 90.  Written once, cached."""
    import io

    import numpy as np
    from PIL import Image

    from groupvit_fast.data.shards import ShardWriter
    from groupvit_fast.data.synthetic import SyntheticConfig, default_cache_dir, render_sample
    out = os.path.join(cache_dir or default_cache_dir(), "bench", f"data-{n}-{source_size}")
    done = os.path.join(out, "DONE")
    if os.path.exists(done):
        return out
    syn = SyntheticConfig(seed=123, image_size=128)
    rng = np.random.default_rng(0)
    with ShardWriter(os.path.join(out, "bench-%06d.tar"), maxcount=512) as w:
        for i in range(n):
            img, _, cap = render_sample(syn, "train", i)
            aspect = rng.uniform(3 / 4, 4 / 3)
            wd, ht = (source_size, round(source_size / aspect)) if aspect >= 1 else \
                (round(source_size * aspect), source_size)
            buf = io.BytesIO()
            Image.fromarray(img).resize((wd, ht), Image.BICUBIC).save(buf, "JPEG", quality=90)
            w.write(f"{i:08d}", {"jpg": buf.getvalue(), "txt": cap})
    open(done, "w").close()
    return out


def run_one(spec: dict) -> dict:
    import torch
    from groupvit_fast.data.config import DataConfig
    from groupvit_fast.data.loader import build_train_loader
    torch.set_num_threads(max(1, spec["threads"]))
    cfg = DataConfig(shards=spec["shards"], cache_dir=spec["cache_dir"], loader=spec["backend"],
                     dali_device=spec.get("dali_device", "auto"), image_size=spec["image_size"],
                     num_threads=spec["threads"], shuffle_buffer=1000, randaugment=spec["randaugment"],
                     randaugment_interp=spec["randaugment_interp"])
    device = "cuda" if spec.get("dali_device") == "mixed" else "cpu"
    import psutil
    proc = psutil.Process()

    def cpu_now():
        # this process (DALI's C++ threads included) plus live DataLoader workers
        tot = sum(proc.cpu_times()[:2])
        for c in proc.children(recursive=True):
            try:
                tot += sum(c.cpu_times()[:2])
            except psutil.Error:
                pass
        return tot

    t0 = time.perf_counter()
    loader = build_train_loader(cfg, batch_size=spec["batch_size"], seed=0, device=device)
    it = iter(loader)
    first = None
    n = 0
    t_start = None
    warm = 2
    for i in range(warm + spec["batches"]):
        try:
            images, texts = next(it)
        except StopIteration:
            it = iter(loader)
            images, texts = next(it)
        if device == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - t0
        if i == warm - 1:
            t_start = time.perf_counter()
            c_start = cpu_now()
        elif i >= warm:
            n += images.shape[0]
    dt = time.perf_counter() - t_start
    cpu = cpu_now() - c_start
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return dict(images_per_s=round(n / dt, 1), cpu_ms_per_image=round(1000 * cpu / n, 2),
                images_per_cpu_s=round(n / cpu, 1), first_batch_s=round(first, 2), n_images=n,
                peak_rss_mb=round(me), peak_child_rss_mb=round(kids), backend_used=loader.backend)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--n-images", type=int, default=2048, help="size of the cached bench shard set")
    p.add_argument("--source-size", type=int, default=512,
                   help="longer side of the stored JPEGs (official img2dataset shards: 512)")
    p.add_argument("--augs", nargs="+", default=["official", "ra-nearest", "no-ra"],
                   choices=["official", "ra-nearest", "no-ra"],
                   help="official: RRC+flip+RandAugment m9 (bilinear)+erasing; ra-nearest: RandAugment's "
                        "geometric ops with nearest interpolation; no-ra: without RandAugment")
    p.add_argument("--loaders", nargs="+", default=None,
                   help="subset of dali-cpu dali-mixed torch (default: all available)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(run_one(json.loads(a.worker))), flush=True)
        return

    import torch
    from groupvit_fast.data.loader import dali_available
    cuda = torch.cuda.is_available()
    loaders = a.loaders or ((["dali-cpu"] + (["dali-mixed"] if cuda else [])) if dali_available() else []) + ["torch"]
    t = time.perf_counter()
    shards = bench_shards(a.n_images, a.source_size, a.cache_dir)
    print(f"bench data ready ({a.n_images} JPEGs, longer side {a.source_size}, "
          f"{time.perf_counter() - t:.1f}s): {shards}", flush=True)

    dev = "gpu" if cuda else "cpu"
    out = a.out or os.path.join(ROOT, "bench", "results",
                                f"data-{dev}-fp32-pt{torch.__version__.split('+')[0]}.csv")
    rows = []
    for aug, name, th in [(g, n, t) for g in a.augs for n in loaders for t in a.threads]:
        if True:
            spec = dict(backend="torch" if name == "torch" else "dali",
                        dali_device={"dali-cpu": "cpu", "dali-mixed": "mixed"}.get(name, "auto"),
                        threads=th, batch_size=a.batch_size, batches=a.batches, image_size=a.image_size,
                        shards=shards, cache_dir=a.cache_dir, randaugment=aug != "no-ra",
                        randaugment_interp="nearest" if aug == "ra-nearest" else "linear")
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                               capture_output=True, text=True)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
            if r.returncode != 0 or not line:
                print(f"{name} threads={th}: FAILED\n{r.stderr[-2000:]}", flush=True)
                continue
            res = json.loads(line[0][7:])
            row = dict(loader=name, threads=th, source_size=a.source_size, image_size=a.image_size,
                       batch_size=a.batch_size,
                       augmentation="rrc0.08+flip+" + {"official": "ra-m9+", "ra-nearest": "ra-m9-nearest+",
                                                        "no-ra": ""}[aug] + "erase0.25",
                       multi_label=3, **res, host_cpus=os.cpu_count(), load_avg_1m=round(os.getloadavg()[0], 2),
                       torch=torch.__version__, python=platform.python_version())
            rows.append(row)
            print(f"{aug:8s} {name:10s} threads={th}: {res['images_per_s']:8.1f} img/s wall, "
                  f"{res['images_per_cpu_s']:7.1f} img per CPU-s  first batch {res['first_batch_s']:5.1f}s"
                  f"  peak RSS {res['peak_rss_mb']} MB (largest child {res['peak_child_rss_mb']} MB)"
                  f"  load {row['load_avg_1m']}", flush=True)
    if rows:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {out}")
        by = {(r["augmentation"], r["loader"], r["threads"]): r for r in rows}
        for (aug, ld, th), d in by.items():
            t = by.get((aug, "torch", th))
            if ld == "dali-cpu" and t is not None:
                print(f"{aug} threads={th}: DALI cpu / torch = {d['images_per_s'] / t['images_per_s']:.2f}x wall, "
                      f"{d['images_per_cpu_s'] / t['images_per_cpu_s']:.2f}x per CPU-second (target >= 1.5x)")


if __name__ == "__main__":
    main()
