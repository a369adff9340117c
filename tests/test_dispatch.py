"""The dispatcher: registry, selection order, reasons, explain, errors, scoping (SPEC.md section 8)."""

import asyncio
import subprocess
import sys
import threading

import numpy as np
import pytest

import attnspec
from attnspec import Backend, Capabilities, Kernel, UnsupportedCallError
from attnspec.dispatch import registry
from attnspec.errors import BackendUnavailableError


def qkv(dtype=np.float32):
    rng = np.random.default_rng(0)
    return (rng.normal(size=(1, 2, 3, 4)).astype(dtype), rng.normal(size=(1, 2, 5, 4)).astype(dtype),
            rng.normal(size=(1, 2, 5, 4)).astype(dtype))


class Recorder:
    """A kernel function that records that it ran and defers to the reference."""

    def __init__(self, name):
        self.name, self.calls = name, 0

    def __call__(self, q, k, v, **kwargs):
        self.calls += 1
        return attnspec.reference.attention(q, k, v, **kwargs)


def fake_backend(name="fast", priority=10, dtypes=("float32",), features=frozenset({"causal", "entmax"}),
                 automatic=True):
    fn = Recorder(name)
    kernel = Kernel("attention", fn, Capabilities(array_type="numpy", dtypes=dtypes, features=features))
    return Backend(name=name, version="0.0", kernels={"attention": kernel}, priority=priority,
                   automatic=automatic), fn


# clean_registry (tests/conftest.py): no ATTNSPEC_BACKEND, backends a test registers removed after it
pytestmark = pytest.mark.usefixtures("clean_registry")


def test_automatic_takes_the_highest_priority_backend_that_accepts():
    backend, fn = fake_backend()
    attnspec.register_backend(backend)
    q, k, v = qkv()
    attnspec.attention(q, k, v, alpha=1.5, causal=True)
    assert fn.calls == 1
    # A call it cannot run (a span) goes to the reference, and explain says why.
    attnspec.attention(q, k, v, span=2.0)
    assert fn.calls == 1
    decision = attnspec.explain(q, k, v, span=2.0)
    assert decision.selected == "numpy" and decision.source == "automatic selection"
    assert dict(decision.considered)["fast"] == ["feature 'span' is not supported"]
    decision = attnspec.explain(*qkv(np.float64))
    assert dict(decision.considered)["fast"] == ["dtype=float64 (supported: float32)"]


def test_named_backend_that_cannot_run_the_call_raises_with_reasons():
    backend, fn = fake_backend()
    attnspec.register_backend(backend)
    q, k, v = qkv(np.float64)
    with pytest.raises(UnsupportedCallError) as info:
        attnspec.attention(q, k, v, span=1.0, backend="fast")
    assert info.value.reasons == {"fast": ["dtype=float64 (supported: float32)", "feature 'span' is not supported"]}
    assert "backends from backend= argument" in str(info.value)
    assert isinstance(info.value, NotImplementedError)
    assert fn.calls == 0  # and it did not fall back to the reference silently


def test_unknown_names_are_value_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend='nope' is not a registered backend \(registered: numpy"):
        attnspec.attention(q, k, v, backend="nope")
    with pytest.raises(ValueError, match="use_backend='nope'"):
        with attnspec.use_backend("nope"):
            pass


def test_selection_order_argument_context_environment(monkeypatch):
    for name in ("a", "b", "c"):
        attnspec.register_backend(fake_backend(name, priority=0)[0])
    q, k, v = qkv()
    monkeypatch.setenv("ATTNSPEC_BACKEND", "c")
    assert attnspec.explain(q, k, v).selected == "c"
    assert attnspec.explain(q, k, v).source == "ATTNSPEC_BACKEND"
    with attnspec.use_backend("b"):
        assert attnspec.explain(q, k, v).selected == "b"
        assert attnspec.explain(q, k, v, backend="a").selected == "a"
    assert attnspec.explain(q, k, v).selected == "c"
    monkeypatch.setenv("ATTNSPEC_BACKEND", "zzz")
    with pytest.raises(ValueError, match="ATTNSPEC_BACKEND='zzz' is not a registered backend"):
        attnspec.attention(q, k, v)


def test_use_backend_list_is_an_ordered_enabled_set():
    attnspec.register_backend(fake_backend("fast")[0])
    q, k, v = qkv()
    with attnspec.use_backend("fast", "numpy"):
        assert attnspec.explain(q, k, v).selected == "fast"
        assert attnspec.explain(q, k, v, span=1.0).selected == "numpy"  # fast refuses span
    with attnspec.use_backend("fast"):
        with pytest.raises(UnsupportedCallError):
            attnspec.attention(q, k, v, span=1.0)


def test_use_backend_restores_on_exit_and_on_error():
    attnspec.register_backend(fake_backend("fast", priority=-1)[0])
    q, k, v = qkv()
    with pytest.raises(RuntimeError):
        with attnspec.use_backend("fast"):
            with attnspec.use_backend("numpy"):
                assert attnspec.explain(q, k, v).selected == "numpy"
            assert attnspec.explain(q, k, v).selected == "fast"
            raise RuntimeError("boom")
    assert attnspec.explain(q, k, v).selected == "numpy"  # automatic again (fast has priority -1)


def test_use_backend_is_thread_and_task_local():
    attnspec.register_backend(fake_backend("fast", priority=-1)[0])
    q, k, v = qkv()
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name):
        with attnspec.use_backend(name):
            barrier.wait()
            seen[name] = attnspec.explain(q, k, v).selected

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("fast", "numpy")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"fast": "fast", "numpy": "numpy"}

    async def task(name):
        with attnspec.use_backend(name):
            await asyncio.sleep(0.01)
            return attnspec.explain(q, k, v).selected

    async def both():
        return await asyncio.gather(task("fast"), task("numpy"))

    assert asyncio.run(both()) == ["fast", "numpy"]


def test_explicit_only_backends_are_never_chosen_automatically():
    backend, fn = fake_backend("interp", priority=100, automatic=False)
    attnspec.register_backend(backend)
    q, k, v = qkv()
    decision = attnspec.explain(q, k, v)
    assert decision.selected == "numpy"
    assert "runs only when named" in dict(decision.considered)["interp"][0]
    attnspec.attention(q, k, v, backend="interp")
    assert fn.calls == 1


def test_a_backend_that_fails_to_load_is_reported_and_breaks_nothing():
    def broken():
        raise ImportError("libcuda.so.1: cannot open shared object file")

    registry._entries["broken"] = registry._Entry("broken", "builtin", broken, ("numpy",))
    q, k, v = qkv()
    assert attnspec.explain(q, k, v).selected == "numpy"
    status = {s.name: s for s in attnspec.list_backends()}["broken"]
    assert not status.available and "libcuda.so.1" in status.error
    with pytest.raises(BackendUnavailableError, match="broken: unavailable: ImportError: libcuda"):
        attnspec.attention(q, k, v, backend="broken")


def test_builtin_backends_load_lazily_by_array_type(monkeypatch):
    """A backend for another array type is not imported to serve a NumPy call."""
    loads = []

    def loader():
        loads.append(1)
        return fake_backend("lazy")[0]

    registry._entries["lazy"] = registry._Entry("lazy", "builtin", loader, ("torch",))
    q, k, v = qkv()
    decision = attnspec.explain(q, k, v)
    assert dict(decision.considered)["lazy"] == ["array type numpy (supported: torch)"]
    assert loads == []


def test_automatic_priority_does_not_depend_on_what_was_loaded_before():
    """A not-yet-loaded backend (entry point, builtin) with a higher priority wins at once."""
    registry._entries["zfast"] = registry._Entry("zfast", "entry point", lambda: fake_backend("zfast")[0])
    q, k, v = qkv()
    assert attnspec.explain(q, k, v).selected == "zfast"
    assert attnspec.explain(q, k, v).selected == "zfast"


def test_empty_environment_selection_is_an_error(monkeypatch):
    monkeypatch.setenv("ATTNSPEC_BACKEND", " , ")
    with pytest.raises(ValueError, match="names no backend"):
        attnspec.attention(*qkv())


def test_register_backend_refuses_duplicates_unless_replace():
    backend, _ = fake_backend()
    attnspec.register_backend(backend)
    with pytest.raises(ValueError, match="already registered"):
        attnspec.register_backend(backend)
    attnspec.register_backend(fake_backend(priority=3)[0], replace=True)
    with pytest.raises(TypeError, match="takes an attnspec Backend"):
        attnspec.register_backend("fast")
    with pytest.raises(ValueError, match="cannot be unregistered"):
        attnspec.unregister_backend("numpy")


def test_standalone_ops_dispatch_and_explain():
    x = np.array([[0.5, 1.0, -2.0]])
    np.testing.assert_array_equal(attnspec.entmax(x, 1.5), attnspec.reference.entmax(x, 1.5))
    np.testing.assert_array_equal(attnspec.softmax(x), attnspec.reference.entmax(x, 1.0))
    np.testing.assert_array_equal(attnspec.sparsemax(x), attnspec.reference.entmax(x, 2.0))
    np.testing.assert_array_equal(attnspec.entmax15(x), attnspec.reference.entmax(x, 1.5))
    np.testing.assert_array_equal(attnspec.span_mask(2, 3, 1.0, 1.0), attnspec.reference.span_mask(2, 3, 1.0, 1.0))
    decision = attnspec.explain(x, 1.5, op="entmax")
    assert decision.selected == "numpy" and decision.op == "entmax"
    # A backend without an entmax kernel says so.
    attnspec.register_backend(fake_backend()[0])
    assert dict(attnspec.explain(x, 1.5, op="entmax").considered)["fast"] == ["does not implement 'entmax'"]
    with pytest.raises(ValueError, match="op='nope' is not an attnspec op"):
        attnspec.explain(x, op="nope")


def test_torch_tensors_go_to_a_torch_backend_never_to_numpy():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.tensor(a) for a in qkv())
    decision = attnspec.explain(q, k, v)
    assert decision.selected == "torch-sdpa"  # alpha = 1, no span: torch's own SDPA
    assert dict(decision.considered)["numpy"] == ["array type torch (supported: numpy)"]
    with pytest.raises(UnsupportedCallError, match="numpy: array type torch"):
        attnspec.attention(q, k, v, backend="numpy")


def test_explain_prints_every_reason():
    attnspec.register_backend(fake_backend()[0])
    text = str(attnspec.explain(*qkv(np.float16), span=1.0))
    assert text.splitlines()[0] == "attention: backend 'numpy' (automatic selection)"
    assert "fast: dtype=float16 (supported: float32); feature 'span' is not supported" in text


def test_import_needs_numpy_only():
    """`import attnspec` (and a NumPy call) imports no optional framework."""
    code = ("import sys, numpy as np, attnspec; attnspec.attention(*(np.zeros((1, 1, 2, 2)),) * 3); "
            "print(sorted(m for m in ('torch', 'jax', 'triton', 'entmax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
