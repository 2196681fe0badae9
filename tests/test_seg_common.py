"""Shared helpers for the segmentation tests: a tiny GroupViT whose random weights give varied
groups (so mask comparisons are not trivially 'everything is one class'), fabricated images and
the fabricated dataset layouts."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from groupvit_fast.models import GroupViT, MultiLabelContrastive, TextTransformer

# mmseg-style scale for tests: short side 96 instead of 448 keeps everything tiny
SCALE = (512, 96)


def tiny_model(seed: int = 0, patch: int = 16, embed_dim: int = 32) -> MultiLabelContrastive:
    torch.manual_seed(seed)
    img = GroupViT(img_size=64, patch_size=patch, embed_dim=embed_dim, depths=[1, 1, 1],
                   num_heads=[2, 2, 2], num_group_tokens=[8, 4, 0], num_output_groups=[8, 4],
                   drop_path_rate=0.0)
    txt = TextTransformer(width=64, layers=1, vocab_size=49408)
    m = MultiLabelContrastive(img, txt, output_dim=32, proj_num_layers=2)
    with torch.no_grad():
        # the default init (std 0.02, zero group tokens) assigns every token to one group;
        # larger weights make the soft maps and the group->class choice vary across the image
        for name, p in m.img_encoder.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 1.5 / math.sqrt(p.shape[-1]))
            if 'group_token' in name:
                p.normal_(0, 1.0)
        m.logit_scale.fill_(math.log(100.0))
    return m.eval()


def blocky_image(rng, h, w, block=16):
    """Piecewise-constant colours: gives groups with real boundaries."""
    base = rng.randint(0, 256, (h // block + 2, w // block + 2, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(base).resize((w + 2 * block, h + 2 * block), Image.NEAREST)
                      )[block // 2:block // 2 + h, block // 3:block // 3 + w].copy()


def group_text_embedding(model, image, k=5):
    """Class embeddings taken from the model's own group tokens on ``image`` (so several classes
    win somewhere), plus random directions when k exceeds the number of groups."""
    from groupvit_fast.seg.transforms import preprocess
    x, _ = preprocess(image, SCALE)
    with torch.no_grad():
        f = model.encode_image(x[None], return_feat=True, as_dict=True)['image_feat'][0]
    emb = torch.nn.functional.normalize(f, dim=-1)
    g = torch.Generator().manual_seed(1)
    extra = torch.nn.functional.normalize(torch.randn(max(0, k - len(emb)), emb.shape[1], generator=g), dim=-1)
    return torch.cat([emb, extra])[:k]


def save_palette_png(arr, path):
    from groupvit_fast.seg.classes import voc_palette
    im = Image.fromarray(arr.astype(np.uint8))
    im.putpalette(voc_palette(256).reshape(-1).tolist())
    im.save(path)


def make_voc(root, items, split_ids=None, context=False):
    """items: {id: (image uint8 HxWx3, label HxW)} in the VOC2012 (or VOC2010 Context) layout."""
    img_dir = os.path.join(root, 'JPEGImages')
    ann = os.path.join(root, 'SegmentationClassContext' if context else 'SegmentationClass')
    sets = os.path.join(root, 'ImageSets', 'SegmentationContext' if context else 'Segmentation')
    for d in (img_dir, ann, sets):
        os.makedirs(d, exist_ok=True)
    for k, (img, lab) in items.items():
        # PNG bytes under a .jpg name keep the pixels exact (the reader sniffs the format)
        Image.fromarray(img).save(os.path.join(img_dir, k + '.jpg'), format='PNG')
        save_palette_png(lab, os.path.join(ann, k + '.png'))
    with open(os.path.join(sets, 'val.txt'), 'w') as f:
        f.write('\n'.join(split_ids if split_ids is not None else list(items)) + '\n')
    return root


def make_coco_object(root, items):
    img_dir = os.path.join(root, 'images', 'val2017')
    ann = os.path.join(root, 'annotations', 'val2017')
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(ann, exist_ok=True)
    for k, (img, lab) in items.items():
        Image.fromarray(img).save(os.path.join(img_dir, k + '.jpg'), format='PNG')
        Image.fromarray(lab.astype(np.uint8)).save(os.path.join(ann, k + '_instanceTrainIds.png'))
    return root


@pytest.fixture(scope='module')
def model():
    return tiny_model()


def test_tiny_model_groups_are_varied(model):
    # guards the other tests: with degenerate groups fast-vs-official identity would be vacuous
    from groupvit_fast.seg.segmenter import ZeroShotSegmenter
    rng = np.random.RandomState(0)
    im = blocky_image(rng, 96, 128)
    seg = ZeroShotSegmenter(model, ['background', 'a', 'b', 'c', 'd', 'e'], img_scale=SCALE,
                            text_embedding=group_text_embedding(model, im), bg_thresh=0.9,
                            crop=64, stride=32)
    out = seg.predict(im, return_groups=True)
    assert len(np.unique(out.groups[0])) >= 4
    assert len(np.unique(out.groups[1])) >= 2
    assert len(np.unique(out.labels)) >= 2
