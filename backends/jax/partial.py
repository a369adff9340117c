"""Per-block pieces of attention in JAX, for rows whose keys are split over devices: the row
statistics of SPEC.md 2 and 4 are sums, maxima and log-sum-exps over keys, so each block
computes its part. The same functions, arguments and results as backends/torch/partial.py, on
the block functions of entmax.py: the backend's 'partial' op (SPEC.md section 10, defined by
attnspec.reference.partial), declared as that op's kernel and checked by the conformance suite;
attnspec.distributed.jax calls the functions of that same kernel.
- `block_scores` -> Block(s, m, q, k, v): scores with -inf where a key is not allowed, span
  weights, and the cleaned inputs;
- `row_bounds`: (largest score, sum of weights, lone-key bound, log-sum-exp of s + log m);
- `row_sums`: sum p and sum p/u for a normaliser c (a Newton step needs both);
- `weighted_values`: sum p v, sum w v, sum w (the output, and gbar's numerator/denominator);
- `softmax_block`, `merge_softmax`: alpha = 1's online merge;
- `gbar`, `backward_block`: a block's share of dq, dk, dv, deps, dspan for known c and gbar.
Layout: q [B, H, Lq, D] against k, v [B, Hkv, W, *]; query head h reads kv head h // G.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from . import entmax as _entmax
from . import span as _span


def compute_dtype(dtype):
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _grouped(x, Hkv):
    B, H = x.shape[:2]
    return x.reshape((B, Hkv, H // Hkv) + x.shape[2:])


class Block(NamedTuple):
    """s [B, H, Lq, W] (-inf where not allowed), m (span weights or None), and the cleaned
    inputs: q zeroed on rows with no allowed key here, k and v zeroed on keys that do not exist."""

    s: object
    m: object
    q: object
    k: object
    v: object

    @property
    def Hkv(self):
        return self.k.shape[1]


def block_scores(q, k, v, q_start, k_start, span, ramp, causal, key_lengths, q_offset, scale,
                 key_padding_mask=None):
    """Keys at global positions k_start ... against rows q_start ...; span [H] or None;
    key_lengths [B] or None; q_offset [B]; key_padding_mask [B, W] (bool, the block's keys) or
    None: a Block."""
    dtype = compute_dtype(q.dtype)
    B, H, Lq, _ = q.shape
    Hkv, W = k.shape[1], k.shape[2]
    keys = k_start + jnp.arange(W)
    rows = q_start + jnp.arange(Lq)
    d = _span.distances(rows, keys, jnp.asarray(q_offset).astype(keys.dtype))[:, None]  # [B, 1, Lq, W]
    allowed = jnp.ones((B, 1, Lq, W), bool)
    kc, vc = k.astype(dtype), v.astype(dtype)
    valid = None
    if key_lengths is not None:
        valid = keys[None, :] < jnp.asarray(key_lengths)[:, None]
    if key_padding_mask is not None:
        readable = jnp.asarray(key_padding_mask).astype(bool)
        valid = readable if valid is None else valid & readable
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
        kc = jnp.where(valid[:, None, :, None], kc, 0.0)  # padding may hold NaN (SPEC.md 5.3)
        vc = jnp.where(valid[:, None, :, None], vc, 0.0)
    if causal:
        allowed = allowed & (d >= 0)
    m = None
    if span is not None:
        z = jnp.asarray(span).astype(dtype)[None, :, None, None]
        m = jnp.clip(((ramp + z) - jnp.abs(d).astype(dtype)) / ramp, 0.0, 1.0)
        allowed = allowed & (m > 0)
        m = jnp.where(allowed, m, 0.0)
    qc = jnp.where(jnp.any(allowed, -1, keepdims=True), q.astype(dtype), 0.0)
    s = scale * jnp.einsum("bkgqd,bkwd->bkgqw", _grouped(qc, Hkv), kc).reshape(B, H, Lq, W)
    s = jnp.where(allowed, s, -jnp.inf)
    return Block(s, m, qc, kc, vc)


def _log_m(s, m):
    allowed = jnp.isfinite(s)
    if m is None:
        return jnp.where(allowed, 0.0, -jnp.inf).astype(s.dtype)
    return jnp.where(allowed, jnp.log(jnp.where(allowed, m, 1.0)), -jnp.inf)


def _logsumexp(x):
    top = jnp.max(x, -1, keepdims=True)
    top_safe = jnp.where(jnp.isfinite(top), top, 0.0)
    return top_safe + jnp.log(jnp.exp(x - top_safe).sum(-1, keepdims=True))


def row_bounds(block, eps):
    """(top, mass, lone, lse) per row [B, H, Lq, 1]; combine with max, +, max, logaddexp."""
    s, m = block.s, block.m
    allowed = jnp.isfinite(s)
    log_m = _log_m(s, m)
    top = jnp.max(s, -1, keepdims=True)
    mass = (allowed.astype(s.dtype) if m is None else jnp.where(allowed, m, 0.0)).sum(-1, keepdims=True)
    safe = _entmax.safe_eps(eps)
    alone = jnp.where(eps > 0, -jnp.expm1(-safe * log_m) / safe, log_m)  # s + log m at alpha = 1
    lone = jnp.max(jnp.where(allowed, s + alone, -jnp.inf), -1, keepdims=True)
    return top, mass, lone, _logsumexp(s + log_m)


def _probabilities(block, eps, c):
    s, m = block.s, block.m
    allowed = jnp.isfinite(s)
    t = jnp.where(allowed, s - c, 0.0)
    lr = jnp.where(allowed, _entmax.log_ratio(t, eps), -jnp.inf)
    e = jnp.exp(lr)
    p = e if m is None else m * e
    w = _entmax.weights(p, t, eps)
    return p, e, t, w


def row_sums(block, eps, c):
    """(sum p, sum p/u) per row [B, H, Lq, 1] over the block's keys for the normaliser c."""
    p, _, _, w = _probabilities(block, eps, c)
    return p.sum(-1, keepdims=True), w.sum(-1, keepdims=True)


def weighted_values(block, eps, c):
    """(sum_j p_j v_j, sum_j w_j v_j [B, H, Lq, Dv], sum_j w_j [B, H, Lq, 1]) over the block."""
    p, _, _, w = _probabilities(block, eps, c)
    B, H, Lq, W = p.shape
    vc = block.v
    Hkv = vc.shape[1]
    pv = jnp.einsum("bkgqw,bkwd->bkgqd", _grouped(p, Hkv), vc).reshape(B, H, Lq, -1)
    wv = jnp.einsum("bkgqw,bkwd->bkgqd", _grouped(w, Hkv), vc).reshape(B, H, Lq, -1)
    return pv, wv, w.sum(-1, keepdims=True)


def softmax_block(block):
    """alpha = 1: (lse [B, H, Lq, 1], P V with P normalised within the block); rows without a
    key here get lse = -inf and zeros."""
    logits = block.s + _log_m(block.s, block.m)
    lse = _logsumexp(logits)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(lse), lse, 0.0))
    B, H, Lq, W = p.shape
    Hkv = block.v.shape[1]
    out = jnp.einsum("bkgqw,bkwd->bkgqd", _grouped(p, Hkv), block.v).reshape(B, H, Lq, -1)
    return lse, out


def merge_softmax(lse, out, lse_b, out_b):
    """The online merge of two alpha = 1 partial results (rows with no key anywhere stay
    lse = -inf, out = 0)."""
    new = jnp.logaddexp(lse, lse_b)
    safe = jnp.where(jnp.isfinite(new), new, 0.0)
    a = jnp.where(jnp.isfinite(lse), jnp.exp(lse - safe), 0.0)
    b = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0)
    return new, out * a + out_b * b


def gbar(dout, wv, wsum):
    num = (dout * wv).sum(-1, keepdims=True)
    return jnp.where(wsum > 0, num / jnp.where(wsum > 0, wsum, 1.0), 0.0)


def backward_block(block, eps, c, gbar_rows, dout, scale, ramp, need_eps=True):
    """(dq, dk [B, Hkv, W, D], dv, deps [H], dspan [H] or None) of one block."""
    p, e, t, w = _probabilities(block, eps, c)
    B, H, Lq, W = p.shape
    qc, kc, vc, m = block.q, block.k, block.v, block.m
    Hkv = kc.shape[1]
    dout = dout.astype(p.dtype)
    g = jnp.einsum("bkgqd,bkwd->bkgqw", _grouped(dout, Hkv), vc).reshape(B, H, Lq, W)
    ds, dm, deps = _entmax.vjp_terms(p, e, t, w, eps, g, gbar_rows, need_eps)
    dq = scale * jnp.einsum("bkgqw,bkwd->bkgqd", _grouped(ds, Hkv), kc).reshape(B, H, Lq, -1)
    dk = scale * jnp.einsum("bkgqw,bkgqd->bkwd", _grouped(ds, Hkv), _grouped(qc, Hkv))
    dv = jnp.einsum("bkgqw,bkgqd->bkwd", _grouped(p, Hkv), _grouped(dout, Hkv))
    dspan = None if m is None else (dm * _span.mask_slope(m, ramp)).sum((0, 2, 3))
    deps = jnp.zeros((H,), p.dtype) if deps is None else deps.sum((0, 2, 3))
    return dq, dk, dv, deps, dspan
