"""Weighted alpha-entmax on blocks of rows in JAX (SPEC.md sections 2 and 4).

Everything here works on one block of scores [..., T, W] (rows T, keys W) with eps = alpha - 1
broadcasting against it, in the parametrisation of SPEC.md 2.2: for a row's normaliser c,
t = s - c and p = m exp(log1p(eps t) / eps) (p = m exp(t) at eps = 0), which does not cancel
near alpha = 1. The attention kernel (attention.py) solves c per row by Newton steps whose sums
it accumulates over key tiles with `newton_sums`, then rebuilds p from c alone with
`probabilities` in both passes, and gets the gradients of SPEC.md 4 from `vjp_terms`.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from attnspec import formulas


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
