#!/usr/bin/env python
"""Training step time and peak memory per rank of a recipe on this machine, for 1..N ranks.

    .venv/bin/python bench/train.py                       # default recipe, 1 and 2 ranks, 60 steps
    .venv/bin/python bench/train.py --ranks 2 --steps 100 --set deepspeed.zero_stage=3

Each run is a real launch (torchrun; one rank = plain python) of train/main.py; the numbers come
from the run's summary.json (mean wall time per optimizer step after the first, peak RSS per rank
on CPU / peak allocated on GPU). Results go to bench/results/train-<device>-<dtype>-pt<torch>.csv.
Timings on a shared machine depend on its load; the load average is recorded next to them."""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(config, ranks, steps, overrides, out_dir):
    args = ["train/main.py", "--config", config, "--set", f"checkpoint.output_dir={out_dir}",
            f"train.max_steps={steps}", "monitor.eval_dataset=None", "monitor.select_last_epochs=0",
            "monitor.progress=false",
            "checkpoint.save_every_steps=0", "checkpoint.export_at_end=false", *overrides]
    cmd = ([sys.executable] + args if ranks == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={ranks}"] + args)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f), " ".join(cmd[1:] if ranks > 1 else cmd[1:])


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--set", nargs="*", default=[], dest="overrides")
    a = p.parse_args()
    import torch
    rows = []
    for r in a.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            s, cmd = run(a.config, r, a.steps, a.overrides, tmp)
        row = dict(config=a.config, ranks=r, steps=s["steps"], global_batch=s["global_batch"],
                   micro_batch=s["micro_batch"], grad_accum=s["grad_accum"],
                   zero_stage=s["zero_stage"], precision=s["precision"], device=s["device"],
                   torch_threads=s["torch_threads"], step_time_s=round(s["step_time_s"], 4),
                   images_per_s=round(s["images_per_s"], 1),
                   peak_mib_per_rank=" ".join(str(m) for m in s["peak_memory_mib_per_rank"]),
                   load_avg_1min=round(os.getloadavg()[0], 2), command=cmd)
        print(json.dumps(row), flush=True)
        rows.append(row)
    dev, dtype = rows[0]["device"], rows[0]["precision"]
    out = os.path.join(ROOT, "bench", "results",
                       f"train-{dev}-{dtype}-pt{torch.__version__.split('+')[0]}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
