"""The soft span mask (SPEC.md section 3) and the key / query windows a tile can reach, as
Triton device functions.

m = clip((z - (|d| - R)) / R, 0, 1) in float32, in that order (no cancellation near the outer
kink; the division correctly rounded, as the reference's); dm/dz = 1/R strictly inside (0, 1). Positions are int32: the launch code
clamps q_offset to +-2^29 and the reach R + z to 2^29, far beyond any context length, so that
no sum below overflows.
"""

from __future__ import annotations

import triton.language as tl

from ._jit import device_function

#: Largest |q_offset| and span reach the kernels represent (int32 sums stay below 2^31).
POSITION_LIMIT = 1 << 29


@device_function
def reach(z, ramp):
    """An int32 r with m = 0 for every |d| >= r: m > 0 needs |d| < R + z exactly (rounding is
    monotone), so |d| <= fl(R + z) and r = floor(fl(R + z)) + 1."""
    return tl.minimum(ramp + z, 536870912.0).to(tl.int32) + 1


@device_function
def key_window(first_pos, last_pos, kv_len, z, ramp, HAS_SPAN: tl.constexpr, CAUSAL: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """[lo, hi): the keys that query positions first_pos..last_pos may read (lo a multiple of
    BLOCK_N so that key tiles keep fixed indices). The block masks decide exactly."""
    lo = first_pos * 0
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(hi, last_pos + 1)
    if HAS_SPAN:
        r = reach(z, ramp)
        lo = tl.maximum(lo, first_pos - r)
        if not CAUSAL:
            hi = tl.minimum(hi, last_pos + r + 1)
    lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@device_function
def query_window(first_key, last_key, offset, Lq, z, ramp, HAS_SPAN: tl.constexpr, CAUSAL: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """[lo, hi): the query rows that may read keys first_key..last_key (lo a multiple of BLOCK_M)."""
    lo = offset * 0
    hi = Lq + lo
    if CAUSAL:  # position i + offset >= first_key
        lo = tl.maximum(lo, first_key - offset)
    if HAS_SPAN:
        r = reach(z, ramp)
        lo = tl.maximum(lo, first_key - r - offset)
        hi = tl.minimum(hi, last_key + r + 1 - offset)
    lo = (lo // BLOCK_M) * BLOCK_M
    return lo, hi


@device_function
def mask_block(offs_m, offs_n, offset, kv_len, Lq, z, ramp, HAS_SPAN: tl.constexpr, CAUSAL: tl.constexpr):
    """(m, allowed) of rows offs_m [M] against keys offs_n [N]: m in [0, 1] (0 where not allowed)."""
    d = (offs_m + offset)[:, None] - offs_n[None, :]
    allowed = (offs_m < Lq)[:, None] & (offs_n < kv_len)[None, :]
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
