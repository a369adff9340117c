"""attnspec.layers.flax: projection, span loss, RoPE (equal to the torch layer's), and the layer
itself (shapes, gradients of span and alpha, GQA, cached decoding equal to recomputing the
prefix, and the output against projections + RoPE + the NumPy reference attention). The layer
runs on the built-in JAX backend."""

import importlib
import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402

import attnspec  # noqa: E402
from attnspec.layers.flax import KVCache, SpanAttention, apply_rope, project_spans, span_regularisation  # noqa: E402


# The built-in JAX backend, named: if it ever fails to load, these tests fail with its reason
# rather than run the layer on something else.
BACKEND = "jax"
# jax >= 0.6 has jax.enable_x64; older releases keep it in jax.experimental.
enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else importlib.import_module("jax.experimental").enable_x64


@pytest.fixture(scope="module")
def backend():
    attnspec.dispatch.registry.load(BACKEND)  # raises BackendUnavailableError with the reason
    return BACKEND


def test_project_spans_clips_only_theta():
    params = {"params": {"attn": {"span_theta": jnp.array([-0.5, 0.3, 1.7]), "alpha_logit": jnp.array([-5.0, 5.0])}}}
    out = project_spans(params)
    np.testing.assert_allclose(out["params"]["attn"]["span_theta"], [0.0, 0.3, 1.0], rtol=1e-7)
    np.testing.assert_array_equal(out["params"]["attn"]["alpha_logit"], [-5.0, 5.0])


def test_span_regularisation_sums_sown_means():
    losses = {"a": {"span_mean": jnp.array(3.0)}, "b": {"span_mean": jnp.array(5.0)}}
    assert float(span_regularisation(losses, 0.5)) == 4.0
    assert float(span_regularisation({}, 0.5)) == 0.0


def test_rope_matches_the_torch_layer():
    torch = pytest.importorskip("torch")
    from attnspec.layers.torch import apply_rope as torch_rope

    x = np.random.default_rng(0).standard_normal((1, 2, 5, 8)).astype(np.float32)
    positions = np.arange(3, 8) + np.array([0, 0, 0, 100_000, 1_000_000])  # float32 angles were 4e-3 off at 1e5
    ours = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions)))
    theirs = torch_rope(torch.from_numpy(x), torch.from_numpy(positions)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_shapes_and_gradients_reach_span_and_alpha(backend):
    layer = SpanAttention(16, 4, n_kv_heads=2, max_span=10, ramp=2, span_init=0.3, alpha=1.4, learn_alpha=True,
                          backend=backend)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 16))
    params = layer.init(jax.random.PRNGKey(1), x)
    y, state = layer.apply(params, x, mutable=["losses"])
    assert y.shape == (2, 12, 16)
    assert float(span_regularisation(state["losses"], 1.0)) == pytest.approx(3.0, rel=1e-6)
    grads = jax.grad(lambda p: jnp.sum(layer.apply(p, x) ** 2))(params)["params"]
    assert bool(jnp.all(grads["span_theta"] != 0)) and bool(jnp.all(grads["alpha_logit"] != 0))


@pytest.mark.parametrize("kwargs", [dict(), dict(max_span=12, ramp=3, span_init=0.5, n_kv_heads=1, alpha=1.5,
                                                  learn_alpha=True)])
def test_cached_decoding_equals_recomputing_the_prefix(kwargs, backend):
    layer = SpanAttention(16, 4, backend=backend, **kwargs)
    T = 16  # z + R = 9: the cache is trimmed from step 9 on
    x = jax.random.normal(jax.random.PRNGKey(2), (1, T, 16))
    params = layer.init(jax.random.PRNGKey(3), x)
    full = layer.apply(params, x)
    cache, outs = KVCache(), []
    for i in range(T):
        y, cache = layer.apply(params, x[:, i:i + 1], cache)
        outs.append(y)
        if "max_span" in kwargs:
            assert len(cache) == min(i + 1, math.ceil(12 * 0.5 + 3) - 1) and cache.seen == i + 1
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=2e-5, atol=2e-5)


def test_layer_equals_projections_rope_and_the_reference_attention(backend):
    """The layer's wiring (head layout, GQA, RoPE on q and k, span = max_span * theta, alpha =
    1 + sigmoid(a), o_proj) against the same model written out with the NumPy reference, float64."""
    H, Hkv, D, L = 4, 2, 4, 9
    with enable_x64(True):
        layer = SpanAttention(16, H, n_kv_heads=Hkv, max_span=10, ramp=1.5, span_init=[0.15, 0.32, 0.5, 0.81],
                              alpha=[1.2, 1.5, 1.7, 1.05], learn_alpha=True, backend=backend,
                              param_dtype=jnp.float64)
        x = jax.random.normal(jax.random.PRNGKey(4), (2, L, 16), jnp.float64)
        params = layer.init(jax.random.PRNGKey(5), x)
        y = np.asarray(layer.apply(params, x))
        p = jax.tree_util.tree_map(np.asarray, params)["params"]
        xs = np.asarray(x)
        q, k, v = (np.einsum("bld,dhe->bhle", xs, p[name]["kernel"]) for name in ("q_proj", "k_proj", "v_proj"))
        positions = jnp.arange(L)
        q, k = (np.asarray(apply_rope(jnp.asarray(a), positions)) for a in (q, k))
        alpha = 1 + 1 / (1 + np.exp(-p["alpha_logit"]))
        out = attnspec.reference.attention(q, k, v, alpha=alpha, span=10 * p["span_theta"], ramp=1.5, causal=True)
        want = np.einsum("bhle,hed->bld", out, p["o_proj"]["kernel"])
    np.testing.assert_allclose(alpha, [1.2, 1.5, 1.7, 1.05], rtol=1e-12)
    np.testing.assert_allclose(y, want, rtol=1e-10, atol=1e-12)
