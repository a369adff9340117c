"""attnspec.layers.torch: shapes, gradients of span and alpha (against finite differences),
projection of theta, the span loss, grouped-query heads, rotary positions, the KV cache
(equal to recomputing the prefix, bounded by the learned span), and the output and input
gradient against projections + rotary positions + the NumPy reference attention."""

import math
import subprocess
import sys

import numpy as np
import pytest

import attnspec

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
    (dict(n_heads=4, alpha=[1.0, 1.5]), r"alpha=\[1.0, 1.5\] must be a number or n_heads=4 numbers"),
    (dict(n_heads=4, alpha=[1.0, 1.5, float("nan"), 1.0]), r"alpha=\[1.0, 1.5, nan, 1.0\] must lie in \[1, 2\]"),
    (dict(n_heads=4, max_span=8, span_init=[0.5, 0.5, 0.5]), r"span_init=\[0.5, 0.5, 0.5\] must be a number or n_heads=4"),
    (dict(n_heads=4, max_span=8, span_init=1.5), r"span_init=1.5 must lie in \[0, 1\]"),
    (dict(n_heads=4, max_span=0), "max_span=0"),
    (dict(n_heads=4, ramp=0), "ramp=0"),
    (dict(n_heads=2, head_dim=7), "even head_dim"),
])
def test_bad_arguments_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpanAttention(16, **kwargs)


def test_fixed_alpha_per_head_changes_only_its_head(monkeypatch):
    """A layer with the fixed alpha [1, 1.5, 1, 1] equals, head for head, the same layer with
    alpha 1 and with alpha 1.5."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    mixed = SpanAttention(16, 4, alpha=[1.0, 1.5, 1.0, 1.0], max_span=6, span_init=0.5, ramp=2)
    assert mixed.fixed_alpha == (1.0, 1.5, 1.0, 1.0) and "alpha: [1, 1.5, 1, 1]" in repr(mixed)
    assert SpanAttention(16, 4, alpha=[1.5] * 4).fixed_alpha == 1.5  # equal heads: one float
    captured = []  # the attention outputs, before o_proj
    original = attnspec.attention

    def spy(*args, **kwargs):
        captured.append(original(*args, **kwargs))
        return captured[-1]

    monkeypatch.setattr(attnspec, "attention", spy)
    with torch.no_grad():
        mixed(x)
        for alpha in (1.0, 1.5):
            layer = SpanAttention(16, 4, alpha=alpha, max_span=6, span_init=0.5, ramp=2)
            layer.load_state_dict(mixed.state_dict())
            layer(x)
    got, softmax, entmax15 = captured
    torch.testing.assert_close(got[:, [0, 2, 3]], softmax[:, [0, 2, 3]], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[:, 1], entmax15[:, 1], rtol=0, atol=1e-6)
    assert (softmax[:, 1] - entmax15[:, 1]).abs().max() > 1e-3


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


def _rope_numpy(x, positions, base=10000.0):
    """RoFormer's rotation, written out: pair (i, i + D/2) turns by position * base^(-2i/D)."""
    half = x.shape[-1] // 2
    angles = np.asarray(positions, dtype=np.float64)[:, None] * base ** (-2.0 * np.arange(half) / x.shape[-1])
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)


def _layer_in_numpy(layer, x):
    """The layer's model written out with NumPy, the rotation above and the reference attention."""
    B, L, _ = x.shape
    H, Hkv, D = layer.n_heads, layer.n_kv_heads, layer.head_dim

    def project(lin, heads):
        w = lin.weight.detach().numpy()
        y = x @ w.T + (0.0 if lin.bias is None else lin.bias.detach().numpy())
        return y.reshape(B, L, heads, -1).transpose(0, 2, 1, 3)

    q, k, v = project(layer.q_proj, H), project(layer.k_proj, Hkv), project(layer.v_proj, Hkv)
    q, k = _rope_numpy(q, np.arange(L)), _rope_numpy(k, np.arange(L))
    alpha = 1.0 + 1.0 / (1.0 + np.exp(-layer.alpha_logit.detach().numpy()))
    span = layer.max_span * layer.span_theta.detach().numpy()
    out = attnspec.reference.attention(q, k, v, alpha=alpha, span=span, ramp=layer.ramp, causal=True)
    out = out.transpose(0, 2, 1, 3).reshape(B, L, H * D)
    return out @ layer.o_proj.weight.detach().numpy().T + layer.o_proj.bias.detach().numpy()


@pytest.mark.parametrize("backend", ["torch", "torch-eager"])
def test_layer_equals_projections_rope_and_the_reference_attention(backend):
    """The wiring (head layout, GQA, RoPE on q and k, span = max_span * theta, alpha = 1 +
    sigmoid(a), o_proj) in float64 against the same model written independently; the input's
    gradient against central differences of that model."""
    torch.manual_seed(0)
    layer = SpanAttention(16, 4, n_kv_heads=2, max_span=10, ramp=1.5, span_init=[0.15, 0.32, 0.5, 0.81],
                          alpha=[1.2, 1.5, 1.7, 1.05], learn_alpha=True, bias=True, backend=backend,
                          dtype=torch.float64)
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    expected = _layer_in_numpy(layer, x.detach().numpy())
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    # d sum(y * w) / dx at a few entries, by central differences of the NumPy model
    w = np.random.default_rng(1).standard_normal(expected.shape)
    (y * torch.from_numpy(w)).sum().backward()
    xs, h = x.detach().numpy(), 1e-6
    for index in [(0, 0, 0), (0, 4, 7), (1, 8, 15), (1, 3, 2)]:
        plus, minus = xs.copy(), xs.copy()
        plus[index] += h
        minus[index] -= h
        numeric = (np.sum(_layer_in_numpy(layer, plus) * w) - np.sum(_layer_in_numpy(layer, minus) * w)) / (2 * h)
        assert x.grad[index].item() == pytest.approx(numeric, rel=1e-6, abs=1e-8)
