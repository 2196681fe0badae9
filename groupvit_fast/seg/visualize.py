"""Pictures of zero-shot segmentations (Pillow only).

The official ``show_result`` modes (ref §5.5) are reproduced: input, pred (palette PNG),
input_pred (50% blend; with a background class only foreground pixels are tinted),
input_pred_label (blend plus class names at each label's centroid), all_groups / first_group /
final_group (argmax of the composed soft maps blended over the input). ``render_panel`` puts
input, prediction with a colour legend and the stage-1/stage-2 group maps side by side.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from .classes import group_palette, voc_palette

VIS_MODES = ('input', 'pred', 'input_pred', 'input_pred_label', 'all_groups', 'first_group',
             'final_group')


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def class_palette(num_classes: int, with_bg: bool) -> np.ndarray:
    """VOC colour map; index 0 (black) is background when with_bg, so foreground colours start
    at VOC index 1 either way."""
    pal = voc_palette(num_classes + 1)
    return pal[:num_classes] if with_bg else pal[1:num_classes + 1]


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """[H,W] int -> [H,W,3] uint8 (labels outside the palette are black)."""
    labels = np.asarray(labels)
    pal = np.zeros((max(len(palette), int(labels.max(initial=0)) + 1), 3), dtype=np.uint8)
    pal[:len(palette)] = palette
    return pal[np.clip(labels, 0, None)]


def blend(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, opacity: float = 0.5,
          with_bg: bool = False) -> np.ndarray:
    """Official blend_result: img·(1-α) + colour·α, on foreground pixels only when with_bg."""
    if not 0 < opacity <= 1:
        raise ValueError(f'opacity must be in (0, 1], got {opacity}')
    img = np.asarray(image).astype(np.float64)
    col = colorize(labels, palette).astype(np.float64)
    if with_bg:
        fg = np.asarray(labels) != 0
        img[fg] = img[fg] * (1 - opacity) + col[fg] * opacity
    else:
        img = img * (1 - opacity) + col * opacity
    return img.astype(np.uint8)


def label_centroids(labels: np.ndarray) -> Dict[int, tuple]:
    """{label: (row, col)} mean pixel coordinate of each label (official seg2coord)."""
    out = {}
    for lab in np.unique(labels):
        ys, xs = np.nonzero(labels == lab)
        out[int(lab)] = (float(ys.mean()), float(xs.mean()))
    return out


def draw_labels(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                with_bg: bool):
    """Class names at label centroids, orange-red on a translucent black box."""
    from PIL import Image, ImageDraw
    im = Image.fromarray(image).convert('RGBA')
    overlay = Image.new('RGBA', im.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(overlay)
    font = _font(max(12, min(im.size) // 24))
    for lab, (cy, cx) in label_centroids(labels).items():
        if with_bg and lab == 0:
            continue
        text = class_names[lab] if lab < len(class_names) else str(lab)
        box = d.textbbox((cx, cy), text, font=font)
        d.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0, 128))
        d.text((cx, cy), text, fill=(255, 69, 0, 255), font=font)
    return np.asarray(Image.alpha_composite(im, overlay).convert('RGB'))


def group_palettes(num_groups: Sequence[int]) -> List[np.ndarray]:
    """Disjoint colour ranges per stage, like the official GROUP_PALETTE slicing."""
    pal = group_palette(int(sum(num_groups)))
    out, start = [], 0
    for g in num_groups:
        out.append(pal[start:start + g])
        start += g
    return out


def _legend(class_names: Sequence[str], present: Sequence[int], palette: np.ndarray,
            width: int, font):
    from PIL import Image, ImageDraw
    pad, sw = 6, 14
    line_h = sw + 6
    # lay entries out in rows that fit the width
    rows, cur, cur_w = [], [], pad
    tmp = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    for c in present:
        name = class_names[c] if c < len(class_names) else str(c)
        tw = tmp.textlength(name, font=font)
        item_w = sw + 4 + int(tw) + 12
        if cur and cur_w + item_w > width:
            rows.append(cur)
            cur, cur_w = [], pad
        cur.append((c, name))
        cur_w += item_w
    if cur:
        rows.append(cur)
    im = Image.new('RGB', (width, pad * 2 + line_h * max(1, len(rows))), (255, 255, 255))
    d = ImageDraw.Draw(im)
    for r, row in enumerate(rows):
        x, y = pad, pad + r * line_h
        for c, name in row:
            colour = tuple(int(v) for v in palette[c]) if c < len(palette) else (0, 0, 0)
            d.rectangle((x, y, x + sw, y + sw), fill=colour, outline=(0, 0, 0))
            d.text((x + sw + 4, y), name, fill=(0, 0, 0), font=font)
            x += sw + 4 + int(d.textlength(name, font=font)) + 12
    return im


def draw_boundaries(image: np.ndarray, labels: np.ndarray, colour=(255, 255, 255)) -> np.ndarray:
    """Mark pixels whose right or lower neighbour has another label (readable on busy images)."""
    labels = np.asarray(labels)
    edge = np.zeros(labels.shape, bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    out = np.array(image, copy=True)
    out[edge] = colour
    return out


def render_panel(image: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 groups: Optional[Sequence[np.ndarray]] = None, with_bg: bool = False,
                 num_groups: Optional[Sequence[int]] = None, max_side: int = 512,
                 min_width: int = 256):
    """One picture: input | prediction overlay (+ legend of predicted classes) | stage groups.
    Returns a PIL image."""
    from PIL import Image, ImageDraw
    image = np.asarray(image)
    H, W = labels.shape
    pal = class_palette(len(class_names), with_bg)
    pred = draw_boundaries(blend(image, labels, pal, 0.5, with_bg), labels)
    tiles = [('input', image), ('prediction', pred)]
    if groups:
        ng = list(num_groups) if num_groups else [int(g.max()) + 1 for g in groups]
        for s, (g, gp) in enumerate(zip(groups, group_palettes(ng))):
            tiles.append((f'stage-{s + 1} groups ({ng[s]})',
                          draw_boundaries(blend(image, g, gp, 0.5, False), g)))
    # large images shrink to max_side; tiny ones grow so titles and the legend stay legible
    scale = min(1.0, max_side / max(H, W))
    if W * scale < min_width:
        scale = min_width / W
    tw, th = max(1, int(round(W * scale))), max(1, int(round(H * scale)))
    font = _font(14)
    title_h, gap = 22, 8
    present = [int(c) for c in np.unique(labels)]
    canvas_w = len(tiles) * tw + (len(tiles) + 1) * gap
    legend = _legend(class_names, present, pal, canvas_w - tw - 3 * gap, font)
    canvas_h = title_h + th + legend.height + 2 * gap
    canvas = Image.new('RGB', (canvas_w, canvas_h), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for i, (title, arr) in enumerate(tiles):
        x = gap + i * (tw + gap)
        d.text((x, 4), title, fill=(0, 0, 0), font=font)
        # nearest keeps label boundaries crisp in the downscaled label tiles
        tile = Image.fromarray(arr).resize((tw, th), Image.BILINEAR if i == 0 else Image.NEAREST)
        if i == 1:  # class names drawn at display size, so the text stays crisp
            small = Image.fromarray(np.asarray(labels, dtype=np.int32)).resize((tw, th), Image.NEAREST)
            tile = Image.fromarray(draw_labels(np.asarray(tile), np.asarray(small), class_names,
                                               with_bg))
        canvas.paste(tile, (x, title_h))
    canvas.paste(legend, (gap + tw + gap, title_h + th + gap))
    return canvas


def save_vis(out_file: str, mode: str, image: np.ndarray, labels: np.ndarray,
             class_names: Sequence[str], with_bg: bool,
             groups: Optional[Sequence[np.ndarray]] = None,
             num_groups: Optional[Sequence[int]] = None) -> List[str]:
    """Write one official visualisation mode; returns the files written."""
    from PIL import Image
    if mode not in VIS_MODES:
        raise ValueError(f'unknown visualisation mode {mode!r}; expected one of {VIS_MODES}')
    os.makedirs(os.path.dirname(os.path.abspath(out_file)), exist_ok=True)
    pal = class_palette(len(class_names), with_bg)
    written = []

    def save(arr_or_img, path):
        im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
        tmp = path + '.tmp.png'
        im.save(tmp, 'PNG')
        os.replace(tmp, path)
        written.append(path)

    if mode == 'input':
        save(np.asarray(image), out_file)
    elif mode == 'pred':
        if int(np.asarray(labels).max(initial=0)) > 255:
            raise ValueError('pred mode stores labels in an 8-bit palette PNG: at most 256 classes')
        # putpalette on an 'L' image turns it into 'P' without touching the indices
        im = Image.fromarray(np.asarray(labels).astype(np.uint8))
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[:len(pal)] = pal[:256]
        im.putpalette(flat.reshape(-1).tolist())
        save(im, out_file)
    elif mode == 'input_pred':
        save(blend(image, labels, pal, 0.5, with_bg), out_file)
    elif mode == 'input_pred_label':
        save(draw_labels(blend(image, labels, pal, 0.5, with_bg), labels, class_names, with_bg),
             out_file)
    else:
        if not groups:
            raise ValueError(f'mode {mode!r} needs group maps')
        ng = list(num_groups) if num_groups else [int(g.max()) + 1 for g in groups]
        pals = group_palettes(ng)
        root, ext = os.path.splitext(out_file)
        for s, g in enumerate(groups):
            if mode == 'first_group' and s != 0:
                continue
            if mode == 'final_group' and s != len(groups) - 1:
                continue
            path = f'{root}_layer{s}{ext}' if mode == 'all_groups' else out_file
            save(blend(image, g, pals[s], 0.5, False), path)
    return written
