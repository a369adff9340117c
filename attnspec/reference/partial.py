"""Per-block operations of attention in NumPy float64: the definition of SPEC.md section 10.

A row's keys may be split in blocks (a sequence sharded over devices). Every row statistic of
sections 2 and 4 is then a sum, a maximum or a log-sum-exp over the keys, so each block
computes its part and the parts combine. These functions define what each part is; backends
that declare the op 'partial' implement the same functions with the same arguments (torch
tensors or jax arrays in place of NumPy arrays, computed in the compute dtype of section 6),
and the conformance suite compares them with these.

Conventions: q [B, H, Lq, D] holds the rows q_start ... (global positions before q_offset),
k, v [B, Hkv, W, *] the keys k_start ...; query head h reads kv head h // (H / Hkv).
eps = alpha - 1 is [1, H, 1, 1]; per-row quantities (c, gbar, ...) are [B, H, Lq, 1].

- `block_scores` -> Block: s [B, H, Lq, W] (-inf where a key is not allowed: beyond
  key_lengths, masked by key_padding_mask (the block's [B, W] slice), causal, or span weight
  m = 0), m (span weights, 0 where not allowed; None without span), and the cleaned inputs: q
  zeroed on rows with no allowed key in the block, k and v zeroed on keys that do not exist
  (they may hold NaN, section 5.3).
- `row_bounds(block, eps)` -> (top, mass, lone, lse): max s, sum m, max_j s_j - expm1(-eps
  log m_j)/eps (the c at which key j alone has p_j = 1: the lower end of the bracket of 2.4;
  s_j + log m_j at eps = 0), log sum exp(s + log m). Combine with max, +, max, logaddexp;
  -inf / 0 on rows with no allowed key.
- `row_sums(block, eps, c)` -> (sum p, sum p/u) for the normaliser c (p and u of 2.2): h(c) =
  log sum p and h'(c) = -sum(p/u) / sum p, the Newton step of 2.4. Combine with +.
- `weighted_values(block, eps, c)` -> (sum p v, sum w v, sum w) with w = p/u: the output, and
  gbar's numerator and denominator (4.1). Combine with +.
- `softmax_block(block)` -> (lse, P V with P normalised within the block) for alpha = 1;
  `merge_softmax` combines two such results (rows with no key anywhere: lse = -inf, zeros).
- `gbar(dout, wv, wsum)` -> sum_j w_j (dout . v_j) / sum_j w_j (0 where sum w = 0).
- `backward_block(block, eps, c, gbar, dout, scale, ramp, need_eps)` -> (dq, dk, dv, deps,
  dspan): the block's share of the gradients of section 4 for the row's global c and gbar; dq,
  deps [H], dspan [H] (None without span) sum over the block's keys, dk, dv over its queries.
  deps is zeros when need_eps is False.

`normaliser(block, eps)` (not an op: a solve over every key of the rows, for tests) gives the c
of 2.2 of a block that holds all of each row's keys (0 on rows with no allowed key).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import formulas
from .entmax import _logsumexp, solve_rows
from .span import mask_slope, soft_mask


@dataclass
class Block:
    s: np.ndarray
    m: object
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray

    @property
    def Hkv(self) -> int:
        return self.k.shape[1]


def _f64(x):
    return np.asarray(x, dtype=np.float64)


def _expand(x, H):
    """[B, Hkv, W, C] -> [B, H, W, C]: each query head's kv head."""
    Hkv = x.shape[1]
    return x[:, np.arange(H) // (H // Hkv)]


def _reduce(x, Hkv):
    """[B, H, W, C] -> [B, Hkv, W, C]: sums over the query heads sharing a kv head."""
    B, H = x.shape[:2]
    return x.reshape((B, Hkv, H // Hkv) + x.shape[2:]).sum(2)


def block_scores(q, k, v, q_start, k_start, span, ramp, causal, key_lengths, q_offset, scale,
                 key_padding_mask=None) -> Block:
    q, k, v = _f64(q), _f64(k), _f64(v)
    B, H, Lq, _ = q.shape
    W = k.shape[2]
    keys = int(k_start) + np.arange(W)
    rows = int(q_start) + np.arange(Lq)
    offsets = np.broadcast_to(np.asarray(q_offset, np.int64).reshape(-1), (B,))
    d = (offsets[:, None, None] + rows[None, :, None] - keys[None, None, :])[:, None]  # [B, 1, Lq, W]
    valid = np.ones((B, W), bool)
    if key_lengths is not None:
        valid &= keys[None, :] < np.asarray(key_lengths, np.int64).reshape(B, 1)
    if key_padding_mask is not None:
        valid &= np.asarray(key_padding_mask, bool).reshape(B, W)
    allowed = np.broadcast_to(valid[:, None, None, :], (B, 1, Lq, W))
    if causal:
        allowed = allowed & (d >= 0)
    m = None
    if span is not None:
        m = soft_mask(d, np.broadcast_to(_f64(span), (H,))[None, :], float(ramp))  # [B, H, Lq, W]
        allowed = allowed & (m > 0)
    allowed = np.broadcast_to(allowed, (B, H, Lq, W))
    if m is not None:
        m = np.where(allowed, m, 0.0)
    k = np.where(valid[:, None, :, None], k, 0.0)
    v = np.where(valid[:, None, :, None], v, 0.0)
    q = np.where(allowed.any(-1, keepdims=True), q, 0.0)
    s = float(scale) * np.einsum("bhid,bhjd->bhij", q, _expand(k, H))
    return Block(np.where(allowed, s, -np.inf), m, q, k, v)


def _log_m(block):
    allowed = np.isfinite(block.s)
    if block.m is None:
        return np.where(allowed, 0.0, -np.inf)
    with np.errstate(divide="ignore"):
        return np.where(allowed, np.log(np.where(allowed, block.m, 1.0)), -np.inf)


def _eps(eps, H):
    return np.broadcast_to(_f64(eps).reshape(-1), (H,))[None, :, None, None]


def row_bounds(block, eps):
    s = block.s
    eps = _eps(eps, s.shape[1])
    allowed = np.isfinite(s)
    log_m = _log_m(block)
    top = np.max(s, -1, keepdims=True) if s.shape[-1] else np.full(s.shape[:-1] + (1,), -np.inf)
    mass = np.where(allowed, 1.0 if block.m is None else block.m, 0.0).sum(-1, keepdims=True)
    safe = np.where(eps > 0, eps, 1.0)
    with np.errstate(invalid="ignore"):
        alone = np.where(eps > 0, -np.expm1(-safe * log_m) / safe, log_m)
    lone = np.where(allowed, s + alone, -np.inf)
    lone = np.max(lone, -1, keepdims=True) if s.shape[-1] else top
    lse = _logsumexp(s + log_m) if s.shape[-1] else top
    return top, mass, lone, lse


def _probabilities(block, eps, c):
    """(p, t, w, log_ratio) of the block for the normaliser c (SPEC.md 2.2)."""
    s = block.s
    eps = _eps(eps, s.shape[1])
    allowed = np.isfinite(s)
    t = np.where(allowed, s - _f64(c), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lr = np.where(allowed, formulas.log_ratio(t, eps, np), -np.inf)
    p = np.exp(lr) * (1.0 if block.m is None else block.m)
    p = np.where(allowed, p, 0.0)
    support = p > 0
    w = np.where(support, p / np.where(support, 1.0 + eps * t, 1.0), 0.0)
    return p, t, w, lr, eps


def row_sums(block, eps, c):
    p, _, w, _, _ = _probabilities(block, eps, c)
    return p.sum(-1, keepdims=True), w.sum(-1, keepdims=True)


def weighted_values(block, eps, c):
    p, _, w, _, _ = _probabilities(block, eps, c)
    v = _expand(block.v, p.shape[1])
    return np.einsum("bhij,bhjd->bhid", p, v), np.einsum("bhij,bhjd->bhid", w, v), w.sum(-1, keepdims=True)


def softmax_block(block):
    logits = block.s + _log_m(block)
    lse = _logsumexp(logits) if logits.shape[-1] else np.full(logits.shape[:-1] + (1,), -np.inf)
    p = np.exp(logits - np.where(np.isfinite(lse), lse, 0.0))
    return lse, np.einsum("bhij,bhjd->bhid", p, _expand(block.v, p.shape[1]))


def merge_softmax(lse, out, lse_b, out_b):
    lse, out, lse_b, out_b = _f64(lse), _f64(out), _f64(lse_b), _f64(out_b)
    new = np.logaddexp(lse, lse_b)
    safe = np.where(np.isfinite(new), new, 0.0)
    a = np.where(np.isfinite(lse), np.exp(lse - safe), 0.0)
    b = np.where(np.isfinite(lse_b), np.exp(lse_b - safe), 0.0)
    return new, out * a + out_b * b


def gbar(dout, wv, wsum):
    num = (_f64(dout) * _f64(wv)).sum(-1, keepdims=True)
    wsum = _f64(wsum)
    return np.where(wsum > 0, num / np.where(wsum > 0, wsum, 1.0), 0.0)


def backward_block(block, eps, c, gbar_rows, dout, scale, ramp, need_eps):
    p, t, w, lr, eps = _probabilities(block, eps, c)
    H, Hkv = p.shape[1], block.Hkv
    dout = _f64(dout)
    g = np.einsum("bhid,bhjd->bhij", dout, _expand(block.v, H))
    support = p > 0
    centred = np.where(support, g - _f64(gbar_rows), 0.0)
    ds = w * centred
    dq = float(scale) * np.einsum("bhij,bhjd->bhid", ds, _expand(block.k, H))
    dk = float(scale) * _reduce(np.einsum("bhij,bhid->bhjd", ds, block.q), Hkv)
    dv = _reduce(np.einsum("bhij,bhid->bhjd", p, dout), Hkv)
    if need_eps:
        with np.errstate(invalid="ignore", divide="ignore"):
            psi = formulas.psi(np.where(support, t, 0.0), eps, np, "float64")
        deps = (centred * np.where(support, p * psi, 0.0)).sum((0, 2, 3))
    else:
        deps = np.zeros(H)
    dspan = None
    if block.m is not None:
        dm = np.where(support, np.exp(lr) * centred, 0.0)
        dspan = (dm * mask_slope(block.m, float(ramp))).sum((0, 2, 3))
    return dq, dk, dv, deps, dspan


def normaliser(block, eps):
    """c of SPEC.md 2.2 for rows whose keys are all in `block` (0 on rows with none)."""
    s = block.s
    B, H, Lq, W = s.shape
    e = np.broadcast_to(_eps(eps, H), (B, H, Lq, 1)).reshape(-1)
    m = np.where(np.isfinite(s), 1.0, 0.0) if block.m is None else block.m
    sol = solve_rows(s.reshape(-1, W), m.reshape(-1, W), e)
    support = sol.p > 0
    # t = s - c on the support: c is s - t at any key of the support (the largest p here).
    j = np.argmax(sol.p, -1)
    rows = np.arange(sol.p.shape[0])
    c = np.where(support.any(-1), s.reshape(-1, W)[rows, j] - sol.t[rows, j], 0.0) if W else np.zeros(len(rows))
    return c.reshape(B, H, Lq, 1)
