"""Training configuration: nested dataclasses whose defaults are the released GCC+YFCC recipe
(ref §7), YAML config files with ``_base_`` inheritance, and ``a.b.c=value`` overrides.

A config file only lists the fields it changes; unknown keys are an error that names the file and
the valid fields, so a typo can never silently train the wrong recipe."""
from __future__ import annotations

import ast
import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from ..config import ImageEncoderConfig, ModelConfig, TextEncoderConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


@dataclass
class DataSection:
    # 'random': in-memory random images/tokens (no files; for tests and smoke runs);
    # 'synthetic': the embedded dataset of groupvit_fast.data.synthetic;
    # anything else is handed to groupvit_fast.data.build_train_loader (e.g. 'gcc_yfcc').
    dataset: str = "gcc_yfcc"
    loader: str = "auto"  # 'auto' | 'dali' | 'torch' (groupvit_fast.data backends)
    img_size: int = 224
    # samples per epoch; None = what the dataset declares (ref §6.1: 28,663,147 for gcc+yfcc)
    length: Optional[int] = None
    # extra keyword arguments for groupvit_fast.data.DataConfig (shard patterns, cache dir, ...)
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimSection:
    epochs: int = 30
    warmup_epochs: int = 2
    batch_size: int = 4096  # global batch = micro × accumulation × world size
    micro_batch_size: Optional[int] = 256  # per rank; None = derive (accumulation 1)
    grad_accum_steps: Optional[int] = None  # None = derive from batch_size / (micro × world)
    base_lr: float = 1.6e-3
    warmup_lr: float = 4e-6
    min_lr: float = 4e-5
    # official linear scaling: every LR × global_batch / lr_reference_batch
    lr_reference_batch: int = 4096
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    clip_grad: float = 5.0
    # with accumulation > 1: GradCache (groupvit_fast.training.grad_cache) so one optimizer step
    # contrasts the whole global batch (negatives, projector BN) as the official 16-GPU run did;
    # False = plain accumulation (each micro batch only sees micro × world negatives)
    grad_cache: bool = True
    precision: str = "auto"  # 'auto' (bf16 on a bf16 GPU, else fp32) | 'fp32' | 'bf16' | 'fp16'
    seed: int = 0
    max_steps: Optional[int] = None  # stop early (the schedule still spans all epochs)
    # Recipe option, not in the paper: each grouping stage's assignment scale starts at
    # assign_ramp_start[i] x its configured value and rises linearly to it over
    # assign_ramp_epochs (Gumbel-noise annealing: early on the noise decides more assignments,
    # so no group token is starved of tokens, and gradient, from the first steps). [] = off
    assign_ramp_start: List[float] = field(default_factory=list)
    assign_ramp_epochs: float = 0.0


@dataclass
class DeepSpeedSection:
    config: str = "configs/ds_zero2.json"  # ZeRO settings; batch/precision/clip come from train.*
    zero_stage: Optional[int] = None  # overrides the JSON's zero_optimization.stage


@dataclass
class CheckpointSection:
    output_dir: str = "output/gcc_yfcc"
    save_every_steps: int = 1000
    keep_last: int = 2
    export_at_end: bool = True  # consolidated official-layout .pth next to the checkpoints


@dataclass
class MonitorSection:
    progress: bool = True
    tensorboard: bool = True
    log_every_steps: int = 1
    eval_every_steps: int = 0  # 0 = only at the end of training (when eval_dataset is set)
    eval_dataset: Optional[str] = None  # e.g. 'synthetic' (held-out split, groupvit_fast.seg)
    eval_max_images: Optional[int] = None
    # keyword arguments for groupvit_fast.seg.ZeroShotSegmenter (crop, stride, img_scale, ...)
    eval_options: Dict[str, Any] = field(default_factory=dict)
    # Model selection on the validation split (0: off, the last step's weights are exported).
    # At the end of each of the last N epochs, segment eval_dataset's *val* split with the
    # background threshold chosen there (select_bg_thresh, as the protocol does) and keep the
    # weights with the best mIoU; the export and the final eval use them. The test split is
    # never read. The selection travels in the checkpoints, so a resumed run selects the same.
    # A window longer than the run covers every epoch.
    select_last_epochs: int = 0
    select_max_images: Optional[int] = None  # val images per selection pass (None: all)


@dataclass
class TrainConfig:
    name: str = "gcc_yfcc"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataSection = field(default_factory=DataSection)
    train: OptimSection = field(default_factory=OptimSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# generic dataclass <-> dict with type checking

def _hints(klass) -> Dict[str, Any]:
    return typing.get_type_hints(klass)


def _coerce(value, tp, where: str):
    """Check ``value`` against the annotation ``tp`` (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, List, Sequence):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        (a,) = args or (Any,)
        return [_coerce(v, a, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise TypeError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(klass, d: dict, where: str = "config"):
    """Build dataclass ``klass`` from a (partial) nested dict, checking names and types."""
    if not isinstance(d, dict):
        raise TypeError(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = _hints(klass)
    names = [f.name for f in dataclasses.fields(klass)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields: {names}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in d.items()}
    return klass(**kwargs)


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; mappings merge, everything else (lists too) replaces."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# files and overrides

def resolve_config_path(path: str) -> str:
    """A file path, or a recipe name under configs/ ('default', 'gcc_yfcc', 'gcc_redcap')."""
    cands = [path]
    if not os.path.isabs(path):
        cands += [os.path.join(CONFIG_DIR, path), os.path.join(CONFIG_DIR, path + ".yaml"),
                  os.path.join(REPO_ROOT, path)]
    for c in cands:
        if os.path.isfile(c):
            return os.path.abspath(c)
    names = sorted(f[:-5] for f in os.listdir(CONFIG_DIR) if f.endswith(".yaml")) \
        if os.path.isdir(CONFIG_DIR) else []
    raise FileNotFoundError(f"config {path!r} not found (looked at {cands}); recipes in "
                            f"{CONFIG_DIR}: {names}")


def load_config_dict(path: str, _seen=()) -> dict:
    import yaml
    path = resolve_config_path(path)
    if path in _seen:
        raise ValueError(f"config {path}: circular _base_ chain {list(_seen) + [path]}")
    with open(path) as f:
        try:
            d = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config {path}: invalid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config {path}: top level must be a mapping, got {type(d).__name__}")
    base = d.pop("_base_", None)
    if base:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        d = merge(load_config_dict(base_path, _seen + (path,)), d)
    return d


def parse_value(text: str):
    """Literal of a command-line value: JSON/Python literals (``[2,2,1]``, ``1e-3``, ``true``,
    ``None``), otherwise the bare string."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null", "~"):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(t)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            pass
    if t[:1] in ("{", "["):
        import yaml
        # YAML flow syntax, as in the config files: {n_train: 256, n_val: 40}. Only for
        # brackets, so a bare word never turns into a YAML 1.1 boolean or number
        try:
            return yaml.safe_load(t)
        except yaml.YAMLError as e:
            raise ValueError(f"value {t!r} starts like a list or mapping but does not parse: "
                             f"{str(e).splitlines()[0]}") from None
    return t


def parse_overrides(items: Sequence[str]) -> dict:
    """``['train.lr=1e-3', 'model.img.depths=[2,2,1]']`` -> nested dict."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected KEY=VALUE, e.g. train.base_lr=1e-3")
        key, val = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: bad key {key!r}")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p!r} is set both as a value and a section")
        node[parts[-1]] = parse_value(val)
    return out


def build_config(path: Optional[str] = None, overrides: Sequence[str] = (),
                 extra: Optional[dict] = None) -> TrainConfig:
    """TrainConfig from dataclass defaults (the release) ← file (with ``_base_``) ← ``extra``
    dict ← ``a.b=value`` overrides."""
    d: dict = {}
    if path:
        d = load_config_dict(path)
    if extra:
        d = merge(d, extra)
    if overrides:
        d = merge(d, parse_overrides(overrides))
    where = os.path.basename(path) if path else "config"
    cfg = from_dict(TrainConfig, d, where)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    t = cfg.train
    errs = []
    if t.epochs <= 0:
        errs.append(f"train.epochs must be > 0, got {t.epochs}")
    if not 0 <= t.warmup_epochs <= t.epochs:
        errs.append(f"train.warmup_epochs must be in [0, epochs={t.epochs}], got {t.warmup_epochs}")
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        errs.append(f"train.precision must be auto|fp32|bf16|fp16, got {t.precision!r}")
    if len(t.betas) != 2:
        errs.append(f"train.betas must have 2 values, got {t.betas}")
    if t.assign_ramp_start:
        n_stages = sum(1 for g in cfg.model.img.num_group_tokens if g > 0)
        if len(t.assign_ramp_start) != n_stages or not all(f > 0 for f in t.assign_ramp_start):
            errs.append(f"train.assign_ramp_start must give one factor > 0 per grouping stage "
                        f"({n_stages}), got {t.assign_ramp_start}")
        if not 0 < t.assign_ramp_epochs <= t.epochs:
            errs.append(f"train.assign_ramp_epochs must be in (0, epochs={t.epochs}] with "
                        f"assign_ramp_start set, got {t.assign_ramp_epochs}")
    if cfg.deepspeed.zero_stage not in (None, 0, 1, 2, 3):
        errs.append(f"deepspeed.zero_stage must be 0..3, got {cfg.deepspeed.zero_stage}")
    if cfg.checkpoint.save_every_steps < 0:
        errs.append("checkpoint.save_every_steps must be >= 0 (0 = only at the end)")
    if cfg.checkpoint.keep_last < 1:
        errs.append(f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}")
    m = cfg.monitor
    if m.select_last_epochs < 0:
        errs.append(f"monitor.select_last_epochs must be >= 0 (0 = off), got "
                    f"{m.select_last_epochs}")
    if m.select_last_epochs and not m.eval_dataset:
        errs.append(f"monitor.select_last_epochs={m.select_last_epochs} needs "
                    f"monitor.eval_dataset (whose val split the weights are selected on); set "
                    f"monitor.select_last_epochs=0 to export the last step's weights instead")
    if m.select_max_images is not None and m.select_max_images < 1:
        errs.append(f"monitor.select_max_images must be >= 1 or null, got {m.select_max_images}")
    if cfg.data.img_size != cfg.model.img.img_size:
        errs.append(f"data.img_size ({cfg.data.img_size}) != model.img.img_size "
                    f"({cfg.model.img.img_size}): training crops must match the pos-embed grid")
    if errs:
        raise ValueError("invalid training config:\n  " + "\n  ".join(errs))


__all__ = ["TrainConfig", "DataSection", "OptimSection", "DeepSpeedSection", "CheckpointSection",
           "MonitorSection", "ModelConfig", "ImageEncoderConfig", "TextEncoderConfig",
           "build_config", "parse_overrides", "parse_value", "load_config_dict", "from_dict",
           "merge", "resolve_config_path", "validate", "REPO_ROOT", "CONFIG_DIR"]
