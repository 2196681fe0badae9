"""Triton kernels of the fused grouping op (``groupvit_fast.ops.gumbel_assign_merge``, hard=True).

Forward (two launches, no [B,S,N] tensor written unless ``return_attn``):

1. ``_assign_fwd``  grid (N-blocks, B): logits tile A = q·kᵀ [S, BLOCK_N] with ``tl.dot`` over C
   in fp32, Gumbel noise of element offset o = (b*S + s)*N + n from word o % 4 of
   ``tl.randint4x(seed, o // 4)`` (Philox, never stored; the CPU/CUDA kernels draw the same
   stream), argmax over the group axis -> ``idx`` [B,N] int32.
   With ``return_attn`` also the soft map softmax(A) and the one-hot hard map.
2. ``_merge_fwd``   grid (C-blocks, B): out[s] = Σ_{n: idx_n = s} v[n] / (count_s + eps) as a
   one-hot × v ``tl.dot`` over N-blocks (exact: the one-hot is 0/1 in any dtype); the counts fall
   out of the same loop, so there are no atomics and the result is deterministic.

Saved for backward (by the custom op, see ``ops/_custom.py``): q, k, v, idx int32 [B,N],
cnt fp32 [B,S], the seed. Backward (three launches + one cuBLAS product):

1. ``_bwd_dv``      grid (N-blocks, B): dv[n] = dout[idx_n] / (count + eps) (a gather) and the
   per-token scalar t_n = dout[idx_n]·v[n] / (count + eps).
2. ``_bwd_groupsum`` grid (B,): D_s = Σ_{n in s} t_n, the normalisation's denominator term.
3. ``_bwd_tokens``  grid (N-blocks, B): recompute A (q·kᵀ) and dÂ = dout·vᵀ tiles, regenerate
   the noise, softmax over groups, dy = (dÂ - D_s)/(count_s + eps), dA = y(dy - Σ y dy)·scale/τ;
   writes dA [B,S,N] (fp32 workspace, freed after backward) and dk = dAᵀ·q.
4. dq = dA·k with ``torch.bmm``.

Numerics: logits, noise, softmax and accumulation in fp32 whatever the input dtype; fp32 inputs
use IEEE fp32 dots (TF32 only when torch's own fp32 matmuls may use it,
``torch.backends.cuda.matmul``), so hard assignments match the reference; bf16/fp16 inputs feed
the tensor cores directly with fp32 accumulation. Under ``TRITON_INTERPRET=1`` everything is upcast
to fp32 first (the interpreter's bf16 ``tl.dot`` is wrong, triton issue 11584).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Uniforms are clamped into [2^-24, 1 - 2^-24] before -log(-log(u)) (pytorch #22442, #41663).
U_LO = tl.constexpr(5.9604644775390625e-08)
U_HI = tl.constexpr(0.99999994039535522461)


@triton.jit
def _gumbel(seed, offs):
    # One Philox4x32-10 call per four consecutive offsets (counter offs // 4, word offs % 4):
    # the stream of the C++/CUDA kernels (gvf::philox_word in csrc/grouping_common.h).
    r0, r1, r2, r3 = tl.randint4x(seed, offs >> 2)
    lane = offs & 3
    w = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    u = tl.uint_to_uniform_float(w)
    u = tl.minimum(tl.maximum(u, U_LO), U_HI)
    # -log(u) >= 2^-24 mathematically; the clamp keeps an approximate log from returning <= 0
    e = tl.maximum(-tl.log(u), U_LO)
    return -tl.log(e)


@triton.jit
def _dot(a, b, FP32_IEEE: tl.constexpr):
    if FP32_IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _logits_tile(q_ptr, k_ptr, b, offs_s, offs_n, S, N, C, BLOCK_S: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr,
                 FP32_IEEE: tl.constexpr):
    acc = tl.zeros((BLOCK_S, BLOCK_N), dtype=tl.float32)
    q_base = q_ptr + b.to(tl.int64) * S * C
    k_base = k_ptr + b.to(tl.int64) * N * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        qt = tl.load(q_base + offs_s[:, None] * C + offs_c[None, :],
                     mask=(offs_s[:, None] < S) & mc[None, :], other=0.0)
        kt = tl.load(k_base + offs_n[:, None] * C + offs_c[None, :],
                     mask=(offs_n[:, None] < N) & mc[None, :], other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            kt = kt.to(tl.float32)
        acc += _dot(qt, tl.trans(kt), FP32_IEEE)
    return acc


@triton.jit
def _assign_fwd(q_ptr, k_ptr, idx_ptr, soft_ptr, hard_ptr, seed, S, N, C, scale,
                GUMBEL: tl.constexpr, RETURN_ATTN: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr,
                FP32_IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = offs_s < S
    mn = offs_n < N
    a = _logits_tile(q_ptr, k_ptr, b, offs_s, offs_n, S, N, C, BLOCK_S, BLOCK_N, BLOCK_C,
                     UPCAST, FP32_IEEE) * scale
    z = a
    if GUMBEL:
        offs = (b.to(tl.int64) * S + offs_s[:, None]) * N + offs_n[None, :]
        z = a + _gumbel(seed, offs)
    z = tl.where(ms[:, None], z, float("-inf"))
    # tau > 0 never changes the argmax, so it is not applied here
    idx = tl.argmax(z, axis=0)  # ties: first index, like torch.argmax
    tl.store(idx_ptr + b.to(tl.int64) * N + offs_n, idx.to(tl.int32), mask=mn)
    if RETURN_ATTN:
        am = tl.where(ms[:, None], a, float("-inf"))
        am = am - tl.max(am, axis=0)[None, :]
        e = tl.exp(am)
        soft = e / tl.sum(e, axis=0)[None, :]
        hard = (offs_s[:, None] == idx[None, :]).to(tl.float32)
        ptrs = b.to(tl.int64) * S * N + offs_s[:, None] * N + offs_n[None, :]
        m2 = ms[:, None] & mn[None, :]
        tl.store(soft_ptr + ptrs, soft.to(soft_ptr.dtype.element_ty), mask=m2)
        tl.store(hard_ptr + ptrs, hard.to(hard_ptr.dtype.element_ty), mask=m2)


@triton.jit
def _merge_fwd(v_ptr, idx_ptr, out_ptr, cnt_ptr, S, N, C, eps, BLOCK_S: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr,
               FP32_IEEE: tl.constexpr):
    pid_c = tl.program_id(0)
    b = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    acc = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_S,), dtype=tl.float32)
    v_base = v_ptr + b.to(tl.int64) * N * C
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        idx = tl.load(idx_ptr + b.to(tl.int64) * N + offs_n, mask=mn, other=-1)
        onehot = offs_s[:, None] == idx[None, :]
        vt = tl.load(v_base + offs_n[:, None] * C + offs_c[None, :],
                     mask=mn[:, None] & mc[None, :], other=0.0)
        if UPCAST:
            vt = vt.to(tl.float32)
        acc += _dot(onehot.to(vt.dtype), vt, FP32_IEEE)
        cnt += tl.sum(onehot.to(tl.float32), axis=1)
    out = acc / (cnt[:, None] + eps)
    ms = offs_s < S
    tl.store(out_ptr + b.to(tl.int64) * S * C + offs_s[:, None] * C + offs_c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=ms[:, None] & mc[None, :])
    if pid_c == 0:
        tl.store(cnt_ptr + b.to(tl.int64) * S + offs_s, cnt, mask=ms)


@triton.jit
def _bwd_dv(dout_ptr, v_ptr, idx_ptr, cnt_ptr, dv_ptr, t_ptr, S, N, C, eps,
            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    idx = tl.load(idx_ptr + b.to(tl.int64) * N + offs_n, mask=mn, other=0)
    inv = 1.0 / (tl.load(cnt_ptr + b.to(tl.int64) * S + idx, mask=mn, other=0.0) + eps)
    t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        m2 = mn[:, None] & (offs_c[None, :] < C)
        g = tl.load(dout_ptr + b.to(tl.int64) * S * C + idx[:, None] * C + offs_c[None, :],
                    mask=m2, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + b.to(tl.int64) * N * C + offs_n[:, None] * C + offs_c[None, :],
                     mask=m2, other=0.0).to(tl.float32)
        tl.store(dv_ptr + b.to(tl.int64) * N * C + offs_n[:, None] * C + offs_c[None, :],
                 (g * inv[:, None]).to(dv_ptr.dtype.element_ty), mask=m2)
        t += tl.sum(g * vt, axis=1)
    tl.store(t_ptr + b.to(tl.int64) * N + offs_n, t * inv, mask=mn)


@triton.jit
def _bwd_groupsum(idx_ptr, t_ptr, d_ptr, S, N, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    d = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        idx = tl.load(idx_ptr + b.to(tl.int64) * N + offs_n, mask=mn, other=-1)
        t = tl.load(t_ptr + b.to(tl.int64) * N + offs_n, mask=mn, other=0.0)
        d += tl.sum(tl.where(offs_s[:, None] == idx[None, :], t[None, :], 0.0), axis=1)
    tl.store(d_ptr + b.to(tl.int64) * S + offs_s, d, mask=offs_s < S)


@triton.jit
def _bwd_tokens(q_ptr, k_ptr, v_ptr, dout_ptr, cnt_ptr, d_ptr, da_ptr, dk_ptr, seed, S, N, C,
                scale, inv_tau, eps, GUMBEL: tl.constexpr, BLOCK_S: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr,
                FP32_IEEE: tl.constexpr):
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = offs_s < S
    mn = offs_n < N
    a = _logits_tile(q_ptr, k_ptr, b, offs_s, offs_n, S, N, C, BLOCK_S, BLOCK_N, BLOCK_C,
                     UPCAST, FP32_IEEE)
    g = _logits_tile(dout_ptr, v_ptr, b, offs_s, offs_n, S, N, C, BLOCK_S, BLOCK_N, BLOCK_C,
                     UPCAST, FP32_IEEE)  # dÂ = dout·vᵀ
    z = a * scale
    if GUMBEL:
        offs = (b.to(tl.int64) * S + offs_s[:, None]) * N + offs_n[None, :]
        z = z + _gumbel(seed, offs)
    z = tl.where(ms[:, None], z * inv_tau, float("-inf"))
    z = z - tl.max(z, axis=0)[None, :]
    e = tl.exp(z)
    y = e / tl.sum(e, axis=0)[None, :]
    cnt = tl.load(cnt_ptr + b.to(tl.int64) * S + offs_s, mask=ms, other=0.0)
    d = tl.load(d_ptr + b.to(tl.int64) * S + offs_s, mask=ms, other=0.0)
    inv_den = 1.0 / (cnt + eps)
    dy = (g - d[:, None]) * inv_den[:, None]
    ydy = tl.sum(y * dy, axis=0)
    da = y * (dy - ydy[None, :]) * (scale * inv_tau)
    da = tl.where(ms[:, None] & mn[None, :], da, 0.0)
    tl.store(da_ptr + b.to(tl.int64) * S * N + offs_s[:, None] * N + offs_n[None, :], da,
             mask=ms[:, None] & mn[None, :])
    q_base = q_ptr + b.to(tl.int64) * S * C
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mc = offs_c < C
        qt = tl.load(q_base + offs_s[:, None] * C + offs_c[None, :],
                     mask=ms[:, None] & mc[None, :], other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            dat = da
        else:
            dat = da.to(qt.dtype)
        dk = _dot(tl.trans(dat), qt, FP32_IEEE)  # [BLOCK_N, BLOCK_C]
        tl.store(dk_ptr + b.to(tl.int64) * N * C + offs_n[:, None] * C + offs_c[None, :],
                 dk.to(dk_ptr.dtype.element_ty), mask=mn[:, None] & mc[None, :])


def launch_params(S: int, N: int, C: int) -> dict:
    """Tile sizes and warps per kernel. Chosen so that no kernel spills registers on sm_80 or
    sm_90 at the release shapes (the budget is checked by the AOT test): fp32 inputs use IEEE
    FMA dots, which keep whole tiles in registers, so the [BLOCK_S, BLOCK_N] tiles stay at
    <= 2K elements per 4 warps."""
    bs = max(16, triton.next_power_of_2(S))
    if bs > 256:
        raise NotImplementedError(f"triton grouping kernels support S <= 256 groups, got S={S}")
    bn = max(16, min(64, 2048 // bs, triton.next_power_of_2(N)))
    bc = max(16, min(32, triton.next_power_of_2(C)))
    warps = 8 if bs * bn >= 2048 else 4
    return dict(
        assign_fwd=dict(BLOCK_S=bs, BLOCK_N=bn, BLOCK_C=bc, num_warps=warps),
        merge_fwd=dict(BLOCK_S=bs, BLOCK_N=max(16, min(32, bn)), BLOCK_C=bc,
                       num_warps=8 if bs >= 128 else 4),
        bwd_dv=dict(BLOCK_N=32, BLOCK_C=bc, num_warps=4),
        bwd_groupsum=dict(BLOCK_S=bs, BLOCK_N=max(16, min(64, 4096 // bs)), num_warps=4),
        bwd_tokens=dict(BLOCK_S=bs, BLOCK_N=max(16, bn // 2), BLOCK_C=bc,
                        num_warps=16 if bs >= 128 else (8 if bs * bn >= 2048 else 4)),
    )


def _torch_allows_tf32() -> bool:
    m = torch.backends.cuda.matmul
    prec = getattr(m, "fp32_precision", None)
    if prec in ("tf32", "ieee"):
        return prec == "tf32"
    return bool(getattr(m, "allow_tf32", False))


def _flags(q: torch.Tensor):
    upcast = INTERPRET or q.dtype == torch.float32
    # fp32 operands: IEEE dots unless torch itself lets fp32 matmuls use TF32, so the kernels
    # round exactly like the reference's torch.matmul would on the same machine.
    fp32_ieee = upcast and (INTERPRET or not _torch_allows_tf32())
    return upcast, fp32_ieee


def forward(q, k, v, *, scale, gumbel, tau, eps, seed, return_attn):
    """Returns (out, idx int32 [B,N], cnt fp32 [B,S], hard_map, soft_map)."""
    del tau  # argmax is temperature-invariant; tau enters only the backward softmax
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton grouping kernels take fp32/fp16/bf16, got {q.dtype}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, S, C = q.shape
    N = k.shape[1]
    lp = launch_params(S, N, C)
    upcast, ieee = _flags(q)
    idx = torch.empty((B, N), device=q.device, dtype=torch.int32)
    cnt = torch.empty((B, S), device=q.device, dtype=torch.float32)
    out = torch.empty((B, S, C), device=q.device, dtype=q.dtype)
    if return_attn:
        soft = torch.empty((B, S, N), device=q.device, dtype=q.dtype)
        hard = torch.empty((B, S, N), device=q.device, dtype=q.dtype)
    else:
        soft = torch.empty((0,), device=q.device, dtype=q.dtype)
        hard = torch.empty((0,), device=q.device, dtype=q.dtype)
    if B == 0 or N == 0:
        out.zero_()
        cnt.zero_()
        return out, idx, cnt, hard, soft
    p = lp["assign_fwd"]
    _assign_fwd[(triton.cdiv(N, p["BLOCK_N"]), B)](
        q, k, idx, soft, hard, int(seed), S, N, C, float(scale), GUMBEL=bool(gumbel),
        RETURN_ATTN=bool(return_attn), UPCAST=upcast, FP32_IEEE=ieee, **p)
    p = lp["merge_fwd"]
    _merge_fwd[(triton.cdiv(C, p["BLOCK_C"]), B)](
        v, idx, out, cnt, S, N, C, float(eps), UPCAST=upcast, FP32_IEEE=ieee, **p)
    return out, idx, cnt, hard, soft


def backward(dout, q, k, v, idx, cnt, *, scale, gumbel, tau, eps, seed):
    """Returns (dq, dk, dv) in the input dtype."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(q.dtype).contiguous()
    B, S, C = q.shape
    N = k.shape[1]
    lp = launch_params(S, N, C)
    upcast, ieee = _flags(q)
    inv_tau = 1.0 / tau if gumbel else 1.0  # eval hard_softmax has no temperature
    dv = torch.empty_like(v)
    dk = torch.empty_like(k)
    t = torch.empty((B, N), device=q.device, dtype=torch.float32)
    d = torch.empty((B, S), device=q.device, dtype=torch.float32)
    da = torch.empty((B, S, N), device=q.device, dtype=torch.float32)
    if B == 0 or N == 0:
        return torch.zeros_like(q), dk.zero_(), dv.zero_()
    p = lp["bwd_dv"]
    _bwd_dv[(triton.cdiv(N, p["BLOCK_N"]), B)](dout, v, idx, cnt, dv, t, S, N, C, float(eps),
                                               **p)
    _bwd_groupsum[(B,)](idx, t, d, S, N, **lp["bwd_groupsum"])
    p = lp["bwd_tokens"]
    _bwd_tokens[(triton.cdiv(N, p["BLOCK_N"]), B)](
        q, k, v, dout, cnt, d, da, dk, int(seed), S, N, C, float(scale), float(inv_tau),
        float(eps), GUMBEL=bool(gumbel), UPCAST=upcast, FP32_IEEE=ieee, **p)
    dq = torch.bmm(da, k.float()).to(q.dtype)  # [B,S,N] @ [B,N,C]
    return dq, dk, dv


@triton.jit
def _noise_kernel(out_ptr, seed, total, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _gumbel(seed, offs), mask=offs < total)


def gumbel_noise(B: int, S: int, N: int, seed: int, device="cpu") -> torch.Tensor:
    """The [B,S,N] Gumbel noise the kernels draw for ``seed`` (for tests; never used in the op)."""
    out = torch.empty((B, S, N), device=device, dtype=torch.float32)
    total = out.numel()
    if total:
        _noise_kernel[(triton.cdiv(total, 1024),)](out, int(seed), total, BLOCK=1024)
    return out
