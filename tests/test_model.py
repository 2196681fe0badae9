"""Foundation: the drop-in model classes match the official API, layout and semantics."""
import math

import pytest
import torch
import torch.nn.functional as F

import groupvit_fast as gf
from groupvit_fast.models import GroupViT, MultiLabelContrastive, TextTransformer

KEYS_FILE = __file__.replace("test_model.py", "data/official_yfcc_keys.tsv")


def _expected_layout():
    rows = []
    for line in open(KEYS_FILE):
        if line.startswith("#"):
            continue
        key, shape = line.rstrip("\n").split("\t")
        rows.append((key, tuple(int(s) for s in shape.split(",")) if shape else ()))
    return rows


def tiny_image(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=64, depths=[1, 1, 1], num_heads=[2, 2, 2],
               num_group_tokens=[8, 4, 0], num_output_groups=[8, 4], drop_path_rate=0.0)
    cfg.update(kw)
    return GroupViT(**cfg)


def tiny_model(multi_label=2, **kw):
    return MultiLabelContrastive(img_encoder=tiny_image(**kw),
                                 text_encoder=TextTransformer(context_length=16, width=64,
                                                              layers=1, vocab_size=49408),
                                 output_dim=32, multi_label=multi_label)


@pytest.fixture(scope="module")
def release():
    torch.manual_seed(0)
    return gf.build_model()


def test_release_state_dict_matches_official_layout(release):
    sd = release.state_dict()
    expected = _expected_layout()
    assert len(expected) == 407
    assert set(sd) == {k for k, _ in expected}
    for key, shape in expected:
        assert tuple(sd[key].shape) == shape, key
    # the image encoder keeps the official order exactly (239 keys)
    img = [k for k in sd if k.startswith("img_encoder.")]
    assert img == [k for k, _ in expected if k.startswith("img_encoder.")]
    assert len(img) == 239
    assert list(sd)[:2] == ["logit_scale", "multi_label_logit_scale"]


def test_parameter_counts(release):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(release) == 55_726_610
    assert count(release.img_encoder) == 28_837_136
    assert count(release.text_encoder) == 22_145_792
    assert count(release.img_projector) == 2_633_984
    assert count(release.text_projector) == 2_109_696
    redcaps = gf.build_model(gf.ModelConfig(multi_label=0))
    assert count(redcaps) == 55_726_609
    assert len(redcaps.state_dict()) == 406


def test_release_defaults_and_init(release):
    enc = release.img_encoder
    # stage-2 group tokens are zero-initialised because a projector feeds them
    assert torch.count_nonzero(enc.layers[1].group_token) == 0
    assert enc.layers[0].group_token.std() > 0.01
    dpr = [b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
           for layer in enc.layers for b in layer.blocks]
    assert dpr[0] == 0 and math.isclose(dpr[-1], 0.1, rel_tol=1e-6) and len(dpr) == 12
    assert math.isclose(enc.layers[0].downsample.assign.scale, 384 ** -0.5)
    assert math.isclose(release.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert release.text_encoder.transformer.resblocks[0].attn.heads == 4


@pytest.mark.parametrize("hw,n_tokens", [((224, 224), 196), ((448, 448), 784),
                                         ((448, 672), 1176)])
def test_forward_shapes_eval(release, hw, n_tokens):
    release.eval()
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        out = release.img_encoder(x, return_feat=True, return_attn=True, as_dict=True)
    assert set(out) == {"x", "feat", "attn_dicts"}
    assert out["x"].shape == (1, 384) and out["feat"].shape == (1, 8, 384)
    a1, a2, a3 = out["attn_dicts"]
    assert a1["hard"].shape == a1["soft"].shape == (1, 1, 64, n_tokens)
    assert a2["hard"].shape == a2["soft"].shape == (1, 1, 8, 64)
    assert a3 is None
    # soft maps are distributions over groups; hard maps one-hot at the soft argmax
    torch.testing.assert_close(a1["soft"].sum(2), torch.ones(1, 1, n_tokens))
    assert torch.equal(a1["hard"].argmax(2), a1["soft"].argmax(2))
    assert torch.all(a1["hard"].sum(2) == 1)


def test_forward_return_conventions():
    m = tiny_image().eval()
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(m(x), torch.Tensor)
    x_, feat = m(x, return_feat=True)
    assert x_.shape == (2, 64) and feat.shape == (2, 4, 64)
    torch.testing.assert_close(x_, feat.mean(1))


def test_training_requires_img_size():
    m = tiny_image().train()
    with pytest.raises(ValueError, match="training input must be 32x32"):
        m(torch.randn(1, 3, 48, 48))


def test_gumbel_noise_only_in_training_and_soft_maps_never_noisy():
    torch.manual_seed(0)
    m = tiny_image()
    x = torch.randn(4, 3, 32, 32)
    m.eval()
    with torch.no_grad():
        ev1 = m(x, return_attn=True, as_dict=True)["attn_dicts"][0]
        ev2 = m(x, return_attn=True, as_dict=True)["attn_dicts"][0]
    assert torch.equal(ev1["hard"], ev2["hard"])  # eval: deterministic argmax
    m.train()
    with torch.no_grad():
        tr1 = m(x, return_attn=True, as_dict=True)["attn_dicts"][0]
        tr2 = m(x, return_attn=True, as_dict=True)["attn_dicts"][0]
    # stage-1 logits do not depend on noise (no drop-path here): the soft maps are the plain
    # softmax in train and eval alike
    torch.testing.assert_close(tr1["soft"], ev1["soft"])
    # small random-init logits: Gumbel noise moves many argmaxes, differently on each call
    assert not torch.equal(tr1["hard"], ev1["hard"])
    assert not torch.equal(tr1["hard"], tr2["hard"])
    assert torch.all(tr1["hard"].sum(2).round() == 1)


def test_hard_assignment_false_uses_soft_assignment():
    m = tiny_image(hard_assignment=False).train()
    x = torch.randn(2, 3, 32, 32)
    d = m(x, return_attn=True, as_dict=True)["attn_dicts"][0]
    torch.testing.assert_close(d["hard"], d["soft"])  # plain softmax, no noise, no one-hot


def test_pos_embed_bicubic_resize_eval_and_on_load():
    m = tiny_image().eval()
    grid = m.pos_embed.reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False)
    got = m.get_pos_embed(1, 6, 8)
    torch.testing.assert_close(got, want.permute(0, 2, 3, 1).reshape(1, 48, 64))
    assert got.requires_grad  # with autograd on, no cache: gradients reach pos_embed
    with torch.no_grad():
        cached = m.get_pos_embed(1, 6, 8)
        assert m.get_pos_embed(1, 6, 8) is cached  # cached while the parameter is unchanged
        m.pos_embed.add_(1.0)
        assert m.get_pos_embed(1, 6, 8) is not cached  # in-place update invalidates it
        m.pos_embed.sub_(1.0)
    # a checkpoint trained at 48x48 (6x6 grid) loads into a 32x32 (4x4) model
    big = tiny_image(img_size=48)
    m.load_state_dict(big.state_dict())
    want = F.interpolate(big.pos_embed.reshape(1, 6, 6, 64).permute(0, 3, 1, 2), size=(4, 4),
                         mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 64)
    torch.testing.assert_close(m.pos_embed.data, want)


def test_build_from_dicts_and_instances():
    d = dict(img_encoder=dict(type="GroupViT", img_size=32, patch_size=8, embed_dim=64,
                              depths=[1, 1, 1], num_heads=[2, 2, 2], num_group_tokens=[8, 4, 0],
                              num_output_groups=[8, 4]),
             text_encoder=dict(type="TextTransformer", context_length=16, width=64, layers=1,
                               vocab_size=49408),
             output_dim=32, multi_label=2)
    a = MultiLabelContrastive(**d)
    b = gf.build_model(d)
    assert a.state_dict().keys() == b.state_dict().keys()
    with pytest.raises(ValueError, match="unknown encoder type"):
        MultiLabelContrastive(img_encoder=dict(type="ViT"), text_encoder=d["text_encoder"])
    with pytest.raises(ValueError, match="num_output_groups has 1 entries, expected 2"):
        GroupViT(num_output_groups=[64])
    with pytest.raises(ValueError, match=r"unknown img config field\(s\) \['depth'\]"):
        gf.build_model({"img": {"depth": [1]}})


def _tokens(B, K, L=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(B, 1 + K, L, dtype=torch.long)
    lens = torch.randint(2, L - 1, (B, 1 + K), generator=g)
    for b in range(B):
        for j in range(1 + K):
            n = int(lens[b, j])
            t[b, j, 0] = 49406
            t[b, j, 1:n] = torch.randint(1, 49000, (n - 1,), generator=g)
            t[b, j, n] = 49407
    return t


def test_text_truncation_is_exact():
    torch.manual_seed(0)
    enc = TextTransformer(context_length=16, width=64, layers=2).eval()
    t = _tokens(5, 0)[:, 0]
    full = TextTransformer(context_length=16, width=64, layers=2, truncate_to_eot=False).eval()
    full.load_state_dict(enc.state_dict())
    torch.testing.assert_close(enc(t), full(t), rtol=1e-5, atol=1e-6)


def _naive_losses(model, image_x, text_x, text_ml):
    """Independent computation of the official objective (single rank): explicit similarity
    matrices and the soft-target tensor built exactly as the official code does."""
    s = torch.clamp(model.logit_scale.exp(), max=100)
    I, T = F.normalize(image_x, dim=-1), F.normalize(text_x, dim=-1)
    B = I.shape[0]
    li = -torch.log_softmax(s * I @ T.t(), 1).diagonal().mean()
    lt = -torch.log_softmax(s * T @ I.t(), 1).diagonal().mean()
    loss = 0.5 * (li + lt)
    s2 = torch.clamp(model.multi_label_logit_scale.exp(), max=100)
    K = text_ml.shape[1]
    P = F.normalize(text_ml, dim=-1).reshape(B * K, -1)
    target_img = torch.zeros(B, B * K)
    target_txt = torch.zeros(B * K, B)
    for b in range(B):
        target_img[b, b * K:(b + 1) * K] = 1.0 / K
        target_txt[b * K:(b + 1) * K, b] = 1.0
    mi = (-target_img * torch.log_softmax(s2 * I @ P.t(), 1)).sum(1).mean()
    mt = (-target_txt * torch.log_softmax(s2 * P @ I.t(), 1)).sum(1).mean()
    return loss, 0.5 * (mi + mt)


def test_losses_match_independent_computation():
    torch.manual_seed(0)
    m = tiny_model(multi_label=3).train()
    with torch.no_grad():
        m.logit_scale.fill_(3.0)
        m.multi_label_logit_scale.fill_(2.0)
    image = torch.randn(6, 3, 32, 32)
    text = _tokens(6, 3)
    torch.manual_seed(1)
    losses = m(image, text)
    assert set(losses) == {"loss", "multi_label_loss"}
    torch.manual_seed(1)
    image_x = m.encode_image(image)
    t = m.encode_text(text, as_dict=True)
    want_loss, want_ml = _naive_losses(m, image_x, t["text_x"], t["text_multi_label_x"])
    torch.testing.assert_close(losses["loss"], want_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["multi_label_loss"], want_ml, rtol=1e-5, atol=1e-6)
    sum(losses.values()).backward()
    assert all(p.grad is not None for n, p in m.named_parameters()
               if p.requires_grad and "group_token" not in n)


def test_logit_scale_clamped_at_100():
    m = tiny_model()
    with torch.no_grad():
        m.logit_scale.fill_(10.0)
    assert m.get_logit_scale().item() == 100.0


def test_encode_text_splits_caption_and_prompts_and_class_embedding():
    torch.manual_seed(0)
    m = tiny_model(multi_label=2).eval()
    text = _tokens(3, 2)
    out = m.encode_text(text, as_dict=True)
    assert out["text_x"].shape == (3, 32) and out["text_multi_label_x"].shape == (3, 2, 32)
    emb = m.build_text_embedding(text)  # 3 "classes" x 3 "templates"
    raw = m.encode_text(text.reshape(9, -1)).reshape(3, 3, -1).mean(1)
    torch.testing.assert_close(emb, F.normalize(raw, dim=-1))
    logits = m(torch.randn(2, 3, 32, 32), emb)  # eval forward = zero-shot prediction
    assert logits.shape == (2, 3) and logits.abs().max() <= 1 + 1e-5
    with pytest.raises(ValueError, match="needs texts"):
        m.train()(torch.randn(2, 3, 32, 32), text[:2, 0])


def test_use_checkpoint_same_outputs_and_grads():
    torch.manual_seed(0)
    a = tiny_image(drop_path_rate=0.1)
    b = tiny_image(drop_path_rate=0.1, use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    outs = []
    for m in (a, b):
        torch.manual_seed(5)
        y = m.train()(x)
        y.pow(2).sum().backward()
        outs.append((y, [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for ga, gb in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(ga, gb)


def test_import_and_default_construct():
    m = gf.GroupViT()
    assert m.num_features == 384


@pytest.mark.parametrize("backend", [b for b in ("cpu", "reference")
                                     if b in gf.ops.available_backends()])
def test_backward_inside_autocast_region(backend, monkeypatch):
    # gradients may arrive in the autocast dtype; the grouping op must accept them
    monkeypatch.setenv("GROUPVIT_FAST_BACKEND", backend)
    torch.manual_seed(0)
    m = tiny_image().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(2, 3, 32, 32))
        y.float().pow(2).sum().backward()
    g = m.layers[0].downsample.assign.q_proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_gumbel_option_trains_with_noise_free_argmax():
    torch.manual_seed(0)
    m = tiny_image(gumbel=False).train()
    x = torch.randn(3, 3, 32, 32)
    a = m(x, return_attn=True, as_dict=True)["attn_dicts"][0]
    b = m(x, return_attn=True, as_dict=True)["attn_dicts"][0]
    assert torch.equal(a["hard"], b["hard"])  # no noise: deterministic in training too
    assert torch.equal(a["hard"].argmax(2), a["soft"].argmax(2))
    assert tiny_image().layers[0].downsample.assign.gumbel  # official default: noise when hard


def test_gumbel_per_stage():
    """gumbel=[True, False]: noise in stage 1's training assignment only (stage 2 takes the
    noise-free argmax of its logits); a wrong length is refused."""
    torch.manual_seed(0)
    m = tiny_image(gumbel=[True, False]).train()
    assert [l.downsample.assign.gumbel for l in m.layers[:2]] == [True, False]
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(1)
    a = m(x, return_attn=True, as_dict=True)["attn_dicts"]
    torch.manual_seed(2)
    b = m(x, return_attn=True, as_dict=True)["attn_dicts"]
    assert not torch.equal(a[0]["hard"], b[0]["hard"])  # stage 1: noisy
    for d in (a[1], b[1]):  # stage 2: the argmax of its own (noise-free) soft map
        assert torch.equal(d["hard"].argmax(2), d["soft"].argmax(2))
    assert [l.downsample.assign.gumbel for l in tiny_image(gumbel=[None, False]).layers[:2]] \
        == [True, False]  # None: the official rule (noise when hard)
    with pytest.raises(ValueError, match="gumbel has 3 entries"):
        tiny_image(gumbel=[True, False, True])


def test_assign_scale_multiplies_the_assignment_logits():
    torch.manual_seed(0)
    base = tiny_image().eval()
    assert [l.downsample.assign.scale for l in base.layers[:2]] == [64 ** -0.5] * 2  # official
    torch.manual_seed(0)
    scaled = tiny_image(assign_scale=[1.0, 4.0]).eval()
    assert [l.downsample.assign.scale for l in scaled.layers[:2]] == [1.0, 4.0]
    scaled.load_state_dict(base.state_dict())  # a recipe option: same parameters and keys
    x = torch.randn(2, 3, 32, 32)
    sa = base(x, return_attn=True, as_dict=True)["attn_dicts"][0]["soft"]
    sb = scaled(x, return_attn=True, as_dict=True)["attn_dicts"][0]["soft"]
    # soft maps are softmax(scale · q·k) over groups: 8x the scale gives log-odds 8x as large
    la, lb = sa.log(), sb.log()
    torch.testing.assert_close(lb - lb.mean(2, keepdim=True), 8 * (la - la.mean(2, keepdim=True)),
                               rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="assign_scale has 3 entries, expected 2"):
        tiny_image(assign_scale=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="assign_scale must be > 0"):
        tiny_image(assign_scale=[1.0, 0.0])


def test_assign_scale_factor_runs_a_stage_below_its_configured_scale():
    """The training ramp's hook: a factor per grouping stage multiplies the configured scale;
    factor 1 gives back the configured model exactly, and a bad factor list is refused."""
    torch.manual_seed(0)
    m = tiny_image(assign_scale=[1.0, 8.0]).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = m(x, return_attn=True, as_dict=True)
    assert m.assign_scale_factor == [1.0, 1.0]
    m.assign_scale_factor = [1.0, 0.25]
    assert [l.downsample.assign.scale for l in m.layers[:2]] == [1.0, 2.0]
    assert m.assign_scale_factor == [1.0, 0.25]
    low = m(x, return_attn=True, as_dict=True)["attn_dicts"]
    torch.testing.assert_close(low[0]["soft"], ref["attn_dicts"][0]["soft"])  # stage 1 as is
    la, lb = ref["attn_dicts"][1]["soft"].log(), low[1]["soft"].log()
    torch.testing.assert_close(lb - lb.mean(2, keepdim=True),
                               0.25 * (la - la.mean(2, keepdim=True)), rtol=1e-3, atol=1e-4)
    m.assign_scale_factor = [1, 1]
    torch.testing.assert_close(m(x, as_dict=True)["x"], ref["x"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expected 2 factors > 0"):
        m.assign_scale_factor = [0.5]
    with pytest.raises(ValueError, match=r"expected 2 factors > 0"):
        m.assign_scale_factor = [1.0, -1.0]


def test_assign_cosine_bounds_the_assignment_logits():
    """With assign_cosine the logits are assign_scale · cos(q, k): the soft map's log-odds between
    any two groups stay within 2·assign_scale, whatever the weights' size, and the stage without
    the option keeps the plain dot product. Same parameters and keys as the official module."""
    torch.manual_seed(0)
    base = tiny_image().eval()
    cos = tiny_image(assign_cosine=[False, True], assign_scale=[None, 3.0]).eval()
    assert [l.downsample.assign.cosine for l in cos.layers[:2]] == [False, True]
    cos.load_state_dict(base.state_dict())
    with torch.no_grad():  # large projections: plain logits would saturate the softmax
        for m in (base, cos):
            m.layers[1].downsample.assign.q_proj.weight.mul_(50)
    x = torch.randn(2, 3, 32, 32)
    a = base(x, return_attn=True, as_dict=True)["attn_dicts"]
    b = cos(x, return_attn=True, as_dict=True)["attn_dicts"]
    torch.testing.assert_close(a[0]["soft"], b[0]["soft"])  # stage 1 unchanged
    lb = b[1]["soft"].log()  # [B,1,G,N]
    spread = lb.amax(2) - lb.amin(2)
    assert float(spread.max()) <= 6.0 + 1e-4
    la = a[1]["soft"].clamp_min(1e-30).log()
    assert float((la.amax(2) - la.amin(2)).max()) > 6.0  # the dot product is not bounded
    # by hand: softmax over groups of 3·<q̂, k̂> for the stage-2 assignment
    asg = cos.layers[1].downsample.assign
    seen = {}
    h = asg.register_forward_hook(lambda mod, inp, out: seen.update(q=inp[0], k=inp[1]))
    cos(x)
    h.remove()
    q = F.normalize(asg.q_proj(seen["q"]), dim=-1)
    k = F.normalize(asg.k_proj(seen["k"]), dim=-1)
    want = torch.softmax(3.0 * q @ k.transpose(1, 2), dim=1)  # [B,S,N], softmax over groups
    torch.testing.assert_close(b[1]["soft"][:, 0], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="assign_cosine has 3 entries"):
        tiny_image(assign_cosine=[True, False, True])


@pytest.mark.parametrize("training", [False, True])
def test_pool_owned_averages_only_the_groups_that_own_a_patch(training):
    """pool_owned: the pooled embedding is the mean of the final groups that own a patch under
    the hard assignment (chained by hand from the returned maps), not of all groups; the groups
    themselves, the maps and the keys are those of the official module."""
    torch.manual_seed(0)
    base = tiny_image().train(training)
    pool = tiny_image(pool_owned=True).train(training)
    pool.load_state_dict(base.state_dict())
    with torch.no_grad():  # a stage-2 group that almost never wins: some groups own nothing
        for m in (base, pool):
            m.layers[1].downsample.assign.q_proj.weight.mul_(20)
    x = torch.randn(3, 3, 32, 32)
    torch.manual_seed(1)
    a = base(x, return_feat=True, return_attn=True, as_dict=True)
    torch.manual_seed(1)  # the same Gumbel noise in training
    b = pool(x, return_feat=True, return_attn=True, as_dict=True)
    torch.testing.assert_close(a["feat"], b["feat"])
    h1, h2 = (d["hard"][:, 0] for d in b["attn_dicts"] if d is not None)  # [B,S1,N], [B,G,S1]
    owned = (h2 @ h1).sum(-1) > 0.5  # [B,G]
    assert bool(owned.any(1).all()) and not bool(owned.all())  # a real subset in some image
    # the chained owners come back (dict outputs only) for the group losses to reuse
    torch.testing.assert_close(b["owners"], h2 @ h1)
    assert "owners" not in a and len(pool(x, return_feat=True)) == 2
    want = torch.stack([b["feat"][i][owned[i]].mean(0) for i in range(3)])  # [B,C]
    torch.testing.assert_close(b["x"], want)
    torch.testing.assert_close(a["x"], a["feat"].mean(1))
    assert not torch.allclose(a["x"], b["x"])
    assert pool.state_dict().keys() == base.state_dict().keys()
    b["x"].sum().backward()  # the mask carries no gradient, the owned groups do
    assert pool.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pool_owned needs hard_assignment"):
        tiny_image(pool_owned=True, hard_assignment=False)


@pytest.mark.parametrize("hw,patch,cin", [((64, 64), 8, 3), ((70, 53), 8, 3), ((48, 32), 16, 3),
                                          ((33, 33), 4, 5)])
def test_patch_embed_gemm_matches_convolution(hw, patch, cin):
    """The GEMM form of the non-overlapping patch projection against the convolution it replaces
    (float64), forward and backward with a shared random upstream gradient; sizes that are not a
    multiple of the patch drop the remainder as the convolution does."""
    from groupvit_fast.models.group_vit import PatchEmbed
    torch.manual_seed(0)
    pe = PatchEmbed(img_size=hw, kernel_size=patch, stride=patch, in_chans=cin, embed_dim=24).double()
    pe.eval()  # off-grid sizes are eval-only
    x = torch.randn(3, cin, *hw, dtype=torch.float64, requires_grad=True)
    y, hw_out = pe(x)
    ref = pe.proj(x)  # [B,C,h,w]
    assert tuple(hw_out) == tuple(ref.shape[2:])
    ref = ref.flatten(2).transpose(1, 2)  # [B,C,h,w] -> [B,h*w,C]
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, pe.proj.weight, pe.proj.bias), g)
    want = torch.autograd.grad(ref, (x, pe.proj.weight, pe.proj.bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_patch_embed_overlapping_kernel_keeps_the_convolution():
    from groupvit_fast.models.group_vit import PatchEmbed
    torch.manual_seed(0)
    pe = PatchEmbed(img_size=32, kernel_size=7, stride=4, padding=2, in_chans=3, embed_dim=8)
    x = torch.randn(2, 3, 32, 32)
    y, hw_out = pe(x)
    ref = pe.proj(x)
    assert tuple(hw_out) == (8, 8)
    torch.testing.assert_close(y, ref.flatten(2).transpose(1, 2))


@pytest.mark.parametrize("shape", [(7, 16), (5, 3, 16)])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_project_mlp_rows_match_official_conv1d_layout(shape, num_layers):
    """ProjectMLP's row (Linear) form against the official [B,C,L] Conv1d + BatchNorm1d layout,
    float64, training mode (batch statistics), forward, backward and BN running stats."""
    import copy
    from groupvit_fast.models.multi_label_contrastive import ProjectMLP
    torch.manual_seed(0)
    m = ProjectMLP(in_dim=16, inner_dim=12, out_dim=8, num_layers=num_layers).double().train()
    ref_m = copy.deepcopy(m)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    y = m(x)
    x3 = x.unsqueeze(1) if x.ndim == 2 else x  # [B,C] -> [B,1,C]
    ref = ref_m.linear_out(ref_m.linear_hidden(x3.transpose(1, 2))).transpose(1, 2)  # [B,C',L] -> [B,L,C']
    ref = ref.squeeze(1) if x.ndim == 2 else ref
    assert y.shape == ref.shape == (*shape[:-1], 8)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *m.parameters()], g)
    want = torch.autograd.grad(ref, [x, *ref_m.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(m.buffers(), ref_m.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
