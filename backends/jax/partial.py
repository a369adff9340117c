"""Per-block pieces of attention in JAX, for rows whose keys are split over devices: the row
statistics of SPEC.md 2 and 4 are sums, maxima and log-sum-exps over keys, so each block
computes its part (the same operations as backends/torch/partial.py, on the block functions
of entmax.py):
- `block_scores`: scores with -inf where a key is not allowed, and span weights;
- `row_bounds`: (largest score, sum of weights, lone-key bound, log-sum-exp of s + log m);
- `row_sums`: sum p and sum p/u for a normaliser c (a Newton step needs both);
- `weighted_values`: sum p v, sum w v, sum w (the output, and gbar's numerator/denominator);
- `backward_block`: a block's share of dq, dk, dv, deps, dspan for known c and gbar.
Layout: q [B, H, Lq, D] against k, v [B, Hkv, W, *]; query head h reads kv head h // G.
"""

from __future__ import annotations

import jax.numpy as jnp

from . import entmax as _entmax
from . import span as _span


def compute_dtype(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _grouped(x, Hkv):
    B, H = x.shape[:2]
    return x.reshape((B, Hkv, H // Hkv) + x.shape[2:])


def block_scores(q, k, v, q_pos0, k_pos0, span, ramp, causal, key_lengths, q_offset, scale):
    """(s [B, H, Lq, W], m or None, qc, kc, vc): keys at global positions k_pos0 ... against
    rows q_pos0 ...; span [H] or None; key_lengths [B] or None; q_offset [B]."""
    dtype = compute_dtype(q.dtype)
    B, H, Lq, _ = q.shape
    Hkv, W = k.shape[1], k.shape[2]
    keys = k_pos0 + jnp.arange(W)
    rows = q_pos0 + jnp.arange(Lq)
    d = _span.distances(rows, keys, q_offset.astype(keys.dtype))[:, None]  # [B, 1, Lq, W]
    allowed = jnp.ones((B, 1, Lq, W), bool)
    kc, vc = k.astype(dtype), v.astype(dtype)
    if key_lengths is not None:
        valid = keys[None, :] < key_lengths[:, None]
        allowed = allowed & valid[:, None, None, :]
        kc = jnp.where(valid[:, None, :, None], kc, 0.0)  # padding may hold NaN (SPEC.md 5.3)
        vc = jnp.where(valid[:, None, :, None], vc, 0.0)
    if causal:
        allowed = allowed & (d >= 0)
    m = None
    if span is not None:
        z = span.astype(dtype)[None, :, None, None]
        m = jnp.clip(((ramp + z) - jnp.abs(d).astype(dtype)) / ramp, 0.0, 1.0)
        allowed = allowed & (m > 0)
        m = jnp.where(allowed, m, 0.0)
    qc = jnp.where(jnp.any(allowed, -1, keepdims=True), q.astype(dtype), 0.0)
    s = scale * jnp.einsum("bkgqd,bkwd->bkgqw", _grouped(qc, Hkv), kc).reshape(B, H, Lq, W)
    s = jnp.where(allowed, s, -jnp.inf)
    return s, m, qc, kc, vc


def _log_m(s, m):
    allowed = jnp.isfinite(s)
    if m is None:
        return jnp.where(allowed, 0.0, -jnp.inf).astype(s.dtype)
    return jnp.where(allowed, jnp.log(jnp.where(allowed, m, 1.0)), -jnp.inf)


def row_bounds(s, m, eps):
    """(top, mass, lone, lse) per row [B, H, Lq, 1]; combine with max, +, max, logaddexp."""
    allowed = jnp.isfinite(s)
    log_m = _log_m(s, m)
    top = jnp.max(s, -1, keepdims=True)
    mass = (allowed.astype(s.dtype) if m is None else jnp.where(allowed, m, 0.0)).sum(-1, keepdims=True)
    safe = _entmax.safe_eps(eps)
    lone = jnp.max(jnp.where(allowed, s - jnp.expm1(-safe * log_m) / safe, -jnp.inf), -1, keepdims=True)
    top_safe = jnp.where(jnp.isfinite(top), top, 0.0)
    lse = top_safe + jnp.log(jnp.exp(s + log_m - top_safe).sum(-1, keepdims=True))
    return top, mass, lone, lse


def _probabilities(s, m, eps, c):
    allowed = jnp.isfinite(s)
    t = jnp.where(allowed, s - c, 0.0)
    lr = jnp.where(allowed, _entmax.log_ratio(t, eps), -jnp.inf)
    e = jnp.exp(lr)
    p = e if m is None else m * e
    w = _entmax.weights(p, t, eps)
    return p, e, t, w


def row_sums(s, m, eps, c):
    p, _, _, w = _probabilities(s, m, eps, c)
    return p.sum(-1, keepdims=True), w.sum(-1, keepdims=True)


def weighted_values(s, m, eps, c, vc):
    p, _, _, w = _probabilities(s, m, eps, c)
    B, H, Lq, W = p.shape
    Hkv = vc.shape[1]
    pv = jnp.einsum("bkgqw,bkwd->bkgqd", _grouped(p, Hkv), vc).reshape(B, H, Lq, -1)
    wv = jnp.einsum("bkgqw,bkwd->bkgqd", _grouped(w, Hkv), vc).reshape(B, H, Lq, -1)
    return pv, wv, w.sum(-1, keepdims=True)


def gbar(dout, wv, wsum):
    num = (dout * wv).sum(-1, keepdims=True)
    return jnp.where(wsum > 0, num / jnp.where(wsum > 0, wsum, 1.0), 0.0)


def backward_block(s, m, qc, kc, vc, eps, c, gbar_rows, dout, scale, ramp):
    """(dq, dk [B, Hkv, W, D], dv, deps [H], dspan [H] or None) of one block."""
    p, e, t, w = _probabilities(s, m, eps, c)
    B, H, Lq, W = p.shape
    Hkv = kc.shape[1]
    g = jnp.einsum("bkgqd,bkwd->bkgqw", _grouped(dout, Hkv), vc).reshape(B, H, Lq, W)
    ds, dm, deps = _entmax.vjp_terms(p, e, t, w, eps, g, gbar_rows, True)
    dq = scale * jnp.einsum("bkgqw,bkwd->bkgqd", _grouped(ds, Hkv), kc).reshape(B, H, Lq, -1)
    dk = scale * jnp.einsum("bkgqw,bkgqd->bkwd", _grouped(ds, Hkv), _grouped(qc, Hkv))
    dv = jnp.einsum("bkgqw,bkgqd->bkwd", _grouped(p, Hkv), _grouped(dout, Hkv))
    dspan = None if m is None else (dm * _span.mask_slope(m, ramp)).sum((0, 2, 3))
    return dq, dk, dv, deps.sum((0, 2, 3)), dspan
