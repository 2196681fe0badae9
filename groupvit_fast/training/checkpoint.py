"""Crash-safe DeepSpeed checkpoints, resume state and the consolidated official-layout export.

Layout under ``output_dir``::

    step00000040/          one DeepSpeed checkpoint (model/optimizer shards of every rank)
        trainer_rank0.pt   per-rank trainer state: step, epoch, loader position, RNG states
    latest                 name of the newest *complete* checkpoint directory
    export/<name>_step00000040.pth   {'model': official state_dict, 'config', 'epoch', 'step'}

A checkpoint is first written to ``tmp-stepN``; only when every rank has finished does rank 0
rename it to ``stepN`` and then replace ``latest`` (write tmp + os.replace). A kill at any point
leaves ``latest`` naming a complete checkpoint; stale ``tmp-*`` directories are removed on the
next save."""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

_STEP_RE = re.compile(r"^step(\d+)$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
          "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def read_latest(output_dir: str) -> Optional[str]:
    """Tag of the newest complete checkpoint, or None."""
    p = os.path.join(output_dir, "latest")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        tag = f.read().strip()
    if not tag or not os.path.isdir(os.path.join(output_dir, tag)):
        raise FileNotFoundError(f"{p} names checkpoint {tag!r}, which is missing in {output_dir}")
    return tag


def list_checkpoints(output_dir: str):
    if not os.path.isdir(output_dir):
        return []
    tags = [t for t in os.listdir(output_dir) if _STEP_RE.match(t)
            and os.path.isdir(os.path.join(output_dir, t))]
    return sorted(tags, key=lambda t: int(_STEP_RE.match(t).group(1)))


def save(engine, output_dir: str, step: int, client_state: dict, trainer_state: dict,
         keep_last: int = 2) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tag = tag_for(step)
    tmp_tag = "tmp-" + tag
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        for t in os.listdir(output_dir):  # leftovers of a run killed mid-write
            if t.startswith("tmp-") and os.path.isdir(os.path.join(output_dir, t)):
                shutil.rmtree(os.path.join(output_dir, t), ignore_errors=True)
    _barrier()
    engine.save_checkpoint(output_dir, tag=tmp_tag, client_state=client_state, save_latest=False)
    tmp_dir = os.path.join(output_dir, tmp_tag)
    os.makedirs(tmp_dir, exist_ok=True)
    atomic_torch_save(trainer_state, os.path.join(tmp_dir, f"trainer_rank{rank}.pt"))
    _barrier()
    final = os.path.join(output_dir, tag)
    if rank == 0:
        if os.path.isdir(final):  # re-saving a step (e.g. after resume): replace it whole
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp_dir, final)
            atomic_write_text(os.path.join(output_dir, "latest"), tag)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, final)
            atomic_write_text(os.path.join(output_dir, "latest"), tag)
        for t in list_checkpoints(output_dir)[:-keep_last]:
            if t != tag:
                shutil.rmtree(os.path.join(output_dir, t), ignore_errors=True)
    _barrier()
    return final


def load(engine, output_dir: str, tag: Optional[str] = None):
    """Collective. Returns (tag, client_state, trainer_state of this rank) or None when there is
    nothing to resume from."""
    tag = tag or read_latest(output_dir)
    if tag is None:
        return None
    rank = dist.get_rank() if dist.is_initialized() else 0
    path, client_state = engine.load_checkpoint(output_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag!r} from {output_dir}")
    tpath = os.path.join(output_dir, tag, f"trainer_rank{rank}.pt")
    if not os.path.isfile(tpath):
        raise FileNotFoundError(
            f"{tpath} is missing: checkpoint {tag} was written by fewer ranks than the "
            f"{dist.get_world_size() if dist.is_initialized() else 1} running now; resume with "
            f"the same world size")
    trainer_state = torch.load(tpath, map_location="cpu", weights_only=False)
    return tag, client_state, trainer_state


def consolidated_state_dict(output_dir: str, tag: str, zero_stage: int):
    """fp32 full state_dict (parameters and BN buffers) from a DeepSpeed checkpoint of any ZeRO
    stage, keys as in the unwrapped model."""
    ckpt_dir = os.path.join(output_dir, tag)
    if zero_stage == 0:
        files = sorted(f for f in os.listdir(ckpt_dir) if f.endswith("model_states.pt"))
        sd = torch.load(os.path.join(ckpt_dir, files[0]), map_location="cpu",
                        weights_only=False)["module"]
        return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    import contextlib
    import io
    # it prints per-tensor progress and a tqdm bar
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        sd = get_fp32_state_dict_from_zero_checkpoint(output_dir, tag=tag)
    return {k: v.contiguous() for k, v in sd.items()}


def export_official(model_cfg, state_dict: dict, path: str, *, extra: Optional[dict] = None):
    """Write ``{'model': state_dict}`` in the official key order (a freshly built model's
    ``state_dict()`` order), loaded strictly so a missing or extra key is an error here rather
    than at evaluation time."""
    from groupvit_fast.config import build_model
    from .engine import official_shapes
    model = build_model(model_cfg)
    state_dict = official_shapes(state_dict, model.state_dict())
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"export {path}: consolidated state_dict does not match the model: "
                           f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                           f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    out = {"model": model.state_dict()}
    if extra:
        out.update(extra)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_torch_save(out, path)
    return path
