"""Triton grouping kernels: under TRITON_INTERPRET=1 on CPU (small shapes: the interpreter is
slow) against the float64 reference, forward and backward; and an ahead-of-time compile of
every kernel for sm_80 and sm_90 with the ptxas register/spill report.

Register/spill budget (checked below): at the release shapes (S=64,N=196,C=384 and
S=8,N=64,C=384), fp32 and bf16, every kernel compiles with ZERO spill bytes on sm_80 and sm_90
and at most 255 registers per thread. For the largest group count (S=128) the fp32 backward
token kernel may spill at most 256 bytes (IEEE fp32 dots hold whole tiles in registers).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from groupvit_fast.ops import dispatch, gumbel_assign_merge
from test_grouping import (assert_close, make_inputs, near_tie_tokens, reference_f64,
                           run_backend)

triton = pytest.importorskip("triton")
interp = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and
                            not torch.cuda.is_available(),
                            reason="needs TRITON_INTERPRET=1 (set by conftest without a GPU)")

SHAPES = [
    (1, 64, 40, 48),     # stage-1 group count, few tokens
    (2, 8, 64, 40),      # stage-2 group count and token count
    (2, 7, 33, 17),      # odd sizes everywhere
    (1, 1, 5, 8),        # one group
    (2, 5, 1, 3),        # one token
    (1, 20, 70, 65),     # crosses the N and C tile boundaries
]


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@interp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gumbel", [False, True])
def test_triton_matches_reference(monkeypatch, shape, gumbel):
    from groupvit_fast.kernels import grouping_triton as gt
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    B, S, N, C = shape
    q, k, v, dout = make_inputs(B, S, N, C, torch.float32)
    q, k, v = (t.to(_device()) for t in (q, k, v))
    scale, tau, eps, seed = C ** -0.5, 0.7, 1.0, 4321
    noise = gt.gumbel_noise(B, S, N, seed, device=_device()).cpu() if gumbel else None
    want = reference_f64(q.cpu(), k.cpu(), v.cpu(), dout, scale=scale, gumbel=gumbel, tau=tau,
                         eps=eps, hard=True, noise=noise)
    got = run_backend("triton", q, k, v, dout.to(_device()), scale=scale, gumbel=gumbel,
                      tau=tau, eps=eps, hard=True, seed=seed)
    got = [got[0].cpu(), got[1].cpu(), got[2].cpu(), [g.cpu() for g in got[3]]]
    ok = ~near_tie_tokens(q.cpu(), k.cpu(), scale, noise, tau)
    assert torch.equal(got[1].argmax(1)[ok], want[1].argmax(1)[ok])
    if not ok.all():
        pytest.skip("near-tie tokens present")
    tol = dict(atol=2e-5, rtol=2e-4)
    assert_close("out", got[0], want[0], **tol)
    assert_close("soft", got[2], want[2], **tol)
    for name, g, w in zip(("dq", "dk", "dv"), got[3], want[3]):
        assert_close(name, g, w, atol=2e-4, rtol=2e-3)


@interp
def test_triton_noise_stream_matches_cpu_kernel():
    """Triton's tl.rand and the C++ Philox draw the same Gumbel stream for a seed."""
    from groupvit_fast.kernels import grouping_triton as gt
    from groupvit_fast.ops import _custom
    if _custom.native() is None:
        pytest.skip("C++ extension not built")
    a = gt.gumbel_noise(2, 8, 40, 77).cpu()
    b = _custom.native().gumbel_noise(2, 8, 40, 77)
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-6)


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision_and_extremes(monkeypatch, dtype):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    B, S, N, C = 2, 8, 33, 16
    q, k, v, dout = make_inputs(B, S, N, C, dtype)
    want = reference_f64(q, k, v, dout, scale=0.25, gumbel=False, tau=1.0, eps=1.0, hard=True,
                         noise=None)
    got = run_backend("triton", q, k, v, dout, scale=0.25, gumbel=False, tau=1.0, eps=1.0,
                      hard=True, seed=None)
    assert got[0].dtype == dtype
    ok = ~near_tie_tokens(q, k, 0.25, None, 1.0)
    assert torch.equal(got[1].argmax(1)[ok], want[1].argmax(1)[ok])
    assert_close("out", got[0], want[0], atol=2e-2, rtol=2e-2)
    for name, g, w in zip(("dq", "dk", "dv"), got[3], want[3]):
        assert_close(name, g, w, atol=3e-2, rtol=5e-2)
    # extreme logits: finite everywhere, noise on
    qx = torch.zeros(B, S, C, dtype=dtype)
    qx[..., 0] = torch.tensor([1e4, -1e4, 0, 1e4, -1e4, 5e3, -5e3, 1.0], dtype=dtype)
    kx = torch.ones(B, N, C, dtype=dtype)
    qx.requires_grad_(True)
    out, hm, sm = gumbel_assign_merge(qx, kx, v, scale=1.0, gumbel=True, seed=2,
                                      return_attn=True)
    (dq,) = torch.autograd.grad(out, (qx,), torch.ones_like(out))
    for t in (out, hm, sm, dq):
        assert torch.isfinite(t.float()).all()


@interp
def test_triton_gumbel_statistics_seed_and_tau(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    S, N, C = 6, 3000, 16
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.3])
    q = torch.zeros(1, S, C)
    q[0, :, 0] = logits
    k = torch.zeros(1, N, C)
    k[0, :, 0] = 1.0
    v = torch.randn(1, N, C)
    call = lambda seed, tau=1.0: gumbel_assign_merge(q, k, v, scale=1.0, gumbel=True, tau=tau,
                                                     seed=seed, return_attn=True)[1]
    h = call(11)
    p = torch.softmax(logits, 0)
    freq = h[0].sum(1) / N
    assert ((freq - p).abs() < 5 * (p * (1 - p) / N).sqrt()).all(), (freq, p)
    assert torch.equal(h, call(11)) and torch.equal(h, call(11, tau=0.3))
    assert not torch.equal(h, call(12))


def _aot_rows(shapes):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "groupvit_fast.kernels.aot", "--json",
                          "--shape", *shapes], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_triton_aot_sm80_sm90_register_budget():
    rows = _aot_rows(["64,196,384", "8,64,384"])
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"assign_fwd", "merge_fwd", "bwd_dv", "bwd_groupsum", "bwd_tokens"}
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["dtype"] for r in rows} == {"fp32", "bf16"}
    report = "\n".join(f"{r['arch']} S={r['S']} {r['kernel']} {r['dtype']}: {r['registers']} regs, "
                       f"spill {r['spill_stores']}/{r['spill_loads']} B" for r in rows)
    print(report)
    for r in rows:
        assert r["registers"] <= 255, report
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, report


@interp
def test_triton_forced_soft_assignment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    q, k, v, _ = make_inputs(1, 4, 8, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="hard=True only"):
        gumbel_assign_merge(q, k, v, scale=0.25, gumbel=False, hard=False)
