"""Context-parallel attention for JAX: call inside `shard_map` with the sequence axis (axis 2 of
q, k, v) split over the mesh axis `axis_name` in equal blocks (SPEC.md semantics).

- Span heads with a static bound `max_span`: each device fetches the keys within
  h = reach(max_span, R) - 1 positions (attnspec.geometry.reach) of its block (before it only, when causal) from its
  neighbours with `lax.ppermute` (static shifts; a halo wider than a block takes several), and
  runs the single-device backend on its queries against that window, which holds every key its
  rows may read: exact for any alpha. Autodiff transposes the ppermutes, so the halo keys' dk/dv
  return to their owners and add up there.
  Whether every head's reach fits the bound is known only from span's value: a `lax.cond` on
  it (span is replicated, so every device takes the same branch) sends the whole call to the
  ring when one head does not fit: never a truncated window.
- Every other call (no span, no bound, or a head beyond it): a ring. K blocks travel round the
  axis (`lax.ppermute`, a cyclic shift per step): one pass gathers each row's bracket and
  log-sum-exp, then each Newton step on h(c) = log sum p is one more pass of K (every device
  stops after the same step: the flag is reduced with `lax.pmax`), then one pass of K and V
  gives sum p v and the backward's sum w v, sum w. The backward (custom_vjp) sends K, V and
  the dk/dv accumulators round once; the accumulators arrive back at their owners. alpha = 1
  rows take c = log-sum-exp from the first pass (no Newton step).

alpha and span enter shard_map replicated (in_specs P()): their gradients are the sums over
every device's queries. jit-compatible: shapes depend only on static arguments.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from functools import partial

from .. import geometry as spec_geometry
from . import geometry


def _compute_dtype(dtype):
    return np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32


def _static_offsets(q_offset, B):
    if q_offset is None:
        return [0] * B
    if isinstance(q_offset, (int, np.integer)):
        return [int(q_offset)] * B
    try:
        values = [int(x) for x in np.asarray(q_offset).reshape(-1)]
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as error:
        raise TypeError("q_offset must be static (a Python int or a sequence of ints) inside "
                        "attnspec.distributed.jax.attention: the halo's shape depends on it") from error
    values = values * B if len(values) == 1 else values
    if len(values) != B:
        raise ValueError(f"q_offset must be an integer or have shape [B] = [{B}]; got {len(values)} values")
    return values


def _ops():
    """The jax backend's 'partial' kernel (SPEC.md section 10): the per-block operations, taken
    from the declaration the conformance suite checks."""
    from attnspec.dispatch import registry

    return registry.load("jax").kernel("partial").fn


def _shifted(x, shift, size, axis_name):
    """The value of x on device (index - shift) (zeros where that device does not exist)."""
    if shift > 0:
        perm = [(s, s + shift) for s in range(size - shift)]
    else:
        perm = [(s, s + shift) for s in range(-shift, size)]
    return lax.ppermute(x, axis_name, perm)



# ---------------------------------------------------------------------------------------------
# Ring: K/V blocks travel round the axis; c is solved globally (SPEC.md 2.4) and the backward's
# gbar comes from the forward's sums. The backward is our own (custom_vjp), like the torch one.


class _Static(tuple):
    """(axis_name, size, Lb, causal, ramp, scale, has_span, has_lengths, iterations, has_mask):
    hashable."""


def _ring_shift(x, axis_name, size):
    return lax.ppermute(x, axis_name, [(s, (s + 1) % size) for s in range(size)])


def _readable_channel(mask, Hkv, dtype):
    """The block's key_padding_mask as one channel of its keys: [B, Hkv, Lb, 1], 1 = readable."""
    B, Lb = mask.shape
    return jnp.broadcast_to(mask[:, None, :, None].astype(dtype), (B, Hkv, Lb, 1))


def _ring_forward(st, q, k, v, alpha, span, lengths, offsets, mask):
    from attnspec.backends.jax import entmax as _entmax
    _partial = _ops()

    axis_name, size, Lb, causal, ramp, scale, has_span, has_lengths, iterations, has_mask = st
    dtype = _partial.compute_dtype(q.dtype)
    index = lax.axis_index(axis_name)
    B, H, _, D = q.shape
    eps = (alpha.astype(dtype) - 1)[None, :, None, None]
    span_h = span if has_span else None
    kl = lengths if has_lengths else None
    q_pos0 = index * Lb

    def scores(kv, t):
        # a travelling block holds [k | v (absent in the passes that need only k) | readable]
        owner = (index - t) % size
        width = kv.shape[-1] - (1 if has_mask else 0)
        readable = kv[:, 0, :, width] > 0.5 if has_mask else None
        return _partial.block_scores(q, kv[..., :D], kv[..., D:width], q_pos0, owner * Lb, span_h, ramp, causal, kl,
                                     offsets, scale, readable)

    def ring_pass(kv, fn, acc):
        for t in range(size):
            acc = fn(acc, scores(kv, t))
            if t < size - 1:
                kv = _ring_shift(kv, axis_name, size)
        return acc

    extra = [_readable_channel(mask, k.shape[1], dtype)] if has_mask else []
    kk = jnp.concatenate([k.astype(dtype)] + extra, -1)
    row = (B, H, Lb, 1)
    neg = jnp.full(row, -jnp.inf, dtype)

    def bounds(acc, blk):
        top, mass, lone, lse = _partial.row_bounds(blk, eps)
        return (jnp.maximum(acc[0], top), acc[1] + mass, jnp.maximum(acc[2], lone), jnp.logaddexp(acc[3], lse))

    top, mass, lone, lse = ring_pass(kk, bounds, (neg, jnp.zeros(row, dtype), neg, neg))
    nonempty = jnp.isfinite(top)
    top0 = jnp.where(nonempty, top, 0.0)
    lo = jnp.where(nonempty, lone, 0.0)
    hi = jnp.maximum(top0 + _entmax.upper_bracket(jnp.where(nonempty, mass, 1.0), jnp.where(eps > 0, eps, 1.0)), lo)
    tolerance = 4 * jnp.finfo(dtype).eps
    hi = hi + 2 * tolerance * (1 + jnp.abs(hi - top0))
    solving = nonempty & (eps > 0)

    def not_done(local):
        return lax.pmax(local.astype(jnp.int32), axis_name) > 0

    def keep_going(state):
        return state[4] & (state[3] < iterations)

    def step(state):
        c, lo, hi, it, _ = state

        def sums(acc, blk):
            sp, sw = _partial.row_sums(blk, eps, c)
            return acc[0] + sp, acc[1] + sw

        total_p, total_w = ring_pass(kk, sums, (jnp.zeros(row, dtype), jnp.zeros(row, dtype)))
        new, lo, hi = _entmax.newton_update(c, lo, hi, total_p, total_w)
        new = jnp.where(solving, new, c)
        moved = solving & (jnp.abs(new - c) > tolerance * (1 + jnp.abs(new - top0)))
        # every device stops after the same step: the flag is reduced over the axis
        return new, lo, hi, it + 1, not_done(jnp.any(moved))

    start = (lo, lo, hi, jnp.zeros((), jnp.int32), not_done(jnp.any(solving)))
    c, _, _, _, _ = lax.while_loop(keep_going, step, start)
    c = jnp.where(eps > 0, c, jnp.where(jnp.isfinite(lse), lse, 0.0))
    c = jnp.where(nonempty, c, 0.0)

    def values(acc, blk):
        pv, wv, ws = _partial.weighted_values(blk, eps, c)
        return acc[0] + pv, acc[1] + wv, acc[2] + ws

    Dv = v.shape[3]
    zeros = jnp.zeros((B, H, Lb, Dv), dtype)
    kv = jnp.concatenate([k.astype(dtype), v.astype(dtype)] + extra, -1)
    out, wv, wsum = ring_pass(kv, values, (zeros, zeros, jnp.zeros(row, dtype)))
    return out, (c, wv, wsum)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(st, q, k, v, alpha, span, lengths, offsets, mask):
    out, _ = _ring_forward(st, q, k, v, alpha, span, lengths, offsets, mask)
    return out.astype(q.dtype)


def _ring_fwd(st, q, k, v, alpha, span, lengths, offsets, mask):
    out, (c, wv, wsum) = _ring_forward(st, q, k, v, alpha, span, lengths, offsets, mask)
    return out.astype(q.dtype), (q, k, v, alpha, span, lengths, offsets, mask, c, wv, wsum)


def _ring_bwd(st, residuals, dout):
    _partial = _ops()

    q, k, v, alpha, span, lengths, offsets, mask, c, wv, wsum = residuals
    axis_name, size, Lb, causal, ramp, scale, has_span, has_lengths, iterations, has_mask = st
    dtype = _partial.compute_dtype(q.dtype)
    index = lax.axis_index(axis_name)
    B, H, _, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    eps = (alpha.astype(dtype) - 1)[None, :, None, None]
    span_h = span if has_span else None
    kl = lengths if has_lengths else None
    dout = dout.astype(dtype)
    gbar = _partial.gbar(dout, wv, wsum)
    extra = [_readable_channel(mask, Hkv, dtype)] if has_mask else []
    width = D + Dv + len(extra)  # [k, v, (readable)], then the dk, dv accumulators
    payload = jnp.concatenate([k.astype(dtype), v.astype(dtype)] + extra + [jnp.zeros((B, Hkv, Lb, D + Dv), dtype)],
                              -1)
    dq = jnp.zeros((B, H, Lb, D), dtype)
    deps = jnp.zeros((H,), dtype)
    dspan = jnp.zeros((H,), dtype)
    for t in range(size):
        owner = (index - t) % size
        readable = payload[:, 0, :, D + Dv] > 0.5 if has_mask else None
        blk = _partial.block_scores(q, payload[..., :D], payload[..., D:D + Dv], index * Lb, owner * Lb,
                                    span_h, ramp, causal, kl, offsets, scale, readable)
        dq_b, dk_b, dv_b, deps_b, dspan_b = _partial.backward_block(blk, eps, c, gbar, dout, scale, ramp, True)
        dq, deps = dq + dq_b, deps + deps_b
        if dspan_b is not None:
            dspan = dspan + dspan_b
        payload = payload.at[..., width:].add(jnp.concatenate([dk_b, dv_b], -1))
        if t < size - 1:
            payload = _ring_shift(payload, axis_name, size)
    # the accumulators go home: the next device owns the block this one holds now
    acc = _ring_shift(payload[..., width:], axis_name, size) if size > 1 else payload[..., width:]
    dk, dv = acc[..., :D], acc[..., D:]
    # alpha and span are replicated inputs of shard_map: its transpose sums these over the axis
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), deps.astype(alpha.dtype),
            dspan.astype(span.dtype), None, None, None)


_ring.defvjp(_ring_fwd, _ring_bwd)


def attention(q, k, v, *, axis_name, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None,
              q_offset=None, scale=None, max_span=None, key_padding_mask=None, backend=None):
    """This device's block of attention over a sequence split on mesh axis `axis_name`.

    q [B, H, Lb, D], k [B, Hkv, Lb, D], v [B, Hkv, Lb, Dv]: the block (equal on every device).
    key_lengths [B] and q_offset refer to global positions; q_offset must be static (int or
    ints), default 0. key_padding_mask: None, or this device's block [B, Lb] (bool, True =
    readable) of the sequence's [B, L] mask (shard_map in_specs P(None, axis_name)); it travels
    with the halo keys and the ring's blocks (SPEC.md 5.1: masked keys may hold NaN, get dk =
    dv = 0; rows with no readable key give zeros). max_span: the static halo bound (None: every
    head takes the ring). backend: the single-device backend (None: the dispatcher's choice for
    jax arrays).
    """
    import attnspec

    B, H, Lb, D = q.shape
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (B, Lb):
            raise ValueError(f"key_padding_mask must be this device's block [B, Lb] = [{B}, {Lb}]; got shape "
                             f"{list(key_padding_mask.shape)}")
        if jnp.dtype(key_padding_mask.dtype) != jnp.bool_:
            raise TypeError("key_padding_mask must hold booleans (True = readable); got dtype "
                            f"{key_padding_mask.dtype}")
    size = lax.axis_size(axis_name)
    index = lax.axis_index(axis_name)
    if k.shape[2] != Lb:
        raise ValueError("each device holds the queries and the keys of the same positions: q and k must have "
                         f"one length; got q: {Lb}, k: {k.shape[2]}")
    if max_span is not None and (not math.isfinite(float(max_span)) or float(max_span) < 0):
        raise ValueError(f"max_span must be None or a finite number >= 0; got {max_span}")
    L = size * Lb
    offsets = _static_offsets(q_offset, B)
    o_min, o_max = min(offsets), max(offsets)
    position = index * Lb
    kl = None if key_lengths is None else jnp.asarray(key_lengths).reshape(B)
    common = dict(alpha=alpha, span=span, ramp=ramp, causal=causal, scale=scale, backend=backend)

    def ring_path():
        dtype = _compute_dtype(q.dtype)
        alpha_h = jnp.broadcast_to(jnp.asarray(alpha).astype(dtype), (H,))
        span_h = jnp.zeros((H,), dtype) if span is None else jnp.broadcast_to(jnp.asarray(span).astype(dtype), (H,))
        lengths = jnp.zeros((B,), jnp.int32) if kl is None else kl
        scale_ = 1.0 / math.sqrt(D) if scale is None else float(scale)
        from attnspec.backends.jax import attention as _backend

        st = _Static((axis_name, size, Lb, bool(causal), float(ramp), scale_, span is not None, kl is not None,
                      _backend.ITERATIONS["float64" if dtype == np.float64 else "float32"],
                      key_padding_mask is not None))
        qo = jnp.asarray(offsets, jnp.int32 if not jax.config.jax_enable_x64 else jnp.int64)
        readable = jnp.ones((B, Lb), bool) if key_padding_mask is None else key_padding_mask
        return _ring(st, q, k, v, alpha_h, span_h, lengths, qo, readable)

    if span is None or max_span is None:
        return ring_path()
    dtype = _compute_dtype(q.dtype)
    halo = geometry.reach_keys(float(max_span), float(ramp), np.dtype(dtype).name)
    need_before = max(0, halo - o_min)
    need_after = max(0, o_max if causal else o_max + halo)
    W = Lb + need_before + need_after
    if W >= L:  # the halo is the whole sequence anyway
        return ring_path()

    Dv = v.shape[3]

    def halo_path():
        kv = jnp.concatenate([k, v], -1)
        if key_padding_mask is not None:  # the mask travels with the keys, as one more channel
            kv = jnp.concatenate([kv, _readable_channel(key_padding_mask, k.shape[1], kv.dtype)], -1)
        parts = []
        for i in range(math.ceil(need_before / Lb), 0, -1):  # farthest block first
            n = min(Lb, need_before - (i - 1) * Lb)
            parts.append(_shifted(kv[:, :, Lb - n:], i, size, axis_name))
        parts.append(kv)
        for i in range(1, math.ceil(need_after / Lb) + 1):
            n = min(Lb, need_after - (i - 1) * Lb)
            parts.append(_shifted(kv[:, :, :n], -i, size, axis_name))
        # Keys at positions position - need_before ... ; zeros stand where no device holds
        # keys. The window [a, a + W) is clamped inside the sequence: near its ends it then holds
        # only real keys (plus zeros at positions beyond every row's reach).
        pad = jnp.zeros(kv.shape[:2] + (W,) + kv.shape[3:], kv.dtype)
        buffer = jnp.concatenate([pad] + parts + [pad], 2)
        a = jnp.clip(position - need_before, 0, L - W)
        start = W + a - (position - need_before)
        window = lax.dynamic_slice_in_dim(buffer, start, W, axis=2)
        qo = jnp.asarray(offsets, position.dtype) + position - a
        lengths = None if kl is None else jnp.clip(kl - a, 0, W)
        # zeros (never readable) stand at positions no device holds
        readable = None if key_padding_mask is None else window[:, 0, :, D + Dv] > 0.5
        return attnspec.attention(q, window[..., :D], window[..., D:D + Dv], key_lengths=lengths, q_offset=qo,
                                  key_padding_mask=readable, **common)

    from attnspec.backends.jax import span as _span  # the spec's reach, traced

    pdt = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    reach = _span.reach(jnp.atleast_1d(jnp.asarray(span, dtype)), jnp.asarray(ramp, dtype), pdt,
                        spec_geometry.POSITION_LIMITS[jnp.dtype(pdt).name]) - 1
    fits = reach <= halo
    return lax.cond(fits, halo_path, ring_path)
