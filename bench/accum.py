"""Embedding-cache accumulation (GradCache) vs naive gradient accumulation: time per optimizer
step and peak memory per rank for one global batch, on 1, 2 and 8 *simulated* ranks.

What is simulated (CPU, one process per measurement):
* rank 0 of ``w`` ranks: it holds global/w samples, split into micro batches of ``--micro``
  (accumulation a = global / (w · micro));
* the cross-rank all-gather of the losses is replaced by concatenating this rank's embeddings
  with fixed random unit vectors standing in for the other w-1 ranks (same shapes as the real
  gather, so the logits, softmax and their memory are the real per-rank ones; no communication
  time is counted); the projector BN uses this rank's statistics only (the cross-rank BN adds two
  tiny all-gathers);
* naive accumulation: every micro batch runs forward + loss over its own micro·w negatives +
  backward(loss / a); GradCache: ``grad_cache_step`` (global/w · w = global negatives);
  reference: the same global-negative objective with every micro batch's encoder graph kept and
  one backward (no re-run; memory grows with a·b). GradCache/reference isolates the price of the
  re-run; GradCache/naive also contains the price of scoring global-batch negatives, which is
  large here only because the encoders are tiny next to a 4096-wide softmax.

Memory per rank: ``saved`` = peak bytes of tensors alive in autograd graphs (activations saved
for backward, weights excluded), measured with SavedTensorMeter over the whole step (for GradCache
also ``encoder_saved``: the encoder passes alone — the rest is the projector + loss over the
local a·b rows, i.e. the price of the a·b·w negatives); ``rss`` =
peak resident set of the measuring process (model, optimizer-free; includes the Python/torch
baseline, printed as ``rss_base``).

    .venv/bin/python bench/accum.py                      # defaults below, CSV under bench/results
    .venv/bin/python bench/accum.py --global-batch 512 --micro 32 --ranks 1 2 8 --repeat 2
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {
    # GroupViT / text encoder shrunk for 2 CPU cores; the projector hidden width is shrunk in the
    # release ratio (4096 hidden for 384-wide features ≈ 8-10×) so the head keeps its small
    # share of the step
    "tiny": dict(img=dict(img_size=32, patch_size=8, embed_dim=64, depths=[1, 1, 1],
                          num_heads=[2, 2, 2], num_group_tokens=[8, 4, 0],
                          num_output_groups=[8, 4], drop_path_rate=0.1),
                 txt=dict(context_length=16, width=64, layers=1, vocab_size=4096),
                 output_dim=64, proj_hidden=512, multi_label=3),
    "small": dict(img=dict(img_size=64, patch_size=8, embed_dim=128, depths=[2, 1, 1],
                           num_heads=[4, 4, 4], num_group_tokens=[16, 8, 0],
                           num_output_groups=[16, 8], drop_path_rate=0.1),
                  txt=dict(context_length=32, width=128, layers=2, vocab_size=8192),
                  output_dim=128, proj_hidden=1024, multi_label=3),
}


def build(name):
    import torch
    from groupvit_fast.models import GroupViT, MultiLabelContrastive, TextTransformer
    from groupvit_fast.models.multi_label_contrastive import ProjectMLP
    spec = MODELS[name]
    torch.manual_seed(0)
    net = MultiLabelContrastive(GroupViT(**spec["img"]), TextTransformer(**spec["txt"]),
                                output_dim=spec["output_dim"], multi_label=spec["multi_label"])
    net.img_projector = ProjectMLP(net.img_encoder.width, spec["proj_hidden"], spec["output_dim"])
    net.text_projector = ProjectMLP(net.text_encoder.width, spec["proj_hidden"],
                                    spec["output_dim"])
    return net.train(), spec


def simulate_world(world):
    """Rank 0 of ``world``: the losses' gather returns [own rows, stand-ins of the others]."""
    import torch
    import torch.nn.functional as F
    import groupvit_fast.models.losses as losses
    cache = {}

    def gather(x):
        if world == 1:
            return x
        key = (tuple(x.shape), x.dtype)
        if key not in cache:
            g = torch.Generator().manual_seed(len(cache))
            others = torch.randn((world - 1) * x.shape[0], *x.shape[1:], generator=g)
            cache[key] = F.normalize(others, dim=-1).to(x.dtype)
        return torch.cat([x, cache[key]])  # [(w n),...]

    losses.gather_with_grad = gather


def worker(args):
    """One step of one mode in a fresh process: peak saved-activation bytes and peak RSS."""
    import torch
    from groupvit_fast.training.grad_cache import SavedTensorMeter, grad_cache_step
    torch.set_num_threads(args.threads)
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    simulate_world(args.world)
    net, spec = build(args.model)
    local = args.global_batch // args.world
    micro = local if args.mode == "full" else args.micro
    a = local // micro
    K = spec["multi_label"]
    L = spec["txt"]["context_length"]
    V = spec["txt"]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    size = spec["img"]["img_size"]
    images = torch.randn(local, 3, size, size, generator=g)
    texts = torch.randint(1, V - 1, (local, 1 + K, L), generator=g)
    texts[..., -1] = V - 1  # EOT = the largest id
    # separate tensors per micro batch, as a loader yields them (views of one big batch would
    # keep the whole batch alive in every saved input)
    mbs = [(im.clone(), tx.clone()) for im, tx in zip(images.chunk(a), texts.chunk(a))]
    meter = SavedTensorMeter()
    enc_meter = SavedTensorMeter(parent=meter)  # GradCache: the encoder passes alone

    def step():
        net.zero_grad(set_to_none=True)
        with meter():
            if args.mode == "gradcache":
                out = grad_cache_step(net, mbs, encoder_context=enc_meter)
                return float(out["total"])
            if args.mode == "reference":
                return reference_step(net, mbs)
            tot = 0.0
            for im, tx in mbs:
                losses = net(im, tx)
                t = sum(v for k, v in losses.items() if "loss" in k) / a
                t.backward()
                tot += float(t)
            return tot

    loss = step()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    negatives = micro * args.world if args.mode == "naive" else args.global_batch
    print("RESULT" + json.dumps(dict(
        model=args.model, global_batch=args.global_batch, world=args.world, micro=micro,
        accum=a, mode=args.mode, negatives=negatives, loss=loss,
        saved_peak_mib=meter.peak / 2**20,
        encoder_saved_peak_mib=enc_meter.peak / 2**20 if args.mode == "gradcache" else "",
        rss_peak_mib=rss, rss_base_mib=rss_base)))


def reference_step(net, mbs):
    """The same objective as GradCache without the re-run: every micro batch's encoder graph is
    kept, projector + loss once on the concatenation, one backward (memory grows with a·b)."""
    import torch
    from groupvit_fast.training.grad_cache import features_loss
    img = [net.img_encoder(im) for im, _ in mbs]
    txt = [net.text_encoder(tx.reshape(-1, tx.shape[-1])) for _, tx in mbs]  # [(b T),L]
    losses = features_loss(net, torch.cat(img), torch.cat(txt), mbs[0][1].shape[1])
    sum(v for k, v in losses.items() if "loss" in k).backward()
    return float(sum(v.detach() for k, v in losses.items() if "loss" in k))


def timing_worker(args):
    """Both modes in one process, steps alternated, so machine load hits them alike; CPU time
    of the process (all threads) is the primary figure on a shared machine, wall time is kept."""
    import torch
    from groupvit_fast.training.grad_cache import grad_cache_step
    torch.set_num_threads(args.threads)
    simulate_world(args.world)
    net, spec = build(args.model)
    local = args.global_batch // args.world
    a = local // args.micro
    K, L, V = spec["multi_label"], spec["txt"]["context_length"], spec["txt"]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    size = spec["img"]["img_size"]
    images = torch.randn(local, 3, size, size, generator=g)
    texts = torch.randint(1, V - 1, (local, 1 + K, L), generator=g)
    texts[..., -1] = V - 1
    # separate tensors per micro batch, as a loader yields them (views of one big batch would
    # keep the whole batch alive in every saved input)
    mbs = [(im.clone(), tx.clone()) for im, tx in zip(images.chunk(a), texts.chunk(a))]

    def naive():
        for im, tx in mbs:
            losses = net(im, tx)
            (sum(v for k, v in losses.items() if "loss" in k) / a).backward()

    def gradcache():
        grad_cache_step(net, mbs)

    def reference():
        reference_step(net, mbs)

    res = {"naive": ([], []), "reference": ([], []), "gradcache": ([], [])}
    for i in range(args.repeat + 1):  # round 0 warms up allocators and caches
        for name, fn in (("naive", naive), ("reference", reference), ("gradcache", gradcache)):
            net.zero_grad(set_to_none=True)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            c1, t1 = time.process_time(), time.perf_counter()
            if i:
                res[name][0].append(c1 - c0)
                res[name][1].append(t1 - t0)
    out = {}
    for name, (cpu, wall) in res.items():
        out[name] = dict(cpu_s=statistics.median(cpu), wall_s=statistics.median(wall),
                         cpu_all=";".join(f"{x:.2f}" for x in cpu),
                         wall_all=";".join(f"{x:.2f}" for x in wall))
    print("RESULT" + json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny")
    p.add_argument("--global-batch", type=int, default=4096)
    p.add_argument("--micro", type=int, default=64)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--modes", nargs="+", default=["naive", "reference", "gradcache", "full"],
                   choices=["naive", "reference", "gradcache", "full"])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="CSV path (default bench/results/accum-cpu-...)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="naive", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return timing_worker(args) if args.mode == "timing" else worker(args)

    import torch
    for w in args.ranks:
        if args.global_batch % (w * args.micro):
            p.error(f"--global-batch {args.global_batch} is not divisible by micro "
                    f"{args.micro} × ranks {w}")
    def run(w, mode):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", args.model,
               "--global-batch", str(args.global_batch), "--micro", str(args.micro),
               "--world", str(w), "--mode", mode, "--repeat", str(args.repeat),
               "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
        if proc.returncode or not line:
            sys.exit(f"worker failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        return json.loads(line[-1][len("RESULT"):])

    rows = []
    for w in args.ranks:
        timing = run(w, "timing") if args.repeat > 0 else {}
        for mode in args.modes:
            r = run(w, mode)
            t = timing.get(mode, {})
            r.update(cpu_s=t.get("cpu_s", ""), wall_s=t.get("wall_s", ""),
                     cpu_all=t.get("cpu_all", ""), wall_all=t.get("wall_all", ""))
            if mode == "gradcache" and t:
                r["cpu_vs_naive"] = t["cpu_s"] / timing["naive"]["cpu_s"]
                r["wall_vs_naive"] = t["wall_s"] / timing["naive"]["wall_s"]
                r["cpu_vs_reference"] = t["cpu_s"] / timing["reference"]["cpu_s"]
                r["wall_vs_reference"] = t["wall_s"] / timing["reference"]["wall_s"]
            r.update(threads=args.threads, device="cpu", dtype="fp32",
                     torch=torch.__version__.split("+")[0],
                     simulated="rank 0 of w; gather = own rows + fixed stand-ins; local BN")
            rows.append(r)
            ts = f"cpu={r['cpu_s']:.2f}s wall={r['wall_s']:.2f}s " if t else ""
            print(f"w={w} {mode:9s} micro={r['micro']:4d} a={r['accum']:3d} "
                  f"negatives={r['negatives']:5d} {ts}saved={r['saved_peak_mib']:.0f}MiB "
                  f"rss={r['rss_peak_mib']:.0f}MiB (base {r['rss_base_mib']:.0f})", flush=True)
            if "cpu_vs_naive" in r:
                print(f"w={w}: GradCache / naive: cpu {r['cpu_vs_naive']:.3f}, "
                      f"wall {r['wall_vs_naive']:.3f}; GradCache / reference (same negatives, "
                      f"no re-run): cpu {r['cpu_vs_reference']:.3f}, "
                      f"wall {r['wall_vs_reference']:.3f}", flush=True)
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    out = args.out or os.path.join(
        REPO, "bench", "results",
        f"accum-cpu-fp32-pt{torch.__version__.split('+')[0]}-{args.model}-g{args.global_batch}.csv")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys, restval="")
        wr.writeheader()
        wr.writerows(rows)
    os.replace(tmp, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
