"""Eager adaptive-span alpha-entmax attention in torch: the reference's algorithm on the full
[B, H, Lq, Lk] score matrix (SPEC.md section 5), forward and analytic backward.

Inputs here are already normalised by attnspec.backends._torch_op.normalise: alpha and span are [H]
tensors of the compute dtype, q_offset an int64 [B] tensor, key_lengths an int64 [B] tensor or
None. Grouped-query heads are handled by viewing q as [B, Hkv, G, Lq, D] against k
[B, Hkv, 1, Lk, D]: K and V are never repeated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from attnspec import geometry
from attnspec.backends._torch_op import compute_dtype

from . import entmax as _entmax
from . import span as _span


def _grouped(x, Hkv):
    """[B, H, L, D] -> [B, Hkv, G, L, D] (head h = g * G + i reads kv head g)."""
    B, H, L, D = x.shape
    return x.reshape(B, Hkv, H // Hkv, L, D)


def _masks(q, k, span, ramp, causal, key_lengths, q_offset, dtype, key_padding_mask=None):
    """allowed [B, H|1, Lq, Lk], m [B, H|1, Lq, Lk], key_valid [B, Lk]."""
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    device = q.device
    lengths = key_lengths if key_lengths is not None else torch.full((B,), Lk, device=device)
    key_valid = torch.arange(Lk, device=device)[None, :] < lengths.to(device)[:, None]
    if key_padding_mask is not None:  # masked keys are excluded as keys beyond key_lengths are
        key_valid = key_valid & key_padding_mask.to(device)
    d = _span.distances(Lq, Lk, q_offset.to(device))[:, None]  # [B, 1, Lq, Lk]
    allowed = key_valid[:, None, None, :].expand(B, 1, Lq, Lk)
    if causal:
        allowed = allowed & (d >= 0)
    if span is None:
        m = torch.ones((B, 1, Lq, Lk), dtype=dtype, device=device)
    else:
        m = _span.soft_mask(d, span, ramp, dtype)
        allowed = allowed & (m > 0)
    m = torch.where(allowed, m, torch.zeros_like(m))
    return allowed, m, key_valid


def _clean(q, k, v, allowed, key_valid, dtype):
    """Padding keys and rows with no allowed key may hold NaN: zero them (SPEC.md 5.3)."""
    kv_mask = key_valid[:, None, :, None]
    k = torch.where(kv_mask, k.to(dtype), torch.zeros((), dtype=dtype, device=k.device))
    v = torch.where(kv_mask, v.to(dtype), torch.zeros((), dtype=dtype, device=v.device))
    empty = ~allowed.any(-1, keepdim=True)  # [B, H|1, Lq, 1]
    q = torch.where(empty, torch.zeros((), dtype=dtype, device=q.device), q.to(dtype))
    return q, k, v


def forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, key_padding_mask=None):
    """(out in q's dtype, p, t, m) with p, t, m [B, H, Lq, Lk] in the compute dtype."""
    dtype = compute_dtype(q.dtype)
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    allowed, m, key_valid = _masks(q, k, span, ramp, causal, key_lengths, q_offset, dtype, key_padding_mask)
    qc, kc, vc = _clean(q, k, v, allowed, key_valid, dtype)
    scores = scale * torch.matmul(_grouped(qc, Hkv), kc[:, :, None].transpose(-1, -2)).reshape(B, H, Lq, Lk)
    allowed = allowed.expand(B, H, Lq, Lk)
    m = m.expand(B, H, Lq, Lk)
    eps = (alpha.to(dtype) - 1)[None, :, None, None]
    p, t = _entmax.solve_rows(torch.where(allowed, scores, torch.full_like(scores, -torch.inf)), m, eps, allowed)
    out = torch.matmul(_grouped(p, Hkv), vc[:, :, None]).reshape(B, H, Lq, -1)
    return out.to(q.dtype), p, t, m


def backward(grad_out, p, t, m, q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, alpha_grad=True,
             key_padding_mask=None):
    """(dq, dk, dv, dalpha [H], dspan [H]) in the inputs' dtypes; dspan is zeros without span."""
    dtype = p.dtype
    B, H, Lq, Lk = p.shape
    Hkv = k.shape[1]
    _, _, key_valid = _masks(q, k, None, ramp, False, key_lengths, q_offset, dtype, key_padding_mask)
    row_reads = (m > 0).any(-1, keepdim=True)
    kc = torch.where(key_valid[:, None, :, None], k.to(dtype), torch.zeros((), dtype=dtype, device=k.device))
    vc = torch.where(key_valid[:, None, :, None], v.to(dtype), torch.zeros((), dtype=dtype, device=v.device))
    qc = torch.where(row_reads, q.to(dtype), torch.zeros((), dtype=dtype, device=q.device))
    dout = grad_out.to(dtype)
    g = torch.matmul(_grouped(dout, Hkv), vc[:, :, None].transpose(-1, -2)).reshape(B, H, Lq, Lk)
    eps = (alpha.to(dtype) - 1)[None, :, None, None]
    ds, dm, deps = _entmax.vjp_rows(p, t, eps, g, need_eps=alpha_grad)
    dq = scale * torch.matmul(_grouped(ds, Hkv), kc[:, :, None]).reshape(B, H, Lq, -1)
    dk = scale * torch.matmul(_grouped(ds, Hkv).transpose(-1, -2), _grouped(qc, Hkv)).sum(2)
    dv = torch.matmul(_grouped(p, Hkv).transpose(-1, -2), _grouped(dout, Hkv)).sum(2)
    dk = torch.where(key_valid[:, None, :, None], dk, torch.zeros_like(dk))
    dv = torch.where(key_valid[:, None, :, None], dv, torch.zeros_like(dv))
    dalpha = deps.sum((0, 2, 3))
    if span is None:
        dspan = torch.zeros_like(alpha)
    else:
        dspan = (dm * _span.mask_slope(m, ramp)).sum((0, 2, 3))
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dalpha.to(alpha.dtype),
            dspan.to(alpha.dtype if span is None else span.dtype))


# --- tiled: never a [B, H, Lq, Lk] buffer -----------------------------------------------------
#
# Queries are processed in tiles of rows. A tile reads only the key window its rows may see
# (causal bound, span window |d| < z + R, key_lengths), so a span-z head costs ~Lq (z + R)
# and memory is one [B, H, tile, window] block at a time. The forward keeps one number per
# row, c (SPEC.md section 2.2), from which the backward rebuilds p exactly, without iterating.

#: Elements of one [B, H, tile, window] block (several such buffers live at once), and the
#: smallest tile (tests lower them to force many tiles on small inputs). An entmax tile runs
#: dozens of small operations (the solve on its compacted rows), so fewer, larger tiles pay;
#: a softmax tile is a few passes over the block, faster while the block stays in cache. Both
#: sizes are the fastest forward + backward of blocks from 2^17 to 2^20 elements on CPU,
#: except that entmax stops short of 2^20, which would cost its calls memory.
BLOCK_ELEMENTS = 1 << 19
SOFTMAX_BLOCK_ELEMENTS = 1 << 18
MIN_TILE = 16


class _Bounds(NamedTuple):
    """What the key windows of a call depend on, read from its tensors once (each read syncs)."""

    first_offset: int  # smallest q_offset over the batch
    last_offset: int  # largest
    max_length: int | None  # longest key_lengths, None without
    min_length: int | None  # shortest
    reach: int | None  # geometry.reach over the heads, None without span


def _bounds(span, ramp, key_lengths, q_offset):
    offsets = q_offset.tolist()
    lengths = None if key_lengths is None else key_lengths.tolist()
    # span is in the compute dtype, where soft_mask forms R + z: reach rounds the same way.
    reach = None if span is None else geometry.reach(span.tolist(), ramp, str(span.dtype).removeprefix("torch."))
    return _Bounds(min(offsets), max(offsets), None if lengths is None else max(lengths),
                   None if lengths is None else min(lengths), reach)


def _window_within(i0, i1, Lk, causal, bounds):
    """geometry.key_window for rows i0..i1-1 from the call's bounds."""
    return geometry.key_window(i0, i1, Lk, offsets=(bounds.first_offset, bounds.last_offset), causal=causal,
                               reach=bounds.reach, key_lengths=bounds.max_length)


def _window(i0, i1, Lk, span, ramp, causal, key_lengths, q_offset):
    """[j0, j1): the keys rows i0..i1-1 may read, over every batch and head. Under
    torch.compile (no data-dependent shapes) it is the whole key range."""
    if torch.compiler.is_compiling():
        return 0, Lk
    return _window_within(i0, i1, Lk, causal, _bounds(span, ramp, key_lengths, q_offset))


def _sum_groups(x):
    """[B, Hkv, G, ...] -> [B, Hkv, ...]: the query heads of a group add up (a view if G = 1)."""
    return x[:, :, 0] if x.shape[2] == 1 else x.sum(2)


def _tiles(B, H, Lq, Lk, span, ramp, causal, key_lengths, q_offset, softmax=False, padded=False):
    """(i0, i1, j0, j1, masked_from) for each query tile: rows i0..i1-1 and the keys j0..j1-1
    they may read (masked_from: see _masked_from); tiles with no key in reach are left out.

    Each tile is as tall as keeps its [B, H, T, W] block within BLOCK_ELEMENTS (softmax: every
    head has alpha = 1, SOFTMAX_BLOCK_ELEMENTS) (and at least
    MIN_TILE rows): causal rows near the start and span heads read few keys, so their tiles
    are taller. Every tile costs fixed Python and dispatch work, so fewer, fuller tiles are
    faster (about half as many as tiles sized for Lk on a causal call). Under torch.compile
    (no data-dependent shapes) the tiles are fixed and read every key. padded: a
    key_padding_mask may exclude any key, so every key of the window is masked."""
    elements = max(1, (SOFTMAX_BLOCK_ELEMENTS if softmax else BLOCK_ELEMENTS) // max(1, B * H))
    if torch.compiler.is_compiling():
        tile = max(MIN_TILE, elements // max(1, Lk))
        for i0 in range(0, Lq, tile):
            yield i0, min(Lq, i0 + tile), 0, Lk, 0
        return
    bounds = _bounds(span, ramp, key_lengths, q_offset)
    i0 = 0
    while i0 < Lq:
        # the tallest tile in [MIN_TILE, Lq - i0] whose block fits (its window only grows with T)
        low, high = min(MIN_TILE, Lq - i0), Lq - i0
        T = low
        while low <= high:
            middle = (low + high) // 2
            j0, j1 = _window_within(i0, i0 + middle, Lk, causal, bounds)
            if middle * (j1 - j0) <= elements:
                T, low = middle, middle + 1
            else:
                high = middle - 1
        j0, j1 = _window_within(i0, i0 + T, Lk, causal, bounds)
        if j1 > j0:
            yield i0, i0 + T, j0, j1, (j0 if padded else _masked_from(i0, j0, j1, span, causal, bounds))
        i0 += T


def _masked_from(i0, j0, j1, span, causal, bounds):
    """The first key of the window that some row of the tile may not read: keys before it are
    allowed for every row (causal: up to the tile's first position; key_lengths: below the
    shortest), so _tile_scores masks only the rest, on a causal call the tile's diagonal square.
    With span every key needs its weight: the whole window."""
    if span is not None:
        return j0
    bound = j1
    if causal:
        bound = min(bound, i0 + bounds.first_offset + 1)
    if bounds.min_length is not None:
        bound = min(bound, bounds.min_length)
    return max(j0, bound)


def _prepare(k, v, key_lengths, dtype, transpose_v, key_padding_mask=None):
    """Once per call: k and v in the compute dtype with padding keys zeroed (they may hold NaN,
    SPEC.md 5.3), and kT (and vT, for the backward) [B, Hkv, D, Lk] transposed into
    contiguous copies: transposed views slow the products of small heads (D = 16) down, and
    the copies are not what sets the peak memory."""
    zero = torch.zeros((), dtype=dtype, device=k.device)
    kc, vc = k.to(dtype), v.to(dtype)
    if key_lengths is not None or key_padding_mask is not None:
        if key_lengths is None:
            key_valid = key_padding_mask.to(k.device)
        else:
            key_valid = (torch.arange(k.shape[2], device=k.device)[None, :] < key_lengths.to(k.device)[:, None])
            if key_padding_mask is not None:
                key_valid = key_valid & key_padding_mask.to(k.device)
        kc = torch.where(key_valid[:, None, :, None], kc, zero)
        vc = torch.where(key_valid[:, None, :, None], vc, zero)
    return kc, kc.transpose(-1, -2).contiguous(), vc, vc.transpose(-1, -2).contiguous() if transpose_v else None


def _tile_scores(q, kT, i0, i1, j0, j1, masked_from, span, ramp, causal, key_lengths, q_offset, scale, dtype,
                 key_padding_mask=None):
    """Rows i0..i1-1 against keys j0..j1-1: (scores [B, H, T, W] holding -inf wherever a key
    is not allowed, m [B, H, T, W] or None without span, the query tile qt).

    m is the span weight alone; where causal or key_lengths exclude a key its score is -inf,
    which gives p = 0 whatever m says. Keys before masked_from are allowed for every row (no
    mask is built for them). Rows that may read no key have their query zeroed (it may hold
    NaN there, SPEC.md 5.3)."""
    B, H, _, _ = q.shape
    Hkv = kT.shape[1]
    device = q.device
    T, W = i1 - i0, j1 - j0
    a = masked_from if span is None else j0
    keys = torch.arange(a, j1, device=device)
    allowed = None  # [B, 1, T, W] from causal and key_lengths
    if key_lengths is not None:
        allowed = (keys[None, :] < key_lengths.to(device)[:, None])[:, None, None, :]
    if key_padding_mask is not None:  # _tiles gives masked_from = j0 then: a == j0
        readable = key_padding_mask.to(device)[:, None, None, j0:j1]
        allowed = readable if allowed is None else allowed & readable
    if causal or span is not None:
        rows = torch.arange(i0, i1, device=device)
        d = (q_offset.to(device)[:, None, None] + rows[None, :, None] - keys[None, None, :])[:, None]  # [B,1,T,W]
        if causal:
            allowed = (d >= 0) if allowed is None else allowed & (d >= 0)
    m = None
    if span is not None:
        m = _span.soft_mask(d, span, ramp, dtype)  # [B, H, T, W]
        allowed = (m > 0) if allowed is None else allowed & (m > 0)
    qt = scale * q[:, :, i0:i1].to(dtype)
    bias = None
    if allowed is not None and a < j1:
        if a == j0:  # else every row may read keys j0..a-1
            qt = torch.where(allowed.any(-1, keepdim=True), qt, 0.0)
        bias = torch.where(allowed, 0.0, -torch.inf).to(dtype)
    scores = torch.matmul(_grouped(qt, Hkv), kT[:, :, None, :, j0:j1]).reshape(B, H, T, W)
    if bias is not None:
        scores[..., a - j0:].add_(bias)  # -inf where not allowed; cheaper than masked_fill on CPU
    return scores, m, qt


def _rows_vjp(s, m, eps, c, g, need_eps, ramp):
    """The backward of one block's rows, rebuilding p from c: (p, ds, deps [..., 1], dspan
    [..., 1] = sum_j dL/dm_j dm_j/dz, or None without span). s holds -inf where a key is not
    allowed; m is the span weight or None.

    Softmax rows (alpha = 1) take the plain softmax backward; entmax rows with small supports
    work on the compacted support [..., K] only; other entmax rows (and everything under
    torch.compile) on the whole block. A block with both kinds of rows splits them."""
    compiling = torch.compiler.is_compiling()
    if not compiling and bool((eps == 0).any()) and bool((eps > 0).any()):
        rows = s.shape[:-1]
        softmax = (eps == 0).expand(rows + (1,))[..., 0]
        p, ds = torch.zeros_like(s), torch.zeros_like(s)
        deps = torch.zeros(rows + (1,), dtype=s.dtype, device=s.device)
        dspan = None if m is None else torch.zeros_like(deps)
        for chosen in (softmax, ~softmax):
            m_rows = None if m is None else m.expand(s.shape)[chosen]
            p[chosen], ds[chosen], deps[chosen], dspan_rows = _rows_vjp(
                s[chosen], m_rows, eps.expand(rows + (1,))[chosen], c.expand(rows + (1,))[chosen], g[chosen],
                need_eps, ramp)
            if dspan is not None:
                dspan[chosen] = dspan_rows
        return p, ds, deps, dspan
    if not compiling and not bool((eps > 0).any()):
        p, ds, deps = _entmax.softmax_rows_vjp(s, m, c, g, need_eps)
        dspan = None
        if m is not None:  # dL/dm = ds / m where m > 0
            dspan = torch.where(m > 0, ds / m * _span.mask_slope(m, ramp), 0.0).sum(-1, keepdim=True)
        return p, ds, deps, dspan
    support = _entmax.sparse_support(s, eps, c)
    if support is None:
        p, t = _entmax.probabilities(s, m, eps, None, c)  # -inf scores give p = 0
        ds, dm, deps = _entmax.vjp_rows(p, t, eps, g, need_eps=need_eps)
    else:  # every elementwise step on the compacted support [..., K] only
        index, valid = support
        W = s.shape[-1]
        m = None if m is None else m.gather(-1, index)
        p_k, t_k = _entmax.probabilities(s.gather(-1, index), m, eps, valid, c)
        ds_k, dm, deps = _entmax.vjp_rows(p_k, t_k, eps, g.gather(-1, index), need_eps=need_eps)
        p, ds = _entmax.expand(index, p_k, W), _entmax.expand(index, ds_k, W)
    dspan = None if m is None else (dm * _span.mask_slope(m, ramp)).sum(-1, keepdim=True)
    return p, ds, deps, dspan


def _softmax_only(eps):
    """Every head has alpha = 1 (never known under torch.compile: False there)."""
    return not torch.compiler.is_compiling() and not bool((eps > 0).any())


def tiled_forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, key_padding_mask=None):
    """(out in q's dtype, c [B, H, Lq, 1] in the compute dtype)."""
    dtype = compute_dtype(q.dtype)
    B, H, Lq, _ = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    eps = (alpha.to(dtype) - 1)[None, :, None, None]
    padded = key_padding_mask is not None
    _, kT, vc, _ = _prepare(k, v, key_lengths, dtype, transpose_v=False, key_padding_mask=key_padding_mask)
    out = torch.zeros((B, H, Lq, Dv), dtype=dtype, device=q.device)
    c = torch.zeros((B, H, Lq, 1), dtype=dtype, device=q.device)
    tiles = _tiles(B, H, Lq, Lk, span, ramp, causal, key_lengths, q_offset, _softmax_only(eps), padded)
    for i0, i1, j0, j1, masked_from in tiles:
        scores, m, _ = _tile_scores(q, kT, i0, i1, j0, j1, masked_from, span, ramp, causal, key_lengths, q_offset,
                                    scale, dtype, key_padding_mask)
        p, c_tile = _entmax.solve_masked_rows(scores, m, eps)
        out[:, :, i0:i1] = torch.matmul(_grouped(p, Hkv), vc[:, :, None, j0:j1]).reshape(B, H, i1 - i0, Dv)
        c[:, :, i0:i1] = c_tile
    return out.to(q.dtype), c


def tiled_backward(grad_out, c, q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, alpha_grad=True,
                   key_padding_mask=None):
    dtype = c.dtype
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    eps = (alpha.to(dtype) - 1)[None, :, None, None]
    padded = key_padding_mask is not None
    kc, kT, _, vT = _prepare(k, v, key_lengths, dtype, transpose_v=True, key_padding_mask=key_padding_mask)
    dq = torch.zeros((B, H, Lq, D), dtype=dtype, device=q.device)
    dk = torch.zeros((B, Hkv, Lk, D), dtype=dtype, device=q.device)
    dv = torch.zeros((B, Hkv, Lk, Dv), dtype=dtype, device=q.device)
    dalpha = torch.zeros((H,), dtype=dtype, device=q.device)
    dspan = torch.zeros((H,), dtype=dtype, device=q.device)
    dout = grad_out.to(dtype)
    tiles = _tiles(B, H, Lq, Lk, span, ramp, causal, key_lengths, q_offset, _softmax_only(eps), padded)
    for i0, i1, j0, j1, masked_from in tiles:
        T, W = i1 - i0, j1 - j0
        scores, m, qt = _tile_scores(q, kT, i0, i1, j0, j1, masked_from, span, ramp, causal, key_lengths, q_offset,
                                     scale, dtype, key_padding_mask)
        dout_t = dout[:, :, i0:i1]
        g = torch.matmul(_grouped(dout_t, Hkv), vT[:, :, None, :, j0:j1]).reshape(B, H, T, W)
        p, ds, deps, dspan_rows = _rows_vjp(scores, m, eps, c[:, :, i0:i1], g, alpha_grad, ramp)
        # qt holds scale * q: ds/dq = scale k, ds/dk = scale q. Padding keys get ds = p = 0.
        dq[:, :, i0:i1] = scale * torch.matmul(_grouped(ds, Hkv), kc[:, :, None, j0:j1]).reshape(B, H, T, D)
        dk[:, :, j0:j1] += _sum_groups(torch.matmul(_grouped(ds, Hkv).transpose(-1, -2), _grouped(qt, Hkv)))
        dv[:, :, j0:j1] += _sum_groups(torch.matmul(_grouped(p, Hkv).transpose(-1, -2), _grouped(dout_t, Hkv)))
        dalpha += deps.sum((0, 2, 3))
        if dspan_rows is not None:
            dspan += dspan_rows.sum((0, 2, 3))
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dalpha.to(alpha.dtype),
            dspan.to(alpha.dtype if span is None else span.dtype))
