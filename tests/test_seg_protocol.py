"""The zero-shot scoring protocol: fast (one pass, batched) vs the official two-pass reference,
and the scoring rules checked against an independent computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from groupvit_fast.seg.segmenter import ZeroShotSegmenter, build_class_embedding
from test_seg_common import SCALE, blocky_image, group_text_embedding, model, tiny_model  # noqa: F401

NAMES = ['background', 'a', 'b', 'c', 'd', 'e', 'f', 'g']


def _images(seed=0):
    rng = np.random.RandomState(seed)
    # slide grids of 1x1, 1x2, 2x1 and 3x2 windows at the test scale (short side 96, crop 64)
    return [blocky_image(rng, 96, 96), blocky_image(rng, 120, 170), blocky_image(rng, 130, 100),
            blocky_image(rng, 60, 150), blocky_image(rng, 200, 140)]


@pytest.mark.parametrize('mode,with_bg', [('slide', True), ('slide', False), ('whole', True)])
def test_fast_equals_official_two_pass(model, mode, with_bg):
    ims = _images()
    names = NAMES if with_bg else NAMES[1:]
    temb = group_text_embedding(model, ims[1], k=7)
    kw = dict(text_embedding=temb, bg_thresh=0.9, img_scale=SCALE, crop=64, stride=32, mode=mode)
    fast = ZeroShotSegmenter(model, names, batch_size=8, **kw)
    ref = ZeroShotSegmenter(model, names, protocol='official', **kw)
    a = fast.predict_batch(ims, return_scores=True)
    b = ref.predict_batch(ims, return_scores=True)
    n_labels = set()
    for x, y, im in zip(a, b, ims):
        assert x.labels.shape == im.shape[:2] and x.labels.dtype == np.int64
        np.testing.assert_array_equal(x.labels, y.labels)
        torch.testing.assert_close(x.scores, y.scores, rtol=0, atol=1e-5)
        n_labels |= set(np.unique(x.labels).tolist())
    assert len(n_labels) >= 3  # the comparison covers several classes


def test_batching_images_matches_one_at_a_time(model):
    ims = _images(1)[1:4]
    temb = group_text_embedding(model, ims[0], k=7)
    kw = dict(text_embedding=temb, img_scale=SCALE, crop=64, stride=32)
    together = ZeroShotSegmenter(model, NAMES, batch_size=32, **kw).predict_batch(ims)
    single = ZeroShotSegmenter(model, NAMES, batch_size=1, **kw)
    for t, im in zip(together, ims):
        np.testing.assert_array_equal(t, single.predict(im))


def test_slide_with_one_window_equals_whole(model):
    rng = np.random.RandomState(3)
    im = blocky_image(rng, 64, 80)
    temb = group_text_embedding(model, im)
    kw = dict(text_embedding=temb, img_scale=None, protocol='official')
    s = ZeroShotSegmenter(model, NAMES[:6], mode='slide', crop=128, stride=64, **kw)
    w = ZeroShotSegmenter(model, NAMES[:6], mode='whole', **kw)
    torch.testing.assert_close(s.predict(im, return_scores=True).scores,
                               w.predict(im, return_scores=True).scores, rtol=0, atol=0)


def _independent_window_scores(gmap, feat, avg, temb, scale, bg_thresh, with_bg):
    """float64 numpy transcription of ref §5.2 steps 3-5."""
    feat = feat / np.linalg.norm(feat, axis=-1, keepdims=True)
    avg = avg / np.linalg.norm(avg)
    t = temb

    def softmax(z):
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)
    S = scale * feat @ t.T  # [G,N]
    pre = softmax(S)
    top = np.argsort(-softmax(scale * avg @ t.T))[:min(5, len(t))]
    masked = np.full_like(S, -np.inf)
    masked[:, top] = S[:, top]
    P = softmax(masked) * pre
    g = gmap.argmax(-1)
    px = P[g]  # [h,w,N]
    out = [px.transpose(2, 0, 1)]
    if with_bg:
        thr = min(bg_thresh, P.max())
        out.insert(0, (px.max(-1) < thr)[None].astype(np.float64))
    return np.concatenate(out)


@pytest.mark.parametrize('fast', [True, False])
@pytest.mark.parametrize('n_fg,with_bg', [(7, True), (3, True), (7, False)])
def test_window_scoring_matches_independent_computation(model, fast, n_fg, with_bg):
    g = torch.Generator().manual_seed(0)
    G, D, h, w = 4, 32, 12, 10
    gmap = torch.rand(h, w, G, generator=g)
    feat = torch.randn(G, D, generator=g)
    avg = torch.randn(1, D, generator=g)
    temb = F.normalize(torch.randn(n_fg, D, generator=g), dim=-1)
    names = (['background'] if with_bg else []) + [f'c{i}' for i in range(n_fg)]
    seg = ZeroShotSegmenter(model, names, text_embedding=temb, bg_thresh=0.5)
    got = seg._score_window(gmap, feat, avg, fast=fast).numpy()
    want = _independent_window_scores(gmap.numpy().astype(np.float64), feat.double().numpy(),
                                      avg.double().numpy()[0], temb.double().numpy(), 100.0, 0.5,
                                      with_bg)
    np.testing.assert_allclose(got, want, atol=1e-5)
    if n_fg > 5:  # classes outside the pooled top-5 never score
        assert (got[(1 if with_bg else 0):].reshape(n_fg, -1).max(1) > 0).sum() <= 5


def test_logit_scale_is_clamped_at_100(model):
    rng = np.random.RandomState(5)
    im = blocky_image(rng, 96, 130)
    temb = group_text_embedding(model, im)
    kw = dict(text_embedding=temb, img_scale=SCALE, crop=64, stride=32)
    s100 = ZeroShotSegmenter(model, NAMES[:6], **kw).predict(im, return_scores=True).scores
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    try:
        s1000 = ZeroShotSegmenter(model, NAMES[:6], **kw).predict(im, return_scores=True).scores
    finally:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(100.0))
    torch.testing.assert_close(s100, s1000, rtol=0, atol=0)


def test_text_embedding_computed_once_with_official_prompt():
    m = tiny_model(1)
    calls = []
    import groupvit_fast

    def tok(texts):
        calls.append(list(texts))
        return groupvit_fast.tokenize(texts)
    seg = ZeroShotSegmenter(m, ['background', 'cat', 'dog'], tokenizer=tok, img_scale=SCALE,
                            crop=64, stride=32)
    assert calls == [['a photo of a cat.', 'a photo of a dog.']]  # background is not prompted
    rng = np.random.RandomState(0)
    for _ in range(2):
        seg.predict(blocky_image(rng, 70, 90))
    assert len(calls) == 1
    emb = seg.text_embedding
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    # same numbers as the model's own recipe on the same tokens
    want = m.build_text_embedding(groupvit_fast.tokenize(['a photo of a cat.', 'a photo of a dog.'])[:, None])
    torch.testing.assert_close(emb, want)
    # multi-template: average before normalising
    e2 = build_class_embedding(m, ['cat'], templates='subset')
    assert e2.shape == (1, 32)


def test_predict_outputs_and_mode_restored(model):
    rng = np.random.RandomState(2)
    im = blocky_image(rng, 77, 101)
    temb = group_text_embedding(model, im, 3)
    model.train()
    try:
        seg = ZeroShotSegmenter(model, NAMES[:4], text_embedding=temb, img_scale=SCALE, crop=64,
                                stride=32)
        out = seg.predict(im, return_scores=True, return_groups=True)
        assert model.training  # restored after the call
    finally:
        model.eval()
    assert out.labels.shape == (77, 101)
    assert out.scores.shape == (4, 77, 101)
    torch.testing.assert_close(out.scores.sum(0), torch.ones(77, 101))  # softmax over classes
    assert [g.shape for g in out.groups] == [(77, 101), (77, 101)]
    assert out.groups[0].max() < 8 and out.groups[1].max() < 4
    # PIL and path inputs give the same answer as the array
    from PIL import Image
    np.testing.assert_array_equal(seg.predict(Image.fromarray(im)), out.labels)


def test_input_errors(model, tmp_path):
    temb = F.normalize(torch.randn(2, 32), dim=-1)
    with pytest.raises(ValueError, match='empty'):
        ZeroShotSegmenter(model, [], text_embedding=temb)
    with pytest.raises(ValueError, match='foreground'):
        ZeroShotSegmenter(model, ['background'], text_embedding=temb)
    with pytest.raises(ValueError, match=r'expected \[3, D\]'):
        ZeroShotSegmenter(model, ['a', 'b', 'c'], text_embedding=temb)
    with pytest.raises(ValueError, match='mode'):
        ZeroShotSegmenter(model, ['a', 'b'], text_embedding=temb, mode='tiles')
    with pytest.raises(TypeError, match='image-text model'):
        ZeroShotSegmenter(model.img_encoder, ['a', 'b'], text_embedding=temb)
    seg = ZeroShotSegmenter(model, ['a', 'b'], text_embedding=temb)
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'not an image')
    with pytest.raises(ValueError, match='broken.jpg'):
        seg.predict(str(bad))
    with pytest.raises(ValueError, match=r'\[H,W,3\]'):
        seg.predict(np.zeros((10, 10), np.uint8))


def test_autocast_option_runs_and_keeps_fp32_scoring(model):
    rng = np.random.RandomState(7)
    im = blocky_image(rng, 70, 90)
    temb = group_text_embedding(model, im)
    seg = ZeroShotSegmenter(model, NAMES[:6], text_embedding=temb, img_scale=SCALE, crop=64,
                            stride=32, amp_dtype=torch.bfloat16)
    out = seg.predict(im, return_scores=True)
    assert out.scores.dtype == torch.float32 and out.labels.shape == (70, 90)
    assert out.labels.max() < 6


def test_encoder_passes_fast_once_per_window_official_twice(model):
    from groupvit_fast.seg.transforms import preprocess, slide_windows
    ims = _images(2)[:3]
    n_windows = 0
    for im in ims:
        x, _ = preprocess(im, SCALE)
        n_windows += len(slide_windows(x.shape[1], x.shape[2], (64, 64), (32, 32)))
    seen = []
    h = model.img_encoder.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    try:
        temb = F.normalize(torch.randn(3, 32), dim=-1)
        kw = dict(text_embedding=temb, img_scale=SCALE, crop=64, stride=32)
        ZeroShotSegmenter(model, NAMES[:4], batch_size=64, **kw).predict_batch(ims)
        fast = list(seen)
        seen.clear()
        ZeroShotSegmenter(model, NAMES[:4], protocol='official', **kw).predict_batch(ims)
        official = list(seen)
    finally:
        h.remove()
    assert sum(fast) == n_windows and len(fast) < n_windows  # one pass each, batched
    assert official == [1] * (2 * n_windows)  # batch 1, two passes per window


def test_class_embedding_fits_a_shorter_text_context():
    """A text encoder trained with context_length < 77 (the embedded recipe) gets its own
    length: the tokenizer's zero padding is cut, the numbers equal tokenising at that length,
    and a prompt that would not fit is an error naming it."""
    import groupvit_fast
    from groupvit_fast.models import TextTransformer
    m = tiny_model(1)
    short = TextTransformer(context_length=12, width=64, layers=1, vocab_size=49408)
    short.load_state_dict({k: (v[:12] if k == 'positional_embedding' else v)
                           for k, v in m.text_encoder.state_dict().items()})
    m.text_encoder = short.eval()
    emb = build_class_embedding(m, ['cat', 'dog'])
    want = m.build_text_embedding(groupvit_fast.tokenize(['a photo of a cat.', 'a photo of a dog.'],
                                                         12)[:, None])
    torch.testing.assert_close(emb, want)
    with pytest.raises(ValueError, match="context_length 12"):
        build_class_embedding(m, ['very long class name with many many words in it'])
