"""attnspec.layers.flax: projection, span loss, RoPE (equal to the torch layer's), and the layer
itself (shapes, gradients of span and alpha, GQA, cached decoding equal to recomputing the
prefix). The layer runs on the registered JAX backend of attnspec.attention when there is one,
else on a test-only stand-in: the NumPy reference through jax.pure_callback."""

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402

import attnspec  # noqa: E402
from attnspec.layers.flax import KVCache, SpanAttention, apply_rope, project_spans, span_regularisation  # noqa: E402


def _jax_backend():
    for status in attnspec.list_backends():
        if status.available and "jax" in status.array_types and "attention" in status.ops:
            return status.name
    return None


def _reference_in_jax():
    """A test-only JAX backend: the NumPy reference (float64) through jax.pure_callback, with
    the reference's VJP as its custom_vjp. Slow and CPU-only, but exact: it lets the layer's own
    logic (projections, RoPE, span/alpha parameters, cache) be tested where no real JAX backend
    is registered yet."""
    import functools

    from attnspec import Backend, Capabilities, Kernel
    from attnspec.dispatch.capabilities import all_features

    ref = attnspec.reference

    @functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
    def op(q, k, v, alpha, span, has_span, static):
        return _forward(q, k, v, alpha, span, has_span, static)

    def _kwargs(alpha, span, has_span, static):
        ramp, causal, q_offset, scale = static
        return dict(alpha=np.asarray(alpha), span=np.asarray(span) if has_span else None, ramp=ramp,
                    causal=causal, q_offset=q_offset, scale=scale)

    def _forward(q, k, v, alpha, span, has_span, static):
        shape = jax.ShapeDtypeStruct(q.shape[:3] + v.shape[3:], q.dtype)

        def host(*arrays):
            q, k, v, alpha, span = (np.asarray(x) for x in arrays)  # callbacks may get jax arrays
            return np.asarray(ref.attention(q, k, v, **_kwargs(alpha, span, has_span, static)), q.dtype)

        return jax.pure_callback(host, shape, q, k, v, alpha, span)

    def fwd(q, k, v, alpha, span, has_span, static):
        return _forward(q, k, v, alpha, span, has_span, static), (q, k, v, alpha, span)

    def bwd(has_span, static, saved, grad_out):
        q, k, v, alpha, span = saved
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in saved)

        def host(*arrays):
            q, k, v, alpha, span, grad_out = (np.asarray(x) for x in arrays)
            g = ref.attention_vjp(q, k, v, grad_out, **_kwargs(alpha, span, has_span, static))
            dspan = g.dspan if has_span else np.zeros_like(span)
            return tuple(np.asarray(x, y.dtype) for x, y in zip((g.dq, g.dk, g.dv, g.dalpha, dspan), (q, k, v, alpha, span)))

        return jax.pure_callback(host, shapes, q, k, v, alpha, span, grad_out)

    op.defvjp(fwd, bwd)

    def kernel(q, k, v, *, alpha, span, ramp, causal, key_lengths, q_offset, scale):
        assert key_lengths is None
        H = q.shape[1]
        alpha_h = jnp.broadcast_to(jnp.asarray(alpha, q.dtype), (H,))
        span_h = jnp.broadcast_to(jnp.asarray(0.0 if span is None else span, q.dtype), (H,))
        static = (float(ramp), bool(causal), None if q_offset is None else int(q_offset),
                  None if scale is None else float(scale))
        return op(q, k, v, alpha_h, span_h, span is not None, static)

    features = all_features("attention") - {"key_lengths"}
    return Backend(name="test-jax-reference", version="test", priority=-100, kernels={
        "attention": Kernel("attention", kernel, Capabilities(
            array_type="jax", devices=("cpu",), dtypes=("float32", "float64"), features=features))})


@pytest.fixture(scope="module")
def backend():
    """The registered JAX backend, or the reference stand-in for this module's tests."""
    name = _jax_backend()
    if name is not None:
        yield name
        return
    stand_in = _reference_in_jax()
    attnspec.register_backend(stand_in)
    try:
        yield stand_in.name
    finally:
        attnspec.unregister_backend(stand_in.name)


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
    positions = np.arange(3, 8)
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
