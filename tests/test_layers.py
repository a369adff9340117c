"""attnspec.layers.torch: shapes, gradients of span and alpha (against finite differences),
projection of theta, the span loss, grouped-query heads, rotary positions, and the KV cache
(equal to recomputing the prefix, bounded by the learned span)."""

import math
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from attnspec.layers.torch import (  # noqa: E402
    KVCache,
    SpanAttention,
    apply_rope,
    project_spans,
    span_regularisation,
)


def test_import_of_layers_package_does_not_import_torch():
    code = "import sys, attnspec.layers; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_shapes_and_every_parameter_gets_a_gradient(kv_heads):
    torch.manual_seed(0)
    layer = SpanAttention(32, 4, n_kv_heads=kv_heads, max_span=16, ramp=4, span_init=0.25, alpha=1.3,
                          learn_alpha=True)
    assert layer.k_proj.weight.shape == (kv_heads * 8, 32)
    x = torch.randn(3, 20, 32)
    y = layer(x)
    assert y.shape == (3, 20, 32) and y.dtype == torch.float32
    y.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # Every head has keys on its ramp (z = 4 < L), so every head's theta and alpha move.
    assert (layer.span_theta.grad != 0).all()
    assert (layer.alpha_logit.grad != 0).all()


def test_causality_future_tokens_do_not_change_earlier_outputs():
    torch.manual_seed(1)
    layer = SpanAttention(16, 2, max_span=8, ramp=2, span_init=0.5, alpha=1.5, learn_alpha=True,
                          dtype=torch.float64)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(1, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[:, :7], layer(x2)[:, :7], rtol=0, atol=1e-13)


def test_alpha_stays_in_range_and_initial_values_are_kept():
    layer = SpanAttention(16, 4, alpha=[1.1, 1.5, 1.9, 1.01], learn_alpha=True, dtype=torch.float64)
    torch.testing.assert_close(layer.alpha, torch.tensor([1.1, 1.5, 1.9, 1.01], dtype=torch.float64))
    with torch.no_grad():
        layer.alpha_logit.copy_(torch.tensor([-1e4, -3.0, 3.0, 1e4]))
    a = layer.alpha
    assert bool(((a >= 1) & (a <= 2)).all())
    assert SpanAttention(16, 4, alpha=2.0).alpha == 2.0  # fixed alpha may sit on the ends


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(n_heads=4, alpha=1.0, learn_alpha=True), r"initial alpha in \(1, 2\)"),
    (dict(n_heads=4, alpha=2.5), r"alpha=2.5 must lie in \[1, 2\]"),
    (dict(n_heads=4, max_span=8, span_init=1.5), r"span_init=1.5 must lie in \[0, 1\]"),
    (dict(n_heads=4, max_span=0), "max_span=0"),
    (dict(n_heads=4, ramp=0), "ramp=0"),
    (dict(n_heads=2, head_dim=7), "even head_dim"),
])
def test_bad_arguments_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpanAttention(16, **kwargs)


def _tiny_layer(learn_alpha=True):
    torch.manual_seed(2)
    # z = 10 theta = 3.1, 4.7, 5.8, 2.2 with R = 2: no integer distance sits on a kink of the
    # mask (|d| = z or z + R), so the loss is smooth in theta around this point.
    return SpanAttention(16, 4, n_kv_heads=2, max_span=10, ramp=2, span_init=[0.31, 0.47, 0.58, 0.22],
                         alpha=[1.2, 1.5, 1.05, 1.8] if learn_alpha else 1.0, learn_alpha=learn_alpha,
                         dtype=torch.float64)


def _loss(layer, x, w):
    return (layer(x) * w).sum()


@pytest.mark.parametrize("learn_alpha", [True, False])
def test_span_and_alpha_gradients_match_finite_differences(learn_alpha):
    layer = _tiny_layer(learn_alpha)
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    w = torch.randn(2, 11, 16, dtype=torch.float64)
    _loss(layer, x, w).backward()
    params = [layer.span_theta] + ([layer.alpha_logit] if learn_alpha else [])
    h = 1e-6
    for param in params:
        analytic = param.grad.clone()
        assert (analytic != 0).all()
        numeric = torch.empty_like(analytic)
        for i in range(param.numel()):
            with torch.no_grad():
                param[i] += h
                up = _loss(layer, x, w).item()
                param[i] -= 2 * h
                down = _loss(layer, x, w).item()
                param[i] += h
            numeric[i] = (up - down) / (2 * h)
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_projection_clamps_theta_after_a_step_and_the_forward_never_clamps():
    layer = SpanAttention(16, 4, max_span=10, ramp=2, span_init=0.5)
    with torch.no_grad():
        layer.span_theta.copy_(torch.tensor([-0.5, 0.3, 1.7, 0.9]))
    # An unprojected negative span is a clear error of attnspec's validation, not a silent clamp.
    with pytest.raises(ValueError, match="span"):
        layer(torch.randn(1, 5, 16))
    project_spans(torch.nn.Sequential(layer))
    torch.testing.assert_close(layer.span_theta.detach(), torch.tensor([0.0, 0.3, 1.0, 0.9]))
    # theta = 0 (the paper's initial span) still has a gradient: keys at distance < R sit on the ramp.
    with torch.no_grad():
        layer.span_theta.zero_()
    layer(torch.randn(1, 6, 16)).square().sum().backward()
    assert (layer.span_theta.grad != 0).all()


def test_span_regularisation_is_coefficient_times_summed_mean_spans():
    layers = torch.nn.ModuleList([
        SpanAttention(8, 2, max_span=100, span_init=[0.1, 0.3]),
        SpanAttention(8, 2, max_span=50, span_init=[0.5, 0.7]),
        SpanAttention(8, 2),  # no span: not counted
    ])
    loss = span_regularisation(layers, 0.01)
    torch.testing.assert_close(loss, torch.tensor(0.01 * (20.0 + 30.0)))
    loss.backward()
    torch.testing.assert_close(layers[0].span_theta.grad, torch.full((2,), 0.01 * 100 / 2))
    torch.testing.assert_close(layers[1].span_theta.grad, torch.full((2,), 0.01 * 50 / 2))
    assert span_regularisation(torch.nn.Linear(2, 2), 1.0).item() == 0.0
    with pytest.raises(ValueError, match="max_span is None"):
        layers[2].span_loss()


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(3)
    q, k = torch.randn(1, 1, 1, 8, dtype=torch.float64), torch.randn(1, 1, 1, 8, dtype=torch.float64)
    scores = [(apply_rope(q, torch.tensor([s + 7])) * apply_rope(k, torch.tensor([s + 2]))).sum().item()
              for s in (0, 5, 1000)]
    assert scores[0] == pytest.approx(scores[1], abs=1e-12) and scores[0] == pytest.approx(scores[2], abs=1e-9)
    assert scores[0] != pytest.approx((q * k).sum().item(), abs=1e-6)  # and position matters


CACHE_CASES = {
    "full": dict(),
    "span": dict(max_span=12, ramp=3, span_init=[0.2, 0.5, 0.05, 0.4]),
    "span-alpha-gqa": dict(max_span=12, ramp=3, span_init=[0.2, 0.5, 0.05, 0.4], n_kv_heads=2,
                           alpha=[1.1, 1.5, 1.9, 1.3], learn_alpha=True),
    "fixed-alpha-mqa": dict(max_span=8, ramp=2.5, span_init=0.3, n_kv_heads=1, alpha=1.5),
}


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("case", sorted(CACHE_CASES))
def test_cached_decoding_equals_recomputing_the_prefix(case, dtype, tol):
    torch.manual_seed(4)
    layer = SpanAttention(16, 4, dtype=dtype, **CACHE_CASES[case])
    T = 48
    x = torch.randn(2, T, 16, dtype=dtype)
    with torch.no_grad():
        full = layer(x)
        cache = KVCache()
        bound = layer.cache_bound()
        # A prefill chunk, then one token at a time, then another chunk.
        steps = [(0, 5)] + [(i, i + 1) for i in range(5, 40)] + [(40, T)]
        outs = []
        for a, b in steps:
            outs.append(layer(x[:, a:b], cache))
            assert cache.seen == b
            if bound is not None:
                assert len(cache) <= bound - 1  # with the new key, a step reads <= bound keys
        decoded = torch.cat(outs, dim=1)
    torch.testing.assert_close(decoded, full, rtol=tol, atol=tol)
    if bound is None:
        assert len(cache) == T and cache.start == 0
    else:
        # ceil(max z + R): 12 * 0.5 + 3 = 9, and 8 * 0.3 + 2.5 = 4.9 -> 5; one fewer is kept.
        assert bound == {"span": 9, "span-alpha-gqa": 9, "fixed-alpha-mqa": 5}[case]
        assert cache.max_length == bound - 1 and cache.start == T - bound + 1


@pytest.mark.parametrize("span_init", [0.5, 0.55])  # z + R = 9 (an integer) and 9.6
def test_cache_bound_is_tight_one_key_fewer_changes_the_output(span_init):
    """Every key the cache keeps is needed: dropping the oldest one changes the next step."""
    torch.manual_seed(5)
    layer = SpanAttention(16, 4, max_span=12, ramp=3, span_init=span_init, dtype=torch.float64)
    x = torch.randn(1, 30, 16, dtype=torch.float64)
    with torch.no_grad():
        cache = KVCache()
        layer(x[:, :29], cache)
        bound = layer.cache_bound()
        assert bound == math.ceil(12 * span_init + 3) and len(cache) == bound - 1
        short = KVCache()
        short.k, short.v = cache.k[:, :, 1:].clone(), cache.v[:, :, 1:].clone()
        short.start, short.seen = cache.start + 1, cache.seen
        kept = layer(x[:, 29:], cache)
        dropped = layer(x[:, 29:], short)
        # The reference, from the whole prefix, agrees with the cache that kept its keys.
        torch.testing.assert_close(kept, layer(x)[:, 29:], rtol=1e-12, atol=1e-12)
    assert (kept - dropped).abs().max() > 1e-6


def test_layers_package_reaches_its_submodules_lazily():
    import attnspec.layers

    assert attnspec.layers.torch.SpanAttention is SpanAttention
    with pytest.raises(AttributeError):
        attnspec.layers.nonexistent  # noqa: B018
