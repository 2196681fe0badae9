"""Zero-shot semantic segmentation with GroupViT, scored exactly as the official
``GroupViTSegInference`` (ref §5.1-§5.2), without mmseg.

Two protocols give the same masks:

- ``protocol='official'``: the reference. One window at a time, batch 1, and the image encoder
  runs twice per window (once for the soft maps, once more inside ``encode_image``), one-hot
  group maps multiplied with the group→class matrix, scores zero-padded into the accumulator.
- ``protocol='fast'`` (default): one encoder pass per window returns the soft maps, the pooled
  embedding and the final tokens together (eval is deterministic, so the second pass of the
  official code recomputes the same numbers); all windows of an image — and of several images
  when their windows share a shape — run through the encoder as one batch; the one-hot matmul
  becomes a gather (1·p + 0·q… is exactly p) and scores are added in place into the window
  slice (adding the official zero padding is an exact no-op). The per-window scoring keeps
  the official op order and shapes, so masks are identical.

This is the official scoring, not Hugging Face's ``segmentation_logits`` (interop §6.4, §7): HF
has no clamp of the logit scale, no one-hot group argmax, no top-5 gate and no background
class, and applies the logit scale twice.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .classes import resolve_templates, split_background
from .transforms import IMG_SCALE, ImageLike, feat_grid, preprocess, slide_windows


@dataclass
class SegOutput:
    """labels int64 [H,W] (original resolution); scores float32 [C,H,W] (softmax of the
    averaged window scores, C includes background when used); groups: one int64 [H,W] map per
    grouping stage (argmax of the composed soft maps, the official all_groups view)."""
    labels: np.ndarray
    scores: Optional[torch.Tensor] = None
    groups: Optional[List[np.ndarray]] = field(default=None)


def _get_tokenizer(tokenizer):
    if tokenizer is not None:
        return tokenizer
    try:
        import groupvit_fast
        tok = getattr(groupvit_fast, 'tokenize', None)
        if tok is not None:
            return tok
    except ImportError:  # pragma: no cover
        pass
    try:
        from groupvit_fast.data.tokenizer import tokenize
        return tokenize
    except ImportError as e:
        raise RuntimeError('ZeroShotSegmenter needs a tokenizer for the class prompts: '
                           f'groupvit_fast.tokenize is not available ({e}); pass tokenizer= or '
                           'text_embedding=') from None


@torch.no_grad()
def build_class_embedding(model, class_names: Sequence[str], templates='simple',
                          tokenizer: Optional[Callable] = None) -> torch.Tensor:
    """[N, D] L2-normalised text embeddings of the foreground class prompts (average over
    templates before normalising: model.build_text_embedding)."""
    names = list(class_names)
    if not names:
        raise ValueError('class_names is empty: give at least one class to segment')
    templates = resolve_templates(templates)
    tok = _get_tokenizer(tokenizer)
    texts = [t.format(c) for c in names for t in templates]
    tokens = tok(texts)
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(tokens)
    # a tokenizer pads to CLIP's 77; a text encoder trained with a shorter context (the embedded
    # recipe) takes only its own length, and the padding beyond it is zeros that the EOT-argmax
    # pooling never reads, so it is cut off (a prompt that does not fit is an error, not a cut)
    ctx = getattr(getattr(model, 'text_encoder', None), 'context_length', None)
    if isinstance(ctx, int) and tokens.shape[-1] > ctx:
        long = (tokens[:, ctx:] != 0).any(dim=-1)
        if bool(long.any()):
            bad = texts[int(long.nonzero()[0, 0])]
            raise ValueError(f'class prompt {bad!r} needs more than the text encoder\'s '
                             f'context_length {ctx} tokens')
        tokens = tokens[:, :ctx]
    tokens = tokens.reshape(len(names), len(templates), -1)  # [N*T,L] -> [N,T,L]
    return model.build_text_embedding(tokens).float()


def compose_soft_maps(attn_dicts) -> List[torch.Tensor]:
    """Soft assignment maps composed across stages: list of [B,N,G_l] (ref §5.2 step 1).
    Stage maps [B,1,G,N] are transposed to [B,1,N,G] and chained by matrix product."""
    out, prev = [], None
    for i, d in enumerate(attn_dicts):
        if d is None:
            if i != len(attn_dicts) - 1:
                raise ValueError('only the last stage may have no grouping block')
            continue
        m = d['soft'].float().transpose(-1, -2)  # [B,1,G,N] -> [B,1,N,G], composed in fp32
        prev = m if prev is None else prev @ m
        out.append(prev[:, 0])  # single assignment head: [B,N,G]
    if not out:
        raise ValueError('the image encoder returned no grouping maps (no GroupingBlock)')
    return out


def upsample_group_map(m: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B,N,G] token maps -> [B,G,h,w] bilinear (align_corners=False) on the grid inferred from
    the window's aspect ratio (official resize_attn_map)."""
    B, N, G = m.shape
    hf, wf = feat_grid(h, w, N)
    grid = m.transpose(1, 2).reshape(B, G, hf, wf)  # [B,N,G] -> [B,G,hf,wf]
    return F.interpolate(grid, size=(h, w), mode='bilinear', align_corners=False)


class ZeroShotSegmenter:
    """Zero-shot segmentation of images into ``class_names`` (ref §5).

    Args:
        model: a MultiLabelContrastive (img_encoder, img_projector, text encoder, logit_scale).
        class_names: 'background' first means background comes from the threshold rule and is
            not prompted (as for VOC / Context / COCO-Object).
        templates: 'simple' (official seg eval: "a photo of a {}."), 'subset', or a sequence.
        bg_thresh: background threshold (VOC 0.95, Context 0.35, COCO-Object 0.95).
        mode: 'slide' (eval protocol) or 'whole' (official demo).
        crop, stride: sliding window size and step (ints or (h, w)).
        protocol: 'fast' (one pass, batched) or 'official' (two passes, batch 1).
        batch_size: maximal windows per encoder call in the fast protocol.
        img_scale: keep-ratio resize target (long max, short max); None keeps the input size.
        text_embedding: precomputed [N_fg, D] class embeddings (skips the tokenizer).
        amp_dtype: run the image encoder under torch.autocast with this dtype (float16 is what
            the published numbers used, via apex O1); scoring stays fp32. None (default): fp32.
            A deliberate deviation: masks then differ slightly from fp32.
    The model is switched to eval() for each call and restored afterwards.
    """

    def __init__(self, model, class_names: Sequence[str], templates='simple',
                 bg_thresh: float = 0.95, mode: str = 'slide',
                 crop: Union[int, Tuple[int, int]] = 448, stride: Union[int, Tuple[int, int]] = 224,
                 protocol: str = 'fast', batch_size: int = 16,
                 img_scale: Optional[Tuple[int, int]] = IMG_SCALE,
                 text_embedding: Optional[torch.Tensor] = None,
                 tokenizer: Optional[Callable] = None, device=None,
                 amp_dtype: Optional[torch.dtype] = None):
        if mode not in ('slide', 'whole'):
            raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")
        if protocol not in ('fast', 'official'):
            raise ValueError(f"protocol must be 'fast' or 'official', got {protocol!r}")
        if batch_size < 1:
            raise ValueError(f'batch_size must be >= 1, got {batch_size}')
        for attr in ('img_encoder', 'img_projector', 'build_text_embedding', 'get_logit_scale'):
            if not hasattr(model, attr):
                raise TypeError(f'model has no {attr!r}: ZeroShotSegmenter needs the full '
                                f'image-text model (MultiLabelContrastive), got {type(model).__name__}')
        self.model = model
        self.class_names = list(class_names)
        if not self.class_names:
            raise ValueError('class_names is empty: give at least one class to segment')
        self.with_bg, self.fg_names = split_background(self.class_names)
        if not self.fg_names:
            raise ValueError('class_names has no foreground class: give at least one class '
                             f'besides background, got {self.class_names}')
        self.num_classes = len(self.class_names)
        self.bg_thresh = float(bg_thresh)
        self.mode = mode
        self.crop = (crop, crop) if isinstance(crop, int) else tuple(crop)
        self.stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
        self.protocol = protocol
        self.batch_size = batch_size
        self.img_scale = img_scale
        self.templates = resolve_templates(templates)
        self.amp_dtype = amp_dtype
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if text_embedding is None:
            if getattr(model, 'text_encoder', None) is None:
                raise ValueError('model has no text encoder: cannot embed the class prompts')
            with self._eval():
                text_embedding = build_class_embedding(model, self.fg_names, self.templates,
                                                       tokenizer)
        text_embedding = torch.as_tensor(text_embedding).float().to(self.device)
        if text_embedding.ndim != 2 or text_embedding.shape[0] != len(self.fg_names):
            raise ValueError(f'text_embedding: expected [{len(self.fg_names)}, D], got '
                             f'{tuple(text_embedding.shape)}')
        self.text_embedding = text_embedding  # [N_fg, D], computed once

    # ------------------------------------------------------------------ helpers
    @contextmanager
    def _eval(self):
        was = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None)

    def _logit_scale(self) -> torch.Tensor:
        # official: clamp(exp(logit_scale), max=100)
        return self.model.get_logit_scale().detach()

    def _group_class_probs(self, feat: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        """Official group->class matrix of one window (ref §5.2 step 3): feat [G,D] projected
        group tokens, avg [1,D] projected pooled embedding -> P [G,N_fg]."""
        feat = F.normalize(feat, dim=-1)
        avg = F.normalize(avg, dim=-1)
        t = self.text_embedding
        s = self._logit_scale()
        aff = (feat @ t.T) * s  # [G,N]
        pre = F.softmax(aff, dim=-1)
        avg_aff = F.softmax((avg @ t.T) * s, dim=-1)  # [1,N]
        mask = torch.zeros_like(avg_aff)
        top = avg_aff.topk(dim=-1, k=min(5, t.shape[0]))
        mask.scatter_add_(dim=-1, index=top.indices, src=torch.ones_like(top.values))
        aff.masked_fill_(~mask.bool(), float('-inf'))
        aff = F.softmax(aff, dim=-1)
        aff *= pre
        return aff

    def _pixel_scores(self, gidx: torch.Tensor, P: torch.Tensor,
                      bg_thresh: Optional[float] = None) -> torch.Tensor:
        """Fast steps 4-5: group index map gidx [h,w] + P [G,N] -> scores [C,h,w]. The gather
        P[g(p)] equals the official one-hot matmul exactly (1·p plus exact zeros)."""
        off = 1 if self.with_bg else 0
        h, w = gidx.shape
        out = torch.zeros(P.shape[1] + off, h, w, device=gidx.device, dtype=torch.float32)
        out[off:] = P.T[:, gidx]  # [N,h,w]
        if self.with_bg:
            thr = min(self.bg_thresh if bg_thresh is None else bg_thresh, P.max().item())
            out[0, P.max(dim=-1).values[gidx] < thr] = 1
        return out

    def _score_window(self, gmap: torch.Tensor, feat: torch.Tensor, avg: torch.Tensor,
                      fast: bool) -> torch.Tensor:
        """Official encode_decode scoring of one window.

        gmap [h,w,G] group map, feat [G,D] projected group tokens, avg [1,D] projected pooled
        embedding. Returns scores [C,h,w] (C = 1 + N_fg with background)."""
        P = self._group_class_probs(feat, avg)
        if fast:
            return self._pixel_scores(gmap.argmax(dim=-1), P)
        off = 1 if self.with_bg else 0
        h, w = gmap.shape[:2]
        out = torch.zeros(P.shape[1] + off, h, w, device=gmap.device, dtype=torch.float32)
        onehot = F.one_hot(gmap.argmax(dim=-1), num_classes=gmap.shape[-1]).to(gmap.dtype)
        px = onehot @ P  # [h,w,N]
        out[off:] = px.permute(2, 0, 1)
        if self.with_bg:
            thr = min(self.bg_thresh, P.max().item())
            out[0, px.max(dim=-1).values < thr] = 1
        return out

    # ------------------------------------------------------------ official path
    def _official_get_attn_maps(self, img: torch.Tensor) -> List[torch.Tensor]:
        """[1,3,h,w] -> list of [1,h,w,G] soft group maps (two resizes, as the official code)."""
        with self._autocast():
            res = self.model.img_encoder(img, return_attn=True, as_dict=True)
        h, w = img.shape[-2:]
        maps = []
        for m in compose_soft_maps(res['attn_dicts']):
            up = upsample_group_map(m.float(), h, w)  # [1,G,h,w]
            # official get_attn_maps(rescale=True) interpolates once more to the same size
            up = F.interpolate(up, size=(h, w), mode='bilinear', align_corners=False)
            maps.append(up.permute(0, 2, 3, 1))  # [1,h,w,G]
        return maps

    def _official_encode_decode(self, img: torch.Tensor) -> torch.Tensor:
        gmap = self._official_get_attn_maps(img)[-1][0]  # [h,w,G]
        with self._autocast():
            outs = self.model.encode_image(img, return_feat=True, as_dict=True)
        return self._score_window(gmap, outs['image_feat'][0].float(), outs['image_x'].float(),
                                  fast=False)[None]

    def _official_predict(self, x: torch.Tensor, ori: Tuple[int, int]) -> torch.Tensor:
        """x [1,3,h,w] -> softmaxed scores [C,H,W] at the original size (mmseg slide/whole)."""
        h, w = x.shape[-2:]
        if self.mode == 'whole':
            preds = self._official_encode_decode(x)
        else:
            preds = x.new_zeros((1, self.num_classes, h, w))
            count = x.new_zeros((1, 1, h, w))
            for (y1, y2, x1, x2) in slide_windows(h, w, self.crop, self.stride):
                logit = self._official_encode_decode(x[:, :, y1:y2, x1:x2])
                preds += F.pad(logit, (int(x1), int(w - x2), int(y1), int(h - y2)))
                count[:, :, y1:y2, x1:x2] += 1
            assert (count == 0).sum() == 0
            preds = preds / count
        preds = F.interpolate(preds, size=ori, mode='bilinear', align_corners=False)
        return F.softmax(preds, dim=1)[0]

    # ---------------------------------------------------------------- fast path
    def _encode_windows(self, crops: torch.Tensor):
        """One encoder pass for a batch of windows [B,3,h,w]: (final group maps [B,h,w,G],
        projected group tokens [B,G,D], projected pooled embedding [B,D])."""
        with self._autocast():
            res = self.model.img_encoder(crops, return_feat=True, return_attn=True, as_dict=True)
            feat = self.model.img_projector(res['feat'])  # [B,G,D]
            avg = self.model.img_projector(res['x'])  # [B,D]
        m = compose_soft_maps(res['attn_dicts'])[-1].float()
        h, w = crops.shape[-2:]
        gmaps = upsample_group_map(m, h, w).permute(0, 2, 3, 1)  # [B,G,h,w] -> [B,h,w,G]
        return gmaps, feat.float(), avg.float()

    def _fast_encode(self, xs: List[torch.Tensor]) -> List[list]:
        """Encoder stage of the fast protocol: per image, a raster-ordered list of
        (window (y1, y2, x1, x2), group index map [h,w], P [G,N_fg])."""
        jobs = []  # (image index, window index, y1, y2, x1, x2)
        per_image: List[list] = []
        for i, x in enumerate(xs):
            h, w = x.shape[-2:]
            wins = [(0, h, 0, w)] if self.mode == 'whole' else slide_windows(h, w, self.crop, self.stride)
            per_image.append([None] * len(wins))
            jobs += [(i, k) + win for k, win in enumerate(wins)]
        # windows of equal shape share encoder batches (every window of one image has the same
        # shape, so several images' windows fill a batch)
        by_shape = {}
        for j in jobs:
            by_shape.setdefault((j[3] - j[2], j[5] - j[4]), []).append(j)
        for group in by_shape.values():
            for c in range(0, len(group), self.batch_size):
                chunk = group[c:c + self.batch_size]
                crops = torch.stack([xs[i][:, y1:y2, x1:x2] for (i, _, y1, y2, x1, x2) in chunk])
                gmaps, feat, avg = self._encode_windows(crops)
                gidx = gmaps.argmax(dim=-1)  # [B,h,w]
                for b, (i, k, y1, y2, x1, x2) in enumerate(chunk):
                    P = self._group_class_probs(feat[b], avg[b:b + 1])
                    per_image[i][k] = ((y1, y2, x1, x2), gidx[b], P)
        return per_image

    def _fast_assemble(self, shape_hw, ori, windows, bg_thresh: Optional[float] = None) -> torch.Tensor:
        """Accumulate window scores in raster order, average by window count, resize to the
        original size, softmax over classes -> [C,H,W]."""
        h, w = shape_hw
        dev = windows[0][1].device
        acc = torch.zeros((self.num_classes, h, w), device=dev, dtype=torch.float32)
        count = torch.zeros((1, h, w), device=dev, dtype=torch.float32)
        for (y1, y2, x1, x2), gidx, P in windows:
            acc[:, y1:y2, x1:x2] += self._pixel_scores(gidx, P, bg_thresh)
            count[:, y1:y2, x1:x2] += 1
        preds = (acc / count)[None]
        preds = F.interpolate(preds, size=ori, mode='bilinear', align_corners=False)
        return F.softmax(preds, dim=1)[0]

    def _fast_predict(self, xs: List[torch.Tensor], oris: List[Tuple[int, int]]) -> List[torch.Tensor]:
        per_image = self._fast_encode(xs)
        return [self._fast_assemble(x.shape[-2:], o, wins) for x, o, wins in zip(xs, oris, per_image)]

    # ------------------------------------------------------------------ public
    def preprocess(self, image: ImageLike) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x, ori = preprocess(image, self.img_scale)
        return x.to(self.device), ori

    @torch.no_grad()
    def predict_scores(self, images: Sequence[ImageLike]) -> List[torch.Tensor]:
        """Softmaxed class scores [C,H,W] per image at its original resolution."""
        pre = [self.preprocess(im) for im in images]
        xs, oris = [p[0] for p in pre], [p[1] for p in pre]
        with self._eval():
            if self.protocol == 'official':
                return [self._official_predict(x[None], o) for x, o in zip(xs, oris)]
            return self._fast_predict(xs, oris)

    @torch.no_grad()
    def group_maps(self, image: ImageLike) -> List[np.ndarray]:
        """Per-stage group index maps [H,W] of the whole (resized) image at the original size:
        argmax of the composed soft maps (official 'all_groups' visualisation)."""
        x, ori = self.preprocess(image)
        with self._eval(), self._autocast():
            res = self.model.img_encoder(x[None], return_attn=True, as_dict=True)
        h, w = x.shape[-2:]
        out = []
        for m in compose_soft_maps(res['attn_dicts']):
            up = upsample_group_map(m.float(), h, w)
            up = F.interpolate(up, size=ori, mode='bilinear', align_corners=False)
            out.append(up.argmax(dim=1)[0].cpu().numpy())
        return out

    @torch.no_grad()
    def predict_thresholds(self, images: Sequence[ImageLike], thresholds: Sequence[float]
                           ) -> List[List[np.ndarray]]:
        """Label maps for several background thresholds at the cost of one encoder pass:
        result[t][i] is image i under thresholds[t] (same masks as a segmenter built with
        bg_thresh=thresholds[t])."""
        if not self.with_bg:
            raise ValueError("predict_thresholds needs 'background' as the first class")
        pre = [self.preprocess(im) for im in images]
        xs, oris = [p[0] for p in pre], [p[1] for p in pre]
        with self._eval():
            per_image = self._fast_encode(xs)
        return [[self._fast_assemble(x.shape[-2:], o, wins, float(t)).argmax(dim=0).cpu().numpy()
                 .astype(np.int64) for x, o, wins in zip(xs, oris, per_image)]
                for t in thresholds]

    def predict_batch(self, images: Sequence[ImageLike], return_scores: bool = False,
                      return_groups: bool = False) -> List[Union[np.ndarray, SegOutput]]:
        scores = self.predict_scores(images)
        outs = []
        for im, sc in zip(images, scores):
            labels = sc.argmax(dim=0).cpu().numpy().astype(np.int64)
            if not (return_scores or return_groups):
                outs.append(labels)
                continue
            outs.append(SegOutput(labels=labels, scores=sc.cpu() if return_scores else None,
                                  groups=self.group_maps(im) if return_groups else None))
        return outs

    def predict(self, image: ImageLike, return_scores: bool = False,
                return_groups: bool = False) -> Union[np.ndarray, SegOutput]:
        """Label map int64 [H,W] at the input resolution (index into class_names), or a
        SegOutput with scores and/or group maps."""
        return self.predict_batch([image], return_scores, return_groups)[0]

    __call__ = predict
