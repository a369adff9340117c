"""alpha = 1 attention without span through torch.nn.functional.scaled_dot_product_attention
(the `torch-sdpa` backend): softmax attention with causal, key_lengths, key_padding_mask and
q_offset expressed as a boolean mask, grouped-query heads by folding the query heads of a group
into the query axis, forward and backward by SDPA's own kernels (plain autograd, no custom op).

SDPA's semantics differ from SPEC.md in two places, both handled here exactly:
- a row with no allowed key: SDPA gives NaN (every score -inf); SPEC.md gives zeros and zero
  gradients. Such rows read every key instead (their query zeroed, so nothing overflows) and
  their output is replaced by 0 with torch.where, whose backward passes 0 to them;
- padding keys (beyond key_lengths, or masked by key_padding_mask) may hold NaN/Inf: SDPA
  multiplies their probability 0 by V, and adds its -inf mask to their NaN score, so NaN would
  leak. They are zeroed (padding.zero_excluded_keys: their dk and dv are exactly 0).

A gradient for alpha (alpha a tensor of ones that asks for one) is the alpha = 1 limit of
SPEC.md 4.3, dalpha_h = -1/2 sum_rows sum_j ds_j t_j^2, which SDPA cannot give: an identity
autograd function adds it from the score matrix, rebuilt in row blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .padding import zero_excluded_keys

#: Score entries per row block when rebuilding scores for dalpha.
DALPHA_BLOCK_ELEMENTS = 1 << 20


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_softmax(alpha, span):
    if type(alpha) is float and alpha == 1.0 and span is None:
        return
    if span is not None:
        raise ValueError(f"the torch-sdpa kernel computes attention without span; got span={span!r}")
    if isinstance(alpha, Tensor):
        if not torch.compiler.is_compiling() and alpha.device.type != "meta" and bool((alpha != 1).any()):
            raise ValueError(f"the torch-sdpa kernel computes alpha = 1 only; got alpha={alpha.tolist()}")
    elif alpha != 1:
        raise ValueError(f"the torch-sdpa kernel computes alpha = 1 only; got alpha={alpha!r}")


def _static_offset(q_offset, Lq, Lk):
    """q_offset as a Python int when it is one (None: Lk - Lq), else None."""
    if q_offset is None:
        return Lk - Lq
    if isinstance(q_offset, int) and not isinstance(q_offset, bool):
        return q_offset
    if isinstance(q_offset, Tensor) and q_offset.dim() == 0 and not torch.compiler.is_compiling() \
            and q_offset.device.type == "cpu":
        return int(q_offset)
    return None


def _plan(q, k, causal, key_lengths, q_offset, key_padding_mask=None):
    """How SDPA expresses the call: (allowed [B|1, 1, Lq, Lk] bool or None, is_causal,
    nonempty [B|1, 1, Lq, 1] bool or None (None: every row reads some key), key_valid
    [B, Lk] or None (None: no padding)).

    With no key_lengths, no key_padding_mask and a known integer offset o, most calls need no
    mask: not causal, or causal with o >= Lk - 1 (every row reads every key: decode steps), or
    o = 0 (SDPA's own is_causal, aligned top-left). A key_padding_mask may empty any row (its
    own key masked), so with one every row's emptiness is read from the mask."""
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    device = q.device
    offset = _static_offset(q_offset, Lq, Lk)
    if key_lengths is None and key_padding_mask is None and offset is not None:
        if not causal or offset >= Lk - 1:
            return None, False, None, None
        if offset == 0:
            return None, True, None, None
        rows = torch.arange(Lq, device=device)[:, None] + offset
        allowed = (rows >= torch.arange(Lk, device=device)[None, :])[None, None]
        nonempty = None if offset >= 0 else allowed.any(-1, keepdim=True)
        return allowed, False, nonempty, None
    keys = torch.arange(Lk, device=device)
    allowed, key_valid = None, None
    if key_lengths is not None:
        key_valid = keys[None, :] < torch.as_tensor(key_lengths, device=device).to(torch.int64)[:, None]
    if key_padding_mask is not None:  # a masked key is excluded as a key beyond key_lengths
        readable = key_padding_mask.to(device=device, dtype=torch.bool).expand(B, Lk)
        key_valid = readable if key_valid is None else key_valid & readable
    if key_valid is not None:
        allowed = key_valid[:, None, None, :]  # [B, 1, 1, Lk]
    if causal:
        if offset is None:
            offsets = torch.as_tensor(q_offset, device=device).to(torch.int64).reshape(-1)
            offsets = offsets.expand(B)[:, None, None, None]
        else:
            offsets = offset
        d = torch.arange(Lq, device=device)[:, None] + offsets - keys  # [B|1, 1|., Lq, Lk]
        if d.dim() == 2:
            d = d[None, None]
        allowed = (d >= 0) if allowed is None else allowed & (d >= 0)
    if allowed is None:
        return None, False, None, key_valid
    allowed = allowed.expand(allowed.shape[0], 1, Lq, Lk)
    return allowed, False, allowed.any(-1, keepdim=True), key_valid


def _fold_groups(x, Hkv):
    """[B, H, L, D] -> [B, Hkv, G L, D]: the G query heads of a kv group become rows (head
    h = g G + i reads kv head g), so K and V are read once per group, never copied per head."""
    B, H, L, D = x.shape
    return x.reshape(B, Hkv, (H // Hkv) * L, D)


def _sdpa(q, k, v, allowed, is_causal, scale):
    B, H, Lq, _ = q.shape
    Hkv = k.shape[1]
    if H == Hkv:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=is_causal, scale=scale)
    if is_causal:  # rows of a folded group are not in causal order: SDPA repeats the heads itself
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    G = H // Hkv
    mask = None
    if allowed is not None:
        b = allowed.shape[0]
        mask = allowed[:, :, None].expand(b, 1, G, Lq, allowed.shape[-1]).reshape(b, 1, G * Lq, -1)
    out = F.scaled_dot_product_attention(_fold_groups(q, Hkv), k, v, attn_mask=mask, scale=scale)
    return out.reshape(B, H, Lq, -1)


def attention(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None, q_offset=None,
              scale=None, key_padding_mask=None):
    """The torch-sdpa kernel: SPEC.md attention for alpha = 1 without span (arguments validated
    by the dispatcher), differentiable in q, k, v (and alpha, at 1)."""
    _check_softmax(alpha, span)
    device_type = q.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        # as the other torch backends: inputs cast to the autocast dtype, computed in the
        # compute dtype with autocast off
        if q.dtype != torch.float64:
            target = torch.get_autocast_dtype(device_type)
            q, k, v = q.to(target), k.to(target), v.to(target)
        with torch.autocast(device_type, enabled=False):
            return _attention(q, k, v, alpha, causal, key_lengths, q_offset, scale, key_padding_mask)
    return _attention(q, k, v, alpha, causal, key_lengths, q_offset, scale, key_padding_mask)


#: With a key_padding_mask on CPU and no gradient asked for (generation), batch rows whose
#: readable keys are one contiguous range (left or right padding, as batched generation pads)
#: run one SDPA call each on a slice of K and V (a view), instead of one call on a copy of the
#: whole cache with the masked keys zeroed, once a batch row's cache (Hkv Lk D elements) is at
#: least this large: below it the per-call cost of B calls outweighs the copy. With gradients
#: the copy is kept: each slice's backward writes a gradient the size of the whole cache.
SLICE_MIN_ELEMENTS = 1 << 16


def _records_grad(q, k, v, alpha):
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or (isinstance(alpha, Tensor) and alpha.requires_grad))


def _readable_ranges(key_padding_mask, key_lengths, B, Lk):
    """[(lo_b, hi_b)] when every batch row's readable keys (the mask, below key_lengths) are
    the one range lo_b <= j < hi_b (possibly empty), else None. One host read."""
    valid = key_padding_mask.to(torch.bool).expand(B, Lk)
    if key_lengths is not None:
        valid = valid & (torch.arange(Lk)[None, :] < torch.as_tensor(key_lengths).to(torch.int64).reshape(-1, 1))
    runs = valid[:, 0].to(torch.int64) + (valid[:, 1:] & ~valid[:, :-1]).sum(1)  # ranges of readable keys
    first = valid.to(torch.uint8).argmax(1)  # the first readable key (0 when there is none)
    rows = torch.stack([runs, first, valid.sum(1)]).tolist()
    if any(n > 1 for n in rows[0]):
        return None
    return [(lo, lo + n) for lo, n in zip(rows[1], rows[2])]


def _by_slices(q, k, v, alpha, causal, key_lengths, q_offset, scale, key_padding_mask):
    """The call as one SDPA call per batch row on the slice of keys it may read (slicing
    shifts distances by lo: q_offset o - lo), or None when some row's readable keys are not
    one range. Gradients reach the slices only: excluded keys get dk = dv = 0 exactly."""
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    ranges = _readable_ranges(key_padding_mask, key_lengths, B, Lk)
    if ranges is None:
        return None
    offsets = [Lk - Lq] * B if q_offset is None else \
        torch.as_tensor(q_offset).to(torch.int64).reshape(-1).expand(B).tolist()
    outs = [_attention(q[b:b + 1], k[b:b + 1, :, lo:hi], v[b:b + 1, :, lo:hi], alpha, causal, None,
                       offsets[b] - lo, scale, None) for b, (lo, hi) in enumerate(ranges)]
    return torch.cat(outs, 0)


def _attention(q, k, v, alpha, causal, key_lengths, q_offset, scale, key_padding_mask):
    if key_padding_mask is not None and q.device.type == "cpu" and not torch.compiler.is_compiling() \
            and k.shape[1] * k.shape[2] * k.shape[3] >= SLICE_MIN_ELEMENTS and not _records_grad(q, k, v, alpha):
        out = _by_slices(q, k, v, alpha, causal, key_lengths, q_offset, scale, key_padding_mask)
        if out is not None:
            return out
    out_dtype = q.dtype
    B, H, Lq, D = q.shape
    Lk, Dv = k.shape[2], v.shape[3]
    scale = float(D) ** -0.5 if scale is None else float(scale)
    if out_dtype is torch.float32 or out_dtype is torch.float64:
        qc, kc, vc = q, k, v
    else:  # half types compute in float32 (SPEC.md 6)
        qc, kc, vc = q.float(), k.float(), v.float()
    dtype = qc.dtype
    if Lk == 0 or Lq == 0:
        # no key: every row is empty (zeros); the graph still reaches q, k, v (zero grads)
        out = torch.zeros((B, H, Lq, Dv), dtype=dtype, device=q.device)
        if qc.requires_grad or kc.requires_grad or vc.requires_grad:
            none = torch.zeros((), dtype=torch.bool, device=q.device)
            out = out + torch.where(none, qc.sum() + kc.sum() + vc.sum(), 0.0)
        return out.to(out_dtype)
    allowed, is_causal, nonempty, key_valid = _plan(q, k, causal, key_lengths, q_offset, key_padding_mask)
    if key_valid is not None:
        kc = zero_excluded_keys(kc, key_valid)
        vc = zero_excluded_keys(vc, key_valid)
    if nonempty is not None:
        # empty rows read every (zeroed-query) key instead of none, then give 0 (a zero of
        # the dtype: torch.where against a Python number runs several times slower on CPU)
        zero = torch.zeros((), dtype=dtype, device=q.device)
        qc = torch.where(nonempty, qc, zero)
        allowed = allowed | ~nonempty
    out = _sdpa(qc, kc, vc, allowed, is_causal, scale)
    if nonempty is not None:
        out = torch.where(nonempty, out, zero)
    if type(alpha) is not float and isinstance(alpha, Tensor) and alpha.requires_grad:
        out = _AlphaAtOne.apply(out, alpha, qc.detach(), kc.detach(), vc.detach(), allowed, is_causal,
                                nonempty, scale)
    return out if out.dtype is out_dtype else out.to(out_dtype)


def _scores_mask(allowed, is_causal, i0, i1, Lk, device):
    """The allowed block [.., i1 - i0, Lk] of rows i0..i1-1, or None when every key is allowed."""
    if allowed is not None:
        return allowed[:, :, i0:i1]
    if is_causal:
        return (torch.arange(i0, i1, device=device)[:, None] >= torch.arange(Lk, device=device))[None, None]
    return None


def _dalpha_at_one(grad_out, q, k, v, allowed, is_causal, nonempty, scale):
    """dalpha [H] at alpha = 1 (SPEC.md 4.3, its eps -> 0 limit): -1/2 sum ds t^2, t = s - c,
    ds = p (g - sum p g), g = dout . v, over row blocks of the score matrix."""
    B, H, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = H // Hkv
    dout = grad_out.to(q.dtype)
    if nonempty is not None:
        dout = torch.where(nonempty, dout, 0.0)
    total = torch.zeros((H,), dtype=q.dtype, device=q.device)
    rows = max(1, DALPHA_BLOCK_ELEMENTS // max(1, B * H * Lk))
    kT, vT = k.transpose(-1, -2), v.transpose(-1, -2)
    for i0 in range(0, Lq, rows):
        i1 = min(Lq, i0 + rows)
        qb = q[:, :, i0:i1].reshape(B, Hkv, G, i1 - i0, -1)
        s = scale * torch.matmul(qb, kT[:, :, None]).reshape(B, H, i1 - i0, Lk)
        g = torch.matmul(dout[:, :, i0:i1].reshape(B, Hkv, G, i1 - i0, -1), vT[:, :, None]).reshape(B, H, i1 - i0, Lk)
        mask = _scores_mask(allowed, is_causal, i0, i1, Lk, q.device)
        if mask is not None:
            s = s.masked_fill(~mask, -torch.inf)
        c = torch.logsumexp(s, -1, keepdim=True)
        c = torch.where(torch.isfinite(c), c, 0.0)
        p = torch.exp(s - c)
        ds = p * (g - (p * g).sum(-1, keepdim=True))
        t = torch.where(p > 0, s - c, 0.0)
        total += (-0.5 * (ds * t * t).sum(-1)).sum((0, 2))
    return total


class _AlphaAtOne(torch.autograd.Function):
    """Identity on `out` that gives alpha its gradient (SDPA gives none)."""

    @staticmethod
    def forward(ctx, out, alpha, q, k, v, allowed, is_causal, nonempty, scale):
        ctx.save_for_backward(q, k, v, alpha)
        ctx.masks = (allowed, is_causal, nonempty, scale)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, alpha = ctx.saved_tensors
        allowed, is_causal, nonempty, scale = ctx.masks
        dalpha = _dalpha_at_one(grad_out, q, k, v, allowed, is_causal, nonempty, scale)
        dalpha = dalpha.to(alpha.dtype)
        if alpha.dim() == 0:
            dalpha = dalpha.sum()
        return grad_out, dalpha, None, None, None, None, None, None, None
