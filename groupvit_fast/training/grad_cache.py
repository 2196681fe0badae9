"""Embedding-cache gradient accumulation (GradCache, arXiv 2101.06983) for the GroupViT objective.

Plain gradient accumulation over ``a`` micro batches of size ``b`` on ``w`` ranks scores every
image/caption against only ``b·w`` negatives. The release recipe needs 4096 (ref §7, §9 #28/#42:
a smaller contrastive batch costs ~5 mIoU). ``grad_cache_step`` makes one optimizer step see the
whole ``a·b·w`` batch as negatives, with activation memory bounded by one micro batch:

1. every micro batch goes through the two *encoders* without keeping activations (each graph is
   dropped right away; the last one keeps its graph, saving one re-run); the RNG state before
   each is recorded;
2. the cached encoder outputs (pooled image feature [b,C_img], text features [b·(1+K),C_txt] —
   small) are concatenated and the projectors + losses run **once** on the global batch: the
   projector BatchNorm sees the global-batch statistics and updates its running stats once,
   exactly like a full-batch step, and the losses gather negatives across ranks with gradient;
3. d(loss)/d(encoder outputs) and d(loss)/d(head parameters) are taken with ``autograd.grad``;
4. each micro batch is re-run with activations under its recorded RNG state (same Gumbel noise,
   drop-path and dropout masks) and back-propagates its cached output gradient.

Steps 3-4 go through one scalar per micro batch, ``s_i = Σ <enc_out_i, g_i>`` (+ ``Σ <p, g_p>``
over the head parameters on one of them): its gradient w.r.t. ``enc_out_i`` is exactly ``g_i``,
so ``s_i`` can be handed to anything that back-propagates a loss — ``tensor.backward``, a
GradScaler, or ``DeepSpeedEngine.backward`` (which then applies its own loss scaling and ZeRO
gradient reduction hooks unchanged).

Cost: one extra encoder forward for ``a-1`` of the ``a`` micro batches.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from ..models.multi_label_contrastive import BEYOND_POOLED_LOSSES

__all__ = ["grad_cache_step", "features_loss", "is_deepspeed_engine", "unwrap_model",
           "SavedTensorMeter", "ACCUM_MODES", "resolve_accum_mode", "accum_mode_message"]

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], Dict[str, torch.Tensor]]


# -- choosing the mode (for the training loop) ----------------------------------------------------
ACCUM_MODES = ("auto", "gradcache", "naive")


def resolve_accum_mode(mode: str, grad_accum: int) -> str:
    """'auto' -> 'gradcache' whenever gradient accumulation > 1 (plain accumulation would shrink
    the contrastive batch), else 'naive' (nothing to accumulate: both are the same step)."""
    if mode not in ACCUM_MODES:
        raise ValueError(f"accumulation mode must be one of {ACCUM_MODES}, got {mode!r}")
    if mode == "auto":
        return "gradcache" if grad_accum > 1 else "naive"
    return mode


def accum_mode_message(mode: str, global_batch: int, micro_batch: int, grad_accum: int,
                       world_size: int) -> str:
    """The start-of-training line that says how many negatives each sample sees."""
    if grad_accum <= 1:
        return (f"no gradient accumulation: {global_batch} negatives per image and caption "
                f"({micro_batch} per rank × {world_size} ranks)")
    if mode == "gradcache":
        return (f"gradient accumulation {grad_accum} in embedding-cache mode (GradCache): every "
                f"image and caption sees all {global_batch} negatives of the global batch "
                f"(micro batch {micro_batch} × {grad_accum} × {world_size} ranks); one extra "
                f"encoder forward per micro batch")
    return (f"WARNING: naive gradient accumulation {grad_accum}: each loss sees only "
            f"{micro_batch * world_size} negatives, not {global_batch} (the release recipe needs "
            f"{global_batch}; expect lower zero-shot mIoU)")


# -- model plumbing -----------------------------------------------------------------------------
def is_deepspeed_engine(model) -> bool:
    # duck-typed so this module never imports DeepSpeed
    return all(hasattr(model, n) for n in ("module", "backward", "step",
                                           "gradient_accumulation_steps"))


def unwrap_model(model) -> nn.Module:
    if is_deepspeed_engine(model):
        return model.module
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("grad_cache_step: DistributedDataParallel is not supported (its reducer "
                        "fires once per forward); pass the bare module and all-reduce the "
                        "gradients yourself, or pass a DeepSpeed engine")
    return model


def features_loss(net: nn.Module, image_feat: torch.Tensor, text_feat: torch.Tensor,
                  num_text: int) -> Dict[str, torch.Tensor]:
    """``MultiLabelContrastive.forward_train`` from the encoder outputs.

    image_feat [N, C_img] (pooled GroupViT output), text_feat [N·num_text, C_txt] in the row
    order of ``text.reshape(-1, L)`` for tokens [N, num_text, L]. Captions and prompts share
    one projector call so its BN pools over all N·(1+K) texts (ref §4.1)."""
    image_x = net.img_projector(image_feat)  # [N,D]
    text_x = net.text_projector(text_feat)  # [(N T),D]
    if num_text > 1:
        text_x = text_x.reshape(-1, num_text, text_x.shape[-1])  # [(N T),D] -> [N,T,D]
        caption_x, prompt_x = text_x[:, 0], text_x[:, 1:]
    else:
        caption_x, prompt_x = text_x, None
    losses = dict(loss=net.loss(image_x, caption_x))
    if net.with_multi_label:
        if prompt_x is None or prompt_x.shape[1] == 0:
            raise ValueError(f"multi_label={net.multi_label} needs texts [B,1+K,L] with K>0, "
                             f"got num_text={num_text}")
        losses["multi_label_loss"] = net.multi_label_loss(image_x.unsqueeze(1), prompt_x) * \
            net.multi_label_loss_weight
    return losses


def _check_micro_batches(micro_batches) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], int]:
    mbs = list(micro_batches)
    if not mbs:
        raise ValueError("grad_cache_step: micro_batches is empty")
    shapes = None
    for i, mb in enumerate(mbs):
        if not (isinstance(mb, (tuple, list)) and len(mb) == 2):
            raise TypeError(f"grad_cache_step: micro batch {i} must be (images, texts), got "
                            f"{type(mb).__name__}")
        img, txt = mb
        if img.ndim != 4 or txt.ndim not in (2, 3) or img.shape[0] != txt.shape[0]:
            raise ValueError(f"grad_cache_step: micro batch {i}: expected images [b,3,H,W] and "
                             f"texts [b,L] or [b,1+K,L] with the same b, got "
                             f"{tuple(img.shape)} and {tuple(txt.shape)}")
        s = (tuple(img.shape), tuple(txt.shape))
        if shapes is not None and s != shapes:
            # equal micro batches keep the global row order (and the rank·B label offset of the
            # local losses) identical to the full-batch step on every rank
            raise ValueError(f"grad_cache_step: micro batch {i} has shapes {s}, micro batch 0 "
                             f"has {shapes}; all micro batches must have the same shapes")
        shapes = s
    num_text = mbs[0][1].shape[1] if mbs[0][1].ndim == 3 else 1
    return mbs, num_text


# -- RNG replay ---------------------------------------------------------------------------------
def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _encode(net: nn.Module, image: torch.Tensor, text: torch.Tensor):
    img = net.img_encoder(image)  # [b,C_img]
    txt = net.text_encoder(text.reshape(-1, text.shape[-1]))  # [b,(1+K),L] -> [(b 1+K),C_txt]
    return img, txt


# -- memory instrumentation (tests, bench) ------------------------------------------------------
class SavedTensorMeter:
    """Counts the bytes autograd saves for backward while entered, and the peak of those still
    alive (a saved tensor is released when its graph is freed). Storage shared by several saved
    tensors (views) is counted once; weights and views of weights are not counted. Saved-tensor
    hooks do not nest (the innermost wins), so a meter entered inside another passes its counts
    on to ``parent``."""

    def __init__(self, parent: Optional["SavedTensorMeter"] = None):
        self.live = 0
        self.peak = 0
        self.parent = parent
        self._refs: Dict[Tuple[int, int], int] = {}

    def _acquire(self, key):
        n = self._refs.get(key, 0)
        if n == 0:
            self.live += key[1]
            self.peak = max(self.peak, self.live)
        self._refs[key] = n + 1

    def _release(self, key):
        n = self._refs.get(key)
        if n is None:
            return
        if n == 1:
            del self._refs[key]
            self.live -= key[1]
        else:
            self._refs[key] = n - 1

    class _Packed:
        __slots__ = ("t", "meters", "key")

        def __init__(self, t, meters, key):
            self.t, self.meters, self.key = t, meters, key

        def __del__(self):
            for m in self.meters:
                m._release(self.key)

    def _pack(self, t):
        base = t._base if t._base is not None else t
        if isinstance(base, nn.Parameter) or (base.requires_grad and base.grad_fn is None):
            return t  # weights and views of them (w.t()) are not activations
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        meters, m = [], self
        while m is not None:
            m._acquire(key)
            meters.append(m)
            m = m.parent
        # hold a detached alias: a saved *output* holds its grad_fn, and the graph holds this
        # object, so keeping ``t`` itself would make a cycle that outlives the graph (autograd
        # re-attaches grad_fn on unpack)
        return SavedTensorMeter._Packed(t.detach(), meters, key)

    @staticmethod
    def _unpack(p):
        return p.t if isinstance(p, SavedTensorMeter._Packed) else p

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


# -- the step -----------------------------------------------------------------------------------
def _engine_loss_scale(engine) -> float:
    fp16 = getattr(engine, "fp16_enabled", None)
    if fp16 is not None and fp16():
        get = getattr(engine, "_get_optimizer_loss_scale", None)
        s = get() if get is not None else None
        if s is not None:
            return float(s)
    return 1.0


def grad_cache_step(model, micro_batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], *,
                    loss_fn: Optional[LossFn] = None,
                    backward_fn: Optional[Callable[[torch.Tensor], None]] = None,
                    loss_scale: Optional[float] = None,
                    keep_last: bool = True,
                    verify_replay: bool = False,
                    encoder_context: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
                    before_backward: Optional[Callable[[Dict[str, torch.Tensor]], None]] = None,
                    ) -> Dict[str, torch.Tensor]:
    """One global-batch step of the contrastive objective over ``micro_batches``.

    model: a ``MultiLabelContrastive`` (or anything with ``img_encoder``, ``text_encoder`` and
        what ``loss_fn`` uses), or a DeepSpeed engine wrapping one. Put it in train mode first.
    micro_batches: equal-shaped ``(images [b,3,H,W], texts [b,1+K,L] or [b,L])`` pairs — this
        rank's share of the global batch, in order. Negatives are this rank's ``a·b`` samples
        gathered (with gradient) over all ranks.
    loss_fn(net, image_feat [a·b,C], text_feat [a·b·T,C], T) -> dict of losses; every entry whose
        key contains "loss" is summed. Default: ``features_loss`` (the official objective).
    backward_fn(s): back-propagates one surrogate scalar ``s`` exactly like a loss. Default:
        ``s.backward()`` for a module; ``engine.backward(s, scale_wrt_gas=False)`` for a
        DeepSpeed engine (the objective is already the global-batch mean).
    loss_scale: the scale ``backward_fn`` multiplies by (e.g. ``GradScaler.get_scale()``); the
        cached gradients are taken of ``loss_scale·loss`` so fp16 activations' gradients do not
        underflow. Default: the engine's current fp16 loss scale, else 1.
    keep_last: the last micro batch keeps its first-pass graph instead of being re-run.
    verify_replay: assert that every re-run reproduces its cached encoder outputs bit-for-bit
        (a debugging aid: it catches a non-replayable random source).
    encoder_context: zero-arg factory of a context entered around every encoder pass that keeps
        activations (memory instrumentation, e.g. ``SavedTensorMeter()``).
    before_backward(losses): called with the detached global-batch losses after the loss pass and
        before any gradient reaches a parameter; raising there (e.g. on a non-finite loss, decided
        the same way on every rank) abandons the step with nothing accumulated or stepped.

    Module: accumulates ``.grad`` of all parameters (the caller runs the optimizer step).
    DeepSpeed engine: runs the ``a`` backward passes and the engine steps; the optimizer update
    happens once, on the last micro batch. Accepted configurations:
    ``gradient_accumulation_steps == a`` (managed; one ``engine.step()`` per micro batch, the last
    is the boundary), ``gradient_accumulation_steps == 1`` (boundary set manually, one step), or
    ``managed_gradient_accumulation: false`` (``a`` backwards, one step).

    Returns the detached losses of the global batch (``{key: tensor}``) plus their sum under
    ``"total"`` (a key without "loss" in it, so summing the "loss" keys never counts it twice).
    """
    engine = model if is_deepspeed_engine(model) else None
    net = unwrap_model(model)
    mbs, num_text = _check_micro_batches(micro_batches)
    a = len(mbs)
    if loss_fn is None:
        for opt in BEYOND_POOLED_LOSSES:
            if getattr(net, opt, 0):
                # checked once per step, not per micro batch; train/main.py refuses the
                # combination earlier still (engine.check_compat)
                raise ValueError(f"grad_cache_step: model.{opt} > 0 needs the group tokens "
                                 f"and assignment maps, which the embedding cache does not "
                                 f"keep: set train.grad_cache=false or model.{opt}=0")
        loss_fn = features_loss
    if loss_scale is None:
        loss_scale = _engine_loss_scale(engine) if engine is not None else 1.0
    loss_scale = float(loss_scale)
    if not (loss_scale > 0 and math.isfinite(loss_scale)):
        raise ValueError(f"grad_cache_step: loss_scale must be finite and > 0, got {loss_scale}")
    backwards, finish = _backward_plan(engine, a, backward_fn)
    enc_ctx = encoder_context if encoder_context is not None else contextlib.nullcontext
    device = mbs[0][0].device

    # 1. encoder outputs of every micro batch, activations dropped (the last one kept)
    states, img_feats, txt_feats = [], [], []
    kept = None
    for i, (image, text) in enumerate(mbs):
        states.append(_rng_state(device))
        if keep_last and i == a - 1:
            with enc_ctx():
                kept = _encode(net, image, text)
            img, txt = kept[0].detach(), kept[1].detach()
        else:
            # Recorded by autograd and dropped at once rather than run under no_grad: kernel
            # choices may depend on whether a backward will follow (the grouping op's CPU
            # dispatch does, and its backends draw different noise from the same seed; attention
            # kernels may too), and the re-run must take the same ones to reproduce these
            # outputs bit for bit. The transient graph is one micro batch, like the re-run's.
            with torch.enable_grad():
                img, txt = _encode(net, image, text)
            img, txt = img.detach(), txt.detach()
        img_feats.append(img)
        txt_feats.append(txt)
    rng_after = _rng_state(device)

    # 2-3. projectors + losses once on the global batch; gradients w.r.t. encoder outputs and
    # head parameters (encoder parameters are not in this graph)
    image_feat = torch.cat(img_feats).requires_grad_(True)  # [(a b),C_img]
    text_feat = torch.cat(txt_feats).requires_grad_(True)  # [(a b T),C_txt]
    losses = loss_fn(net, image_feat, text_feat, num_text)
    total = sum(v for k, v in losses.items() if "loss" in k)
    enc_params = {id(p) for m in (net.img_encoder, net.text_encoder) for p in m.parameters()}
    head_params = [p for p in net.parameters() if p.requires_grad and id(p) not in enc_params]
    grads = torch.autograd.grad(total * loss_scale, [image_feat, text_feat] + head_params,
                                allow_unused=True)
    g_img = grads[0] if grads[0] is not None else torch.zeros_like(image_feat)
    g_txt = grads[1] if grads[1] is not None else torch.zeros_like(text_feat)
    head = [(p, g) for p, g in zip(head_params, grads[2:]) if g is not None]
    g_img_mb = g_img.chunk(a)  # a × [b,C_img]
    g_txt_mb = g_txt.chunk(a)  # a × [(b T),C_txt]
    out = {k: v.detach() for k, v in losses.items()}
    out["total"] = total.detach()
    del losses, total, grads, image_feat, text_feat
    if before_backward is not None:
        try:
            before_backward(out)
        except BaseException:
            _set_rng_state(rng_after, device)
            raise

    def surrogate(i, img, txt, with_head):
        # d s / d img = g exactly: the mul's backward multiplies g by the incoming 1
        s = (img.float() * g_img_mb[i].float()).sum() + (txt.float() * g_txt_mb[i].float()).sum()
        if with_head:
            for p, g in head:
                s = s + (p.float() * g.float()).sum()
        # grads above are of loss_scale·loss and backward_fn multiplies by loss_scale again
        return s / loss_scale

    # 4. backward, one micro batch at a time; the head-parameter term rides on the first
    order = ([a - 1] if keep_last else []) + [i for i in range(a) if not (keep_last and i == a - 1)]
    try:
        for n, i in enumerate(order):
            if keep_last and i == a - 1:
                img, txt = kept
                kept = None
            else:
                _set_rng_state(states[i], device)
                with enc_ctx():
                    img, txt = _encode(net, *mbs[i])
                if verify_replay:
                    _verify(i, img, txt, img_feats[i], txt_feats[i])
            backwards[n](surrogate(i, img, txt, with_head=n == 0))
            del img, txt
    finally:
        # continue the stream after the first pass, as if each micro batch had been seen once
        _set_rng_state(rng_after, device)
    finish()
    return out


def _verify(i, img, txt, img0, txt0):
    for name, x, y in (("image", img, img0), ("text", txt, txt0)):
        if not torch.equal(x.detach(), y):
            d = (x.detach().float() - y.float()).abs().max().item()
            raise RuntimeError(f"grad_cache_step: re-run of micro batch {i} does not reproduce its "
                               f"cached {name} features (max abs diff {d:.3g}); a random source "
                               f"is not driven by torch's global RNG")


def _backward_plan(engine, a: int, backward_fn):
    """Per micro batch a callable that back-propagates one surrogate, and a finishing call."""
    if engine is None:
        bw = backward_fn if backward_fn is not None else (lambda s: s.backward())
        return [bw] * a, (lambda: None)

    user_bw = backward_fn if backward_fn is not None else \
        (lambda s: engine.backward(s, scale_wrt_gas=False))

    def bw(s):
        # engine.forward resets ZeRO's per-micro-batch backward-hook bookkeeping; the encoders
        # are called directly here, so do that reset before each micro batch's backward
        clear = getattr(engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        user_bw(s)

    stage = getattr(engine, "zero_optimization_stage", lambda: 0)()
    if stage >= 3:
        # ZeRO-3 partitions the head parameters outside forward, so the <p, g_p> surrogate term
        # cannot be formed; stages 0-2 are tested
        raise NotImplementedError("grad_cache_step: ZeRO stage 3 is not supported; use stage 0-2")
    managed = getattr(engine, "managed_gradient_accumulation", lambda: True)()
    gas = engine.gradient_accumulation_steps()
    if not managed:
        # backward only accumulates; step() is the boundary
        return [bw] * a, engine.step
    if gas == a:
        # DeepSpeed's own micro-step counter puts the boundary (reduction + optimizer update)
        # on the a-th engine.step()
        def bw_step(s):
            bw(s)
            engine.step()
        return [bw_step] * a, (lambda: None)
    if gas == 1:
        def make(last):
            def f(s):
                engine.set_gradient_accumulation_boundary(last)
                bw(s)
            return f

        def finish():
            engine.step()
            engine.set_gradient_accumulation_boundary(None)  # back to the micro-step counter
        return [make(n == a - 1) for n in range(a)], finish
    raise ValueError(f"grad_cache_step: the DeepSpeed engine has gradient_accumulation_steps="
                     f"{gas} but {a} micro batches were given; use gradient_accumulation_steps "
                     f"== number of micro batches (or 1, or managed_gradient_accumulation=false)")
