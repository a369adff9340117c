"""Checks of `attention` (SPEC.md section 5): values and gradients against the reference, and
metamorphic properties that need no reference at all."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from attnspec import api, reference, validation
from attnspec.errors import UnsupportedCallError

from . import emulation, tolerances
from ._compare import CheckFailed, Context, assert_close, assert_zero
from .cases import AttentionCase, as_arrays
from .frameworks import GradientsUnsupported

#: The largest finite number of each dtype.
_LARGEST = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38,
            "float64": 1.7976931348623157e308}
#: A huge finite value for keys that must not matter, per dtype (it must fit the dtype).
_HUGE = {"float64": 1e30, "float32": 1e30, "bfloat16": 1e4, "float16": 1e4}


def _call(ctx: Context, case: AttentionCase, *, gradients: bool):
    """(out, grads or None) of the backend under test on an already-rounded case, as float64."""
    fw = ctx.framework
    args = {
        "q": fw.array(case.q, ctx.dtype, ctx.device),
        "k": fw.array(case.k, ctx.dtype, ctx.device),
        "v": fw.array(case.v, ctx.dtype, ctx.device),
        "alpha": fw.param(case.alpha, ctx.dtype, ctx.device),
        "span": fw.param(case.span, ctx.dtype, ctx.device),
    }
    static = dict(ramp=case.ramp, causal=case.causal, scale=case.scale,
                  key_lengths=fw.integers(case.key_lengths, ctx.device),
                  q_offset=fw.integers(case.q_offset, ctx.device))
    if case.key_padding_mask is not None:  # only kernels declaring the feature see the argument
        static["key_padding_mask"] = _booleans(fw, case.key_padding_mask, ctx.device)
    ctx.admit(validation.validate_attention(**args, **static))
    # Only the gradients the kernel provides are asked for (and so checked).
    wrt = [n for n in ("q", "k", "v", "alpha", "span") if n in ctx.gradient_names and (n != "span" or case.span is not None)]
    if not (gradients and wrt):
        return fw.to_numpy(api.attention(**args, **static, backend=ctx.backend)), None
    cotangent = fw.array(case.grad_out, ctx.dtype, ctx.device)
    out, grads = fw.vjp(ctx.kernel, args, static, cotangent, wrt, ctx.backend)
    return fw.to_numpy(out), {name: None if g is None else fw.to_numpy(g) for name, g in grads.items()}


def _booleans(fw, mask, device):
    """A bool numpy array as an array of the framework under test."""
    if fw.name == "torch":
        return fw.torch.tensor(mask, dtype=fw.torch.bool, device=device)
    if fw.name == "jax":
        return fw.jax.device_put(np.asarray(mask, dtype=bool), fw._device(device))  # jnp.asarray compiles a copy
    return np.asarray(mask, dtype=bool)


def _excluded(case: AttentionCase) -> np.ndarray:
    """[B, Lk]: keys beyond key_lengths or masked by key_padding_mask (they may hold NaN)."""
    B, Lk = case.k.shape[0], case.k.shape[2]
    excluded = np.zeros((B, Lk), dtype=bool)
    if case.key_lengths is not None:
        excluded |= np.arange(Lk)[None, :] >= np.asarray(case.key_lengths)[:, None]
    if case.key_padding_mask is not None:
        excluded |= ~np.asarray(case.key_padding_mask, dtype=bool)
    return excluded


def _reference(case: AttentionCase, v=None):
    return reference.attention(case.q, case.k, case.v if v is None else v, **case.kwargs)


def _differentiated(ctx: Context, names) -> tuple:
    """Of alpha/span, those whose gradient the kernel declares (all for a NumPy vjp)."""
    features = ctx.kernel.capabilities.features
    if ctx.kernel.capabilities.array_type == "numpy":
        return tuple(names)
    return tuple(n for n in names if f"{n}_grad" in features)


def _reference_nan(case: AttentionCase, grad: str | None = None):
    """Where the reference has NaN (out, or the gradient `grad` such as 'dq'): nowhere for finite
    inputs (SPEC.md 5.3), so a backend's NaN there fails a check even against its own NaN."""
    if all(np.isfinite(x).all() for x in (case.q, case.k, case.v)):
        return False
    if grad is None:
        return np.isnan(_reference(case))
    return np.isnan(getattr(reference.attention_vjp(case.q, case.k, case.v, case.grad_out, **case.kwargs), grad))


def _forward_atol(ctx, case):
    return tolerances.forward_atol(ctx.dtype, case.max_score(), float(np.max(np.abs(case.v), initial=0.0)))


def value_bounds(case: AttentionCase, dtype: str, out_ref, grads_ref=None) -> dict:
    """{'out': atol, 'q': atol, ...}: how far a backend's output and gradients (`grads_ref`, the
    reference's AttentionGrads, or None for the output only) may be from the reference's on
    `case`, already rounded to `dtype` (SPEC.md section 9); a number, or per element in
    float16/bfloat16."""
    max_score = case.max_score()
    max_v = float(np.max(np.abs(case.v), initial=0.0))
    low = dtype in tolerances.LOW_PRECISION
    if low:
        magnitude_out, magnitudes = emulation.attention(case, dtype, gradients=grads_ref is not None)
        bounds = {"out": tolerances.rounding_atol(dtype, dtype, out_ref, magnitude_out,
                                                  tolerances.compute_forward_atol(dtype, max_score, max_v))}
    else:
        bounds = {"out": tolerances.forward_atol(dtype, max_score, max_v)}
    if grads_ref is None:
        return bounds
    floor = float(np.max(np.abs(case.grad_out), initial=0.0)) * max(1.0, max_v)
    sensitivity = emulation.score_sensitivity(case) if low else None
    for name in ("q", "k", "v", "alpha", "span"):
        ref_grad = getattr(grads_ref, "d" + name)
        if ref_grad is None:
            continue
        if low:
            compute = tolerances.compute_gradient_atol(dtype, max_score, ref_grad, floor)
            if name in sensitivity:  # dq, dk: where a score error reaches further, per element
                score_error = tolerances.COMPUTE_FACTOR * tolerances.EPS[tolerances.COMPUTE[dtype]] * (1.0 + max_score)
                compute = np.maximum(compute, score_error * sensitivity[name])
            bounds[name] = tolerances.rounding_atol(emulation.result_dtype(name, dtype), dtype, ref_grad,
                                                    magnitudes[name], compute)
        else:
            bounds[name] = tolerances.gradient_atol(dtype, max_score, ref_grad, floor)
    return bounds


def check_values(ctx: Context, case: AttentionCase) -> None:
    """Forward and gradients against the float64 reference on the same rounded inputs. alpha and
    span reach the backend as the case holds them (Python numbers, or arrays of the input
    dtype); asked for their gradients, numbers become 0-d arrays of the input dtype."""
    want = ctx.gradients and case.gradients
    rc = (as_arrays(case, _differentiated(ctx, ("alpha", "span"))) if want else case).rounded(ctx.dtype)
    try:
        out, grads = _call(ctx, rc, gradients=want)
    except GradientsUnsupported:
        ctx.gradients, want = False, False
        rc = case.rounded(ctx.dtype)
        out, grads = _call(ctx, rc, gradients=False)
    expected = _reference(rc)
    grads_ref = None
    if want and grads:
        margin = tolerances.gradient_margin(ctx.dtype, rc.max_score())
        gap = reference.support_gap(rc.q, rc.k, rc.v, **rc.kwargs)
        if gap.size and float(np.min(gap)) < margin:
            ctx.counters["gradient_skips"] += 1
        else:
            grads_ref = reference.attention_vjp(rc.q, rc.k, rc.v, rc.grad_out, **rc.kwargs)
            compared = [getattr(grads_ref, "d" + n) for n in ("q", "k", "v", "alpha", "span") if n in grads]
            if any(g is not None and np.max(np.abs(g), initial=0.0) > _LARGEST[ctx.dtype] for g in compared):
                # A gradient beyond the largest number of the dtype it is returned in (dz through
                # a key with a tiny span weight, in float16) cannot be compared: skipped, and
                # counted so.
                ctx.counters["gradient_skips"] += 1
                grads_ref = None
    bounds = value_bounds(rc, ctx.dtype, expected, grads_ref)
    assert_close("forward", "out", out, expected, bounds["out"])
    if grads_ref is None:
        return
    ctx.counters["gradient_checks"] += 1
    for name, grad in grads.items():
        if grad is None:
            raise CheckFailed("d" + name, f"the kernel provides d{name} (Kernel.gradients) but returned None")
        if getattr(grads_ref, "d" + name) is None or name not in bounds:
            continue
        assert_close("d" + name, "d" + name, grad, getattr(grads_ref, "d" + name), bounds[name])
        ctx.checked.add(name)


def _allowed(case: AttentionCase) -> np.ndarray:
    """[B, H, Lq, Lk]: which keys each row may read (softmax of zero scores is > 0 exactly there)."""
    B, Hkv, Lk, _ = case.k.shape
    eye = np.broadcast_to(np.eye(Lk), (B, Hkv, Lk, Lk))
    kwargs = dict(case.kwargs, alpha=1.0)
    return reference.attention(np.zeros_like(case.q), case.k, eye, **kwargs) > 0


def check_masked_keys(ctx: Context, case: AttentionCase) -> None:
    """Keys no row of a kv head may read can hold any finite values, and excluded keys (beyond
    key_lengths, or masked by key_padding_mask) even NaN/Inf, without changing the output or the
    gradients of the others."""
    rc = case.rounded(ctx.dtype)
    B, H, Lq, _ = rc.q.shape
    Hkv, Lk = rc.k.shape[1], rc.k.shape[2]
    allowed = _allowed(rc).reshape(B, Hkv, H // Hkv, Lq, Lk).any(axis=(2, 3))  # [B, Hkv, Lk]
    padding = _excluded(rc)
    unused = ~allowed & ~padding[:, None, :]
    if not (unused.any() or padding.any()):
        return
    k, v = rc.k.copy(), rc.v.copy()
    huge = _HUGE[ctx.dtype]
    k[unused], v[unused] = huge, -huge
    pad = np.broadcast_to(padding[:, None, :], unused.shape)
    k[pad], v[pad] = np.nan, np.inf
    changed = replace(rc, k=k, v=v)
    want = ctx.gradients and case.gradients
    base_out, base_grads = _call(ctx, rc, gradients=want)
    out, grads = _call(ctx, changed, gradients=want)
    atol = 2 * _forward_atol(ctx, rc)
    assert_close("masked keys", "out", out, base_out, atol, nan_where=_reference_nan(rc))
    if grads:
        for name in ("q", "alpha", "span"):
            if grads.get(name) is not None and base_grads.get(name) is not None:
                atol = 2 * tolerances.gradient_atol(ctx.dtype, rc.max_score(), base_grads[name], 0.0)
                assert_close("masked keys", "d" + name, grads[name], base_grads[name], atol,
                             nan_where=_reference_nan(rc, "d" + name))
        for name in ("k", "v"):
            if grads.get(name) is not None:
                never = np.broadcast_to((unused | pad)[..., None], grads[name].shape)
                assert_zero("masked keys", "d" + name, grads[name], never)


def check_key_permutation(ctx: Context, case: AttentionCase) -> None:
    """Without causal, span or key_lengths, permuting keys and values together (and the
    key_padding_mask with them) changes nothing."""
    if case.causal or case.span is not None or case.key_lengths is not None:
        return
    rc = case.rounded(ctx.dtype)
    perm = np.random.default_rng(0).permutation(rc.k.shape[2])
    out, _ = _call(ctx, rc, gradients=False)
    mask = None if rc.key_padding_mask is None else np.asarray(rc.key_padding_mask)[:, perm]
    permuted, _ = _call(ctx, replace(rc, k=rc.k[:, :, perm], v=rc.v[:, :, perm], key_padding_mask=mask),
                        gradients=False)
    assert_close("key permutation", "out", permuted, out, 2 * _forward_atol(ctx, rc), nan_where=_reference_nan(rc))


def check_gqa(ctx: Context, case: AttentionCase) -> None:
    """Grouped-query attention equals attention with each kv head repeated for its group."""
    H, Hkv = case.q.shape[1], case.k.shape[1]
    if H == Hkv:
        return
    rc = case.rounded(ctx.dtype)
    out, _ = _call(ctx, rc, gradients=False)
    group = H // Hkv
    repeated = replace(rc, k=np.repeat(rc.k, group, axis=1), v=np.repeat(rc.v, group, axis=1))
    expected, _ = _call(ctx, repeated, gradients=False)
    assert_close("gqa", "out", out, expected, 2 * _forward_atol(ctx, rc), nan_where=_reference_nan(rc))


def softmax_span_attention(case: AttentionCase) -> np.ndarray:
    """alpha = 1 written as the adaptive-span paper does: softmax(s + log m) over allowed keys.
    Independent of the reference's entmax solver."""
    q, k, v = case.q, case.k, case.v
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    heads = np.arange(H) // (H // Hkv)
    readable = ~_excluded(case)  # [B, Lk]
    k = np.where(readable[:, None, :, None], k, 0.0)[:, heads]
    v = np.where(readable[:, None, :, None], v, 0.0)[:, heads]
    scale = 1.0 / np.sqrt(D) if case.scale is None else case.scale
    s = scale * np.einsum("bhid,bhjd->bhij", q, k)
    offset = np.broadcast_to(np.asarray(Lk - Lq if case.q_offset is None else case.q_offset), (B,))
    d = (np.arange(Lq)[:, None] - np.arange(Lk)[None, :])[None] + offset[:, None, None]  # [B, Lq, Lk]
    allowed = readable[:, None, None, :]
    if case.causal:
        allowed = allowed & (d >= 0)[:, None]
    m = np.ones((B, H, Lq, Lk))
    if case.span is not None:
        z = np.broadcast_to(np.asarray(case.span, dtype=np.float64), (H,))[None, :, None, None]
        m = np.clip((z - (np.abs(d)[:, None] - case.ramp)) / case.ramp, 0.0, 1.0)
        allowed = allowed & (m > 0)
    allowed = np.broadcast_to(allowed, s.shape)
    with np.errstate(divide="ignore"):
        logits = np.where(allowed, s + np.log(np.where(allowed, m, 1.0)), -np.inf)
    top = np.max(logits, -1, keepdims=True)
    e = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(-1, keepdims=True)
    p = e / np.where(total > 0, total, 1.0)
    return np.einsum("bhij,bhjd->bhid", p, v)


def check_softmax_oracle(ctx: Context, case: AttentionCase) -> None:
    """alpha = 1 is softmax(s + log m) attention."""
    if np.any(np.asarray(case.alpha) != 1.0):
        return
    rc = case.rounded(ctx.dtype)
    out, _ = _call(ctx, rc, gradients=False)
    assert_close("softmax oracle", "out", out, softmax_span_attention(rc), 2 * _forward_atol(ctx, rc))


def check_continuity(ctx: Context, case: AttentionCase) -> None:
    """A key entering the span (m from 0 to tiny) moves the output no more than it moves the
    reference's (SPEC.md section 5.2): entmax-then-reweight fails this."""
    rc = case.rounded(ctx.dtype)
    delta = rc.ramp * (1e-7 if ctx.dtype == "float64" else 1e-4)
    outside = rc  # the key sits on the kink: m = 0
    inside = replace(rc, span=rc.span + delta)
    moved, _ = _call(ctx, inside, gradients=False)
    before, _ = _call(ctx, outside, gradients=False)
    expected_move = _reference(inside) - _reference(outside)
    assert_close("continuity in span", "out(z + delta) - out(z)", moved - before, expected_move,
                  4 * _forward_atol(ctx, rc))


def check_refusal(backend: str, case: AttentionCase, dtype: str, framework, device) -> str | None:
    """A backend that does not declare a feature must refuse a call using it with the
    dispatcher's capability error. Returns the reasons it gave; raises CheckFailed if it ran."""
    rc = case.rounded(dtype)
    args = dict(q=framework.array(rc.q, dtype, device), k=framework.array(rc.k, dtype, device),
                v=framework.array(rc.v, dtype, device), alpha=framework.param(rc.alpha, dtype, device),
                span=framework.param(rc.span, dtype, device), ramp=rc.ramp, causal=rc.causal, scale=rc.scale,
                key_lengths=framework.integers(rc.key_lengths, device),
                q_offset=framework.integers(rc.q_offset, device))
    if rc.key_padding_mask is not None:
        args["key_padding_mask"] = _booleans(framework, rc.key_padding_mask, device)
    try:
        api.attention(**args, backend=backend)
    except UnsupportedCallError as exc:
        return "; ".join(exc.reasons.get(backend, [])) or str(exc)
    raise CheckFailed("refusal", "ran a call with a feature it does not declare instead of refusing it")


CHECKS = (check_values, check_masked_keys, check_key_permutation, check_gqa, check_softmax_oracle)
#: At tile-crossing sizes: where tile bugs show (values, gradients, keys masked across tiles);
#: the metamorphic properties, independent of size, run on the small shapes.
LARGE_CHECKS = (check_values, check_masked_keys)


def checks_for(case: AttentionCase) -> tuple:
    return LARGE_CHECKS if case.large else CHECKS
