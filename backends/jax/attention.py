"""Adaptive-span alpha-entmax attention in JAX, tiled over queries and keys (SPEC.md 5).

One jittable core. What shapes the program is static (`StaticArgs`: causal, whether there is a
span, whether alpha is the Python number 1, which gradients are wanted, the tile sizes; and
the arrays' shapes); everything else is traced: alpha [H], span [H], ramp, scale,
key_lengths [B] and q_offset [B]. A decode loop that moves q_offset, or training that moves
alpha and span, never recompiles.

Layout: grouped-query heads are viewed as q [B, Hkv, G, Lq, D] against k [B, Hkv, Lk, D]
(query head h = g * G + i reads kv head g): K and V are never repeated. Queries are processed
in tiles of `tile_q` rows (lax.scan), keys in tiles of `tile_k` (lax.fori_loop). The key tiles
a query tile may read come from the causal bound, the span window |d| <= fl(R + z) and
key_lengths, as traced integers: fori_loop with traced bounds is a while_loop, so tiles that
cannot contribute are never computed. Reverse mode never goes through those loops: the
backward is our own (jax.custom_vjp).

Forward, per query tile:
- alpha = 1 given as a Python number (softmax only): one pass, online log-sum-exp;
- otherwise: one pass writes the tile's scores (and span weights) into a strip
  [key tiles, B, Hkv, G, tile_q, tile_k] and gathers the bracket of SPEC.md 2.4; then Newton
  steps on h(c) = log sum p, safeguarded by bisection, each step a pass over the reachable key
  tiles of the strip, until no row moves by more than 4 ulps (float32 accumulation for the
  half types, float64 for float64); then one pass for P V.
The only residual besides the inputs is c, one number per row (SPEC.md 2.2), from which the
backward rebuilds p exactly, without iterating.

Backward, per query tile: pass 1 recomputes scores and g = dout V^T into strips and sums
w = p/u and w g per row (gbar of SPEC.md 4); pass 2 forms ds = w (g - gbar) and accumulates
dq, dk, dv (dk and dv summed over each kv group), and d alpha (psi), d span (dm/dz), d ramp
(dm/dR) and d scale when they are wanted (given as arrays). Memory is O(strip), never [B, H, Lq, Lk] for long sequences.
"""

from __future__ import annotations

import math
from functools import partial, wraps
from numbers import Real
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnspec import geometry, precision

from . import entmax as _entmax
from . import span as _span

#: Rows per query tile and keys per key tile (upper bounds; small inputs use one tile).
TILE_Q = 128
TILE_K = 128
#: Elements of one score strip [B, H, tile_q, Lk]; the query tile shrinks to stay below it.
STRIP_ELEMENTS = 1 << 22
MIN_TILE = 16
#: Newton steps at most (each also halves the bracket when Newton would leave it).
ITERATIONS = _entmax.ITERATIONS
#: Positions (i + q_offset) are int32 unless jax_enable_x64 is on; offsets and the reach are
#: clamped to geometry.POSITION_LIMITS for that integer dtype.

HIGHEST = lax.Precision.HIGHEST


class StaticArgs(NamedTuple):
    has_span: bool
    softmax_only: bool  # alpha is the Python number 1: online softmax, no Newton
    need_dalpha: bool  # backward only
    need_dspan: bool  # backward only
    tile_q: int
    tile_k: int
    need_dscale: bool = False  # backward only: scale given as an array
    need_dramp: bool = False  # backward only: ramp given as an array (with a span)

    def forward_part(self):
        """What the forward depends on: calls differing only in the gradients they may want
        share one compiled forward."""
        return self._replace(need_dalpha=False, need_dspan=False, need_dscale=False, need_dramp=False)


def compute_dtype(dtype):
    """attnspec.precision.compute_dtype on jax dtypes."""
    return jnp.dtype(precision.compute_dtype(jnp.dtype(dtype).name))


position_dtype = _span.position_dtype


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _power_of_two(n):
    return 1 << max(0, n - 1).bit_length()


def plan(B, H, Lq, Lk, D, Dv, tile_q=None, tile_k=None):
    """((Lq, Lk, D, Dv) padded, (tile_q, tile_k)) for a call.

    Lengths up to one tile are padded to a power of two and longer ones to whole tiles, head
    dims to a multiple of 8: calls of nearby shapes (and every dtype but float64, which all
    compute in float32) share one compiled kernel; padding rows and keys are masked. Key tiles
    hold TILE_K keys; query tiles TILE_Q rows, fewer (a power of two, at least MIN_TILE) when
    a strip of B*H*tile_q*Lk scores would pass STRIP_ELEMENTS. Explicit tile sizes (tests)
    pad to whole tiles only."""
    if tile_k:
        tk, Lk_pad = tile_k, _round_up(Lk, tile_k)
    else:
        Lk_pad = min(_power_of_two(Lk), TILE_K) if Lk <= TILE_K else _round_up(Lk, TILE_K)
        tk = min(TILE_K, Lk_pad)
    if tile_q:
        tq, Lq_pad = tile_q, _round_up(Lq, tile_q)
    else:
        budget = min(TILE_Q, max(MIN_TILE, STRIP_ELEMENTS // max(1, B * H * Lk_pad)))
        tq = 1 << (budget.bit_length() - 1)  # a power of two <= budget
        Lq_pad = min(_power_of_two(Lq), tq) if Lq <= tq else _round_up(Lq, tq)
        tq = min(tq, Lq_pad)
    return (Lq_pad, Lk_pad, _round_up(D, 8), _round_up(Dv, 8)), (tq, tk)


def _loop(lo, hi, body, init, count):
    """fori_loop over key tiles [lo, hi); with a single key tile, its body once, unconditionally
    (masks decide every element; the bounds only skip work), which compiles much faster.

    Traced bounds make the fori_loop a while_loop (fine: reverse mode never enters it). The
    alternative, all `count` tiles with a lax.cond per tile, is slower: every Newton pass pays
    the cond on every tile, reachable or not."""
    if count == 1:
        return body(jnp.zeros((), jnp.int32), init)
    return lax.fori_loop(lo, hi, body, init)


def _query_tiles(body, carry, count):
    """lax.scan of body over the query tiles, or one direct call when there is one."""
    if count == 1:
        carry, y = body(carry, jnp.zeros((), jnp.int32))
        return carry, jax.tree_util.tree_map(lambda x: x[None], y)
    return lax.scan(body, carry, jnp.arange(count, dtype=jnp.int32))


def _einsum(spec, a, b):
    # HIGHEST: float32 products and sums everywhere (TPUs and GPUs default to less).
    return jnp.einsum(spec, a, b, precision=HIGHEST)


class _Call(NamedTuple):
    """The traced parameters of one call, in the kernel's layout."""

    eps: object  # [1, Hkv, G, 1, 1] compute dtype, or None (softmax only)
    span: object  # [Hkv, G] or None
    causal: object  # bool, traced (one compiled program serves both)
    ramp: object
    scale: object
    lengths: object  # [B] positions dtype
    positions: object  # [B] q_offset, positions dtype
    Lq: object  # the real number of query rows (traced: padded shapes share a kernel)
    Lk: int  # padded
    mask: object  # key_padding_mask [B, Lk] bool (all True when absent; padded with False)


def _key_tiles(i0, call: _Call, static: StaticArgs):
    """[first, last) key tiles that rows i0 .. i0 + tile_q - 1 may read, over every batch and
    head, as traced integers: the tiles that cover span.key_window."""
    Tk = static.tile_k
    pdt = call.positions.dtype
    reach = None
    if static.has_span:
        reach = _span.reach(call.span, call.ramp, pdt, geometry.POSITION_LIMITS[jnp.dtype(pdt).name])
    lo, hi = _span.key_window(i0, jnp.minimum(i0 + static.tile_q, call.Lq), call.Lk, call.positions, call.causal,
                              reach, call.lengths)
    k_lo = lo // Tk
    k_hi = jnp.maximum(k_lo, (hi + Tk - 1) // Tk)
    return k_lo.astype(jnp.int32), k_hi.astype(jnp.int32)


def _kv_tile(x, kt, call: _Call, static: StaticArgs):
    """Keys/values kt*tile_k ... of x [B, Hkv, Lk_pad, *]: padding keys (j >= key_lengths_b)
    may hold NaN/Inf (SPEC.md 5.3), so they are zeroed; also returns key indices and validity."""
    Tk = static.tile_k
    j0 = kt * Tk
    tile = lax.dynamic_slice_in_dim(x, j0, Tk, axis=2)
    keys = (j0 + jnp.arange(Tk, dtype=jnp.int32)).astype(call.positions.dtype)
    valid = keys[None, :] < call.lengths[:, None]  # [B, Tk]
    valid = valid & lax.dynamic_slice_in_dim(call.mask, j0, Tk, axis=1)  # masked keys: excluded alike
    return jnp.where(valid[:, None, :, None], tile, 0), keys, valid


def _tile_scores(qt, kp, i0, kt, call: _Call, static: StaticArgs):
    """Scores of query rows i0.. against key tile kt: (s with -inf where not allowed, m or
    None, allowed, the cleaned key tile). s [B, Hkv, G, Tq, Tk]."""
    kb, keys, valid = _kv_tile(kp, kt, call, static)
    rows = (i0 + jnp.arange(static.tile_q, dtype=jnp.int32)).astype(call.positions.dtype)
    d = _span.distances(rows, keys, call.positions)  # [B, Tq, Tk]
    allowed = valid[:, None, :] & (rows < call.Lq)[None, :, None]
    allowed = allowed & ((d >= 0) | ~call.causal)
    allowed = allowed[:, None, None]  # [B, 1, 1, Tq, Tk]
    m = None
    if static.has_span:
        m = _span.soft_mask(d, call.span, call.ramp, qt.dtype)
        allowed = allowed & (m > 0)
        m = jnp.where(allowed, m, 0.0)
    s = call.scale * _einsum("bkgqd,bkjd->bkgqj", qt, kb)
    return jnp.where(allowed, s, -jnp.inf), m, allowed, kb


def _probabilities(s, m, call: _Call, c):
    """(p, e = p/m, t) of a block for row normalisers c [..., Tq]."""
    if call.eps is None:  # softmax: p = m exp(s - c)
        t = s - c[..., None]
        e = jnp.exp(t)
        return (e if m is None else m * e), e, t
    return _entmax.probabilities(s, m, call.eps, c[..., None])


def _forward_softmax_tile(qt, kp, vp, i0, call, static):
    """Online log-sum-exp over the reachable key tiles: (out tile, c)."""
    k_lo, k_hi = _key_tiles(i0, call, static)
    B, Hkv, G, Tq, _ = qt.shape
    Dv = vp.shape[-1]
    dtype = qt.dtype

    def step(kt, state):
        top, total, acc = state
        s, m, _, _ = _tile_scores(qt, kp, i0, kt, call, static)
        vb, _, _ = _kv_tile(vp, kt, call, static)
        new_top = jnp.maximum(top, s.max(-1))
        base = jnp.where(jnp.isfinite(new_top), new_top, 0.0)
        e = jnp.exp(s - base[..., None])
        p = e if m is None else m * e
        rescale = jnp.exp(top - base)
        total = total * rescale + p.sum(-1)
        acc = acc * rescale[..., None] + _einsum("bkgqj,bkje->bkgqe", p, vb)
        return new_top, total, acc

    init = (jnp.full((B, Hkv, G, Tq), -jnp.inf, dtype), jnp.zeros((B, Hkv, G, Tq), dtype),
            jnp.zeros((B, Hkv, G, Tq, Dv), dtype))
    top, total, acc = _loop(k_lo, k_hi, step, init, kp.shape[2] // static.tile_k)
    nonempty = total > 0
    safe = jnp.where(nonempty, total, 1.0)
    c = jnp.where(nonempty, top + jnp.log(safe), 0.0)
    out = jnp.where(nonempty[..., None], acc / safe[..., None], 0.0)
    return out, c


def _forward_entmax_tile(qt, kp, vp, i0, call, static):
    """Scores into a strip, bracket, safeguarded Newton on c, then P V: (out tile, c)."""
    k_lo, k_hi = _key_tiles(i0, call, static)
    B, Hkv, G, Tq, _ = qt.shape
    nk, Dv = kp.shape[2] // static.tile_k, vp.shape[-1]
    dtype = qt.dtype
    eps = call.eps
    rows = (B, Hkv, G, Tq)
    strip = (nk, B, Hkv, G, Tq, static.tile_k)

    def fill(kt, state):
        S, M, top, lo, mass = state
        s, m, allowed, _ = _tile_scores(qt, kp, i0, kt, call, static)
        S = lax.dynamic_update_index_in_dim(S, s, kt, 0)
        top = jnp.maximum(top, s.max(-1))
        if m is None:
            mass = mass + jnp.broadcast_to(allowed, s.shape).sum(-1).astype(dtype)
        else:
            M = lax.dynamic_update_index_in_dim(M, m, kt, 0)
            alone = jnp.where(allowed, _entmax.one_alone(s, jnp.where(allowed, m, 1.0), eps), -jnp.inf)
            lo = jnp.maximum(lo, alone.max(-1))
            mass = mass + m.sum(-1)
        return S, M, top, lo, mass

    neg = jnp.full(rows, -jnp.inf, dtype)
    M0 = jnp.zeros(strip, dtype) if static.has_span else jnp.zeros((), dtype)
    S, M, top, lo, mass = _loop(k_lo, k_hi, fill, (jnp.zeros(strip, dtype), M0, neg, neg, jnp.zeros(rows, dtype)),
                                nk)
    if not static.has_span:
        lo = top  # every weight is 1: entry j alone needs c = s_j
    nonempty = top > -jnp.inf
    row_eps = eps[..., 0]
    hi = top + _entmax.upper_bracket(jnp.where(nonempty, mass, 1.0), row_eps)
    lo = jnp.where(nonempty, lo, 0.0)
    hi = jnp.where(nonempty, jnp.maximum(hi, lo), 0.0)

    def sums(c):
        def add(kt, acc):
            m = M[kt] if static.has_span else None
            total_p, total_w = _entmax.newton_sums(S[kt], m, eps, c[..., None])
            return acc[0] + total_p, acc[1] + total_w
        return _loop(k_lo, k_hi, add, (jnp.zeros(rows, dtype), jnp.zeros(rows, dtype)), nk)

    c, _ = _entmax.solve(sums, lo, hi, nonempty, ITERATIONS[jnp.dtype(dtype).name])

    def output(kt, acc):
        m = M[kt] if static.has_span else None
        p, _, _ = _entmax.probabilities(S[kt], m, eps, c[..., None])
        vb, _, _ = _kv_tile(vp, kt, call, static)
        return acc + _einsum("bkgqj,bkje->bkgqe", p, vb)

    out = _loop(k_lo, k_hi, output, jnp.zeros(rows + (Dv,), dtype), nk)
    return jnp.where(nonempty[..., None], out, 0.0), c


def _layout(static, q, k, v, alpha, span, causal, ramp, scale, lengths, positions, n_rows, mask):
    """Inputs (padded to whole tiles, in the compute dtype) in the kernel's layout:
    (qg, kp, vp, call, sizes)."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    dtype = q.dtype
    nq, nk = Lq // static.tile_q, Lk // static.tile_k
    qg, kp, vp = q.reshape(B, Hkv, G, Lq, D), k, v
    eps = None if static.softmax_only else (alpha.astype(dtype) - 1).reshape(1, Hkv, G, 1, 1)
    z = span.astype(dtype).reshape(Hkv, G) if static.has_span else None
    call = _Call(eps=eps, span=z, causal=causal, ramp=ramp.astype(dtype), scale=scale.astype(dtype), lengths=lengths,
                 positions=positions, Lq=n_rows, Lk=Lk, mask=mask)
    return qg, kp, vp, call, (B, H, Hkv, G, Lq, Lk, D, v.shape[3], nq, nk)


def _forward(static, q, k, v, alpha, span, causal, ramp, scale, lengths, positions, n_rows, mask):
    """(out [B, H, Lq, Dv], c [B, Hkv, G, Lq]) on padded inputs in the compute dtype."""
    qg, kp, vp, call, (B, H, Hkv, G, Lq, Lk, D, Dv, nq, nk) = _layout(
        static, q, k, v, alpha, span, causal, ramp, scale, lengths, positions, n_rows, mask)
    tile = _forward_softmax_tile if static.softmax_only else _forward_entmax_tile

    def body(_, qi):
        i0 = qi * static.tile_q
        qt = lax.dynamic_slice_in_dim(qg, i0, static.tile_q, axis=3)
        return None, tile(qt, kp, vp, i0, call, static)

    _, (out, c) = _query_tiles(body, None, nq)
    # [nq, B, Hkv, G, Tq, ...] -> [B, Hkv, G, nq * Tq, ...]
    out = jnp.moveaxis(out, 0, 3).reshape(B, H, Lq, Dv)
    c = jnp.moveaxis(c, 0, 3).reshape(B, Hkv, G, Lq)
    return out, c


def _backward(static, residuals, dout):
    c, q, k, v, alpha, span, causal, ramp, scale, lengths, positions, n_rows, mask = residuals
    qg, kp, vp, call, (B, H, Hkv, G, Lq, Lk, D, Dv, nq, nk) = _layout(
        static, q, k, v, alpha, span, causal, ramp, scale, lengths, positions, n_rows, mask)
    dtype = qg.dtype
    Tq, Tk = static.tile_q, static.tile_k
    dog = dout.astype(dtype).reshape(B, Hkv, G, Lq, Dv)
    strip = (nk, B, Hkv, G, Tq, Tk)
    rows = (B, Hkv, G, Tq)

    def body(carry, qi):
        dk, dv, dalpha, dspan, dscale, dramp = carry
        i0 = qi * Tq
        qt = lax.dynamic_slice_in_dim(qg, i0, Tq, axis=3)
        dot = lax.dynamic_slice_in_dim(dog, i0, Tq, axis=3)
        ct = lax.dynamic_slice_in_dim(c, i0, Tq, axis=3)
        k_lo, k_hi = _key_tiles(i0, call, static)

        def first(kt, state):  # scores and g into strips; sum w and sum w g per row
            S, M, Gs, sum_w, sum_wg, reads = state
            s, m, allowed, _ = _tile_scores(qt, kp, i0, kt, call, static)
            vb, _, _ = _kv_tile(vp, kt, call, static)
            g = _einsum("bkgqe,bkje->bkgqj", dot, vb)
            p, _, t = _probabilities(s, m, call, ct)
            w = p if call.eps is None else _entmax.weights(p, t, call.eps)
            S = lax.dynamic_update_index_in_dim(S, s, kt, 0)
            Gs = lax.dynamic_update_index_in_dim(Gs, g, kt, 0)
            if m is not None:
                M = lax.dynamic_update_index_in_dim(M, m, kt, 0)
            reads = reads | jnp.broadcast_to(allowed, s.shape).any(-1)
            return S, M, Gs, sum_w + w.sum(-1), sum_wg + jnp.where(w > 0, w * g, 0.0).sum(-1), reads

        M0 = jnp.zeros(strip, dtype) if static.has_span else jnp.zeros((), dtype)
        zeros = jnp.zeros(rows, dtype)
        S, M, Gs, sum_w, sum_wg, reads = _loop(
            k_lo, k_hi, first, (jnp.zeros(strip, dtype), M0, jnp.zeros(strip, dtype), zeros, zeros,
                                jnp.zeros(rows, bool)), nk)
        gbar = sum_wg / jnp.where(sum_w > 0, sum_w, 1.0)
        # A row that reads no key may hold anything (NaN included): it must not reach dk.
        q_clean = jnp.where(reads[..., None], qt, 0.0)

        def second(kt, state):
            dq_t, dk, dv, dalpha, dspan, dramp = state
            m = M[kt] if static.has_span else None
            p, e, t = _probabilities(S[kt], m, call, ct)
            eps = 0.0 if call.eps is None else call.eps
            w = p if call.eps is None else _entmax.weights(p, t, eps)
            ds, dm, deps = _entmax.vjp_terms(p, e, t, w, eps, Gs[kt], gbar[..., None], static.need_dalpha)
            kb, _, _ = _kv_tile(kp, kt, call, static)
            dq_t = dq_t + _einsum("bkgqj,bkjd->bkgqd", ds, kb)  # times scale below
            j0 = kt * Tk
            dk_tile = call.scale * _einsum("bkgqj,bkgqd->bkjd", ds, q_clean)
            dv_tile = _einsum("bkgqj,bkgqe->bkje", p, dot)
            dk = lax.dynamic_update_slice_in_dim(dk, lax.dynamic_slice_in_dim(dk, j0, Tk, 2) + dk_tile, j0, 2)
            dv = lax.dynamic_update_slice_in_dim(dv, lax.dynamic_slice_in_dim(dv, j0, Tk, 2) + dv_tile, j0, 2)
            if static.need_dalpha:
                dalpha = dalpha + deps.sum((0, 3, 4))
            if static.need_dspan:
                dspan = dspan + (dm * _span.mask_slope(m, call.ramp)).sum((0, 3, 4))
            if static.need_dramp:
                dramp = dramp + (dm * _span.ramp_slope(m, call.ramp)).sum()
            return dq_t, dk, dv, dalpha, dspan, dramp

        dq_t, dk, dv, dalpha, dspan, dramp = _loop(
            k_lo, k_hi, second, (jnp.zeros(rows + (D,), dtype), dk, dv, dalpha, dspan, dramp), nk)
        if static.need_dscale:  # s = scale (q . k): dL/dscale = sum dS (q . k) = sum q . (dS k)
            dscale = dscale + (q_clean * dq_t).sum()
        return (dk, dv, dalpha, dspan, dscale, dramp), call.scale * dq_t

    init = (jnp.zeros(kp.shape, dtype), jnp.zeros(vp.shape, dtype), jnp.zeros((Hkv, G), dtype),
            jnp.zeros((Hkv, G), dtype), jnp.zeros((), dtype), jnp.zeros((), dtype))
    (dk, dv, dalpha, dspan, dscale, dramp), dq = _query_tiles(body, init, nq)
    dq = jnp.moveaxis(dq, 0, 3).reshape(B, H, Lq, D)
    return dq, dk, dv, dalpha.reshape(H), dspan.reshape(H), dscale, dramp


# Forward and backward are jitted separately (and inline into a caller's jit): a forward
# compiles once per (shapes, dtype, forward_part of the config), whatever gradients follow.
_forward_jit = jax.jit(_forward, static_argnums=0)
_backward_jit = jax.jit(_backward, static_argnums=0)


def _pad_to(x, shape):
    return jnp.pad(x, [(0, n - m) for m, n in zip(x.shape, shape)])


def _is_number(x):
    return isinstance(x, (Real, np.number)) and not isinstance(x, bool) or (
        isinstance(x, np.ndarray) and x.ndim == 0)


class Meta(NamedTuple):
    """What the programs around the kernel know of a call (static): its dims, the padded
    dims (`plan`), the inputs' dtype and the compute dtype."""

    B: int
    H: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    padded: tuple  # (Lq, Lk, D, Dv)
    dtype: str  # the inputs' (and the output's)
    compute: str


#: The small programs around the kernel only pad, slice, convert and clamp: XLA's optimisations
#: buy them nothing and cost a third of their compile time. Compile options apply to top-level
#: programs only, so inside a caller's trace (jit, vmap, grad of a jitted function) they are
#: plain nested jits.
_DATA_MOVEMENT = {"xla_backend_optimization_level": 0}


def _data_movement(**jit_kwargs):
    def wrap(fn):
        eager = jax.jit(fn, compiler_options=_DATA_MOVEMENT, **jit_kwargs)
        nested = jax.jit(fn, **jit_kwargs)

        @wraps(fn)
        def call(*args, **kwargs):
            return (eager if _top_level() else nested)(*args, **kwargs)
        return call
    return wrap


def _top_level():
    """Whether no trace (jit, vmap, grad, ...) is under way. jax says so only through a private
    function; a jax without it gets the plain programs (slower to compile, the same results)."""
    try:
        from jax._src import core
        return bool(core.trace_ctx.is_top_level())
    except (ImportError, AttributeError):
        return False


# The programs around the kernel's are keyed on as little as possible, so that the many forms
# a call can take (alpha a number or per head, span absent, key_lengths given or not, ...)
# do not multiply into a program each: q, k, v per call shape; the geometry per batch and
# lengths; alpha, span, ramp and scale by plain jax ops (each compiled per operand shape).


@_data_movement(static_argnums=0)
def _prepare(meta: Meta, q, k, v):
    """q, k, v in the compute dtype, padded to the kernel's shapes."""
    Lq, Lk, D, Dv = meta.padded
    B, H, Hkv, dtype = meta.B, meta.H, meta.Hkv, meta.compute
    return (_pad_to(q.astype(dtype), (B, H, Lq, D)), _pad_to(k.astype(dtype), (B, Hkv, Lk, D)),
            _pad_to(v.astype(dtype), (B, Hkv, Lk, Dv)))


@_data_movement(static_argnames=("B", "Lq", "Lk", "Lk_pad"))
def _geometry(key_lengths, q_offset, key_padding_mask, causal, *, B, Lq, Lk, Lk_pad):
    """(causal, key lengths, offsets, real rows, key mask) as the kernel takes them: lengths and
    offsets clamped as SPEC.md 7 says (traced values are never validated), the key mask padded
    with False and all True when absent (one compiled kernel serves calls with and without
    it; padding keys beyond Lk are excluded by the lengths too)."""
    pdt = position_dtype()
    limit = geometry.POSITION_LIMITS[jnp.dtype(pdt).name]
    lengths = (jnp.full((B,), Lk, pdt) if key_lengths is None
               else jnp.clip(jnp.asarray(key_lengths).astype(pdt).reshape(B), 0, Lk))
    if q_offset is None:
        positions = jnp.full((B,), Lk - Lq, pdt)
    else:
        positions = jnp.broadcast_to(jnp.clip(jnp.asarray(q_offset).astype(pdt), -limit, limit), (B,))
    readable = jnp.ones((B, Lk), bool) if key_padding_mask is None else jnp.asarray(key_padding_mask, bool)
    mask = jnp.pad(readable, ((0, 0), (0, Lk_pad - Lk)))
    return jnp.asarray(causal, bool), lengths, positions, jnp.asarray(Lq, jnp.int32), mask


def _per_head(value, H, dtype):
    """alpha or span as an [H] array of the compute dtype."""
    return jnp.broadcast_to(jnp.asarray(value).astype(dtype), (H,))


def _enter(meta: Meta, q, k, v, alpha, span, ramp, scale, key_lengths, q_offset, key_padding_mask, causal):
    """Everything the kernel takes, in `_forward`'s order (after `static`)."""
    qp, kp, vp = _prepare(meta, q, k, v)
    causal, lengths, positions, n_rows, mask = _geometry(key_lengths, q_offset, key_padding_mask, causal, B=meta.B,
                                                         Lq=meta.Lq, Lk=meta.Lk, Lk_pad=meta.padded[1])
    dtype = meta.compute
    return (qp, kp, vp, _per_head(alpha, meta.H, dtype), None if span is None else _per_head(span, meta.H, dtype),
            causal, jnp.asarray(ramp).astype(dtype), jnp.asarray(scale).astype(dtype), lengths, positions, n_rows,
            mask)


@_data_movement(static_argnums=0)
def _leave(meta: Meta, out):
    """The kernel's output sliced to the call's shape, in the inputs' dtype."""
    return out[:, :, :meta.Lq, :meta.Dv].astype(meta.dtype)


@_data_movement(static_argnums=0)
def _grad_enter(meta: Meta, dout):
    """dout as the backward takes it: padded, in the compute dtype."""
    Lq_pad, _, _, Dv_pad = meta.padded
    return _pad_to(dout.astype(meta.compute), (meta.B, meta.H, Lq_pad, Dv_pad))


@_data_movement(static_argnums=0)
def _grad_leave(meta: Meta, dq, dk, dv):
    """dq, dk, dv sliced to the call's shapes, in the inputs' dtype."""
    dt = meta.dtype
    return (dq[:, :, :meta.Lq, :meta.D].astype(dt), dk[:, :, :meta.Lk, :meta.D].astype(dt),
            dv[:, :, :meta.Lk, :meta.Dv].astype(dt))


def _sum_to(x, like):
    """A per-head (or scalar) gradient summed to the shape of the argument `like`, in its dtype;
    None where `like` is None (an argument given as a Python number: no gradient)."""
    if like is None:
        return None
    return (x.sum().reshape(jnp.shape(like)) if jnp.size(like) == 1 else x).astype(like.dtype)


# The custom_vjp is the outermost piece, with small programs inside it around the kernel's:
# called eagerly, a call with gradients runs the same forward programs as one without, and
# autodiff never linearises (and compiles again) the padding and conversions.
@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attend(static, meta, q, k, v, alpha, span, ramp, scale, key_lengths, q_offset, key_padding_mask, causal):
    return _attend_fwd(static, meta, q, k, v, alpha, span, ramp, scale, key_lengths, q_offset, key_padding_mask,
                       causal)[0]


def _attend_fwd(static, meta, q, k, v, alpha, span, ramp, scale, key_lengths, q_offset, key_padding_mask, causal):
    inputs = _enter(meta, q, k, v, alpha, span, ramp, scale, key_lengths, q_offset, key_padding_mask, causal)
    out, c = _forward_jit(static.forward_part(), *inputs)
    # alpha, span, ramp and scale ride along for their shapes and dtypes (None: not wanted).
    wanted = (alpha if static.need_dalpha else None, span if static.need_dspan else None,
              ramp if static.need_dramp else None, scale if static.need_dscale else None)
    return _leave(meta, out), (c, inputs, wanted)


def _attend_bwd(static, meta, residuals, dout):
    c, inputs, (alpha, span, ramp, scale) = residuals
    dq, dk, dv, dalpha, dspan, dscale, dramp = _backward_jit(static, (c,) + inputs, _grad_enter(meta, dout))
    dq, dk, dv = _grad_leave(meta, dq, dk, dv)
    # Python numbers (and the integer and boolean arguments) have no gradient: None.
    return (dq, dk, dv, _sum_to(dalpha, alpha), _sum_to(dspan, span), _sum_to(dramp, ramp), _sum_to(dscale, scale),
            None, None, None, None)


_attend.defvjp(_attend_fwd, _attend_bwd)


def attention(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None, q_offset=None,
              scale=None, tile_q=None, tile_k=None, key_padding_mask=None):
    """SPEC.md's attention on jax arrays (already validated by attnspec.attention)."""
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if B == 0 or Lq == 0 or Lk == 0:  # no row, or nothing to read: zeros (SPEC.md 5.3)
        return jnp.zeros((B, H, Lq, Dv), q.dtype)
    dtype = compute_dtype(q.dtype)
    padded, (tq, tk) = plan(B, H, Lq, Lk, D, Dv, tile_q, tile_k)
    static = StaticArgs(
        has_span=span is not None,
        softmax_only=_is_number(alpha) and float(alpha) == 1.0,
        need_dalpha=not _is_number(alpha),
        need_dspan=span is not None and not _is_number(span),
        tile_q=tq,
        tile_k=tk,
        need_dscale=scale is not None and not _is_number(scale),
        need_dramp=span is not None and not _is_number(ramp),
    )
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    compute = jnp.dtype(dtype).name

    def host(x):  # a Python number: a NumPy scalar of the compute dtype (no gradient)
        return np.asarray(x, compute) if _is_number(x) else x

    if isinstance(key_lengths, np.ndarray):  # clamped before jax sees it, as q_offset is
        key_lengths = np.clip(key_lengths.astype(np.int64), 0, Lk)
    q_offset = _span.host_offsets(q_offset)
    meta = Meta(B, H, Hkv, Lq, Lk, D, Dv, padded, jnp.dtype(q.dtype).name, compute)
    return _attend(static, meta, q, k, v, host(alpha), None if span is None else host(span), host(ramp), host(scale),
                   key_lengths, q_offset, key_padding_mask, np.asarray(bool(causal)))
