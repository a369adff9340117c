"""Short query blocks against long key caches (decode steps, Lq <= a few dozen): the
`torch-decode` kernel's forward for calls that ask for no gradient (with gradients the kernel
runs the tiled forward and backward, whose c is consistent with the scores the backward
recomputes).

Each batch row reads only the key window its queries can reach: positions o_b .. o_b + Lq - 1
see keys j with |d| < z + R under span, j <= i + o_b under causal, j < key_lengths[b]. The
window [lo_b, hi_b) is sliced (every row the same: a view) or gathered (one copy of W keys per
batch row) from the cache, so a span head's cost does not grow with the cache; the
[B, H, Lq, Lk] score matrix is never built. The G query heads of a kv group are folded into
the query axis (q as [B, Hkv, G Lq, D]), so K and V are read once per group and never copied
per head. All rows (every head, batch row and query) solve their entmax threshold together:
alpha = 1.5 and 2 on short windows exactly by sorting (sorted_closed_form), other rows by
attnspec.backends.torch.entmax.solve_masked_rows; alpha = 1 runs torch's SDPA on the window.

A key_padding_mask [B, Lk] does not narrow the window (left padding differs per batch row,
and a gathered window costs a copy that a slice does not): it is ANDed into the window's
allowed keys, and its masked keys are zeroed in the window (they may hold NaN/Inf).

Inputs are normalised (attnspec.backends._torch_op.normalise): alpha/span [H] tensors,
q_offset int64 [B], key_lengths int64 [B] or None, key_padding_mask bool [B, Lk] or None.
"""

from __future__ import annotations

import math

import torch

from . import entmax as _entmax
from . import span as _span
from .padding import zero_excluded_keys


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def windows(Lq, Lk, offsets, lengths, causal, reach):
    """[(lo_b, hi_b)] per batch row: the keys rows o_b .. o_b + Lq - 1 may read. m = 0 once
    |d| >= z + R; one key of slack on each side absorbs the rounding of R + z in the compute
    dtype (the mask itself decides exactly)."""
    out = []
    for b, offset in enumerate(offsets):
        first, last = offset, offset + Lq - 1
        lo, hi = 0, Lk
        if lengths is not None:
            hi = min(hi, lengths[b])
        if causal:
            hi = min(hi, last + 1)
        if reach is not None:
            lo = max(lo, int(math.floor(first - reach)))
            if not causal:
                hi = min(hi, int(math.ceil(last + reach)) + 1)
        lo = max(0, min(lo, Lk))
        out.append((lo, max(lo, min(Lk, hi))))
    return out


def _window_keys(k, v, spans, dtype, key_padding_mask=None, clean_keys=True):
    """(k_w [B, Hkv, W, D], v_w, starts [B] int64, valid [B, W] bool or None): the window's keys
    in the compute dtype. Columns past a batch row's own window, and keys key_padding_mask
    masks, are marked invalid and zeroed in v_w (they may be padding holding NaN), and in k_w
    unless clean_keys is False (the caller sets their scores itself, so NaN there never
    leaks: a copy of K saved)."""
    B = k.shape[0]
    starts = [lo for lo, _ in spans]
    widths = [hi - lo for lo, hi in spans]
    W = max(widths)
    device = k.device
    if len(set(starts)) == 1 and len(set(widths)) == 1:
        lo = starts[0]
        k_w, v_w = k[:, :, lo:lo + W].to(dtype), v[:, :, lo:lo + W].to(dtype)
        if key_padding_mask is None:
            return k_w, v_w, None, None
        valid = key_padding_mask[:, lo:lo + W].to(device)
        return (zero_excluded_keys(k_w, valid) if clean_keys else k_w), zero_excluded_keys(v_w, valid), None, valid
    Lk = k.shape[2]
    start = torch.tensor(starts, dtype=torch.int64, device=device)
    width = torch.tensor(widths, dtype=torch.int64, device=device)
    cols = torch.arange(W, device=device)
    valid = cols[None, :] < width[:, None]  # [B, W]
    index = (start[:, None] + cols[None, :]).clamp_max(max(Lk - 1, 0))
    if key_padding_mask is not None:
        valid = valid & key_padding_mask.to(device).gather(1, index)
    batch = torch.arange(B, device=device)[:, None]
    k_w = k[batch, :, index].to(dtype).permute(0, 2, 1, 3)  # [B, W, Hkv, D] -> [B, Hkv, W, D]
    v_w = v[batch, :, index].to(dtype).permute(0, 2, 1, 3)
    return (zero_excluded_keys(k_w, valid) if clean_keys else k_w), zero_excluded_keys(v_w, valid), start, valid


#: Windows up to this many keys solve alpha = 1.5 and alpha = 2 rows exactly by sorting
#: (sorted_closed_form); longer ones (decode without span over a long cache) by
#: solve_masked_rows, whose candidate pruning does not sort the whole row.
SORT_MAX_KEYS = 1024
#: Above this many keys the sorted solve first drops the keys that cannot enter the support.
PRUNE_ABOVE = 128


def sorted_closed_form(s, m, alpha):
    """(p, c) of weighted alpha-entmax rows for alpha = 1.5 or 2 (one value for every row),
    exactly, in a fixed number of operations (no iteration, no host sync): the few-op solve
    for short rows, where each operation's fixed cost is what counts.

    With top the row's largest score, b = 1 + eps (s - top) and x = eps (c - top), a key has
    p = m (b - x)_+^(1/eps); the support is the keys with b > x, a prefix of the keys sorted
    by b. For the prefix of the k largest, sum m (b - x)^(1/eps) = 1 is linear (alpha = 2:
    x = (S1 - 1) / M) or quadratic (alpha = 1.5: M x^2 - 2 S1 x + S2 - 1 = 0, its smaller root)
    in the cumulative sums M, S1, S2 of m, m b, m b^2. The prefixes whose root x_k lies below
    their own last key (b_k > x_k) are exactly the first k* (the support's size): for k <= k*
    fewer keys need a lower threshold, x_k <= x* < b_k; for k > k*, sum_{j<=k} m (b_j - b_k)^2
    >= sum_{j<=k*} m (b_j - x*)^2 = 1 puts b_k at or below the root on the decreasing branch
    (alpha = 2 alike), or the prefix has no root. So x = x_(k*), k* counted, no search. One
    Newton step on g(x) = sum m (b - x)_+^(1/eps) - 1 removes the rounding of the cumulative
    sums. s holds -inf wherever a key is not allowed; m is 0 there or None."""
    eps = alpha - 1.0
    top = s.amax(-1, keepdim=True)
    nonempty = torch.isfinite(top)
    top = torch.where(nonempty, top, 0.0)
    b = 1 + eps * (s - top)  # -inf where not allowed
    if s.shape[-1] > PRUNE_ABOVE:
        # Each key alone sets a lower bound of x (more keys only raise it): b_j - m_j^(-eps)
        # solves m_j (b_j - x)^(1/eps) = 1. Keys at or below the largest such bound never enter
        # the support, so only the K best are sorted (topk), K the largest count of the rest.
        alone = b - (1.0 if m is None else m.expand(s.shape).pow(-eps))
        candidates = b > alone.amax(-1, keepdim=True)
        K = max(1, int(candidates.sum(-1).max()))
        b_sorted, order = b.topk(K, -1)
    else:
        b_sorted, order = b.sort(-1, descending=True)
    finite = torch.isfinite(b_sorted)
    if m is None:
        w = finite.to(s.dtype)
    else:
        w = torch.where(finite, m.expand(s.shape).gather(-1, order), 0.0)
    bz = torch.where(finite, b_sorted, 0.0)
    M = w.cumsum(-1)
    S1 = (w * bz).cumsum(-1)
    if alpha == 2.0:
        x = (S1 - 1) / M
    else:
        S2 = (w * bz * bz).cumsum(-1)
        x = (S1 - torch.sqrt((S1 * S1 - M * (S2 - 1)).clamp_min(0))) / M
    # M = 0 (no key yet) gives NaN, and b_k > NaN is False
    k = ((b_sorted > x).sum(-1, keepdim=True) - 1).clamp_min(0)
    x = torch.where(nonempty, x.gather(-1, k), 0.0)  # an empty row has no root (NaN)
    # one Newton step on g(x) = sum m (b - x)_+^(1/eps) - 1 over the support
    u = (b - x).clamp_min(0)
    mu = u if m is None else m * u
    if alpha == 2.0:
        g, slope = mu.sum(-1, keepdim=True) - 1, torch.where(u > 0, 1.0 if m is None else m, 0.0).sum(-1, keepdim=True)
    else:
        g, slope = (mu * u).sum(-1, keepdim=True) - 1, 2 * mu.sum(-1, keepdim=True)
    x = x + torch.where(slope > 0, g / torch.where(slope > 0, slope, 1.0), 0.0)
    u = (b - x).clamp_min(0)  # 0 where not allowed (b = -inf) and in empty rows
    p = u if alpha == 2.0 else u * u
    if m is not None:
        p = m * p
    return p, torch.where(nonempty, top + x / eps, 0.0)


def _solve(scores, m, alphas, eps):
    """(p, c) of the rows; alphas: every head's alpha as a list of numbers (eps = alpha - 1
    broadcasts against the rows)."""
    if scores.shape[-1] <= SORT_MAX_KEYS:
        for value in (1.5, 2.0):
            if all(a == value for a in alphas):
                return sorted_closed_form(scores, m, value)
    return _entmax.solve_masked_rows(scores, m, eps)


def _setup(q, k, v, span, ramp, causal, key_lengths, q_offset, dtype, key_padding_mask=None, clean_keys=True):
    """(k_w, v_w, allowed [B, 1|H, Lq, W] or None (None: every key of the window), m
    [B, H, Lq, W] or None (no span), every_row: True when every row certainly reads some key),
    or None when no row may read any key. clean_keys: see _window_keys."""
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    device = q.device
    offsets = q_offset.tolist()
    lengths = None if key_lengths is None else key_lengths.tolist()
    reach = None if span is None else float(span.max()) + ramp
    spans = windows(Lq, Lk, offsets, lengths, causal, reach)
    W = max(hi - lo for lo, hi in spans)
    if W == 0 or Lq == 0:
        return None
    k_w, v_w, start, valid = _window_keys(k, v, spans, dtype, key_padding_mask, clean_keys)
    if key_padding_mask is not None:
        # the mask may exclude any key, a row's own included: which rows are empty is read
        # from the allowed keys (without a host read of the mask)
        every_row = False
    elif causal or span is not None:
        # the key at distance 0 is allowed under causal and has m = 1 under span (z >= 0)
        every_row = all(lo <= o and o + Lq - 1 < hi for (lo, hi), o in zip(spans, offsets))
    else:
        every_row = all(hi > lo for lo, hi in spans)
    allowed = None if valid is None else valid[:, None, None, :]
    m = None
    if causal or span is not None:
        if start is None:
            start = torch.full((B,), spans[0][0], dtype=torch.int64, device=device)
        rows = torch.arange(Lq, device=device)
        cols = torch.arange(W, device=device)
        d = ((q_offset.to(device) - start)[:, None, None] + rows[None, :, None] - cols[None, None, :])[:, None]
        if causal:
            allowed = (d >= 0) if allowed is None else allowed & (d >= 0)
        if span is not None:
            m = _span.soft_mask(d, span, ramp, dtype)  # [B, H, Lq, W]
            allowed = (m > 0) if allowed is None else allowed & (m > 0)
    return k_w, v_w, allowed, m, every_row


def forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, alphas=None,
            key_padding_mask=None):
    """(out [B, H, Lq, Dv] in q's dtype, c [B, H, Lq, 1] in the compute dtype). alphas: alpha
    as a list, when the caller has read it already."""
    dtype = compute_dtype(q.dtype)
    B, H, Lq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    G = H // Hkv
    # the scores of keys not allowed are set to -inf below (masked_fill: NaN there too), so
    # excluded keys need no zeroing in K
    setup = _setup(q, k, v, span, ramp, causal, key_lengths, q_offset, dtype, key_padding_mask, clean_keys=False)
    if setup is None:
        out = torch.zeros((B, H, Lq, Dv), dtype=q.dtype, device=q.device)
        return out, torch.zeros((B, H, Lq, 1), dtype=dtype, device=q.device)
    k_w, v_w, allowed, m, every_row = setup
    W = k_w.shape[2]
    qt = scale * q.to(dtype)
    if allowed is not None and not every_row:
        # rows that may read no key: their query may hold NaN (SPEC.md 5.3)
        qt = torch.where(allowed.any(-1, keepdim=True), qt, 0.0)
    scores = torch.matmul(qt.reshape(B, Hkv, G * Lq, D), k_w.transpose(-1, -2)).reshape(B, H, Lq, W)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -torch.inf)
    eps = (alpha.to(dtype) - 1)[None, :, None, None]
    p, c = _solve(scores, m, alpha.tolist() if alphas is None else alphas, eps)
    out = torch.matmul(p.reshape(B, Hkv, G * Lq, W), v_w).reshape(B, H, Lq, Dv)
    return out.to(q.dtype), c


def inference(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, key_padding_mask=None):
    """The output alone, for calls that ask for no gradient (no c to keep): alpha = 1 runs
    torch's scaled_dot_product_attention on the window, the span weight entering as the
    additive bias log m (softmax(s + log m) = m exp(s - c)); other calls run `forward`."""
    alphas = alpha.tolist()  # [H] numbers: one read, cheaper than a reduction and a sync
    if any(a != 1 for a in alphas):
        return forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, alphas, key_padding_mask)
    dtype = compute_dtype(q.dtype)
    B, H, Lq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    G = H // Hkv
    setup = _setup(q, k, v, span, ramp, causal, key_lengths, q_offset, dtype, key_padding_mask)
    if setup is None:
        return torch.zeros((B, H, Lq, Dv), dtype=q.dtype, device=q.device), None
    k_w, v_w, allowed, m, every_row = setup
    W = k_w.shape[2]
    qc = q.to(dtype).reshape(B, Hkv, G * Lq, D)
    mask, nonempty = None, None
    if allowed is not None and every_row:
        if m is None:
            mask = allowed.expand(B, H, Lq, W).reshape(B, Hkv, G * Lq, W)
        else:  # log 0 = -inf where not allowed
            mask = torch.log(torch.where(allowed, m, 0.0)).reshape(B, Hkv, G * Lq, W)
    elif allowed is not None:
        allowed = allowed.expand(B, H, Lq, W)
        nonempty = allowed.any(-1, keepdim=True)  # [B, H, Lq, 1]
        if m is None:
            mask = allowed | ~nonempty  # rows with no key read every key (then give 0)
        else:
            mask = torch.where(allowed, torch.log(m), torch.where(nonempty, -torch.inf, 0.0))
        mask = mask.reshape(B, Hkv, G * Lq, W)
        qc = torch.where(nonempty.reshape(B, Hkv, G * Lq, 1), qc, 0.0)
    out = torch.nn.functional.scaled_dot_product_attention(qc, k_w, v_w, attn_mask=mask, scale=scale)
    out = out.reshape(B, H, Lq, Dv)
    if nonempty is not None:
        out = torch.where(nonempty, out, 0.0)
    return out.to(q.dtype), None
