"""Text encoder: the CLIP-style causal transformer of the official ``TextTransformer``
(keys ``text_encoder.*`` of the released checkpoints, ref §3)."""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import attention
from .layers import QuickGELU, Result, checkpointed


class CausalSelfAttention(nn.Module):
    """Parameter layout of ``nn.MultiheadAttention`` (``in_proj_weight`` rows q|k|v,
    ``out_proj``), so checkpoints load unchanged; computed with the fused attention backends and
    ``is_causal`` instead of an additive 77×77 mask."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):
        B, L, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B,L,3C]
        # [B,L,3,H,D] -> [3,B,H,L,D]
        q, k, v = qkv.reshape(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attention(q, k, v, causal=True)  # [B,H,L,D]
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.attn = CausalSelfAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = nn.LayerNorm(d_model)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, use_checkpoint: bool = False):
        super().__init__()
        self.width = width
        self.layers = layers
        self.use_checkpoint = use_checkpoint
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads)
                                         for _ in range(layers)])

    def forward(self, x):
        for blk in self.resblocks:
            x = checkpointed(blk, x) if self.use_checkpoint and self.training else blk(x)
        return x


class TextTransformer(nn.Module):
    """Causal text transformer with EOT pooling (the feature at argmax(token id), since the
    end-of-text id 49407 is the largest). No projection matrix: ``text_projector`` follows."""

    def __init__(self, context_length: int = 77, width: int = 256, layers: int = 12,
                 vocab_size: int = 49408, use_checkpoint: bool = False,
                 truncate_to_eot: bool = True):
        super().__init__()
        heads = width // 64
        if heads < 1:
            raise ValueError(f"TextTransformer: width must be >= 64 (heads = width // 64), got {width}")
        self.context_length = context_length
        self.width = width
        self.vocab_size = vocab_size
        # Exact speed-up: with a causal mask a token never sees later positions, so everything
        # after the last EOT of the batch cannot change the pooled features.
        self.truncate_to_eot = truncate_to_eot
        self.transformer = Transformer(width=width, layers=layers, heads=heads,
                                       use_checkpoint=use_checkpoint)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = nn.LayerNorm(width)
        self.token_embedding = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.initialize_parameters()

    def initialize_parameters(self):
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (self.transformer.width ** -0.5) * ((2 * self.transformer.layers) ** -0.5)
        attn_std = self.transformer.width ** -0.5
        fc_std = (2 * self.transformer.width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, text, *, as_dict=False):
        if text.ndim != 2:
            raise ValueError(f"TextTransformer: expected token ids [B, L], got shape {tuple(text.shape)}")
        if text.shape[1] > self.context_length:
            raise ValueError(f"TextTransformer: {text.shape[1]} tokens > context_length "
                             f"{self.context_length}")
        eot = text.argmax(dim=-1)  # [B]
        if self.truncate_to_eot and text.shape[0] > 0 and not torch.compiler.is_compiling():
            text = text[:, : int(eot.max()) + 1]  # [B,L'] with L' = last EOT + 1
        L = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:L]  # [B,L,C]
        x = self.transformer(x)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # [B,C]
        outs = Result(as_dict=as_dict)
        outs.append(x, name="x")
        return outs.as_return()
