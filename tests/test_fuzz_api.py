"""Fuzzing the public API across backends with arbitrary, often invalid, arguments.

The only acceptable outcomes of `attnspec.attention(...)`: a result that agrees with the float64
reference on the same (rounded) inputs, with no NaN where the reference has a number; or a
named ValueError, TypeError or NotImplementedError. Anything else (another exception type, a
crash, garbage) fails. SPEC.md 5.3 and 7.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnspec
from attnspec import reference

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
jnp = jax.numpy

NAMED_ERRORS = (ValueError, TypeError, NotImplementedError)
#: examples per backend: JAX compiles per shape and Triton runs in its interpreter, so fewer
EXAMPLES = {"numpy": 60, "torch-eager": 60, "torch": 60, "jax": 12, "triton": 8}
#: agreement with the reference, relative to max(1, |v|) * max(1, |scores|), per input dtype
AGREEMENT = {"float64": 1e-9, "float32": 5e-5, "float16": 5e-3}

BAD_FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e39, 1e300, 1e-300]
#: what a call may get wrong; about half the examples get one of them, the rest are valid
CORRUPTIONS = ("shape", "heads", "D", "alpha", "span", "ramp", "scale", "causal", "key_lengths", "q_offset")


@st.composite
def calls(draw, backend):
    dtypes = ["float32", "float64"] + (["float16"] if backend in ("torch-eager", "torch") else [])
    dtype = draw(st.sampled_from(dtypes))
    bad = draw(st.sampled_from((None,) * len(CORRUPTIONS) + CORRUPTIONS))
    B, Hkv = draw(st.sampled_from([0, 1, 2, 2])), draw(st.sampled_from([1, 2]))
    H = Hkv * draw(st.sampled_from([1, 2]))
    if bad == "heads":
        H, Hkv = draw(st.sampled_from([(0, 1), (1, 0), (3, 2), (0, 0)]))
    Lq, Lk = draw(st.sampled_from([0, 1, 3, 5, 5])), draw(st.sampled_from([0, 1, 4, 7, 7]))
    D, Dv = (0 if bad == "D" else draw(st.sampled_from([1, 4]))), draw(st.sampled_from([1, 3]))
    shapes = {"q": [B, H, Lq, D], "k": [B, Hkv, Lk, D], "v": [B, Hkv, Lk, Dv]}
    if bad == "shape":
        name = draw(st.sampled_from("qkv"))
        shapes[name] = shapes[name][: draw(st.integers(1, 3))] if draw(st.booleans()) else shapes[name] + [1]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    arrays = {n: rng.uniform(-2, 2, size=s) for n, s in shapes.items()}

    def heads(values):
        return st.lists(values, min_size=max(H, 1), max_size=max(H, 1)).map(np.array)

    kwargs = dict(alpha=draw(st.one_of(st.floats(1.0, 2.0), heads(st.floats(1.0, 2.0)))),
                  span=draw(st.one_of(st.none(), st.floats(0.0, 12.0), heads(st.floats(0.0, 12.0)))),
                  ramp=draw(st.floats(0.01, 40.0)), scale=draw(st.one_of(st.none(), st.floats(-3.0, 3.0))),
                  causal=draw(st.booleans()),
                  key_lengths=draw(st.one_of(st.none(), st.lists(st.integers(0, Lk), min_size=B, max_size=B).map(
                      lambda x: np.array(x, np.int64)))),
                  q_offset=draw(st.one_of(st.none(), st.integers(-6, 10), st.lists(
                      st.integers(-6, 10), min_size=B, max_size=B).map(lambda x: np.array(x, np.int64)))))
    if bad == "alpha":
        kwargs["alpha"] = draw(st.sampled_from([0.5, 2.5, math.nan, math.inf, np.full(H + 1, 1.5)]))
    elif bad in ("span", "ramp", "scale"):
        kwargs[bad] = draw(st.sampled_from(BAD_FLOATS))
    elif bad == "causal":
        kwargs["causal"] = draw(st.sampled_from([0, 1, "yes", None]))
    elif bad == "key_lengths":
        kwargs["key_lengths"] = draw(st.sampled_from([np.full(max(B, 1), 1.5), np.full(B, -1), np.full(B, Lk + 1),
                                                      np.zeros(B + 1, np.int64)]))
    elif bad == "q_offset":
        kwargs["q_offset"] = draw(st.sampled_from([1.5, np.zeros(B + 1, np.int64), 2**63 - 1]))
    return dtype, arrays, kwargs


def _to(backend, x, dtype=None):
    """x as the backend's array type (floats in `dtype`, integers kept), Python numbers as they are."""
    if not isinstance(x, np.ndarray):
        return x
    if x.dtype.kind == "f" and dtype is not None:
        x = x.astype(dtype)
    if backend == "numpy":
        return x
    if backend == "jax":
        return jnp.asarray(x)
    return torch.as_tensor(x)


def _numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _run(backend, dtype, arrays, kwargs):
    q, k, v = (_to(backend, arrays[n], dtype) for n in "qkv")
    params = {n: _to(backend, x) for n, x in kwargs.items()}
    try:
        out = attnspec.attention(q, k, v, backend=backend, **params)
    except NAMED_ERRORS as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        return
    # It ran, so the call is valid: the reference on the same rounded inputs must agree.
    rounded = {n: _numpy(x) for n, x in zip("qkv", (q, k, v))}
    expected = reference.attention(rounded["q"], rounded["k"], rounded["v"], **kwargs)
    got = _numpy(out)
    assert got.shape == expected.shape
    assert not np.isnan(got[~np.isnan(expected)]).any(), "NaN where the reference has a number"
    scale = kwargs["scale"] if kwargs["scale"] is not None else 1 / math.sqrt(max(rounded["q"].shape[-1], 1))
    scores = float(np.abs(rounded["q"]).sum(-1).max(initial=0) * np.abs(rounded["k"]).max(initial=0) * abs(scale))
    actual = str(q.dtype).rsplit(".", 1)[-1]  # jax without x64 makes float32 of float64 data
    atol = AGREEMENT[actual] * max(1.0, float(np.abs(rounded["v"]).max(initial=0))) * max(1.0, scores)
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("backend", sorted(EXAMPLES))
def test_attention_gives_a_right_result_or_a_named_error(backend, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    @settings(max_examples=EXAMPLES[backend], deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(call=calls(backend))
    def run(call):
        _run(backend, *call)

    run()
