"""Full-model benchmark: training step (forward + backward + AdamW) and inference throughput and
peak memory of GroupViT (MultiLabelContrastive, release config by default), for every
available attention backend and precision, against the eager reference in the same run.

    python bench/model.py                       # batch 8 at 224, fp32 + bf16, CPU: ~4-5 min
    python bench/model.py --dtypes bf16 --reps 5 --batch 16
    python bench/model.py --compile             # adds a torch.compile'd fast config (slow start)

Configurations (same weights, same inputs):

* ``reference``: the eager reference -- ``math`` attention, no text truncation, grouping op
  forced to the plain-torch reference (GROUPVIT_FAST_BACKEND=reference), same autocast.
* ``fast-<attn>``: attention backend <attn> (sdpa / xformers / math), text truncated to the
  batch's last EOT, default grouping backend.
* ``fast-sdpa+ckpt``: the same with activation checkpointing (``use_checkpoint``) per block.

Timing: one warm-up, then ``--reps`` rounds in which every configuration runs once
(interleaved, so a neighbour's load hits all configurations alike); the median is reported.
On CPU the headline numbers use effective time = process CPU time / threads (robust to
neighbours sharing the cores); wall-clock times and speed-ups are in the CSV as well.

Peak memory: a fresh subprocess per configuration. On CPU, glibc is told to mmap every
allocation >= 64 KiB (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once;
after a warm-up step (AdamW state exists) the kernel's RSS high-water mark is reset
(/proc/self/clear_refs = 5) and the step's peak RSS above the resident weights + optimizer state
is reported (gradients are allocated inside the step, so they count). On CUDA:
max_memory_allocated above memory_allocated at the same point.

FLOPs (forward, FlopCounter convention 2 x MACs; ref §1.8): image 7.94 GFLOPs at 224
(scaled by FlopCounterMode for other sizes), text 1.53 GFLOPs per 77-token caption, scaled by
the processed length (L/77); training = 3 x forward. The reference is charged for the 77 tokens
it processes, the fast path for the truncated length. "frac_peak" is achieved FLOP/s over the
best torch.mm FLOP/s of the same dtype measured in the same run; on CUDA "mfu" divides by the
datasheet dense peak of the GPU when known.

CSV: bench/results/model-<device>-<dtypes>-pt<torch version>.csv
"""
from __future__ import annotations

import argparse
import copy
import csv
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from groupvit_fast.config import ModelConfig, build_model  # noqa: E402
from groupvit_fast.ops.attention import (attention_backend,  # noqa: E402
                                         available_attention_backends)

IMG_GFLOPS_224 = 7.94
TEXT_GFLOPS_77 = 1.53
CONTEXT = 77
SOT, EOT = 49406, 49407
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# dense tensor-core peaks from NVIDIA datasheets (TFLOP/s), for MFU on a GPU
GPU_PEAKS = {"H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
             "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
             "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}}


# ----------------------------------------------------------------------------------------------
# inputs and models

def make_inputs(batch, img_size, multi_label, device, seed=0):
    """Images and token ids shaped like training: captions of 8-30 tokens, prompt sentences
    ('a photo of a {noun}.') of 6-10 tokens, zero padded to 77."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, 3, img_size, img_size, generator=g)
    text = torch.zeros(batch, 1 + multi_label, CONTEXT, dtype=torch.long)
    for b in range(batch):
        for j in range(1 + multi_label):
            lo, hi = (8, 30) if j == 0 else (6, 10)
            n = int(torch.randint(lo, hi + 1, (1,), generator=g))  # EOT position
            text[b, j, 0] = SOT
            text[b, j, 1:n] = torch.randint(1, SOT - 1, (n - 1,), generator=g)
            text[b, j, n] = EOT
    return img.to(device), text.to(device)


def build(cfg: ModelConfig, kind: str, attn: str, state, device, use_checkpoint=False):
    cfg = copy.deepcopy(cfg)
    cfg.img.use_checkpoint = use_checkpoint
    cfg.text.use_checkpoint = use_checkpoint
    torch.manual_seed(0)
    model = build_model(cfg)
    if state is not None:
        model.load_state_dict(state)
    model.text_encoder.truncate_to_eot = kind != "reference"
    model.to(device)
    # official optimizer: AdamW, wd 0.05 (param groups do not change the cost)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.05)
    return model, opt


class Runner:
    """One configuration: model, optimizer, attention backend, grouping backend, autocast."""

    def __init__(self, name, kind, attn, model, opt, amp_dtype, device, compiled=False):
        self.name, self.kind, self.attn = name, kind, attn
        self.model, self.opt = model, opt
        self.amp_dtype, self.device = amp_dtype, device
        self.compiled = compiled

    def _ctx(self):
        return attention_backend(self.attn)

    def _env(self):
        if self.kind == "reference":
            os.environ["GROUPVIT_FAST_BACKEND"] = "reference"
        else:
            os.environ.pop("GROUPVIT_FAST_BACKEND", None)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def train_step(self, img, text):
        self._env()
        self.model.train()
        with self._ctx():
            with self._autocast():
                losses = self.model(img, text)
                loss = sum(v for k, v in losses.items() if "loss" in k)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return loss.detach()

    @torch.no_grad()
    def infer(self, img, text):
        self._env()
        self.model.eval()
        with self._ctx(), self._autocast():
            return self.model.encode_image(img), self.model.encode_text(text[:, 0])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(wall seconds, effective seconds). On CPU the effective time is the process CPU time
    divided by the thread count: what the call costs on dedicated cores, which stays
    meaningful when neighbours load the machine (descheduled time is not counted; spin-waits
    still are). On CUDA both are the synchronised wall time."""
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    wall = time.perf_counter() - t
    if device.type == "cuda":
        return wall, wall
    return wall, (time.process_time() - c) / torch.get_num_threads()


# ----------------------------------------------------------------------------------------------
# FLOPs and peaks

def _count_gflops(module, *inputs):
    from torch.utils.flop_counter import FlopCounterMode
    fc = FlopCounterMode(display=False)
    with fc, torch.no_grad():
        module.eval()(*inputs)
    return fc.get_total_flops() / 1e9


def model_gflops(cfg: ModelConfig):
    """Forward GFLOPs of one image and of one 77-token text: the reference anchors (7.94,
    1.53) for the release encoders, the image anchor scaled by FlopCounterMode at other
    resolutions, and plain FlopCounterMode counts for other configurations."""
    from groupvit_fast.models import GroupViT, TextTransformer
    release = ModelConfig()
    img_release = {k: v for k, v in vars(cfg.img).items() if k != "img_size"} == \
        {k: v for k, v in vars(release.img).items() if k != "img_size"}
    text_release = vars(cfg.text) == vars(release.text)
    size = cfg.img.img_size

    def img_count(s):
        kw = dict(vars(cfg.img))
        kw["img_size"] = s
        return _count_gflops(GroupViT(**kw), torch.zeros(1, 3, s, s))
    if img_release:
        img = IMG_GFLOPS_224 if size == 224 else IMG_GFLOPS_224 * img_count(size) / img_count(224)
    else:
        img = img_count(size)
    if text_release:
        txt = TEXT_GFLOPS_77
    else:
        enc = TextTransformer(**vars(cfg.text), truncate_to_eot=False)
        txt = _count_gflops(enc, torch.zeros(1, cfg.text.context_length, dtype=torch.long))
    return img, txt


def text_len(text, truncated):
    return int(text.argmax(-1).max()) + 1 if truncated else CONTEXT


def mm_peak(dtype, device, sizes=(1024, 2048), reps=5):
    """Best torch.mm GFLOP/s (effective time, see ``timed``) over a few square sizes."""
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        for _ in range(reps):
            _, el = timed(lambda: a @ b, device)
            best = max(best, 2 * n ** 3 / max(el, 1e-9) / 1e9)
    return best


# ----------------------------------------------------------------------------------------------
# memory probe (fresh subprocess per configuration)

def _rss_kib():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])
    return out


def _reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss_kib()["VmRSS"] * 1024


def _peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_kib()["VmHWM"] * 1024


def probe(spec):
    device = torch.device(spec["device"])
    cfg = ModelConfig.from_dict(spec["cfg"])
    model, opt = build(cfg, spec["kind"], spec["attn"], None, device, spec["ckpt"])
    runner = Runner(spec["name"], spec["kind"], spec["attn"], model, opt,
                    DTYPES[spec["dtype"]], device)
    img, text = make_inputs(spec["batch"], spec["img_size"], cfg.multi_label, device)
    runner.train_step(img, text)  # AdamW state now resident
    opt.zero_grad(set_to_none=True)
    base = _reset_peak(device)
    runner.train_step(img, text)
    train = _peak(device) - base
    opt.zero_grad(set_to_none=True)
    runner.infer(img, text)
    base = _reset_peak(device)
    runner.infer(img, text)
    infer = _peak(device) - base
    print(json.dumps({"train_peak_mib": train / 2 ** 20, "infer_peak_mib": infer / 2 ** 20}))


def measure_memory(spec):
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    res = subprocess.run([sys.executable, __file__, "--_probe", json.dumps(spec)], env=env,
                         capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        print(f"  memory probe for {spec['name']}/{spec['dtype']} failed:\n{res.stderr[-2000:]}")
        return {"train_peak_mib": float("nan"), "infer_peak_mib": float("nan")}
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------

def report(rows, args, device, gpu_name, dtypes):
    hdr = (f"{'dtype':5} {'config':18} {'L':>3} {'train img/s':>11} {'x ref':>6} {'%peak':>6} "
           f"{'infer img/s':>11} {'x ref':>6} {'%peak':>6} {'train MiB':>9} {'x ref':>6} "
           f"{'infer MiB':>9} {'x ref':>6}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in rows:
        print(f"{r['dtype']:5} {r['config']:18} {r['text_len']:>3} {r['train_img_s']:>11.2f} "
              f"{r['train_speedup']:>6.2f} {100 * r['train_frac_peak']:>5.1f}% "
              f"{r['infer_img_s']:>11.2f} {r['infer_speedup']:>6.2f} "
              f"{100 * r['infer_frac_peak']:>5.1f}% {r['train_peak_mib']:>9.1f} "
              f"{r['train_mem_ratio']:>6.2f} {r['infer_peak_mib']:>9.1f} "
              f"{r['infer_mem_ratio']:>6.2f}")
    print("(img/s, x ref and %peak use effective time: CPU time / threads on CPU, wall on CUDA; "
          "%peak: model FLOP/s over the torch.mm peak of the same dtype measured in this run; "
          "memory: step peak above resident weights + optimizer state; wall-clock columns are "
          "in the CSV)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = device.type if device.type == "cpu" else \
        "cuda-" + gpu_name.replace(" ", "_").lower()
    path = out / f"model-{dev}-{'-'.join(dtypes)}-pt{torch.__version__.split('+')[0]}.csv"
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--multi-label", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16,fp16")
    ap.add_argument("--backends", default="sdpa,xformers,math",
                    help="attention backends for the fast path (unavailable ones are skipped)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-checkpoint", action="store_true", help="skip the use_checkpoint row")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--compile", action="store_true",
                    help="add fast-sdpa+compile (torch.compile of both encoders' blocks)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny model (smoke test of the script, not a benchmark)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--_probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._probe:
        return probe(json.loads(args._probe))

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = ModelConfig(multi_label=args.multi_label)
    cfg.img.img_size = args.img_size
    if args.tiny:
        cfg.img.embed_dim, cfg.img.depths, cfg.img.num_heads = 64, [1, 1, 1], [1, 1, 1]
        cfg.img.num_group_tokens, cfg.img.num_output_groups = [8, 4, 0], [8, 4]
        cfg.text.width, cfg.text.layers = 64, 1
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown {d!r}; expected {sorted(DTYPES)}")
    avail = available_attention_backends(device)
    backends = [b for b in args.backends.split(",") if b in avail]
    skipped = [b for b in args.backends.split(",") if b and b not in avail]
    img, text = make_inputs(args.batch, args.img_size, args.multi_label, device)
    B, T = args.batch, 1 + args.multi_label
    L_fast, L_ref = text_len(text.reshape(-1, CONTEXT), True), CONTEXT
    img_gf, text_gf77 = model_gflops(cfg)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    print(f"device {device.type} {gpu_name} | torch {torch.__version__} | threads "
          f"{torch.get_num_threads()} | batch {B} at {args.img_size} | texts/image {T} | "
          f"text length fast {L_fast} / reference {L_ref}")
    if skipped:
        print(f"attention backends not available here (skipped): {skipped}")

    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    rows = []
    for dname in dtypes:
        amp = DTYPES[dname]
        peak = mm_peak(amp or torch.float32, device)
        specs = [("reference", "reference", "math", False)]
        specs += [(f"fast-{b}", "fast", b, False) for b in backends]
        if not args.no_checkpoint and "sdpa" in backends:
            specs.append(("fast-sdpa+ckpt", "fast", "sdpa", True))
        runners = []
        for name, kind, attn, ckpt in specs:
            model, opt = build(cfg, kind, attn, state, device, ckpt)
            runners.append(Runner(name, kind, attn, model, opt, amp, device))
        if args.compile and "sdpa" in backends:
            model, opt = build(cfg, "fast", "sdpa", state, device)
            model.img_encoder = torch.compile(model.img_encoder)
            model.text_encoder.transformer = torch.compile(model.text_encoder.transformer)
            runners.append(Runner("fast-sdpa+compile", "fast", "sdpa", model, opt, amp, device,
                                  compiled=True))
        print(f"\n[{dname}] torch.mm peak {peak:.1f} GFLOP/s; warm-up ...", flush=True)
        for r in runners:
            r.train_step(img, text)
            r.infer(img, text)
        t_train = {r.name: [] for r in runners}
        t_inf = {r.name: [] for r in runners}
        for rep in range(args.reps):
            for r in runners:
                t_train[r.name].append(timed(lambda: r.train_step(img, text), device))
            for r in runners:
                t_inf[r.name].append(timed(lambda: r.infer(img, text), device))
            # neighbours' load varies: re-measure the matmul peak every round, keep the best
            peak = max(peak, mm_peak(amp or torch.float32, device, sizes=(2048,), reps=2))
            print(f"  round {rep + 1}/{args.reps} (train/infer wall s): " + ", ".join(
                f"{r.name} {t_train[r.name][-1][0]:.2f}/{t_inf[r.name][-1][0]:.2f}"
                for r in runners), flush=True)
        del runners
        gc.collect()
        mem = {}
        if not args.no_memory:
            for name, kind, attn, ckpt in specs:
                mem[name] = measure_memory(dict(
                    name=name, kind=kind, attn=attn, ckpt=ckpt, dtype=dname,
                    device=str(device), batch=B, img_size=args.img_size,
                    cfg=dict(img=vars(cfg.img), text=vars(cfg.text), multi_label=cfg.multi_label)))
        names = [s[0] for s in specs] + (["fast-sdpa+compile"] if args.compile
                                         and "sdpa" in backends else [])
        def med(ts, i):
            return statistics.median(t[i] for t in ts)
        ref_tr, ref_tr_w = med(t_train["reference"], 1), med(t_train["reference"], 0)
        ref_in, ref_in_w = med(t_inf["reference"], 1), med(t_inf["reference"], 0)
        ref_mem = mem.get("reference", {})
        for name in names:
            tr, tr_w = med(t_train[name], 1), med(t_train[name], 0)
            inf, inf_w = med(t_inf[name], 1), med(t_inf[name], 0)
            L = L_ref if name == "reference" else L_fast
            train_gf = 3 * B * (img_gf + T * text_gf77 * L / CONTEXT)
            inf_gf = B * (img_gf + text_gf77 * text_len(text[:, 0], name != "reference")
                          / CONTEXT)
            m = mem.get(name, {})
            row = dict(
                device=device.type, gpu=gpu_name, torch=torch.__version__,
                threads=torch.get_num_threads(), dtype=dname, config=name, batch=B,
                img_size=args.img_size, texts_per_image=T, text_len=L,
                train_s=round(tr, 4), train_img_s=round(B / tr, 2),
                train_speedup=round(ref_tr / tr, 3),
                train_wall_s=round(tr_w, 4), train_wall_speedup=round(ref_tr_w / tr_w, 3),
                train_gflops_s=round(train_gf / tr, 1),
                train_frac_peak=round(train_gf / tr / peak, 3),
                infer_s=round(inf, 4), infer_img_s=round(B / inf, 2),
                infer_speedup=round(ref_in / inf, 3),
                infer_wall_s=round(inf_w, 4), infer_wall_speedup=round(ref_in_w / inf_w, 3),
                infer_gflops_s=round(inf_gf / inf, 1),
                infer_frac_peak=round(inf_gf / inf / peak, 3),
                mm_peak_gflops_s=round(peak, 1),
                train_peak_mib=round(m.get("train_peak_mib", float("nan")), 1),
                train_mem_ratio=round(m.get("train_peak_mib", float("nan"))
                                      / ref_mem.get("train_peak_mib", float("nan")), 3)
                if ref_mem else float("nan"),
                infer_peak_mib=round(m.get("infer_peak_mib", float("nan")), 1),
                infer_mem_ratio=round(m.get("infer_peak_mib", float("nan"))
                                      / ref_mem.get("infer_peak_mib", float("nan")), 3)
                if ref_mem else float("nan"),
                mfu="")
            if device.type == "cuda":
                for key, peaks in GPU_PEAKS.items():
                    if key in gpu_name:
                        row["mfu"] = round(train_gf / tr / (peaks[dname] * 1e3), 4)
            rows.append(row)
        report(rows, args, device, gpu_name, dtypes)  # after every dtype: partial runs keep data



if __name__ == "__main__":
    main()
