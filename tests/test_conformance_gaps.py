"""Cases the conformance suite once got wrong, on every backend that runs here: the span weight
near the outer kink (SPEC.md section 3), NaN where the reference has a number, and the forms in
which alpha and span reach a kernel.

The Triton backend runs under its interpreter: TRITON_INTERPRET is read when its kernels are
defined, so this module sets it at import (as test_triton_backend does).
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

os.environ["TRITON_INTERPRET"] = "1"

import attnspec  # noqa: E402
from attnspec.conformance import attention as attention_checks  # noqa: E402
from attnspec.conformance import frameworks  # noqa: E402
from attnspec.conformance._compare import CheckFailed, Context  # noqa: E402
from attnspec.conformance.cases import AttentionCase  # noqa: E402
from attnspec.dispatch import registry  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from mutants import MUTANTS  # noqa: E402

_NEEDS = {"numpy": (), "torch-eager": ("torch",), "torch": ("torch",), "jax": ("jax",), "triton": ("torch", "triton")}


def _kernel(name):
    missing = [m for m in _NEEDS[name] if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")
    kernel = registry.load(name).kernel("attention")
    if name == "triton" and not sys.modules["attnspec.backends.triton"].INTERPRETED:
        pytest.skip("the triton backend was loaded before TRITON_INTERPRET=1 was set")
    return kernel


def _context(name, kernel, dtype):
    fw = frameworks.framework(kernel.capabilities.array_type)
    if dtype not in kernel.capabilities.dtypes or dtype not in fw.available_dtypes():
        pytest.skip(f"{name} does not run {dtype} here")
    return Context(backend=name, kernel=kernel, framework=fw, dtype=dtype, device="cpu",
                   gradient_names=frozenset(kernel.gradients))


def outer_kink_case(D=16) -> AttentionCase:
    """z = 254.0013 (float32), R = 2: the key at |d| = 256 has m = 6.485e-4, and its score
    (log 1/m above the key at |d| = 254, m = 1) makes the two weigh the same. Computing
    (R + z) - |d| in float32 gives m = 6.409e-4 and moves the output by 0.015 (allowed: 8e-4).
    The key at |d| = 255 (m = 0.5) has a score far below."""
    z, R = float(np.float32(254.0013)), 2.0
    m0 = (z - (256 - R)) / R
    q = np.zeros((1, 1, 1, D))
    q[..., 0] = 1.0
    k = np.zeros((1, 1, 3, D))
    k[0, 0, :, 0] = [np.log(1 / m0), -20.0, 0.0]
    v = np.zeros((1, 1, 3, D))
    v[0, 0, :, 0] = [1.0, 5.0, -1.0]
    v[0, 0, :, 1] = [2.0, 0.0, -3.0]
    return AttentionCase(q=q, k=k, v=v, grad_out=np.ones((1, 1, 1, D)), alpha=1.0, span=z, ramp=R,
                         q_offset=256, scale=1.0, note="outer kink z = 254.0013")


BACKENDS = ["numpy", "torch-eager", "torch", "jax", "triton"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("name", BACKENDS)
def test_span_weight_near_the_outer_kink(name, dtype):
    ctx = _context(name, _kernel(name), dtype)
    attention_checks.check_values(ctx, outer_kink_case())
    assert ctx.counters["gradient_checks"] == 1  # values and gradients were both compared


def test_the_outer_kink_case_fails_a_mask_formed_as_r_plus_z_first():
    """The regression test can fail: the reference with m = ((R + z) - |d|) / R in float32."""
    name = "mask (R + z) - |d|"
    attnspec.register_backend(MUTANTS[name], replace=True)
    try:
        kernel = registry.load(name).kernel("attention")
        with pytest.raises(CheckFailed, match=r"\[forward\]"):
            attention_checks.check_values(_context(name, kernel, "float32"), outer_kink_case())
    finally:
        attnspec.unregister_backend(name)


# --- NaN where the reference has a number fails every check ------------------------------------

def _nan_in_row_0(backend_name):
    """The reference with row 0 of every output NaN (p in the entmax op): what the entmax
    package returns for some half-precision rows (deep-spin/entmax #30)."""
    from attnspec import Backend, Capabilities, Kernel, reference
    from attnspec.dispatch.capabilities import all_features

    def attention(q, k, v, **kw):
        out = reference.attention(q, k, v, **kw)
        out[:, :, 0] = np.nan
        return out

    def entmax(x, alpha, axis=-1, weights=None):
        p = reference.entmax(x, alpha, axis=axis, weights=weights)
        np.moveaxis(p, axis, -1)[(0,) * (p.ndim - 1)] = np.nan
        return p

    def caps(op):
        return Capabilities(array_type="numpy", dtypes=("float16", "float32", "float64"), features=all_features(op))

    return Backend(name=backend_name, version="planted", priority=-100, automatic=False, kernels={
        "attention": Kernel("attention", attention, caps("attention"), vjp=reference.attention_vjp),
        "entmax": Kernel("entmax", entmax, caps("entmax"), vjp=reference.entmax_vjp)})


def _attention_case(**kw):
    rng = np.random.default_rng(3)
    q, k, v = rng.normal(size=(1, 4, 3, 4)), rng.normal(size=(1, 2, 5, 4)), rng.normal(size=(1, 2, 5, 4))
    return AttentionCase(q=q, k=k, v=v, grad_out=rng.normal(size=(1, 4, 3, 4)), **kw)


def _check_cases():
    from hypothesis import HealthCheck, find, settings

    from attnspec.conformance import entmax as entmax_checks
    from attnspec.conformance import strategies
    from attnspec.conformance.cases import EntmaxCase

    plain = _attention_case(alpha=1.0)  # GQA, alpha = 1, no mask: every attention check applies
    continuity = find(strategies.continuity_cases(frozenset()), lambda case: True,
                      settings=settings(database=None, derandomize=True, suppress_health_check=list(HealthCheck)))
    x = np.round(np.random.default_rng(4).normal(size=(3, 5)) * 8) / 8  # x + 8 is exact in float32
    entmax_case = EntmaxCase(x=x, grad_out=np.ones_like(x), alpha=1.5)
    cases = {fn: ("attention", plain) for fn in attention_checks.CHECKS}
    cases[attention_checks.check_masked_keys] = ("attention", _attention_case(alpha=1.5, key_lengths=np.array([3])))
    cases[attention_checks.check_continuity] = ("attention", continuity)
    cases.update({fn: ("entmax", entmax_case) for fn in entmax_checks.CHECKS})
    return cases


CHECK_CASES = _check_cases()


@pytest.mark.parametrize("check", list(CHECK_CASES), ids=lambda fn: f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}")
def test_nan_where_the_reference_has_a_number_fails_every_check(check):
    op, case = CHECK_CASES[check]
    attnspec.register_backend(_nan_in_row_0("nan row 0"), replace=True)
    try:
        for name, fails in (("numpy", False), ("nan row 0", True)):
            kernel = registry.load(name).kernel(op)
            ctx = Context(backend=name, kernel=kernel, framework=frameworks.framework("numpy"), dtype="float32",
                          device="cpu", gradient_names=frozenset(kernel.gradients))
            if fails:
                with pytest.raises(CheckFailed, match="nan"):
                    check(ctx, case)
            else:
                check(ctx, case)  # the case is one the check applies to and the reference passes
    finally:
        attnspec.unregister_backend("nan row 0")


# --- alpha and span reach the kernel as users pass them -----------------------------------------

def _recording(name, inner_name):
    """A backend that runs `inner_name`'s attention and records the form of alpha and span."""
    from attnspec import Backend, Kernel

    inner = registry.load(inner_name).kernel("attention")
    seen = []

    def form(x):
        if x is None:
            return None
        return type(x).__name__ if isinstance(x, (int, float)) else str(x.dtype).replace("torch.", "")

    def fn(q, k, v, **kw):
        seen.append((str(q.dtype).replace("torch.", ""), form(kw.get("alpha")), form(kw.get("span"))))
        return inner.fn(q, k, v, **kw)

    kernel = Kernel("attention", fn, inner.capabilities, vjp=inner.vjp)
    return Backend(name=name, version="0", kernels={"attention": kernel}, priority=-100, automatic=False), seen


@pytest.mark.parametrize("inner", ["numpy", "torch-eager", "jax"])
def test_alpha_and_span_reach_the_kernel_as_numbers_or_arrays_of_its_dtype(inner):
    """No float32 array for a float16 call (its promotion would choose the float32 path):
    numbers stay numbers, arrays (per head, or 0-d for a gradient) have the input dtype."""
    _kernel(inner)
    backend, seen = _recording("recording", inner)
    attnspec.register_backend(backend, replace=True)
    try:
        from attnspec import conformance

        report = conformance.check("recording", cells=["span"], dtypes=["float16"], examples=3)
    finally:
        attnspec.unregister_backend("recording")
    assert report.passed, str(report)
    forms = {f for _, alpha, span in seen for f in (alpha, span) if f is not None}
    assert {dtype for dtype, _, _ in seen} == {"float16"}
    assert "float" in forms and "float16" in forms  # both forms were passed
    assert forms <= {"float", "float16"}, forms
