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
    return Context(backend=name, kernel=kernel, framework=fw, dtype=dtype, device="cpu")


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

