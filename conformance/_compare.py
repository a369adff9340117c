"""Assertion helpers shared by the per-op checks: one failure type, messages that say which
element is off, by how much, against what tolerance."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np


class CheckFailed(AssertionError):
    """A backend disagreed with the spec. `check` names what was checked ('forward', 'dq', ...)."""

    def __init__(self, check: str, message: str):
        self.check = check
        super().__init__(f"[{check}] {message}")


@dataclass
class Context:
    """What a check needs: the backend under test and how to reach it, plus counters."""

    backend: str
    kernel: object
    framework: object
    dtype: str
    device: str
    gradients: bool = True  # check gradients (the backend has a way to differentiate)
    counters: dict = field(default_factory=lambda: {"examples": 0, "gradient_checks": 0, "gradient_skips": 0})


#: While `recording_margins` is active: the largest |diff| / tolerance seen per (check, name).
_margins: dict | None = None


@contextlib.contextmanager
def recording_margins():
    """Collect, per (check, name), the largest ratio of an error to its tolerance that passed or
    failed inside the block (1.0 is the edge): how close correct backends come to the bounds."""
    global _margins
    previous, _margins = _margins, {}
    try:
        yield _margins
    finally:
        _margins = previous


def assert_close(check: str, name: str, actual, expected, atol: float) -> None:
    """|actual - expected| <= atol elementwise, same shape, no NaN where a number is expected."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise CheckFailed(check, f"{name}.shape={actual.shape}, but should be {expected.shape}")
    if actual.size == 0:
        return
    with np.errstate(invalid="ignore"):
        diff = np.abs(actual - expected)
    atol = np.broadcast_to(np.asarray(atol, dtype=np.float64), diff.shape)  # a number, or per element
    if _margins is not None:
        finite = np.isfinite(diff)
        if finite.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = np.where(diff[finite] == 0, 0.0, diff[finite] / atol[finite])
            _margins[(check, name)] = max(_margins.get((check, name), 0.0), float(ratios.max()))
    bad = ~(diff <= atol)  # NaN counts as bad
    bad &= ~(np.isnan(expected) & np.isnan(actual))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        worst = np.nanmax(np.where(bad, diff, -np.inf)) if np.isfinite(diff[bad]).any() else np.nan
        raise CheckFailed(
            check,
            f"{name}[{', '.join(map(str, idx))}]={actual[idx]!r}, but should be {expected[idx]!r} "
            f"(|diff| {diff[idx]:.3g}, tolerance there {atol[idx]:.3g}; |diff| up to {worst:.3g}; "
            f"{int(bad.sum())} of {bad.size} elements off)",
        )


def assert_zero(check: str, name: str, actual, where) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    bad = where & ~(actual == 0)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise CheckFailed(check, f"{name}[{', '.join(map(str, idx))}]={actual[idx]!r}, but should be exactly 0")
