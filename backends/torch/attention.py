"""Eager adaptive-span alpha-entmax attention in torch: the reference's algorithm on the full
[B, H, Lq, Lk] score matrix (SPEC.md section 5), forward and analytic backward.

Inputs here are already normalised by attnspec._torch.normalise: alpha and span are [H]
tensors of the compute dtype, q_offset an int64 [B] tensor, key_lengths an int64 [B] tensor or
None. Grouped-query heads are handled by viewing q as [B, Hkv, G, Lq, D] against k
[B, Hkv, 1, Lk, D]: K and V are never repeated.
"""

from __future__ import annotations

import torch

from . import entmax as _entmax
from . import span as _span


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x, Hkv):
    """[B, H, L, D] -> [B, Hkv, G, L, D] (head h = g * G + i reads kv head g)."""
    B, H, L, D = x.shape
    return x.reshape(B, Hkv, H // Hkv, L, D)


def _masks(q, k, span, ramp, causal, key_lengths, q_offset, dtype):
    """allowed [B, H|1, Lq, Lk], m [B, H|1, Lq, Lk], key_valid [B, Lk]."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    device = q.device
    lengths = key_lengths if key_lengths is not None else torch.full((B,), Lk, device=device)
    key_valid = torch.arange(Lk, device=device)[None, :] < lengths.to(device)[:, None]
    d = _span.distances(Lq, Lk, q_offset.to(device))[:, None]  # [B, 1, Lq, Lk]
    allowed = key_valid[:, None, None, :].expand(B, 1, Lq, Lk)
    if causal:
        allowed = allowed & (d >= 0)
    if span is None:
        m = torch.ones((B, 1, Lq, Lk), dtype=dtype, device=device)
    else:
        m = _span.soft_mask(d, span, ramp, dtype)
        allowed = allowed & (m > 0)
    m = torch.where(allowed, m, torch.zeros_like(m))
    return allowed, m, key_valid


def _clean(q, k, v, allowed, key_valid, dtype):
    """Padding keys and rows with no allowed key may hold NaN: zero them (SPEC.md 5.3)."""
    kv_mask = key_valid[:, None, :, None]
    k = torch.where(kv_mask, k.to(dtype), torch.zeros((), dtype=dtype, device=k.device))
    v = torch.where(kv_mask, v.to(dtype), torch.zeros((), dtype=dtype, device=v.device))
    empty = ~allowed.any(-1, keepdim=True)  # [B, H|1, Lq, 1]
    q = torch.where(empty, torch.zeros((), dtype=dtype, device=q.device), q.to(dtype))
    return q, k, v


def forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale):
    """(out in q's dtype, p, t, m) with p, t, m [B, H, Lq, Lk] in the compute dtype."""
    dtype = compute_dtype(q.dtype)
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    allowed, m, key_valid = _masks(q, k, span, ramp, causal, key_lengths, q_offset, dtype)
    qc, kc, vc = _clean(q, k, v, allowed, key_valid, dtype)
    scores = scale * torch.matmul(_grouped(qc, Hkv), kc[:, :, None].transpose(-1, -2)).reshape(B, H, Lq, Lk)
    allowed = allowed.expand(B, H, Lq, Lk)
    m = m.expand(B, H, Lq, Lk)
    eps = (alpha.to(dtype) - 1)[None, :, None, None]
    p, t = _entmax.solve_rows(torch.where(allowed, scores, torch.full_like(scores, -torch.inf)), m, eps, allowed)
    out = torch.matmul(_grouped(p, Hkv), vc[:, :, None]).reshape(B, H, Lq, -1)
    return out.to(q.dtype), p, t, m


def backward(grad_out, p, t, m, q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale):
    """(dq, dk, dv, dalpha [H], dspan [H]) in the inputs' dtypes; dspan is zeros without span."""
    dtype = p.dtype
    B, H, Lq, Lk = p.shape
    Hkv = k.shape[1]
    allowed = p > 0
    _, _, key_valid = _masks(q, k, None, ramp, False, key_lengths, q_offset, dtype)
    row_reads = (m > 0).any(-1, keepdim=True)
    kc = torch.where(key_valid[:, None, :, None], k.to(dtype), torch.zeros((), dtype=dtype, device=k.device))
    vc = torch.where(key_valid[:, None, :, None], v.to(dtype), torch.zeros((), dtype=dtype, device=v.device))
    qc = torch.where(row_reads, q.to(dtype), torch.zeros((), dtype=dtype, device=q.device))
    dout = grad_out.to(dtype)
    g = torch.matmul(_grouped(dout, Hkv), vc[:, :, None].transpose(-1, -2)).reshape(B, H, Lq, Lk)
    eps = (alpha.to(dtype) - 1)[None, :, None, None]
    ds, dm, deps = _entmax.vjp_rows(p, t, eps, g)
    del allowed
    dq = scale * torch.matmul(_grouped(ds, Hkv), kc[:, :, None]).reshape(B, H, Lq, -1)
    dk = scale * torch.matmul(_grouped(ds, Hkv).transpose(-1, -2), _grouped(qc, Hkv)).sum(2)
    dv = torch.matmul(_grouped(p, Hkv).transpose(-1, -2), _grouped(dout, Hkv)).sum(2)
    dk = torch.where(key_valid[:, None, :, None], dk, torch.zeros_like(dk))
    dv = torch.where(key_valid[:, None, :, None], dv, torch.zeros_like(dv))
    dalpha = deps.sum((0, 2, 3))
    if span is None:
        dspan = torch.zeros_like(alpha)
    else:
        dspan = (dm * _span.mask_slope(m, ramp)).sum((0, 2, 3))
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dalpha.to(alpha.dtype),
            dspan.to(alpha.dtype if span is None else span.dtype))
