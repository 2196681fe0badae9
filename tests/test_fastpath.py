"""The fast model path against the eager reference (math attention, no text truncation,
reference grouping op): exact speed-ups keep outputs and gradients, activation checkpointing is
exact, mixed precision stays within 2x the eager low-precision error, and the encoders compile
without graph breaks. Tiny configs only, so the file runs in well under a minute on 2 cores."""
import copy

import pytest
import torch

from groupvit_fast.models import GroupViT, MultiLabelContrastive, TextTransformer
from groupvit_fast.ops.attention import attention_backend

CTX = 16
EOT = 99


def tiny_model(use_checkpoint=False, drop_path_rate=0.1, seed=0):
    torch.manual_seed(seed)
    return MultiLabelContrastive(
        dict(type="GroupViT", img_size=32, patch_size=8, embed_dim=64, depths=[2, 1, 1],
             num_heads=[2, 2, 2], num_group_tokens=[4, 2, 0], num_output_groups=[4, 2],
             drop_path_rate=drop_path_rate, use_checkpoint=use_checkpoint),
        dict(type="TextTransformer", context_length=CTX, width=64, layers=2, vocab_size=100,
             use_checkpoint=use_checkpoint),
        output_dim=32, multi_label=2)


def batch(B=3, K=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(B, 3, 32, 32, generator=g)
    text = torch.zeros(B, 1 + K, CTX, dtype=torch.long)
    for b in range(B):
        for j in range(1 + K):
            n = int(torch.randint(2, 9, (1,), generator=g))  # EOT at <= 9 of 16
            text[b, j, 0] = 98
            text[b, j, 1:n] = torch.randint(1, 97, (n - 1,), generator=g)
            text[b, j, n] = EOT
    return img, text


def assert_rel(out, ref, tol):
    """max |out - ref| <= tol * max |ref| (relative to the tensor's scale, not per element)."""
    err = (out.double() - ref.double()).abs().max().item()
    assert err <= tol * ref.double().abs().max().item(), (err, ref.abs().max().item())


def run_train(model, img, text, seed=123, autocast=None):
    torch.manual_seed(seed)  # gumbel noise and drop-path masks
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        losses = model(img, text)
        total = sum(v for k, v in losses.items() if "loss" in k)
    total.backward()  # outside autocast, as AMP prescribes
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


def assert_grads_close(out, ref, rel):
    """Every gradient within ``rel`` of the overall gradient scale (max-norm over all
    parameters). Per-tensor relative errors are meaningless for gradients that cancel to ~0 in
    exact arithmetic (a bias feeding a LayerNorm, positional rows summed over a batch)."""
    assert out.keys() == ref.keys() and len(ref) > 5
    gscale = max(g.abs().max().item() for g in ref.values())
    for n in ref:
        err = (out[n].double() - ref[n].double()).abs().max().item()
        assert err <= rel * gscale, (n, err, gscale)


def reference_model(model):
    ref_model = copy.deepcopy(model)
    ref_model.text_encoder.truncate_to_eot = False
    return ref_model


def test_fast_train_step_matches_reference_fp32(monkeypatch):
    """Training step (gumbel + drop path): sdpa + EOT truncation vs math + full context.
    The grouping backend is pinned to the reference in all runs, because fused grouping
    backends draw their Gumbel noise from their own (Philox) stream. Losses agree within 1e-5
    relative; gradients are held to the flash-attention convention against a float64 run of the
    reference: |fast32 - ref64| <= 2 |eager32 - ref64| + 1e-5 (scale of all gradients), per
    parameter, and the same with a 1e-6 floor over all gradients together. The per-parameter
    floor is the issue's fp32 criterion, as for the losses: a small tensor's eager error can
    land near 0 by chance. Measured over 12 draws (model seeds 0-3, batch seeds 1-3), the fast
    path's largest gradient error was 0.4-2.8x the eager one's, and a parameter's excess over
    2x eager stayed below 2.7e-6 of the gradient scale in 11 draws (1.7e-5 in one)."""
    model = tiny_model()
    img, text = batch()
    monkeypatch.setenv("GROUPVIT_FAST_BACKEND", "reference")
    with attention_backend("math"):
        ref_losses, ref_grads = run_train(reference_model(model), img, text)
        l64, g64 = run_train(reference_model(model).double(), img.double(), text)
    assert model.text_encoder.truncate_to_eot
    with attention_backend("sdpa"):
        losses, grads = run_train(model, img, text)
    for k in ref_losses:
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=1e-5, atol=0)
        # A scalar's eager error can land on ~0 by chance (seen: 3 ulp, where another CPU's
        # kernels gave 18 ulp for the fast path), so the 2x-eager bound gets a floor of the
        # issue's fp32 criterion, 1e-5 relative, instead of a fixed 1e-6
        assert abs(losses[k].item() - l64[k].item()) <= \
            2 * abs(ref_losses[k].item() - l64[k].item()) + 1e-5 * abs(l64[k].item())
    assert grads.keys() == g64.keys()
    gscale = max(g.abs().max().item() for g in g64.values())
    worst = worst_eager = 0.0
    for n in g64:
        err = (grads[n].double() - g64[n]).abs().max().item()
        eager_err = (ref_grads[n].double() - g64[n]).abs().max().item()
        assert err <= 2 * eager_err + 1e-5 * gscale, (n, err, eager_err, gscale)
        worst, worst_eager = max(worst, err), max(worst_eager, eager_err)
    assert worst <= 2 * worst_eager + 1e-6 * gscale, (worst, worst_eager, gscale)


def test_fast_eval_matches_reference_fp32(monkeypatch):
    """Eval (deterministic): the whole default fast path -- sdpa, truncation and the default
    grouping backend -- against math attention, no truncation, reference grouping."""
    model = tiny_model().eval()
    img, text = batch()
    with torch.no_grad():
        fast_i = model.encode_image(img, return_feat=True, as_dict=True)
        fast_t = model.encode_text(text, as_dict=True)
        ref = reference_model(model)
        with monkeypatch.context() as m, attention_backend("math"):
            m.setenv("GROUPVIT_FAST_BACKEND", "reference")
            ref_i = ref.encode_image(img, return_feat=True, as_dict=True)
            ref_t = ref.encode_text(text, as_dict=True)
    for a, b in [(fast_i[k], ref_i[k]) for k in ref_i] + [(fast_t[k], ref_t[k]) for k in ref_t]:
        assert_rel(a, b, 1e-5)


def test_text_truncation_exact_and_effective():
    """Outputs and gradients with and without truncation to the batch's last EOT. Run in
    float64, so any difference beyond rounding would show (fp32 is covered above)."""
    torch.manual_seed(0)
    enc = TextTransformer(context_length=CTX, width=64, layers=2, vocab_size=100).double()
    _, text = batch(B=4, K=0)
    text = text[:, 0]
    seen = []
    hook = enc.transformer.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    outs = {}
    for trunc in (False, True):
        enc.truncate_to_eot = trunc
        enc.zero_grad(set_to_none=True)
        y = enc(text)
        y.square().sum().backward()
        outs[trunc] = (y.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()})
    hook.remove()
    last_eot = int(text.argmax(-1).max())
    assert seen == [CTX, last_eot + 1] and last_eot + 1 < CTX
    assert_rel(outs[True][0], outs[False][0], 1e-12)
    g_t, g_f = outs[True][1], outs[False][1]
    # positional rows beyond the last EOT get exactly zero gradient either way
    assert g_f["positional_embedding"][last_eot + 1:].abs().max() == 0
    assert_grads_close(g_t, g_f, 1e-12)


def test_pos_embed_resize_cache_is_exact_and_invalidated():
    torch.manual_seed(0)
    enc = GroupViT(img_size=32, patch_size=8, embed_dim=64, depths=[1, 1, 1],
                   num_heads=[2, 2, 2], num_group_tokens=[4, 2, 0], num_output_groups=[4, 2])
    enc.eval()
    x = torch.randn(2, 3, 48, 40)  # 6x5 grid vs the 4x4 table
    with torch.no_grad():
        fresh = enc._resize_pos(enc.pos_embed, 4, 4, 6, 5)
        p1 = enc.get_pos_embed(2, 6, 5)
        p2 = enc.get_pos_embed(2, 6, 5)
        assert p1 is p2
        torch.testing.assert_close(p1, fresh, rtol=0, atol=0)
        y1 = enc(x)
        enc.pos_embed.add_(0.5)  # an optimizer step bumps the version: the cache is rebuilt
        p3 = enc.get_pos_embed(2, 6, 5)
        assert p3 is not p1
        torch.testing.assert_close(p3, enc._resize_pos(enc.pos_embed, 4, 4, 6, 5))
        assert not torch.allclose(enc(x), y1)
    # with autograd on, the resize is differentiable and not cached
    y = enc(x)
    y.square().sum().backward()
    assert enc.pos_embed.grad is not None and enc.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.3])
def test_activation_checkpointing_is_exact(drop_path_rate):
    plain = tiny_model(drop_path_rate=drop_path_rate)
    ckpt = tiny_model(use_checkpoint=True, drop_path_rate=drop_path_rate)
    ckpt.load_state_dict(plain.state_dict())
    img, text = batch()
    l0, g0 = run_train(plain, img, text)
    l1, g1 = run_train(ckpt, img, text)
    for k in l0:
        torch.testing.assert_close(l1[k], l0[k], rtol=1e-6, atol=0)
    assert_grads_close(g1, g0, 1e-6)


def test_checkpoint_wiring_recomputes_blocks(monkeypatch):
    """use_checkpoint really routes every stage block and text block through checkpoint."""
    from groupvit_fast.models import group_vit, transformer
    calls = []
    real = group_vit.checkpointed

    def spy(module, *args):
        calls.append(type(module).__name__)
        return real(module, *args)

    monkeypatch.setattr(group_vit, "checkpointed", spy)
    monkeypatch.setattr(transformer, "checkpointed", spy)
    model = tiny_model(use_checkpoint=True)
    img, text = batch()
    run_train(model, img, text)
    assert calls.count("AttnBlock") == 4 and calls.count("ResidualAttentionBlock") == 2


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_within_twice_eager_error(dtype, monkeypatch):
    """Encoder outputs (eval) under autocast: |fast - ref32| <= 2 |eager - ref32| (+atol)."""
    model = tiny_model().eval()
    img, text = batch()
    with torch.no_grad():
        with attention_backend("math"):
            model.text_encoder.truncate_to_eot = False
            ref_i = model.encode_image(img)
            ref_t = model.encode_text(text, as_dict=True)["text_multi_label_x"]
            with torch.autocast("cpu", dtype=dtype):
                eag_i = model.encode_image(img)
                eag_t = model.encode_text(text, as_dict=True)["text_multi_label_x"]
        model.text_encoder.truncate_to_eot = True
        with attention_backend("sdpa"), torch.autocast("cpu", dtype=dtype):
            out_i = model.encode_image(img)
            out_t = model.encode_text(text, as_dict=True)["text_multi_label_x"]
    for o, e, r in ((out_i, eag_i, ref_i), (out_t, eag_t, ref_t)):
        assert _max_err(o, r) <= 2 * _max_err(e, r) + 1e-3 * r.abs().max().item()


def test_autocast_train_losses_fp32_and_close(monkeypatch):
    model = tiny_model()
    img, text = batch()
    ref_losses, _ = run_train(copy.deepcopy(model), img, text)
    losses, grads = run_train(model, img, text, autocast=torch.bfloat16)
    for k in ref_losses:
        assert losses[k].dtype == torch.float32
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=5e-2, atol=5e-2)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert model.logit_scale.grad.dtype == torch.float32


def test_encoders_compile_without_graph_breaks():
    """torch._dynamo.explain on the image encoder (train mode: gumbel grouping, drop path) and
    the text encoder (EOT truncation is skipped while compiling)."""
    torch._dynamo.reset()
    model = tiny_model()
    img, text = batch()
    model.train()
    e = torch._dynamo.explain(model.img_encoder)(img, return_feat=True, as_dict=True)
    assert e.graph_break_count == 0, [str(b.reason) for b in e.break_reasons]
    e = torch._dynamo.explain(model.text_encoder)(text.reshape(-1, CTX))
    assert e.graph_break_count == 0, [str(b.reason) for b in e.break_reasons]
    torch._dynamo.reset()


def test_compiled_image_encoder_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = tiny_model(drop_path_rate=0.0).eval()
    img, _ = batch()
    enc = model.img_encoder
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    y = compiled(img, return_feat=True, as_dict=True)
    with torch.no_grad():
        ref = enc(img, return_feat=True, as_dict=True)
    torch.testing.assert_close(y["x"].detach(), ref["x"], rtol=1e-5, atol=1e-6)
    y["x"].square().sum().backward()
    assert enc.pos_embed.grad is not None
    torch._dynamo.reset()
