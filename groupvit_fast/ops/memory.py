"""Memory accounting shared by the grouping op's tests and benchmark."""
from __future__ import annotations

import torch


def saved_bytes(fn, inputs) -> int:
    """Bytes autograd keeps for backward while running ``fn()``, excluding the storages of
    ``inputs`` themselves (a storage saved several times is counted once)."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())
