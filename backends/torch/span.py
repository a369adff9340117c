"""The soft span mask in torch (SPEC.md section 3): m = clip((R + z - |d|) / R, 0, 1) in the
compute dtype, in that order; dm/dz = 1/R strictly inside (0, 1). Gradients are computed by
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
    return torch.clamp((ramp + z - d.abs().to(dtype)) / ramp, 0.0, 1.0)


def mask_slope(m: torch.Tensor, ramp: float) -> torch.Tensor:
    inside = (m > 0) & (m < 1)
    return torch.where(inside, torch.full_like(m, 1.0 / ramp), torch.zeros_like(m))
