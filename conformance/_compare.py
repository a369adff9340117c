"""Assertion helpers shared by the per-op checks: one failure type, messages that say which
element is off, by how much, against what tolerance."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np


class ConformanceError(AssertionError):
    """A backend disagreed with SPEC.md: raised by `attnspec.conformance.replay` (and by the
    checks themselves). `check` names what was checked ('forward', 'dq', 'masked keys', ...)."""

    def __init__(self, check: str, message: str):
        self.check = check
        super().__init__(f"[{check}] {message}")


#: The name the checks have always used.
CheckFailed = ConformanceError


class Refused(Exception):
    """The kernel refused a drawn example through its own checks (`Kernel.extra_reasons`),
    beyond what its Capabilities declare: the example is rejected and drawn again."""

    def __init__(self, reasons):
        self.reasons = list(reasons)
        super().__init__("; ".join(self.reasons))


@dataclass
class Context:
    """What a check needs: the backend under test and how to reach it, plus counters.

    gradient_names: the inputs whose gradients the kernel provides (Kernel.gradients), the
    only ones differentiated and checked; `checked` collects those that were compared."""

    backend: str
    kernel: object
    framework: object
    dtype: str
    device: str
    gradients: bool = True  # check gradients (the backend has a way to differentiate)
    gradient_names: frozenset = frozenset()
    checked: set = field(default_factory=set)
    refusals: dict = field(default_factory=dict)  # reason -> count
    counters: dict = field(default_factory=lambda: {"examples": 0, "gradient_checks": 0, "gradient_skips": 0,
                                                    "refused": 0, "large": 0})

    def admit(self, call) -> None:
        """Raise Refused if the kernel refuses this call through its own extra checks, and
        CheckFailed if its declared capabilities exclude it (the suite drew outside them)."""
        reasons = self.kernel.not_supported_reasons(call)
        if not reasons:
            return
        if self.kernel.capabilities.reasons(call):
            raise CheckFailed("drawn outside the declaration",
                              "the suite drew a call the kernel's Capabilities exclude: " + "; ".join(reasons))
        raise Refused(reasons)


#: While `recording_margins` is active: the largest |diff| / tolerance seen per (check, name).
_margins: dict | None = None
#: While `checking_nan_only` is active: only NaN where the reference has a number fails.
_nan_only = False


@contextlib.contextmanager
def checking_nan_only():
    """Inside the block, assert_close fails only for NaN where a number is expected: a pass that
    finds a kernel's NaN even where its accuracy fails first (a failing example shrinks to the
    simplest failure, which may be a small inaccuracy rather than the NaN)."""
    global _nan_only
    previous, _nan_only = _nan_only, True
    try:
        yield
    finally:
        _nan_only = previous


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


def assert_close(check: str, name: str, actual, expected, atol: float, nan_where=None) -> None:
    """|actual - expected| <= atol elementwise, same shape, no NaN where a number is expected.

    nan_where: where NaN on both sides counts as agreement, i.e. where the reference itself has
    NaN. By default where `expected` is NaN (right when expected is the reference's); a check
    comparing a backend with itself passes the reference's NaN (e.g. `no_nan` for finite
    inputs), so that NaN in both of its outputs is not mistaken for agreement."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise CheckFailed(check, f"{name}.shape={actual.shape}, but should be {expected.shape}")
    if actual.size == 0:
        return
    with np.errstate(invalid="ignore"):
        diff = np.abs(actual - expected)
    atol = np.broadcast_to(np.asarray(np.inf if _nan_only else atol, dtype=np.float64), diff.shape)
    if _margins is not None:
        finite = np.isfinite(diff)
        if finite.any():
            with np.errstate(divide="ignore", invalid="ignore"):
                ratios = np.where(diff[finite] == 0, 0.0, diff[finite] / atol[finite])
            _margins[(check, name)] = max(_margins.get((check, name), 0.0), float(ratios.max()))
    bad = ~(diff <= atol)  # NaN counts as bad
    if nan_where is None:
        nan_where = np.isnan(expected)
    bad &= ~(np.asarray(nan_where, dtype=bool) & np.isnan(actual) & np.isnan(expected))
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
