"""Weighted alpha-entmax in NumPy float64: the definition of SPEC.md, sections 2 and 4.

Every row solves  p_j = m_j [(a-1) s_j - tau]_+^(1/(a-1)),  sum_j p_j = 1  over its allowed
entries (m_j > 0, s_j > -inf). We write eps = a - 1 and use the parametrisation of SPEC.md
section 2.2,

    u_j = 1 + eps (s_j - c),   p_j = m_j exp(log1p(eps (s_j - c)) / eps),   tau = eps c - 1,

in which eps -> 0 is softmax(s + log m) with c its log-normaliser, and nothing cancels near
alpha = 1. Rows are solved together (no Python loop over rows):
- eps == 0: softmax, closed form;
- eps == 1 (sparsemax) and eps == 1/2 (1.5-entmax): sort, then the closed form on the support;
- any other eps: Newton on c, safeguarded by a bisection bracket, run to float64 convergence.
The result is never renormalised: sum_j p_j = 1 is what the solve achieves (tests check it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import validation
from .. import formulas

#: Newton iterations after which the solve gives up (it converges in < 10 on any tested row;
#: the bisection safeguard alone would reach float64 resolution in ~ 100).
_MAX_ITERATIONS = 200
#: Relative step below which c counts as converged; one more Newton step follows it.
_STEP_TOLERANCE = 2.0**-46


@dataclass
class RowSolution:
    """The solved rows, flattened to [rows, n]; what the backward pass needs.

    p: probabilities (0 off the support). u: 1 + eps t (1 for softmax rows).
    t: s - c, shift-free. log_ratio: log(p / m) = log1p(eps t) / eps on the support, -inf off it.
    eps: alpha - 1 per row, shape [rows, 1].
    gap: per row, how far (in score units) the allowed entry nearest to the support boundary
      is from it: min_j |s_j - (c - 1/eps)|; inf for softmax rows and empty rows. Gradients are
      not defined where it is 0; a perturbation of the scores smaller than it keeps the support.
    """

    p: np.ndarray
    u: np.ndarray
    t: np.ndarray
    log_ratio: np.ndarray
    eps: np.ndarray
    gap: np.ndarray


def _logsumexp(a, axis=-1):
    """log(sum(exp(a))) along axis, -inf for all -inf rows, without warnings."""
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return top + np.log(np.sum(np.exp(a - top), axis=axis, keepdims=True))


def _solve_softmax(s, m, allowed):
    """eps = 0: p = softmax(s + log m); c is the log-normaliser, t = s - c."""
    with np.errstate(divide="ignore"):
        logits = np.where(allowed, s + np.log(np.where(allowed, m, 1.0)), -np.inf)
    c = _logsumexp(logits)
    t = np.where(allowed, s - c, -np.inf)
    p = np.exp(logits - c)
    return p, t


def _sorted_support(key, m, allowed, threshold_fn):
    """Support size K per row: the support is the top-K entries by key (p is monotone in s).

    threshold_fn(cum_m, cum_mk, cum_mk2) gives tau_k, the threshold that the top-k entries alone
    would need; entry k is in the support iff key_(k) > tau_k (SPEC.md section 2.3).
    Returns (order, sorted key, sorted m, sorted allowed, K-1 index per row).
    """
    order = np.argsort(np.where(allowed, -key, np.inf), axis=-1, kind="stable")
    key_s = np.take_along_axis(key, order, -1)
    m_s = np.take_along_axis(m, order, -1)
    ok_s = np.take_along_axis(allowed, order, -1)
    mk = np.where(ok_s, m_s * key_s, 0.0)
    mk2 = np.where(ok_s, mk * key_s, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        tau_k = threshold_fn(np.cumsum(m_s, -1), np.cumsum(mk, -1), np.cumsum(mk2, -1))
        in_support = ok_s & (key_s > tau_k)
    n = key.shape[-1]
    last = n - 1 - np.argmax(in_support[:, ::-1], axis=-1)
    return order, key_s, m_s, ok_s, last


def _solve_sparsemax(s, m, allowed):
    """eps = 1: p = m (s - tau)_+, tau = (sum_S m s - 1) / sum_S m over the support S."""
    order, s_s, m_s, ok_s, last = _sorted_support(s, m, allowed, lambda cm, cms, _: (cms - 1.0) / cm)
    support_s = ok_s & (np.arange(s.shape[-1]) <= last[:, None])
    mass = np.sum(np.where(support_s, m_s, 0.0), -1, keepdims=True)
    tau = (np.sum(np.where(support_s, m_s * s_s, 0.0), -1, keepdims=True) - 1.0) / mass
    u = np.where(allowed, s - tau, -np.inf)  # u = 1 + (s - c) with c = tau + 1
    p = np.where(allowed, m * np.maximum(u, 0.0), 0.0)
    return p, u - 1.0, u


def _solve_entmax15(s, m, allowed):
    """eps = 1/2: p = m (s/2 - tau)_+^2; on the support S, tau solves the quadratic
    sum_S m (x - tau)^2 = 1 with x = s/2, i.e. tau = mean_m(x) - sqrt(1/M - var_m(x))."""

    def threshold(cm, cmx, cmx2):
        mean = cmx / cm
        return mean - np.sqrt(1.0 / cm - (cmx2 / cm - mean * mean))

    x = np.where(allowed, s / 2.0, -np.inf)
    order, x_s, m_s, ok_s, last = _sorted_support(x, m, allowed, threshold)
    support_s = ok_s & (np.arange(s.shape[-1]) <= last[:, None])
    # Second, stable pass on the support: two-pass mean and variance.
    mass = np.sum(np.where(support_s, m_s, 0.0), -1, keepdims=True)
    mean = np.sum(np.where(support_s, m_s * x_s, 0.0), -1, keepdims=True) / mass
    var = np.sum(np.where(support_s, m_s * (x_s - mean) ** 2, 0.0), -1, keepdims=True) / mass
    tau = mean - np.sqrt(np.maximum(1.0 / mass - var, 0.0))
    u = np.where(allowed, x - tau, -np.inf)  # u = 1 + (s - c) / 2 with c = 2 (tau + 1)
    p = np.where(allowed, m * np.maximum(u, 0.0) ** 2, 0.0)
    return p, 2.0 * (u - 1.0), u


def _log_ratio(t, eps):
    """log(p/m) = log1p(eps t) / eps where eps t > -1, else -inf (eps > 0)."""
    x = eps * t
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x > -1.0, np.log1p(np.maximum(x, -1.0)) / eps, -np.inf)


def _solve_root(s, m, allowed, eps):
    """0 < eps < 1 (any alpha): Newton on h(c) = log sum_j m_j exp(log1p(eps (s_j - c)) / eps),
    which is decreasing with slope near -1, inside a bracket [lo, hi] with h(lo) >= 0 >= h(hi).

    lo: the largest c at which one entry alone has p_j = 1, i.e. s_j - expm1(-eps log m_j) / eps.
    hi: with M = sum_j m_j and s_max = 0, the c at which M u_max^(1/eps) = 1.
    """
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        log_m = np.where(allowed, np.log(np.where(allowed, m, 1.0)), -np.inf)
        one_alone = np.where(allowed, s - np.expm1(-eps * log_m) / eps, -np.inf)
        lo = np.max(one_alone, -1, keepdims=True)
        mass = np.sum(np.where(allowed, m, 0.0), -1, keepdims=True)
        hi = -np.expm1(-eps * np.log(mass)) / eps
        hi = np.maximum(hi, lo)

    def h_and_slope(c, s, log_m, eps):
        t = s - c
        log_ratio = _log_ratio(t, eps)
        terms = log_m + log_ratio
        h = _logsumexp(terms)
        with np.errstate(invalid="ignore", over="ignore"):
            weights = np.where(np.isfinite(terms), np.exp(terms - h) / (1.0 + eps * t), 0.0)
        return h, -np.sum(weights, -1, keepdims=True)

    c = lo.copy()
    active = np.arange(s.shape[0])
    lo_a, hi_a, c_a = lo, hi, c
    for _ in range(_MAX_ITERATIONS):
        if active.size == 0:
            break
        s_a, log_m_a, eps_a = s[active], log_m[active], eps[active]
        h, slope = h_and_slope(c_a, s_a, log_m_a, eps_a)
        lo_a = np.where(h >= 0, c_a, lo_a)
        hi_a = np.where(h <= 0, c_a, hi_a)
        with np.errstate(invalid="ignore", divide="ignore"):
            newton = c_a - h / slope
        inside = np.isfinite(newton) & (newton >= lo_a) & (newton <= hi_a)
        c_new = np.where(inside, newton, 0.5 * (lo_a + hi_a))
        step = np.abs(c_new - c_a)
        scale = np.maximum(1.0, np.abs(c_a))
        done = ((step <= _STEP_TOLERANCE * scale) & inside) | (h == 0) | (hi_a - lo_a <= 1e-300 + 4e-16 * scale)
        done = done[:, 0]
        c[active] = np.where(h == 0, c_a, c_new)
        keep = ~done
        active, lo_a, hi_a, c_a = active[keep], lo_a[keep], hi_a[keep], c_new[keep]
    t = np.where(allowed, s - c, -np.inf)
    log_ratio = _log_ratio(t, eps)
    p = np.where(allowed, m * np.exp(log_ratio), 0.0)
    return p, t


def solve_rows(s, m, eps) -> RowSolution:
    """Weighted alpha-entmax of each row of s [rows, n] with weights m >= 0 and eps = alpha - 1
    in [0, 1] per row ([rows] or [rows, 1]).

    Entries with m_j = 0 or s_j = -inf are not allowed: they get p_j = 0 and never influence
    the row. A row with no allowed entry gives zeros. A row with an allowed NaN or +inf gives NaN.
    """
    s = np.asarray(s, dtype=np.float64)
    m = np.asarray(m, dtype=np.float64)
    rows, n = s.shape
    eps = np.broadcast_to(np.asarray(eps, dtype=np.float64).reshape(-1, 1), (rows, 1))
    if rows == 0 or n == 0:  # nothing to solve: every row (if any) is empty
        zeros = np.zeros((rows, n))
        return RowSolution(p=zeros, u=zeros + 1.0, t=zeros, log_ratio=zeros - np.inf, eps=eps,
                           gap=np.full(rows, np.inf))
    poisoned = np.any((m > 0) & (np.isnan(s) | (s == np.inf)), -1)
    allowed = (m > 0) & np.isfinite(s)
    # Shift each row so that its largest allowed score is 0: c and t are shift-free, and the
    # closed forms then never add large numbers to small ones.
    top = np.max(np.where(allowed, s, -np.inf), -1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    shifted = np.where(allowed, s - top, -np.inf)

    p = np.zeros((rows, n))
    t = np.full((rows, n), -np.inf)
    # u = 1 + eps t as the closed forms computed it: 1 + eps t again would cancel near the
    # support boundary (u -> 0), and w = p / u in the backward would lose its relative precision.
    closed_u = np.full((rows, n), np.nan)
    e = eps[:, 0]
    nonempty = allowed.any(-1)
    branches = (
        (e == 0.0, lambda idx: _solve_softmax(shifted[idx], m[idx], allowed[idx])),
        (e == 1.0, lambda idx: _solve_sparsemax(shifted[idx], m[idx], allowed[idx])),
        (e == 0.5, lambda idx: _solve_entmax15(shifted[idx], m[idx], allowed[idx])),
        (
            (e > 0.0) & (e < 1.0) & (e != 0.5),
            lambda idx: _solve_root(shifted[idx], m[idx], allowed[idx], eps[idx]),
        ),
    )
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        # Masked-out entries hold -inf and weight 0; np.where discards what they compute.
        for rows_of_branch, solve in branches:
            idx = np.flatnonzero(rows_of_branch & nonempty)
            if idx.size:
                solved = solve(idx)
                p[idx], t[idx] = solved[:2]
                if len(solved) == 3:
                    closed_u[idx] = solved[2]

    support = p > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        boundary_distance = np.where(allowed & (eps > 0), np.abs(t + 1.0 / eps), np.inf)
        u = np.where(support, np.where(np.isnan(closed_u), 1.0 + eps * t, closed_u), 1.0)
        log_ratio = np.where(eps > 0, _log_ratio(t, np.where(eps > 0, eps, 1.0)), t)
    log_ratio = np.where(support, log_ratio, -np.inf)
    t = np.where(support, t, 0.0)
    p[poisoned] = np.nan
    return RowSolution(p=p, u=u, t=t, log_ratio=log_ratio, eps=eps, gap=boundary_distance.min(-1))


def _psi(t, eps):
    """psi(eps, t) = d/d eps [log1p(eps t) / eps] in float64: formulas.psi, series below
    |eps t| < 1e-2 (SPEC.md section 4.3). Entries off the support (t = -inf) give NaN, which
    the caller discards."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return formulas.psi(t, eps, np, "float64")


def vjp_rows(sol: RowSolution, g):
    """Vector-Jacobian products of solve_rows for an upstream gradient g = dL/dp [rows, n].

    Returns (ds, dm, deps) with deps per row [rows]. On the support, with w = p / u
    (= m^(a-1) p^(2-a)) and gbar = sum w g / sum w:
        ds = w (g - gbar),   dm = (p / m) (g - gbar),   deps = sum_j (g_j - gbar) p_j psi(eps, t_j).
    Off the support every gradient is 0 (and g there is never read).
    """
    support = sol.p > 0
    w = np.where(support, sol.p / sol.u, 0.0)
    g = np.where(support, g, 0.0)
    total = np.sum(w, -1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        gbar = np.where(total > 0, np.sum(w * g, -1, keepdims=True) / total, 0.0)
    centred = np.where(support, g - gbar, 0.0)
    ds = w * centred
    dm = np.where(support, np.exp(sol.log_ratio) * centred, 0.0)
    p_psi = np.where(support, sol.p * _psi(sol.t, sol.eps), 0.0)
    deps = np.sum(centred * p_psi, -1)
    return ds, dm, deps


def _sum_to_shape(x, shape):
    """Sum a broadcast gradient back to the shape of the input it came from."""
    lead = x.ndim - len(shape)
    if lead:
        x = x.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    if axes:
        x = x.sum(axis=axes, keepdims=True)
    return x.reshape(shape)


def _rows(x, alpha, axis, weights):
    """Move `axis` last and flatten: scores, weights and eps as [rows, n] and [rows]."""
    validation.validate_entmax(x, alpha, axis=axis, weights=weights)
    x64 = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    shape = x64.shape
    alpha64 = np.asarray(alpha, dtype=np.float64)
    alpha64 = alpha64.reshape((1,) * (x64.ndim - alpha64.ndim) + alpha64.shape)  # x's rank
    # alpha has size 1 on `axis`: one value per row.
    eps = np.broadcast_to(np.moveaxis(alpha64, axis, -1), shape[:-1] + (1,)) - 1.0
    if weights is None:
        w = np.ones(shape)
    else:
        w = np.moveaxis(np.broadcast_to(np.asarray(weights, np.float64), np.asarray(x).shape), axis, -1)
    n, rows = shape[-1], int(np.prod(shape[:-1]))
    return x64.reshape(rows, n), np.ascontiguousarray(w).reshape(rows, n), eps.reshape(rows), shape


def _rescale_heavy_weights(s, w, eps):
    """Rows whose largest allowed weight lam exceeds 1, solved as an equivalent problem.

    Heavy weights push c toward 1/eps, where u = 1 + eps (s - c) cancels. For any lam > 0,
    p(s, m) = p(lam^eps s, m / lam) (SPEC.md section 2.5), so such rows are solved with
    weights <= 1. Returns (s', w', factor = lam^eps, log_lam), factor = 1 where unchanged.
    """
    allowed = (w > 0) & (s > -np.inf)
    lam = np.max(np.where(allowed, w, 0.0), -1, keepdims=True)
    heavy = lam > 1.0
    log_lam = np.where(heavy, np.log(np.where(heavy, lam, 1.0)), 0.0)
    factor = np.exp(eps.reshape(-1, 1) * log_lam)
    with np.errstate(invalid="ignore"):  # -inf * factor stays -inf; NaN stays NaN
        s_scaled = np.where(heavy, s * factor, s)
    return s_scaled, np.where(heavy, w / np.where(heavy, lam, 1.0), w), factor, log_lam


def entmax(x, alpha, axis=-1, weights=None):
    """Weighted alpha-entmax of x along `axis` (SPEC.md section 2), in x's dtype.

    alpha: a scalar in [1, 2] or an array broadcasting against x with size 1 on `axis`.
    weights: None (all ones) or finite values >= 0 broadcasting against x; an entry with weight
    0 or x = -inf gets probability 0; a row with no such entry left gives zeros. An empty x
    (a zero-length axis included) gives an empty result.
    """
    if np.size(x) == 0:
        return np.zeros_like(np.asarray(x))
    s, w, eps, shape = _rows(x, alpha, axis, weights)
    s, w, _, _ = _rescale_heavy_weights(s, w, eps)
    sol = solve_rows(s, w, eps)
    p = np.moveaxis(sol.p.reshape(shape), -1, axis)
    return p.astype(np.asarray(x).dtype, copy=False)


def entmax_vjp(x, alpha, grad, axis=-1, weights=None):
    """(dx, dalpha, dweights) of entmax for the upstream gradient `grad` (x's shape).

    dalpha has alpha's shape; dweights has weights' shape, or is None without weights.
    """
    if np.size(x) == 0:  # no entry: every gradient is zero
        alpha_arr = np.asarray(alpha)
        alpha_dtype = alpha_arr.dtype if alpha_arr.dtype.kind == "f" else np.float64
        dweights = None if weights is None else np.zeros_like(np.asarray(weights))
        return np.zeros_like(np.asarray(x)), np.zeros(alpha_arr.shape, alpha_dtype), dweights
    s, w, eps, shape = _rows(x, alpha, axis, weights)
    s, w, factor, log_lam = _rescale_heavy_weights(s, w, eps)
    sol = solve_rows(s, w, eps)
    g = np.moveaxis(np.asarray(grad, np.float64), axis, -1).reshape(s.shape)
    ds, dm, deps = vjp_rows(sol, g)
    # Back through s' = lam^eps s and m' = m / lam (lam held fixed: the identity holds for all).
    scaled_scores = np.where(ds != 0, s, 0.0)
    deps = deps + log_lam[:, 0] * np.sum(ds * scaled_scores, -1)
    ds, dm = ds * factor, dm / np.exp(log_lam)
    x_dtype = np.asarray(x).dtype
    dx = np.moveaxis(ds.reshape(shape), -1, axis).astype(x_dtype, copy=False)
    deps_full = np.moveaxis(deps.reshape(shape[:-1] + (1,)), -1, axis)
    alpha_arr = np.asarray(alpha)
    alpha_dtype = alpha_arr.dtype if alpha_arr.dtype.kind == "f" else np.float64
    dalpha = _sum_to_shape(deps_full, alpha_arr.shape).astype(alpha_dtype, copy=False)
    dweights = None
    if weights is not None:
        weights_arr = np.asarray(weights)
        dm_full = np.moveaxis(dm.reshape(shape), -1, axis)
        dweights = _sum_to_shape(dm_full, weights_arr.shape).astype(weights_arr.dtype, copy=False)
    return dx, dalpha, dweights


def softmax(x, axis=-1, weights=None):
    """entmax with alpha = 1: softmax(x + log weights)."""
    return entmax(x, 1.0, axis=axis, weights=weights)


def sparsemax(x, axis=-1, weights=None):
    """entmax with alpha = 2."""
    return entmax(x, 2.0, axis=axis, weights=weights)


def entmax15(x, axis=-1, weights=None):
    """entmax with alpha = 1.5."""
    return entmax(x, 1.5, axis=axis, weights=weights)
