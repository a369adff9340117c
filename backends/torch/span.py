"""The soft span mask in torch (SPEC.md section 3): m = clip((z - (|d| - R)) / R, 0, 1) in the
compute dtype, in that order (no cancellation near the outer kink); dm/dz = 1/R strictly inside (0, 1). Gradients are computed by
hand (`mask_slope`), never by autodiff through clamp."""

from __future__ import annotations

import torch


def distances(Lq: int, Lk: int, q_offset: torch.Tensor) -> torch.Tensor:
    """d_ij = i + o_b - j, int64 [B, Lq, Lk] for offsets [B]."""
    device = q_offset.device
    rows = torch.arange(Lq, device=device)[:, None] - torch.arange(Lk, device=device)[None, :]
    return q_offset.to(torch.int64)[:, None, None] + rows


def soft_mask(d: torch.Tensor, span: torch.Tensor, ramp: float, dtype) -> torch.Tensor:
    """d [B, 1, Lq, Lk], span [H] -> m [B, H, Lq, Lk] in dtype."""
    z = span.to(dtype)[None, :, None, None]
    return torch.clamp((z - (d.abs().to(dtype) - ramp)) / ramp, 0.0, 1.0)


def mask_slope(m: torch.Tensor, ramp: float) -> torch.Tensor:
    inside = (m > 0) & (m < 1)
    return torch.where(inside, torch.full_like(m, 1.0 / ramp), torch.zeros_like(m))


# ----------------------------------------------------------------------------------------------
# The stand-alone op: attnspec.span_mask(Lq, Lk, span, ramp, q_offset) for torch tensors.


def _mask(Lq, Lk, span, ramp, q_offset):
    """m [*B, *H, Lq, Lk] in span's dtype (B when q_offset is a tensor, H when span is 1-D)."""
    device = span.device
    offsets = torch.as_tensor(Lk - Lq if q_offset is None else q_offset, device=device).to(torch.int64)
    d = distances(Lq, Lk, offsets.reshape(-1))  # [B|1, Lq, Lk]
    if offsets.dim() == 0:
        d = d[0]
    d = d.reshape(d.shape[:-2] + (1,) * span.dim() + d.shape[-2:])
    z = span.reshape(span.shape + (1, 1))
    return torch.clamp((z - (d.abs().to(span.dtype) - ramp)) / ramp, 0.0, 1.0)


class _SpanMask(torch.autograd.Function):
    """dm/dz = 1/R strictly inside (0, 1) as computed (autodiff through clamp would also pass
    the gradient at the kinks, where SPEC.md section 3 says 0)."""

    @staticmethod
    def forward(ctx, span, Lq, Lk, ramp, q_offset):
        m = _mask(Lq, Lk, span, ramp, q_offset)
        ctx.save_for_backward(m)
        ctx.ramp = ramp
        ctx.span_shape = span.shape
        return m

    @staticmethod
    def backward(ctx, grad_m):
        (m,) = ctx.saved_tensors
        dm = grad_m * mask_slope(m, ctx.ramp)
        dspan = dm.sum((-2, -1))
        if dspan.dim() > len(ctx.span_shape):  # a batch axis in front (q_offset [B])
            dspan = dspan.sum(0)
        return dspan.reshape(ctx.span_shape), None, None, None, None


def span_mask(Lq, Lk, span, ramp, q_offset=None):
    """The soft span mask for a torch `span` (scalar or [H]), in span's dtype, differentiable in
    span. Arguments are validated by the dispatcher."""
    if not span.is_floating_point():
        span = span.to(torch.get_default_dtype())
    return _SpanMask.apply(span, int(Lq), int(Lk), float(ramp), q_offset)
