"""The dispatcher's hot path: the validation fast path describes calls exactly as the general
checks do, and the selection cache never changes a decision (SPEC.md sections 7 and 8)."""

import itertools

import numpy as np
import pytest

import attnspec
from attnspec import Backend, Capabilities, Kernel, validation
from attnspec.dispatch import registry, selection


# clean_registry (tests/conftest.py): no ATTNSPEC_BACKEND, backends a test registers removed after it
pytestmark = pytest.mark.usefixtures("clean_registry")


def qkv(B=1, H=2, Hkv=2, Lq=3, Lk=5, D=4, dtype=np.float32, module=np):
    rng = np.random.default_rng(0)
    arrays = (rng.normal(size=(B, H, Lq, D)), rng.normal(size=(B, Hkv, Lk, D)), rng.normal(size=(B, Hkv, Lk, D)))
    arrays = tuple(a.astype(dtype) for a in arrays)
    if module is np:
        return arrays
    return tuple(module.tensor(a) for a in arrays)


def backend(name, priority=10, max_scores=None, extra=None, calls=None):
    def fn(q, k, v, **kwargs):
        if calls is not None:
            calls.append(name)
        return attnspec.reference.attention(q, k, v, **kwargs)

    caps = Capabilities(array_type="numpy", features=frozenset({"causal", "entmax", "span"}), max_scores=max_scores)
    return Backend(name=name, version="0", kernels={"attention": Kernel("attention", fn, caps, extra_reasons=extra)},
                   priority=priority)


CALLS = [
    dict(),
    dict(alpha=1.5, causal=True),
    dict(alpha=1, span=2.0, ramp=1.0),
    dict(alpha=2.0, span=0, scale=0.5, q_offset=-3),
    dict(alpha=1.25, causal=False, scale=-1),
]


@pytest.mark.parametrize("kwargs", CALLS)
@pytest.mark.parametrize("shape", [dict(), dict(H=4, Hkv=2), dict(B=0), dict(Lq=0, Lk=0)])
def test_fast_validation_describes_calls_as_the_general_checks_do(monkeypatch, kwargs, shape):
    arrays = [qkv(**shape)]
    torch = None
    try:
        import torch
    except ImportError:
        pass
    if torch is not None:
        arrays.append(qkv(module=torch, **shape))
        q, k, v = qkv(module=torch, **shape)
        arrays.append((q.requires_grad_(), k, v))
    for q, k, v in arrays:
        fast = validation._fast_attention(q, k, v, kwargs.get("alpha", 1.0), kwargs.get("span"),
                                          kwargs.get("ramp", 32.0), kwargs.get("causal", False), None,
                                          kwargs.get("q_offset"), kwargs.get("scale"))
        assert fast is not None  # these calls take the fast path
        with monkeypatch.context() as m:
            m.setattr(validation, "_fast_attention", lambda *args: None)
            general = validation.validate_attention(q, k, v, **kwargs)
        assert fast == general
        assert type(fast.sizes["B"]) is int


@pytest.mark.parametrize("kwargs", [dict(alpha=np.float64(1.5)), dict(alpha=True), dict(causal=1),
                                    dict(alpha=float("nan")), dict(ramp=float("inf")), dict(span=-0.5),
                                    dict(q_offset=2**63), dict(scale=float("inf")), dict(alpha=3)])
def test_fast_validation_leaves_everything_else_to_the_general_checks(kwargs):
    q, k, v = qkv()
    args = dict(alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None, q_offset=None, scale=None)
    args.update(kwargs)
    assert validation._fast_attention(q, k, v, *args.values()) is None


def test_a_changed_environment_variable_is_seen_at_once(monkeypatch):
    calls = []
    for name in ("a", "b"):
        attnspec.register_backend(backend(name, priority=0, calls=calls))
    q, k, v = qkv()
    for name in ("a", "b", "a", "numpy"):
        monkeypatch.setenv("ATTNSPEC_BACKEND", name)
        attnspec.attention(q, k, v)
        attnspec.attention(q, k, v)
    assert calls == ["a", "a", "b", "b", "a", "a"]
    monkeypatch.setenv("ATTNSPEC_BACKEND", "nope")
    with pytest.raises(ValueError, match="ATTNSPEC_BACKEND='nope'"):
        attnspec.attention(q, k, v)


def test_policy_order_holds_with_a_warm_cache(monkeypatch):
    calls = []
    for name in ("a", "b", "c"):
        attnspec.register_backend(backend(name, priority=0, calls=calls))
    q, k, v = qkv()
    monkeypatch.setenv("ATTNSPEC_BACKEND", "c")
    for _ in range(2):
        attnspec.attention(q, k, v)
        with attnspec.use_backend("b"):
            attnspec.attention(q, k, v)
            attnspec.attention(q, k, v, backend="a")
    assert calls == ["c", "b", "a"] * 2


def test_registering_a_backend_invalidates_cached_decisions():
    calls = []
    q, k, v = qkv()
    attnspec.attention(q, k, v, alpha=1.5)  # cached: numpy
    attnspec.register_backend(backend("fast", priority=10, calls=calls))
    attnspec.attention(q, k, v, alpha=1.5)
    assert calls == ["fast"]
    attnspec.register_backend(backend("fast", priority=-10, calls=calls), replace=True)
    attnspec.attention(q, k, v, alpha=1.5)
    assert calls == ["fast"]  # numpy outranks it now
    registry.unregister_backend("fast")
    attnspec.register_backend(backend("fast", priority=10, calls=calls))
    attnspec.attention(q, k, v, alpha=1.5)
    assert calls == ["fast", "fast"]


def test_size_limits_split_the_cache():
    calls = []
    attnspec.register_backend(backend("small", priority=10, max_scores=2 * 3 * 5, calls=calls))
    for Lq, expected in ((3, "small"), (4, None), (2, "small"), (4, None)):
        q, k, v = qkv(Lq=Lq)
        attnspec.attention(q, k, v)
        assert (calls.pop() if calls else None) == expected


def test_extra_reasons_are_asked_on_every_call():
    calls, state = [], {"ok": True}
    attnspec.register_backend(backend("picky", priority=10, calls=calls,
                                      extra=lambda call: [] if state["ok"] else ["not today"]))
    q, k, v = qkv()
    for ok in (True, True, False, True, False):
        state["ok"] = ok
        attnspec.attention(q, k, v)
        assert (calls.pop() if calls else None) == ("picky" if ok else None)
    state["ok"] = False
    with pytest.raises(attnspec.UnsupportedCallError, match="not today"):
        attnspec.attention(q, k, v, backend="picky")


def test_decisions_match_explain_for_many_calls(monkeypatch):
    """The cached path picks what a fresh decision (explain) picks, call after call."""
    attnspec.register_backend(backend("capped", priority=5, max_scores=2 * 2 * 3 * 5))
    for kwargs, shape in itertools.product(CALLS[:3], [dict(), dict(B=2), dict(Lk=9)]):
        q, k, v = qkv(**shape)
        for _ in range(2):
            expected = attnspec.explain(q, k, v, **kwargs).selected
            kernel = selection.select(validation.validate_attention(q, k, v, **kwargs))
            assert kernel is registry.load(expected).kernel("attention")
