"""Benchmark of the fused grouping op (groupvit_fast.ops.gumbel_assign_merge).

For every available backend (cpu extension on CPU; triton and cuda on a GPU) and for the eager
reference and torch.compile of the reference, times forward, backward and forward+backward at

* the release training shapes, B per device (default 256): stage 1 S=64,N=196,C=384 and stage 2
  S=8,N=64,C=384, with Gumbel noise (training); on CPU also at B=32 (the issue's CPU anchor);
* the evaluation shapes S=64, N=784 (448²) and N=1176 (448×672), B=1 and B=8 windows,
  forward only, no noise.

Reports median and 20/80 % quantiles (ms), effective GB/s for the bytes the op must move
(read q,k,v [+dout], write out [or dq,dk,dv]; the same numerator for every backend), on a GPU
the fraction of the memory-bandwidth roofline (peak from the device name, "unmeasured"
otherwise), the speed-up over eager, and the bytes autograd saves for backward per call beyond
the inputs q, k, v. Prints a table and writes
``bench/results/grouping-<device>-<dtype>-pt<torch>.csv``.

Examples::

    python bench/grouping.py                 # everything available, default dtype
    python bench/grouping.py --quick         # fewer repetitions, no torch.compile
    python bench/grouping.py --dtype bf16 --batch 256 --shapes train
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from groupvit_fast.ops import dispatch  # noqa: E402
from groupvit_fast.ops import gumbel_assign_merge, gumbel_assign_merge_reference  # noqa: E402
from groupvit_fast.ops.memory import saved_bytes  # noqa: E402

# HBM peak bandwidths (GB/s) of the GPUs this project may meet (vendor datasheets).
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0, "L40S": 864.0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = time.perf_counter


def timeit(fn, device, reps, warmup, min_time=1.0, max_reps=200):
    """At least ``reps`` timed calls, more (up to ``max_reps``) until ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    _sync(device)
    ts = []
    while len(ts) < reps or (sum(ts) < min_time and len(ts) < max_reps):
        _sync(device)
        t0 = CLOCK()
        fn()
        _sync(device)
        ts.append(CLOCK() - t0)
    ts.sort()
    q = lambda p: ts[min(len(ts) - 1, int(round(p * (len(ts) - 1))))] * 1e3
    return q(0.5), q(0.2), q(0.8)




def op_bytes(B, S, N, C, elem, mode):
    """Bytes the op must move: inputs read once, outputs written once (+ idx/cnt)."""
    qkv = (B * S * C + 2 * B * N * C) * elem
    small = B * N * 4 + B * S * 4
    fwd = qkv + B * S * C * elem + small
    bwd = qkv + B * S * C * elem + small + (B * S * C + 2 * B * N * C) * elem
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def make_callable(name, compiled_ref):
    """(q, k, v, gumbel, scale) -> out for one benchmarked implementation."""
    if name == "eager":
        return lambda q, k, v, gumbel, scale: gumbel_assign_merge_reference(
            q, k, v, scale=scale, gumbel=gumbel)
    if name == "compile(eager)":
        return lambda q, k, v, gumbel, scale: compiled_ref(q, k, v, scale=scale, gumbel=gumbel)

    def run(q, k, v, gumbel, scale):
        os.environ[dispatch.ENV_VAR] = name
        try:
            return gumbel_assign_merge(q, k, v, scale=scale, gumbel=gumbel)
        finally:
            os.environ.pop(dispatch.ENV_VAR, None)
    return run


def bench_shape(impls, device, dtype, B, S, N, C, gumbel, modes, reps, warmup):
    gen = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    q, k, v, g = mk(B, S, C), mk(B, N, C), mk(B, N, C), mk(B, S, C)
    scale = C ** -0.5
    rows = []
    elem = torch.finfo(dtype).bits // 8
    for name, fn in impls:
        qr, kr, vr = (t.clone().requires_grad_("fwd+bwd" in modes) for t in (q, k, v))
        res = {}
        try:
            if "fwd" in modes:
                with torch.no_grad():
                    res["fwd"] = timeit(lambda: fn(q, k, v, gumbel, scale), device, reps, warmup)
            if "bwd" in modes:
                out = fn(qr, kr, vr, gumbel, scale)
                res["bwd"] = timeit(lambda: torch.autograd.grad(out, (qr, kr, vr), g,
                                                                retain_graph=True),
                                    device, reps, warmup)
                del out
            if "fwd+bwd" in modes:
                res["fwd+bwd"] = timeit(
                    lambda: torch.autograd.grad(fn(qr, kr, vr, gumbel, scale), (qr, kr, vr), g),
                    device, reps, warmup)
            saved = (saved_bytes(lambda: fn(qr, kr, vr, gumbel, scale), (qr, kr, vr))
                     if "fwd+bwd" in modes and name != "compile(eager)" else None)
        except Exception as e:  # report, keep benchmarking the others
            print(f"  {name}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        for mode, (med, q20, q80) in res.items():
            gbps = op_bytes(B, S, N, C, elem, mode) / (med * 1e-3) / 1e9
            rows.append(dict(impl=name, B=B, S=S, N=N, C=C, gumbel=gumbel, mode=mode,
                             median_ms=med, q20_ms=q20, q80_ms=q80, eff_GBps=gbps,
                             saved_bytes=saved if saved is not None else ""))
    # speed-up over eager per mode
    eager = {r["mode"]: r["median_ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        r["speedup_vs_eager"] = eager[r["mode"]] / r["median_ms"] if r["mode"] in eager else ""
    return rows


def device_tag(device):
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "", name.lower().replace("nvidia", ""))[:24]


def peak_gbps(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, val in PEAK_GBPS.items():
        if key in name:
            return val
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: fp32 on CPU, bf16 on GPU")
    p.add_argument("--batch", type=int, default=256, help="training batch per device")
    p.add_argument("--shapes", choices=["train", "eval", "all"], default="all")
    p.add_argument("--backends", nargs="+", default=None,
                   help="subset of: eager compile(eager) triton cuda cpu reference")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    p.add_argument("--quick", action="store_true", help="fewer repetitions, no torch.compile")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(eager)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (CPU); default: torch's default. On a shared "
                        "machine --threads 1 gives far steadier numbers")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="'thread': CPU time of the calling thread (time.thread_time), with "
                        "--threads 1 only; immune to other processes stealing the cores")
    p.add_argument("--out", default=None, help="CSV path (default under bench/results/)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread":
        if args.device != "cpu" or torch.get_num_threads() != 1:
            p.error("--clock thread needs --device cpu --threads 1")
        global CLOCK
        CLOCK = time.thread_time

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "bf16")]
    reps = args.reps or (3 if args.quick else (5 if device.type == "cpu" else 50))
    warmup = 1 if device.type == "cpu" else 10
    torch.manual_seed(0)

    avail = [b for b in dispatch.available_backends(device) if b != "reference"]
    if device.type == "cpu":
        avail = [b for b in avail if b != "triton"]  # the interpreter is no benchmark
    names = ["eager"]
    if not (args.quick or args.no_compile):
        names.append("compile(eager)")
    names += avail
    if args.backends:
        names = [n for n in names if n in args.backends]
    compiled_ref = None
    if "compile(eager)" in names:
        # static shapes: inductor's rand cannot take symbolic sizes here; one graph per shape
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        compiled_ref = torch.compile(gumbel_assign_merge_reference, dynamic=False)
    impls = [(n, make_callable(n, compiled_ref)) for n in names]

    shapes = []
    if args.shapes in ("train", "all"):
        batches = [args.batch] + ([32] if device.type == "cpu" and args.batch != 32 else [])
        for B in batches:
            shapes += [(B, 64, 196, 384, True, ("fwd", "bwd", "fwd+bwd")),
                       (B, 8, 64, 384, True, ("fwd", "bwd", "fwd+bwd"))]
    if args.shapes in ("eval", "all"):
        for N in (784, 1176):
            for B in (1, 8):
                shapes.append((B, 64, N, 384, False, ("fwd",)))

    peak = peak_gbps(device)
    rows = []
    t_start = time.time()
    for B, S, N, C, gumbel, modes in shapes:
        print(f"# B={B} S={S} N={N} C={C} gumbel={gumbel} ({time.time() - t_start:.0f}s)",
              flush=True)
        rows += bench_shape(impls, device, dtype, B, S, N, C, gumbel, modes, reps, warmup)
    for r in rows:
        r["roofline_frac"] = (r["eff_GBps"] / peak) if peak else "unmeasured"
        r["device"] = device_tag(device)
        r["dtype"] = str(dtype).replace("torch.", "")
        r["torch"] = torch.__version__
        r["threads"] = torch.get_num_threads() if device.type == "cpu" else ""
        r["clock"] = args.clock

    hdr = (f"{'impl':15} {'B':>4} {'S':>3} {'N':>5} {'mode':8} {'median':>9} {'q20':>9} "
           f"{'q80':>9} {'GB/s':>7} {'roof':>6} {'x eager':>7} {'saved':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        roof = f"{r['roofline_frac']:.2f}" if isinstance(r["roofline_frac"], float) else "n/a"
        sp = f"{r['speedup_vs_eager']:.2f}" if r["speedup_vs_eager"] != "" else ""
        saved = f"{r['saved_bytes'] / 2**20:.3f}Mi" if r["saved_bytes"] != "" else ""
        print(f"{r['impl']:15} {r['B']:>4} {r['S']:>3} {r['N']:>5} {r['mode']:8} "
              f"{r['median_ms']:9.3f} {r['q20_ms']:9.3f} {r['q80_ms']:9.3f} "
              f"{r['eff_GBps']:7.2f} {roof:>6} {sp:>7} {saved:>10}")

    ver = torch.__version__.split("+")[0]
    out = args.out or os.path.join(ROOT, "bench", "results",
                                   f"grouping-{device_tag(device)}-"
                                   f"{str(dtype).replace('torch.', '').replace('float', 'fp')}"
                                   f"-pt{ver}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fields = ["device", "dtype", "torch", "threads", "clock", "impl", "B", "S", "N", "C", "gumbel", "mode",
              "median_ms", "q20_ms", "q80_ms", "eff_GBps", "roofline_frac", "speedup_vs_eager",
              "saved_bytes"]
    tmp = out + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in fields})
    os.replace(tmp, out)
    print(f"wrote {out} ({time.time() - t_start:.0f}s, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
