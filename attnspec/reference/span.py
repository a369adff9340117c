"""The soft span mask of SPEC.md section 3, and where queries and keys sit.

Query i of batch b sits at position i + o_b, key j at j; their distance is d_ij = i + o_b - j.
The mask of a head with span z and ramp R is m_ij = clip((z - (|d_ij| - R)) / R, 0, 1), computed
in exactly that order (SPEC.md section 3 says why: no cancellation near the outer kink); dm/dz =
1/R where the computed m is strictly inside (0, 1), else 0.
"""

from __future__ import annotations

import numpy as np

from .. import validation


def distances(Lq: int, Lk: int, q_offset) -> np.ndarray:
    """d_ij = i + o - j as int64: [Lq, Lk] for a scalar offset, [B, Lq, Lk] for offsets [B]."""
    offset = np.asarray(q_offset, dtype=np.int64)
    rows = np.arange(Lq, dtype=np.int64)[:, None] - np.arange(Lk, dtype=np.int64)[None, :]
    return offset[..., None, None] + rows


def soft_mask(d: np.ndarray, span: np.ndarray, ramp: float) -> np.ndarray:
    """m = clip((z - (|d| - R)) / R, 0, 1) in float64, in that order; span broadcasts against d's
    leading axes. For z and R of a lower precision every step but the division is exact here."""
    z = np.asarray(span, dtype=np.float64)[..., None, None]
    R = np.float64(ramp)
    return np.clip((z - (np.abs(d) - R)) / R, 0.0, 1.0)


def mask_slope(m: np.ndarray, ramp: float) -> np.ndarray:
    """dm/dz: 1/R where 0 < m < 1 as computed, 0 elsewhere (one-sided at both kinks)."""
    return np.where((m > 0.0) & (m < 1.0), 1.0 / np.float64(ramp), 0.0)


def _mask_of(Lq, Lk, span, ramp, q_offset):
    validation.validate_span_mask(Lq, Lk, span, ramp, q_offset=q_offset)
    offset = Lk - Lq if q_offset is None else q_offset
    d = distances(Lq, Lk, offset)  # [Lq, Lk] or [B, Lq, Lk]
    z = np.asarray(span, dtype=np.float64)
    # Put span's head axis between the batch axis and the [Lq, Lk] axes.
    d = d.reshape(d.shape[:-2] + (1,) * z.ndim + d.shape[-2:])
    return soft_mask(d, z, ramp)


def span_mask(Lq, Lk, span, ramp, q_offset=None):
    """The soft span mask, shape [*B, *H, Lq, Lk] (B present when q_offset is an array, H when
    span is), float64. q_offset defaults to Lk - Lq (bottom-right alignment)."""
    return _mask_of(Lq, Lk, span, ramp, q_offset)


def span_mask_vjp(Lq, Lk, span, ramp, grad, q_offset=None):
    """dL/dspan for the upstream gradient `grad` (span_mask's shape), with span's shape."""
    m = _mask_of(Lq, Lk, span, ramp, q_offset)
    dm = np.asarray(grad, dtype=np.float64) * mask_slope(m, ramp)
    z = np.asarray(span)
    dspan = dm.sum(axis=(-2, -1))
    if dspan.ndim > z.ndim:
        dspan = dspan.sum(axis=0)
    dtype = z.dtype if z.dtype.kind == "f" else np.float64
    return dspan.reshape(z.shape).astype(dtype, copy=False)
