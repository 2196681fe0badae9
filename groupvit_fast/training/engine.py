"""DeepSpeed training loop for GroupViT (the official recipe, ref §7): ZeRO 1/2/3, gradient
accumulation, per-step cosine LR, global negatives and cross-rank projector BN, crash-safe
checkpoints with exact resume, consolidated export, progress/TensorBoard and a periodic
zero-shot segmentation hook.

``train(cfg)`` is the library entry point (train/main.py is a thin CLI around it). It works under
``deepspeed``, ``torchrun`` or a plain ``python`` process (single rank)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import socket
import time
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from .batching import BatchPlan, plan_batch
from .config import REPO_ROOT, TrainConfig
from .data import build_loader
from .monitor import Monitor, NonFiniteLoss, peak_memory_mib
from .param_groups import param_groups
from .schedule import assign_scale_factors, build_schedule
from ..models.multi_label_contrastive import BEYOND_POOLED_LOSSES
from .syncbn import convert_sync_batchnorm

# DeepSpeed keys that the training config owns (one source of truth for batch, precision, clip)
_MANAGED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu",
                    "gradient_accumulation_steps", "gradient_clipping", "bf16", "fp16",
                    "optimizer", "scheduler", "amp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_environment() -> None:
    """Launcher glue, before deepspeed is imported: the CPU accelerator when there is no GPU,
    and the rendezvous variables of a one-process run when no launcher set them."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # Intra-op threads per rank. With only 2-3 cores per rank, OpenMP barriers collapse as
        # soon as anything else runs on the machine: the default recipe measured 4.7 s/step with
        # 2 threads vs 0.5 s/step with 1 on a shared 2-core box. OMP_NUM_THREADS overrides.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE",
                                                                       os.environ["WORLD_SIZE"])))
        per_rank = (os.cpu_count() or 1) // max(1, local)
        torch.set_num_threads(per_rank if per_rank >= 4 else 1)


def init_distributed():
    setup_environment()
    import deepspeed
    import torch.distributed as dist
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def resolve_precision(p: str) -> str:
    if p == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return p


def build_ds_config(cfg: TrainConfig, plan: BatchPlan) -> dict:
    """DeepSpeed config: ZeRO section from the JSON file, everything else from ``cfg``."""
    path = cfg.deepspeed.config
    if not os.path.isabs(path) and not os.path.isfile(path):
        path = os.path.join(REPO_ROOT, path)
    try:
        with open(path) as f:
            conf = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"deepspeed.config: {cfg.deepspeed.config} not found (tried "
                                f"{path}); ZeRO configs live in configs/ds_zero{{1,2,3}}.json"
                                ) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"deepspeed.config {path}: invalid JSON: {e}") from None
    clash = [k for k in _MANAGED_DS_KEYS if k in conf]
    if clash:
        raise ValueError(f"deepspeed.config {path} sets {clash}; these come from the training "
                         f"config (train.batch_size / micro_batch_size / grad_accum_steps / "
                         f"clip_grad / precision, client AdamW + cosine schedule): remove them "
                         f"from the JSON")
    conf = dict(conf)
    zero = dict(conf.get("zero_optimization", {}))
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    zero.setdefault("stage", 0)
    conf["zero_optimization"] = zero
    conf.update(train_batch_size=plan.global_batch,
                train_micro_batch_size_per_gpu=plan.micro_batch,
                gradient_accumulation_steps=plan.grad_accum,
                gradient_clipping=cfg.train.clip_grad)
    prec = resolve_precision(cfg.train.precision)
    if prec == "bf16":
        conf["bf16"] = {"enabled": True}
    elif prec == "fp16":
        # dynamic loss scaling, as apex O1 in the official runs
        conf["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                        "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    conf.setdefault("zero_allow_untested_optimizer", True)
    conf.setdefault("steps_per_print", 10**12)  # our monitor logs; keep DeepSpeed quiet
    conf.setdefault("wall_clock_breakdown", False)
    return conf


def check_compat(cfg: TrainConfig, plan: BatchPlan, stage: int) -> None:
    """Combinations that cannot run, refused before any process-group work."""
    if cfg.train.grad_cache and plan.grad_accum > 1 and stage == 3:
        raise ValueError(
            f"train.grad_cache=true with gradient accumulation {plan.grad_accum} does not support "
            f"ZeRO-3 ({plan.describe()}): use configs/ds_zero2.json / ds_zero1.json, or set "
            f"train.grad_cache=false (plain accumulation: each micro batch then contrasts only "
            f"{plan.micro_batch * plan.world_size} samples instead of {plan.global_batch})")
    for opt in BEYOND_POOLED_LOSSES:
        w = getattr(cfg.model, opt)
        if cfg.train.grad_cache and plan.grad_accum > 1 and w > 0:
            raise ValueError(
                f"model.{opt}={w} needs the group tokens and assignment maps, which "
                f"train.grad_cache=true (gradient accumulation {plan.grad_accum}, "
                f"{plan.describe()}) does not keep in its embedding cache: set "
                f"train.grad_cache=false or model.{opt}=0")


def _seed_all(seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def _gathered(params):
    """Full parameters inside the block under ZeRO-3 (collective); a no-op otherwise."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _full_state_dict(module) -> dict:
    """Collective: a CPU fp32 copy of the full state_dict on every rank (any ZeRO stage)."""
    with _gathered(list(module.parameters())):
        return {k: (v.detach().float().cpu().clone() if v.is_floating_point()
                    else v.detach().cpu().clone()) for k, v in module.state_dict().items()}


def _eval_dataset(cfg: TrainConfig, **kw):
    """``monitor.eval_dataset``; the embedded set's held-out scenes come from the generator the
    run trains on, read as emergence reads the export."""
    from groupvit_fast.seg import build_dataset
    from groupvit_fast.seg.emergence import trained_synthetic_options
    name = cfg.monitor.eval_dataset
    syn = trained_synthetic_options(cfg.to_dict()) if name == "synthetic" else None
    return build_dataset(name, **kw, **({"cfg": syn} if syn else {}))


def run_seg_eval(model, cfg: TrainConfig, rank: int = 0, world: int = 1) -> Optional[dict]:
    """Zero-shot segmentation mIoU of ``monitor.eval_dataset`` (val split) with groupvit_fast.seg.
    Collective when distributed: every rank segments its share of the images and the
    intersect/union histograms are all-reduced inside ``evaluate_dataset``."""
    if not cfg.monitor.eval_dataset:
        return None
    from groupvit_fast.seg import ZeroShotSegmenter
    from groupvit_fast.seg.evaluate import evaluate_dataset
    ds = _eval_dataset(cfg)
    opts = dict(cfg.monitor.eval_options)
    if getattr(ds, "bg_thresh", None) is not None:
        opts.setdefault("bg_thresh", ds.bg_thresh)
    seg = ZeroShotSegmenter(model, ds.class_names, **opts)
    return evaluate_dataset(seg, ds, rank=rank, world_size=world,
                            limit=cfg.monitor.eval_max_images, progress=False)


def run_val_selection(model, cfg: TrainConfig) -> dict:
    """Zero-shot mIoU of ``monitor.eval_dataset``'s val split at the background threshold that
    is best there (the protocol's own threshold search), for model selection. Collective when
    distributed: ``select_bg_thresh`` shards the images and all-reduces the histograms, so every
    rank gets the same numbers. Returns {'mIoU', 'bg_thresh', 'images'}."""
    from groupvit_fast.seg import ZeroShotSegmenter
    from groupvit_fast.seg.evaluate import select_bg_thresh
    ds = _eval_dataset(cfg, split="val")
    opts = {k: v for k, v in dict(cfg.monitor.eval_options).items() if k != "bg_thresh"}
    seg = ZeroShotSegmenter(model, ds.class_names, **opts)
    sel = select_bg_thresh(seg, ds, limit=cfg.monitor.select_max_images)
    n = len(ds) if cfg.monitor.select_max_images is None else min(len(ds),
                                                                   cfg.monitor.select_max_images)
    return {"mIoU": sel["mIoU_by_thresh"][sel["bg_thresh"]], "bg_thresh": sel["bg_thresh"],
            "images": n}


def _ds_initialize(model, optimizer, ds_conf):
    """deepspeed.initialize, working around DeepSpeed 0.19.8 broadcasting every parameter as
    ``p.data.view(torch.uint8)`` (engine._broadcast_model for ZeRO 0-2, zero.Init for ZeRO-3),
    which raises "self.dim() cannot be 0 to view Float as Byte" on the official 0-dim
    ``logit_scale`` / ``multi_label_logit_scale``. Inside the engine those two are held with
    shape [1]: same value, same broadcasting in the losses, same optimizer group (the groups are
    built before, from the 0-dim tensors). ``official_shapes`` restores [] for export/eval."""
    import deepspeed
    for p in model.parameters():
        if p.ndim == 0:
            p.data = p.data.reshape(1)
    return deepspeed.initialize(model=model, optimizer=optimizer, config=ds_conf)


def official_shapes(state_dict: dict, reference: dict) -> dict:
    """Reshape entries whose element count matches the reference but whose shape does not
    (the [1]-held 0-dim temperatures) back to the reference shape."""
    out = {}
    for k, v in state_dict.items():
        ref = reference.get(k)
        if ref is not None and v.shape != ref.shape and v.numel() == ref.numel():
            v = v.reshape(ref.shape)
        out[k] = v
    return out


def _check_finite(vec: torch.Tensor, step: int, epoch: int, lr: float, last_ckpt):
    if not bool(torch.isfinite(vec).all()):
        raise NonFiniteLoss(
            f"loss is {vec[0].item()} at step {step} (epoch {epoch}, lr {lr:.3g}); stopped "
            f"without saving. Last good checkpoint: {last_ckpt or 'none yet'} (resume with "
            f"--resume, e.g. with a lower train.base_lr or train.precision=fp32)")


@dataclasses.dataclass
class TrainResult:
    steps: int
    final_loss: float
    checkpoint: Optional[str]
    export: Optional[str]
    tensorboard: Optional[str]
    step_time_s: float  # mean wall time per optimizer step, excluding the first (warm-up)
    images_per_s: float
    peak_memory_mib: float  # this rank (RSS on CPU, allocated on GPU)
    losses: list  # global mean loss of every optimizer step run in this process
    eval: Optional[dict] = None
    selected: Optional[dict] = None  # monitor.select_last_epochs: the chosen step and its val score


def train(cfg: TrainConfig, *, resume: bool = False, log=print) -> TrainResult:
    rank, world, local_rank = init_distributed()
    import deepspeed
    import torch.distributed as dist

    is_main = rank == 0
    say = (lambda *a: log(*a, flush=True)) if is_main else (lambda *a: None)
    device = (torch.device(f"cuda:{local_rank}") if torch.cuda.is_available()
              else torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t = cfg.train
    plan = plan_batch(t.batch_size, world, t.micro_batch_size, t.grad_accum_steps)
    precision = resolve_precision(t.precision)
    ds_conf = build_ds_config(cfg, plan)
    stage = ds_conf["zero_optimization"]["stage"]
    check_compat(cfg, plan, stage)

    def new_epoch(loader, e):
        """The loader positioned at the start of epoch ``e`` (set_epoch when it has one, else a
        fresh loader built for that epoch, as the data contract allows)."""
        if loader is not None and hasattr(loader, "set_epoch"):
            loader.set_epoch(e)
            return loader
        return build_loader(cfg, rank=rank, world_size=world, batch_size=plan.micro_batch,
                            seed=t.seed, epoch=e, device=device)

    loader = new_epoch(None, 0)
    micro_per_epoch = len(loader)
    steps_per_epoch = micro_per_epoch // plan.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(f"the dataset gives {micro_per_epoch} micro-batches of {plan.micro_batch} "
                         f"per rank per epoch, fewer than the {plan.grad_accum} accumulation steps "
                         f"of one optimizer step ({plan.describe()}): use more data or a smaller "
                         f"train.batch_size")
    sched = build_schedule(t, steps_per_epoch, plan.global_batch)
    total_steps = sched.total_steps
    stop_at = min(total_steps, t.max_steps) if t.max_steps else total_steps

    # identical initial weights on every rank (ZeRO-3 partitions each rank's own copy)
    _seed_all(t.seed)
    from groupvit_fast.config import build_model
    model = convert_sync_batchnorm(build_model(cfg.model))
    n_params = sum(p.numel() for p in model.parameters())
    # fused=True: the same AdamW update in one pass over each tensor instead of ~10 elementwise
    # passes. ZeRO steps it on flat partitions that hold the 49408-row token embedding (3.2M
    # values even in the small recipe); measured 10.4 -> 2.1 ms per step for 3.7M fp32
    # parameters on one CPU thread.
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=sched.lr_for_step(0),
                                  betas=tuple(t.betas), eps=t.eps, fused=True)
    engine, _, _, _ = _ds_initialize(model, optimizer, ds_conf)
    model_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    # the official runs shift the seed by the rank (Gumbel noise, drop-path differ per rank)
    _seed_all(t.seed + rank)

    out_dir = cfg.checkpoint.output_dir
    if not os.path.isabs(out_dir):
        out_dir = os.path.abspath(out_dir)
    step, epoch, micro_in_epoch = 0, 0, 0
    # model selection on val (monitor.select_last_epochs): every pass's score, the best one, and
    # on rank 0 its weights; all of it is part of each checkpoint's trainer state
    selection = {"history": [], "best": None}
    selected_sd = None
    select_window = cfg.monitor.select_last_epochs
    if resume:
        got = ckpt.load(engine, out_dir)
        if got is None:
            say(f"[train] --resume: no checkpoint in {out_dir}, starting from scratch")
        else:
            tag, client, tstate = got
            if client.get("world_size") != world or client.get("global_batch") != plan.global_batch:
                raise RuntimeError(
                    f"checkpoint {tag} was written with world size {client.get('world_size')} and "
                    f"global batch {client.get('global_batch')}; this run has {world} and "
                    f"{plan.global_batch}. Exact resume (same data order) needs the same world "
                    f"size and batch")
            step, epoch = int(tstate["step"]), int(tstate["epoch"])
            micro_in_epoch = int(tstate["micro_in_epoch"])
            loader = new_epoch(loader, epoch)
            loader.load_state_dict(tstate["loader"])
            ckpt.set_rng_state(tstate["rng"])
            if "selection" in tstate:
                selection = tstate["selection"]
                selected_sd = tstate.get("selected_weights")  # rank 0 holds them
            say(f"[train] resumed from {os.path.join(out_dir, tag)} at step {step} (epoch {epoch})")

    say(f"[train] {cfg.name}: {n_params / 1e6:.2f}M params, {plan.describe()}, ZeRO-{stage}, "
        f"{precision}, {steps_per_epoch} steps/epoch × {t.epochs} epochs = {total_steps} steps"
        f"{f' (stopping at {stop_at})' if stop_at < total_steps else ''}, lr {sched.base_lr:.3g} "
        f"(warm-up {sched.warmup_steps} steps from {sched.warmup_lr:.3g}, cosine to "
        f"{sched.min_lr:.3g}), device {device.type} × {world}")
    from .grad_cache import accum_mode_message
    say("[train] " + accum_mode_message(
        "gradcache" if t.grad_cache else "naive", plan.global_batch, plan.micro_batch,
        plan.grad_accum, world))

    tb_dir = os.path.join(out_dir, "tb") if cfg.monitor.tensorboard else None
    if is_main:
        os.makedirs(out_dir, exist_ok=True)
    mon = Monitor(enabled=is_main, total_steps=stop_at, start_step=step,
                  progress=cfg.monitor.progress, tensorboard_dir=tb_dir,
                  log_every=cfg.monitor.log_every_steps,
                  metrics_path=os.path.join(out_dir, "metrics.jsonl"))
    last_ckpt = None
    if resume:
        last_ckpt = os.path.join(out_dir, ckpt.read_latest(out_dir) or "") if step else None
    else:
        try:
            old = ckpt.read_latest(out_dir)
        except FileNotFoundError:
            old = None
        if old:
            say(f"[train] {out_dir} holds checkpoint {old} of an earlier run: starting from "
                f"scratch and replacing it (pass --resume to continue it)")
        if is_main and os.path.exists(mon.metrics_path or ""):
            os.remove(mon.metrics_path)  # a fresh run starts a fresh step log

    def client_state():
        return {"step": step, "epoch": epoch, "world_size": world,
                "global_batch": plan.global_batch, "config": cfg.to_dict()}

    def trainer_state():
        st = {"step": step, "epoch": epoch, "micro_in_epoch": micro_in_epoch,
              "loader": loader.state_dict(), "rng": ckpt.rng_state()}
        if select_window:
            st["selection"] = selection
            if is_main:
                st["selected_weights"] = selected_sd
        return st

    def save():
        nonlocal last_ckpt
        last_ckpt = ckpt.save(engine, out_dir, step, client_state(), trainer_state(),
                              keep_last=cfg.checkpoint.keep_last)
        mon.write(f"[train] checkpoint {last_ckpt}")

    @contextlib.contextmanager
    def eval_copy(sd):
        """A fresh eval-mode model holding the full state_dict ``sd``; the RNG streams are
        restored on exit, so evaluating a copy never changes the training trajectory."""
        rng = ckpt.rng_state()
        try:
            m = build_model(cfg.model)
            m.load_state_dict(official_shapes(sd, m.state_dict()))
            yield m.to(device).eval()
        finally:
            ckpt.set_rng_state(rng)

    def evaluate(sd=None):
        """Every rank evaluates a copy of the full model (``sd``, else the current weights, ZeRO-3
        parameters gathered first) on its share of the images."""
        if not cfg.monitor.eval_dataset:
            return None
        if sd is None:
            sd = _full_state_dict(engine.module)
        res, err = None, None
        try:
            with eval_copy(sd) as m:
                res = run_seg_eval(m, cfg, rank, world)
        except Exception as e:  # the hook must not kill a long run
            err = f"{type(e).__name__}: {e}"
        if err:
            # a failure before the collective inside evaluate_dataset happens on every rank alike
            mon.write(f"[train] step {step}: segmentation eval skipped: {err}")
        elif res is not None:
            mon.write(f"[train] step {step}: zero-shot {cfg.monitor.eval_dataset} mIoU "
                      f"{res['mIoU']} ({res.get('num_images')} images, "
                      f"{res.get('seconds', 0):.0f} s)")
            if res.get("mIoU") is not None:
                mon.scalar("eval/mIoU", res["mIoU"], step)
        dist.barrier()
        return res

    def select():
        """Score the current weights on the val split; keep them if they beat the best so far
        (ties keep the earlier)."""
        nonlocal selected_sd
        sd = _full_state_dict(engine.module)
        with eval_copy(sd) as m:
            res = run_val_selection(m, cfg)
        rec = {"step": step, "epoch": epoch, **res}  # epoch: 0-based, as in the export
        selection["history"].append(rec)
        best = selection["best"]
        if best is None or rec["mIoU"] > best["mIoU"]:
            selection["best"] = rec
            selected_sd = sd if is_main else None
        mon.write(f"[train] step {step}: val mIoU {rec['mIoU']:.2f} at background threshold "
                  f"{rec['bg_thresh']} ({rec['images']} {cfg.monitor.eval_dataset} val images); "
                  f"selected so far: step {selection['best']['step']} "
                  f"({selection['best']['mIoU']:.2f})")
        mon.scalar("select/val_mIoU", rec["mIoU"], step)

    opt_groups = optimizer.param_groups
    ramp_steps = (max(1, round(t.assign_ramp_epochs * steps_per_epoch))
                  if t.assign_ramp_start else 0)
    it = iter(loader)
    losses_hist, step_times = [], []
    images_per_s = 0.0
    eval_res = None
    loss_keys = None
    saved_at = step if (resume and last_ckpt) else None
    try:
        while step < stop_at:
            if micro_in_epoch >= steps_per_epoch * plan.grad_accum:
                epoch += 1
                micro_in_epoch = 0
                loader = new_epoch(loader, epoch)
                it = iter(loader)
            lr = sched.lr_for_step(step)
            for g in opt_groups:
                g["lr"] = lr
            if ramp_steps:
                factors = assign_scale_factors(t.assign_ramp_start, step, ramp_steps)
                engine.module.img_encoder.assign_scale_factor = factors
            t0 = time.perf_counter()
            use_gc = t.grad_cache and plan.grad_accum > 1
            micro = []
            for _ in range(plan.grad_accum):
                try:
                    images, texts = next(it)
                except StopIteration:
                    raise RuntimeError(
                        f"the loader ended after {micro_in_epoch} micro-batches of epoch {epoch} "
                        f"but len() promised {micro_per_epoch}") from None
                micro_in_epoch += 1
                micro.append((images.to(device, dtype=model_dtype, non_blocking=True),
                              texts.to(device, non_blocking=True)))
            if use_gc:
                # one global-batch objective over all micro batches; runs the engine steps
                from .grad_cache import grad_cache_step

                def abort_if_nonfinite(losses, _step=step, _epoch=epoch, _lr=lr):
                    # decided identically on every rank, before any gradient or update
                    v = torch.stack([losses[k].detach().float().reshape(())
                                     for k in sorted(losses) if "loss" in k])
                    bad = torch.tensor([0.0 if bool(torch.isfinite(v).all()) else 1.0])
                    dist.all_reduce(bad)
                    if bad.item() > 0:
                        _check_finite(torch.tensor([float("nan")]), _step, _epoch, _lr,
                                      last_ckpt)
                out = grad_cache_step(engine, micro, before_backward=abort_if_nonfinite)
                if loss_keys is None:
                    loss_keys = sorted(k for k in out if "loss" in k and k != "total_loss")
                vec = torch.stack([sum(out[k].detach().float() for k in loss_keys)] +
                                  [out[k].detach().float() for k in loss_keys])
                dist.all_reduce(vec)
                acc = vec / world
                # the step already ran inside grad_cache_step; nothing is saved after it, so the
                # last checkpoint on disk is still the last good one
                _check_finite(acc, step, epoch, lr, last_ckpt)
            else:
                acc = None
                for images, texts in micro:
                    out = engine(images, texts)
                    if loss_keys is None:
                        loss_keys = sorted(k for k in out if "loss" in k)
                    total = sum(out[k] for k in loss_keys)
                    vec = torch.stack([total.detach().float()] +
                                      [out[k].detach().float() for k in loss_keys])
                    dist.all_reduce(vec)  # NaN anywhere reaches every rank
                    vec = vec / world
                    _check_finite(vec, step, epoch, lr, last_ckpt)  # before backward/step
                    engine.backward(total)
                    engine.step()
                    acc = vec if acc is None else acc + vec
                acc = acc / plan.grad_accum
            acc = acc.tolist()
            step += 1
            dt = time.perf_counter() - t0
            if step > 1 or resume:
                step_times.append(dt)
            images_per_s = plan.global_batch / dt
            grad_norm = engine.get_global_grad_norm()
            with _gathered([engine.module.logit_scale]):
                logit_scale = float(engine.module.logit_scale.detach().float().exp())
            scalars = {"loss/total": acc[0], "lr": lr, "logit_scale": logit_scale,
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "images_per_s": images_per_s, "epoch": float(epoch)}
            for k, v in zip(loss_keys, acc[1:]):
                scalars[f"loss/{k}"] = v
            if ramp_steps:
                for i, f in enumerate(factors):
                    scalars[f"assign_scale_factor/{i}"] = f
            losses_hist.append(acc[0])
            mon.step(step, scalars)
            if (select_window and step % steps_per_epoch == 0
                    and step // steps_per_epoch > t.epochs - select_window):
                select()  # before the save, so the checkpoint of this step holds its result
            every = cfg.checkpoint.save_every_steps
            if every and step % every == 0 and step < stop_at:
                save()
                saved_at = step
            ev = cfg.monitor.eval_every_steps
            if ev and step % ev == 0 and step < stop_at:
                eval_res = evaluate()
        if ramp_steps:
            # what is saved, exported and evaluated is the configured model (the factor is not
            # in the weights), also when max_steps stopped the run inside the ramp
            engine.module.img_encoder.assign_scale_factor = [1.0] * len(t.assign_ramp_start)
        if saved_at != step:
            save()
        # the checkpoint keeps the last step (for --resume); the export is the selected weights
        chosen = selection["best"] if select_window else None
        if chosen is not None:
            say(f"[train] selected the weights of step {chosen['step']} (end of epoch "
                f"{chosen['epoch'] + 1} of {t.epochs}): val mIoU {chosen['mIoU']:.2f}, best of "
                + ", ".join(f"{r['mIoU']:.1f}" for r in selection["history"]))
        export_path = None
        if cfg.checkpoint.export_at_end and is_main:
            if chosen is not None:
                sd, exp_step, exp_epoch = selected_sd, chosen["step"], chosen["epoch"]
                extra = {"selection": selection, "trained_steps": step}
            else:
                sd = ckpt.consolidated_state_dict(out_dir, ckpt.tag_for(step), stage)
                exp_step, exp_epoch, extra = step, epoch, {}
            export_path = os.path.join(out_dir, "export",
                                       f"{cfg.name}_{ckpt.tag_for(exp_step)}.pth")
            ckpt.export_official(cfg.model, sd, export_path,
                                 extra={"config": cfg.to_dict(), "epoch": exp_epoch,
                                        "step": exp_step, **extra})
        dist.barrier()
        if cfg.monitor.eval_dataset:
            final_sd = None
            if chosen is not None:
                box = [selected_sd]  # only rank 0 holds the selected weights
                if world > 1:
                    dist.broadcast_object_list(box, src=0)
                final_sd = box[0]
            eval_res = evaluate(final_sd)
    finally:
        mon.close()
    if is_main and eval_res is not None:
        ckpt.atomic_write_text(os.path.join(out_dir, "eval.json"),
                               json.dumps({"step": chosen["step"] if chosen else step,
                                           "dataset": cfg.monitor.eval_dataset,
                                           **eval_res}, indent=1, default=str))
    mem = peak_memory_mib(device)
    mean_dt = float(np.mean(step_times)) if step_times else float("nan")
    result = TrainResult(steps=step, final_loss=losses_hist[-1] if losses_hist else float("nan"),
                         checkpoint=last_ckpt, export=export_path, tensorboard=tb_dir,
                         step_time_s=mean_dt,
                         images_per_s=plan.global_batch / mean_dt if step_times else images_per_s,
                         peak_memory_mib=mem, losses=losses_hist, eval=eval_res,
                         selected=chosen)
    mems = torch.tensor([mem], dtype=torch.float64)
    gathered = [torch.zeros_like(mems) for _ in range(world)]
    dist.all_gather(gathered, mems)
    mem_ranks = [round(g.item(), 1) for g in gathered]
    if is_main:
        summary = {"name": cfg.name, "steps": step, "final_loss": result.final_loss,
                   "step_time_s": mean_dt, "images_per_s": result.images_per_s,
                   "peak_memory_mib_per_rank": mem_ranks, "world_size": world,
                   "global_batch": plan.global_batch, "micro_batch": plan.micro_batch,
                   "grad_accum": plan.grad_accum, "zero_stage": stage, "precision": precision,
                   "device": device.type, "torch_threads": torch.get_num_threads(),
                   "checkpoint": last_ckpt, "export": export_path, "tensorboard": tb_dir,
                   "mIoU": (eval_res or {}).get("mIoU"), "selected": chosen}
        ckpt.atomic_write_text(os.path.join(out_dir, "summary.json"),
                               json.dumps(summary, indent=1))
    say(f"[train] done: {step} steps, final loss {result.final_loss:.4f}, "
        f"{mean_dt:.3f} s/step ({result.images_per_s:.1f} img/s), peak memory per rank "
        f"{', '.join(f'{m:.0f}' for m in mem_ranks)} MiB; checkpoint {last_ckpt}; "
        f"export {export_path}; tensorboard {tb_dir}; summary "
        f"{os.path.join(out_dir, 'summary.json')}")
    return result

