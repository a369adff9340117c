"""Checks of the stand-alone `span_mask` (SPEC.md section 3)."""

from __future__ import annotations

import numpy as np

from attnspec import api, reference, validation

from . import emulation, tolerances
from ._compare import CheckFailed, Context, assert_close
from .cases import SpanMaskCase
from .frameworks import GradientsUnsupported


def check_values(ctx: Context, case: SpanMaskCase) -> None:
    rc = case.rounded(ctx.dtype)
    fw = ctx.framework
    # span decides the call's array type (SPEC.md section 8): pass it as the framework's array,
    # 0-d when the case's span is a number.
    span = fw.param(np.asarray(rc.span, dtype=np.float64), tolerances.COMPUTE[ctx.dtype], ctx.device)
    q_offset = fw.integers(rc.q_offset, ctx.device)
    ctx.admit(validation.validate_span_mask(rc.Lq, rc.Lk, span, rc.ramp, q_offset=q_offset))
    out = fw.to_numpy(api.span_mask(rc.Lq, rc.Lk, span, rc.ramp, q_offset=q_offset, backend=ctx.backend))
    expected = reference.span_mask(rc.Lq, rc.Lk, rc.span, rc.ramp, q_offset=rc.q_offset)
    # m is computed in the compute dtype: (z - (|d| - R)) / R, a few roundings (SPEC.md section 3).
    atol = 4 * tolerances.EPS[tolerances.COMPUTE[ctx.dtype]] * (1 + np.max(np.abs(rc.span)) + rc.Lk + rc.Lq) / rc.ramp
    assert_close("forward", "m", out, expected, atol)
    if not (ctx.gradients and rc.gradients and "span" in ctx.gradient_names):
        return
    static = dict(Lq=rc.Lq, Lk=rc.Lk, ramp=rc.ramp, q_offset=q_offset)
    try:
        _, grads = fw.vjp(ctx.kernel, {"span": span}, static, fw.array(rc.grad_out, ctx.dtype, ctx.device), ["span"],
                          ctx.backend)
    except GradientsUnsupported:
        ctx.gradients = False
        return
    if grads.get("span") is None:
        raise CheckFailed("dspan", "the kernel provides dspan (Kernel.gradients) but returned None")
    ctx.counters["gradient_checks"] += 1
    expected = reference.span_mask_vjp(rc.Lq, rc.Lk, rc.span, rc.ramp, rc.grad_out, q_offset=rc.q_offset)
    if ctx.dtype in tolerances.LOW_PRECISION:
        # span, m and dspan are all in the compute dtype: the float32 error of a sum, relative
        # to the sum of its terms' magnitudes.
        magnitude = reference.span_mask_vjp(rc.Lq, rc.Lk, rc.span, rc.ramp, np.abs(rc.grad_out), q_offset=rc.q_offset)
        compute = tolerances.compute_gradient_atol(ctx.dtype, 0.0, expected, float(np.max(np.abs(magnitude))))
        atol = tolerances.rounding_atol(emulation.result_dtype("span", ctx.dtype), ctx.dtype, expected, 0.0, compute)
    else:
        floor = float(np.max(np.abs(rc.grad_out), initial=0.0)) * rc.Lq * rc.Lk / rc.ramp
        atol = tolerances.gradient_atol(ctx.dtype, 0.0, expected, floor)
    assert_close("dspan", "dspan", fw.to_numpy(grads["span"]), expected, atol)
    ctx.checked.add("span")


CHECKS = (check_values,)
