"""Contrastive losses: plain and chunked paths against an independent naive computation that
builds the official one-hot soft targets [B,L1,B,L2,W] explicitly (ref §4.3)."""
import math

import pytest
import torch
import torch.nn.functional as F

from groupvit_fast.models import losses
from groupvit_fast.models.losses import (image_text_loss, multi_label_loss, row_logsumexp,
                                         set_loss_chunk_size)


def soft_target_ce(logits, target):
    # timm SoftTargetCrossEntropy: mean over rows of -sum(target * log_softmax)
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def naive_multi_label(image_feat, text_feat, scale, rank=0, world=1, gathered_txt=None,
                      gathered_img=None):
    """Official construction: dense one-hot over the world axis times per-sample 1/L weights."""
    B, L1, _ = image_feat.shape
    L2 = text_feat.shape[1]
    img = F.normalize(image_feat.double(), dim=-1)
    txt = F.normalize(text_feat.double(), dim=-1)
    image_x = img.reshape(B * L1, -1)
    text_x = txt.reshape(B * L2, -1)
    all_txt = text_x if gathered_txt is None else gathered_txt(text_x)
    all_img = image_x if gathered_img is None else gathered_img(image_x)
    logits_img = image_x @ all_txt.t() * scale
    logits_txt = text_x @ all_img.t() * scale
    eye = torch.eye(B, dtype=torch.float64)
    # [B,L1,B,L2,W]
    lab_img = F.one_hot(torch.full((B, L1, B, L2), rank, dtype=torch.long), world).double()
    lab_img = lab_img * (torch.ones(B, L1, 1, L2, 1, dtype=torch.float64) / L2) \
        * eye[:, None, :, None, None]
    lab_img = lab_img.permute(0, 1, 4, 2, 3).reshape(B * L1, world * B * L2)  # (b1 l1)(w b2 l2)
    # [B,L2,B,L1,W]
    lab_txt = F.one_hot(torch.full((B, L2, B, L1), rank, dtype=torch.long), world).double()
    lab_txt = lab_txt * (torch.ones(B, L2, 1, L1, 1, dtype=torch.float64) / L1) \
        * eye[:, None, :, None, None]
    lab_txt = lab_txt.permute(0, 1, 4, 2, 3).reshape(B * L2, world * B * L1)
    return 0.5 * (soft_target_ce(logits_img, lab_img) + soft_target_ce(logits_txt, lab_txt))


def naive_image_text(image_x, text_x, scale, rank=0, gather=None):
    img = F.normalize(image_x.double(), dim=-1)
    txt = F.normalize(text_x.double(), dim=-1)
    all_txt = txt if gather is None else gather(txt)
    all_img = img if gather is None else gather(img)
    B = img.shape[0]
    labels = torch.arange(B) + rank * B
    li = img @ all_txt.t() * scale
    lt = txt @ all_img.t() * scale
    return 0.5 * (F.cross_entropy(li, labels) + F.cross_entropy(lt, labels))


@pytest.fixture(autouse=True)
def _reset_chunk():
    yield
    set_loss_chunk_size(None)


@pytest.mark.parametrize("chunk", [0, 1, 3, 64])
def test_image_text_loss_matches_naive(chunk):
    g = torch.Generator().manual_seed(0)
    B, D = 7, 16
    img = torch.randn(B, D, generator=g, requires_grad=True)
    txt = torch.randn(B, D, generator=g, requires_grad=True)
    scale = torch.tensor(14.285, requires_grad=True)
    out = image_text_loss(img, txt, scale, chunk_size=chunk)
    ref = naive_image_text(img, txt, scale.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    go = torch.autograd.grad(out, (img, txt, scale))
    gr = torch.autograd.grad(ref, (img, txt, scale))
    for a, b in zip(go, gr):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("L1,L2,chunk", [(1, 3, 0), (1, 3, 2), (2, 3, 0), (2, 3, 5), (1, 1, 1)])
def test_multi_label_loss_matches_naive(L1, L2, chunk):
    g = torch.Generator().manual_seed(1)
    B, D = 5, 12
    img = torch.randn(B, L1, D, generator=g, requires_grad=True)
    txt = torch.randn(B, L2, D, generator=g, requires_grad=True)
    scale = torch.tensor(20.0, requires_grad=True)
    out = multi_label_loss(img, txt, scale, chunk_size=chunk)
    ref = naive_multi_label(img, txt, scale.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    go = torch.autograd.grad(out, (img, txt, scale))
    gr = torch.autograd.grad(ref, (img, txt, scale))
    for a, b in zip(go, gr):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [0, 2])
def test_losses_with_simulated_world(monkeypatch, chunk):
    """Rank 1 of world 3: local rows are scored against gathered columns and the targets sit at
    the rank's offset (the gather is simulated with fixed other-rank features)."""
    g = torch.Generator().manual_seed(2)
    B, L2, D, W, rank = 3, 2, 8, 3, 1
    others = {}

    def fake_gather(x):
        key = tuple(x.shape)
        if key not in others:
            others[key] = [torch.randn(x.shape, generator=g, dtype=torch.float64)
                           for _ in range(W - 1)]
        o = [t.to(x.dtype) for t in others[key]]
        return torch.cat(o[:rank] + [x] + o[rank:], dim=0)

    monkeypatch.setattr(losses, "gather_with_grad", fake_gather)
    monkeypatch.setattr(losses, "get_rank", lambda: rank)
    img = torch.randn(B, 1, D, generator=g)
    txt = torch.randn(B, L2, D, generator=g)
    scale = torch.tensor(10.0)
    out = multi_label_loss(img, txt, scale, chunk_size=chunk)
    ref = naive_multi_label(img, txt, 10.0, rank=rank, world=W, gathered_txt=fake_gather,
                            gathered_img=fake_gather)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    out = image_text_loss(img[:, 0], txt[:, 0], scale, chunk_size=chunk)
    ref = naive_image_text(img[:, 0], txt[:, 0], 10.0, rank=rank, gather=fake_gather)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_chunked_row_lse_gradcheck():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: row_logsumexp(a, b, s, chunk=2), (a, b, s))
    torch.testing.assert_close(row_logsumexp(a, b, s, chunk=2),
                               torch.logsumexp(a @ b.t() * s, dim=1))


def test_auto_chunking_and_setter(monkeypatch):
    assert losses._pick_chunk(8, 8, None) == 0
    monkeypatch.setattr(losses, "CHUNK_THRESHOLD", 10)
    monkeypatch.setattr(losses, "CHUNK_ELEMS", 16)
    assert losses._pick_chunk(8, 8, None) == 2
    set_loss_chunk_size(0)
    assert losses._pick_chunk(8, 8, None) == 0
    assert losses._pick_chunk(8, 8, 3) == 3
    with pytest.raises(ValueError):
        set_loss_chunk_size(-1)


def test_chunked_path_bounds_live_logits(monkeypatch):
    """The chunked forward never calls mm with more than `chunk` rows of the [M,N] product."""
    sizes = []
    real_mm = torch.mm

    def spy(a, b):
        sizes.append(a.shape[0] * b.shape[1])
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", spy)
    a = torch.randn(64, 8)
    b = torch.randn(100, 8)
    row_logsumexp(a, b, torch.tensor(2.0), chunk=4)
    assert sizes and max(sizes) == 4 * 100


def test_losses_under_bf16_autocast_stay_fp32():
    g = torch.Generator().manual_seed(4)
    img = torch.randn(6, 1, 32, generator=g)
    txt = torch.randn(6, 3, 32, generator=g)
    ref = naive_multi_label(img, txt, 50.0)
    for chunk in (0, 2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = multi_label_loss(img.bfloat16(), txt.bfloat16(), torch.tensor(50.0),
                                   chunk_size=chunk)
        assert out.dtype == torch.float32
        # only the bf16 rounding of the *inputs* remains
        torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = image_text_loss(img[:, 0], txt[:, 0], torch.tensor(50.0))
    assert out.dtype == torch.float32


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="image_text_loss"):
        image_text_loss(torch.randn(3, 4), torch.randn(2, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="multi_label_loss"):
        multi_label_loss(torch.randn(3, 4), torch.randn(3, 2, 4), torch.tensor(1.0))


def test_model_losses_use_clamped_scale():
    """MultiLabelContrastive.loss / multi_label_loss wire the clamped scales into these."""
    from groupvit_fast.models import MultiLabelContrastive
    m = MultiLabelContrastive(
        dict(type="GroupViT", img_size=32, patch_size=16, embed_dim=64, depths=[1, 1, 1],
             num_heads=[1, 1, 1], num_group_tokens=[4, 2, 0], num_output_groups=[4, 2]),
        dict(type="TextTransformer", context_length=8, width=64, layers=1, vocab_size=100),
        output_dim=16, multi_label=2)
    with torch.no_grad():
        m.logit_scale.fill_(10.0)  # exp(10) is clamped to 100
    g = torch.Generator().manual_seed(5)
    ix, tx = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    torch.testing.assert_close(m.loss(ix, tx).double(), naive_image_text(ix, tx, 100.0),
                               rtol=1e-5, atol=1e-6)
    it, tt = torch.randn(4, 1, 16, generator=g), torch.randn(4, 2, 16, generator=g)
    s = float(torch.exp(torch.tensor(1 / 0.07).log()))
    torch.testing.assert_close(m.multi_label_loss(it, tt).double(), naive_multi_label(it, tt, s),
                               rtol=1e-5, atol=1e-6)


def naive_group_loss(g, owned, t, valid, scale):
    """Per-entry loops in float64: image b scores prompt (c, k) by its best owned group."""
    g = F.normalize(g.double(), dim=-1)
    t = F.normalize(t.double(), dim=-1)
    B, G, _ = g.shape
    K = t.shape[1]

    def score(b, c, k):
        return max(float(g[b, j] @ t[c, k]) for j in range(G) if owned[b, j]) * scale

    cols = [(c, k) for c in range(B) for k in range(K) if valid[c, k]]
    img_rows, txt_rows = [], []
    for b in range(B):
        if not valid[b].any():
            continue
        row = torch.tensor([score(b, c, k) for c, k in cols], dtype=torch.float64)
        own = [score(b, b, k) for k in range(K) if valid[b, k]]
        img_rows.append(float(torch.logsumexp(row, 0)) - sum(own) / len(own))
    for c, k in cols:
        row = torch.tensor([score(b, c, k) for b in range(B)], dtype=torch.float64)
        txt_rows.append(float(torch.logsumexp(row, 0)) - score(c, c, k))
    return 0.5 * (sum(img_rows) / len(img_rows) + sum(txt_rows) / len(txt_rows))


@pytest.mark.parametrize("B,G,K", [(5, 4, 3), (3, 7, 1), (6, 2, 2)])
def test_group_multi_label_loss_matches_naive(B, G, K):
    g = torch.Generator().manual_seed(B * 100 + G * 10 + K)
    feat = torch.randn(B, G, 8, generator=g, requires_grad=True)
    txt = torch.randn(B, K, 8, generator=g, requires_grad=True)
    owned = torch.rand(B, G, generator=g) > 0.5
    owned[:, G - 1] = True  # every image owns a group
    valid = torch.rand(B, K, generator=g) > 0.3
    valid[0] = False  # a caption without nouns: no image row, no prompt rows
    valid[1, 0] = True
    out = losses.group_multi_label_loss(feat, owned, txt, valid, torch.tensor(4.0))
    assert out.item() == pytest.approx(naive_group_loss(feat, owned, txt, valid, 4.0), rel=1e-5)
    out.backward()
    # groups that own no patch never score, so they get no gradient
    assert feat.grad[~owned].abs().max() == 0
    assert feat.grad[owned].abs().max() > 0
    # a caption copy (invalid prompt) of image 0 is never scored either
    assert txt.grad[0].abs().max() == 0


def test_group_multi_label_loss_no_prompts_and_shape_errors():
    feat = torch.randn(2, 3, 4, requires_grad=True)
    out = losses.group_multi_label_loss(feat, torch.ones(2, 3, dtype=torch.bool),
                                        torch.randn(2, 2, 4), torch.zeros(2, 2, dtype=torch.bool),
                                        torch.tensor(1.0))
    assert out.item() == 0.0
    out.backward()  # still part of the graph
    with pytest.raises(ValueError, match=r"owned \[B,G\]"):
        losses.group_multi_label_loss(feat, torch.ones(2, 2, dtype=torch.bool),
                                      torch.randn(2, 2, 4), torch.ones(2, 2, dtype=torch.bool),
                                      torch.tensor(1.0))


_GROUP_LOSS_MODEL = dict(
    img=dict(img_size=32, patch_size=8, embed_dim=32, depths=[1, 1, 1], num_heads=[2, 2, 2],
             num_group_tokens=[4, 2, 0], num_output_groups=[4, 2], drop_path_rate=0.0),
    text=dict(context_length=16, width=64, layers=1), output_dim=16, multi_label=2)


@pytest.mark.parametrize("proj_num_layers", [1, 2])
def test_model_group_loss_option(proj_num_layers):
    """Off by default (official losses only, same keys); on, it adds 'group_loss', which depends
    on the group tokens, and owned_groups follows the hard assignment. With a BN-free projector
    the official terms are unchanged by the option; with the BN projector, pooled and group
    tokens are projected in one call, so BN updates once per step over all B·(1+G) rows."""
    import groupvit_fast as gf
    from groupvit_fast.config import ModelConfig
    d = dict(_GROUP_LOSS_MODEL, proj_num_layers=proj_num_layers)
    torch.manual_seed(0)
    off = gf.build_model(ModelConfig.from_dict(d)).train()
    torch.manual_seed(0)
    on = gf.build_model(ModelConfig.from_dict(dict(d, group_loss_weight=0.5))).train()
    assert off.state_dict().keys() == on.state_dict().keys()
    img = torch.randn(4, 3, 32, 32)
    txt = torch.randint(1, 400, (4, 3, 16))
    txt[..., 0], txt[..., 6:] = 49406, 0
    txt[..., 5] = 49407
    txt[0, 2] = txt[0, 0]  # caption copy: left out of the group loss
    torch.manual_seed(1)
    lo = off(img, txt)
    torch.manual_seed(1)
    ln = on(img, txt)
    assert set(lo) == {"loss", "multi_label_loss"}
    assert set(ln) == {"loss", "multi_label_loss", "group_loss"}
    if proj_num_layers == 1:
        for k in lo:  # the official terms are unchanged by the option
            torch.testing.assert_close(ln[k], lo[k])
    else:
        bn = on.img_projector.linear_hidden[1]
        assert int(bn.num_batches_tracked) == 1  # one projector call per step, not two
        seen = []
        hook = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
        mean0 = bn.running_mean.clone()
        on(img, txt)
        hook.remove()
        assert len(seen) == 1 and seen[0].shape[0] == 4 * (1 + 2)  # [B*(1+G),C']
        torch.testing.assert_close(bn.running_mean, 0.9 * mean0 + 0.1 * seen[0].mean(dim=0))
        on.eval()  # in eval the joint call is row-independent: pooled output as without feat
        torch.testing.assert_close(on.encode_image(img, return_feat=True, as_dict=True)["image_x"],
                                   on.encode_image(img), rtol=1e-5, atol=1e-6)
        on.train()
    ln["group_loss"].backward()
    assert on.img_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    res = on.img_encoder(img, return_attn=True, as_dict=True)
    owned = on.owned_groups(res["attn_dicts"])
    h1 = res["attn_dicts"][0]["hard"][:, 0]  # [B,4,16]
    h2 = res["attn_dicts"][1]["hard"][:, 0]  # [B,2,4]
    want = (h2 @ h1).sum(-1) > 0
    assert torch.equal(owned, want) and owned.any(dim=1).all()
    with pytest.raises(ValueError, match="multi_label"):
        gf.build_model(ModelConfig.from_dict(dict(d, multi_label=0, group_loss_weight=1.0)))


def naive_claim_loss(g, owned, t, valid, bg, scale):
    """float64 loops: each owned group's softmax over its image's valid nouns + background; each
    candidate takes its best owned group's log-probability."""
    g = F.normalize(g.double(), dim=-1)
    t = F.normalize(t.double(), dim=-1)
    bg = F.normalize(bg.double(), dim=-1)
    terms = []
    for b in range(g.shape[0]):
        cands = [t[b, k] for k in range(t.shape[1]) if valid[b, k]] + [bg]
        groups = [j for j in range(g.shape[1]) if owned[b, j]]
        if not groups:
            continue
        logp = {}
        for j in groups:
            logits = torch.stack([g[b, j] @ c for c in cands]) * scale
            logp[j] = torch.log_softmax(logits, 0)
        for ci in range(len(cands)):
            terms.append(-max(float(logp[j][ci]) for j in groups))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("B,G,K", [(5, 4, 3), (3, 7, 1), (6, 2, 2)])
def test_group_claim_loss_matches_naive(B, G, K):
    g = torch.Generator().manual_seed(7 + B * 100 + G * 10 + K)
    feat = torch.randn(B, G, 8, generator=g, requires_grad=True)
    txt = torch.randn(B, K, 8, generator=g, requires_grad=True)
    bg = torch.randn(8, generator=g, requires_grad=True)
    owned = torch.rand(B, G, generator=g) > 0.5
    owned[1:, G - 1] = True
    owned[0] = False  # an image owning nothing claims nothing
    valid = torch.rand(B, K, generator=g) > 0.3
    valid[1, 0] = False
    out = losses.group_claim_loss(feat, owned, txt, valid, bg, torch.tensor(3.0))
    assert out.item() == pytest.approx(naive_claim_loss(feat, owned, txt, valid, bg, 3.0),
                                       rel=1e-5)
    out.backward()
    assert feat.grad[~owned].abs().max() == 0  # unowned groups never claim
    assert txt.grad[1, 0].abs().max() == 0  # an invalid prompt is no candidate
    assert bg.grad.abs().max() > 0


def test_group_claim_loss_prefers_separate_groups():
    """Two owned groups, one noun: naming one group the noun and the other the background costs
    less than both groups naming the noun (the loss can tell the two apart)."""
    t = torch.tensor([[[1.0, 0.0]]])
    bg = torch.tensor([0.0, 1.0])
    owned = torch.ones(1, 2, dtype=torch.bool)
    valid = torch.ones(1, 1, dtype=torch.bool)
    split = losses.group_claim_loss(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), owned, t, valid, bg,
                                    torch.tensor(10.0))
    both = losses.group_claim_loss(torch.tensor([[[1.0, 0.0], [1.0, 0.0]]]), owned, t, valid, bg,
                                   torch.tensor(10.0))
    assert split.item() < 1e-3 < both.item()


def test_flat_class_loss_matches_naive_and_is_zero_when_flat():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(5, 6, generator=g, requires_grad=True)
    w = torch.rand(5, generator=g)
    prompts = torch.randn(7, 6, generator=g)
    pv = torch.tensor([True, True, False, True, True, True, False])
    out = losses.flat_class_loss(rows, w, prompts, pv, torch.tensor(5.0))
    r = F.normalize(rows.double(), dim=-1)
    p = F.normalize(prompts.double(), dim=-1)[pv]
    ce = [-float(torch.log_softmax(r[i] @ p.T * 5.0, 0).mean()) for i in range(5)]
    want = sum(float(w[i]) * ce[i] for i in range(5)) / float(w.sum()) - math.log(int(pv.sum()))
    assert out.item() == pytest.approx(want, rel=1e-5)
    out.backward()
    assert rows.grad.abs().max() > 0
    # a row orthogonal to prompts that are all alike gives a flat softmax: zero loss
    flat = losses.flat_class_loss(torch.tensor([[0.0, 1.0]]), torch.ones(1),
                                  torch.tensor([[1.0, 0.0], [-1.0, 0.0]]),
                                  torch.ones(2, dtype=torch.bool), torch.tensor(10.0))
    assert abs(flat.item()) < 1e-6


@pytest.mark.parametrize("extra,keys", [
    (dict(claim_loss_weight=1.0), {"claim_loss"}),
    (dict(flat_loss_weight=0.5), {"flat_loss"}),
    (dict(flat_loss_weight=0.5, flat_rows="pixels"), {"flat_loss"}),
    (dict(flat_loss_weight=0.5, flat_rows="share"), {"flat_loss"}),
    (dict(claim_loss_weight=1.0, flat_loss_weight=0.5, flat_rows="background"),
     {"claim_loss", "flat_loss"}),
])
def test_model_claim_and_flat_options(extra, keys):
    """Recipe options add their loss terms, train every encoder, and leave the checkpoint keys
    official (the background prompt is a non-persistent buffer)."""
    import groupvit_fast as gf
    from groupvit_fast.config import ModelConfig
    off = gf.build_model(ModelConfig.from_dict(_GROUP_LOSS_MODEL)).train()
    on = gf.build_model(ModelConfig.from_dict(dict(_GROUP_LOSS_MODEL, **extra))).train()
    assert off.state_dict().keys() == on.state_dict().keys()
    img = torch.randn(4, 3, 32, 32)
    txt = torch.randint(1, 400, (4, 3, 16))
    txt[..., 0], txt[..., 6:] = 49406, 0
    txt[..., 5] = 49407
    out = on(img, txt)
    assert set(out) == {"loss", "multi_label_loss"} | keys
    sum(out[k] for k in keys).backward()
    assert on.img_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert on.text_encoder.token_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="claim_loss_weight"):
        gf.build_model(ModelConfig.from_dict(dict(_GROUP_LOSS_MODEL, flat_loss_weight=1.0,
                                                  flat_rows="background")))


def test_flat_rows_pixels_weighs_groups_by_the_patches_they_own():
    """flat_rows='pixels' flattens the batch's mean patch: each owned group counts as often as
    it owns patches (float64 loop), so a large background group weighs more than a small object
    group; with equal shares it is 'mean' again, and unowned groups count in neither."""
    import groupvit_fast as gf
    from groupvit_fast.config import ModelConfig
    torch.manual_seed(0)
    models = {r: gf.build_model(ModelConfig.from_dict(dict(
        _GROUP_LOSS_MODEL, flat_loss_weight=1.0, flat_rows=r))) for r in ("mean", "pixels")}
    B, G, N, K, D = 3, 3, 10, 2, 16
    feat = torch.randn(B, G, D, dtype=torch.float64)
    nouns = torch.randn(B, K, D, dtype=torch.float64)
    valid = torch.ones(B, K, dtype=torch.bool)
    owner_of = torch.tensor([[0] * 8 + [1] * 2, [1] * 5 + [2] * 5, [2] * 9 + [0]])  # group 2 of
    owners = F.one_hot(owner_of, G).permute(0, 2, 1).double()  # image 0 owns nothing [B,G,N]
    s = models["pixels"].get_multi_label_logit_scale()

    def flat(rows, own):  # the model's flat term for patch owners [B,G,N]
        return models[rows]._flat_loss(feat, own, models[rows].owned_groups(owners=own), nouns,
                                       valid, None)

    got = flat("pixels", owners)
    row = torch.zeros(D, dtype=torch.float64)
    for b in range(B):
        for n in range(N):
            row += F.normalize(feat[b, owner_of[b, n]], dim=-1) / (B * N)
    ref = losses.flat_class_loss(row[None], torch.ones(1, dtype=torch.float64),
                                 nouns.reshape(-1, D), valid.reshape(-1), s)
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-6)  # fp32 inside
    mean = flat("mean", owners)
    assert abs(float(mean) - float(got)) > 1e-4  # unequal shares: the two rows differ
    even = F.one_hot(torch.tensor([[0] * 5 + [1] * 5] * B), G).permute(0, 2, 1).double()
    torch.testing.assert_close(flat("pixels", even), flat("mean", even))


def test_flat_rows_share_flattens_each_group_by_its_share():
    """flat_rows='share' flattens every group on its own, weighted by its share of its image's
    patches (float64 loop): a named background group costs more than a named object group,
    unowned groups cost nothing, and the shares carry no gradient."""
    import groupvit_fast as gf
    from groupvit_fast.config import ModelConfig
    torch.manual_seed(1)
    model = gf.build_model(ModelConfig.from_dict(dict(
        _GROUP_LOSS_MODEL, flat_loss_weight=1.0, flat_rows="share")))
    B, G, N, K, D = 3, 3, 10, 2, 16
    feat = torch.randn(B, G, D, dtype=torch.float64, requires_grad=True)
    nouns = torch.randn(B, K, D, dtype=torch.float64)
    valid = torch.ones(B, K, dtype=torch.bool)
    valid[2, 1] = False
    owner_of = torch.tensor([[0] * 8 + [1] * 2, [1] * 5 + [2] * 5, [2] * 9 + [0]])
    owners = F.one_hot(owner_of, G).permute(0, 2, 1).double()  # [B,G,N]
    owners.requires_grad_(True)
    s = model.get_multi_label_logit_scale()

    def flat(f):
        return model._flat_loss(f, owners, model.owned_groups(owners=owners), nouns, valid, None)

    got = flat(feat)
    prompts = F.normalize(nouns.reshape(-1, D)[valid.reshape(-1)], dim=-1)
    ref = torch.zeros((), dtype=torch.float64)
    for b in range(B):
        for g in range(G):
            share = float((owner_of[b] == g).sum()) / N
            logp = torch.log_softmax(F.normalize(feat[b, g], dim=-1) @ prompts.T * s, dim=-1)
            ref = ref + share * (-logp.mean() - math.log(prompts.shape[0])) / B
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-5, atol=1e-6)  # fp32 inside
    got.backward()
    assert owners.grad is None or float(owners.grad.abs().sum()) == 0.0
    assert float(feat.grad[1, 0].abs().sum()) == 0.0  # group 0 owns nothing in image 1
    # one named row: the same feature costs more as image 0's background (8 patches) than as
    # its object (2 patches)
    named = prompts[0] * 3
    flat_row = torch.zeros(D, dtype=torch.float64)
    as_bg, as_obj = feat.detach().clone(), feat.detach().clone()
    for f in (as_bg, as_obj):
        f[:] = flat_row
    as_bg[0, 0], as_obj[0, 1] = named, named
    with torch.no_grad():
        assert float(flat(as_bg)) > float(flat(as_obj)) + 1e-3


def test_flat_groups_only_leaves_prompts_and_temperature_alone():
    """flat_groups_only: the flatness term has the same value, the same gradient for the groups,
    and none for the noun prompts or the multi-label temperature (without it, both get one:
    pulling the prompts together or cooling the temperature also flattens a group)."""
    import groupvit_fast as gf
    from groupvit_fast.config import ModelConfig
    B, G, N, K, D = 3, 3, 10, 2, 16
    torch.manual_seed(2)
    feat0 = torch.randn(B, G, D, dtype=torch.float64)
    nouns0 = torch.randn(B, K, D, dtype=torch.float64)
    valid = torch.ones(B, K, dtype=torch.bool)
    owner_of = torch.tensor([[0] * 8 + [1] * 2, [1] * 5 + [2] * 5, [2] * 9 + [0]])
    owners = F.one_hot(owner_of, G).permute(0, 2, 1).double()  # [B,G,N]
    got = {}
    for only in (False, True):
        torch.manual_seed(0)
        model = gf.build_model(ModelConfig.from_dict(dict(
            _GROUP_LOSS_MODEL, flat_loss_weight=1.0, flat_rows="share", flat_groups_only=only)))
        feat, nouns = feat0.clone().requires_grad_(True), nouns0.clone().requires_grad_(True)
        loss = model._flat_loss(feat, owners, model.owned_groups(owners=owners), nouns, valid,
                                None)
        loss.backward()
        got[only] = (float(loss), feat.grad.clone(), nouns.grad,
                     model.multi_label_logit_scale.grad)
    assert got[True][0] == got[False][0]
    torch.testing.assert_close(got[True][1], got[False][1])
    assert float(got[False][2].abs().sum()) > 0 and float(got[False][3].abs()) > 0
    assert got[True][2] is None and got[True][3] is None
    with pytest.raises(ValueError, match="flat_groups_only needs flat_loss_weight"):
        gf.build_model(ModelConfig.from_dict(dict(_GROUP_LOSS_MODEL, flat_groups_only=True)))


def test_pool_owned_model_chains_the_ownership_once_per_step(monkeypatch):
    """With pool_owned the encoder chains the hard maps for its pooling and hands the owners to
    the group losses: one chain per training step, and the same losses as chaining again."""
    import groupvit_fast as gf
    from groupvit_fast.config import ModelConfig
    from groupvit_fast.models import group_vit, multi_label_contrastive as mlc
    d = dict(_GROUP_LOSS_MODEL, group_loss_weight=1.0, flat_loss_weight=1.0, flat_rows="share")
    d["img"] = dict(d["img"], pool_owned=True)
    torch.manual_seed(0)
    model = gf.build_model(ModelConfig.from_dict(d)).train()
    img = torch.randn(4, 3, 32, 32)
    txt = torch.randint(1, 400, (4, 3, 16))
    txt[..., 0], txt[..., 6:] = 49406, 0
    txt[..., 5] = 49407
    calls = []
    real = group_vit.final_group_owners

    def counted(attn_dicts):
        calls.append(1)
        return real(attn_dicts)

    monkeypatch.setattr(group_vit, "final_group_owners", counted)
    monkeypatch.setattr(mlc, "final_group_owners", counted)
    torch.manual_seed(1)
    once = model(img, txt)
    assert len(calls) == 1
    # the same step with the owners dropped from the encoder's outputs: chained again, same losses
    enc_forward = model.img_encoder.forward

    def without_owners(*a, **k):
        out = enc_forward(*a, **k)
        if isinstance(out, dict):
            out.pop("owners", None)
        return out

    monkeypatch.setattr(model.img_encoder, "forward", without_owners)
    torch.manual_seed(1)
    twice = model(img, txt)
    assert len(calls) == 3 and set(once) == set(twice) >= {"group_loss", "flat_loss"}
    for k in once:
        torch.testing.assert_close(once[k], twice[k])


def test_group_claim_loss_without_background_needs_a_group_per_noun():
    """Without the background candidate one noun costs nothing, and two nouns carried by one
    group cost log 2 each, against ~0 for a group each."""
    owned = torch.ones(1, 2, dtype=torch.bool)
    s = torch.tensor(10.0)
    one = losses.group_claim_loss(torch.randn(1, 2, 2), owned, torch.tensor([[[1.0, 0.0]]]),
                                  torch.ones(1, 1, dtype=torch.bool), None, s)
    assert abs(one.item()) < 1e-6
    t = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    v = torch.ones(1, 2, dtype=torch.bool)
    sep = losses.group_claim_loss(torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), owned, t, v, None, s)
    both = losses.group_claim_loss(torch.tensor([[[1.0, 1.0], [1.0, 1.0]]]), owned, t, v, None, s)
    assert sep.item() < 1e-3 and both.item() == pytest.approx(math.log(2), rel=1e-5)
    g = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    t3 = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        losses.group_claim_loss(g, torch.ones(3, 4, dtype=torch.bool), t3,
                                torch.ones(3, 2, dtype=torch.bool), None, s),
        naive_claim_loss_nobg(g, torch.ones(3, 4, dtype=torch.bool), t3,
                              torch.ones(3, 2, dtype=torch.bool), 10.0))


def naive_claim_loss_nobg(g, owned, t, valid, scale):
    g, t = F.normalize(g, dim=-1), F.normalize(t, dim=-1)
    terms = []
    for b in range(g.shape[0]):
        ks = [k for k in range(t.shape[1]) if valid[b, k]]
        logp = [torch.log_softmax(torch.stack([g[b, j] @ t[b, k] for k in ks]) * scale, 0)
                for j in range(g.shape[1]) if owned[b, j]]
        terms += [-torch.stack([lp[i] for lp in logp]).max() for i in range(len(ks))]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("B,G,K", [(3, 4, 2), (2, 3, 3)])
def test_content_claim_loss_matches_naive(B, G, K):
    """The claimant of each valid noun is the owned group whose *content* matches it best; the
    group tokens are scored by a softmax over the image's owned groups with that target, for the
    pairs whose claimant leads by the margin in images with two owned groups or more. Only
    group_feat gets gradient; the content and the nouns are targets."""
    g = torch.Generator().manual_seed(B * 10 + G)
    feat = torch.randn(B, G, 5, generator=g, requires_grad=True)
    content = torch.randn(B, G, 5, generator=g, requires_grad=True)
    nouns = torch.randn(B, K, 5, generator=g, requires_grad=True)
    owned = torch.rand(B, G, generator=g) > 0.3
    owned[:, 1] = True
    owned[0, 0] = False
    valid = torch.rand(B, K, generator=g) > 0.2
    valid[0, 0] = True
    owned[1, 0] = True  # image 1 has two owned groups at least; image 2 may have one
    s = torch.tensor(7.0)
    f, c, n = (F.normalize(x.detach().double(), dim=-1) for x in (feat, content, nouns))
    leads = []
    for b in range(B):
        gs = [j for j in range(G) if owned[b, j]]
        for k in range(K):
            if valid[b, k] and len(gs) > 1:
                cs = sorted((float(c[b, j] @ n[b, k]) for j in gs), reverse=True)
                leads.append(cs[0] - cs[1])
    margin = sorted(leads)[len(leads) // 2]  # gates about half of the pairs out
    loss, claimed = losses.content_claim_loss(feat, owned, content, nouns, valid, s,
                                              margin=margin)
    terms, want_claimed = [], torch.zeros(B, G, dtype=torch.bool)
    for b in range(B):
        gs = [j for j in range(G) if owned[b, j]]
        for k in range(K):
            if not valid[b, k] or len(gs) < 2:
                continue
            cs = sorted((float(c[b, j] @ n[b, k]) for j in gs), reverse=True)
            if cs[0] - cs[1] < margin - 1e-6:
                continue
            target = max(gs, key=lambda j: float(c[b, j] @ n[b, k]))
            want_claimed[b, target] = True
            logits = torch.stack([f[b, j] @ n[b, k] for j in gs]) * 7.0
            terms.append(-torch.log_softmax(logits, 0)[gs.index(target)])
    assert loss.item() == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)
    assert torch.equal(claimed, want_claimed)
    assert not claimed[0, 0]  # an unowned group never claims, whatever its content says
    assert 0 < len(terms) < len(leads) + 1
    loss.backward()
    assert feat.grad.abs().sum() > 0 and content.grad is None and nouns.grad is None


def test_content_claim_loss_no_nouns_and_shape_errors():
    feat = torch.randn(2, 3, 4, requires_grad=True)
    owned = torch.ones(2, 3, dtype=torch.bool)
    loss, claimed = losses.content_claim_loss(feat, owned, torch.randn(2, 3, 4),
                                              torch.randn(2, 2, 4),
                                              torch.zeros(2, 2, dtype=torch.bool),
                                              torch.tensor(1.0))
    assert loss.item() == 0.0 and not claimed.any()
    loss.backward()
    with pytest.raises(ValueError, match="content_feat"):
        losses.content_claim_loss(feat, owned, torch.randn(2, 2, 4), torch.randn(2, 2, 4),
                                  owned[:, :2], torch.tensor(1.0))


def test_group_mosaics_tile_each_group_with_its_own_patches():
    """Each owned group's mosaic is made of that group's patches only (chained through both
    stages' hard maps), at the patch-aligned size; unowned groups get none."""
    import groupvit_fast as gf
    from groupvit_fast.config import ModelConfig
    m = gf.build_model(ModelConfig.from_dict(dict(_GROUP_LOSS_MODEL, content_claim_weight=1.0)))
    B, N = 2, 16  # 32x32 image, patch 8
    # every patch a constant colour equal to its index, so a tile tells where it came from
    img = torch.arange(N, dtype=torch.float32).reshape(1, 1, 4, 1, 4, 1) \
        .expand(B, 3, 4, 8, 4, 8).reshape(B, 3, 32, 32).clone()
    img[1] += 100
    s1 = torch.zeros(B, 4, N)
    s1[:, 0, :5], s1[:, 1, 5:9], s1[:, 3, 9:] = 1, 1, 1  # stage-1 group 2 owns nothing
    s2 = torch.zeros(B, 2, 4)
    s2[:, 0, [0, 2]], s2[:, 1, [1, 3]] = 1, 1
    s2[1, :, :] = 0
    s2[1, 1, :] = 1  # image 1: final group 0 owns nothing
    attn = [{"hard": s1[:, None]}, {"hard": s2[:, None]}]
    owned = m.owned_groups(attn)
    assert owned.tolist() == [[True, True], [False, True]]
    mos, bi, gi = m.group_mosaics(img, m.patch_owners(attn))
    assert mos.shape == (3, 3, 32, 32) and bi.tolist() == [0, 0, 1] and gi.tolist() == [0, 1, 1]
    # [M,3,32,32] -> [M,3,4,8,4,8]: every tile constant, with a value from its group
    tiles = mos.reshape(3, 3, 4, 8, 4, 8)
    vals = tiles[:, 0, :, 0, :, 0].reshape(3, N)
    assert torch.equal(tiles, vals.reshape(3, 1, 4, 1, 4, 1).expand_as(tiles))
    assert set(vals[0].long().tolist()) <= set(range(5))
    assert set(vals[1].long().tolist()) <= set(range(5, N))
    assert set(vals[2].long().tolist()) <= set(range(100, 100 + N))


def test_model_content_claim_option():
    """The option adds 'content_claim_loss' (and flat_rows='content' flattens the unclaimed
    owned groups), keeps the checkpoint keys official, reads the teacher in eval mode without
    touching BN statistics, and leaves the model in training mode."""
    import groupvit_fast as gf
    from groupvit_fast.config import ModelConfig
    torch.manual_seed(0)
    off = gf.build_model(ModelConfig.from_dict(_GROUP_LOSS_MODEL)).train()
    on = gf.build_model(ModelConfig.from_dict(dict(
        _GROUP_LOSS_MODEL, content_claim_weight=1.0, content_claim_images=3,
        flat_loss_weight=1.0, flat_rows="content"))).train()
    assert off.state_dict().keys() == on.state_dict().keys()
    img = torch.randn(4, 3, 32, 32)
    txt = torch.randint(1, 400, (4, 3, 16))
    txt[..., 0], txt[..., 6:] = 49406, 0
    txt[..., 5] = 49407
    bn = next(mod for mod in on.img_projector.modules() if isinstance(mod, torch.nn.BatchNorm1d))
    calls = []
    on.group_content = (lambda f: lambda *a: calls.append(a[0].shape[0]) or f(*a))(
        on.group_content)
    out = on(img, txt)
    assert calls == [3]  # content_claim_images
    assert bn.num_batches_tracked.item() == 1  # the student's forward only
    assert on.training and all(mod.training for mod in on.modules())
    assert set(out) == {"loss", "multi_label_loss", "content_claim_loss", "flat_loss"}
    (out["content_claim_loss"] + out["flat_loss"]).backward()
    assert on.img_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    for bad, match in [(dict(flat_loss_weight=1.0, flat_rows="content"), "content_claim_weight"),
                       (dict(content_claim_weight=-1.0), "content_claim_weight"),
                       (dict(content_claim_weight=1.0, content_claim_images=0),
                        "content_claim_images")]:
        with pytest.raises(ValueError, match=match):
            gf.build_model(ModelConfig.from_dict(dict(_GROUP_LOSS_MODEL, **bad)))


def test_assign_info_loss_matches_naive_and_its_extremes():
    """1 - I(token; group)/log S per image, against a float64 loop; 0 for a sharp, balanced
    assignment, 1 for a uniform one and for one group taking every token."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    soft = torch.softmax(logits, dim=1)  # [B,S,N]
    out = losses.assign_info_loss(soft)
    want = []
    for b in range(3):
        p = soft[b].detach()
        cond = sum(-float((p[:, n] * p[:, n].log()).sum()) for n in range(7)) / 7
        pbar = p.mean(dim=1)
        want.append(1 - (-float((pbar * pbar.log()).sum()) - cond) / math.log(5))
    assert out.item() == pytest.approx(sum(want) / 3, rel=1e-6)
    out.backward()
    assert logits.grad.abs().max() > 0
    sharp = F.one_hot(torch.arange(8) % 4, 4).T[None].float()  # 8 tokens, 2 per group
    assert abs(losses.assign_info_loss(sharp).item()) < 1e-5
    assert losses.assign_info_loss(torch.full((2, 4, 8), 0.25)).item() == pytest.approx(1.0)
    one = torch.zeros(1, 4, 8)
    one[:, 0] = 1
    assert losses.assign_info_loss(one).item() == pytest.approx(1.0, abs=1e-5)
    # balance 0: sharpness alone, so one group taking every token costs nothing either
    assert abs(losses.assign_info_loss(one, balance=0.0).item()) < 1e-5
    assert losses.assign_info_loss(torch.full((2, 4, 8), 0.25), balance=0.0).item() \
        == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"soft \[B,S,N\]"):
        losses.assign_info_loss(torch.rand(4, 8))


def test_assign_info_loss_batch_scope_lets_groups_specialise():
    """scope='batch' takes the H(mean) term over all tokens of the batch (float64 loop): images
    that each use one group, a different one per image, cost nothing, though per image they
    are a collapse (1.0); a group no image uses still costs."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    soft = torch.softmax(logits, dim=1)  # [B,S,N]
    out = losses.assign_info_loss(soft, balance=0.5, scope="batch")
    p = soft.detach()
    cond = float(-(p * p.log()).sum(dim=1).mean())
    pbar = p.mean(dim=(0, 2))
    marg = -float((pbar * pbar.log()).sum())
    assert out.item() == pytest.approx(0.5 - (0.5 * marg - cond) / math.log(4), rel=1e-6)
    out.backward()
    assert logits.grad.abs().max() > 0
    per_image = F.one_hot(torch.arange(4), 4).double()[:, :, None].expand(4, 4, 6)  # [B,S,N]
    assert abs(losses.assign_info_loss(per_image, scope="batch").item()) < 1e-5
    assert losses.assign_info_loss(per_image).item() == pytest.approx(1.0, abs=1e-5)
    three = per_image[:3]  # group 3 unused: H(mean) = log 3 < log 4
    assert losses.assign_info_loss(three, scope="batch").item() == pytest.approx(
        1 - math.log(3) / math.log(4), abs=1e-5)
    with pytest.raises(ValueError, match="scope"):
        losses.assign_info_loss(soft, scope="pixel")


def test_assign_info_loss_select_and_drop_restrict_the_term():
    """select keeps only some tokens, drop removes a group from each image's distributions
    (renormalised, log(S-1)): against a float64 loop, and the background-free extremes. An
    image with no selected token costs `balance`, so a collapse cannot meet the term."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    soft = torch.softmax(logits, dim=1)  # [B,S,N]
    select = torch.rand(3, 5, generator=g) > 0.4
    select[2] = False  # an image with no selected token adds nothing
    select[0, 0] = True
    bg = torch.tensor([0, 2, 1])
    drop = F.one_hot(bg, 4).bool()
    out = losses.assign_info_loss(soft, scope="batch", select=select, drop=drop)
    rows, hs = [], []
    for b in range(3):
        for n in range(5):
            if select[b, n]:
                q = soft[b, :, n].detach().clone()
                q[bg[b]] = 0
                q = q / q.sum()
                rows.append(q)
                hs.append(-float((q.clamp(min=1e-12) * q.clamp(min=1e-12).log()).sum()))
    pbar = torch.stack(rows).mean(0).clamp(min=1e-12)
    want = 1 - (-float((pbar * pbar.log()).sum()) - sum(hs) / len(hs)) / math.log(3)
    # image 2 has no selected token: it costs balance (1), weighted 1/3
    assert out.item() == pytest.approx(2 / 3 * want + 1 / 3, rel=1e-6)
    out.backward()
    assert logits.grad[2].abs().max() == 0 and logits.grad[0].abs().max() > 0
    # per image: the same restriction, image 2 left out of the mean
    img = losses.assign_info_loss(soft.detach(), select=select, drop=drop)
    want_img = []
    for b in range(2):
        qs = []
        for n in range(5):
            if select[b, n]:
                q = soft[b, :, n].detach().clone()
                q[bg[b]] = 0
                qs.append(q / q.sum())
        qs = torch.stack(qs).clamp(min=1e-12)
        cond = float(-(qs * qs.log()).sum(1).mean())
        pb = qs.mean(0)
        want_img.append(1 - (-float((pb * pb.log()).sum()) - cond) / math.log(3))
    assert img.item() == pytest.approx((sum(want_img) + 1.0) / 3, rel=1e-6)
    # objects sharply on the three other groups, one group per image: no cost over the batch
    sharp = torch.zeros(3, 4, 2, dtype=torch.float64)
    for b, s_ in enumerate([1, 2, 3]):
        sharp[b, 0, 0] = 1  # the background token on group 0 (dropped, not selected)
        sharp[b, s_, 1] = 1
    sel = torch.tensor([[False, True]] * 3)
    d0 = F.one_hot(torch.zeros(3, dtype=torch.long), 4).bool()
    assert abs(losses.assign_info_loss(sharp, scope="batch", select=sel, drop=d0).item()) < 1e-6
    # ... and putting every token in one group (nothing selected) costs what a collapse costs
    none = torch.zeros(3, 2, dtype=torch.bool)
    for scope in ("image", "batch"):
        assert losses.assign_info_loss(sharp, scope=scope, select=none).item() == 1.0
        assert losses.assign_info_loss(sharp, scope=scope, select=none,
                                       balance=0.5).item() == 0.5
    with pytest.raises(ValueError, match=r"select must be \[B,N\]"):
        losses.assign_info_loss(soft, select=select[:, :2])
    with pytest.raises(ValueError, match=r"drop must be \[B,S\]"):
        losses.assign_info_loss(soft, drop=drop[:2])
    with pytest.raises(ValueError, match="at most S - 2"):
        losses.assign_info_loss(soft, drop=torch.ones(3, 4, dtype=torch.bool))


def test_object_tokens_leave_out_the_largest_final_group():
    """object_tokens chains the hard maps to patch counts: the stage's largest group (by
    patches, not by input tokens) is dropped, and the inputs assigned elsewhere that hold a
    patch are selected."""
    from groupvit_fast.models.multi_label_contrastive import MultiLabelContrastive
    # stage 0: 6 patches -> 3 groups; patches 0-3 in group 0, 4 in group 1, group 2 empty
    h0 = torch.zeros(1, 1, 3, 6)
    h0[0, 0, 0, :4] = 1
    h0[0, 0, 1, 4] = 1
    h0[0, 0, 1, 5] = 1
    # stage 1: 3 inputs -> 2 groups; input 0 (4 patches) -> group 1; inputs 1, 2 -> group 0
    h1 = torch.zeros(1, 1, 2, 3)
    h1[0, 0, 1, 0] = 1
    h1[0, 0, 0, 1] = 1
    h1[0, 0, 0, 2] = 1
    select, drop = MultiLabelContrastive.object_tokens([{"hard": h0}, {"hard": h1}], 1)
    assert drop.tolist() == [[False, True]]  # group 1 holds 4 of 6 patches
    assert select.tolist() == [[False, True, False]]  # input 2 holds no patch
    sel0, drop0 = MultiLabelContrastive.object_tokens([{"hard": h0}, {"hard": h1}], 0)
    assert drop0.tolist() == [[True, False, False]] and sel0.tolist() == [[False] * 4 + [True] * 2]


def test_model_assign_info_option_reads_the_noise_free_soft_assignment():
    """The option adds assign_info_loss on the stages it names, computed from the noise-free
    softmax of the assignment logits (the training maps' 'soft' recomputed with gradient), and
    its gradient reaches the assignment projections; checkpoint keys stay official."""
    import groupvit_fast as gf
    from groupvit_fast.config import ModelConfig
    torch.manual_seed(0)
    off = gf.build_model(ModelConfig.from_dict(_GROUP_LOSS_MODEL)).train()
    on = gf.build_model(ModelConfig.from_dict(dict(_GROUP_LOSS_MODEL, assign_info_weight=0.5,
                                                   assign_info_stages=[1]))).train()
    assert off.state_dict().keys() == on.state_dict().keys()
    with torch.no_grad():  # logits large enough that the soft map is far from uniform
        for lin in ("q_proj", "k_proj"):
            getattr(off.img_encoder.layers[1].downsample.assign, lin).weight.mul_(10)
    on.load_state_dict(off.state_dict())
    asg = [l.downsample.assign for l in on.img_encoder.layers if l.downsample is not None]
    assert [a.track_soft for a in asg] == [False, True]
    img = torch.randn(4, 3, 32, 32)
    txt = torch.randint(1, 400, (4, 3, 16))
    txt[..., 0], txt[..., 6:] = 49406, 0
    txt[..., 5] = 49407
    torch.manual_seed(1)
    out = on(img, txt)
    torch.manual_seed(1)
    ref = off(img, txt)
    for k in ref:  # the option changes no other term
        torch.testing.assert_close(out[k], ref[k])
    torch.manual_seed(1)  # the same Gumbel noise at stage 1, so the same stage-2 input
    res = on.img_encoder(img, return_attn=True, as_dict=True)
    d = [x for x in res["attn_dicts"] if x is not None][1]
    assert float(d["soft"].amax(dim=2).mean()) > 0.55  # not the uniform map of 2 groups
    torch.testing.assert_close(d["soft_grad"], d["soft"][:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["assign_info_loss"],
                               0.5 * losses.assign_info_loss(d["soft_grad"]))
    on.zero_grad()
    out["assign_info_loss"].backward()
    assert asg[1].q_proj.weight.grad.abs().sum() > 0
    on.eval()
    ev = on.img_encoder(img, return_attn=True, as_dict=True)["attn_dicts"]
    assert all("soft_grad" not in x for x in ev if x is not None)  # eval maps stay official
    with pytest.raises(ValueError, match="assign_info_stages"):
        gf.build_model(ModelConfig.from_dict(dict(_GROUP_LOSS_MODEL, assign_info_weight=1.0,
                                                  assign_info_stages=[2])))
    with pytest.raises(ValueError, match="assign_info_balance"):
        gf.build_model(ModelConfig.from_dict(dict(_GROUP_LOSS_MODEL, assign_info_weight=1.0,
                                                  assign_info_balance=2.0)))
    with pytest.raises(ValueError, match="assign_info_weight"):
        gf.build_model(ModelConfig.from_dict(dict(_GROUP_LOSS_MODEL, assign_info_weight=-1.0)))
    with pytest.raises(ValueError, match="assign_info_scope"):
        gf.build_model(ModelConfig.from_dict(dict(_GROUP_LOSS_MODEL, assign_info_weight=1.0,
                                                  assign_info_scope="pixel")))
    # the batch scope reaches the model's term
    batch = gf.build_model(ModelConfig.from_dict(dict(
        _GROUP_LOSS_MODEL, assign_info_weight=0.5, assign_info_stages=[1],
        assign_info_scope="batch"))).train()
    batch.load_state_dict(off.state_dict())
    torch.manual_seed(1)
    outb = batch(img, txt)
    torch.testing.assert_close(outb["assign_info_loss"],
                               0.5 * losses.assign_info_loss(d["soft_grad"], scope="batch"))
    assert not torch.allclose(outb["assign_info_loss"], out["assign_info_loss"])
    # the objects scope: the batch term on the tokens outside each image's largest group
    with pytest.raises(ValueError, match=r">= 3 groups at every stage it reads; stage\(s\) \[1\]"):
        gf.build_model(ModelConfig.from_dict(dict(
            _GROUP_LOSS_MODEL, assign_info_weight=0.5, assign_info_stages=[1],
            assign_info_scope="objects")))  # 2 final groups
    torch.manual_seed(0)
    objs = gf.build_model(ModelConfig.from_dict(dict(
        _GROUP_LOSS_MODEL, img=dict(_GROUP_LOSS_MODEL["img"], num_group_tokens=[6, 4, 0],
                                    num_output_groups=[6, 4]),
        assign_info_weight=0.5, assign_info_stages=[1], assign_info_scope="objects"))).train()
    torch.manual_seed(1)
    outo = objs(img, txt)
    torch.manual_seed(1)
    maps = [x for x in objs.img_encoder(img, return_attn=True, as_dict=True)["attn_dicts"]
            if x is not None]
    select, drop = objs.object_tokens(maps, 1)
    assert bool(select.any()) and drop.sum(dim=1).tolist() == [1] * 4
    torch.testing.assert_close(outo["assign_info_loss"], 0.5 * losses.assign_info_loss(
        maps[1]["soft_grad"], scope="batch", select=select, drop=drop))
    objs.zero_grad()
    outo["assign_info_loss"].backward()
    assert objs.img_encoder.layers[1].downsample.assign.q_proj.weight.grad.abs().sum() > 0
