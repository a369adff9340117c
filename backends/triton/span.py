"""The soft span mask (SPEC.md section 3) and the key / query windows a tile can reach, as
Triton device functions.

m = clip((z - (|d| - R)) / R, 0, 1) in float32, in that order (no cancellation near the outer
kink; the division correctly rounded, as the reference's); dm/dz = 1/R strictly inside (0, 1).
`reach`, `key_window` and `query_window` are attnspec.geometry's functions of the same names,
with the same formulas, on the kernels' int32 positions. The launch code clamps q_offset to
+-POSITION_LIMIT and `reach` clamps R + z to it, far beyond any context length, so that no sum
below overflows.
"""

from __future__ import annotations

import triton.language as tl

from attnspec import geometry

from ._jit import device_function

#: Largest |q_offset| and span reach the kernels represent (int32 sums stay below 2^31).
POSITION_LIMIT = geometry.POSITION_LIMITS["int32"]


@device_function
def reach(z, ramp):
    """geometry.reach as an int32: the ceiling of the exact R + z (m > 0 needs |d| < R + z
    exactly). fl(R + z) and its rounding error e (two-sum: fl(R + z) + e = R + z) give it:
    ceil(fl(R + z)), plus one where fl(R + z) is an integer that rounding brought down onto
    (e > 0). R + z is clamped to POSITION_LIMIT (2^29, the literal)."""
    total = ramp + z
    back = total - ramp
    error = (ramp - (total - back)) + (z - back)
    total = tl.minimum(total, 536870912.0)
    r = total.to(tl.int32)  # floor: total >= 0
    r = r + (r.to(tl.float32) < total).to(tl.int32)  # ceil
    return r + ((r.to(tl.float32) == total) & (error > 0)).to(tl.int32)


@device_function
def key_window(first_row, stop_row, offset, kv_len, z, ramp, HAS_SPAN: tl.constexpr, CAUSAL: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """geometry.key_window for rows first_row .. stop_row - 1 of one batch entry: [lo, hi), lo
    rounded down to a multiple of BLOCK_N so that key tiles keep fixed indices. The block
    masks decide exactly."""
    first = first_row + offset  # position of the first row
    last = stop_row - 1 + offset  # of the last
    lo = first * 0
    hi = kv_len + lo
    if CAUSAL:  # j <= position
        hi = tl.minimum(hi, last + 1)
    if HAS_SPAN:  # |position - j| < reach
        r = reach(z, ramp)
        lo = tl.maximum(lo, first - r + 1)
        hi = tl.minimum(hi, last + r)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@device_function
def query_window(first_key, stop_key, offset, Lq, z, ramp, HAS_SPAN: tl.constexpr, CAUSAL: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """geometry.query_window: [lo, hi), the query rows that may read keys first_key ..
    stop_key - 1 (lo rounded down to a multiple of BLOCK_M)."""
    lo = offset * 0
    hi = Lq + lo
    if CAUSAL:  # position i + offset >= first_key
        lo = tl.maximum(lo, first_key - offset)
    if HAS_SPAN:  # |i + offset - j| < reach for some key j of the range
        r = reach(z, ramp)
        lo = tl.maximum(lo, first_key - r + 1 - offset)
        hi = tl.minimum(hi, stop_key - 1 + r - offset)
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


@device_function
def mask_block(offs_m, offs_n, offset, readable, Lq, z, ramp, HAS_SPAN: tl.constexpr, CAUSAL: tl.constexpr):
    """(m, allowed) of rows offs_m [M] against keys offs_n [N]: m in [0, 1] (0 where not allowed).
    readable [N]: which keys exist for the batch entry (j < key_lengths and key_padding_mask)."""
    d = (offs_m + offset)[:, None] - offs_n[None, :]
    allowed = (offs_m < Lq)[:, None] & readable[None, :]
    if CAUSAL:
        allowed = allowed & (d >= 0)
    if HAS_SPAN:
        dist = tl.abs(d).to(tl.float32)
        m = tl.math.div_rn(z - (dist - ramp), dist * 0.0 + ramp)
        m = tl.minimum(tl.maximum(m, 0.0), 1.0)
        allowed = allowed & (m > 0.0)
        m = tl.where(allowed, m, 0.0)
    else:
        m = tl.where(allowed, 1.0, 0.0)
    return m, allowed


@device_function
def slope(m, ramp):
    """dm/dz: 1/R where m is strictly inside (0, 1), else 0 (one-sided at the kinks)."""
    return tl.where((m > 0.0) & (m < 1.0), 1.0 / ramp, 0.0)
