"""Reading, writing and loading GroupViT checkpoints.

* ``read_checkpoint(path)`` reads a file safely: ``torch.load(weights_only=True)``; when that
  fails only because the pickle names classes outside torch's allow-list (the official ``.pth``
  files pickle an OmegaConf ``DictConfig`` under ``'config'``), those names are bound to inert
  placeholder classes and the file is read again, still by torch's restricted unpickler. No
  pickled code runs and omegaconf is not needed. ``.safetensors`` files and HF model
  directories are read too.
* ``load_checkpoint(path_or_state_dict, model=None)`` loads official ``.pth`` files, HF
  ``GroupViTModel`` state dicts (converted on the fly), safetensors and our own saves; with
  ``model=None`` the model is built from the checkpoint (config inferred from tensor shapes, and
  from the pickled official config when present). Any mismatch raises one ``CheckpointError``
  naming the file, missing and unexpected keys, and shape mismatches (expected vs found).
* ``save_checkpoint(model, path, **extra)`` writes ``{'model': state_dict, **extra}``
  atomically (tmp file in the same directory + fsync + ``os.replace``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import re
import tempfile
import warnings
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .convert import (MULTI_LABEL_SCALE, ConversionError, detect_layout,
                      hf_to_official)

__all__ = ["CheckpointError", "PickledObjectPlaceholder", "read_checkpoint",
           "extract_state_dict", "to_official_state_dict", "load_state_dict_any",
           "infer_model_config", "checkpoint_config", "placeholder_to_python",
           "load_checkpoint", "save_checkpoint", "atomic_save"]

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model. The message names the file
    and lists every problem at once."""


# --------------------------------------------------------------------------------------------
# Safe reading
# --------------------------------------------------------------------------------------------
class PickledObjectPlaceholder:
    """Inert stand-in for a class or function a checkpoint pickled but that is not on torch's
    ``weights_only`` allow-list (e.g. ``omegaconf.dictconfig.DictConfig``). Constructing,
    calling or restoring state only records the arguments; nothing of the original runs.

    ``pickled_name`` is the dotted name from the pickle, ``args``/``kwargs`` the constructor or
    call arguments, ``state`` what ``__setstate__`` received (for OmegaConf: ``_content`` etc.).
    ``placeholder_to_python`` turns OmegaConf placeholders back into plain dicts/lists.
    """

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):  # arguments already recorded by __new__
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<placeholder for pickled {self.pickled_name}>"


_PLACEHOLDERS: Dict[str, type] = {}

# Globals that are plain data types and harmless to use for real: keeping them real keeps the
# placeholders' states made of ordinary Python values. ``collections.defaultdict`` becomes a
# plain dict because torch's unpickler only fills dict/OrderedDict/Counter via SETITEMS.
_REAL_GLOBALS = {
    "builtins.dict": dict, "builtins.list": list, "builtins.tuple": tuple, "builtins.set": set,
    "builtins.frozenset": frozenset, "builtins.int": int, "builtins.float": float,
    "builtins.str": str, "builtins.bool": bool, "builtins.bytes": bytes,
    "builtins.complex": complex, "builtins.object": object,
    "collections.defaultdict": lambda *args: {},
}


def _placeholder(name: str):
    if name in _REAL_GLOBALS:
        return _REAL_GLOBALS[name]
    if name not in _PLACEHOLDERS:
        short = re.sub(r"\W", "_", name.rsplit(".", 1)[-1]) or "Unknown"
        _PLACEHOLDERS[name] = type(short, (PickledObjectPlaceholder,),
                                   {"pickled_name": name, "__module__": __name__,
                                    "__qualname__": f"PickledObjectPlaceholder[{name}]"})
    return _PLACEHOLDERS[name]


_UNSUPPORTED_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_BLOCKED_RE = re.compile(r"unsupported GLOBAL ([\w.]+) whose module (\w+) is blocked")


def _rewind(f):
    if hasattr(f, "seek"):
        f.seek(0)


def _torch_load_weights_only(f, map_location, extra_globals=()):
    _rewind(f)
    if extra_globals:
        with torch.serialization.safe_globals([(_placeholder(n), n) for n in extra_globals]):
            return torch.load(f, map_location=map_location, weights_only=True)
    return torch.load(f, map_location=map_location, weights_only=True)


def _read_pickle_safely(f, source: str, map_location):
    try:
        return _torch_load_weights_only(f, map_location)
    except pickle.UnpicklingError as first:
        err = first
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        detail = str(e).strip().splitlines()
        raise CheckpointError(f"{source}: not a readable torch checkpoint: "
                              f"{detail[0] if detail else type(e).__name__}") from e
    if not (_UNSUPPORTED_RE.search(str(err)) or _BLOCKED_RE.search(str(err))):
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()
        raise CheckpointError(f"{source}: not a readable torch checkpoint "
                              f"(weights_only=True): {detail[0] if detail else err!r}") from err
    names = set()
    try:
        _rewind(f)
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
    except Exception:  # legacy (non-zip) files: learn the names from the errors below
        pass
    tried: Optional[set] = None
    for _ in range(256):
        msg = str(err)
        blocked = _BLOCKED_RE.search(msg)
        if blocked:
            raise CheckpointError(
                f"{source}: refusing to read: the pickle references {blocked.group(1)} from "
                f"module '{blocked.group(2)}', which only a pickle that runs system code needs. "
                f"A model checkpoint has no reason to; do not load this file unless you know "
                f"where it comes from (and then only with torch.load(weights_only=False)).")
        if tried is not None or not names:  # learn the next name from the error
            m = _UNSUPPORTED_RE.search(msg)
            detail = msg.split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            if m is None:
                raise CheckpointError(
                    f"{source}: cannot be read with torch.load(weights_only=True) even with "
                    f"inert placeholders for {sorted(names)}: {detail}") from err
            name = m.group(1)
            if "." not in name:  # torch prints builtins without their module
                name = "builtins." + name
            if tried is not None and name in tried:
                raise CheckpointError(f"{source}: cannot be read safely: {name} is refused "
                                      f"even as an inert placeholder: {detail}") from err
            names.add(name)
        tried = set(names)
        try:
            return _torch_load_weights_only(f, map_location, sorted(names))
        except pickle.UnpicklingError as e:
            err = e
    raise CheckpointError(f"{source}: too many unknown pickled globals ({len(names)})")


def _hf_dir_files(path: str) -> List[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = os.path.join(path, index)
        if os.path.isfile(p):
            with open(p) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin", "model.pth", "checkpoint.pth"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            return [p]
    raise CheckpointError(f"{path}: directory without model.safetensors, pytorch_model.bin, "
                          f"model.pth or checkpoint.pth")


def _read_safetensors(path: str, map_location) -> dict:
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - safetensors is a transformers dependency
        raise CheckpointError(f"{path}: reading .safetensors needs "
                              f"`pip install safetensors`") from e
    # safetensors takes a device name; torch.load-style callables/dicts fall back to CPU
    dev = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    try:
        with safe_open(path, framework="pt", device=dev) as fh:
            meta = fh.metadata() or {}
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e
    order = meta.get("groupvit_fast_order")
    if order:
        order = [k for k in json.loads(order) if k in out]
        out = OrderedDict([(k, out[k]) for k in order] +
                          [(k, v) for k, v in out.items() if k not in set(order)])
    extra = meta.get("groupvit_fast_extra")
    if extra:
        return {"model": out, **json.loads(extra)}
    return out


def read_checkpoint(path, map_location="cpu") -> Any:
    """Read a checkpoint file (or HF model directory) without running pickled code.

    Returns what was saved: for official files the dict with ``'model'``, ``'config'`` (an
    inert placeholder, see ``placeholder_to_python``), ``'epoch'``...; for safetensors or HF
    files the flat state dict.
    """
    if isinstance(path, (str, os.PathLike)):
        source = os.fspath(path)
        if os.path.isdir(source):
            merged: "OrderedDict[str, Any]" = OrderedDict()
            for f in _hf_dir_files(source):
                part = read_checkpoint(f, map_location)
                merged.update(extract_state_dict(part, source=f))
            return merged
        if not os.path.exists(source):
            raise CheckpointError(f"{source}: no such checkpoint file")
        if source.endswith(".safetensors"):
            return _read_safetensors(source, map_location)
        with open(source, "rb") as f:
            return _read_pickle_safely(f, source, map_location)
    source = getattr(path, "name", "<file object>")
    return _read_pickle_safely(path, str(source), map_location)


_STATE_DICT_KEYS = ("model", "state_dict", "module", "model_state_dict")


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(obj, *, source: str = "<state dict>") -> "OrderedDict[str, torch.Tensor]":
    """The model state dict inside a checkpoint object: ``obj['model']`` (official and ours),
    ``['state_dict']``, ``['module']`` (DeepSpeed), ``['model_state_dict']``, or ``obj`` itself.
    A ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix shared by all keys is removed."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict-like checkpoint, found "
                              f"{type(obj).__name__}")
    sd = None
    for k in _STATE_DICT_KEYS:
        if k in obj and isinstance(obj[k], Mapping):
            sd = obj[k]
            break
    if sd is None:
        if _is_tensor_dict(obj):
            sd = obj
        else:
            raise CheckpointError(
                f"{source}: no model state dict found (looked for keys {list(_STATE_DICT_KEYS)} "
                f"or a flat dict of tensors); top-level keys: {sorted(map(str, obj))[:20]}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: state dict entries that are not tensors: {bad[:10]}")
    sd = OrderedDict(sd)
    for prefix in ("module.", "_orig_mod."):
        while sd and all(k.startswith(prefix) for k in sd):
            sd = OrderedDict((k[len(prefix):], v) for k, v in sd.items())
    return sd


def to_official_state_dict(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>"
                           ) -> Tuple["OrderedDict[str, torch.Tensor]", Optional[str]]:
    """(official-layout state dict, layout found): HF state dicts are converted."""
    try:
        layout = detect_layout(sd.keys())
        if layout == "hf":
            return hf_to_official(sd), layout
    except ConversionError as e:
        raise CheckpointError(f"{source}: {e}") from e
    return OrderedDict(sd), layout


def load_state_dict_any(path_or_obj, *, map_location="cpu") -> "OrderedDict[str, torch.Tensor]":
    """Official-layout state dict from any supported source (file, directory, checkpoint dict,
    HF or official state dict)."""
    source = os.fspath(path_or_obj) if isinstance(path_or_obj, (str, os.PathLike)) \
        else "<state dict>"
    obj = path_or_obj if isinstance(path_or_obj, Mapping) else read_checkpoint(
        path_or_obj, map_location)
    return to_official_state_dict(extract_state_dict(obj, source=source), source=source)[0]


# --------------------------------------------------------------------------------------------
# Config: from the pickled official config and from tensor shapes
# --------------------------------------------------------------------------------------------
def placeholder_to_python(obj, _depth=0):
    """Plain dicts/lists/values from OmegaConf placeholders (``DictConfig``/``ListConfig``
    keep their children in ``_content``; value nodes keep theirs in ``_val``). Other
    placeholders are returned unchanged."""
    if _depth > 100:
        return obj
    if isinstance(obj, PickledObjectPlaceholder):
        st = obj.state
        if isinstance(st, tuple) and len(st) == 2 and isinstance(st[0], dict):
            st = st[0]
        if isinstance(st, dict):
            if "_content" in st:
                return placeholder_to_python(st["_content"], _depth + 1)
            if "_val" in st:
                return placeholder_to_python(st["_val"], _depth + 1)
        return obj
    if isinstance(obj, Mapping):
        return {k: placeholder_to_python(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(placeholder_to_python(v, _depth + 1) for v in obj)
    return obj


_INTERP_RE = re.compile(r"\$\{([\w.]+)\}\Z")


def _resolve(node, root, _depth=0):
    """Resolve whole-value OmegaConf interpolations like ``${data.text_aug.multi_label}``."""
    if isinstance(node, dict):
        return {k: _resolve(v, root, _depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, _depth) for v in node]
    if isinstance(node, str) and _depth < 10:
        m = _INTERP_RE.match(node)
        if m:
            cur = root
            for part in m.group(1).split("."):
                if not isinstance(cur, dict) or part not in cur:
                    return node
                cur = cur[part]
            return _resolve(cur, root, _depth + 1)
    return node


def checkpoint_config(obj) -> Optional[dict]:
    """The model section of a checkpoint's config as a plain dict (official OmegaConf config
    read through placeholders, or the dict our ``save_checkpoint`` stores), else None."""
    if not isinstance(obj, Mapping) or "config" not in obj:
        return None
    cfg = placeholder_to_python(obj["config"])
    if not isinstance(cfg, dict):
        return None
    cfg = _resolve(cfg, cfg)
    model = cfg.get("model", cfg)
    if isinstance(model, dict) and any(k in model for k in ("img_encoder", "img", "text_encoder",
                                                            "text")):
        return model
    return None


def _model_config_from_dict(d: dict):
    from .config import ImageEncoderConfig, ModelConfig, TextEncoderConfig
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    d = dict(d)
    img = dict(d.pop("img", None) or d.pop("img_encoder", None) or {})
    text = dict(d.pop("text", None) or d.pop("text_encoder", None) or {})
    img_names = {f.name for f in dataclasses.fields(ImageEncoderConfig)}
    text_names = {f.name for f in dataclasses.fields(TextEncoderConfig)}

    def usable(v):  # unresolved interpolations and opaque objects fall back to defaults
        return not isinstance(v, PickledObjectPlaceholder) and not (
            isinstance(v, str) and v.startswith("${"))

    img = {k: v for k, v in img.items() if k in img_names and usable(v)}
    text = {k: v for k, v in text.items() if k in text_names and usable(v)}
    rest = {k: v for k, v in d.items() if k in names and k not in ("img", "text") and usable(v)}
    try:
        return ModelConfig(img=ImageEncoderConfig(**img), text=TextEncoderConfig(**text), **rest)
    except TypeError:
        return None


def _count_indices(keys, pattern: str) -> Dict[int, set]:
    rx = re.compile(pattern)
    out: Dict[int, set] = {}
    for k in keys:
        m = rx.match(k)
        if m:
            out.setdefault(int(m.group(1)), set()).add(m.group(2) if rx.groups > 1 else None)
    return out


def infer_model_config(sd: Mapping[str, torch.Tensor], *, base=None, source: str = "<state dict>"):
    """``ModelConfig`` of an official-layout state dict, from tensor shapes.

    Shapes determine embed width, patch size, input channels, img_size (square pos_embed grid
    × patch), depths, per-stage widths, group tokens, output groups, MLP ratio, qkv bias,
    patch norm, text width/layers/vocab/context, projector output dim and depth, and whether a
    separate ``multi_label_logit_scale`` exists. Not in the shapes: attention heads (taken from
    ``base`` or head_dim 64 as in every release), the number K of multi-label prompts (``base``
    or 3 as in the YFCC release), and training-only settings (``base`` or the release defaults).
    """
    from .config import ModelConfig
    given = base is not None
    base = base if given else ModelConfig()
    need = ["img_encoder.pos_embed", "img_encoder.patch_embed.proj.weight",
            "text_encoder.token_embedding.weight", "text_encoder.positional_embedding"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: cannot infer the model config: missing {missing} "
                              f"(is this a full GroupViT checkpoint? pass model=... otherwise)")
    pos = sd["img_encoder.pos_embed"]
    pw = sd["img_encoder.patch_embed.proj.weight"]  # [C, in_chans, p, p]
    C, n_pos = pos.shape[-1], pos.shape[1]
    grid = math.isqrt(n_pos)
    if pos.ndim != 3 or grid * grid != n_pos or pw.ndim != 4 or pw.shape[2] != pw.shape[3]:
        raise CheckpointError(f"{source}: cannot infer img_size: pos_embed {list(pos.shape)} is "
                              f"not a square grid or patch_embed.proj.weight {list(pw.shape)} is "
                              f"not a square kernel")
    p = pw.shape[-1]
    blocks = _count_indices(sd, r"img_encoder\.layers\.(\d+)\.blocks\.(\d+)\.")
    stages = _count_indices(sd, r"img_encoder\.layers\.(\d+)\.()")
    n = max(stages) + 1 if stages else 0
    if n == 0:
        raise CheckpointError(f"{source}: no img_encoder.layers.* keys")
    # a last stage with no blocks and no group tokens holds no parameter, so its keys cannot
    # show it; a given config that has such trailing stages keeps them
    bd = list(base.img.depths) if given else []
    if len(bd) > n and not any(bd[n:]) and not any(list(base.img.num_group_tokens)[n:]):
        n = len(bd)
    depths = [len(blocks.get(i, ())) for i in range(n)]
    widths, mlp_ratio = [], None
    for i in range(n):
        w = sd.get(f"img_encoder.layers.{i}.blocks.0.norm1.weight")
        widths.append(int(w.shape[0]) if w is not None else (widths[-1] if widths else C))
        fc1 = sd.get(f"img_encoder.layers.{i}.blocks.0.mlp.fc1.weight")
        if fc1 is not None and mlp_ratio is None:
            mlp_ratio = fc1.shape[0] / fc1.shape[1]
    group_tokens = [int(sd[f"img_encoder.layers.{i}.group_token"].shape[1])
                    if f"img_encoder.layers.{i}.group_token" in sd else 0 for i in range(n)]
    out_groups = []
    for i in range(n - 1):
        fc2 = sd.get(f"img_encoder.layers.{i}.downsample.mlp_inter.fc2.weight")
        out_groups.append(int(fc2.shape[0]) if fc2 is not None else
                          (out_groups[-1] if out_groups else group_tokens[i]))
    b = base.img
    # heads are invisible in the shapes: a given config decides, else head_dim 64 (all releases)
    heads = list(b.num_heads) if given and len(b.num_heads) == n and all(
        wd % h == 0 for wd, h in zip(widths, b.num_heads)) else [max(wd // 64, 1) for wd in widths]
    head_w = sd.get("img_encoder.head.weight")
    img = dataclasses.replace(
        b, img_size=grid * p, patch_size=p, in_chans=int(pw.shape[1]), embed_dim=int(C),
        embed_factors=[wd / C if wd % C else wd // C for wd in widths], depths=depths,
        num_heads=heads, num_group_tokens=group_tokens, num_output_groups=out_groups,
        mlp_ratio=float(mlp_ratio if mlp_ratio is not None else b.mlp_ratio),
        qkv_bias="img_encoder.layers.0.blocks.0.attn.qkv.bias" in sd if depths[0] else b.qkv_bias,
        patch_norm="img_encoder.patch_embed.norm.weight" in sd,
        num_classes=int(head_w.shape[0]) if head_w is not None else 0)
    tok = sd["text_encoder.token_embedding.weight"]  # [V, W]
    tpos = sd["text_encoder.positional_embedding"]  # [L, W]
    tlayers = _count_indices(sd, r"text_encoder\.transformer\.resblocks\.(\d+)\.()")
    text = dataclasses.replace(base.text, context_length=int(tpos.shape[0]),
                               width=int(tok.shape[1]),
                               layers=max(tlayers) + 1 if tlayers else 0,
                               vocab_size=int(tok.shape[0]))
    out_w = sd.get("img_projector.linear_out.weight")
    if out_w is not None:
        hidden = _count_indices(sd, r"img_projector\.linear_hidden\.(\d+)\.()")
        n_conv = sum(1 for i in hidden if f"img_projector.linear_hidden.{i}.weight" in sd
                     and sd[f"img_projector.linear_hidden.{i}.weight"].ndim == 3)
        proj_layers, output_dim = n_conv + 1, int(out_w.shape[0])
    else:
        proj_layers, output_dim = 0, base.output_dim
    if MULTI_LABEL_SCALE in sd:
        multi_label, share = (base.multi_label if base.multi_label > 0 else 3), False
    elif base.multi_label > 0 and base.share_temperature:
        multi_label, share = base.multi_label, True
    else:
        multi_label, share = 0, base.share_temperature
    return dataclasses.replace(base, img=img, text=text, output_dim=output_dim,
                               proj_num_layers=proj_layers, multi_label=multi_label,
                               share_temperature=share)


def _hf_dir_config(path):
    """``ModelConfig`` from a HF model directory's config.json (heads are not in the shapes)."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return None
    p = os.path.join(path, "config.json")
    if not os.path.isfile(p):
        return None
    from .convert import model_config_from_hf
    try:
        with open(p) as fh:
            return model_config_from_hf(json.load(fh))
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{p}: not a usable GroupViT config.json: {e}") from e


# --------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------
def _fmt_keys(keys, limit=30) -> str:
    keys = list(keys)
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _pos_embed_resizable(key: str, expected: torch.Size, found: torch.Size, model) -> bool:
    # GroupViT._load_from_state_dict resizes a square pos_embed grid bicubically (official
    # override); any other shape difference is an error.
    if not key.endswith("pos_embed") or len(expected) != 3 or len(found) != 3:
        return False
    if expected[-1] != found[-1] or expected[0] != found[0]:
        return False
    n = found[1]
    return math.isqrt(n) ** 2 == n


def _select_for_model(sd, model):
    """Full-model checkpoint into a bare image or text encoder: keep that part's keys."""
    from .models import GroupViT, TextTransformer
    for cls, prefix in ((GroupViT, "img_encoder."), (TextTransformer, "text_encoder.")):
        if isinstance(model, cls) and any(k.startswith(prefix) for k in sd):
            return OrderedDict((k[len(prefix):], v) for k, v in sd.items()
                               if k.startswith(prefix))
    return sd


def _build_on_meta(cfg):
    """The model without storage or init (the release's truncated-normal init costs seconds on
    CPU and every value is overwritten by the checkpoint anyway); None if the model code cannot
    be built on the meta device."""
    from .config import build_model
    try:
        with torch.device("meta"):
            return build_model(cfg)
    except Exception:
        return None


def _is_meta(model) -> bool:
    return any(t.is_meta for t in model.state_dict().values())


def _meta_leftovers(model) -> bool:
    # tensors the checkpoint did not provide: non-persistent buffers, plain tensor attributes
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        return True
    return any(isinstance(v, torch.Tensor) and v.is_meta
               for m in model.modules() for v in vars(m).values())


def _materialise(model, cfg, sd, expected, *, copy: bool):
    from .config import build_model
    if len(sd) == len(expected):
        # match the model's dtypes; copy when the caller's tensors would otherwise be aliased
        sd = OrderedDict((k, v.to(dtype=expected[k].dtype, copy=copy)) for k, v in sd.items())
        model.load_state_dict(sd, strict=False, assign=True)
        if not _meta_leftovers(model):
            return model
    # some values must come from the regular init: build it for real
    model = build_model(cfg)
    model.load_state_dict(sd, strict=False)
    return model


def load_checkpoint(path_or_state_dict, model=None, *, strict: bool = True,
                    map_location="cpu", config=None):
    """Load a GroupViT checkpoint and return the model.

    Args:
        path_or_state_dict: an official ``.pth`` (``{'model': ..., 'config': OmegaConf, ...}``),
            our own save, a HF ``GroupViTModel`` state dict file (``.bin``/``.pt``/
            ``.safetensors``) or model directory, or an already loaded dict of any of these.
        model: the module to load into (``MultiLabelContrastive``, or a bare ``GroupViT`` /
            ``TextTransformer`` given a full checkpoint). ``None`` builds a
            ``MultiLabelContrastive`` from the checkpoint (returned in eval mode).
        strict: missing or unexpected keys are errors. Shape mismatches are always errors,
            except a square ``pos_embed`` grid, which is resized bicubically. From a HF source
            the absent ``multi_label_logit_scale`` is allowed (it keeps its initial value,
            ln(1/0.07), as in the official strict=False loader) with a warning.
        map_location: passed to ``torch.load``.
        config: a ``ModelConfig`` or dict used when ``model`` is None (overrides inference
            for the fields the shapes cannot tell, e.g. heads and multi_label K).

    Raises:
        CheckpointError: one message naming the source, the missing and unexpected keys and the
            shape mismatches (expected vs found).
    """
    from .config import ModelConfig, build_model
    if isinstance(path_or_state_dict, Mapping):
        source, obj = "<state dict>", path_or_state_dict
    else:
        source = os.fspath(path_or_state_dict) if isinstance(
            path_or_state_dict, (str, os.PathLike)) else getattr(path_or_state_dict, "name",
                                                                 "<file object>")
        obj = read_checkpoint(path_or_state_dict, map_location)
    sd, layout = to_official_state_dict(extract_state_dict(obj, source=source), source=source)

    built = model is None
    if built:
        if isinstance(config, dict):
            config = ModelConfig.from_dict(config)
        base = config
        if base is None:
            cfg_dict = checkpoint_config(obj)
            base = _model_config_from_dict(cfg_dict) if cfg_dict else None
        if base is None and layout == "hf":
            base = _hf_dir_config(path_or_state_dict)
        cfg = infer_model_config(sd, base=base, source=source)
        model = _build_on_meta(cfg)
        if model is None:
            model = build_model(cfg)
    else:
        sd = _select_for_model(sd, model)

    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [f"{k}: expected {list(expected[k].shape)}, found {list(sd[k].shape)}"
                  for k in sd if k in expected and sd[k].shape != expected[k].shape
                  and not _pos_embed_resizable(k, expected[k].shape, sd[k].shape, model)]
    hints = []
    if layout == "hf" and MULTI_LABEL_SCALE in missing:
        missing.remove(MULTI_LABEL_SCALE)
        warnings.warn(f"{source}: HF checkpoints have no {MULTI_LABEL_SCALE}; the model keeps "
                      f"its initial value (as the official strict=False loader does)")
    if MULTI_LABEL_SCALE in unexpected:
        hints.append("the checkpoint was trained with multi_label>0 (YFCC release): build the "
                     "model with multi_label=3")
    elif MULTI_LABEL_SCALE in missing:
        hints.append("the model has multi_label>0 but the checkpoint has no "
                     f"{MULTI_LABEL_SCALE} (RedCaps release): build with multi_label=0")
    if missing and unexpected and layout is None and any(
            k.startswith(("img_encoder.", "text_encoder.")) for k in expected):
        hints.append("keys carry no img_encoder./text_encoder. prefixes: is this an encoder-only "
                     "state dict? load it into the encoder module instead")
    problems = []
    if strict and missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt_keys(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt_keys(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {_fmt_keys(mismatched, 20)}")
    if problems:
        what = f"{type(model).__name__}" + (f" (checkpoint layout: {layout}, converted)"
                                            if layout == "hf" else "")
        msg = f"{source}: checkpoint does not fit {what}:\n  " + "\n  ".join(problems)
        if hints:
            msg += "\n  hint: " + "; ".join(hints)
        raise CheckpointError(msg)
    sd = OrderedDict((k, v) for k, v in sd.items() if k in expected)
    if built and _is_meta(model):
        model = _materialise(model, cfg, sd, expected, copy=isinstance(path_or_state_dict, Mapping))
    else:
        model.load_state_dict(sd, strict=False)
    if built:
        model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def _plain(v):
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    return v


def _fsync_dir(d: str):
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unshare(sd: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    # safetensors refuses tensors that share storage or are non-contiguous
    seen, out = set(), OrderedDict()
    for k, t in sd.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


def _file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def atomic_save(obj, path: PathLike):
    """Write ``obj`` to ``path`` atomically: a temporary file in the same directory, flushed and
    fsynced, then ``os.replace`` (a crash leaves the old file or the new one, never half).
    ``.safetensors`` paths take a flat tensor dict or ``{'model': tensors, **json_extras}``."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import save as st_save
        except ImportError as e:
            raise CheckpointError(f"{path}: writing .safetensors needs `pip install "
                                  f"safetensors` (or use a .pt/.pth/.bin path)") from e
        if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
            tensors, extra = obj["model"], {k: _plain(v) for k, v in obj.items() if k != "model"}
        else:
            tensors, extra = obj, {}
        # safetensors stores keys sorted; keep the state_dict order for readers of ours
        meta = {"format": "pt", "groupvit_fast_order": json.dumps(list(tensors))}
        if extra:
            try:
                meta["groupvit_fast_extra"] = json.dumps(extra)
            except TypeError as e:
                raise CheckpointError(f"{path}: safetensors can only carry JSON-serialisable "
                                      f"extras: {e}") from e
        payload = st_save(_unshare(tensors), metadata=meta)
    else:
        payload = None
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            if payload is not None:
                f.write(payload)
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(path))  # mkstemp creates 0600; match what open() would give
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(d)
    return path


def save_checkpoint(model, path: PathLike, **extra):
    """Save ``{'model': state_dict, **extra}`` (official layout) atomically; returns ``path``.

    DDP/DeepSpeed wrappers (``.module``) and torch.compile (``._orig_mod``) are unwrapped so
    keys stay the official ones. Dataclass extras (e.g. ``config=ModelConfig(...)``) are stored
    as plain dicts so the file stays readable with ``weights_only=True``.
    """
    inner = model
    while True:
        if hasattr(inner, "_orig_mod"):
            inner = inner._orig_mod
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):
            inner = inner.module
        else:
            break
    sd = inner.state_dict() if isinstance(inner, torch.nn.Module) else OrderedDict(inner)
    if "model" in extra:
        raise CheckpointError("save_checkpoint: 'model' is reserved for the state dict")
    obj = {"model": sd}
    obj.update({k: _plain(v) for k, v in extra.items()})
    return atomic_save(obj, path)
