"""Checks of the per-block operations (SPEC.md section 10) against attnspec.reference.partial.

A case is one sequence split in ragged blocks; one query block (drawn) against every key block
goes through each operation of the backend's 'partial' kernel and of the reference, on the
same inputs (the case rounded to the dtype under test; c and gbar, which the operations take
as inputs, are the reference's for the whole row, rounded likewise). Tolerances are those of
SPEC.md section 9: scores and row bounds within `score_error`, sums and values within the
forward bound relative to their size, the gradient pieces within the gradient bound. Entmax rows with a key within
`gradient_margin` of the support's edge skip what w = p/u and psi touch (w jumps there at
alpha = 2 and is steeper than any line above alpha = 1.5): a score error of that size may move
the key across it.
"""

from __future__ import annotations

import numpy as np

from attnspec.precision import compute_dtype, round_to
from attnspec.reference import partial as ref

from . import tolerances
from ._compare import CheckFailed, assert_close
from .attention import _booleans


def _finite(x):
    x = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(x), x, 0.0)


def _max(x) -> float:
    x = np.abs(np.asarray(x, dtype=np.float64))
    x = x[np.isfinite(x)]
    return float(x.max()) if x.size else 0.0


def _same_pattern(check, name, actual, expected):
    """Where a result is -inf (no allowed key), both must be."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise CheckFailed(check, f"{name}.shape={actual.shape}, but should be {expected.shape}")
    differ = np.isneginf(actual) != np.isneginf(expected)
    if differ.any():
        idx = tuple(int(i) for i in np.argwhere(differ)[0])
        raise CheckFailed(check, f"{name}[{', '.join(map(str, idx))}]={actual[idx]!r}, but should be "
                                 f"{expected[idx]!r} (which keys are allowed differs)")


def _close_finite(check, name, actual, expected, atol):
    _same_pattern(check, name, actual, expected)
    assert_close(check, name, _finite(actual), _finite(expected), atol)


def _run_pair(ops, q, k, v, key_mask, c, gbar_rows, dout_rows, q_start, k_start, *, span, eps, lengths, offsets,
              ramp, causal, scale):
    """Every operation on one (query block, key block) pair, in one function so that a
    compiling framework compiles it once per shape."""
    g = ops.block_scores(q, k, v, q_start, k_start, span, ramp, causal, lengths, offsets, scale, key_mask)
    return (g.s, g.m, ops.row_bounds(g, eps), ops.row_sums(g, eps, c), ops.weighted_values(g, eps, c),
            ops.softmax_block(g), ops.backward_block(g, eps, c, gbar_rows, dout_rows, scale, ramp, True))


_JITTED = {}


def _jitted(fw, fn, static=()):
    """fn as a jax program (compiled once per shape: called eagerly, each of its small ops
    would be compiled on its own); fn itself for other frameworks."""
    if fw.name != "jax":
        return fn
    if fn not in _JITTED:
        _JITTED[fn] = fw.jax.jit(fn, static_argnames=static)
    return _JITTED[fn]


def check_partial(ctx, case) -> None:
    case = case.rounded(ctx.dtype)
    ops, fw, dtype, device = ctx.kernel.fn, ctx.framework, ctx.dtype, ctx.device
    compute = compute_dtype(dtype)
    L = case.q.shape[2]
    eps = (np.asarray(case.alpha, np.float64) - 1.0)[None, :, None, None]
    starts = np.concatenate([[0], np.cumsum(case.splits)[:-1]]).astype(int)
    blocks = [(int(a), int(a + n)) for a, n in zip(starts, case.splits)]
    mask = case.key_padding_mask

    def arrays(x):
        return fw.array(x, dtype, device)

    eps_b = fw.array(eps, compute, device)
    span_b = None if case.span is None else fw.array(case.span, compute, device)
    lengths_b = fw.integers(case.key_lengths, device)
    offsets_b = fw.integers(np.asarray(case.q_offset, np.int64), device)

    def ref_scores(a, b, c0, c1):
        return ref.block_scores(case.q[:, :, a:b], case.k[:, :, c0:c1], case.v[:, :, c0:c1], a, c0, case.span,
                                case.ramp, case.causal, case.key_lengths, case.q_offset, case.scale,
                                None if mask is None else mask[:, c0:c1])

    # The whole rows: the normaliser c and gbar the operations take as inputs.
    full = ref_scores(0, L, 0, L)
    c_all = round_to(ref.normaliser(full, eps), compute)
    _, wv_all, wsum_all = ref.weighted_values(full, eps, c_all)
    wv_all, wsum_all = round_to(wv_all, compute), round_to(wsum_all, compute)
    dout = case.grad_out
    gbar_all = round_to(ref.gbar(dout, wv_all, wsum_all), compute)
    max_s = _max(full.s)
    max_v = max(_max(np.where(np.isfinite(case.v), case.v, 0.0)), 1e-30)
    max_dout = _max(dout)
    score_tol = tolerances.score_error(dtype, max_s)
    margin = tolerances.gradient_margin(dtype, max_s)
    with np.errstate(divide="ignore", invalid="ignore"):
        edge = np.abs(full.s - c_all + 1.0 / np.where(eps > 0, eps, np.inf))
    edge = np.where(np.isfinite(full.s) & (eps > 0), edge, np.inf).min(-1)  # [B, H, L]

    check = "partial: gbar"
    assert_close(check, "gbar", fw.to_numpy(_jitted(fw, ops.gbar)(arrays(dout), fw.array(wv_all, compute, device),
                                                     fw.array(wsum_all, compute, device))),
                 ref.gbar(dout, wv_all, wsum_all),
                 tolerances.forward_atol(dtype, 0.0, max_dout * max_v * case.v.shape[-1]))

    run_pair = _jitted(fw, _run_pair, ("ops", "causal"))
    merge_softmax = _jitted(fw, ops.merge_softmax)
    statics = dict(span=span_b, eps=eps_b, lengths=lengths_b, offsets=offsets_b, ramp=float(case.ramp),
                   causal=bool(case.causal), scale=float(case.scale))

    # One query block per example against every key block (a compiling framework compiles each
    # pair's shapes once): the draw chooses which.
    for a, b in [blocks[int(case.query_block) % len(blocks)]]:
        c = c_all[:, :, a:b]
        c_b = fw.array(c, compute, device)
        near_edge = bool((edge[:, :, a:b] < margin).any())
        softmax_parts = []
        for c0, c1 in blocks:
            where = f" (rows {a}:{b}, keys {c0}:{c1})"
            r = ref_scores(a, b, c0, c1)
            s_g, m_g, bounds_g, sums_g, values_g, softmax_g, backward_g = run_pair(
                ops, arrays(case.q[:, :, a:b]), arrays(case.k[:, :, c0:c1]), arrays(case.v[:, :, c0:c1]),
                None if mask is None else _booleans(fw, mask[:, c0:c1], device), c_b,
                fw.array(gbar_all[:, :, a:b], compute, device), arrays(dout[:, :, a:b]), a, c0, **statics)
            _close_finite("partial: block_scores", "s" + where, fw.to_numpy(s_g), r.s, score_tol)
            if (m_g is None) != (r.m is None):
                raise CheckFailed("partial: block_scores", "m" + where + f" is {'None' if m_g is None else 'set'}")
            if r.m is not None:
                assert_close("partial: block_scores", "m" + where, fw.to_numpy(m_g), r.m,
                             8 * tolerances.EPS[compute])
            got = [fw.to_numpy(x) for x in bounds_g]
            want = ref.row_bounds(r, eps)
            for name, x, y in zip(("top", "mass", "lone", "lse"), got, want):
                tol = (tolerances.COMPUTE_FACTOR * tolerances.EPS[compute] * (c1 - c0) if name == "mass"
                       else tolerances.score_error(dtype, max_s + _max(y)))
                _close_finite("partial: row_bounds", name + where, x, y, tol)
            sums_tol = tolerances.forward_atol(dtype, max_s, 1.0)
            got = [fw.to_numpy(x) for x in sums_g]
            want = ref.row_sums(r, eps, c)
            assert_close("partial: row_sums", "sum p" + where, got[0], want[0], sums_tol * max(1.0, _max(want[0])))
            if not near_edge:
                assert_close("partial: row_sums", "sum w" + where, got[1], want[1], sums_tol * max(1.0, _max(want[1])))
            got = [fw.to_numpy(x) for x in values_g]
            want = ref.weighted_values(r, eps, c)
            size = max(1.0, _max(want[2]), _max(ref.row_sums(r, eps, c)[0]))
            assert_close("partial: weighted_values", "sum p v" + where, got[0], want[0],
                         tolerances.forward_atol(dtype, max_s, max_v) * size)
            if not near_edge:
                assert_close("partial: weighted_values", "sum w v" + where, got[1], want[1],
                             tolerances.forward_atol(dtype, max_s, max_v) * size)
                assert_close("partial: weighted_values", "sum w" + where, got[2], want[2], sums_tol * size)
            lse_g, out_g = (fw.to_numpy(x) for x in softmax_g)
            lse_r, out_r = ref.softmax_block(r)
            _close_finite("partial: softmax_block", "lse" + where, lse_g, lse_r, tolerances.score_error(dtype, max_s))
            assert_close("partial: softmax_block", "out" + where, out_g, out_r,
                         tolerances.forward_atol(dtype, max_s, max_v))
            softmax_parts.append((lse_r, out_r))
            if near_edge:
                ctx.counters["gradient_skips"] += 1
                continue
            ctx.counters["gradient_checks"] += 1
            want = ref.backward_block(r, eps, c, gbar_all[:, :, a:b], dout[:, :, a:b], case.scale, case.ramp, True)
            floor = max_dout * max(1.0, max_v)
            for name, x, y in zip(("dq", "dk", "dv", "deps", "dspan"), backward_g, want):
                if (x is None) != (y is None):
                    raise CheckFailed("partial: backward_block", f"{name}{where} is {'None' if x is None else 'set'}")
                if y is not None:
                    assert_close("partial: backward_block", name + where, fw.to_numpy(x), y,
                                 tolerances.gradient_atol(dtype, max_s, y, floor))
        # merge_softmax on the reference's per-block results, in order.
        lse, out = softmax_parts[0]
        for lse_b, out_b in softmax_parts[1:]:
            got = merge_softmax(fw.array(lse, compute, device), fw.array(out, compute, device),
                                    fw.array(lse_b, compute, device), fw.array(out_b, compute, device))
            lse, out = ref.merge_softmax(lse, out, lse_b, out_b)
            _close_finite("partial: merge_softmax", f"lse (rows {a}:{b})", fw.to_numpy(got[0]), lse,
                          tolerances.score_error(dtype, max_s))
            assert_close("partial: merge_softmax", f"out (rows {a}:{b})", fw.to_numpy(got[1]), out,
                         tolerances.forward_atol(dtype, max_s, max_v))


CHECKS = (check_partial,)
