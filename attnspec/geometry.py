"""Where queries and keys sit, and which keys a query can reach (SPEC.md sections 1, 3 and 5.1).

Pure functions of Python numbers (and NumPy for rounding in a compute dtype); no framework.
Every backend skips keys by these rules: the torch backend calls them, and the JAX and Triton
backends, whose bounds are traced values, mirror them under the same names
(`backends/jax/span.py`, `backends/triton/span.py`). tests/test_geometry.py holds each
backend's window against `key_window` (never narrower: no key with m > 0 is skipped).

Query i of batch b sits at position i + o_b, key j at j, d = i + o_b - j. A span head (span z,
ramp R) gives key j the weight m = clip((z - (|d| - R)) / R, 0, 1), formed in the compute dtype
in that order (SPEC.md 3), so m > 0 exactly when z > fl(|d| - R), which for the usual R (|d| - R
exact) is |d| < R + z exactly: every key such a query reads lies within `reach` of it.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

#: |q_offset| must stay below this (validation enforces it): positions are int64 in every
#: implementation, and i + o - j must not overflow for any Lq, Lk that fits in memory.
MAX_OFFSET = 2**62

#: Backends that hold positions in a narrower integer clamp q_offset and the reach to these,
#: so that i + o - j, and a position plus or minus the reach, cannot overflow. Clamping is
#: exact for causal masks; for a span it is exact unless z + R exceeds the limit minus Lk,
#: which no float32 span can represent to the key anyway (float32's integers end at 2**24).
POSITION_LIMITS = {"int32": 2**29, "int64": 2**60}


def reach(span, ramp: float, dtype: str = "float64") -> int:
    """The smallest integer r with m = 0 wherever |d| >= r, over the heads of `span` (a number
    or a sequence [H]): m > 0 needs z > |d| - R, i.e. |d| < R + z in exact arithmetic (|d| - R is
    exact for the usual R), so r = ceil(R + z), the sum taken exactly (not rounded: fl(R + z)
    may round down onto an integer that a key below R + z reaches). z and R are first cast to
    `dtype`, the compute dtype (precision.compute_dtype), as the mask casts them. Traced
    mirrors may use floor(fl(R + z)) + 1, never smaller."""
    z = float(np.max(np.asarray(span, dtype=dtype)))
    return math.ceil(Fraction(z) + Fraction(float(np.asarray(ramp, dtype=dtype))))


def _extremes(values) -> tuple[int, int]:
    """(smallest, largest) of one int or a sequence of ints. Plain Python: the torch backend
    calls key_window many times per call."""
    if isinstance(values, int):
        return values, values
    if isinstance(values, (tuple, list)):
        return min(values), max(values)
    values = np.asarray(values, dtype=np.int64)
    return int(values.min()), int(values.max())


def key_window(first_row: int, stop_row: int, Lk: int, *, offsets, causal: bool = False,
               reach: int | None = None, key_lengths=None) -> tuple[int, int]:
    """[lo, hi): the keys that query rows first_row .. stop_row - 1 may read, over a batch.

    offsets: q_offset of each batch entry (a sequence, or one int); key_lengths: None or one
    length per entry (or one int); reach: None without a span, else `reach(...)` over the
    heads. Keys outside [lo, hi) have m = 0, lie beyond key_lengths or (causal) after the
    query, for every row and batch entry. 0 <= lo <= hi <= Lk; lo == hi when no key is
    reachable."""
    first_offset, last_offset = _extremes(offsets)
    first = first_row + first_offset  # smallest position among the rows
    last = stop_row - 1 + last_offset  # largest
    lo, hi = 0, Lk
    if key_lengths is not None:
        hi = min(hi, _extremes(key_lengths)[1])
    if causal:  # j <= position
        hi = min(hi, last + 1)
    if reach is not None:  # |position - j| < reach
        lo = max(lo, first - reach + 1)
        hi = min(hi, last + reach)
    lo = min(max(lo, 0), Lk)
    return lo, max(lo, min(hi, Lk))


def query_window(first_key: int, stop_key: int, Lq: int, *, offset: int, causal: bool = False,
                 reach: int | None = None) -> tuple[int, int]:
    """[lo, hi): the query rows of one batch entry (q_offset `offset`) that may read some key of
    first_key .. stop_key - 1; the transpose of `key_window`, for kernels that walk keys in the
    outer loop. 0 <= lo <= hi <= Lq."""
    lo, hi = 0, Lq
    if causal:  # position i + offset >= first_key
        lo = max(lo, first_key - offset)
    if reach is not None:  # |i + offset - j| < reach for some j in the range
        lo = max(lo, first_key - reach + 1 - offset)
        hi = min(hi, stop_key - 1 + reach - offset)
    lo = min(max(lo, 0), Lq)
    return lo, max(lo, min(hi, Lq))


__all__ = ["MAX_OFFSET", "POSITION_LIMITS", "key_window", "query_window", "reach"]
