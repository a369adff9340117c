"""Weighted alpha-entmax pieces as Triton device functions (SPEC.md sections 2 and 4).

Everything works in the parametrisation of SPEC.md 2.2: for a row normaliser c,
t = s - c, u = 1 + eps t, p = m exp(log1p(eps t) / eps) (p = m exp(t) at eps = 0). The kernels
in attention.py stream over key tiles and call these on [BLOCK_M, BLOCK_N] blocks; the row
solve itself (a safeguarded Halley iteration, one pass over the key tiles per step) lives in
the forward kernel, and `halley_update` is its per-row arithmetic.

LIBDEVICE (constexpr) picks accurate libdevice functions on a GPU. Near alpha = 1 the log of
u = 1 + eps t must be accurate relative to eps t, which a fast approximate log is not. The
Triton interpreter has no libdevice; there `log1p` uses Kahan's exact correction of a
correctly rounded log (NumPy's), which is as accurate.
"""

from __future__ import annotations

import triton.language as tl

from ._jit import device_function

try:  # the backend-neutral dispatcher (CUDA or HIP) of recent Triton versions
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the triton version / build
    try:
        from triton.language.extra.cuda import libdevice
    except ImportError:
        libdevice = None  # then only the interpreter (LIBDEVICE=False) can run


@device_function
def log1p(x, LIBDEVICE: tl.constexpr):
    """log(1 + x) to a few ulps for x > -1, also for |x| far below float32's epsilon."""
    if LIBDEVICE:
        y = libdevice.log1p(x)
    else:
        u = 1.0 + x
        d = u - 1.0
        # log(u) is correctly rounded; x / d corrects for the rounding of 1 + x (Kahan).
        y = tl.where(d == 0.0, x, tl.log(u) * (x / tl.where(d == 0.0, 1.0, d)))
    return y


@device_function
def expm1(x, LIBDEVICE: tl.constexpr):
    """exp(x) - 1 without cancellation for small |x| (Kahan's trick without libdevice)."""
    if LIBDEVICE:
        y = libdevice.expm1(x)
    else:
        e = tl.exp(x)
        d = e - 1.0
        ln = tl.log(tl.where(d == 0.0, 2.0, e))
        y = tl.where(d == 0.0, x, tl.where(e == 0.0, -1.0, d * (x / tl.where(d == 0.0, 1.0, ln))))
    return y


@device_function
def log_ratio(t, eps, LIBDEVICE: tl.constexpr):
    """(log(p/m), inside): log1p(eps t)/eps (t at eps = 0) and whether u = 1 + eps t > 0.
    eps is a scalar (one head per program)."""
    x = eps * t
    inside = x > -1.0
    safe = tl.where(eps > 0.0, eps, 1.0)
    lr = log1p(tl.where(inside, x, 0.0), LIBDEVICE) / safe
    lr = tl.where(eps > 0.0, lr, t)
    return lr, inside


@device_function
def probabilities(s, top, c, m, allowed, eps, LIBDEVICE: tl.constexpr):
    """(p, p/m, u, t) of a [M, N] block for rows [M] with normaliser top + c: t = (s - top) - c.
    top is the row's largest score (SPEC.md 2.3: shifted scores), so that c stays O(log n) and
    float32 resolves it finely. p = 0 off the allowed set and where u <= 0 (so that an entry
    with eps s - tau = 0 at alpha = 2 is outside the support)."""
    t = tl.where(allowed, (s - top[:, None]) - c[:, None], 0.0)
    lr, inside = log_ratio(t, eps, LIBDEVICE)
    ok = allowed & inside
    ratio = tl.where(ok, tl.exp(lr), 0.0)
    p = m * ratio
    u = tl.where(ok, 1.0 + eps * t, 1.0)
    return p, ratio, u, t


@device_function
def psi(t, eps):
    """d/d eps of log1p(eps t)/eps: its series t^2 sum_k (-1)^(k+1) (k-1)/k x^(k-2), x = eps t,
    below |x| < 0.3 (16 terms, error ~2 * 0.3^16 ~ 1e-8), the closed form [x/(1+x) - log1p(x)]/eps^2
    above (error ~4 * 2^-23 / 0.3 ~ 2e-6; SPEC.md 4.3). There x is far from 0, so tl.log(1 + x)
    is accurate enough for log1p(x)."""
    x = eps * t
    # The switch and the coefficients are attnspec.precision's PSI_SERIES["float32"] and
    # psi_series_coefficients(16), written out as literals (a kernel reads no Python globals);
    # tests/test_geometry.py holds them equal.
    small = tl.abs(x) < 0.3
    xs = tl.where(small, x, 0.0)
    # Horner, coefficients (-1)^(k+1) (k-1)/k for k = 17 down to 2.
    series = x * 0.0 + (0.9411764705882353)
    series = series * xs + (-0.9375)
    series = series * xs + (0.9333333333333333)
    series = series * xs + (-0.9285714285714286)
    series = series * xs + (0.9230769230769231)
    series = series * xs + (-0.9166666666666666)
    series = series * xs + (0.9090909090909091)
    series = series * xs + (-0.9)
    series = series * xs + (0.8888888888888888)
    series = series * xs + (-0.875)
    series = series * xs + (0.8571428571428571)
    series = series * xs + (-0.8333333333333334)
    series = series * xs + (0.8)
    series = series * xs + (-0.75)
    series = series * xs + (0.6666666666666666)
    series = series * xs + (-0.5)
    series = series * t * t
    safe = tl.where(eps > 0.0, eps, 1.0)
    xd = tl.where(small | (x <= -1.0), 0.5, x)  # x <= -1: outside the support, p = 0
    direct = (xd / (1.0 + xd) - tl.log(1.0 + xd)) / (safe * safe)
    return tl.where(small, series, direct)


@device_function
def halley_update(c, lo, hi, h_old, f0, f1, f2, eps, active, H_TOL: tl.constexpr, C_TOL: tl.constexpr,
                  LIBDEVICE: tl.constexpr):
    """One safeguarded Halley step on h(c) = log sum_j p_j(c) for rows [M], from the sums of one
    pass at c: f0 = sum p, f1 = sum p/u = -df0/dc, f2 = sum p/u^2 (d2f0/dc2 = (1 - eps) f2).

    The bracket [lo, hi] shrinks with the sign of h. The Halley step is taken when it stays in
    the bracket and the previous step at least halved |h|. Otherwise, left of the root (h > 0),
    the Newton step on F(c) = (f0^eps - 1)/eps is taken: F is convex in c (f0^eps is the
    1/eps-norm of the vector m_j^eps [u_j]_+, whose entries are convex in c), so that step never
    passes the root, and it is exact for equal scores and, on a fixed support, at alpha = 2.
    Halley on h overshoots exactly there: near the root h steepens towards its pole (u -> 0),
    and bisection alone then took ~16 passes for near-uniform rows (a row of equal scores has
    its root at c_hi). Right of the root the bracket is bisected. A row is done when
    |h| <= H_TOL (sum p = 1 to float32 accuracy), when the step is below C_TOL (1 + |c|) (both
    still take the step), or when the bracket has closed to that width. Returns
    (c, lo, hi, |h|, still active)."""
    positive = f0 > 0.0
    f0_safe = tl.where(positive, f0, 1.0)
    h = tl.where(positive, tl.log(f0_safe), float("-inf"))  # every p underflowed: c is too large
    d1 = tl.where(positive, -f1 / f0_safe, -1.0)
    d2 = (1.0 - eps) * f2 / f0_safe - d1 * d1
    lo = tl.where(active & (h >= 0.0), c, lo)
    hi = tl.where(active & (h <= 0.0), c, hi)
    hf = tl.where(positive, h, 0.0)  # no step from a row whose p all underflowed: it bisects
    den = 2.0 * d1 * d1 - hf * d2
    proposal = tl.where(den > 0.0, c - 2.0 * hf * d1 / tl.where(den > 0.0, den, 1.0), c - hf / d1)
    # Newton on F from the left: c + (f0 - f0^(1 - eps)) / f1 = c - f0 expm1(-eps h) / (eps f1)
    # (-> c + h/|d1|, Newton on h, as eps -> 0); h > 0 gives f0 > 1 and f1 > 0.
    left = positive & (h > 0.0)
    newton = c - f0_safe * expm1(-eps * hf, LIBDEVICE) / (eps * tl.where(left, f1, 1.0))
    size = C_TOL * (1.0 + tl.abs(c))
    tiny = positive & (tl.abs(proposal - c) <= size)
    close = tl.abs(h) <= H_TOL
    in_bracket = (proposal >= lo) & (proposal <= hi)
    progress = tl.abs(h) <= 0.5 * h_old
    settled = tiny | close
    fallback = tl.where(left & (newton > c) & (newton <= hi), newton, 0.5 * (lo + hi))
    new = tl.where(in_bracket & (progress | settled), proposal, tl.where(settled, c, fallback))
    done = settled | (hi - lo <= size) | (h == 0.0)
    c = tl.where(active, new, c)
    h_old = tl.where(active, tl.abs(h), h_old)
    return c, lo, hi, h_old, active & ~done
