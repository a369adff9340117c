"""key_padding_mask (SPEC.md 1.1) on every backend: values and gradients equal the reference,
masked keys may hold NaN and get dk = dv = 0 exactly, a backend without the feature is passed
over with its reason."""

import importlib

import numpy as np
import pytest

import attnspec
import attnspec.reference as ref

B, H, Hkv, Lq, Lk, D = 2, 4, 2, 5, 9, 8
SPAN = np.array([1.3, 2.7, 0.4, 5.2])


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, H, Lq, D))
    k = rng.normal(size=(B, Hkv, Lk, D))
    v = rng.normal(size=(B, Hkv, Lk, D))
    mask = np.ones((B, Lk), bool)
    mask[0, :3] = False  # left padding
    mask[1, [2, 6]] = False  # holes
    k[~mask[:, None, :].repeat(Hkv, 1)] = np.nan
    v[~mask[:, None, :].repeat(Hkv, 1)] = np.nan
    go = rng.normal(size=(B, H, Lq, D))
    return q, k, v, mask, go


CONFIGS = [
    dict(alpha=1.0, causal=True),
    dict(alpha=1.5, span=SPAN, ramp=1.75, causal=True, q_offset=np.array([4, 2])),
    dict(alpha=np.array([1.0, 1.3, 1.6, 2.0]), span=3.5, ramp=2.0, key_lengths=np.array([9, 7])),
    dict(alpha=1.2, causal=True, q_offset=np.array([-2, 4])),  # empty rows in batch 0
]


def _expected(q, k, v, mask, go, kw):
    out = ref.attention(q, k, v, key_padding_mask=mask, **kw)
    grads = ref.attention_vjp(q, k, v, go, key_padding_mask=mask, **kw)
    return out, grads


@pytest.mark.parametrize("config", range(len(CONFIGS)))
@pytest.mark.parametrize("backend", ["torch", "torch-eager"])
def test_torch_backends(backend, config):
    torch = pytest.importorskip("torch")
    q, k, v, mask, go = _inputs(config)
    kw = CONFIGS[config]
    out_ref, g_ref = _expected(q, k, v, mask, go, kw)

    def t(x, grad=False):
        return torch.tensor(x, requires_grad=grad)

    tq, tk, tv = t(q, True), t(k, True), t(v, True)
    tkw = {name: (t(val, name in ("alpha", "span")) if isinstance(val, np.ndarray) else val)
           for name, val in kw.items()}
    out = attnspec.attention(tq, tk, tv, key_padding_mask=torch.tensor(mask), backend=backend, **tkw)
    np.testing.assert_allclose(out.detach().numpy(), out_ref, atol=1e-12)
    out.backward(t(go))
    np.testing.assert_allclose(tq.grad.numpy(), g_ref.dq, atol=1e-11)
    np.testing.assert_allclose(tk.grad.numpy(), g_ref.dk, atol=1e-11)
    np.testing.assert_allclose(tv.grad.numpy(), g_ref.dv, atol=1e-11)
    masked = ~mask[:, None, :].repeat(Hkv, 1)
    assert (tk.grad.numpy()[masked] == 0).all() and (tv.grad.numpy()[masked] == 0).all()
    for name, expected in (("alpha", g_ref.dalpha), ("span", g_ref.dspan)):
        if isinstance(tkw.get(name), torch.Tensor):
            np.testing.assert_allclose(tkw[name].grad.numpy(), expected, atol=1e-10, err_msg=name)


def test_torch_tiled_with_many_tiles(monkeypatch):
    """Several query tiles and windows that key_lengths would skip: the mask still applies."""
    torch = pytest.importorskip("torch")
    from attnspec.backends.torch import attention as tiled

    monkeypatch.setattr(tiled, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(tiled, "SOFTMAX_BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(tiled, "MIN_TILE", 1)
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(2, 2, 12, 4)), rng.normal(size=(2, 1, 12, 4)), rng.normal(size=(2, 1, 12, 4))
    mask = rng.random((2, 12)) > 0.3
    for alpha in (1.0, 1.5):
        kw = dict(alpha=alpha, span=4.0, ramp=2.0, causal=True, key_lengths=np.array([12, 10]))
        expected = ref.attention(q, k, v, key_padding_mask=mask, **kw)
        tkw = dict(kw, key_lengths=torch.tensor(kw["key_lengths"]))
        got = attnspec.attention(*(torch.tensor(x) for x in (q, k, v)), key_padding_mask=torch.tensor(mask),
                                 backend="torch", **tkw)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_jax_backend(config):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    q, k, v, mask, go = _inputs(config)
    kw = CONFIGS[config]
    enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else importlib.import_module("jax.experimental").enable_x64
    with enable_x64(True):
        out_ref, g_ref = _expected(q, k, v, mask, go, kw)
        jkw = {name: (jnp.asarray(val) if isinstance(val, np.ndarray) else val) for name, val in kw.items()}
        jmask = jnp.asarray(mask)

        def f(q, k, v):
            return attnspec.attention(q, k, v, key_padding_mask=jmask, backend="jax", **jkw)

        out, vjp = jax.vjp(f, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
        dq, dk, dv = vjp(jnp.asarray(go))
    np.testing.assert_allclose(np.asarray(out), out_ref, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dq), g_ref.dq, atol=1e-11)
    np.testing.assert_allclose(np.asarray(dk), g_ref.dk, atol=1e-11)
    np.testing.assert_allclose(np.asarray(dv), g_ref.dv, atol=1e-11)
    masked = ~mask[:, None, :].repeat(Hkv, 1)
    assert (np.asarray(dk)[masked] == 0).all() and (np.asarray(dv)[masked] == 0).all()


def test_numpy_backend_and_explain():
    q, k, v, mask, _ = _inputs()
    out = attnspec.attention(q, k, v, key_padding_mask=mask, alpha=1.5, backend="numpy")
    np.testing.assert_array_equal(out, ref.attention(q, k, v, key_padding_mask=mask, alpha=1.5))
    assert np.isfinite(out).all()
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    tq, tk, tv = (torch.tensor(x, dtype=torch.float32) for x in (q, k, v))
    decision = attnspec.explain(tq, tk, tv, key_padding_mask=torch.tensor(mask))
    assert decision.selected is not None and decision.selected != "triton"
    reasons = dict(decision.considered)
    # torch-decode does not declare the feature: it is passed over with that reason.
    assert reasons["torch-decode"] == ["feature 'key_padding_mask' is not supported"], str(decision)
    # triton declares it: its reasons (if any: CPU tensors without the interpreter) never name it.
    assert not any("key_padding_mask" in r for r in reasons["triton"]), str(decision)
    meta = attnspec.explain(*(x.to("meta") for x in (tq, tk, tv)), key_padding_mask=torch.tensor(mask).to("meta"),
                            backend="triton")
    assert meta.selected == "triton", str(meta)


def test_torch_compile_fullgraph_with_a_mask():
    """The mask is an optional tensor argument of the custom op: it traces without graph breaks."""
    torch = pytest.importorskip("torch")
    q, k, v, mask, go = _inputs(7)
    tq = torch.tensor(q, requires_grad=True)
    tk, tv, tmask = torch.tensor(k), torch.tensor(v), torch.tensor(mask)

    def f(q, k, v, mask):
        return attnspec.attention(q, k, v, alpha=1.5, causal=True, key_padding_mask=mask, backend="torch")

    out = torch.compile(f, fullgraph=True)(tq, tk, tv, tmask)
    expected, grads = _expected(q, k, v, mask, go, dict(alpha=1.5, causal=True))
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-12)
    out.backward(torch.tensor(go))
    np.testing.assert_allclose(tq.grad.numpy(), grads.dq, atol=1e-11)
