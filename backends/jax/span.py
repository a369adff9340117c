"""The soft span mask in JAX (SPEC.md section 3): m = clip((z - (|d| - R)) / R, 0, 1) in the
compute dtype, in exactly that order (no cancellation near the outer kink); dm/dz = 1/R where the computed m is strictly inside
(0, 1). The gradient is written by hand (`mask_slope`), never taken by autodiff through clip
(frameworks disagree at the kinks)."""

from __future__ import annotations

import jax.numpy as jnp


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


def reach(span, ramp, dtype):
    """The largest fl(R + z) over heads: m > 0 needs |d| < R + z exactly (rounding is
    monotone, SPEC.md section 3), hence |d| <= fl(R + z) for every key with m > 0."""
    return jnp.max(ramp + span.astype(dtype))
