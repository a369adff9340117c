"""The reference attention (SPEC.md sections 3 and 5): values, gradients, edge rules."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import attnspec.reference as ref
from attnspec.reference.span import distances

from oracles import softmax_attention
from test_reference_gradients import central_difference


def make_inputs(seed, B=2, H=4, Hkv=2, Lq=5, Lk=7, D=3, Dv=2, dtype=np.float64):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, H, Lq, D)).astype(dtype)
    k = rng.normal(size=(B, Hkv, Lk, D)).astype(dtype)
    v = rng.normal(size=(B, Hkv, Lk, Dv)).astype(dtype)
    return q, k, v


# Spans and ramp chosen so that no |d| (an integer) sits on a kink z or z + R.
SPAN = np.array([1.3, 2.7, 0.4, 5.2])
RAMP = 1.75
FULL = dict(alpha=np.array([1.05, 1.3, 1.5, 1.9]), span=SPAN, ramp=RAMP, causal=True,
            key_lengths=np.array([7, 5]), q_offset=np.array([2, -1]))


def test_continuity_in_span_example():
    """SPEC 5.2: keys at d = 0, 1, 2 with scores (0, 0.5, 3), values (0, 1, 10), R = 1, alpha 1.5."""
    q = np.ones((1, 1, 1, 1))
    k = np.array([3.0, 0.5, 0.0]).reshape(1, 1, 3, 1)  # key j sits at distance 2 - j
    v = np.array([10.0, 1.0, 0.0]).reshape(1, 1, 3, 1)
    at_1 = ref.attention(q, k, v, alpha=1.5, span=1.0, ramp=1.0, scale=1.0).item()
    just_above = ref.attention(q, k, v, alpha=1.5, span=1.000001, ramp=1.0, scale=1.0).item()
    assert at_1 == pytest.approx(0.673993, abs=5e-7)
    assert just_above == pytest.approx(0.674033, abs=5e-7)
    # The re-weighted form the spec forbids jumps to 10 there.
    m = ref.span_mask(1, 3, 1.000001, 1.0)[0]
    plain = ref.entmax(np.where(m > 0, k[0, 0, :, 0], -np.inf), 1.5)
    assert (m * plain / np.sum(m * plain)) @ v[0, 0, :, 0] == pytest.approx(10.0)


@given(z=st.floats(0.0, 12.0), alpha=st.floats(1.0, 2.0))
def test_output_is_continuous_in_span(z, alpha):
    q, k, v = make_inputs(1, B=1, H=1, Hkv=1)
    kw = dict(alpha=alpha, ramp=2.0, causal=True)
    a = ref.attention(q, k, v, span=z, **kw)
    b = ref.attention(q, k, v, span=z + 1e-7, **kw)
    assert np.abs(a - b).max() < 1e-4


def test_alpha_one_is_softmax_of_scores_plus_log_mask():
    q, k, v = make_inputs(2)
    kw = dict(span=SPAN, ramp=RAMP, causal=True, key_lengths=np.array([7, 4]))
    out = ref.attention(q, k, v, alpha=1.0, **kw)
    B, H, Lq, Lk = 2, 4, 5, 7
    d = distances(Lq, Lk, Lk - Lq)
    m = np.clip((RAMP + SPAN[:, None, None] - np.abs(d)) / RAMP, 0, 1)[None]
    allowed = (d >= 0) & (m > 0) & (np.arange(Lk) < np.array([7, 4])[:, None, None, None])
    heads = np.arange(H) // 2
    expected = softmax_attention(q, k[:, heads], v[:, heads], np.broadcast_to(m, (B, H, Lq, Lk)),
                                 allowed, 1 / np.sqrt(3))
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-15)


def test_gqa_equals_repeated_kv_heads():
    q, k, v = make_inputs(3, H=6, Hkv=2)
    kw = dict(alpha=np.array([1.0, 1.2, 1.5, 1.7, 2.0, 1.5]), causal=True)
    out = ref.attention(q, k, v, **kw)
    repeated = ref.attention(q, np.repeat(k, 3, axis=1), np.repeat(v, 3, axis=1), **kw)
    np.testing.assert_array_equal(out, repeated)


def test_keys_permuted_together_change_nothing():
    q, k, v = make_inputs(4)
    perm = np.random.default_rng(0).permutation(7)
    for alpha in (1.0, 1.5, 2.0, 1.37):
        a = ref.attention(q, k, v, alpha=alpha)
        b = ref.attention(q, k[:, :, perm], v[:, :, perm], alpha=alpha)
        np.testing.assert_allclose(a, b, atol=1e-14)


def test_masked_keys_may_hold_anything():
    """Keys outside the allowed set or the span hold any finite value; padding even NaN/Inf."""
    q, k, v = make_inputs(5)
    kw = dict(FULL, key_lengths=np.array([6, 4]))
    base = ref.attention(q, k, v, **kw)
    base_grads = ref.attention_vjp(q, k, v, np.ones_like(base), **kw)
    k2, v2 = k.copy(), v.copy()
    k2[0, :, 6], v2[0, :, 6] = np.nan, np.inf
    k2[1, :, 4:], v2[1, :, 4:] = -np.inf, np.nan
    np.testing.assert_array_equal(ref.attention(q, k2, v2, **kw), base)
    grads = ref.attention_vjp(q, k2, v2, np.ones_like(base), **kw)
    for name in ("dq", "dalpha", "dspan"):
        np.testing.assert_array_equal(getattr(grads, name), getattr(base_grads, name))
    assert (grads.dk[0, :, 6] == 0).all() and (grads.dv[1, :, 4:] == 0).all()
    # Keys outside every query's span window (m = 0) with huge finite values: no change.
    q1, k1, v1 = make_inputs(6, B=1, H=1, Hkv=1, Lq=1, Lk=8)
    kw1 = dict(alpha=1.5, span=2.0, ramp=1.5, causal=True)  # query at position 7 sees d <= 3.5
    k3, v3 = k1.copy(), v1.copy()
    k3[0, 0, :4], v3[0, 0, :4] = 1e30, -1e30  # d = 7, 6, 5, 4: m = 0
    np.testing.assert_array_equal(ref.attention(q1, k3, v3, **kw1), ref.attention(q1, k1, v1, **kw1))


def test_empty_rows_are_zero_with_zero_gradients_whatever_q_holds():
    q, k, v = make_inputs(7, Lq=4, Lk=4)
    q[:, :, 0] = np.nan  # query 0 has no allowed key below
    kw = dict(alpha=1.5, causal=True, q_offset=np.array([-1, -1]))  # query 0 sits at position -1
    out = ref.attention(q, k, v, **kw)
    assert (out[:, :, 0] == 0).all() and np.isfinite(out).all()
    grads = ref.attention_vjp(q, k, v, np.ones_like(out), **kw)
    assert (grads.dq[:, :, 0] == 0).all()
    assert all(np.isfinite(g).all() for g in grads[:4])
    # key_lengths = 0: every row empty.
    out = ref.attention(q, k, v, alpha=2.0, key_lengths=np.array([0, 0]))
    assert (out == 0).all()


def test_check_finite_raises_instead_of_nan():
    q, k, v = make_inputs(8)
    v[0, 0, 1] = np.nan
    assert np.isnan(ref.attention(q, k, v)).any()
    with pytest.raises(ValueError, match="v holds non-finite"):
        ref.attention(q, k, v, check_finite=True)
    # Padding keys are never read, so they pass check_finite.
    ref.attention(q, k, v, key_lengths=np.array([1, 7]), check_finite=True)


def test_q_offset_default_is_bottom_right_whatever_key_lengths():
    q, k, v = make_inputs(9, Lq=3, Lk=7)
    kw = dict(alpha=1.3, causal=True, key_lengths=np.array([5, 7]))
    np.testing.assert_array_equal(ref.attention(q, k, v, **kw), ref.attention(q, k, v, q_offset=4, **kw))
    # Decoding with a padded cache passes q_offset = key_lengths - Lq.
    per_batch = ref.attention(q, k, v, q_offset=np.array([2, 4]), **kw)
    first = ref.attention(q[:1], k[:1, :, :5], v[:1, :, :5], alpha=1.3, causal=True)
    np.testing.assert_allclose(per_batch[:1], first, atol=1e-15)


def test_dtypes_follow_the_input():
    for dtype in (np.float16, np.float32, np.float64):
        q, k, v = make_inputs(10, dtype=dtype)
        out = ref.attention(q, k, v, alpha=1.5)
        assert out.dtype == dtype
        grads = ref.attention_vjp(q, k, v, np.ones_like(out), alpha=np.float32(1.5), span=np.float16(3.0))
        assert grads.dq.dtype == grads.dk.dtype == grads.dv.dtype == dtype
        assert grads.dalpha.dtype == np.float32 and grads.dspan.dtype == np.float16
        assert grads.dalpha.shape == () and grads.dspan.shape == ()


def _loss(q, k, v, go, **kw):
    return float(np.sum(ref.attention(q, k, v, **kw) * go))


@pytest.mark.parametrize("config", [
    dict(FULL),
    dict(FULL, alpha=1.0),
    dict(FULL, alpha=2.0, causal=False, key_lengths=None),
    dict(alpha=1.5, span=3.3, ramp=2.25),  # scalar span and alpha: gradients summed over heads
])
def test_attention_vjp_matches_finite_differences(config):
    q, k, v = make_inputs(11)
    go = np.random.default_rng(1).normal(size=(2, 4, 5, 2))
    grads = ref.attention_vjp(q, k, v, go, **config)
    for name, x, analytic in (("q", q, grads.dq), ("k", k, grads.dk), ("v", v, grads.dv)):
        def f(value, name=name):
            args = dict(q=q, k=k, v=v)
            args[name] = value
            return _loss(args["q"], args["k"], args["v"], go, **config)
        np.testing.assert_allclose(analytic, central_difference(f, x), atol=2e-8, err_msg=name)
    alpha = np.asarray(config["alpha"], dtype=np.float64)
    if ((alpha > 1.0) & (alpha < 2.0)).all():
        fd = central_difference(lambda a: _loss(q, k, v, go, **dict(config, alpha=a)), alpha)
        np.testing.assert_allclose(grads.dalpha, fd, atol=2e-8)
    fd = central_difference(lambda z: _loss(q, k, v, go, **dict(config, span=z)), config["span"])
    np.testing.assert_allclose(grads.dspan, fd, atol=2e-8)


def probabilities(q, k, **kw):
    """P itself: attention with v = identity returns the rows of P."""
    B, Hkv, Lk, _ = k.shape
    eye = np.broadcast_to(np.eye(Lk), (B, Hkv, Lk, Lk))
    return ref.attention(q, k, eye, **kw)


@given(seed=st.integers(0, 2**32 - 1), alpha=st.floats(1.0, 2.0), z=st.floats(0.0, 8.0),
       ramp=st.floats(0.5, 4.0), causal=st.booleans())
def test_dspan_matches_finite_differences(seed, alpha, z, ramp, causal):
    """Examples where the support changes within the difference step are skipped: there the
    function has a kink (the mask's at |d| = z, z + R, or entmax's support boundary)."""
    q, k, v = make_inputs(seed % 1000, B=1, H=2, Hkv=1, Lq=4, Lk=6)
    go = np.random.default_rng(seed).normal(size=(1, 2, 4, 2))
    kw = dict(alpha=alpha, ramp=ramp, causal=causal)
    h = 1e-7
    assume(z >= 10 * h)
    below, above = probabilities(q, k, span=z - h, **kw), probabilities(q, k, span=z + h, **kw)
    assume(((below > 1e-6) == (above > 1e-6)).all() and ((below > 0) == (above > 0)).all())
    mask_below, mask_above = ref.span_mask(4, 6, z - h, ramp), ref.span_mask(4, 6, z + h, ramp)
    assume((((mask_below > 0) & (mask_below < 1)) == ((mask_above > 0) & (mask_above < 1))).all())
    grads = ref.attention_vjp(q, k, v, go, span=z, **kw)
    fd = central_difference(lambda s: _loss(q, k, v, go, span=s, **kw), np.float64(z), h=h)
    np.testing.assert_allclose(grads.dspan, fd, rtol=1e-5, atol=1e-6)


def test_span_mask_and_its_gradient():
    m = ref.span_mask(3, 5, np.array([0.0, 1.5]), 2.0)
    d = np.arange(3)[:, None] + 2 - np.arange(5)[None, :]
    np.testing.assert_array_equal(m[1], np.clip((2.0 + 1.5 - np.abs(d)) / 2.0, 0, 1))
    assert m.shape == (2, 3, 5)
    assert ref.span_mask(3, 5, 1.0, 2.0, q_offset=np.array([0, 1, 2])).shape == (3, 3, 5)
    grad = np.random.default_rng(0).normal(size=m.shape)
    dspan = ref.span_mask_vjp(3, 5, np.array([0.3, 1.5]), 2.0, grad)
    m_at = ref.span_mask(3, 5, np.array([0.3, 1.5]), 2.0)
    inside = (m_at > 0) & (m_at < 1)
    np.testing.assert_allclose(dspan, (grad * inside).sum(axis=(1, 2)) / 2.0)


def test_span_mask_gradient_is_one_sided_at_the_kinks():
    # z = 1, R = 1: |d| = 1 gives m = 1 exactly, |d| = 2 gives m = 0 exactly: slope 0 at both.
    dspan = ref.span_mask_vjp(1, 3, 1.0, 1.0, np.ones((1, 3)))
    assert dspan == 0.0
    assert ref.span_mask_vjp(1, 3, 1.5, 1.0, np.ones((1, 3))) == 1.0  # |d| = 2: m = 0.5


def _float32_mask(z, R, absd):
    """SPEC.md section 3's order in float32: (z - (|d| - R)) / R."""
    z, R, absd = np.float32(z), np.float32(R), np.asarray(absd, dtype=np.float32)
    return (z - (absd - R)) / R


def test_span_mask_near_the_outer_kink_is_exact():
    """z = 254.0013 (as float32), R = 2, |d| = 256: m is tiny and exact in the spec's order;
    (R + z) - |d| would round R + z first and lose 1.2 % of m."""
    z = float(np.float32(254.0013))
    m = ref.span_mask(1, 1, z, 2.0, q_offset=256)[0, 0]
    exact = (Fraction(z) + 2 - 256) / 2
    assert m == float(exact) and 6.48e-4 < m < 6.49e-4
    assert _float32_mask(z, 2.0, 256) == np.float32(exact)
    old_order = ((np.float32(2.0) + np.float32(z)) - np.float32(256)) / np.float32(2.0)
    assert abs(float(old_order) - m) > 0.01 * m


@given(z=st.floats(0.0, 5000.0, width=32), ramp=st.sampled_from([0.5, 1.0, 2.0, 8.0, 32.0, 64.0]),
       keys=st.integers(1, 40), ulps=st.integers(-64, 64))
def test_span_mask_in_float32_is_within_two_ulps_of_the_reference(z, ramp, keys, ulps):
    """Near the outer kink (|d| up to z + R) with a dyadic R, the float32 order of SPEC.md
    section 3 is within 2 ulps of the reference's m, relative to m itself (no cancellation),
    and m > 0 exactly where z + R > |d|."""
    z = float(np.float32(z) + ulps * np.spacing(np.float32(z)))
    assume(z >= 0)
    top = int(np.floor(z + ramp)) + 1
    m = ref.span_mask(1, min(keys, top + 1), z, ramp, q_offset=top)[0]  # |d| = top, top - 1, ...
    absd = top - np.arange(m.size)
    m32 = np.clip(_float32_mask(z, ramp, absd), 0, 1).astype(np.float64)
    np.testing.assert_allclose(m32, m, rtol=2 * 2.0**-24, atol=0)
    inside = np.array([Fraction(z) + Fraction(ramp) > int(a) for a in absd])
    assert np.array_equal(m > 0, inside) and np.array_equal(m32 > 0, inside)


def test_non_finite_values_poison_only_the_rows_that_read_them():
    q, k = np.ones((1, 1, 2, 2)), np.ones((1, 1, 3, 2))
    v = np.arange(6.0).reshape(1, 1, 3, 2)
    v[0, 0, 2] = np.nan  # key 2 sits at position 2; with q_offset 0 the rows sit at 0 and 1
    out = ref.attention(q, k, v, causal=True, q_offset=0)
    assert np.isfinite(out).all()
    ref.attention(q, k, v, causal=True, q_offset=0, check_finite=True)  # nothing read: no error
    out = ref.attention(q, k, v, causal=True, q_offset=1)  # now row 1 (position 2) reads key 2
    assert np.isfinite(out[0, 0, 0]).all() and np.isnan(out[0, 0, 1]).all()
    with pytest.raises(ValueError, match="v holds non-finite values where a row reads them"):
        ref.attention(q, k, v, causal=True, q_offset=1, check_finite=True)


def test_zero_size_shapes_have_gradients_too():
    z = np.zeros
    grads = ref.attention_vjp(z((1, 2, 3, 4)), z((1, 2, 0, 4)), z((1, 2, 0, 4)), z((1, 2, 3, 4)), alpha=1.3)
    assert grads.dk.shape == (1, 2, 0, 4) and (grads.dq == 0).all()
    grads = ref.attention_vjp(z((0, 2, 3, 4)), z((0, 1, 5, 4)), z((0, 1, 5, 2)), z((0, 2, 3, 2)), span=2.0)
    assert grads.dv.shape == (0, 1, 5, 2) and grads.dspan == 0


# --- key_padding_mask (SPEC.md 1.1, sections 5.1 and 5.3) -------------------------------------

def _prefix_mask(lengths, Lk):
    return np.arange(Lk)[None, :] < np.asarray(lengths)[:, None]


@pytest.mark.parametrize("alpha", [1.0, 1.5, np.array([1.05, 1.3, 1.5, 1.9]), 2.0])
def test_key_padding_mask_of_a_prefix_is_key_lengths(alpha):
    """A mask that allows exactly the keys below key_lengths gives key_lengths' values and VJPs."""
    q, k, v = make_inputs(21)
    lengths = np.array([6, 3])
    kw = dict(FULL, alpha=alpha)
    del kw["key_lengths"]
    go = np.random.default_rng(2).normal(size=(2, 4, 5, 2))
    by_lengths = ref.attention(q, k, v, **kw, key_lengths=lengths)
    by_mask = ref.attention(q, k, v, **kw, key_padding_mask=_prefix_mask(lengths, 7))
    np.testing.assert_array_equal(by_mask, by_lengths)
    g_lengths = ref.attention_vjp(q, k, v, go, **kw, key_lengths=lengths)
    g_mask = ref.attention_vjp(q, k, v, go, **kw, key_padding_mask=_prefix_mask(lengths, 7))
    for a, b in zip(g_mask, g_lengths):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
def test_left_padding_equals_the_unpadded_call(alpha):
    """Left padding: keys 0 .. pad_b - 1 masked. Independent construction: batch b alone, its
    keys sliced from pad_b (slot j becomes j - pad_b, so q_offset drops by pad_b), span and
    causal included. Masked keys hold NaN and get dk = dv = 0 exactly."""
    B, H, Hkv, Lq, Lk = 2, 4, 2, 3, 8
    q, k, v = make_inputs(22, B=B, Lq=Lq, Lk=Lk)
    pads = [3, 0]
    mask = np.arange(Lk)[None, :] >= np.array(pads)[:, None]
    k[0, :, :3], v[0, :, :3] = np.nan, np.inf
    kw = dict(alpha=alpha, span=SPAN, ramp=RAMP, causal=True)
    offsets = np.array([5, 4])
    out = ref.attention(q, k, v, **kw, q_offset=offsets, key_padding_mask=mask)
    assert np.isfinite(out).all()
    go = np.random.default_rng(3).normal(size=out.shape)
    grads = ref.attention_vjp(q, k, v, go, **kw, q_offset=offsets, key_padding_mask=mask)
    assert (grads.dk[0, :, :3] == 0).all() and (grads.dv[0, :, :3] == 0).all()
    dalpha = np.zeros_like(grads.dalpha)
    dspan = np.zeros_like(grads.dspan)
    for b, pad in enumerate(pads):
        sl = (slice(b, b + 1),)
        kb, vb = k[sl][:, :, pad:], v[sl][:, :, pad:]
        alone = ref.attention(q[sl], kb, vb, **kw, q_offset=int(offsets[b]) - pad)
        np.testing.assert_allclose(out[sl], alone, rtol=0, atol=1e-14)
        g = ref.attention_vjp(q[sl], kb, vb, go[sl], **kw, q_offset=int(offsets[b]) - pad)
        np.testing.assert_allclose(grads.dq[sl], g.dq, atol=1e-13)
        np.testing.assert_allclose(grads.dk[sl][:, :, pad:], g.dk, atol=1e-13)
        np.testing.assert_allclose(grads.dv[sl][:, :, pad:], g.dv, atol=1e-13)
        dalpha = dalpha + np.asarray(g.dalpha)
        dspan = dspan + g.dspan
    np.testing.assert_allclose(grads.dalpha, dalpha, atol=1e-12)
    np.testing.assert_allclose(grads.dspan, dspan, atol=1e-12)


def test_key_padding_mask_holes_match_finite_differences_and_empty_rows_are_zero():
    """Masked keys in the middle (not a prefix or suffix), together with key_lengths; a batch
    with no readable key has zero rows and zero gradients whatever q holds."""
    q, k, v = make_inputs(23)
    mask = np.ones((2, 7), bool)
    mask[0, [1, 4]] = False
    mask[1, :] = False
    k2, v2 = k.copy(), v.copy()
    k2[0, :, [1, 4]] = np.nan
    kw = dict(FULL, key_padding_mask=mask)  # with key_lengths [7, 5]
    out = ref.attention(q, k2, v2, **kw)
    assert (out[1] == 0).all() and np.isfinite(out).all()
    go = np.random.default_rng(4).normal(size=out.shape)
    grads = ref.attention_vjp(q, k2, v2, go, **kw)
    assert (grads.dk[0, :, [1, 4]] == 0).all() and (grads.dv[0, :, [1, 4]] == 0).all()
    assert (grads.dq[1] == 0).all() and (grads.dk[1] == 0).all() and (grads.dv[1] == 0).all()
    for name, x, analytic in (("q", q, grads.dq), ("k", k, grads.dk), ("v", v, grads.dv)):
        def f(value, name=name):
            args = dict(q=q, k=k, v=v)
            args[name] = value
            return _loss(args["q"], args["k"], args["v"], go, **kw)
        np.testing.assert_allclose(analytic, central_difference(f, x), atol=2e-8, err_msg=name)
    # A masked key is one whose weight is zero: the span weights of the others do not move.
    P = probabilities(q, k, **dict(FULL, key_lengths=None, alpha=1.0, key_padding_mask=mask))
    m = ref.span_mask(5, 7, SPAN, RAMP, q_offset=FULL["q_offset"])  # [B, H, Lq, Lk]
    scores = np.einsum("bhid,bhjd->bhij", q, np.repeat(k, 2, axis=1)) / np.sqrt(3)
    d = distances(5, 7, FULL["q_offset"])[:, None]
    allowed = mask[:, None, None, :] & (d >= 0) & (m > 0)
    logits = np.where(allowed, scores + np.log(np.where(m > 0, m, 1)), -np.inf)
    expected = np.exp(logits - logits.max(-1, keepdims=True, initial=-1e300))
    expected = np.where(allowed, expected, 0)
    sums = expected.sum(-1, keepdims=True)
    expected = np.where(sums > 0, expected / np.where(sums > 0, sums, 1), 0)
    np.testing.assert_allclose(P, expected, atol=1e-13)
