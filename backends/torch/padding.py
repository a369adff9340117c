"""Keys a call excludes (beyond key_lengths, or masked by key_padding_mask) may hold NaN/Inf
(SPEC.md 5.3); a kernel that multiplies them by a probability 0 (a matmul, SDPA) must see
zeros there instead. `zero_excluded_keys` gives that copy, differentiably: the excluded keys'
gradients are exactly 0."""

from __future__ import annotations

import torch


def zero_excluded_keys(x, key_valid):
    """x [B, Hkv, Lk, D] with the keys where key_valid [B, Lk] is False set to 0 (x itself when
    every key is valid on CPU; a new tensor otherwise: x is never written).

    On CPU torch.where over the whole cache runs elementwise at several times the cost of a
    copy, and padding is usually a small share of the keys: a copy with only the excluded keys
    overwritten (their positions read on the host, which CPU tensors hold anyway). Under
    torch.compile, on meta and on CUDA (no host read there, and where runs at copy speed),
    torch.where against a zero of x's dtype."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.where(key_valid[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    batch, key = (~key_valid).nonzero(as_tuple=True)
    if batch.numel() == 0:
        return x
    out = x.clone()
    out[batch, :, key] = 0.0  # the copy's gradient is 0 there: dk = dv = 0 exactly
    return out
