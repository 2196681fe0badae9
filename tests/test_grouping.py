"""Fused grouping op (groupvit_fast.ops.gumbel_assign_merge): every backend that runs on this
machine against a float64 reference, forward and backward, plus the Gumbel statistics,
seeding, dispatch, torch.compile and saved-bytes checks.

The Triton kernels are exercised under ``TRITON_INTERPRET=1`` in test_grouping_triton.py
(small shapes: the interpreter is slow).
"""
import os

import pytest
import torch

from groupvit_fast.ops import dispatch
from groupvit_fast.ops import gumbel_assign_merge, gumbel_assign_merge_reference
from groupvit_fast.ops import _custom
from groupvit_fast.ops.memory import saved_bytes

NATIVE = _custom.native()
needs_native = pytest.mark.skipif(NATIVE is None, reason="groupvit_fast._C not built (make ext)")

# (B, S, N, C): release shapes at small B, and odd sizes
SHAPES = [
    (2, 64, 196, 384),   # stage 1 (224²)
    (3, 8, 64, 384),     # stage 2
    (1, 1, 5, 8),        # one group
    (2, 7, 33, 17),      # nothing a power of two
    (2, 5, 1, 3),        # one token
    (1, 3, 2, 1),        # C = 1
]


@pytest.fixture
def backend_env(monkeypatch):
    def force(name):
        if name is None:
            monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
        else:
            monkeypatch.setenv(dispatch.ENV_VAR, name)
    return force


def make_inputs(B, S, N, C, dtype=torch.float64, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, C, generator=gen, dtype=torch.float64) * spread
    k = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    v = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, S, C, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), dout


def reference_f64(q, k, v, dout, *, scale, gumbel, tau, eps, hard, noise):
    """float64 reference forward + backward with a given upstream gradient and noise."""
    q, k, v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    out, hard_map, soft_map = gumbel_assign_merge_reference(
        q, k, v, scale=scale, gumbel=gumbel, tau=tau, eps=eps, hard=hard, return_attn=True,
        noise=None if noise is None else noise.double())
    grads = torch.autograd.grad(out, (q, k, v), dout.double())
    return out.detach(), hard_map, soft_map, grads


def run_backend(backend, q, k, v, dout, *, scale, gumbel, tau, eps, hard, seed):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, hard_map, soft_map = gumbel_assign_merge(q, k, v, scale=scale, gumbel=gumbel, tau=tau,
                                                  eps=eps, seed=seed, hard=hard,
                                                  return_attn=True)
    assert dispatch.last_backend() == backend
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return out.detach(), hard_map, soft_map, grads


def kernel_noise(B, S, N, seed):
    return NATIVE.gumbel_noise(B, S, N, seed)


def near_tie_tokens(q, k, scale, noise, tau):
    """Tokens whose top-2 logits are so close that float rounding may flip the argmax."""
    a = torch.matmul(q.double(), k.double().transpose(-2, -1)) * scale
    if noise is not None:
        a = (a + noise.double()) / tau
    top = a.topk(min(2, a.shape[1]), dim=1).values
    if top.shape[1] < 2:
        return torch.zeros(a.shape[0], a.shape[2], dtype=torch.bool)
    return (top[:, 0] - top[:, 1]) < 1e-4 * (1 + top[:, 0].abs())


def assert_close(name, got, want, atol, rtol):
    got = got.double()
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} mismatch; max err "
                           f"{err.max().item():.3e}; first at {bad.nonzero()[:5].tolist()}")


@needs_native
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gumbel", [False, True])
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_matches_reference(backend_env, shape, gumbel, hard, dtype):
    B, S, N, C = shape
    backend_env("cpu")
    q, k, v, dout = make_inputs(B, S, N, C, dtype)
    scale, tau, eps, seed = C ** -0.5, 0.7, 1.0, 1234
    noise = kernel_noise(B, S, N, seed) if gumbel else None
    want = reference_f64(q, k, v, dout, scale=scale, gumbel=gumbel, tau=tau, eps=eps, hard=hard,
                         noise=noise)
    got = run_backend("cpu", q, k, v, dout, scale=scale, gumbel=gumbel, tau=tau, eps=eps,
                      hard=hard, seed=seed)
    tol = dict(atol=1e-10, rtol=1e-9) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-4)
    ok = ~near_tie_tokens(q, k, scale, noise, tau)  # [B,N]
    if hard:
        # the hard assignment agrees exactly (up to exact/rounding ties)
        assert torch.equal(got[1].argmax(1)[ok], want[1].argmax(1)[ok])
        if not ok.all():
            pytest.skip("near-tie tokens present; values not comparable")
    assert_close("out", got[0], want[0], **tol)
    assert_close("soft", got[2], want[2], **tol)
    for name, g, w in zip(("dq", "dk", "dv"), got[3], want[3]):
        assert_close(name, g, w, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)


needs_cuda_ext = pytest.mark.skipif(
    not torch.cuda.is_available() or NATIVE is None or not NATIVE.has_cuda(),
    reason="needs a GPU and the extension built with CUDA")


@needs_cuda_ext
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gumbel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(backend_env, shape, gumbel, dtype):
    B, S, N, C = shape
    backend_env("cuda")
    q, k, v, dout = make_inputs(B, S, N, C, dtype)
    scale, tau, eps, seed = C ** -0.5, 0.7, 1.0, 99
    noise = kernel_noise(B, S, N, seed) if gumbel else None
    want = reference_f64(q, k, v, dout, scale=scale, gumbel=gumbel, tau=tau, eps=eps, hard=True,
                         noise=noise)
    got = run_backend("cuda", q.cuda(), k.cuda(), v.cuda(), dout.cuda(), scale=scale,
                      gumbel=gumbel, tau=tau, eps=eps, hard=True, seed=seed)
    got = [got[0].cpu(), got[1].cpu(), got[2].cpu(), [g.cpu() for g in got[3]]]
    ok = ~near_tie_tokens(q, k, scale, noise, tau)
    assert torch.equal(got[1].argmax(1)[ok], want[1].argmax(1)[ok])
    if not ok.all():
        pytest.skip("near-tie tokens present")
    tol = dict(atol=2e-5, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    assert_close("out", got[0], want[0], **tol)
    for name, g, w in zip(("dq", "dk", "dv"), got[3], want[3]):
        assert_close(name, g, w, atol=tol["atol"] * 10, rtol=tol["rtol"] * 10)


@needs_native
def test_cpu_low_precision_inputs(backend_env):
    """bf16/fp16 inputs: logits/softmax in fp32 inside; compare with the fp32-upcast reference."""
    backend_env("cpu")
    B, S, N, C = 2, 8, 64, 384
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, dout = make_inputs(B, S, N, C, dtype)
        want = reference_f64(q, k, v, dout, scale=C ** -0.5, gumbel=False, tau=1.0, eps=1.0,
                             hard=True, noise=None)
        got = run_backend("cpu", q, k, v, dout, scale=C ** -0.5, gumbel=False, tau=1.0, eps=1.0,
                          hard=True, seed=None)
        assert got[0].dtype == dtype and got[3][0].dtype == dtype
        ok = ~near_tie_tokens(q, k, C ** -0.5, None, 1.0)
        assert torch.equal(got[1].argmax(1)[ok], want[1].argmax(1)[ok])
        assert_close("out", got[0], want[0], atol=2e-2, rtol=2e-2)
        for name, g, w in zip(("dq", "dk", "dv"), got[3], want[3]):
            assert_close(name, g, w, atol=2e-2, rtol=5e-2)


@needs_native
def test_cpu_gradcheck_float64(backend_env):
    """Finite differences through the custom op's backward (hard ST form, noise on)."""
    backend_env("cpu")
    q, k, v, _ = make_inputs(2, 4, 6, 5)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    fn = lambda q, k, v: gumbel_assign_merge(q, k, v, scale=0.4, gumbel=True, tau=0.8, eps=1.0,
                                             seed=7)
    # The argmax is piecewise constant, so perturbations small enough not to flip it see the
    # smooth straight-through function; make sure no near-tie exists for this seed.
    assert not near_tie_tokens(q, k, 0.4, kernel_noise(2, 4, 6, 7), 0.8).any()
    # the straight-through gradient is NOT the derivative of the forward value, so gradcheck
    # applies only to hard=False; the hard form is checked against the reference above.
    fn_soft = lambda q, k, v: gumbel_assign_merge(q, k, v, scale=0.4, gumbel=True, tau=0.8,
                                                  eps=1.0, seed=7, hard=False)
    assert torch.autograd.gradcheck(fn_soft, (q, k, v), eps=1e-6, atol=1e-7)
    out = fn(q, k, v)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_native)])
def test_gumbel_max_statistics(backend_env, backend):
    """With noise, token n goes to group s with probability softmax(A[:, n])[s] (Gumbel-max)."""
    backend_env(backend)
    S, N, C = 6, 6000, 4
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.3])
    # q = diag-like embedding so that every token sees the same logits column A[:, n] = logits
    q = torch.zeros(1, S, C)
    q[0, :, 0] = logits
    k = torch.zeros(1, N, C)
    k[0, :, 0] = 1.0
    v = torch.randn(1, N, C)
    _, hard_map, _ = gumbel_assign_merge(q, k, v, scale=1.0, gumbel=True, tau=1.0, seed=11,
                                         return_attn=True)
    freq = hard_map[0].sum(1) / N                   # [S]
    p = torch.softmax(logits, 0)
    sigma = (p * (1 - p) / N).sqrt()
    assert ((freq - p).abs() < 5 * sigma).all(), (freq, p)
    # and tau does not change the hard choice for the same noise
    _, hard_tau, _ = gumbel_assign_merge(q, k, v, scale=1.0, gumbel=True, tau=0.25, seed=11,
                                         return_attn=True)
    _, hard_tau2, _ = gumbel_assign_merge(q, k, v, scale=1.0, gumbel=True, tau=3.0, seed=11,
                                          return_attn=True)
    assert torch.equal(hard_map, hard_tau) and torch.equal(hard_map, hard_tau2)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_native)])
def test_seed_reproduces_and_differs(backend_env, backend):
    backend_env(backend)
    q, k, v, _ = make_inputs(2, 8, 64, 16, torch.float32)
    call = lambda seed: gumbel_assign_merge(q, k, v, scale=0.25, gumbel=True, seed=seed,
                                            return_attn=True)[1]
    assert torch.equal(call(5), call(5))
    assert not torch.equal(call(5), call(6))
    # seed=None draws from the global CPU generator: manual_seed reproduces, and the recorded
    # seed replays the call exactly
    torch.manual_seed(3)
    a = call(None)
    used = dispatch.last_call()["seed"]
    torch.manual_seed(3)
    b = call(None)
    assert torch.equal(a, b) and dispatch.last_call()["seed"] == used
    assert torch.equal(call(used), a)
    c = call(None)  # the generator moved on: a fresh seed
    assert dispatch.last_call()["seed"] != used
    assert c.shape == a.shape


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_native)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_finite(backend_env, backend, dtype):
    backend_env(backend)
    B, S, N, C = 2, 8, 33, 4
    q = torch.zeros(B, S, C)
    q[..., 0] = torch.tensor([1e4, -1e4, 0, 1e4, -1e4, 5e3, -5e3, 1.0])
    k = torch.ones(B, N, C)
    k[:, ::2, 0] = -1.0
    v = torch.randn(B, N, C)
    q, k, v = (t.to(dtype).requires_grad_(True) for t in (q, k, v))
    for gumbel in (False, True):
        out, hard_map, soft_map = gumbel_assign_merge(q, k, v, scale=1.0, gumbel=gumbel,
                                                      seed=1, return_attn=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        for t in (out, hard_map, soft_map) + grads:
            assert torch.isfinite(t.float()).all()
        assert torch.equal(hard_map.float().sum(1), torch.ones(B, N))


@needs_native
def test_noise_matches_clamped_gumbel_distribution():
    g = NATIVE.gumbel_noise(4, 64, 256, 99)
    assert torch.isfinite(g).all()
    lo = -torch.log(-torch.log(torch.tensor(2.0 ** -24)))
    hi = -torch.log(-torch.log(torch.tensor(1 - 2.0 ** -24)))
    assert g.min() >= lo - 1e-4 and g.max() <= hi + 1e-3
    # Gumbel(0,1): mean = Euler-Mascheroni 0.5772, variance pi^2/6
    assert abs(g.mean().item() - 0.5772) < 0.02
    assert abs(g.var().item() - 1.6449) < 0.05
    assert not torch.equal(g, NATIVE.gumbel_noise(4, 64, 256, 100))


# --------------------------------------------------------------------------- dispatch
def test_forced_backend_errors(backend_env):
    q, k, v, _ = make_inputs(1, 2, 3, 4, torch.float32)
    backend_env("nonsense")
    with pytest.raises(ValueError, match="GROUPVIT_FAST_BACKEND"):
        gumbel_assign_merge(q, k, v, scale=1.0, gumbel=False)
    backend_env("cuda")  # CPU tensors can never run the CUDA backend
    with pytest.raises(RuntimeError, match="not available"):
        gumbel_assign_merge(q, k, v, scale=1.0, gumbel=False)
    backend_env("reference")
    gumbel_assign_merge(q, k, v, scale=1.0, gumbel=False)
    assert dispatch.last_backend() == "reference"


def test_bad_input_is_one_clear_error(backend_env):
    backend_env(None)
    q, k, v, _ = make_inputs(1, 2, 3, 4, torch.float32)
    with pytest.raises(ValueError, match="shape mismatch"):
        gumbel_assign_merge(q, k[:, :, :3], v, scale=1.0, gumbel=False)
    with pytest.raises(ValueError, match="tau must be > 0"):
        gumbel_assign_merge(q, k, v, scale=1.0, gumbel=True, tau=0.0)
    with pytest.raises(ValueError, match="no groups"):
        gumbel_assign_merge(q[:, :0], k, v, scale=1.0, gumbel=False)


@needs_native
@pytest.mark.parametrize("shape", [(0, 4, 5, 6), (2, 4, 0, 6), (2, 3, 5, 0)])
def test_cpu_empty_sizes(backend_env, shape):
    backend_env("cpu")
    q, k, v, dout = make_inputs(*shape, torch.float32)
    got = run_backend("cpu", q, k, v, dout, scale=0.5, gumbel=True, tau=1.0, eps=1.0,
                      hard=True, seed=1)
    assert got[0].shape == q.shape and not got[0].any()
    assert [g.shape for g in got[3]] == [q.shape, k.shape, v.shape]


@needs_native
def test_default_cpu_backend_follows_measurements(backend_env):
    backend_env(None)
    q, k, v, _ = make_inputs(2, 64, 196, 384, torch.float32)
    assert dispatch.get_backend(q, num_tokens=196) == "cpu"
    gumbel_assign_merge(q, k, v, scale=384 ** -0.5, gumbel=True)
    assert dispatch.last_backend() == "cpu"
    gumbel_assign_merge(q.requires_grad_(), k, v, scale=384 ** -0.5, gumbel=True)
    assert dispatch.last_backend() == "cpu"          # stage 1 with grad: the extension wins
    q2, k2, v2, _ = make_inputs(2, 8, 64, 384, torch.float32)
    gumbel_assign_merge(q2, k2, v2, scale=384 ** -0.5, gumbel=True)
    assert dispatch.last_backend() == "cpu"          # forward only: the extension wins
    gumbel_assign_merge(q2.requires_grad_(), k2, v2, scale=384 ** -0.5, gumbel=True)
    assert dispatch.last_backend() == "reference"    # stage 2 with grad: measured tie


# --------------------------------------------------------------------------- saved bytes


@needs_native
def test_saved_bytes_10x_below_eager(backend_env):
    B, S, N, C = 32, 64, 196, 384
    q, k, v, _ = make_inputs(B, S, N, C, torch.float32)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    backend_env("reference")
    eager = saved_bytes(lambda: gumbel_assign_merge(q, k, v, scale=C ** -0.5, gumbel=True,
                                                    seed=1), (q, k, v))
    backend_env("cpu")
    fused = saved_bytes(lambda: gumbel_assign_merge(q, k, v, scale=C ** -0.5, gumbel=True,
                                                    seed=1), (q, k, v))
    assert eager > 4 * 2 ** 20        # the eager chain keeps several [B,S,N] tensors
    assert fused * 10 <= eager, (fused, eager)
    assert fused <= B * N * 4 + B * S * 4 + 64   # idx int32 + counts fp32 + the seed


# --------------------------------------------------------------------------- torch.compile
@needs_native
def test_torch_compile_no_graph_break(backend_env):
    backend_env("cpu")
    q, k, v, dout = make_inputs(2, 8, 33, 16, torch.float32)

    def f(q, k, v):
        out = gumbel_assign_merge(q, k, v, scale=0.25, gumbel=True, seed=3)
        return (out * 2).sum(-1)

    import torch._dynamo as dynamo
    dynamo.reset()
    explain = dynamo.explain(f)(q, k, v)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    qs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    qe = [t.clone().requires_grad_(True) for t in (q, k, v)]
    yc, ye = compiled(*qs), f(*qe)
    torch.testing.assert_close(yc, ye)
    gc = torch.autograd.grad(yc.sum(), qs)
    ge = torch.autograd.grad(ye.sum(), qe)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)
    # seed=None draws the seed inside the graph: still no break
    dynamo.reset()
    g = lambda q, k, v: gumbel_assign_merge(q, k, v, scale=0.25, gumbel=True)
    assert dynamo.explain(g)(q, k, v).graph_break_count == 0


@needs_native
def test_torch_compile_model_assignment_no_graph_break(backend_env):
    """The model's assignment layer (training: noise + grad; eval) traces in one graph."""
    backend_env(None)
    import torch._dynamo as dynamo
    from groupvit_fast.models.group_vit import AssignAttention
    layer = AssignAttention(32, qkv_bias=True, gumbel=True)
    query, x = torch.randn(2, 8, 32), torch.randn(2, 20, 32)
    for train in (True, False):
        layer.train(train)
        dynamo.reset()
        explain = dynamo.explain(layer)(query, x, return_attn=True)
        assert explain.graph_break_count == 0, (train, explain.break_reasons)
