"""SPEC.md's elementwise formulas, written once against an array namespace.

`xp` is the module whose functions the arrays take: numpy (the reference), jax.numpy or torch
(the backends). Each uses only abs, where, zeros_like, log1p and inf, which the three share,
so every implementation evaluates the same operations in the same order; nothing here imports
a framework. The Triton kernels cannot call Python functions: backends/triton/entmax.py writes
the same formulas out (tests/test_geometry.py holds its constants equal to these).
"""

from __future__ import annotations

from .precision import PSI_SERIES, psi_series_coefficients


def log_ratio(t, eps, xp):
    """log(p/m) = log1p(eps t)/eps in the parametrisation of SPEC.md 2.2 (t where eps = 0);
    -inf where eps t <= -1 (outside the support, and where t = -inf)."""
    x = eps * t
    inside = x > -1
    value = xp.log1p(xp.where(inside, x, 0.0)) / xp.where(eps > 0, eps, 1.0)
    value = xp.where(eps > 0, value, t)
    return xp.where(inside | (eps == 0), value, -xp.inf)


def psi(t, eps, xp, dtype: str):
    """psi(eps, t) = d/d eps [log1p(eps t)/eps] = [eps t/(1 + eps t) - log1p(eps t)]/eps^2
    (SPEC.md 4.3), in the compute dtype `dtype`. Where |eps t| is below PSI_SERIES[dtype]'s
    threshold the closed form cancels catastrophically, so the series
    t^2 sum_{k>=2} (-1)^(k+1) (k-1)/k (eps t)^(k-2) is used there; its first term, -t^2/2,
    is the alpha = 1 limit."""
    threshold, terms = PSI_SERIES[dtype]
    x = eps * t
    small = xp.abs(x) < threshold
    xs = xp.where(small, x, 0.0)
    series = xp.zeros_like(x)
    for coefficient in psi_series_coefficients(terms):  # Horner, highest power first
        series = series * xs + coefficient
    series = series * t * t
    safe = xp.where(eps > 0, eps, 1.0)  # eps = 0 only where x = 0: the series' side
    xd = xp.where(small, 0.0, x)
    direct = (xd / (1 + xd) - xp.log1p(xd)) / (safe * safe)
    return xp.where(small, series, direct)


__all__ = ["log_ratio", "psi"]
