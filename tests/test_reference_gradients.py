"""The reference's analytic gradients (SPEC.md section 4) against finite differences, the
entmax package's autograd, and 60-digit derivatives near alpha = 1."""

import mpmath
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import attnspec.reference as ref

from oracles import entmax_mp


def central_difference(f, x, h=1e-6):
    """d f / d x for scalar f by central differences, entry by entry."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = h
        grad[idx] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


def _away_from_support_boundary(x, alpha, w=None, margin=1e-4):
    """Entries whose p is within `margin` of 0 make finite differences cross a kink."""
    p = ref.entmax(x, alpha, weights=w)
    return not ((p > 0) & (p < margin)).any() and not _nearly_entering(x, alpha, w, margin)


def _nearly_entering(x, alpha, w, margin):
    bumped = ref.entmax(x + margin * np.sign(np.random.default_rng(0).normal(size=x.shape)), alpha, weights=w)
    return ((ref.entmax(x, alpha, weights=w) > 0) != (bumped > 0)).any()


@given(
    seed=st.integers(0, 2**32 - 1),
    alpha=st.sampled_from([1.0, 1.0 + 1e-7, 1.05, 1.3, 1.5, 1.8, 2.0]) | st.floats(1.01, 1.99),
    n=st.integers(2, 10),
)
def test_entmax_vjp_matches_finite_differences(seed, alpha, n):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, n))
    w = rng.uniform(0.1, 1.0, size=(2, n))
    g = rng.normal(size=(2, n))
    assume(_away_from_support_boundary(x, alpha, w))
    dx, dalpha, dw = ref.entmax_vjp(x, alpha, g, weights=w)

    def loss(x_=x, a=alpha, w_=w):
        return float(np.sum(ref.entmax(x_, a, weights=w_) * g))

    np.testing.assert_allclose(dx, central_difference(lambda v: loss(x_=v), x), atol=1e-7)
    np.testing.assert_allclose(dw, central_difference(lambda v: loss(w_=v), w), atol=1e-7)
    if 1.0 + 1e-5 < alpha < 2.0 - 1e-5:
        fd = (loss(a=alpha + 1e-6) - loss(a=alpha - 1e-6)) / 2e-6
        np.testing.assert_allclose(dalpha, fd, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.1, 1.3, 1.5, 1.7, 2.0])
def test_entmax_vjp_matches_entmax_package_autograd(alpha):
    """Unweighted: dx and dalpha against the entmax package's entmax_bisect autograd."""
    torch = pytest.importorskip("torch")
    entmax_pkg = pytest.importorskip("entmax")
    rng = np.random.default_rng(1)
    x, g = rng.normal(size=(8, 12)), rng.normal(size=(8, 12))
    xt = torch.tensor(x, requires_grad=True)
    at = torch.full((8, 1), alpha, dtype=torch.float64, requires_grad=True)
    p = entmax_pkg.entmax_bisect(xt, alpha=at, n_iter=200)
    (p * torch.tensor(g)).sum().backward()
    dx, dalpha, _ = ref.entmax_vjp(x, np.full((8, 1), alpha), g)
    np.testing.assert_allclose(dx, xt.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(dalpha, at.grad.numpy(), atol=1e-10)


def _dalpha_mp(x, w, g, alpha, one_sided):
    """d/d alpha of sum_j g_j p_j(alpha) by a 60-digit difference quotient."""
    h = mpmath.mpf("1e-25")
    a = mpmath.mpf(alpha)

    def loss(a_):
        return sum(pj * mpmath.mpf(float(gj)) for pj, gj in zip(entmax_mp(x, a_, w, iterations=600), g))

    if one_sided == "right":
        return float((loss(a + h) - loss(a)) / h)
    if one_sided == "left":
        return float((loss(a) - loss(a - h)) / h)
    return float((loss(a + h) - loss(a - h)) / (2 * h))


@pytest.mark.parametrize(
    "alpha, side",
    [(1.0, "right"), (1.0 + 1e-12, "both"), (1.0 + 1e-9, "both"), (1.0 + 1e-5, "both"),
     (1.0 + 1e-3, "both"), (1.0 + 2e-2, "both"), (1.3, "both"), (2.0, "left")],
)
def test_dalpha_near_and_at_one(alpha, side):
    """dalpha is accurate over all of [1, 2]: alpha = 1 one-sided, and where the closed form
    of SPEC 4.3 would cancel (the series takes over below |eps t| = 1e-2)."""
    rng = np.random.default_rng(2)
    x, w, g = rng.normal(size=7) * 1.5, rng.uniform(0.2, 1.0, size=7), rng.normal(size=7)
    _, dalpha, _ = ref.entmax_vjp(x, alpha, g, weights=w)
    expected = _dalpha_mp(x, w, g, alpha, side)
    np.testing.assert_allclose(dalpha, expected, rtol=1e-11)


def test_dalpha_limit_formula_at_one():
    """At alpha = 1, dalpha = -1/2 sum_j (g_j - gbar) p_j t_j^2 with t = log(p/m) (SPEC 4.3)."""
    rng = np.random.default_rng(3)
    x, w, g = rng.normal(size=9), rng.uniform(0.1, 1, size=9), rng.normal(size=9)
    p = ref.entmax(x, 1.0, weights=w)
    t = np.log(p / w)
    expected = -0.5 * np.sum((g - np.sum(p * g)) * p * t * t)
    _, dalpha, _ = ref.entmax_vjp(x, 1.0, g, weights=w)
    np.testing.assert_allclose(dalpha, expected, rtol=1e-13)


def test_gradients_keep_input_shapes_and_dtypes():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    alpha = np.full((3, 1, 1), 1.5, dtype=np.float32)
    w = rng.uniform(0.1, 1, size=(4, 5)).astype(np.float32)  # broadcasts over the first axis
    dx, dalpha, dw = ref.entmax_vjp(x, alpha, np.ones_like(x), weights=w)
    assert dx.shape == x.shape and dx.dtype == np.float32
    assert dalpha.shape == alpha.shape and dalpha.dtype == np.float32
    assert dw.shape == w.shape and dw.dtype == np.float32
    _, dalpha, dw = ref.entmax_vjp(x, 1.5, np.ones_like(x))
    assert dalpha.shape == () and dw is None


def test_zero_weight_and_disallowed_entries_get_zero_gradient():
    x = np.array([0.3, -np.inf, 0.1, 0.2])
    w = np.array([1.0, 1.0, 0.0, 0.5])
    g = np.array([1.0, 2.0, 3.0, -1.0])
    for alpha in (1.0, 1.5, 2.0):
        dx, _, dw = ref.entmax_vjp(x, alpha, g, weights=w)
        assert dx[1] == 0 and dx[2] == 0 and dw[1] == 0 and dw[2] == 0
        assert np.isfinite(dx).all() and np.isfinite(dw).all()


def test_empty_row_has_zero_gradients():
    x = np.full((1, 4), -np.inf)
    dx, dalpha, _ = ref.entmax_vjp(x, 1.5, np.ones((1, 4)))
    assert (dx == 0).all() and dalpha == 0


@pytest.mark.parametrize("alpha", [1.0, 1.3, 1.7, 2.0])
def test_vjp_with_weights_above_one(alpha):
    rng = np.random.default_rng(5)
    x, g = rng.normal(size=(3, 5)) * 0.3, rng.normal(size=(3, 5))
    w = rng.uniform(1.0, 3.0, size=(3, 5)) * 1e4
    dx, dalpha, dw = ref.entmax_vjp(x, alpha, g, weights=w)

    def loss(x_=x, a=alpha, w_=w):
        return float(np.sum(ref.entmax(x_, a, weights=w_) * g))

    np.testing.assert_allclose(dx, central_difference(lambda v: loss(x_=v), x), atol=1e-8)
    np.testing.assert_allclose(dw, central_difference(lambda v: loss(w_=v), w, h=1e-2), atol=1e-11)
    if 1.0 < alpha < 2.0:
        np.testing.assert_allclose(dalpha, (loss(a=alpha + 1e-6) - loss(a=alpha - 1e-6)) / 2e-6, atol=1e-7)


@pytest.mark.parametrize("alpha", [2.0, 1.5])
def test_vjp_keeps_precision_next_to_the_support_boundary(alpha):
    """An entry barely inside the support (u = 1 + eps t ~ 1e-7): the closed forms' own u is
    used, so the sparsemax VJP matches its exact form S (g - mean_S g) to float64 rounding."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    p = ref.entmax(x, alpha)
    support = np.flatnonzero(p > 0)
    # Move the largest score outside the support to just inside the boundary: with
    # p = [(alpha - 1) x - tau]_+^(1/(alpha - 1)), tau read off the smallest supported entry.
    outside = np.flatnonzero(p == 0)
    j = outside[np.argmax(x[outside])]
    smallest = support[np.argmin(p[support])]
    eps = alpha - 1.0
    tau = eps * x[smallest] - p[smallest] ** eps
    x[j] = (tau + 1e-7) / eps
    p = ref.entmax(x, alpha)
    assert 0 < p[j] ** eps < 1e-6
    g = rng.normal(size=200)
    dx, _, _ = ref.entmax_vjp(x, alpha, g)
    S = p > 0
    if alpha == 2.0:
        exact = np.where(S, g - g[S].mean(), 0.0)
    else:  # w = sqrt(p) on the support: ds = w (g - sum w g / sum w)
        w = np.sqrt(p)
        exact = w * (g - np.sum(w * g) / np.sum(w))
    np.testing.assert_allclose(dx, exact, rtol=0, atol=64 * np.finfo(float).eps * np.abs(g).max())
