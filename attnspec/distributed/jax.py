"""Context-parallel attention for JAX: call inside `shard_map` with the sequence axis (axis 2 of
q, k, v) split over the mesh axis `axis_name` in equal blocks (SPEC.md semantics).

- Span heads with a static bound `max_span`: each device fetches the keys within
  h = ceil(fl(R + max_span)) - 1 positions of its block (before it only, when causal) from its
  neighbours with `lax.ppermute` (static shifts; a halo wider than a block takes several), and
  runs the single-device backend on its queries against that window, which holds every key its
  rows may read: exact for any alpha. Autodiff transposes the ppermutes, so the halo keys' dk/dv
  return to their owners and add up there.
  Whether every head's reach fits the bound is known only from span's value: a `lax.cond` on
  it (span is replicated, so every device takes the same branch) sends the whole call to the
  all-keys path when one head does not fit: never a truncated window.
- Every other call (no span, no bound, or a head beyond it): K and V are gathered over the
  axis (`lax.all_gather`, transposed by autodiff into a reduce-scatter of dk/dv) and each
  device attends its queries to all keys. This moves what a ring moves (every block to every
  device) but holds all keys at once; the ring with an online merge is the torch
  implementation's (attnspec.distributed.torch).

alpha and span enter shard_map replicated (in_specs P()): their gradients are the sums over
every device's queries. jit-compatible: shapes depend only on static arguments.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

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


def _shifted(x, shift, size, axis_name):
    """The value of x on device (index - shift) (zeros where that device does not exist)."""
    if shift > 0:
        perm = [(s, s + shift) for s in range(size - shift)]
    else:
        perm = [(s, s + shift) for s in range(-shift, size)]
    return lax.ppermute(x, axis_name, perm)


def attention(q, k, v, *, axis_name, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None,
              q_offset=None, scale=None, max_span=None, backend=None):
    """This device's block of attention over a sequence split on mesh axis `axis_name`.

    q [B, H, Lb, D], k [B, Hkv, Lb, D], v [B, Hkv, Lb, Dv]: the block (equal on every device).
    key_lengths [B] and q_offset refer to global positions; q_offset must be static (int or
    ints), default 0. max_span: the static halo bound (None: all keys). backend: the
    single-device backend (None: the dispatcher's choice for jax arrays).
    """
    import attnspec

    size = lax.axis_size(axis_name)
    index = lax.axis_index(axis_name)
    B, H, Lb, D = q.shape
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

    def all_keys():
        kf = lax.all_gather(k, axis_name, axis=2, tiled=True)
        vf = lax.all_gather(v, axis_name, axis=2, tiled=True)
        qo = jnp.asarray(offsets, position.dtype) + position
        return attnspec.attention(q, kf, vf, key_lengths=kl, q_offset=qo, **common)

    if span is None or max_span is None:
        return all_keys()
    dtype = _compute_dtype(q.dtype)
    halo = geometry.reach_keys(float(dtype(ramp) + dtype(max_span)))
    need_before = max(0, halo - o_min)
    need_after = max(0, o_max if causal else o_max + halo)
    W = Lb + need_before + need_after
    if W >= L:  # the halo is the whole sequence anyway
        return all_keys()

    def halo_path():
        kv = jnp.concatenate([k, v], -1)
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
        return attnspec.attention(q, window[..., :D], window[..., D:], key_lengths=lengths, q_offset=qo, **common)

    reach = jnp.ceil(jnp.asarray(ramp, dtype) + jnp.asarray(span, dtype)) - 1
    fits = jnp.all(reach <= halo)
    return lax.cond(fits, halo_path, all_keys)
