"""Plain-PyTorch reference of the grouping assignment: the executable spec every backend is
tested against (official semantics, ref §2.1-§2.2).

Shapes: q [B,S,C] (group queries), k and v [B,N,C] (image tokens). The softmax runs over the
*group* axis S, so every image token is distributed over the groups.
"""
from __future__ import annotations

from typing import Optional

import torch


def gumbel_noise_like(logits: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
    """Gumbel(0, 1) noise shaped like ``logits``.

    Drawn as -log(-log(u)) with u clamped into [tiny, 1 - eps]: u == 0 would give -inf and
    u == 1 would give +inf (pytorch #22442, #41663). Sampled in fp32 and cast, so fp16/bf16
    logits never see a log of a denormal.
    """
    gen = None
    if seed is not None:
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(int(seed))
    u = torch.rand(logits.shape, generator=gen, device=logits.device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    u = u.clamp_(min=tiny, max=1.0 - torch.finfo(torch.float32).eps)
    return (-torch.log(-torch.log(u))).to(logits.dtype)


def assign_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    # [B,S,C] @ [B,C,N] -> [B,S,N]
    return torch.matmul(q, k.transpose(-2, -1)) * scale


def gumbel_assign_merge_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    gumbel: bool,
    tau: float = 1.0,
    eps: float = 1.0,
    seed: Optional[int] = None,
    hard: bool = True,
    return_attn: bool = False,
    noise: Optional[torch.Tensor] = None,
):
    """Reference assignment + merge.

    A      = q kᵀ · scale                                   [B,S,N]
    y_soft = softmax((A + g) / tau, dim=S)   (g ~ Gumbel(0,1) only when ``gumbel``)
    Ã      = onehot(argmax_S y_soft) - sg(y_soft) + y_soft   (straight-through; ``hard``)
    Â      = Ã / (Σ_N Ã + eps)
    out    = Â v                                             [B,S,C]

    ``noise`` (same shape as A) may be supplied for deterministic tests; otherwise it is drawn
    from ``seed`` (or the global RNG when ``seed`` is None).
    Returns ``out`` or ``(out, hard_map, soft_map)`` with ``soft_map = softmax(A, dim=S)``.
    """
    if tau <= 0:
        raise ValueError(f"gumbel_assign_merge: tau must be > 0, got {tau}")
    attn = assign_logits(q, k, scale)  # [B,S,N]
    if gumbel:
        g = noise if noise is not None else gumbel_noise_like(attn, seed)
        y_soft = torch.softmax((attn + g) / tau, dim=-2)
    else:
        y_soft = torch.softmax(attn, dim=-2)
    if hard:
        index = y_soft.argmax(dim=-2, keepdim=True)  # [B,1,N]
        y_hard = torch.zeros_like(y_soft).scatter_(-2, index, 1.0)
        assign = y_hard - y_soft.detach() + y_soft  # straight-through: value one-hot, grad soft
    else:
        assign = y_soft
    hard_map = assign.detach().clone() if return_attn else None
    normed = assign / (assign.sum(dim=-1, keepdim=True) + eps)  # per group row over tokens
    out = torch.matmul(normed, v)  # [B,S,N] @ [B,N,C] -> [B,S,C]
    if not return_attn:
        return out
    soft_map = torch.softmax(attn.detach(), dim=-2)
    return out, hard_map, soft_map
