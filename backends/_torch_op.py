"""The torch custom-op glue shared by the torch-based backends (torch, torch-eager, triton).

Not a backend: a helper module of the backends package, imported only by torch-based backends,
never by `import attnspec`. It turns a backend's plain
forward/backward functions into a `torch.library` custom op pair with autograd and fake (meta)
implementations, so that the op works on meta tensors, under torch.compile(fullgraph=True),
and with autocast; and it normalises the public arguments into tensors.

A backend provides
    forward(q, k, v, alpha[H], span[H] | None, ramp, causal, key_lengths[B] | None,
            q_offset[B], scale) -> (out, *saved)
    backward(grad_out, *saved, q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale,
             alpha_grad) -> (dq, dk, dv, dalpha[H], dspan[H])  (dalpha may be zeros if not alpha_grad)
    fake_saved(q, k, v, ...) -> list of empty tensors shaped like `saved`.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 computes in float64; every other dtype accumulates in float32 (SPEC.md 6). The
    rule is attnspec.precision.compute_dtype, restated on torch dtypes because this runs inside
    torch.compile'd graphs, where dtype names are not traced."""
    return torch.float64 if dtype == torch.float64 else torch.float32


#: Constant tensors the normalised arguments are built from, per (value, size, dtype, device):
#: a Python-number alpha/span and the default q_offset are the same on every call of a model,
#: and building them costs microseconds each. They are never written to (the ops take them
#: as read-only inputs) and never require grad.
_CONSTANTS: dict = {}
_CONSTANTS_MAX = 256


def _constant(key, make):
    try:
        return _CONSTANTS[key]
    except KeyError:
        if len(_CONSTANTS) >= _CONSTANTS_MAX:
            _CONSTANTS.clear()
        value = _CONSTANTS[key] = make()
        return value


def _per_head(value, H, dtype, device):
    """alpha/span as a [H] tensor of the compute dtype (expanding keeps the autograd link)."""
    if not isinstance(value, Tensor):
        number = float(value)
        return _constant(("head", number, H, dtype, device),
                         lambda: torch.full((H,), number, dtype=dtype, device=device))
    t = value.to(device=device, dtype=dtype)
    return t.expand(H) if t.dim() == 0 else t


def normalise(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale):
    """The public arguments as the custom op takes them. Under torch.autocast, q/k/v are cast
    to the autocast dtype first (the op then computes in float32 and returns that dtype)."""
    for name, value in (("scale", scale), ("ramp", ramp)):
        if isinstance(value, Tensor) and value.requires_grad:
            # read as a number below: a gradient would be silently lost
            raise NotImplementedError(
                f"{name} is a tensor that requires grad, but the torch backends give no gradient "
                f"for {name}; pass a number or a tensor that does not require grad"
            )
    device_type = q.device.type
    autocast_device = device_type in ("cpu", "cuda", "xpu", "mps", "hpu")  # meta has no autocast
    if autocast_device and torch.is_autocast_enabled(device_type) and q.dtype != torch.float64:
        target = torch.get_autocast_dtype(device_type)
        q, k, v = q.to(target), k.to(target), v.to(target)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    dtype = compute_dtype(q.dtype)
    alpha_h = _per_head(alpha, H, dtype, q.device)
    span_h = None if span is None else _per_head(span, H, dtype, q.device)
    if q_offset is None or type(q_offset) is int:
        offset = Lk - Lq if q_offset is None else q_offset
        device = q.device
        offsets = _constant(("offsets", offset, B, device),
                            lambda: torch.full((B,), offset, dtype=torch.int64, device=device))
    else:
        offsets = torch.as_tensor(q_offset, device=q.device).to(torch.int64).expand(B)
    lengths = None
    if key_lengths is not None:
        # SPEC.md 7: values validation could not read (torch.compile, meta, CUDA) are clamped to
        # [0, Lk], so a length above Lk never reads keys that do not exist.
        lengths = torch.as_tensor(key_lengths, device=q.device).to(torch.int64).clamp(0, Lk)
    scale = float(D) ** -0.5 if scale is None else float(scale)
    return q, k, v, alpha_h, span_h, float(ramp), bool(causal), lengths, offsets, scale


def padding_mask(key_padding_mask, q):
    """key_padding_mask as the custom op takes it: None, or a bool [B, Lk] tensor on q's device."""
    if key_padding_mask is None:
        return None
    return torch.as_tensor(key_padding_mask, device=q.device).to(torch.bool)


def _mask_kwargs(key_padding_mask):
    """A backend's forward/backward sees key_padding_mask only when there is one, so backends
    that do not declare the feature keep their signatures."""
    return {} if key_padding_mask is None else {"key_padding_mask": key_padding_mask}


def _no_autocast(tensor):
    """Inside the op everything runs in the dtypes we chose (autocast is applied at its entry)."""
    device_type = tensor.device.type
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _empty(q: Tensor, k: Tensor) -> bool:
    """B, H or Lq is 0 (no output row), or Lk is 0 (no key: every row is empty)."""
    return q.numel() == 0 or k.shape[2] == 0


def direct(q, k, v, alpha, span) -> bool:
    """Whether a call may run the forward function itself rather than the custom op: nothing
    asks for a gradient, and the tensors are plain (not meta, fake or other subclasses) and not
    being traced. The op's dispatch and autograd bookkeeping cost tens of microseconds, more
    than a decode step's work on a small model."""
    if torch.compiler.is_compiling() or type(q) is not Tensor or q.device.type == "meta":
        return False
    if not torch.is_grad_enabled():
        return True
    return not (q.requires_grad or k.requires_grad or v.requires_grad or alpha.requires_grad
                or (span is not None and span.requires_grad))


def define_attention_op(name: str, forward, backward, fake_saved, inference=None):
    """Register attnspec::<name>_forward / _backward custom ops with autograd; return the
    function (q, k, v, alpha[H], span, ramp, causal, key_lengths, q_offset, scale) -> out.
    inference (same arguments, returns (out, ...)): runs instead of forward when the op is
    skipped (see `direct`); default forward."""
    inference = forward if inference is None else inference

    @torch.library.custom_op(f"attnspec::{name}_forward", mutates_args=())
    def forward_op(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, span: Optional[Tensor], ramp: float,
                   causal: bool, key_lengths: Optional[Tensor], q_offset: Tensor, scale: float,
                   key_padding_mask: Optional[Tensor] = None) -> list[Tensor]:
        if _empty(q, k):  # SPEC.md 5.3: no row, or no key (every row empty): zeros
            out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
            saved = fake_saved(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale)
            return [out] + [x.zero_() for x in saved]
        with torch.no_grad(), _no_autocast(q):
            return [x.contiguous() for x in forward(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale,
                                                    **_mask_kwargs(key_padding_mask))]

    @forward_op.register_fake
    def _(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, key_padding_mask=None):
        out = q.new_empty(q.shape[:-1] + (v.shape[-1],))
        return [out] + list(fake_saved(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale))

    @torch.library.custom_op(f"attnspec::{name}_backward", mutates_args=())
    def backward_op(grad_out: Tensor, saved: list[Tensor], q: Tensor, k: Tensor, v: Tensor, alpha: Tensor,
                    span: Optional[Tensor], ramp: float, causal: bool, key_lengths: Optional[Tensor],
                    q_offset: Tensor, scale: float, alpha_grad: bool,
                    key_padding_mask: Optional[Tensor] = None) -> list[Tensor]:
        if _empty(q, k):  # empty rows pass zero gradient to everything
            span_like = alpha if span is None else span
            return [torch.zeros_like(x) for x in (q, k, v, alpha, span_like)]
        with torch.no_grad(), _no_autocast(q):
            grads = backward(grad_out, *saved, q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale,
                             alpha_grad, **_mask_kwargs(key_padding_mask))
        return [g.contiguous() for g in grads]

    @backward_op.register_fake
    def _(grad_out, saved, q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, alpha_grad,
          key_padding_mask=None):
        span_like = alpha if span is None else span
        return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(alpha),
                torch.empty_like(span_like)]

    def setup_context(ctx, inputs, output):
        q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale = inputs[:10]
        key_padding_mask = inputs[10] if len(inputs) > 10 else None
        ctx.has_span, ctx.has_lengths = span is not None, key_lengths is not None
        ctx.has_mask = key_padding_mask is not None
        ctx.ramp, ctx.causal, ctx.scale = ramp, causal, scale
        ctx.n_saved = len(output) - 1
        extra = [x for x in (span, key_lengths, key_padding_mask) if x is not None]
        ctx.save_for_backward(*output[1:], q, k, v, alpha, q_offset, *extra)

    def backward_fn(ctx, grads):
        tensors = list(ctx.saved_tensors)
        saved, rest = tensors[: ctx.n_saved], tensors[ctx.n_saved:]
        q, k, v, alpha, q_offset = rest[:5]
        extra = rest[5:]
        span = extra.pop(0) if ctx.has_span else None
        key_lengths = extra.pop(0) if ctx.has_lengths else None
        key_padding_mask = extra.pop(0) if ctx.has_mask else None
        grad_out = grads[0]
        if grad_out is None:
            grad_out = torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
        alpha_grad = bool(ctx.needs_input_grad[3])  # dalpha (psi) is skipped when nobody asks
        dq, dk, dv, dalpha, dspan = backward_op(grad_out, saved, q, k, v, alpha, span, ctx.ramp, ctx.causal,
                                                key_lengths, q_offset, ctx.scale, alpha_grad, key_padding_mask)
        grads = (dq, dk, dv, dalpha, (dspan if ctx.has_span else None), None, None, None, None, None, None)
        return grads[: len(ctx.needs_input_grad)]  # the defaulted mask may be left out of the inputs

    forward_op.register_autograd(backward_fn, setup_context=setup_context)

    def no_double_backward(ctx, grads):
        raise RuntimeError(
            f"attnspec: double backward through attnspec::{name} is not supported "
            "(the backward pass is analytic and not itself differentiable)"
        )

    backward_op.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)

    def attention(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, key_padding_mask=None):
        if direct(q, k, v, alpha, span):
            if _empty(q, k):  # SPEC.md 5.3, as the op's forward
                return q.new_zeros(q.shape[:-1] + (v.shape[-1],))
            extra = _mask_kwargs(key_padding_mask)
            # no input asks for a gradient, so nothing is recorded: no no_grad block needed
            device_type = q.device.type
            if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
                with torch.autocast(device_type, enabled=False):
                    return inference(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, **extra)[0]
            return inference(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, **extra)[0]
        return forward_op(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, key_padding_mask)[0]

    return attention
