"""The soft span mask in JAX (SPEC.md section 3): m = clip((z - (|d| - R)) / R, 0, 1) in the
compute dtype, in exactly that order (no cancellation near the outer kink); dm/dz = 1/R where the computed m is strictly inside
(0, 1). The gradient is written by hand (`mask_slope`), never taken by autodiff through clip
(frameworks disagree at the kinks)."""

from __future__ import annotations

from functools import partial
from numbers import Integral

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnspec import geometry


def position_dtype():
    """Positions (i + q_offset) are int32 unless jax_enable_x64 is on; offsets are clamped to
    geometry.POSITION_LIMITS for that integer dtype."""
    return jnp.int64 if jax.config.jax_enable_x64 else jnp.int32


def distances(rows, keys, positions):
    """d = position of the row - key index: rows [T] and keys [W] are indices, positions [B]
    the batch's q_offset; returns [B, T, W] in the positions' integer dtype."""
    return (positions[:, None, None] + rows[None, :, None]) - keys[None, None, :]


def soft_mask(d, span, ramp, dtype):
    """d [B, T, W] integers, span [Hkv, G] (heads), ramp a scalar -> m [B, Hkv, G, T, W]."""
    z = span.astype(dtype)[None, :, :, None, None]
    absd = jnp.abs(d).astype(dtype)[:, None, None]
    return jnp.clip((z - (absd - ramp)) / ramp, 0.0, 1.0)


def mask_slope(m, ramp):
    """dm/dz: 1/R strictly inside (0, 1), else 0 (one-sided at both kinks)."""
    return jnp.where((m > 0) & (m < 1), 1.0 / ramp, 0.0).astype(m.dtype)


def ramp_slope(m, ramp):
    """dm/dR = (1 - m)/R strictly inside (0, 1), else 0: m = (z - (|d| - R))/R = 1 + (z - |d|)/R."""
    return jnp.where((m > 0) & (m < 1), (1 - m) / ramp, 0.0).astype(m.dtype)


def reach(span, ramp, dtype, limit):
    """attnspec.geometry.reach, traced: the ceiling of the exact R + max_h z_h. fl(R + z) and its
    rounding error e (Knuth's two-sum: fl(R + z) + e = R + z exactly) give it: ceil(fl(R + z)),
    plus one where fl(R + z) is an integer that rounding brought down onto (e > 0). Clamped to
    `limit` (geometry.POSITION_LIMITS) and returned in `dtype`, the positions' integer dtype."""
    z = jnp.max(span.astype(ramp.dtype))
    total = ramp + z
    back = total - ramp
    error = (ramp - (total - back)) + (z - back)
    total = jnp.clip(total, 0, limit)
    up = jnp.ceil(total)
    return (up + jnp.where((up == total) & (error > 0), 1, 0)).astype(dtype)


def key_window(first_row, stop_row, Lk, positions, causal, reach, lengths):
    """attnspec.geometry.key_window, traced, with the same formula: [lo, hi) holding every key
    that rows first_row .. stop_row - 1 of any batch entry may read. positions [B] (q_offset),
    lengths [B] (key_lengths, Lk where absent), causal a traced bool, reach None without span."""
    first = first_row + jnp.min(positions)  # smallest position among the rows
    last = stop_row - 1 + jnp.max(positions)  # largest
    lo = jnp.zeros((), positions.dtype)
    hi = jnp.minimum(Lk, jnp.max(lengths))
    hi = jnp.where(causal, jnp.minimum(hi, last + 1), hi)  # j <= position
    if reach is not None:  # |position - j| < reach
        lo = jnp.maximum(lo, first - reach + 1)
        hi = jnp.minimum(hi, last + reach)
    lo = jnp.clip(lo, 0, Lk)
    return lo, jnp.clip(hi, lo, Lk)


# ----------------------------------------------------------------------------------------------
# The stand-alone op: attnspec.span_mask(Lq, Lk, span, ramp, q_offset) for jax arrays.


def span_mask(Lq, Lk, span, ramp, q_offset=None):
    """The soft span mask for a jax `span` (scalar or [H]), shape [*B, *H, Lq, Lk] (B when
    q_offset is an array [B]), in span's dtype; differentiable in span and ramp (jit, vmap,
    grad). The value is the clip above exactly; its derivatives are the hand-written slopes
    (one-sided at the kinks, SPEC.md 3), joined by stop_gradient so that no autodiff passes
    through clip. Arguments are validated by the dispatcher."""
    return _span_mask_program(span, ramp, host_offsets(Lk - Lq if q_offset is None else q_offset), Lq=Lq, Lk=Lk)


def host_offsets(q_offset):
    """q_offset clamped to the positions' range (geometry.POSITION_LIMITS) while still a Python
    int or a NumPy array: past int32, jax would wrap it on the way in. A jax array (or None)
    passes unchanged; the programs clamp it."""
    limit = geometry.POSITION_LIMITS[jnp.dtype(position_dtype()).name]
    if isinstance(q_offset, Integral):
        return np.asarray(max(-limit, min(limit, int(q_offset))))
    if isinstance(q_offset, np.ndarray):
        return np.clip(q_offset.astype(np.int64), -limit, limit)
    return q_offset


@partial(jax.jit, static_argnames=("Lq", "Lk"))
def _span_mask_program(span, ramp, q_offset, *, Lq, Lk):
    """One compiled program per call signature (eagerly, each small op would be compiled on
    its own)."""
    span = jnp.asarray(span)
    dtype = span.dtype if jnp.issubdtype(span.dtype, jnp.floating) else jnp.result_type(float)
    z = span.astype(dtype)
    pdt = position_dtype()
    limit = geometry.POSITION_LIMITS[jnp.dtype(pdt).name]
    offsets = jnp.clip(jnp.asarray(q_offset).astype(pdt), -limit, limit)
    d = (offsets[..., None, None] + jnp.arange(Lq, dtype=pdt)[:, None]) - jnp.arange(Lk, dtype=pdt)[None, :]
    d = d.reshape(d.shape[:-2] + (1,) * z.ndim + d.shape[-2:])  # the head axis before [Lq, Lk]
    z = z.reshape(z.shape + (1, 1))
    R = jnp.asarray(ramp).astype(dtype)
    m = jnp.clip((z - (jnp.abs(d).astype(dtype) - R)) / R, 0.0, 1.0)  # SPEC.md 3's order
    m = lax.stop_gradient(m)
    dz = z - lax.stop_gradient(z)  # 0 in value, the identity for derivatives
    dR = R - lax.stop_gradient(R)
    return m + dz * mask_slope(m, R) + dR * ramp_slope(m, R)
