"""Adaptive-span alpha-entmax attention as fused Triton kernels (SPEC.md section 5), with the
FlashAttention structure: one program per (query tile, batch x head) streams over the key
tiles its rows can reach; the backward recomputes p from one number per row.

Keys a row may not read at all (j >= key_lengths, or masked by key_padding_mask, SPEC.md 1.1)
load as zeros whatever they hold, so NaN/Inf padding never reaches a product, and are left out
of every block's allowed set. Without a mask (HAS_MASK off) no mask load is compiled in and
the tile loops are those of key_lengths alone.

Forward, per program (_forward_kernel):
- alpha = 1 (eps = 0 for the head): one pass, online softmax of s + log m; c its logsumexp.
- alpha > 1: solve each row's normaliser c (SPEC.md 2.2: p = m exp(log1p(eps (s - c))/eps),
  sum p = 1). Pass 0 computes the bracket [c_lo, c_hi] of SPEC.md 2.4; then Halley steps on
  h(c) = log sum p, safeguarded by the bracket and by bisection (entmax.halley_update), each
  step one pass over the key tiles, until every row of the tile has converged to float32
  accuracy (not a fixed count; MAX_PASSES only guards against a bug). A last pass forms
  out = P V with the final c. p is never renormalised: sum p = 1 is what the solve achieves.
- Every iterate stays above the first one, c_lo, and p decreases in c, so a key tile with
  p = 0 for all rows at c_lo never matters again: the first passes record which key tiles
  hold candidates and the later ones skip the rest. The last pass records which tiles hold
  any p > 0 (a [B, H, query tiles, key tiles] int8 map) and the backward skips the others,
  as AdaSplash does.

Backward (SPEC.md 4): with w = p/u, g = dout . v and gbar = sum w g / sum w per row,
dS = w (g - gbar). One program per query tile (_backward_dq_kernel) makes two passes over its
key tiles: the first sums gbar and the per-row pieces of dalpha (sum (g - gbar) p psi) and dz
(sum (g - gbar) (p/m) dm/dz), the second dq = scale dS k with dS formed before it is rounded
to the input dtype for the product (FlashAttention's rounding point). One program per
(key tile, batch x kv head) (_backward_dkdv_kernel) then loops over the query heads of its
GQA group and their query tiles, accumulating dk = scale dS^T q and dv = P^T dout in
registers (no atomics; the group reduction happens there).

Saved for the backward: per row (top, c) [B, H, Lq, 2] float32, the row's largest score and
its normaliser relative to it (p = m exp(log1p(eps t)/eps) with t = (s - top) - c), and the
tile map (one byte per pair of tiles); never anything of size Lq x Lk.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import entmax as _entmax
from . import span as _span
from . import tuning as _tuning
from ._jit import any_true, any_true_2d, device_function, row_max, row_sum

#: Safety cap on the passes of the alpha > 1 solve. Convergence takes far fewer (the tests
#: record the counts); hitting the cap would mean a bug, and the stats expose it.
MAX_PASSES = 64
#: A row is converged when |log sum p| <= H_TOL (sum p = 1 within 4 float32 ulps) or c moves by
#: less than C_TOL (1 + |c|), about the resolution of c itself in float32.
H_TOL = 2.0**-21
C_TOL = 2.0**-21


def interpreted() -> bool:
    """Whether this module's kernels were built for the Triton interpreter. Triton reads
    TRITON_INTERPRET when a kernel is decorated, i.e. when this module is imported."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_forward_kernel, InterpretedFunction)


@device_function
def _dot(a, b, F32: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with float32 accumulation; float32 inputs in full precision (never TF32).
    UPCAST (the interpreter): operands in float32 first, which is exact for half inputs
    (their products fit float32) and avoids the interpreter's bfloat16 dot."""
    if UPCAST:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif F32:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@device_function
def _load_rows(base, offs, rows, offs_d, width):
    return tl.load(base + offs[:, None] * width + offs_d[None, :],
                   mask=(offs < rows)[:, None] & (offs_d < width)[None, :], other=0.0)


@device_function
def _readable(MaskRow, offs_n, kv_len, HAS_MASK: tl.constexpr):
    """Which keys offs_n [N] the batch entry's rows may read at all: j < key_lengths and, with a
    key_padding_mask, its entry True (SPEC.md 1.1: a masked key is excluded as one beyond
    key_lengths is)."""
    ok = offs_n < kv_len
    if HAS_MASK:
        ok = ok & (tl.load(MaskRow + offs_n, mask=ok, other=0) != 0)
    return ok


@device_function
def _load_keys(base, offs_n, readable, offs_d, width):
    """Rows offs_n of K or V; keys that may not be read load as zeros whatever they hold, so
    NaN/Inf padding never enters a product (0 * NaN would be NaN)."""
    return tl.load(base + offs_n[:, None] * width + offs_d[None, :],
                   mask=readable[:, None] & (offs_d < width)[None, :], other=0.0)


@device_function
def _batch_entry(Offsets, Lengths, b, Lk, HAS_LENGTHS: tl.constexpr):
    """(q_offset, key length) of batch entry b."""
    offset = tl.load(Offsets + b)
    if HAS_LENGTHS:
        kv_len = tl.load(Lengths + b)
    else:
        kv_len = Lk
    return offset, kv_len


@device_function
def _head(Alpha, Span, h, HAS_SPAN: tl.constexpr):
    """(eps = alpha - 1, span z) of head h; z = 0 without span (then unused)."""
    eps = tl.load(Alpha + h) - 1.0
    if HAS_SPAN:
        z = tl.load(Span + h)
    else:
        z = 0.0
    return eps, z


@triton.jit
def _forward_kernel(Q, K, V, Out, C, Bits, Alpha, Span, Lengths, Offsets, Mask, PSum, Passes,
                    scale, ramp, H, G, Lq, Lk, D, Dv, n_qt, n_kt,
                    HAS_SPAN: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_MASK: tl.constexpr,
                    STATS: tl.constexpr, F32: tl.constexpr, UPCAST: tl.constexpr, LIBDEVICE: tl.constexpr,
                    MAX_ITERS: tl.constexpr, HTOL: tl.constexpr, CTOL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv = b * (H // G) + h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_rows(Q + bh.to(tl.int64) * Lq * D, offs_m, Lq, offs_d, D)
    k_base = K + kv.to(tl.int64) * Lk * D
    v_base = V + kv.to(tl.int64) * Lk * Dv
    offset, kv_len = _batch_entry(Offsets, Lengths, b, Lk, HAS_LENGTHS)
    mask_row = Mask + b.to(tl.int64) * Lk
    eps, z = _head(Alpha, Span, h, HAS_SPAN)
    first_row = pid_m * BLOCK_M
    lo, hi = _span.key_window(first_row, tl.minimum(first_row + BLOCK_M, Lq), offset, kv_len, z, ramp, HAS_SPAN,
                              CAUSAL, BLOCK_N)
    bits = Bits + bh.to(tl.int64) * n_qt * n_kt + pid_m * n_kt
    neg_inf = float("-inf")

    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, dtype=tl.float32)
    psum = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    if eps == 0.0:
        # alpha = 1: online softmax of s + log m (FlashAttention), c = logsumexp.
        run_max = tl.full([BLOCK_M], neg_inf, dtype=tl.float32)
        total = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + offs_n0
            readable = _readable(mask_row, offs_n, kv_len, HAS_MASK)
            kt = _load_keys(k_base, offs_n, readable, offs_d, D)
            s = _dot(q, tl.trans(kt), F32, UPCAST) * scale
            m, allowed = _span.mask_block(offs_m, offs_n, offset, readable, Lq, z, ramp, HAS_SPAN, CAUSAL)
            if HAS_SPAN:
                logits = tl.where(allowed, s + tl.log(tl.where(allowed, m, 1.0)), neg_inf)
            else:
                logits = tl.where(allowed, s, neg_inf)
            new_max = tl.maximum(run_max, row_max(logits))
            ref = tl.where(new_max == neg_inf, 0.0, new_max)
            correction = tl.exp(run_max - ref)
            e = tl.exp(logits - ref[:, None])
            total = total * correction + row_sum(e)
            vt = _load_keys(v_base, offs_n, readable, offs_dv, Dv)
            acc = acc * correction[:, None] + _dot(e.to(vt.dtype), vt, F32, UPCAST)
            run_max = new_max
            tl.store(bits + start // BLOCK_N, any_true_2d(allowed).to(tl.int8))
        nonempty = total > 0.0
        safe_total = tl.where(nonempty, total, 1.0)
        acc = acc / safe_total[:, None]
        # p = m exp(s - c) with c = run_max + log(total), kept as (top, c) = (run_max, log total).
        top = tl.where(nonempty, run_max, 0.0)
        c = tl.where(nonempty, tl.log(safe_total), 0.0)
        psum = tl.where(nonempty, 1.0, 0.0)
        passes = offset * 0 + 1
    else:
        # Pass 0: the bracket of SPEC.md 2.4, c_lo = max_j [s_j - expm1(-eps log m_j)/eps] (p_j = 1
        # there), c_hi = max s - expm1(-eps log sum m)/eps; candidate tiles for the running c_lo.
        top = tl.full([BLOCK_M], neg_inf, dtype=tl.float32)
        clo = tl.full([BLOCK_M], neg_inf, dtype=tl.float32)
        mass = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
        # Rows reading a NaN or +inf score have p = NaN (SPEC.md 2.1); every comparison below
        # (u > 0, p > 0) would drop such an entry silently as if its p were 0.
        bad = tl.full([BLOCK_M], 0, dtype=tl.int32)
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + offs_n0
            readable = _readable(mask_row, offs_n, kv_len, HAS_MASK)
            kt = _load_keys(k_base, offs_n, readable, offs_d, D)
            s = _dot(q, tl.trans(kt), F32, UPCAST) * scale
            m, allowed = _span.mask_block(offs_m, offs_n, offset, readable, Lq, z, ramp, HAS_SPAN, CAUSAL)
            top = tl.maximum(top, row_max(tl.where(allowed, s, neg_inf)))
            if HAS_SPAN:
                alone = s - _entmax.expm1(-eps * tl.log(tl.where(allowed, m, 1.0)), LIBDEVICE) / eps
            else:
                alone = s
            clo = tl.maximum(clo, row_max(tl.where(allowed, alone, neg_inf)))
            mass += row_sum(m)
            bad = tl.maximum(bad, row_max((allowed & ((s != s) | (s == float("inf")))).to(tl.int32)))
            # u = 1 + eps (s - c) <= 0 at the running c_lo (<= the final one): p = 0 for good.
            ref = tl.where(clo == neg_inf, 0.0, clo)
            live = allowed & (eps * (s - ref[:, None]) > -1.0)
            tl.store(bits + start // BLOCK_N, any_true_2d(live).to(tl.int8))
        nonempty = top > neg_inf
        # From here on c is relative to the row's top score (SPEC.md 2.3's shifted scores): it
        # stays O(log n), so float32 resolves it finely whatever the scores' magnitude.
        top = tl.where(nonempty, top, 0.0)
        c_lo = tl.where(nonempty, clo - top, 0.0)
        margin = 4.0 * 1.1920929e-07 * (1.0 + tl.abs(c_lo))  # rounding of c_lo: keep h(lo) >= 0
        c_lo = c_lo - margin
        c_hi = -_entmax.expm1(-eps * tl.log(tl.where(nonempty, mass, 1.0)), LIBDEVICE) / eps
        c_hi = tl.where(nonempty, tl.maximum(c_hi, c_lo) + margin, 0.0)
        c = c_lo
        h_old = tl.full([BLOCK_M], float("inf"), dtype=tl.float32)
        active = nonempty
        tl.debug_barrier()  # the tile map written above is read by every thread below
        it = 0
        while any_true(active) & (it < MAX_ITERS):
            f0 = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
            f1 = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
            f2 = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
            for start in range(lo, hi, BLOCK_N):
                if tl.load(bits + start // BLOCK_N) != 0:
                    offs_n = start + offs_n0
                    readable = _readable(mask_row, offs_n, kv_len, HAS_MASK)
                    kt = _load_keys(k_base, offs_n, readable, offs_d, D)
                    s = _dot(q, tl.trans(kt), F32, UPCAST) * scale
                    m, allowed = _span.mask_block(offs_m, offs_n, offset, readable, Lq, z, ramp, HAS_SPAN, CAUSAL)
                    p, ratio, u, t = _entmax.probabilities(s, top, c, m, allowed, eps, LIBDEVICE)
                    r = p / u
                    f0 += row_sum(p)
                    f1 += row_sum(r)
                    f2 += row_sum(r / u)
                    if it == 0:  # c = c_lo, the smallest iterate: the exact candidate tiles
                        # Every warp must have read this entry (the branch condition above)
                        # before any overwrites it, or warps could disagree on the branch.
                        tl.debug_barrier()
                        tl.store(bits + start // BLOCK_N, any_true_2d(p > 0.0).to(tl.int8))
            c, c_lo, c_hi, h_old, active = _entmax.halley_update(c, c_lo, c_hi, h_old, f0, f1, f2, eps, active,
                                                                 HTOL, CTOL, LIBDEVICE)
            it += 1
            tl.debug_barrier()
        # The last pass: out = P V with the final c, and the map of tiles holding any p > 0.
        for start in range(lo, hi, BLOCK_N):
            if tl.load(bits + start // BLOCK_N) != 0:
                offs_n = start + offs_n0
                readable = _readable(mask_row, offs_n, kv_len, HAS_MASK)
                kt = _load_keys(k_base, offs_n, readable, offs_d, D)
                s = _dot(q, tl.trans(kt), F32, UPCAST) * scale
                m, allowed = _span.mask_block(offs_m, offs_n, offset, readable, Lq, z, ramp, HAS_SPAN, CAUSAL)
                p, ratio, u, t = _entmax.probabilities(s, top, c, m, allowed, eps, LIBDEVICE)
                vt = _load_keys(v_base, offs_n, readable, offs_dv, Dv)
                acc += _dot(p.to(vt.dtype), vt, F32, UPCAST)
                psum += row_sum(p)
                tl.debug_barrier()  # as above: all warps have read the entry before it changes
                tl.store(bits + start // BLOCK_N, any_true_2d(p > 0.0).to(tl.int8))
        acc = tl.where(bad[:, None] > 0, float("nan"), acc)
        passes = it + 2
    row_ok = offs_m < Lq
    out_base = Out + bh.to(tl.int64) * Lq * Dv
    tl.store(out_base + offs_m[:, None] * Dv + offs_dv[None, :], acc.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv < Dv)[None, :])
    rows = bh.to(tl.int64) * Lq + offs_m
    tl.store(C + rows * 2, top, mask=row_ok)
    tl.store(C + rows * 2 + 1, c, mask=row_ok)
    if STATS:
        tl.store(PSum + bh.to(tl.int64) * Lq + offs_m, psum, mask=row_ok)
        tl.store(Passes + bh.to(tl.int64) * n_qt + pid_m, passes)


@triton.jit
def _backward_dq_kernel(Q, K, V, C, Bits, DO, DQ, GBar, DAlpha, DSpan, Alpha, Span, Lengths, Offsets, Mask,
                        scale, ramp, H, G, Lq, Lk, D, Dv, n_qt, n_kt,
                        HAS_SPAN: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                        HAS_MASK: tl.constexpr,
                        ALPHA_GRAD: tl.constexpr, SPAN_GRAD: tl.constexpr,
                        F32: tl.constexpr, UPCAST: tl.constexpr, LIBDEVICE: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kv = b * (H // G) + h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Lq
    q = _load_rows(Q + bh.to(tl.int64) * Lq * D, offs_m, Lq, offs_d, D)
    do = _load_rows(DO + bh.to(tl.int64) * Lq * Dv, offs_m, Lq, offs_dv, Dv)
    top = tl.load(C + (bh.to(tl.int64) * Lq + offs_m) * 2, mask=row_ok, other=0.0)
    c = tl.load(C + (bh.to(tl.int64) * Lq + offs_m) * 2 + 1, mask=row_ok, other=0.0)
    k_base = K + kv.to(tl.int64) * Lk * D
    v_base = V + kv.to(tl.int64) * Lk * Dv
    offset, kv_len = _batch_entry(Offsets, Lengths, b, Lk, HAS_LENGTHS)
    mask_row = Mask + b.to(tl.int64) * Lk
    eps, z = _head(Alpha, Span, h, HAS_SPAN)
    first_row = pid_m * BLOCK_M
    lo, hi = _span.key_window(first_row, tl.minimum(first_row + BLOCK_M, Lq), offset, kv_len, z, ramp, HAS_SPAN,
                              CAUSAL, BLOCK_N)
    bits = Bits + bh.to(tl.int64) * n_qt * n_kt + pid_m * n_kt

    sum_w = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    sum_wg = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    sum_psi = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    sum_gpsi = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    sum_dm = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    sum_gdm = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    # Pass 1: gbar and the row sums of dalpha and dz.
    for start in range(lo, hi, BLOCK_N):
        if tl.load(bits + start // BLOCK_N) != 0:
            offs_n = start + offs_n0
            readable = _readable(mask_row, offs_n, kv_len, HAS_MASK)
            kt = _load_keys(k_base, offs_n, readable, offs_d, D)
            vt = _load_keys(v_base, offs_n, readable, offs_dv, Dv)
            s = _dot(q, tl.trans(kt), F32, UPCAST) * scale
            m, allowed = _span.mask_block(offs_m, offs_n, offset, readable, Lq, z, ramp, HAS_SPAN, CAUSAL)
            p, ratio, u, t = _entmax.probabilities(s, top, c, m, allowed, eps, LIBDEVICE)
            support = p > 0.0
            g = tl.where(support, _dot(do, tl.trans(vt), F32, UPCAST), 0.0)
            w = p / u
            sum_w += row_sum(w)
            sum_wg += row_sum(w * g)
            if ALPHA_GRAD:
                pp = tl.where(support, p * _entmax.psi(t, eps), 0.0)
                sum_psi += row_sum(pp)
                sum_gpsi += row_sum(pp * g)
            if SPAN_GRAD:
                dm = ratio * _span.slope(m, ramp)
                sum_dm += row_sum(dm)
                sum_gdm += row_sum(dm * g)
    gbar = tl.where(sum_w > 0.0, sum_wg / tl.where(sum_w > 0.0, sum_w, 1.0), 0.0)
    # Pass 2: dq = scale dS k with dS = w (g - gbar) formed before it is rounded for the product
    # (sum w g k - gbar sum w k, each rounded, cancels: its error scales with |gbar|, not |dS|).
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        if tl.load(bits + start // BLOCK_N) != 0:
            offs_n = start + offs_n0
            readable = _readable(mask_row, offs_n, kv_len, HAS_MASK)
            kt = _load_keys(k_base, offs_n, readable, offs_d, D)
            vt = _load_keys(v_base, offs_n, readable, offs_dv, Dv)
            s = _dot(q, tl.trans(kt), F32, UPCAST) * scale
            m, allowed = _span.mask_block(offs_m, offs_n, offset, readable, Lq, z, ramp, HAS_SPAN, CAUSAL)
            p, ratio, u, t = _entmax.probabilities(s, top, c, m, allowed, eps, LIBDEVICE)
            support = p > 0.0
            g = _dot(do, tl.trans(vt), F32, UPCAST)
            ds = tl.where(support, (p / u) * (g - gbar[:, None]), 0.0)
            acc += _dot(ds.to(kt.dtype), kt, F32, UPCAST)
    dq = scale * acc
    tl.store(DQ + bh.to(tl.int64) * Lq * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < D)[None, :])
    rows = bh.to(tl.int64) * Lq + offs_m
    tl.store(GBar + rows, gbar, mask=row_ok)
    if ALPHA_GRAD:
        tl.store(DAlpha + rows, sum_gpsi - gbar * sum_psi, mask=row_ok)
    if SPAN_GRAD:
        tl.store(DSpan + rows, sum_gdm - gbar * sum_dm, mask=row_ok)


@triton.jit
def _backward_dkdv_kernel(Q, K, V, C, GBar, Bits, DO, DK, DV, Alpha, Span, Lengths, Offsets, Mask,
                          scale, ramp, H, G, Lq, Lk, D, Dv, n_qt, n_kt,
                          HAS_SPAN: tl.constexpr, CAUSAL: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                          HAS_MASK: tl.constexpr,
                          F32: tl.constexpr, UPCAST: tl.constexpr, LIBDEVICE: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr):
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    Hkv = H // G
    b = bkv // Hkv
    kvh = bkv % Hkv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offset, kv_len = _batch_entry(Offsets, Lengths, b, Lk, HAS_LENGTHS)
    # Keys at j >= kv_len or masked by key_padding_mask load as zeros and get exactly zero
    # gradients (SPEC.md 5.3).
    readable = _readable(Mask + b.to(tl.int64) * Lk, offs_n, kv_len, HAS_MASK)
    kt = _load_keys(K + bkv.to(tl.int64) * Lk * D, offs_n, readable, offs_d, D)
    vt = _load_keys(V + bkv.to(tl.int64) * Lk * Dv, offs_n, readable, offs_dv, Dv)
    first_key = pid_n * BLOCK_N
    stop_key = tl.minimum(first_key + BLOCK_N, kv_len)
    dk = tl.full([BLOCK_N, BLOCK_D], 0.0, dtype=tl.float32)
    dv = tl.full([BLOCK_N, BLOCK_DV], 0.0, dtype=tl.float32)
    for g_i in range(0, G):
        h = kvh * G + g_i
        bh = b * H + h
        eps, z = _head(Alpha, Span, h, HAS_SPAN)
        lo, hi = _span.query_window(first_key, stop_key, offset, Lq, z, ramp, HAS_SPAN, CAUSAL, BLOCK_M)
        hi = tl.where(first_key < kv_len, hi, 0)
        if HAS_MASK:  # a tile of masked keys only: no row reads it
            hi = tl.where(any_true(readable), hi, 0)
        bits = Bits + bh.to(tl.int64) * n_qt * n_kt + pid_n
        for start in range(lo, hi, BLOCK_M):
            if tl.load(bits + (start // BLOCK_M) * n_kt) != 0:
                offs_m = start + offs_m0
                row_ok = offs_m < Lq
                q = _load_rows(Q + bh.to(tl.int64) * Lq * D, offs_m, Lq, offs_d, D)
                do = _load_rows(DO + bh.to(tl.int64) * Lq * Dv, offs_m, Lq, offs_dv, Dv)
                top = tl.load(C + (bh.to(tl.int64) * Lq + offs_m) * 2, mask=row_ok, other=0.0)
                c = tl.load(C + (bh.to(tl.int64) * Lq + offs_m) * 2 + 1, mask=row_ok, other=0.0)
                gbar = tl.load(GBar + bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)
                s = _dot(q, tl.trans(kt), F32, UPCAST) * scale
                m, allowed = _span.mask_block(offs_m, offs_n, offset, readable, Lq, z, ramp, HAS_SPAN, CAUSAL)
                p, ratio, u, t = _entmax.probabilities(s, top, c, m, allowed, eps, LIBDEVICE)
                support = p > 0.0
                g = _dot(do, tl.trans(vt), F32, UPCAST)
                ds = tl.where(support, (p / u) * (g - gbar[:, None]), 0.0)
                # Rows without support here contribute nothing, whatever q holds (SPEC.md 5.3).
                reads = row_max(support.to(tl.int32)) > 0
                q = tl.where(reads[:, None], q, 0.0)
                do = tl.where(reads[:, None], do, 0.0)
                dk += _dot(tl.trans(ds).to(q.dtype), q, F32, UPCAST)
                dv += _dot(tl.trans(p).to(do.dtype), do, F32, UPCAST)
    dk = tl.where(readable[:, None], dk * scale, 0.0)
    dv = tl.where(readable[:, None], dv, 0.0)
    tl.store(DK + bkv.to(tl.int64) * Lk * D + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=(offs_n < Lk)[:, None] & (offs_d < D)[None, :])
    tl.store(DV + bkv.to(tl.int64) * Lk * Dv + offs_n[:, None] * Dv + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=(offs_n < Lk)[:, None] & (offs_dv < Dv)[None, :])


# --- launch code ----------------------------------------------------------------------------

def _padded_width(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


@functools.lru_cache(maxsize=None)
def _capability(index):
    return tuple(torch.cuda.get_device_capability(index))


def config(device: torch.device, D: int, Dv: int, dtype: torch.dtype) -> _tuning.LaunchConfig:
    """Tile sizes and launch options (tuning.py: per GPU family, a fixed small config under the
    interpreter). The tile sizes also fix the tile map saved for the backward, so the fake
    (meta) implementation calls this too; meta tensors, and fake CUDA tensors without a GPU,
    take the 'default' family (only the saved tensors' shapes depend on it there)."""
    capability = None
    if device.type == "cuda" and torch.cuda.is_available():
        capability = _capability(device.index if device.index is not None else torch.cuda.current_device())
    return _tuning.select(capability, max(D, Dv), str(dtype).removeprefix("torch."), interpreted=INTERPRETED)


def _common(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, key_padding_mask=None):
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    cfg = config(q.device, D, Dv, q.dtype)
    device = q.device
    limit = _span.POSITION_LIMIT
    offsets = q_offset.to(device).clamp(-limit, limit).to(torch.int32).contiguous()
    lengths = (key_lengths.to(device).to(torch.int32).contiguous() if key_lengths is not None
               else torch.zeros(1, dtype=torch.int32, device=device))
    alpha32 = alpha.to(device=device, dtype=torch.float32).contiguous()
    span32 = (span.to(device=device, dtype=torch.float32).contiguous() if span is not None
              else torch.zeros(1, dtype=torch.float32, device=device))
    # The kernels read the boolean mask as bytes (0: masked); without one HAS_MASK is off and
    # this placeholder is never read.
    mask8 = (key_padding_mask.to(device=device, dtype=torch.bool).contiguous().view(torch.int8)
             if key_padding_mask is not None else torch.zeros(1, dtype=torch.int8, device=device))
    args = dict(scale=float(scale), ramp=float(ramp), H=H, G=H // Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv,
                n_qt=triton.cdiv(Lq, cfg.block_m), n_kt=triton.cdiv(Lk, cfg.block_n))
    flags = dict(HAS_SPAN=span is not None, CAUSAL=bool(causal), HAS_LENGTHS=key_lengths is not None,
                 HAS_MASK=key_padding_mask is not None,
                 F32=q.dtype == torch.float32, UPCAST=INTERPRETED, LIBDEVICE=not INTERPRETED,
                 BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_padded_width(D), BLOCK_DV=_padded_width(Dv))
    return cfg, offsets, lengths, alpha32, span32, mask8, args, flags


def _check_device(q):
    if q.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("the triton backend runs CPU tensors only under the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before attnspec loads the backend")


def run_forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, stats=False,
                key_padding_mask=None):
    """(out, (top, c) [B, H, Lq, 2] float32, tile map int8 [B, H, query tiles, key tiles]) and, with
    stats=True, also (sum_j p_ij [B, H, Lq] float32, passes per query tile [B, H, tiles] int32).
    key_padding_mask: None or a bool [B, Lk] tensor (True: the key may be read)."""
    _check_device(q)
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    cfg, offsets, lengths, alpha32, span32, mask8, args, flags = _common(q, k, v, alpha, span, ramp, causal,
                                                                         key_lengths, q_offset, scale,
                                                                         key_padding_mask)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.zeros((B, H, Lq, Dv), dtype=q.dtype, device=q.device)
    c = torch.zeros((B, H, Lq, 2), dtype=torch.float32, device=q.device)
    bits = torch.zeros((B, H, args["n_qt"], args["n_kt"]), dtype=torch.int8, device=q.device)
    psum = torch.zeros((B, H, Lq), dtype=torch.float32, device=q.device)
    passes = torch.zeros((B, H, args["n_qt"]), dtype=torch.int32, device=q.device)
    if B * H * Lq > 0:
        grid = (args["n_qt"], B * H)
        _forward_kernel[grid](q, k, v, out, c, bits, alpha32, span32, lengths, offsets, mask8, psum, passes,
                              STATS=stats, MAX_ITERS=MAX_PASSES, HTOL=H_TOL, CTOL=C_TOL, **args, **flags,
                              **cfg.options("forward"))
    if stats:
        return out, c, bits, psum, passes
    return out, c, bits


def forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, key_padding_mask=None):
    """The custom op's forward: (out, row statistics, tile map)."""
    return run_forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale,
                       key_padding_mask=key_padding_mask)


def backward(grad_out, c, bits, q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale,
             alpha_grad=True, key_padding_mask=None):
    """(dq, dk, dv, dalpha [H], dspan [H]) in the inputs' dtypes; dspan is zeros without span."""
    _check_device(q)
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    cfg, offsets, lengths, alpha32, span32, mask8, args, flags = _common(q, k, v, alpha, span, ramp, causal,
                                                                         key_lengths, q_offset, scale,
                                                                         key_padding_mask)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = grad_out.to(q.dtype).contiguous()
    c = c.contiguous()
    if tuple(bits.shape) != (B, H, args["n_qt"], args["n_kt"]):
        raise RuntimeError(f"the forward saved a tile map of shape {tuple(bits.shape)} but this backward's tiles "
                           f"({cfg.block_m} x {cfg.block_n}) need {(B, H, args['n_qt'], args['n_kt'])}: was "
                           f"{_tuning.ENV} changed between the forward and the backward?")
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    gbar = torch.zeros((B, H, Lq), dtype=torch.float32, device=q.device)
    dalpha_rows = torch.zeros((B, H, Lq), dtype=torch.float32, device=q.device)
    dspan_rows = torch.zeros((B, H, Lq), dtype=torch.float32, device=q.device)
    if B * H * Lq > 0 and Lk > 0:
        _backward_dq_kernel[(args["n_qt"], B * H)](
            q, k, v, c, bits, dout, dq, gbar, dalpha_rows, dspan_rows, alpha32, span32, lengths, offsets, mask8,
            ALPHA_GRAD=bool(alpha_grad), SPAN_GRAD=span is not None, **args, **flags,
            **cfg.options("backward_dq"))
        _backward_dkdv_kernel[(args["n_kt"], B * Hkv)](
            q, k, v, c, gbar, bits, dout, dk, dv, alpha32, span32, lengths, offsets, mask8, **args, **flags,
            **cfg.options("backward_dkdv"))
    dalpha = dalpha_rows.sum((0, 2)).to(alpha.dtype)
    dspan = torch.zeros_like(alpha) if span is None else dspan_rows.sum((0, 2)).to(span.dtype)
    return dq, dk, dv, dalpha, dspan


def fake_saved(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale):
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    cfg = config(q.device, D, Dv, q.dtype)
    return [q.new_empty((B, H, Lq, 2), dtype=torch.float32),
            q.new_empty((B, H, triton.cdiv(Lq, cfg.block_m), triton.cdiv(Lk, cfg.block_n)), dtype=torch.int8)]


INTERPRETED = interpreted()
