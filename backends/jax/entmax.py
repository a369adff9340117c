"""Weighted alpha-entmax on blocks of rows in JAX (SPEC.md sections 2 and 4).

Everything here works on one block of scores [..., T, W] (rows T, keys W) with eps = alpha - 1
broadcasting against it, in the parametrisation of SPEC.md 2.2: for a row's normaliser c,
t = s - c and p = m exp(log1p(eps t) / eps) (p = m exp(t) at eps = 0), which does not cancel
near alpha = 1. The attention kernel (attention.py) solves c per row by Newton steps whose sums
it accumulates over key tiles with `newton_sums`, then rebuilds p from c alone with
`probabilities` in both passes, and gets the gradients of SPEC.md 4 from `vjp_terms`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnspec import formulas

#: Newton steps at most (each also halves the bracket when Newton would leave it).
ITERATIONS = {"float64": 60, "float32": 40}


def safe_eps(eps):
    return jnp.where(eps > 0, eps, jnp.ones_like(eps))


def log_ratio(t, eps):
    """log(p/m) = log1p(eps t)/eps, t where eps = 0; -inf where eps t <= -1 (and where t = -inf)."""
    return formulas.log_ratio(t, eps, jnp)


def one_alone(s, m, eps):
    """c at which entry j alone would have p_j = 1: s - expm1(-eps log m)/eps (s + log m at
    eps = 0). Its maximum over a row is the lower end of the bracket of SPEC.md 2.4."""
    log_m = jnp.log(m)
    return s + jnp.where(eps > 0, -jnp.expm1(-eps * log_m) / safe_eps(eps), log_m)


def upper_bracket(mass, eps):
    """c_hi - top for a row whose allowed weights sum to `mass` (SPEC.md 2.4)."""
    log_mass = jnp.log(mass)
    return jnp.where(eps > 0, -jnp.expm1(-eps * log_mass) / safe_eps(eps), log_mass)


def probabilities(s, m, eps, c):
    """(p, e = p/m, t = s - c) of a block for the rows' normalisers c [..., T, 1]. s holds
    -inf where a key is not allowed; m is None when every weight is 1. p = 0 off the support
    (u = 1 + eps t <= 0 included: at alpha = 2 an entry with u = 0 exactly is outside)."""
    t = s - c
    e = jnp.exp(log_ratio(t, eps))
    p = e if m is None else m * e
    return p, e, t


def newton_sums(s, m, eps, c):
    """(sum p, sum p/u) over the block's keys, [..., T]: h = log sum p and h' = -sum(p/u)/sum p."""
    p, _, t = probabilities(s, m, eps, c)
    return p.sum(-1), weights(p, t, eps).sum(-1)


def newton_update(c, lo, hi, total_p, total_w):
    """One safeguarded Newton step on h(c) = log sum p (decreasing): shrink [lo, hi] with the
    sign of h; take the Newton step on h if it stays inside, else the Newton step on
    g(c) = sum p - 1 if that does, else bisect. Rows [..., T].

    Why the second step: h is concave where a row's u are nearly equal (ties, e.g. a zero
    query), so Newton on h overshoots from the left, past hi when the root sits on it, and
    bisection then crept to the root one bit per pass over the keys. g is convex, so its Newton
    step from the left (h > 0) lands between c and the root: never outside the bracket."""
    h = jnp.log(total_p)
    slope = -total_w / total_p
    lo = jnp.where(h >= 0, c, lo)
    hi = jnp.where(h <= 0, c, hi)
    newton = c - h / slope
    inside = jnp.isfinite(newton) & (newton >= lo) & (newton <= hi)
    convex = c + (total_p - 1) / total_w
    convex_inside = jnp.isfinite(convex) & (convex >= lo) & (convex <= hi)
    step = jnp.where(inside, newton, jnp.where(convex_inside, convex, (lo + hi) / 2))
    return jnp.where(h == 0, c, step), lo, hi


def solve(sums, lo, hi, nonempty, iterations):
    """c per row [...] from c = lo: safeguarded Newton steps until no row moves by more than 4
    ulps (or `iterations`). sums(c) gives (sum p, sum p/u) per row, each a pass over the keys.
    Returns (c, the number of passes)."""
    dtype = lo.dtype
    tolerance = 4 * jnp.finfo(dtype).eps
    # The analytic c_hi is exact in real arithmetic, but the computed h may cross 0 a few ulps
    # beyond the computed c_hi (it does for tied rows, whose root is c_hi itself): Newton
    # steps landing there must count as inside, or bisection creeps to hi, never arriving.
    hi = hi + 2 * tolerance * (1 + jnp.abs(hi))

    def keep_going(state):
        _, _, _, it, done = state
        return (~done) & (it < iterations)

    def step(state):
        c, lo, hi, it, _ = state
        new, lo, hi = newton_update(c, lo, hi, *sums(c))
        new = jnp.where(nonempty, new, 0.0)
        moved = jnp.abs(new - c) > tolerance * (1 + jnp.abs(new))  # NaN rows count as settled
        return new, lo, hi, it + 1, ~jnp.any(moved)

    c, _, _, it, _ = lax.while_loop(keep_going, step, (lo, lo, hi, jnp.zeros((), jnp.int32), jnp.zeros((), bool)))
    return c, it


def psi(t, eps):
    """d/d eps of log1p(eps t)/eps, with its series where |eps t| is small (SPEC.md 4.3)."""
    return formulas.psi(t, eps, jnp, "float64" if t.dtype == jnp.float64 else "float32")


def weights(p, t, eps):
    """w = p/u on the support, 0 elsewhere: dc/ds_j = w_j / sum w (SPEC.md 4.1)."""
    support = p > 0
    return jnp.where(support, p / jnp.where(support, 1 + eps * t, 1.0), 0.0)


def vjp_terms(p, e, t, w, eps, g, gbar, need_eps):
    """(ds, dm, deps) of a block for dL/dp = g and the rows' gbar [..., T, 1] (SPEC.md 4.1-4.3):
    ds = w (g - gbar), dm = (p/m)(g - gbar), deps_row = sum (g - gbar) p psi; all 0 off S."""
    support = p > 0
    centred = jnp.where(support, g - gbar, 0.0)
    ds = w * centred
    dm = jnp.where(support, e, 0.0) * centred
    if not need_eps:
        return ds, dm, None
    return ds, dm, centred * jnp.where(support, p * psi(jnp.where(support, t, 0.0), eps), 0.0)


# ----------------------------------------------------------------------------------------------
# The stand-alone op: attnspec.entmax(x, alpha, axis, weights) for jax arrays.


def _rescale_heavy_weights(s, m, eps):
    """Rows whose largest allowed weight lam exceeds 1 are solved as p(lam^eps s, m / lam)
    (SPEC.md 2.5). Returns (s', m', log_lam [..., 1]; 0 where unchanged)."""
    allowed = (m > 0) & jnp.isfinite(s)
    lam = jnp.max(jnp.where(allowed, m, 0.0), -1, keepdims=True)
    heavy = lam > 1
    log_lam = jnp.where(heavy, jnp.log(jnp.where(heavy, lam, 1.0)), 0.0)
    s = jnp.where(heavy, s * jnp.exp(eps * log_lam), s)
    m = jnp.where(heavy, m / jnp.where(heavy, lam, 1.0), m)
    return s, m, log_lam


def _solve_rows(s, m, eps):
    """(p, t) of rows s, m [..., n] with eps [..., 1]: the bracket of SPEC.md 2.4 and the
    safeguarded Newton solve of `solve`, over the allowed entries (finite s, m > 0)."""
    allowed = (m > 0) & jnp.isfinite(s)
    s = jnp.where(allowed, s, -jnp.inf)
    m = jnp.where(allowed, m, 0.0)
    top = s.max(-1)
    nonempty = top > -jnp.inf
    alone = jnp.where(allowed, one_alone(s, jnp.where(allowed, m, 1.0), eps), -jnp.inf)
    lo = jnp.where(nonempty, alone.max(-1), 0.0)
    hi = top + upper_bracket(jnp.where(nonempty, m.sum(-1), 1.0), eps[..., 0])
    hi = jnp.where(nonempty, jnp.maximum(hi, lo), 0.0)

    def sums(c):
        return newton_sums(s, m, eps, c[..., None])

    c, _ = solve(sums, lo, hi, nonempty, ITERATIONS[jnp.dtype(s.dtype).name])
    p, _, t = probabilities(s, m, eps, c[..., None])
    return jnp.where(nonempty[..., None], p, 0.0), t


def _entmax_rows_fwd(s, m, eps):
    """p of rows s, m [..., n] with eps [..., 1], and what the backward needs."""
    scaled, m_scaled, log_lam = _rescale_heavy_weights(s, m, eps)
    p, t = _solve_rows(scaled, m_scaled, eps)
    # An allowed entry that is NaN or +inf makes the row undefined (SPEC.md 2.1).
    poisoned = ((m > 0) & (jnp.isnan(s) | (s == jnp.inf))).any(-1, keepdims=True)
    p = jnp.where(poisoned, jnp.nan, p)
    return p, (p, t, scaled, eps, log_lam)


def _entmax_rows_bwd(residuals, g):
    """SPEC.md 4.1-4.3 through the rescaling s' = lam^eps s, m' = m / lam (lam held fixed)."""
    p, t, scaled, eps, log_lam = residuals
    support = p > 0
    w = weights(p, t, eps)
    g = jnp.where(support, g, 0.0)
    total = w.sum(-1, keepdims=True)
    gbar = (w * g).sum(-1, keepdims=True) / jnp.where(total > 0, total, 1.0)
    e = jnp.exp(log_ratio(t, eps))
    ds, dm, deps = vjp_terms(p, e, t, w, eps, g, gbar, True)
    deps = deps.sum(-1, keepdims=True) + log_lam * (ds * jnp.where(ds != 0, scaled, 0.0)).sum(-1, keepdims=True)
    return ds * jnp.exp(eps * log_lam), dm / jnp.exp(log_lam), deps


def _rows(x, alpha, weights, axis, dtype):
    """x, alpha and weights as rows along the last axis in the compute dtype: s, m [..., n] and
    eps [..., 1]. Plain jax ops, so autodiff sums the gradients back to alpha's and weights'
    shapes."""
    s = jnp.moveaxis(x.astype(dtype), axis, -1)
    a = jnp.asarray(alpha).astype(dtype)
    a = a.reshape((1,) * (x.ndim - a.ndim) + a.shape)  # x's rank
    eps = jnp.broadcast_to(jnp.moveaxis(a, axis, -1), s.shape[:-1] + (1,)) - 1.0
    if weights is None:
        return s, jnp.ones_like(s), eps
    m = jnp.moveaxis(jnp.broadcast_to(jnp.asarray(weights).astype(dtype), x.shape), axis, -1)
    return s, m, eps


# The op is a custom_vjp around two compiled programs (forward; backward): called eagerly, its
# dozens of small ops would each be compiled and dispatched on their own, and autodiff through
# a jitted forward would compile it again, linearised. Both work in the compute dtype, so that
# float16, bfloat16 and float32 inputs share them.


@partial(jax.jit, static_argnames=("axis",))
def _forward_program(x, alpha, weights, *, axis):
    p, residuals = _entmax_rows_fwd(*_rows(x, alpha, weights, axis, x.dtype))
    return jnp.moveaxis(p, -1, axis), residuals


@partial(jax.jit, static_argnames=("axis",))
def _backward_program(residuals, x, alpha, weights, g, *, axis):
    """(dx, dalpha, dweights): the row-layout cotangents of SPEC.md 4, pulled back through
    `_rows` to the arguments' shapes (alpha and weights broadcast: their gradients are sums)."""
    ds, dm, deps = _entmax_rows_bwd(residuals, jnp.moveaxis(g, axis, -1))
    if weights is None:
        _, pullback = jax.vjp(lambda x, a: _rows(x, a, None, axis, x.dtype), x, alpha)
        return pullback((ds, jnp.zeros_like(dm), deps)) + (None,)
    _, pullback = jax.vjp(lambda x, a, w: _rows(x, a, w, axis, x.dtype), x, alpha, weights)
    return pullback((ds, dm, deps))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _entmax_op(axis, x, alpha, weights):
    return _forward_program(x, alpha, weights, axis=axis)[0]


def _entmax_op_fwd(axis, x, alpha, weights):
    p, residuals = _forward_program(x, alpha, weights, axis=axis)
    return p, (residuals, x, alpha, weights)


def _entmax_op_bwd(axis, saved, g):
    residuals, x, alpha, weights = saved
    return _backward_program(residuals, x, alpha, weights, g, axis=axis)


_entmax_op.defvjp(_entmax_op_fwd, _entmax_op_bwd)


def _in(value, dtype):
    """An argument in the compute dtype: an array converted (if it is not already), a Python
    number as a NumPy scalar (so that every form of alpha meets the same programs)."""
    if not hasattr(value, "dtype"):
        return np.asarray(value, dtype)
    return value if value.dtype == dtype else value.astype(dtype)


def entmax(x, alpha, axis=-1, weights=None):
    """Weighted alpha-entmax of a jax array along `axis` (SPEC.md 2), in x's dtype (halves
    compute in float32), differentiable in x, alpha and weights (jit, vmap and grad).
    Arguments are validated by the dispatcher."""
    axis = axis % x.ndim
    if x.size == 0:  # an empty result (SPEC.md 5.3)
        return jnp.zeros_like(x)
    dtype = jnp.dtype(jnp.float64 if x.dtype == jnp.float64 else jnp.float32)
    p = _entmax_op(axis, _in(x, dtype), _in(alpha, dtype), None if weights is None else _in(weights, dtype))
    return p if p.dtype == x.dtype else p.astype(x.dtype)
