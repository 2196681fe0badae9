"""State-dict conversion between the official NVlabs/GroupViT layout and Hugging Face
transformers' ``GroupViTModel`` (spec: interop_hf.md §4-§5).

Both directions are driven by one table of key templates, so the inverse cannot drift from the
forward mapping. Three kinds of entries need tensor surgery:

* ``fused``: the official fused ``attn.qkv`` (vision) and ``attn.in_proj_*`` (text) rows are
  q|k|v; HF keeps three separate projections. Heads are contiguous inside each of q, k, v in
  both layouts, so a plain row split/concat is exact (no per-head permutation).
* ``conv1d``: the official projector uses 1×1 Conv1d weights [out,in,1]; HF uses Linear
  [out,in]. Only weights change rank, biases are 1-D in both.
* scalars without counterpart: ``multi_label_logit_scale`` (official only) and the
  ``text_model.embeddings.position_ids`` buffer (HF only, non-persistent in recent versions).

CLI::

    python -m groupvit_fast.convert IN OUT --to hf|official
    groupvit-convert IN OUT --to hf        # same, console script

``OUT`` ending in ``.safetensors`` is written with safetensors (if installed), anything else
with ``torch.save``. Official output is wrapped as ``{'model': state_dict}`` (the layout the
official loader reads); HF output is a flat state dict for ``GroupViTModel.load_state_dict``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import torch

__all__ = ["official_to_hf", "hf_to_official", "detect_layout", "ConversionError",
           "hf_config_dict", "model_config_from_hf", "save_hf_pretrained", "fold_assign_scale",
           "OFFICIAL_PREFIXES", "HF_PREFIXES", "main"]

OFFICIAL_PREFIXES = ("img_encoder.", "text_encoder.", "img_projector.", "text_projector.")
HF_PREFIXES = ("vision_model.", "text_model.", "visual_projection.", "text_projection.")
HF_POSITION_IDS = "text_model.embeddings.position_ids"
MULTI_LABEL_SCALE = "multi_label_logit_scale"


class ConversionError(ValueError):
    """A state dict that cannot be converted (unknown keys, incomplete fused projections,
    unexpected tensor ranks). The message lists every offending key at once."""


# --------------------------------------------------------------------------------------------
# Key table: (official template, HF template, kind). Placeholders: {s} stage, {l} block,
# {n} text layer, {p} weight|bias, {rest} any suffix. Order matters: specific entries first
# (e.g. the pre-assign cross-attention ``attn.proj`` before the generic ``downsample.{rest}``).
# --------------------------------------------------------------------------------------------
_V = "vision_model.encoder.stages.{s}"
_T = "text_model.encoder.layers.{n}"
_R = "text_encoder.transformer.resblocks.{n}"
_TABLE: List[Tuple[str, str, str]] = [
    ("logit_scale", "logit_scale", "plain"),
    # vision embeddings / final norm
    ("img_encoder.pos_embed", "vision_model.embeddings.position_embeddings", "plain"),
    ("img_encoder.patch_embed.proj.{p}",
     "vision_model.embeddings.patch_embeddings.projection.{p}", "plain"),
    ("img_encoder.patch_embed.norm.{p}", "vision_model.embeddings.layernorm.{p}", "plain"),
    ("img_encoder.norm.{p}", "vision_model.layernorm.{p}", "plain"),
    # vision stages
    ("img_encoder.layers.{s}.group_token", _V + ".group_token", "plain"),
    ("img_encoder.layers.{s}.blocks.{l}.norm1.{p}", _V + ".layers.{l}.layer_norm1.{p}", "plain"),
    ("img_encoder.layers.{s}.blocks.{l}.attn.qkv.{p}", _V + ".layers.{l}.self_attn.{qkv}_proj.{p}",
     "fused"),
    ("img_encoder.layers.{s}.blocks.{l}.attn.proj.{p}", _V + ".layers.{l}.self_attn.out_proj.{p}",
     "plain"),
    ("img_encoder.layers.{s}.blocks.{l}.norm2.{p}", _V + ".layers.{l}.layer_norm2.{p}", "plain"),
    ("img_encoder.layers.{s}.blocks.{l}.mlp.{fc}.{p}", _V + ".layers.{l}.mlp.{fc}.{p}", "plain"),
    ("img_encoder.layers.{s}.downsample.pre_assign_attn.attn.proj.{p}",
     _V + ".downsample.pre_assign_attn.attn.out_proj.{p}", "plain"),
    ("img_encoder.layers.{s}.downsample.{rest}", _V + ".downsample.{rest}", "plain"),
    ("img_encoder.layers.{s}.group_projector.{rest}", _V + ".group_projector.{rest}", "plain"),
    # text encoder
    ("text_encoder.token_embedding.weight", "text_model.embeddings.token_embedding.weight",
     "plain"),
    # official: bare Parameter [L,W]; HF: nn.Embedding weight of the same shape
    ("text_encoder.positional_embedding", "text_model.embeddings.position_embedding.weight",
     "plain"),
    (_R + ".attn.in_proj_{p}", _T + ".self_attn.{qkv}_proj.{p}", "fused"),
    (_R + ".attn.out_proj.{p}", _T + ".self_attn.out_proj.{p}", "plain"),
    (_R + ".ln_1.{p}", _T + ".layer_norm1.{p}", "plain"),
    (_R + ".ln_2.{p}", _T + ".layer_norm2.{p}", "plain"),
    (_R + ".mlp.c_fc.{p}", _T + ".mlp.fc1.{p}", "plain"),
    (_R + ".mlp.c_proj.{p}", _T + ".mlp.fc2.{p}", "plain"),
    ("text_encoder.ln_final.{p}", "text_model.final_layer_norm.{p}", "plain"),
    # projection heads: official Sequential(Conv1d, BN, ReLU) + Conv1d -> HF Sequential 0..3
    ("img_projector.linear_hidden.0.{p}", "visual_projection.0.{p}", "conv1d"),
    ("img_projector.linear_hidden.1.{bn}", "visual_projection.1.{bn}", "plain"),
    ("img_projector.linear_out.{p}", "visual_projection.3.{p}", "conv1d"),
    ("text_projector.linear_hidden.0.{p}", "text_projection.0.{p}", "conv1d"),
    ("text_projector.linear_hidden.1.{bn}", "text_projection.1.{bn}", "plain"),
    ("text_projector.linear_out.{p}", "text_projection.3.{p}", "conv1d"),
]

_GROUPS = {
    "s": r"\d+", "l": r"\d+", "n": r"\d+", "p": r"weight|bias", "fc": r"fc1|fc2",
    "qkv": r"q|k|v", "rest": r".+",
    "bn": r"weight|bias|running_mean|running_var|num_batches_tracked",
}


def _compile(template: str) -> "re.Pattern[str]":
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>{_GROUPS[m.group(1)]})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\Z")


_COMPILED = [(_compile(o), _compile(h), o, h, kind) for o, h, kind in _TABLE]


def detect_layout(keys) -> Optional[str]:
    """'official', 'hf' or None, from the key prefixes of a (full-model) state dict."""
    keys = list(keys)
    n_off = sum(k.startswith(OFFICIAL_PREFIXES) for k in keys)
    n_hf = sum(k.startswith(HF_PREFIXES) or k == HF_POSITION_IDS for k in keys)
    if n_off and n_hf:
        raise ConversionError(
            f"state dict mixes official keys ({n_off}, e.g. "
            f"{next(k for k in keys if k.startswith(OFFICIAL_PREFIXES))!r}) and HF keys "
            f"({n_hf}, e.g. {next(k for k in keys if k.startswith(HF_PREFIXES))!r})")
    if n_off:
        return "official"
    if n_hf:
        return "hf"
    return None


def _fmt(template: str, groups: Mapping[str, str]) -> str:
    return template.format(**groups)


def _list(keys, limit=20) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _squeeze_conv(key: str, t: torch.Tensor, bad: List[str]) -> torch.Tensor:
    if key.endswith("weight"):
        if t.ndim == 3 and t.shape[-1] == 1:
            return t[..., 0].clone()  # [out,in,1] -> [out,in]
        if t.ndim == 2:  # already Linear-shaped (e.g. a squeezed export); accept as-is
            return t
        bad.append(f"{key}: expected a 1x1 Conv1d weight [out,in,1], found {list(t.shape)}")
    return t


def _unsqueeze_conv(key: str, t: torch.Tensor, bad: List[str]) -> torch.Tensor:
    if key.endswith("weight"):
        if t.ndim == 2:
            return t.unsqueeze(-1).clone()  # [out,in] -> [out,in,1]
        bad.append(f"{key}: expected a Linear weight [out,in], found {list(t.shape)}")
    return t


def official_to_hf(sd: Mapping[str, torch.Tensor], *, position_ids: bool = False,
                   strict: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """Official ``MultiLabelContrastive`` state dict -> HF ``GroupViTModel`` state dict.

    ``multi_label_logit_scale`` has no HF counterpart and is dropped. ``position_ids=True`` adds
    the ``text_model.embeddings.position_ids`` buffer [1, context_length] that transformers
    releases before it became non-persistent expect; recent releases reject it as unexpected.
    Unknown keys raise one ``ConversionError`` (``strict=False`` drops them instead).
    Renamed tensors are the input tensors themselves (as ``state_dict()`` returns views);
    split and squeezed ones are fresh copies.
    """
    if isinstance(sd, Mapping) and "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    unknown, bad = [], []
    for key, t in sd.items():
        if key == MULTI_LABEL_SCALE:
            continue
        for o_re, _h_re, _o, h_tpl, kind in _COMPILED:
            m = o_re.match(key)
            if m is None:
                continue
            g = m.groupdict()
            if kind == "fused":
                if t.shape[0] % 3:
                    bad.append(f"{key}: fused q|k|v rows must be divisible by 3, found "
                               f"{list(t.shape)}")
                    break
                d = t.shape[0] // 3
                # rows [0:D] -> q, [D:2D] -> k, [2D:3D] -> v
                for i, name in enumerate("qkv"):
                    out[_fmt(h_tpl, dict(g, qkv=name))] = t[i * d:(i + 1) * d].clone()
            elif kind == "conv1d":
                out[_fmt(h_tpl, g)] = _squeeze_conv(key, t, bad)
            else:
                out[_fmt(h_tpl, g)] = t
            break
        else:
            unknown.append(key)
    if bad:
        raise ConversionError("official_to_hf: unexpected tensor shapes: " + "; ".join(bad))
    if unknown and strict:
        raise ConversionError(f"official_to_hf: {len(unknown)} key(s) have no HF counterpart: "
                              f"{_list(unknown)}")
    if position_ids:
        pe = out.get("text_model.embeddings.position_embedding.weight")
        if pe is None:
            raise ConversionError("official_to_hf: position_ids=True needs "
                                  "text_encoder.positional_embedding to know the context length")
        out[HF_POSITION_IDS] = torch.arange(pe.shape[0], dtype=torch.long).unsqueeze(0)
    return out


_OFFICIAL_ORDER = ("logit_scale", MULTI_LABEL_SCALE, "img_encoder.", "text_encoder.",
                   "img_projector.", "text_projector.")


def _official_rank(key: str) -> int:
    for i, p in enumerate(_OFFICIAL_ORDER):
        if key == p or (p.endswith(".") and key.startswith(p)):
            return i
    return len(_OFFICIAL_ORDER)


def hf_to_official(sd: Mapping[str, torch.Tensor], *,
                   multi_label_logit_scale=None,
                   strict: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """HF ``GroupViTModel`` state dict -> official ``MultiLabelContrastive`` state dict (§5).

    q/k/v projections are concatenated (rows q|k|v) into ``attn.qkv`` / ``attn.in_proj_*``,
    projector Linear weights become [out,in,1], ``position_ids`` is dropped.
    HF checkpoints carry no ``multi_label_logit_scale``; pass a value (float or 0-dim tensor)
    to add one, otherwise an official model with ``multi_label>0`` keeps its initial value.
    Keys come out in the official state_dict order of top-level blocks (§7.2).
    """
    out: Dict[str, torch.Tensor] = {}
    fused: Dict[str, Dict[str, torch.Tensor]] = {}
    first_seen: Dict[str, int] = {}
    unknown, bad = [], []
    for idx, (key, t) in enumerate(sd.items()):
        if key == HF_POSITION_IDS:
            continue
        for _o_re, h_re, o_tpl, _h, kind in _COMPILED:
            m = h_re.match(key)
            if m is None:
                continue
            g = m.groupdict()
            if kind == "fused":
                okey = _fmt(o_tpl, g)
                fused.setdefault(okey, {})[g["qkv"]] = t
                first_seen.setdefault(okey, idx)
            elif kind == "conv1d":
                okey = _fmt(o_tpl, g)
                out[okey] = _unsqueeze_conv(key, t, bad)
                first_seen[okey] = idx
            else:
                okey = _fmt(o_tpl, g)
                if okey in out:
                    bad.append(f"{key}: maps onto {okey}, which another key already produced")
                out[okey] = t
                first_seen[okey] = idx
            break
        else:
            unknown.append(key)
    for okey, parts in fused.items():
        missing = [n for n in "qkv" if n not in parts]
        if missing:
            bad.append(f"{okey}: needs q, k and v projections, missing {missing}")
            continue
        shapes = {n: list(parts[n].shape) for n in "qkv"}
        if len({tuple(s) for s in shapes.values()}) != 1:
            bad.append(f"{okey}: q/k/v shapes differ {shapes}")
            continue
        out[okey] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if bad:
        raise ConversionError("hf_to_official: " + "; ".join(bad))
    if unknown and strict:
        raise ConversionError(f"hf_to_official: {len(unknown)} key(s) have no official "
                              f"counterpart: {_list(unknown)}")
    if multi_label_logit_scale is not None:
        ref = out.get("logit_scale")
        v = torch.as_tensor(multi_label_logit_scale,
                            dtype=ref.dtype if ref is not None else torch.float32)
        out[MULTI_LABEL_SCALE] = v.reshape([]).clone()
        first_seen[MULTI_LABEL_SCALE] = -1
    keys = sorted(out, key=lambda k: (_official_rank(k), first_seen.get(k, 0)))
    return OrderedDict((k, out[k]) for k in keys)


# --------------------------------------------------------------------------------------------
# Config mapping (interop_hf §2)
# --------------------------------------------------------------------------------------------
def hf_config_dict(cfg) -> dict:
    """``GroupViTConfig`` fields (a JSON-able dict, as in a HF ``config.json``) for a
    ``groupvit_fast.config.ModelConfig``. Raises ConversionError for models HF cannot express:
    HF has one head count for all stages, no width changes between stages, a fixed projector
    (Linear, BN, ReLU, Linear), and uses its block MLP width for the pre-assign MLP too."""
    img, text = cfg.img, cfg.text
    problems = []
    if len(set(img.num_heads)) != 1:
        problems.append(f"num_heads {list(img.num_heads)} differ per stage")
    if any(f != 1 for f in img.embed_factors):
        problems.append(f"embed_factors {list(img.embed_factors)} change the width")
    if img.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio {img.mlp_ratio} (HF reuses it for the pre-assign MLP, "
                        f"which is 4·C in the official model)")
    if cfg.proj_num_layers != 2:
        problems.append(f"proj_num_layers {cfg.proj_num_layers} (HF: 2)")
    for name, ok in (("qkv_bias", img.qkv_bias), ("patch_norm", img.patch_norm),
                     ("pos_embed_type 'simple'", img.pos_embed_type == "simple"),
                     ("num_classes 0", img.num_classes == 0)):
        if not ok:
            problems.append(f"needs {name}")
    if text.width % 64:
        problems.append(f"text width {text.width} is not a multiple of the head size 64")
    # recipe options that change what an evaluated model computes and that HF cannot express
    # (assign_scale can: fold_assign_scale moves it into the weights)
    if not img.hard_assignment:
        problems.append("hard_assignment False (HF always assigns hard)")
    cosine = img.assign_cosine if isinstance(img.assign_cosine, (list, tuple)) \
        else [img.assign_cosine]
    if any(cosine):
        problems.append(f"assign_cosine {img.assign_cosine} (HF assigns by the plain dot "
                        f"product)")
    if getattr(img, "pool_owned", False):
        problems.append("pool_owned True (HF pools all final groups)")
    if problems:
        raise ConversionError("no HF GroupViTConfig for this model: " + "; ".join(problems))
    groups = list(img.num_output_groups)
    return {
        "architectures": ["GroupViTModel"],
        "model_type": "groupvit",
        "projection_dim": cfg.output_dim,
        "projection_intermediate_dim": 4096,
        "logit_scale_init_value": math.log(1.0 / cfg.contrast_temperature),
        "text_config": {
            "model_type": "groupvit_text_model",
            "vocab_size": text.vocab_size, "hidden_size": text.width,
            "intermediate_size": 4 * text.width, "num_hidden_layers": text.layers,
            "num_attention_heads": text.width // 64,
            "max_position_embeddings": text.context_length, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            # the official tokenizer's SOT/EOT are the two largest ids; EOT pooling must agree
            "bos_token_id": text.vocab_size - 2, "eos_token_id": text.vocab_size - 1,
        },
        "vision_config": {
            "model_type": "groupvit_vision_model",
            "hidden_size": img.embed_dim, "intermediate_size": int(img.mlp_ratio * img.embed_dim),
            "depths": list(img.depths), "num_hidden_layers": sum(img.depths),
            "num_group_tokens": list(img.num_group_tokens),
            # HF: one entry per stage, the official config one per GroupingBlock
            "num_output_groups": groups + groups[-1:],
            "num_attention_heads": img.num_heads[0], "image_size": img.img_size,
            "patch_size": img.patch_size, "num_channels": img.in_chans, "hidden_act": "gelu",
            "layer_norm_eps": 1e-5, "assign_eps": 1.0, "assign_mlp_ratio": [0.5, 4],
        },
    }


def fold_assign_scale(sd: Mapping[str, torch.Tensor], cfg) -> dict:
    """The official state dict ``sd`` with each grouping stage's ``assign_scale`` (a recipe
    option, ``cfg`` a ``ModelConfig``) moved into its assignment's q projection, so a model
    that reads the official scale dim**-0.5 (HF, or ours with assign_scale None) computes the
    same logits s·q·k: q_proj weight and bias times s·sqrt(dim). Exact up to one rounding of
    each weight; stages at the official scale are left as they are."""
    img = cfg.img
    n_blocks = len(img.depths) - 1
    scales = img.assign_scale if isinstance(img.assign_scale, (list, tuple)) \
        else [img.assign_scale] * n_blocks
    out = dict(sd)
    for i, s in enumerate(scales):
        if s is None:
            continue
        dim = int(img.embed_dim * img.embed_factors[i])
        factor = float(s) * math.sqrt(dim)
        for name in ("weight", "bias"):
            key = f"img_encoder.layers.{i}.downsample.assign.q_proj.{name}"
            if key not in out:
                raise ConversionError(f"assign_scale is set for grouping stage {i} but the "
                                      f"state dict has no {key}")
            out[key] = out[key] * factor
    return out


def model_config_from_hf(d: Mapping):
    """``ModelConfig`` for a HF ``GroupViTConfig`` dict (``config.json``); multi_label=0 since
    HF has no multi-label head."""
    from .config import ImageEncoderConfig, ModelConfig, TextEncoderConfig
    base = ModelConfig(multi_label=0)
    v, t = dict(d.get("vision_config") or {}), dict(d.get("text_config") or {})
    depths = list(v.get("depths", base.img.depths))
    n = len(depths)
    hidden = v.get("hidden_size", base.img.embed_dim)
    img = ImageEncoderConfig(
        img_size=v.get("image_size", base.img.img_size),
        patch_size=v.get("patch_size", base.img.patch_size),
        in_chans=v.get("num_channels", base.img.in_chans), embed_dim=hidden,
        embed_factors=[1] * n, depths=depths,
        num_heads=[v.get("num_attention_heads", 6)] * n,
        num_group_tokens=list(v.get("num_group_tokens", base.img.num_group_tokens)),
        num_output_groups=list(v.get("num_output_groups", [64, 8, 8]))[:n - 1],
        mlp_ratio=v.get("intermediate_size", 4 * hidden) / hidden)
    text = TextEncoderConfig(context_length=t.get("max_position_embeddings", 77),
                             width=t.get("hidden_size", 256),
                             layers=t.get("num_hidden_layers", 12),
                             vocab_size=t.get("vocab_size", 49408))
    scale = d.get("logit_scale_init_value")
    return dataclasses.replace(base, img=img, text=text,
                               output_dim=d.get("projection_dim", base.output_dim),
                               contrast_temperature=math.exp(-scale) if scale else 0.07)


def save_hf_pretrained(sd: Mapping[str, torch.Tensor], out_dir, cfg=None, *,
                       position_ids: bool = False) -> str:
    """Write a directory ``GroupViTModel.from_pretrained`` reads: ``config.json`` and
    ``model.safetensors`` (``pytorch_model.bin`` without safetensors). ``sd`` is an official
    state dict; ``cfg`` (``ModelConfig``) defaults to what its shapes say."""
    from .checkpoint import atomic_save, infer_model_config
    if detect_layout(sd.keys()) == "hf":
        sd = hf_to_official(sd)
    if cfg is None:
        cfg = infer_model_config(sd)
    config = hf_config_dict(cfg)
    hf = official_to_hf(fold_assign_scale(sd, cfg), position_ids=position_ids)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    try:
        import safetensors  # noqa: F401
        weights = os.path.join(out_dir, "model.safetensors")
    except ImportError:
        weights = os.path.join(out_dir, "pytorch_model.bin")
    atomic_save(hf, weights)
    tmp = os.path.join(out_dir, ".config.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(config, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(out_dir, "config.json"))
    return out_dir


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _save(obj, path: str):
    from .checkpoint import atomic_save
    atomic_save(obj, path)


def _is_dir_target(path: str) -> bool:
    return os.path.isdir(path) or path.endswith(os.sep) or not os.path.splitext(path)[1]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="groupvit-convert",
        description="Convert GroupViT checkpoints between the official NVlabs layout and HF "
                    "transformers' GroupViTModel. Input: official .pth (OmegaConf config is "
                    "read safely, no omegaconf needed), HF .bin/.pt/.safetensors, or a HF model "
                    "directory containing one of those.")
    p.add_argument("input")
    p.add_argument("output", help="output file (.safetensors uses safetensors, else torch.save) "
                                  "or, with --to hf, a directory (no file extension): "
                                  "config.json + weights for GroupViTModel.from_pretrained")
    p.add_argument("--to", required=True, choices=["hf", "official"])
    p.add_argument("--position-ids", action="store_true",
                   help="(--to hf) also write text_model.embeddings.position_ids, for "
                        "transformers releases where it is a persistent buffer")
    p.add_argument("--num-heads", type=int, default=None,
                   help="(--to hf directory) vision attention heads, when the input carries no "
                        "config (heads are not in the tensor shapes; default: width // 64)")
    p.add_argument("--multi-label-logit-scale", type=float, default=None,
                   help="(--to official) value for multi_label_logit_scale, absent in HF files")
    args = p.parse_args(argv)

    from .checkpoint import CheckpointError, extract_state_dict, read_checkpoint
    try:
        obj = read_checkpoint(args.input)
        sd = extract_state_dict(obj, source=args.input)
        layout = detect_layout(sd.keys())
        if layout is None:
            raise ConversionError(f"{args.input}: neither official (img_encoder.*, ...) nor HF "
                                  f"(vision_model.*, ...) GroupViT keys; first keys: "
                                  f"{_list(list(sd)[:5])}")
        if args.to == "hf":
            if layout == "hf":
                raise ConversionError(f"{args.input} is already in the HF layout")
            if _is_dir_target(args.output):
                from .checkpoint import _model_config_from_dict, checkpoint_config, \
                    infer_model_config
                base = checkpoint_config(obj)
                base = _model_config_from_dict(base) if base else None
                cfg = infer_model_config(sd, base=base, source=args.input)
                if args.num_heads:
                    cfg = dataclasses.replace(cfg, img=dataclasses.replace(
                        cfg.img, num_heads=[args.num_heads] * len(cfg.img.depths)))
                save_hf_pretrained(sd, args.output, cfg, position_ids=args.position_ids)
                print(f"groupvit-convert: {args.input} ({layout}, {len(sd)} tensors) -> "
                      f"{args.output}/ (HF model directory)")
                return 0
            from .checkpoint import _model_config_from_dict, checkpoint_config
            base = checkpoint_config(obj)
            if base:  # a recipe's assign_scale lives in the config, HF reads only weights
                sd = fold_assign_scale(sd, _model_config_from_dict(base))
            out = official_to_hf(sd, position_ids=args.position_ids)
        else:
            if layout == "official":
                raise ConversionError(f"{args.input} is already in the official layout")
            out = hf_to_official(sd, multi_label_logit_scale=args.multi_label_logit_scale)
            if not args.output.endswith(".safetensors"):
                out = {"model": out}  # what the official loader reads (ref §7.1)
        _save(out, args.output)
    except (CheckpointError, ConversionError, OSError) as e:
        print(f"groupvit-convert: error: {e}", file=sys.stderr)
        return 1
    n = len(out["model"]) if "model" in out else len(out)
    print(f"groupvit-convert: {args.input} ({layout}, {len(sd)} tensors) -> {args.output} "
          f"({args.to}, {n} tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
