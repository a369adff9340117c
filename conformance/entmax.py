"""Checks of the stand-alone `entmax` (SPEC.md section 2): values and gradients against the
reference, shift invariance, and the rows the `entmax` package got wrong (all -inf, very
negative in half precision, peaked)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from attnspec import api, reference, validation
from attnspec.reference.entmax import solve_rows

from . import emulation, tolerances
from ._compare import CheckFailed, Context, assert_close
from .attention import _LARGEST
from .cases import EntmaxCase, as_arrays, round_to
from .frameworks import GradientsUnsupported


def _call(ctx: Context, case: EntmaxCase, *, gradients: bool):
    fw = ctx.framework
    args = {"x": fw.array(case.x, ctx.dtype, ctx.device), "alpha": fw.param(case.alpha, ctx.dtype, ctx.device)}
    if case.weights is not None:
        args["weights"] = fw.array(case.weights, ctx.dtype, ctx.device)
    static = {"axis": case.axis}
    ctx.admit(validation.validate_entmax(**args, **static))
    wrt = [n for n in ("x", "alpha", "weights") if n in ctx.gradient_names and (n != "weights" or case.weights is not None)]
    if not (gradients and wrt):
        return fw.to_numpy(api.entmax(**args, **static, backend=ctx.backend)), None
    out, grads = fw.vjp(ctx.kernel, args, static, fw.array(case.grad_out, ctx.dtype, ctx.device), wrt, ctx.backend)
    return fw.to_numpy(out), {n: None if g is None else fw.to_numpy(g) for n, g in grads.items()}


def _atol(ctx, case):
    return tolerances.forward_atol(ctx.dtype, case.max_score(), 1.0)


def check_values(ctx: Context, case: EntmaxCase) -> None:
    """p and gradients against the reference; alpha as in attention.check_values."""
    want = ctx.gradients and case.gradients
    numpy = ctx.kernel.capabilities.array_type == "numpy"
    differentiated = ("alpha",) if numpy or "alpha_grad" in ctx.kernel.capabilities.features else ()
    rc = (as_arrays(case, differentiated) if want else case).rounded(ctx.dtype)
    try:
        out, grads = _call(ctx, rc, gradients=want)
    except GradientsUnsupported:
        ctx.gradients, want = False, False
        rc = case.rounded(ctx.dtype)
        out, grads = _call(ctx, rc, gradients=False)
    expected = reference.entmax(rc.x, rc.alpha, axis=rc.axis, weights=rc.weights)
    low = ctx.dtype in tolerances.LOW_PRECISION
    if low:
        compute = tolerances.compute_forward_atol(ctx.dtype, rc.max_score(), 1.0)
        atol = tolerances.rounding_atol(ctx.dtype, ctx.dtype, expected, emulation.entmax(rc), compute)
    else:
        atol = _atol(ctx, rc)
    assert_close("forward", "p", out, expected, atol)
    if not (want and grads):
        return
    max_score = rc.max_score()
    s = np.moveaxis(rc.x, rc.axis, -1)
    w = np.ones_like(s) if rc.weights is None else np.moveaxis(rc.weights, rc.axis, -1)
    eps = np.moveaxis(np.broadcast_to(np.asarray(rc.alpha, float), rc.x.shape), rc.axis, -1)[..., 0] - 1.0
    n = s.shape[-1]
    gap = solve_rows(s.reshape(-1, n), w.reshape(-1, n), eps.reshape(-1)).gap
    if gap.size and float(np.min(gap)) < tolerances.gradient_margin(ctx.dtype, max_score):
        ctx.counters["gradient_skips"] += 1
        return
    dx, dalpha, dweights = reference.entmax_vjp(rc.x, rc.alpha, rc.grad_out, axis=rc.axis, weights=rc.weights)
    compared = [g for n, g in (("x", dx), ("alpha", dalpha), ("weights", dweights)) if n in grads and g is not None]
    if any(np.max(np.abs(g), initial=0.0) > _LARGEST[ctx.dtype] for g in compared):
        ctx.counters["gradient_skips"] += 1  # not representable in the dtype it is returned in
        return
    ctx.counters["gradient_checks"] += 1
    floor = float(np.max(np.abs(rc.grad_out), initial=0.0))
    for name, ref_grad in (("x", dx), ("alpha", dalpha), ("weights", dweights)):
        if name not in grads:
            continue
        if grads[name] is None:
            raise CheckFailed("d" + name, f"the kernel provides d{name} (Kernel.gradients) but returned None")
        if ref_grad is None:
            continue
        if low:
            atol = tolerances.rounding_atol(emulation.result_dtype(name, ctx.dtype), ctx.dtype, ref_grad,
                                            emulation.entmax(rc),
                                            tolerances.compute_gradient_atol(ctx.dtype, max_score, ref_grad, floor))
        else:
            atol = tolerances.gradient_atol(ctx.dtype, max_score, ref_grad, floor)
        assert_close("d" + name, "d" + name, grads[name], ref_grad, atol)
        ctx.checked.add(name)


def check_shift_invariance(ctx: Context, case: EntmaxCase) -> None:
    """Adding a constant to every entry changes nothing."""
    rc = case.rounded(ctx.dtype)
    # The shift must be exact in the dtype for every entry (x + 8 is not, near 3e4 in float16,
    # and rounding would merge entries): 8, or else the spacing at the largest magnitude.
    finite = np.abs(rc.x[np.isfinite(rc.x)])
    top = float(finite.max()) if finite.size else 0.0
    for shift in (8.0, 2.0 ** np.ceil(np.log2(max(top, 1.0))) * 2.0 ** -7):
        if np.array_equal(round_to(rc.x + shift, ctx.dtype), rc.x + shift):
            break
    else:
        return
    out, _ = _call(ctx, rc, gradients=False)
    shifted_case = replace(rc, x=rc.x + shift)
    shifted, _ = _call(ctx, shifted_case, gradients=False)
    atol = 2 * tolerances.forward_atol(ctx.dtype, shifted_case.max_score(), 1.0)
    # NaN agrees with NaN only where the reference has NaN (x holding NaN or +inf in a row).
    nan_where = (np.isnan(reference.entmax(rc.x, rc.alpha, axis=rc.axis, weights=rc.weights))
                 if (np.isnan(rc.x) | (rc.x == np.inf)).any() else False)
    assert_close("shift invariance", "p", shifted, out, atol, nan_where=nan_where)


CHECKS = (check_values, check_shift_invariance)
