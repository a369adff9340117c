"""What a plain low-precision kernel's roundings can cost, per element: the reference's own
quantities in float64, combined as a first-order rounding-error bound at every point SPEC.md
section 6 lets a kernel round (section 9 states the rule built on it).

A correct float16/bfloat16 kernel computes scores, the entmax threshold and every sum in
float32; it may round to the input dtype only where a product runs on the input dtype's matrix
units, and its results:
- forward: P before P·V, then the output;
- backward: P before Pᵀ·dO (dv), the score gradient dS before dS·K (dq) and dSᵀ·Q (dk), then
  each gradient (dq, dk, dv in the input dtype; dα and dz in α's and z's, the compute dtype).
Rounding an operand a_j of a sum Σ a_j b_j changes it by at most u·Σ|a_j||b_j| (u the unit
roundoff), so such a kernel's error at element i is at most u·(magnitude_i + |x_i|) plus its
float32 error: `magnitude` below is Σ|a||b| of the product that forms x, 0 where nothing is
rounded before the result. The bound holds whichever of these points a kernel rounds at and in
whatever order it sums, so a correct kernel never meets it by bad luck; a kernel that rounds
the scores or τ (an error of |s|·u in the exponent) or forms dq from separately rounded pieces
that cancel does not fit under it.
"""

from __future__ import annotations

import importlib

import numpy as np

from .cases import AttentionCase, EntmaxCase
from .tolerances import TINY, unit_roundoff

# The modules, not the functions of the same names that attnspec.reference exports.
_ref_attention = importlib.import_module("attnspec.reference.attention")
_ref_entmax = importlib.import_module("attnspec.reference.entmax")


def result_dtype(name: str, dtype: str) -> str:
    """The dtype a kernel returns the gradient of input `name` in, for inputs of `dtype`: the
    input dtype for every input, alpha and span included, which reach a kernel as arrays of the
    input dtype when their gradient is asked for (SPEC.md section 9)."""
    return dtype


def attention(case: AttentionCase, dtype: str, *, gradients: bool = True):
    """(magnitude of out, {name: magnitude of d<name>} or None) on an already-rounded case:
    P·|V|; scale·|dS|·|K|, scale·|dS|ᵀ·|Q| and Pᵀ·|dO| summed over each kv head's group; 0 for
    dα and dz (formed in float32 from unrounded pieces)."""
    fwd = _ref_attention._forward(case.q, case.k, case.v, case.alpha, case.span, case.ramp, case.causal,
                                  case.key_lengths, case.q_offset, case.scale, False)
    B, H, Lq, Lk = fwd.shape
    p = fwd.sol.p.reshape(fwd.shape)
    # An entry that rounds into the subnormal range errs by up to `tiny` absolutely instead of
    # u relatively: magnitude |a| + tiny / u per rounded nonzero entry covers both.
    tiny = TINY[dtype] / unit_roundoff(dtype)
    out = np.einsum("bhij,bhjd->bhid", p + tiny * (p > 0), np.abs(fwd.v))
    if not gradients:
        return out, None
    dout = np.asarray(case.grad_out, dtype=np.float64)
    g = np.einsum("bhid,bhjd->bhij", dout, fwd.v)
    ds, _, _ = _ref_entmax.vjp_rows(fwd.sol, g.reshape(B * H * Lq, Lk))
    ds = np.abs(ds.reshape(fwd.shape))
    ds = ds + tiny * (ds > 0)
    Hkv = case.k.shape[1]
    group = H // Hkv
    dq = fwd.scale * np.einsum("bhij,bhjd->bhid", ds, np.abs(fwd.k))
    dk = fwd.scale * np.einsum("bhij,bhid->bhjd", ds, np.abs(fwd.q))
    dv = np.einsum("bhij,bhid->bhjd", p + tiny * (p > 0), np.abs(dout))
    dk = dk.reshape(B, Hkv, group, Lk, -1).sum(2)
    dv = dv.reshape(B, Hkv, group, Lk, -1).sum(2)
    grads = {"q": dq, "k": dk, "v": dv, "alpha": np.zeros(np.shape(case.alpha))}
    if case.span is not None:
        grads["span"] = np.zeros(np.shape(case.span))
    return out, grads


def score_sensitivity(case: AttentionCase):
    """{'q': [B, H, Lq, D], 'k': [B, Hkv, Lk, D]}: how far dq and dk may move per unit relative
    error of p. A kernel that recomputes p in the backward from saved row statistics gets p off
    by its float32 score error (an ulp of a score of 4·10⁴ is 0.004), and with ḡ formed as
    Σ p g (FlashAttention's rowsum(dO ∘ O)) that error is not cancelled by renormalising: dS
    moves by up to w (|g| + |ḡ|) per unit, which reaches dq through scale·|K| and dk through
    scale·|Q|."""
    fwd = _ref_attention._forward(case.q, case.k, case.v, case.alpha, case.span, case.ramp, case.causal,
                                  case.key_lengths, case.q_offset, case.scale, False)
    B, H, Lq, Lk = fwd.shape
    p, u = fwd.sol.p.reshape(fwd.shape), fwd.sol.u.reshape(fwd.shape)
    support = p > 0
    w = np.where(support, p / u, 0.0)
    g = np.where(support, np.einsum("bhid,bhjd->bhij", np.asarray(case.grad_out, dtype=np.float64), fwd.v), 0.0)
    total = w.sum(-1, keepdims=True)
    gbar = (w * g).sum(-1, keepdims=True) / np.where(total > 0, total, 1.0)
    moved = w * (np.abs(g) + np.abs(gbar))
    Hkv = case.k.shape[1]
    dq = fwd.scale * np.einsum("bhij,bhjd->bhid", moved, np.abs(fwd.k))
    dk = fwd.scale * np.einsum("bhij,bhid->bhjd", moved, np.abs(fwd.q)).reshape(B, Hkv, H // Hkv, Lk, -1).sum(2)
    return {"q": dq, "k": dk}


def entmax(case: EntmaxCase):
    """Stand-alone entmax rounds nothing before its results: magnitude 0 for p and every gradient."""
    return 0.0
