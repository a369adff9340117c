"""Adaptive-span alpha-entmax attention in NumPy float64: the definition of SPEC.md section 5.

Shapes: q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]; head h reads kv head
h // (H / Hkv). The reference materialises the [B, H, Lq, Lk] scores: it is the definition,
not a kernel, and it is vectorised over batch, heads and rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .. import validation
from . import entmax as _entmax
from . import span as _span


class AttentionGrads(NamedTuple):
    """Gradients of attention: dalpha has alpha's shape, dspan span's shape (None without span)."""

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dalpha: np.ndarray
    dspan: np.ndarray | None


@dataclass
class _Forward:
    """Everything the forward computed that the backward reuses."""

    q: np.ndarray  # [B, H, Lq, D], zero on rows with no allowed key
    k: np.ndarray  # [B, H, Lk, D] (kv heads repeated), zero on keys beyond key_lengths
    v: np.ndarray  # [B, H, Lk, Dv], likewise
    m: np.ndarray  # [B, H, Lq, Lk] span weights, 0 where not allowed
    sol: _entmax.RowSolution  # rows = B * H * Lq
    reads_non_finite: np.ndarray  # [B, H, Lq]: rows whose allowed keys (or q) hold NaN/Inf
    scale: float
    ramp: float
    shape: tuple  # (B, H, Lq, Lk)


def _float64(x):
    return np.asarray(x, dtype=np.float64)


def _key_valid(B, Lk, key_lengths, key_padding_mask):
    """[B, Lk]: keys that exist for every row (below key_lengths and not masked by
    key_padding_mask); the others are excluded alike (SPEC.md 5.1, 5.3)."""
    lengths = np.full(B, Lk) if key_lengths is None else np.asarray(key_lengths, np.int64)
    valid = np.arange(Lk)[None, :] < lengths[:, None]
    if key_padding_mask is not None:
        valid = valid & np.asarray(key_padding_mask, dtype=bool)
    return valid


def _forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, check_finite,
             key_padding_mask=None):
    info = validation.validate_attention(
        q, k, v, alpha=alpha, span=span, ramp=ramp, causal=causal,
        key_lengths=key_lengths, q_offset=q_offset, scale=scale, key_padding_mask=key_padding_mask,
    )
    if info.array_type != "numpy":
        raise TypeError(f"the NumPy reference takes numpy arrays; got {info.array_type} arrays")
    B, H, Hkv, Lq, Lk, D = (info.sizes[n] for n in ("B", "H", "Hkv", "Lq", "Lk", "D"))
    scale = 1.0 / np.sqrt(D) if scale is None else float(scale)
    ramp = float(ramp)

    # Allowed keys: j < key_lengths_b, key_padding_mask_bj, causal d >= 0, span weight m > 0
    # (SPEC.md section 5.1).
    key_valid = _key_valid(B, Lk, key_lengths, key_padding_mask)  # [B, Lk]
    offsets = np.broadcast_to(np.asarray(Lk - Lq if q_offset is None else q_offset, np.int64), (B,))
    d = _span.distances(Lq, Lk, offsets)[:, None]  # [B, 1, Lq, Lk]
    allowed = np.broadcast_to(key_valid[:, None, None, :], (B, 1, Lq, Lk))
    if causal:
        allowed = allowed & (d >= 0)
    if span is None:
        m = np.ones((B, H, Lq, Lk))
    else:
        z = np.broadcast_to(_float64(span), (H,))
        m = _span.soft_mask(d, z[None, :], ramp)  # [B, H, Lq, Lk]
        allowed = allowed & (m > 0)
    allowed = np.broadcast_to(allowed, (B, H, Lq, Lk))
    m = np.where(allowed, m, 0.0)
    row_empty = ~allowed.any(-1)  # [B, H, Lq]

    # Keys beyond key_lengths or masked by key_padding_mask may hold garbage (NaN/Inf); rows with no allowed key may too.
    # Neither may reach any output or gradient, so both are replaced by zeros here. Other
    # non-finite values make NaN of exactly the rows that read them (SPEC.md section 5.3).
    kv_head = np.arange(H) // (H // Hkv)
    k64 = np.where(key_valid[:, None, :, None], _float64(k), 0.0)[:, kv_head]
    v64 = np.where(key_valid[:, None, :, None], _float64(v), 0.0)[:, kv_head]
    q64 = np.where(row_empty[..., None], 0.0, _float64(q))
    bad = {name: ~np.isfinite(x).all(-1) for name, x in (("q", q64), ("k", k64), ("v", v64))}
    reads = {"q": bad["q"], "k": (allowed & bad["k"][:, :, None, :]).any(-1),
             "v": (allowed & bad["v"][:, :, None, :]).any(-1)}
    if check_finite:
        for name, rows in reads.items():
            if rows.any():
                raise ValueError(f"{name} holds non-finite values where a row reads them (check_finite=True; "
                                 "keys beyond key_lengths or masked by key_padding_mask, and rows with no allowed key, "
                                 "are never read)")
    q64, k64, v64 = (np.where(bad[n][..., None], 0.0, x) for n, x in (("q", q64), ("k", k64), ("v", v64)))

    scores = scale * np.einsum("bhid,bhjd->bhij", q64, k64)
    scores = np.where(allowed, scores, -np.inf)
    eps = np.broadcast_to(_float64(alpha) - 1.0, (H,))
    eps_rows = np.broadcast_to(eps[None, :, None], (B, H, Lq)).reshape(-1)
    sol = _entmax.solve_rows(scores.reshape(B * H * Lq, Lk), m.reshape(B * H * Lq, Lk), eps_rows)
    return _Forward(q=q64, k=k64, v=v64, m=m, sol=sol, reads_non_finite=reads["q"] | reads["k"] | reads["v"],
                    scale=scale, ramp=ramp, shape=(B, H, Lq, Lk))


def attention(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None,
              q_offset=None, scale=None, check_finite=False, key_padding_mask=None):
    """out [B, H, Lq, Dv] = P V with P the weighted alpha-entmax of the scores (SPEC.md).

    Computes in float64 and returns q's dtype. check_finite=True raises a ValueError when q, k
    or v hold NaN/Inf where some row reads them, instead of returning NaN there.
    """
    fwd = _forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, check_finite,
                   key_padding_mask)
    p = fwd.sol.p.reshape(fwd.shape)
    out = np.einsum("bhij,bhjd->bhid", p, fwd.v)
    out[fwd.reads_non_finite] = np.nan
    return out.astype(np.asarray(q).dtype, copy=False)


def support_gap(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None,
                q_offset=None, scale=None, key_padding_mask=None):
    """[B, H, Lq]: per row, the distance in score units from the nearest allowed key to the
    entmax support boundary (inf for alpha = 1 rows). Gradients are defined only where it is > 0;
    finite differences and low-precision comparisons need it larger than their score error."""
    fwd = _forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, False, key_padding_mask)
    return fwd.sol.gap.reshape(fwd.shape[:3])


def _reduce_heads(x, shape):
    """A per-head gradient [H] (already summed over batch and rows) in alpha's/span's shape."""
    return x.sum() if shape == () else x


def _dtype_of(x):
    arr = np.asarray(x)
    return arr.dtype if arr.dtype.kind == "f" else np.dtype(np.float64)


def attention_vjp(q, k, v, grad_out, *, alpha=1.0, span=None, ramp=32.0, causal=False,
                  key_lengths=None, q_offset=None, scale=None, check_finite=False, key_padding_mask=None):
    """AttentionGrads(dq, dk, dv, dalpha, dspan) for the upstream gradient grad_out [B, H, Lq, Dv].

    With g_ij = grad_out_i . v_j the gradient reaching p, on the support (SPEC.md section 4):
    dS = w (g - gbar), dm = (p/m)(g - gbar), dalpha = sum (g - gbar) p psi; dz = sum dm / R
    where 0 < m < 1. Each gradient has its input's dtype; dalpha and dspan their input's shape.
    """
    fwd = _forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, check_finite,
                   key_padding_mask)
    B, H, Lq, Lk = fwd.shape
    Hkv = np.shape(k)[1]
    group = H // Hkv
    dout = _float64(grad_out)
    p = fwd.sol.p.reshape(fwd.shape)

    g = np.einsum("bhid,bhjd->bhij", dout, fwd.v)
    ds, dm, deps = _entmax.vjp_rows(fwd.sol, g.reshape(B * H * Lq, Lk))
    ds = ds.reshape(fwd.shape)
    dm = dm.reshape(fwd.shape)

    dq = fwd.scale * np.einsum("bhij,bhjd->bhid", ds, fwd.k)
    dk_heads = fwd.scale * np.einsum("bhij,bhid->bhjd", ds, fwd.q)
    dv_heads = np.einsum("bhij,bhid->bhjd", p, dout)
    # Head h reads kv head h // group, so kv head g collects heads g*group ... (g+1)*group - 1.
    dk = dk_heads.reshape(B, Hkv, group, Lk, dk_heads.shape[-1]).sum(2)
    dv = dv_heads.reshape(B, Hkv, group, Lk, dv_heads.shape[-1]).sum(2)
    if key_lengths is not None or key_padding_mask is not None:  # excluded keys never matter: exactly 0
        key_valid = _key_valid(B, Lk, key_lengths, key_padding_mask)
        dk = np.where(key_valid[:, None, :, None], dk, 0.0)
        dv = np.where(key_valid[:, None, :, None], dv, 0.0)

    alpha_shape = np.shape(alpha)
    dalpha = deps.reshape(B, H, Lq).sum(axis=(0, 2))
    dalpha = np.asarray(_reduce_heads(dalpha, alpha_shape)).astype(_dtype_of(alpha), copy=False)

    dspan = None
    if span is not None:
        dz = (dm * _span.mask_slope(fwd.m, fwd.ramp)).sum(axis=(0, 2, 3))
        dspan = np.asarray(_reduce_heads(dz, np.shape(span))).astype(_dtype_of(span), copy=False)

    return AttentionGrads(
        dq=dq.astype(np.asarray(q).dtype, copy=False),
        dk=dk.astype(np.asarray(k).dtype, copy=False),
        dv=dv.astype(np.asarray(v).dtype, copy=False),
        dalpha=dalpha,
        dspan=dspan,
    )
