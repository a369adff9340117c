"""The reference's weighted alpha-entmax against independent oracles (SPEC.md section 2)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import attnspec.reference as ref
from attnspec.reference.entmax import _solve_entmax15, _solve_root, _solve_sparsemax, solve_rows

from oracles import entmax_mp, sparsemax_row

ALPHAS = [1.0, 1.0 + 1e-9, 1.0 + 1e-6, 1.0 + 1e-3, 1.1, 1.25, 1.5, 1.75, 1.999, 2.0]


def _rows(seed, shape=(6, 9), scale=2.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape) * scale
    w = rng.uniform(0.05, 1.0, size=shape)
    w[:, 0] = 0.0  # a disallowed entry in every row
    return x, w


@pytest.mark.parametrize("alpha", ALPHAS)
def test_matches_60_digit_bisection(alpha):
    x, w = _rows(0)
    p = ref.entmax(x, alpha, weights=w)
    for row in range(x.shape[0]):
        expected = np.array([float(v) for v in entmax_mp(x[row], alpha, w[row])])
        np.testing.assert_allclose(p[row], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_unnormalised_sum_is_one(alpha):
    """The solve itself reaches sum 1 (the reference never divides by the sum)."""
    x, w = _rows(1, shape=(200, 64), scale=3.0)
    p = ref.entmax(x, alpha, weights=w)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=2e-15)


@pytest.mark.parametrize("alpha", [1.0001, 1.2, 1.5, 1.7, 1.999, 2.0])
def test_unweighted_matches_entmax_package(alpha):
    torch = pytest.importorskip("torch")
    entmax_pkg = pytest.importorskip("entmax")
    x, _ = _rows(2, shape=(50, 40), scale=3.0)
    theirs = entmax_pkg.entmax_bisect(torch.tensor(x), alpha=alpha, n_iter=200).numpy()
    # entmax_bisect bisects on tau in the textbook form, which loses digits as alpha -> 1.
    tol = 1e-12 if alpha > 1.001 else 1e-9
    np.testing.assert_allclose(ref.entmax(x, alpha), theirs, rtol=0, atol=tol)


def test_closed_forms_match_the_entmax_package():
    torch = pytest.importorskip("torch")
    entmax_pkg = pytest.importorskip("entmax")
    x, _ = _rows(3, shape=(50, 40), scale=3.0)
    t = torch.tensor(x)
    np.testing.assert_allclose(ref.entmax15(x), entmax_pkg.entmax15(t).numpy(), atol=1e-14)
    np.testing.assert_allclose(ref.sparsemax(x), entmax_pkg.sparsemax(t).numpy(), atol=1e-14)


def test_alpha_two_is_closed_form_sparsemax():
    x, _ = _rows(4, shape=(30, 12))
    expected = np.stack([sparsemax_row(row) for row in x])
    np.testing.assert_allclose(ref.entmax(x, 2.0), expected, atol=1e-15)


def test_alpha_one_is_softmax_plus_log_weights():
    x, w = _rows(5)
    expected = np.where(w > 0, w * np.exp(x), 0.0)
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(ref.entmax(x, 1.0, weights=w), expected, rtol=1e-14)


@pytest.mark.parametrize("eps, closed_form", [(0.5, _solve_entmax15), (1.0, _solve_sparsemax)])
def test_root_find_agrees_with_closed_forms(eps, closed_form):
    """The general solver, forced onto alpha = 1.5 and 2, reproduces the sort-based forms."""
    x, w = _rows(6, shape=(100, 33), scale=4.0)
    allowed = w > 0
    s = np.where(allowed, x - np.max(np.where(allowed, x, -np.inf), -1, keepdims=True), -np.inf)
    with np.errstate(all="ignore"):
        p_root, _ = _solve_root(s, w, allowed, np.full((100, 1), eps))
        p_closed = closed_form(s, w, allowed)[0]
    np.testing.assert_allclose(p_root, p_closed, atol=2e-15)


def test_near_one_has_no_cancellation():
    """p(alpha) is smooth at alpha = 1: its first-order change matches the series of SPEC 4.3."""
    x, w = _rows(7)
    base = ref.entmax(x, 1.0, weights=w)
    for eps in (1e-12, 1e-9, 1e-6):
        p = ref.entmax(x, 1.0 + eps, weights=w)
        # d p_j / d alpha at alpha = 1 is p_j (psi_j - sum_k p_k psi_k), psi = -t^2/2.
        t = np.log(np.where(base > 0, base / np.where(w > 0, w, 1.0), 1.0))
        psi = -0.5 * t * t
        slope = base * (psi - np.sum(base * psi, -1, keepdims=True))
        np.testing.assert_allclose(p - base, eps * slope, rtol=0, atol=1e-15 + 10 * eps**2)


@pytest.mark.parametrize("alpha", [1.0, 1.3, 1.5, 2.0])
def test_large_logits(alpha):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(20, 64)) * 1e4
    p = ref.entmax(x, alpha)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-15)
    # A logit 1e4 below the maximum gets nothing, at any alpha in [1, 2].
    assert (p[x < x.max(-1, keepdims=True) - 5e3] == 0).all()


@pytest.mark.parametrize("alpha", [1.0, 1.3, 1.5, 2.0])
def test_minus_inf_entries_and_empty_rows(alpha):
    x = np.array([[-np.inf] * 4, [-np.inf, 0.5, -np.inf, 0.5], [3.0, -np.inf, -np.inf, -np.inf]])
    p = ref.entmax(x, alpha)
    np.testing.assert_array_equal(p[0], 0.0)  # all -inf: zeros, not NaN
    np.testing.assert_allclose(p[1], [0, 0.5, 0, 0.5], atol=1e-16)
    np.testing.assert_array_equal(p[2], [1, 0, 0, 0])
    w = np.array([0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(ref.entmax(np.ones(4), alpha, weights=w), 0.0)


@pytest.mark.parametrize("alpha", [1.0, 1.3, 1.5, 2.0])
def test_very_negative_logits_in_half_precision(alpha):
    """The entmax package gives NaN for float16 rows whose largest logit is very negative."""
    x = (np.array([[-60000.0, -60001.0, -60003.0]])).astype(np.float16)
    p = ref.entmax(x, alpha)
    assert p.dtype == np.float16 and np.isfinite(p).all()
    np.testing.assert_allclose(p.astype(np.float64).sum(), 1.0, atol=2e-3)


@pytest.mark.parametrize("alpha", [1.2, 1.5, 1.9, 2.0])
def test_peaked_rows(alpha):
    """One logit far above the rest: all mass on it, and ties share it exactly."""
    x = np.array([[50.0, 0.0, 0.1, -1.0], [7.0, 7.0, -30.0, 1.0]])
    p = ref.entmax(x, alpha)
    np.testing.assert_array_equal(p[0], [1, 0, 0, 0])
    np.testing.assert_allclose(p[1], [0.5, 0.5, 0, 0], atol=1e-15)


def test_alpha_two_boundary_entry_is_outside_support():
    """At alpha = 2 an entry with s - tau = 0 exactly has p = 0 and no gradient (0**0 trap)."""
    x = np.array([1.0, 0.0, -0.5])  # tau = 0: the second entry sits exactly on the threshold
    p = ref.sparsemax(x)
    np.testing.assert_array_equal(p, [1.0, 0.0, 0.0])
    dx, _, _ = ref.entmax_vjp(x, 2.0, np.array([0.0, 1.0, 0.0]))
    np.testing.assert_array_equal(dx, 0.0)


def test_nan_or_inf_in_a_row_poisons_only_that_row():
    x = np.array([[0.0, np.nan, 1.0], [0.0, np.inf, 1.0], [0.0, 0.5, 1.0]])
    p = ref.entmax(x, 1.5)
    assert np.isnan(p[:2]).all() and np.isfinite(p[2]).all()
    # ... unless its weight is 0: then it is not allowed and never read.
    p = ref.entmax(x, 1.5, weights=np.array([1.0, 0.0, 1.0]))
    assert np.isfinite(p).all()


@given(
    x=hnp.arrays(np.float64, st.integers(1, 12), elements=st.floats(-50, 50)),
    alpha=st.floats(1.0, 2.0),
    shift=st.floats(-1e3, 1e3),
    data=st.data(),
)
def test_invariances(x, alpha, shift, data):
    """Adding a constant changes nothing; permuting entries permutes p; p is a distribution."""
    p = ref.entmax(x, alpha)
    np.testing.assert_allclose(ref.entmax(x + shift, alpha), p, atol=1e-9)
    perm = data.draw(st.permutations(range(x.size)))
    np.testing.assert_allclose(ref.entmax(x[perm], alpha), p[perm], atol=1e-13)
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(), 1.0, atol=1e-14)


def test_axis_and_per_row_alpha():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 5, 4))
    alpha = np.array([1.0, 1.5, 2.0]).reshape(3, 1, 1)
    p = ref.entmax(x, alpha, axis=1)
    for i, a in enumerate([1.0, 1.5, 2.0]):
        np.testing.assert_allclose(p[i], ref.entmax(x[i].T, a).T, atol=1e-15)


def test_solve_rows_exposes_a_consistent_solution():
    x, w = _rows(10)
    eps = np.linspace(0, 1, x.shape[0])
    sol = solve_rows(np.where(w > 0, x, -np.inf), w, eps)
    support = sol.p > 0
    # p / m = exp(log_ratio) and u = 1 + eps t on the support.
    np.testing.assert_allclose(sol.p[support], (w * np.exp(sol.log_ratio))[support], rtol=1e-14)
    np.testing.assert_allclose(sol.u, np.where(support, 1 + sol.eps * sol.t, 1.0), rtol=1e-14)


@pytest.mark.parametrize("alpha", [1.0, 1.3, 1.5, 1.9, 2.0])
@pytest.mark.parametrize("log_weight", [0, 8, 18, 30])  # the 60-digit oracle holds to ~1e30
def test_weights_above_one_stay_exact(alpha, log_weight):
    """Heavy weights are solved through p(s, m) = p(lam^eps s, m / lam) (SPEC 2.5)."""
    x = np.array([0.0, -0.3, -1.0, 0.2])
    w = np.array([1.0, 0.5, 2.0, 0.7]) * 10.0**log_weight
    expected = np.array([float(v) for v in entmax_mp(x, alpha, w)])
    np.testing.assert_allclose(ref.entmax(x, alpha, weights=w), expected, rtol=1e-12, atol=1e-15)
