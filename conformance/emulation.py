"""A plain low-precision kernel, emulated: the reference evaluated in float64 but rounded to the
input dtype at every point SPEC.md section 6 lets a kernel round (section 9 states the rule
built on it).

A correct float16/bfloat16 kernel computes scores, the entmax threshold and every sum in
float32, and it may round to the input dtype only where a product runs on the input dtype's
matrix units, plus its results:
- forward: P before P·V, and the output;
- backward: P before Pᵀ·dO (dv), the score gradient dS before dS·K (dq) and dSᵀ·Q (dk), and
  each gradient (dq, dk, dv in the input dtype; dα and dz in α's and z's, the compute dtype).
It may not round the scores or the threshold: a score rounded to bfloat16 moves p by
|s|·2⁻⁸ relative, far more than any rounding above. The error of this emulation against the
exact reference, on the same example, is what such a kernel achieves; the conformance bound
for half precision is a small multiple of it (FlashAttention's tests use the same standard).
"""

from __future__ import annotations

import importlib

import numpy as np

from attnspec import reference

from .cases import AttentionCase, EntmaxCase, SpanMaskCase, round_to
from .tolerances import COMPUTE

# The modules, not the functions of the same names that attnspec.reference exports.
_ref_attention = importlib.import_module("attnspec.reference.attention")
_ref_entmax = importlib.import_module("attnspec.reference.entmax")
_ref_span = importlib.import_module("attnspec.reference.span")


def attention(case: AttentionCase, dtype: str, *, gradients: bool = True):
    """(out, grads) of the emulated kernel on an already-rounded case; grads maps 'q', 'k', 'v',
    'alpha' and (with span) 'span' to float64 arrays holding values of `dtype`."""
    fwd = _ref_attention._forward(case.q, case.k, case.v, case.alpha, case.span, case.ramp, case.causal,
                                  case.key_lengths, case.q_offset, case.scale, False)
    B, H, Lq, Lk = fwd.shape
    p = fwd.sol.p.reshape(fwd.shape)
    p_low = round_to(p, dtype)
    out = round_to(np.einsum("bhij,bhjd->bhid", p_low, fwd.v), dtype)
    out[fwd.reads_non_finite] = np.nan
    if not gradients:
        return out, None
    dout = np.asarray(case.grad_out, dtype=np.float64)
    g = np.einsum("bhid,bhjd->bhij", dout, fwd.v)
    ds, dm, deps = _ref_entmax.vjp_rows(fwd.sol, g.reshape(B * H * Lq, Lk))
    ds_low = round_to(ds.reshape(fwd.shape), dtype)
    dm = dm.reshape(fwd.shape)
    Hkv = case.k.shape[1]
    group = H // Hkv
    dq = fwd.scale * np.einsum("bhij,bhjd->bhid", ds_low, fwd.k)
    dk = fwd.scale * np.einsum("bhij,bhid->bhjd", ds_low, fwd.q)
    dv = np.einsum("bhij,bhid->bhjd", p_low, dout)
    dk = dk.reshape(B, Hkv, group, Lk, -1).sum(2)
    dv = dv.reshape(B, Hkv, group, Lk, -1).sum(2)
    if case.key_lengths is not None:
        valid = (np.arange(Lk)[None, :] < np.asarray(case.key_lengths)[:, None])[:, None, :, None]
        dk, dv = np.where(valid, dk, 0.0), np.where(valid, dv, 0.0)
    dalpha = deps.reshape(B, H, Lq).sum(axis=(0, 2))
    grads = {"q": dq, "k": dk, "v": dv, "alpha": dalpha.sum() if np.ndim(case.alpha) == 0 else dalpha}
    if case.span is not None:
        dz = (dm * _ref_span.mask_slope(fwd.m, fwd.ramp)).sum(axis=(0, 2, 3))
        grads["span"] = dz.sum() if np.ndim(case.span) == 0 else dz
    return out, {name: round_to(x, result_dtype(name, dtype)) for name, x in grads.items()}


def result_dtype(name: str, dtype: str) -> str:
    """The dtype a kernel returns the gradient of input `name` in, for inputs of `dtype`:
    alpha and span are passed in the compute dtype (SPEC.md section 6), everything else in
    the input dtype."""
    return COMPUTE[dtype] if name in ("alpha", "span") else dtype


def entmax(case: EntmaxCase, dtype: str, *, gradients: bool = True):
    """(p, grads) of a stand-alone entmax kernel that computes in float32 and rounds its results."""
    p = round_to(reference.entmax(case.x, case.alpha, axis=case.axis, weights=case.weights), dtype)
    if not gradients:
        return p, None
    dx, dalpha, dweights = reference.entmax_vjp(case.x, case.alpha, case.grad_out, axis=case.axis,
                                                weights=case.weights)
    grads = {"x": dx, "alpha": dalpha} if dweights is None else {"x": dx, "alpha": dalpha, "weights": dweights}
    return p, {name: round_to(x, result_dtype(name, dtype)) for name, x in grads.items()}


def span_mask_vjp(case: SpanMaskCase, dtype: str):
    """dspan of a span_mask kernel that sums in float32 and returns span's (compute) dtype."""
    return round_to(reference.span_mask_vjp(case.Lq, case.Lk, case.span, case.ramp, case.grad_out,
                                            q_offset=case.q_offset), result_dtype("span", dtype))
