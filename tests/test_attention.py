"""Attention backends: the switch, and sdpa/xformers against the exact ``math`` reference
(fp32 within 1e-5 relative; bf16 within 2x the eager bf16 error against an fp32 upcast)."""
import pytest
import torch

from groupvit_fast.ops import attention as A
from groupvit_fast.ops.attention import (attention, attention_backend, attention_math,
                                         available_attention_backends, get_attention_backend,
                                         set_attention_backend)

SHAPES = [
    # (q shape, k length, causal): image self-attention, pre-assign cross-attention, text
    ((2, 3, 20, 16), 20, False),
    ((2, 3, 4, 16), 20, False),
    ((3, 2, 9, 16), 9, True),
]


@pytest.fixture(autouse=True)
def _reset_backend(monkeypatch):
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    set_attention_backend(None)
    yield
    set_attention_backend(None)


def _qkv(shape, lk, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, Lq, D = shape
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, H, lk, D, generator=g)
    v = torch.randn(B, H, lk, D, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def test_switch_default_setter_env_context(monkeypatch):
    assert get_attention_backend() == "sdpa"
    monkeypatch.setenv(A.ENV_VAR, "math")
    assert get_attention_backend() == "math"
    set_attention_backend("sdpa")  # the setter wins over the environment
    assert get_attention_backend() == "sdpa"
    with attention_backend("math"):
        assert get_attention_backend() == "math"
    assert get_attention_backend() == "sdpa"
    set_attention_backend(None)
    assert get_attention_backend() == "math"
    monkeypatch.setenv(A.ENV_VAR, "flash")
    with pytest.raises(ValueError, match="GROUPVIT_FAST_ATTN"):
        get_attention_backend()
    with pytest.raises(ValueError, match="expected one of"):
        set_attention_backend("nope")


def test_available_backends_cpu():
    avail = available_attention_backends("cpu")
    assert avail[0] == "sdpa" and "math" in avail and "xformers" not in avail


def test_xformers_on_cpu_is_a_clear_error():
    q, k, v = _qkv((1, 1, 4, 8), 4)
    with pytest.raises(RuntimeError, match="xformers"):
        attention(q, k, v, backend="xformers")


def test_bad_shapes_raise():
    q, k, v = _qkv((1, 2, 4, 8), 5)
    with pytest.raises(ValueError, match="incompatible"):
        attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match=r"\[B,H,L,D\]"):
        attention(q[0], k[0], v[0])


def test_math_matches_explicit_formula():
    q, k, v = _qkv((2, 2, 6, 8), 6)
    s = 8 ** -0.5
    logits = (q @ k.transpose(-1, -2)) * s
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    ref = logits.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(attention_math(q, k, v, causal=True), ref, rtol=0, atol=0)


def _backends_to_test():
    out = ["sdpa"]
    if torch.cuda.is_available() and A._xformers_ops() is not None:
        out.append("xformers")
    return out


@pytest.mark.parametrize("backend", _backends_to_test())
@pytest.mark.parametrize("shape,lk,causal", SHAPES)
def test_backend_matches_math_fp32(backend, shape, lk, causal):
    device = "cuda" if backend == "xformers" else "cpu"
    q, k, v = [t.detach().to(device).requires_grad_() for t in _qkv(shape, lk)]
    g = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(device)
    ref = attention(q, k, v, causal=causal, backend="math")
    out = attention(q, k, v, causal=causal, backend=backend)
    assert _rel_err(out, ref) < 1e-5
    gr = torch.autograd.grad(ref, (q, k, v), g)
    go = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(go, gr):
        assert _rel_err(a, b) < 1e-5


@pytest.mark.parametrize("backend", _backends_to_test())
@pytest.mark.parametrize("shape,lk,causal", SHAPES)
def test_backend_bf16_within_twice_eager_error(backend, shape, lk, causal):
    """flash-attention convention: |kernel - ref32| <= 2 |eager_bf16 - ref32| (+ tiny atol),
    for the output and every input gradient."""
    device = "cuda" if backend == "xformers" else "cpu"
    q32, k32, v32 = [t.detach().to(device).requires_grad_() for t in _qkv(shape, lk, seed=1)]
    g32 = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device)
    ref = attention_math(q32, k32, v32, causal=causal)
    ref_g = torch.autograd.grad(ref, (q32, k32, v32), g32)
    q, k, v = [t.detach().bfloat16().requires_grad_() for t in (q32, k32, v32)]
    eager = attention_math(q, k, v, causal=causal)
    eager_g = torch.autograd.grad(eager, (q, k, v), g32.bfloat16())
    out = attention(q, k, v, causal=causal, backend=backend)
    out_g = torch.autograd.grad(out, (q, k, v), g32.bfloat16())
    for o, e, r in [(out, eager, ref)] + list(zip(out_g, eager_g, ref_g)):
        err = (o.double() - r.double()).abs().max().item()
        eager_err = (e.double() - r.double()).abs().max().item()
        assert err <= 2 * eager_err + 1e-3, (err, eager_err)


def _tiny_models():
    from groupvit_fast.models import GroupViT, TextTransformer
    torch.manual_seed(0)
    img = GroupViT(img_size=32, patch_size=8, embed_dim=64, depths=[1, 1, 1],
                   num_heads=[2, 2, 2], num_group_tokens=[4, 2, 0], num_output_groups=[4, 2],
                   drop_path_rate=0.0)
    txt = TextTransformer(context_length=12, width=64, layers=2, vocab_size=100)
    return img, txt


def test_model_outputs_and_grads_equal_across_backends():
    """Whole encoders (image blocks, pre-assign cross-attention, causal text) in eval mode:
    sdpa vs math within 1e-5 relative, outputs and parameter gradients; keys unchanged."""
    img_enc, txt_enc = _tiny_models()
    img_enc.eval()
    txt_enc.eval()
    keys = list(img_enc.state_dict()) + list(txt_enc.state_dict())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = torch.randint(1, 98, (3, 12), generator=torch.Generator().manual_seed(2))
    text[:, 5] = 99  # EOT
    results = {}
    for backend in ["math", "sdpa"]:
        with attention_backend(backend):
            img_enc.zero_grad(set_to_none=True)
            txt_enc.zero_grad(set_to_none=True)
            yi = img_enc(x, return_feat=True, as_dict=True)
            yt = txt_enc(text)
            (yi["x"].square().sum() + yi["feat"].sum() + yt.square().sum()).backward()
            grads = {n: p.grad.clone() for m in (img_enc, txt_enc)
                     for n, p in m.named_parameters() if p.grad is not None}
            results[backend] = (yi["x"].detach(), yi["feat"].detach(), yt.detach(), grads)
    ref, out = results["math"], results["sdpa"]
    for a, b in zip(out[:3], ref[:3]):
        assert _rel_err(a, b) < 1e-5
    assert out[3].keys() == ref[3].keys() and len(ref[3]) > 10
    # Some gradients are exactly zero in exact arithmetic (e.g. a bias that adds a constant
    # over channels right before a LayerNorm) and hold only rounding noise; the tolerance is
    # therefore relative to each tensor's scale *or* to the overall gradient scale.
    gscale = max(g.abs().max().item() for g in ref[3].values())
    for n in ref[3]:
        err = (out[3][n].double() - ref[3][n].double()).abs().max().item()
        assert err <= 1e-5 * max(ref[3][n].abs().max().item(), 0.1 * gscale), (n, err)
    assert list(img_enc.state_dict()) + list(txt_enc.state_dict()) == keys
