"""Per-block pieces of attention, for rows whose keys are split over several blocks (a
sequence sharded over devices): every row statistic of SPEC.md sections 2 and 4 is a sum, a
max or a log-sum-exp over the keys, so blocks can compute their parts and the parts combine.

For a block of keys (global positions k_start ...) against a block of queries (q_start ...):
- `block_scores`: the scores with -inf where a key is not allowed, and the span weights;
- `row_bounds`: the pieces of the c bracket (largest score, sum of weights, the lone-key lower
  bound) and the log-sum-exp of s + log m (alpha = 1's c); combine with max, +, max, logaddexp;
- `row_sums`: sum p and sum p/u for a given normaliser c (a Newton step on h(c) = log sum p
  needs both: h' = -sum(p/u) / sum p); combine with +;
- `weighted_values`: sum p v, sum w v and sum w (w = p/u): the output, and what the backward's
  row statistic gbar = dout . (sum w v) / sum w needs; combine with +;
- `softmax_block`: alpha = 1's online merge, (lse, P V normalised within the block);
- `backward_block`: the block's share of dq, dk, dv, dalpha, dspan for a known global c and gbar.

Everything computes in the compute dtype (float64 for float64, else float32) and reuses the
row functions of the torch backend (log_ratio, psi, the span mask). These are the backend's
'partial' op (SPEC.md section 10, defined by attnspec.reference.partial): the backend declares
this module as that op's kernel and the conformance suite checks each function against the
reference; attnspec.distributed.torch calls the functions of that same kernel.
"""

from __future__ import annotations

import torch

from . import entmax as _entmax
from . import span as _span


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x, Hkv):
    B, H, L, D = x.shape
    return x.reshape(B, Hkv, H // Hkv, L, D)


def _safe(eps):
    return torch.where(eps > 0, eps, torch.ones_like(eps))


class Block:
    """One query block against one key block: s [B, H, Lq, W] (-inf where not allowed), m (span
    weights, 0 where not allowed; None without span), and the cleaned inputs (compute dtype):
    q zeroed on rows with no allowed key in the block, k and v zeroed beyond key_lengths."""

    __slots__ = ("s", "m", "q", "k", "v", "Hkv")

    def __init__(self, s, m, q, k, v, Hkv):
        self.s, self.m, self.q, self.k, self.v, self.Hkv = s, m, q, k, v, Hkv


def block_scores(q, k, v, q_start, k_start, span, ramp, causal, key_lengths, q_offset, scale,
                 key_padding_mask=None):
    """q [B, H, Lq, D] at global rows q_start..., k/v [B, Hkv, W, *] at keys k_start...;
    span [H] or None, key_lengths [B] or None, q_offset [B] (int64), key_padding_mask [B, W]
    (bool, True = readable; the block's keys) or None: a Block."""
    dtype = compute_dtype(q.dtype)
    B, H, Lq, _ = q.shape
    Hkv, W = k.shape[1], k.shape[2]
    device = q.device
    keys = k_start + torch.arange(W, device=device)
    rows = q_start + torch.arange(Lq, device=device)
    d = (q_offset.to(device)[:, None, None] + rows[None, :, None] - keys[None, None, :])[:, None]  # [B,1,Lq,W]
    allowed = torch.ones((B, 1, Lq, W), dtype=torch.bool, device=device)
    kc, vc = k.to(dtype), v.to(dtype)
    valid = None
    if key_lengths is not None:
        valid = keys[None, :] < key_lengths.to(device)[:, None]  # [B, W]
    if key_padding_mask is not None:
        readable = key_padding_mask.to(device=device, dtype=torch.bool)
        valid = readable if valid is None else valid & readable
    if valid is not None:
        allowed = allowed & valid[:, None, None, :]
        zero = torch.zeros((), dtype=dtype, device=device)
        kc = torch.where(valid[:, None, :, None], kc, zero)  # padding may hold NaN (SPEC.md 5.3)
        vc = torch.where(valid[:, None, :, None], vc, zero)
    if causal:
        allowed = allowed & (d >= 0)
    m = None
    if span is not None:
        m = _span.soft_mask(d, span, ramp, dtype)  # [B, H, Lq, W]
        allowed = allowed & (m > 0)
        m = torch.where(allowed, m, 0.0)
    qc = torch.where(allowed.any(-1, keepdim=True), q.to(dtype), 0.0)  # rows reading nothing here
    s = scale * torch.matmul(_grouped(qc, Hkv), kc[:, :, None].transpose(-1, -2)).reshape(B, H, Lq, W)
    s = torch.where(allowed, s, -torch.inf)
    return Block(s, m, qc, kc, vc, Hkv)


def _log_m(s, m):
    allowed = torch.isfinite(s)
    if m is None:
        return torch.where(allowed, 0.0, -torch.inf)
    return torch.where(allowed, torch.log(torch.where(allowed, m, 1.0)), -torch.inf)


def row_bounds(block, eps):
    """(top, mass, lone, lse), each [B, H, Lq, 1], of one block's allowed keys: the largest
    score, the sum of weights, max_j s_j - expm1(-eps log m_j) / eps (at that c key j alone has
    p_j = 1: a lower bound of c, SPEC.md 2.4; s_j + log m_j at eps = 0) and log sum exp(s + log m).
    -inf / 0 without keys."""
    s = block.s
    allowed = torch.isfinite(s)
    log_m = _log_m(s, block.m)
    top = s.amax(-1, keepdim=True)
    mass = (torch.ones_like(s) if block.m is None else block.m).where(allowed, 0.0).sum(-1, keepdim=True)
    safe = _safe(eps)
    alone = torch.where(eps > 0, -torch.expm1(-safe * log_m) / safe, log_m)  # s + log m at alpha = 1
    lone = torch.where(allowed, s + alone, -torch.inf).amax(-1, keepdim=True)
    lse = torch.logsumexp(s + log_m, -1, keepdim=True)
    return top, mass, lone, lse


def _probabilities(block, eps, c):
    """(p, t, w = p/u) of the block for the per-row normaliser c [B, H, Lq, 1]."""
    s = block.s
    allowed = torch.isfinite(s)
    t = torch.where(allowed, s - c, 0.0)
    lr = torch.where(allowed, _entmax.log_ratio(t, eps), -torch.inf)
    p = torch.exp(lr)
    if block.m is not None:
        p = block.m * p
    u = 1 + eps * t
    w = torch.where(p > 0, p / torch.where(p > 0, u, 1.0), 0.0)
    return p, t, w, lr


def row_sums(block, eps, c):
    """(sum p, sum p/u) per row [B, H, Lq, 1] over the block's keys for the normaliser c."""
    p, _, w, _ = _probabilities(block, eps, c)
    return p.sum(-1, keepdim=True), w.sum(-1, keepdim=True)


def weighted_values(block, eps, c):
    """(sum_j p_j v_j, sum_j w_j v_j [B, H, Lq, Dv], sum_j w_j [B, H, Lq, 1]) over the block."""
    p, _, w, _ = _probabilities(block, eps, c)
    B, H, Lq, W = p.shape
    v = block.v[:, :, None]
    pv = torch.matmul(_grouped(p, block.Hkv), v).reshape(B, H, Lq, -1)
    wv = torch.matmul(_grouped(w, block.Hkv), v).reshape(B, H, Lq, -1)
    return pv, wv, w.sum(-1, keepdim=True)


def softmax_block(block):
    """alpha = 1: (lse [B, H, Lq, 1], P V with P normalised within the block); rows without a
    key here get lse = -inf and zeros. Two blocks merge as lse = logaddexp(lse1, lse2),
    out = out1 exp(lse1 - lse) + out2 exp(lse2 - lse)."""
    logits = block.s + _log_m(block.s, block.m)
    lse = torch.logsumexp(logits, -1, keepdim=True)
    p = torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0))
    B, H, Lq, W = p.shape
    out = torch.matmul(_grouped(p, block.Hkv), block.v[:, :, None]).reshape(B, H, Lq, -1)
    return lse, out


def merge_softmax(lse, out, lse_b, out_b):
    """The online merge of two alpha = 1 partial results (rows with no key anywhere stay
    lse = -inf, out = 0)."""
    new = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isfinite(new), new, 0.0)
    a = torch.where(torch.isfinite(lse), torch.exp(lse - safe), 0.0)
    b = torch.where(torch.isfinite(lse_b), torch.exp(lse_b - safe), 0.0)
    return new, out * a + out_b * b


def gbar(dout, wv, wsum):
    """The backward's row statistic gbar = sum_j w_j g_j / sum_j w_j with g_j = dout . v_j,
    from the forward's sum w v and sum w (0 on rows with no support)."""
    num = (dout * wv).sum(-1, keepdim=True)
    return torch.where(wsum > 0, num / torch.where(wsum > 0, wsum, 1.0), 0.0)


def backward_block(block, eps, c, gbar_rows, dout, scale, ramp, need_eps):
    """The block's share of the gradients (SPEC.md 4), for the global c and gbar of each row:
    (dq [B, H, Lq, D], dk, dv [B, Hkv, W, *], deps [H], dspan [H] or None). dq, deps, dspan are
    sums over this block's keys; dk, dv over this block's queries."""
    p, t, w, lr = _probabilities(block, eps, c)
    B, H, Lq, W = p.shape
    Hkv = block.Hkv
    dout = dout.to(p.dtype)
    g = torch.matmul(_grouped(dout, Hkv), block.v[:, :, None].transpose(-1, -2)).reshape(B, H, Lq, W)
    support = p > 0
    centred = torch.where(support, g - gbar_rows, 0.0)
    ds = w * centred
    dq = scale * torch.matmul(_grouped(ds, Hkv), block.k[:, :, None]).reshape(B, H, Lq, -1)
    dk = scale * torch.matmul(_grouped(ds, Hkv).transpose(-1, -2), _grouped(block.q, Hkv)).sum(2)
    dv = torch.matmul(_grouped(p, Hkv).transpose(-1, -2), _grouped(dout, Hkv)).sum(2)
    if need_eps:
        deps = (centred * torch.where(support, p * _entmax.psi(t, eps), 0.0)).sum((0, 2, 3))
    else:
        deps = torch.zeros(H, dtype=p.dtype, device=p.device)
    dspan = None
    if block.m is not None:
        dm = torch.where(support, torch.exp(lr) * centred, 0.0)
        dspan = (dm * _span.mask_slope(block.m, ramp)).sum((0, 2, 3))
    return dq, dk, dv, deps, dspan
