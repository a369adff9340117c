"""Where each shard's queries and keys sit, and which keys each shard must see: pure Python,
shared by the torch and JAX implementations.

A sequence of L positions is split into contiguous blocks, one per rank (rank r holds positions
starts[r] .. starts[r] + lengths[r] - 1, for its queries and its keys alike). Query i (global)
sits at i + o_b, key j at j, d = i + o_b - j (SPEC.md section 1).

A span head reads key j only where m > 0, i.e. |d| < attnspec.geometry.reach(z, R) (SPEC.md
section 3, in the compute dtype): at most reach - 1 keys away. A shard's queries therefore need
a halo of that many keys on each side (causal: before them only) beyond their own positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .. import geometry as spec_geometry


@dataclass(frozen=True)
class Layout:
    """Contiguous shards: lengths[r] positions on rank r, starting at starts[r]."""

    lengths: tuple

    def __post_init__(self):
        for r, n in enumerate(self.lengths):
            if int(n) != n or n < 1:
                raise ValueError(f"every rank must hold at least one position; rank {r} holds {n}")

    @property
    def starts(self) -> tuple:
        out, s = [], 0
        for n in self.lengths:
            out.append(s)
            s += n
        return tuple(out)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def size(self) -> int:
        return len(self.lengths)

    def bounds(self, rank: int) -> tuple:
        start = self.starts[rank]
        return start, start + self.lengths[rank]


def reach_keys(span, ramp: float, dtype: str) -> int:
    """The largest |d| a head of span z may read (0 when only d = 0 is readable): the spec's
    reach (attnspec.geometry.reach, z and R in the compute dtype `dtype`) minus one."""
    if not math.isfinite(float(span)) or not math.isfinite(float(ramp)) or float(ramp) <= 0:
        raise ValueError(f"span and ramp must be finite (ramp > 0); got span={span}, ramp={ramp}")
    return max(0, spec_geometry.reach(span, ramp, dtype) - 1)


def window(layout: Layout, rank: int, halo: int, causal: bool, offset_min: int, offset_max: int) -> tuple:
    """[a, b): the keys rank's queries may read within `halo` keys of distance, over every
    batch's offset in [offset_min, offset_max] (clipped to the sequence; may be empty)."""
    start, end = layout.bounds(rank)
    first, last = start + offset_min, end - 1 + offset_max
    a = max(0, first - halo)
    b = min(layout.total, last + 1 if causal else last + halo + 1)
    if b <= a:
        return a, a
    return a, b


@dataclass(frozen=True)
class Piece:
    """Keys [lo, hi) (global positions) owned by `owner`, read by `reader`."""

    owner: int
    reader: int
    lo: int
    hi: int


def exchange(layout: Layout, windows: list) -> list:
    """Every (owner, reader, [lo, hi)) whose keys a reader's window takes from an owner,
    owner == reader included (a local copy)."""
    pieces = []
    for reader, (a, b) in enumerate(windows):
        for owner in range(layout.size):
            s, e = layout.bounds(owner)
            lo, hi = max(a, s), min(b, e)
            if hi > lo:
                pieces.append(Piece(owner, reader, lo, hi))
    return pieces


def ring_blocks_needed(layout: Layout, reader: int, owner: int, causal: bool, offset_max: int,
                       max_length: int | None) -> bool:
    """Whether any query of `reader` may read a key of `owner`'s block (causal and key_lengths
    bounds only; span and the entmax decide the rest exactly)."""
    start, end = layout.bounds(reader)
    k0, _ = layout.bounds(owner)
    if causal and k0 > end - 1 + offset_max:
        return False
    if max_length is not None and k0 >= max_length:
        return False
    return True
