"""No silent garbage: mixed devices, empty dimensions, parameters the compute dtype cannot hold,
traced key_lengths, plugins whose checks raise, and the messages of `attnspec info` and the API
(SPEC.md 5.3 and 7). Each case runs on every backend it concerns."""

from __future__ import annotations

import numpy as np
import pytest

import attnspec
from attnspec import reference
from attnspec.dispatch import registry

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

TORCH_BACKENDS = ["torch-eager", "torch", "triton"]
ALL_BACKENDS = ["numpy", "torch-eager", "torch", "jax", "triton"]


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the triton backend runs on CPU only under it


def _array(backend, x, dtype="float32"):
    if backend == "numpy":
        return np.asarray(x, dtype=dtype)
    if backend == "jax":
        return jnp.asarray(x, dtype=dtype)
    return torch.as_tensor(np.asarray(x), dtype=getattr(torch, dtype))


def _numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


# 1. Devices ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("moved", ["q", "k", "v"])
def test_tensors_on_different_devices_are_refused_by_name(backend, moved):
    args = {n: torch.randn(1, 2, 4, 8) for n in "qkv"}
    args[moved] = args[moved].to("meta")
    with pytest.raises(ValueError, match=rf"must be on one device; got .*{moved} on meta"):
        attnspec.attention(args["q"], args["k"], args["v"], backend=backend)


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("name", ["alpha", "span", "key_lengths", "q_offset"])
def test_parameters_on_another_device_are_refused_by_name(backend, name):
    q = torch.randn(1, 2, 4, 8)
    values = {"alpha": torch.full((2,), 1.5), "span": torch.full((2,), 3.0),
              "key_lengths": torch.tensor([3]), "q_offset": torch.tensor([0])}
    with pytest.raises(ValueError, match=rf"{name} is on meta but q is on cpu"):
        attnspec.attention(q, q, q, backend=backend, **{name: values[name].to("meta")})


@pytest.mark.parametrize("backend", ["torch-eager", "torch"])
def test_every_tensor_on_meta_and_0dim_cpu_scalars_are_accepted(backend):
    q = torch.randn(2, 4, 5, 8, device="meta")
    k = torch.randn(2, 2, 7, 8, device="meta")
    out = attnspec.attention(q, k, k, alpha=torch.tensor(1.5), span=torch.tensor(3.0), backend=backend)
    assert out.device.type == "meta" and out.shape == (2, 4, 5, 8)


def test_entmax_and_span_mask_refuse_mixed_devices():
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="weights is on meta but x is on cpu"):
        attnspec.entmax(x, 1.5, weights=torch.ones(3, 5, device="meta"))
    with pytest.raises(ValueError, match="alpha is on meta"):
        attnspec.entmax(x, torch.full((3, 1), 1.5, device="meta"))
    with pytest.raises(ValueError, match="q_offset is on meta but span is on cpu"):
        attnspec.span_mask(3, 5, torch.tensor([1.0, 2.0]), 2.0, q_offset=torch.tensor([0, 1], device="meta"))


# 2. Empty dimensions ---------------------------------------------------------------------------

EMPTY_SHAPES = {  # (q shape, k/v shape)
    "B=0": ((0, 2, 4, 8), (0, 1, 4, 8)),
    "Lq=0": ((1, 2, 0, 8), (1, 1, 4, 8)),
    "Lk=0": ((1, 2, 4, 8), (1, 1, 0, 8)),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("case", sorted(EMPTY_SHAPES))
@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_empty_dimensions_give_empty_or_zero_results(backend, case, alpha):
    q_shape, kv_shape = EMPTY_SHAPES[case]
    rng = np.random.default_rng(0)
    q, k = _array(backend, rng.normal(size=q_shape)), _array(backend, rng.normal(size=kv_shape))
    out = attnspec.attention(q, k, k, alpha=alpha, span=3.0, causal=True, backend=backend)
    assert tuple(out.shape) == q_shape
    assert np.array_equal(_numpy(out), np.zeros(q_shape))


@pytest.mark.parametrize("backend", ["torch-eager", "torch", "triton"])
def test_an_empty_kv_cache_passes_zero_gradients(backend):
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    k = torch.randn(1, 2, 0, 8, requires_grad=True)
    alpha = torch.full((2,), 1.5, requires_grad=True)
    span = torch.full((2,), 4.0, requires_grad=True)
    out = attnspec.attention(q, k, k, alpha=alpha, span=span, backend=backend)
    out.sum().backward()
    for t in (q, k, alpha, span):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_jax_empty_kv_cache_gradients_are_zero():
    q, k = jnp.ones((1, 2, 3, 8)), jnp.ones((1, 2, 0, 8))
    grads = jax.grad(lambda q, a: attnspec.attention(q, k, k, alpha=a).sum(), argnums=(0, 1))(q, jnp.full((2,), 1.5))
    assert not np.asarray(grads[0]).any() and not np.asarray(grads[1]).any()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("heads", [(0, 1), (0, 0), (2, 0)])
def test_zero_heads_are_refused_by_name(backend, heads):
    H, Hkv = heads
    q, k = _array(backend, np.zeros((1, H, 4, 8))), _array(backend, np.zeros((1, Hkv, 4, 8)))
    with pytest.raises(ValueError, match=rf"query heads H={H} must be a positive multiple.*Hkv={Hkv}"):
        attnspec.attention(q, k, k, backend=backend)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (0,)])
def test_entmax_over_an_empty_array_is_empty(backend, shape):
    out = attnspec.entmax(_array(backend, np.zeros(shape)), 1.5, backend=None if backend == "jax" else backend)
    assert tuple(out.shape) == shape


# 3. Parameters the compute dtype cannot hold ---------------------------------------------------

UNREPRESENTABLE = [
    (dict(ramp=1e39), r"ramp=1e\+39 is not finite in float32"),
    (dict(scale=1e39), r"scale=1e\+39 is not finite in float32"),
    (dict(span=1e39), r"span=1e\+39 is not finite in float32"),
    (dict(span=1e300), r"span=1e\+300 is not finite in float32"),
    (dict(span=2.0, ramp=1e-300), r"ramp=1e-300 is too small in float32"),
    (dict(span=3e38, ramp=1e38), r"span \+ ramp = .* is not finite in float32"),
]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("kwargs, message", UNREPRESENTABLE)
def test_parameters_that_overflow_the_compute_dtype_are_refused(backend, dtype, kwargs, message):
    q = _array(backend, np.random.default_rng(0).normal(size=(1, 2, 6, 8)), dtype)
    with pytest.raises(ValueError, match=message):
        attnspec.attention(q, q, q, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["numpy", "torch-eager", "torch"])
@pytest.mark.parametrize("kwargs", [dict(span=1e300), dict(span=2.0, ramp=1e-300), dict(ramp=1e300, span=1.0)])
def test_the_same_parameters_are_exact_in_float64(backend, kwargs):
    x = np.random.default_rng(1).normal(size=(1, 2, 6, 8))
    out = attnspec.attention(_array(backend, x, "float64"), _array(backend, x, "float64"),
                             _array(backend, x, "float64"), alpha=1.5, backend=backend, **kwargs)
    want = reference.attention(x, x, x, alpha=1.5, **kwargs)
    np.testing.assert_allclose(_numpy(out), want, rtol=0, atol=1e-12)


def test_tensor_parameters_are_checked_in_the_compute_dtype():
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="span=.* is not finite in float32"):
        attnspec.attention(q, q, q, span=torch.tensor([1.0, 1e39], dtype=torch.float64), backend="torch")


# 4. Traced key_lengths are clamped to [0, Lk] --------------------------------------------------

def test_jax_clamps_traced_key_lengths():
    rng = np.random.default_rng(2)
    q, k = jnp.asarray(rng.normal(size=(2, 2, 3, 8))), jnp.asarray(rng.normal(size=(2, 2, 6, 8)))

    @jax.jit
    def run(lengths):
        return attnspec.attention(q, k, k, alpha=1.5, key_lengths=lengths)

    np.testing.assert_array_equal(np.asarray(run(jnp.array([9, -4]))), np.asarray(run(jnp.array([6, 0]))))


def test_torch_clamps_key_lengths_it_could_not_validate():
    from attnspec.backends import _torch_op

    q, k = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 6, 8)
    args = _torch_op.normalise(q, k, k, 1.5, None, 2.0, False, torch.tensor([9, -4]), None, None)
    assert args[7].tolist() == [6, 0]


# 5. A plugin whose capability check raises ----------------------------------------------------

def _broken_backend():
    def broken(call):
        raise KeyError("device table")

    def fn(*args, **kwargs):
        raise AssertionError("never selected")

    caps = attnspec.Capabilities(array_type="numpy", features=frozenset(attnspec.validation.FEATURES["attention"]))
    return attnspec.Backend(name="brokenplugin", version="0", priority=100,
                            kernels={"attention": attnspec.Kernel("attention", fn, caps, extra_reasons=broken)})


def test_a_plugin_whose_check_raises_is_passed_over_with_its_name(clean_registry):
    attnspec.register_backend(_broken_backend())
    q = np.random.default_rng(0).normal(size=(1, 1, 3, 4))
    out = attnspec.attention(q, q, q)  # automatic selection goes on to numpy
    np.testing.assert_allclose(out, reference.attention(q, q, q))
    text = str(attnspec.explain(q, q, q))
    assert "brokenplugin: its capability check (extra_reasons) raised KeyError" in text
    with pytest.raises(RuntimeError, match="backend 'brokenplugin': its capability check"):
        attnspec.attention(q, q, q, backend="brokenplugin")


# 6. Messages -------------------------------------------------------------------------------------

def test_a_backend_whose_framework_is_not_installed_says_so(clean_registry, capsys):
    def missing():
        raise ModuleNotFoundError("No module named 'cupy'", name="cupy")

    registry._discover()
    registry._entries["cupybackend"] = registry._Entry("cupybackend", "entry point", missing)
    status = {s.name: s for s in attnspec.list_backends()}["cupybackend"]
    assert not status.available and status.missing == "cupy"
    from attnspec import cli

    cli.main(["info"])
    out = capsys.readouterr().out
    assert "not installed (cupy)" in out and "cupybackend (entry point) failed" not in out


def test_a_list_as_q_says_how_to_convert_it():
    with pytest.raises(TypeError, match=r"q must be an array .*got list \(convert it first: np.asarray\(q"):
        attnspec.attention([[1.0]], np.ones((1, 1, 1, 1)), np.ones((1, 1, 1, 1)))


def test_a_mistyped_backend_name_suggests_the_closest():
    q = np.ones((1, 1, 2, 4))
    with pytest.raises(ValueError, match="did you mean 'torch'"):
        attnspec.attention(q, q, q, backend="torhc")


# 7. JAX: entmax and span_mask under jit, vmap and grad ----------------------------------------------

def test_jax_entmax_and_span_mask_match_the_reference_with_gradients():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 9)) * 2
    x[1, :4] = -np.inf
    alpha = np.array([[1.0], [1.4], [2.0]])
    w = rng.uniform(0, 2.5, size=(3, 9))
    g = rng.normal(size=x.shape)
    f = jax.jit(lambda x, a, w: attnspec.entmax(x, a, weights=w))
    out, vjp = jax.vjp(f, jnp.asarray(x, jnp.float32), jnp.asarray(alpha, jnp.float32), jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(np.asarray(out), reference.entmax(x, alpha, weights=w), atol=2e-6)
    for got, want in zip(vjp(jnp.asarray(g, jnp.float32)), reference.entmax_vjp(x, alpha, g, weights=w)):
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    batched = jax.vmap(lambda row: attnspec.entmax(row, 1.5))(jnp.asarray(x[[0, 2]], jnp.float32))
    np.testing.assert_allclose(np.asarray(batched), reference.entmax(x[[0, 2]], 1.5), atol=2e-6)

    span = np.array([2.0, 5.5])
    m, vjp = jax.vjp(lambda z: attnspec.span_mask(4, 9, z, 2.0, q_offset=jnp.array([0, 3])), jnp.asarray(span))
    np.testing.assert_array_equal(np.asarray(m), reference.span_mask(4, 9, span, 2.0, q_offset=np.array([0, 3])))
    gm = rng.normal(size=m.shape)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(gm, jnp.float32))[0]),
                               reference.span_mask_vjp(4, 9, span, 2.0, gm, q_offset=np.array([0, 3])), rtol=1e-6)


def test_jax_backend_declares_every_op():
    statuses = {s.name: s for s in attnspec.list_backends()}
    assert set(statuses["jax"].ops) == {"attention", "entmax", "span_mask", "partial"}


def test_bench_list_targets_agrees_with_the_dispatcher_for_triton():
    from attnspec.bench.cli import list_targets

    line = next(x for x in list_targets().splitlines() if x.startswith("triton "))
    q = torch.randn(1, 1, 16, 16)
    runs = attnspec.explain(q, q, q, backend="triton").selected == "triton"
    assert (" ok " in line) == runs, line
