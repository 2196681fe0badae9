"""CLIP byte-level BPE tokenizer, fully offline.

The BPE itself comes from ``instant-clip-tokenizer`` (Rust, ships OpenAI's 49,408-entry vocabulary
and 48,894 merges, so nothing is downloaded).  That library only lower-cases, so the text cleaning
of the official ``datasets/tokenizer.py`` is done here first: ftfy fix, HTML-unescape twice,
whitespace collapse, strip.  Layout of one row: [SOT=49406] + BPE + [EOT=49407], right-padded with
0 to ``context_length``; an over-long sequence is cut to ``context_length`` with EOT in the last
position (the official ``Tokenize`` wrapper does the same).
"""
from __future__ import annotations

import html
import re
from functools import lru_cache
from typing import Iterable, List, Sequence, Union

import numpy as np
import torch

SOT_TOKEN = 49406
EOT_TOKEN = 49407
VOCAB_SIZE = 49408

_WS = re.compile(r"\s+")


@lru_cache(maxsize=1)
def _tokenizer():
    try:
        from instant_clip_tokenizer import Tokenizer
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ImportError("groupvit_fast.tokenize needs the 'instant-clip-tokenizer' package "
                          "(pip install instant-clip-tokenizer)") from e
    return Tokenizer()


_ASCII_SAFE = re.compile(r"[^\x09\x0a\x0d\x20-\x25\x27-\x7e]")


def _ftfy_fix(text: str) -> str:
    # ftfy only changes non-ASCII text, HTML entities and control characters; plain printable ASCII
    # (the bulk of captions) comes back unchanged, so skip the ~50 us call for it
    if _ASCII_SAFE.search(text) is None:
        return text
    try:
        import ftfy
    except ImportError:  # ftfy only repairs mojibake; plain text passes through unchanged
        return text
    return ftfy.fix_text(text)


def clean_text(text: str) -> str:
    """Official CLIP cleaning: ftfy, double HTML-unescape, whitespace collapse, lower-case."""
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects str captions, got {type(text).__name__}: {text!r}")
    text = _ftfy_fix(text)
    text = html.unescape(html.unescape(text))
    text = _WS.sub(" ", text).strip()
    return text.lower()


def encode(text: str) -> List[int]:
    """BPE ids of one cleaned caption, without SOT/EOT."""
    return list(_tokenizer().encode(clean_text(text)))


def decode(ids: Iterable[int]) -> str:
    """Inverse of :func:`encode`; SOT/EOT/padding are dropped."""
    ids = [int(i) for i in ids if int(i) not in (0, SOT_TOKEN, EOT_TOKEN)]
    return _tokenizer().decode(ids)


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77) -> torch.Tensor:
    """Tokenise ``texts`` (a str or a list of str) into int64 ``[n, context_length]``."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
    if not texts:
        return torch.zeros(0, context_length, dtype=torch.long)
    cleaned = [clean_text(t) for t in texts]
    arr = _tokenizer().tokenize_batch(cleaned, context_length)  # uint16 [n, context_length]
    return torch.from_numpy(np.asarray(arr, dtype=np.int64))


__all__ = ["tokenize", "clean_text", "encode", "decode", "SOT_TOKEN", "EOT_TOKEN", "VOCAB_SIZE"]
