"""The Triton backend `triton`: fused, tiled forward and backward kernels for torch tensors
on CUDA (float16 / bfloat16 / float32, accumulating in float32), and on CPU tensors under the
Triton interpreter (TRITON_INTERPRET=1), which is how CI checks the kernels without a GPU.

It runs only when asked for by name (`backend="triton"`, `use_backend("triton")` or
ATTNSPEC_BACKEND), never by automatic selection. Gradients for q, k, v, alpha and span come
from the kernels' analytic backward through the same torch.library custom-op glue as the
PyTorch backends (attnspec.backends._torch_op), so it also works on meta tensors and under torch.compile.

Triton reads TRITON_INTERPRET when the kernels are defined, i.e. when this backend is first
loaded: set it before the first call that loads the backend.
"""

from __future__ import annotations

from dataclasses import dataclass

try:
    import torch
    import triton
except ModuleNotFoundError as exc:  # the registry reports it: "not installed (torch)"
    raise ModuleNotFoundError(
        f"the triton backend needs torch and triton ({exc}); install them from a checkout with "
        "`pip install -c constraints.txt -e '.[triton]'`", name=exc.name
    ) from exc

from attnspec.backends import _torch_op
from attnspec._version import __version__
from attnspec.dispatch.capabilities import Capabilities, Kernel
from attnspec.dispatch.registry import Backend
from attnspec.validation import FEATURES, CallInfo

from . import attention as _attention

DTYPES = ("float16", "bfloat16", "float32")
#: Whether the kernels were built for the interpreter (then CPU tensors are accepted).
INTERPRETED = _attention.INTERPRETED
# meta: shapes only, through the custom op's fake implementation.
DEVICES = ("cuda", "cpu", "meta") if INTERPRETED else ("cuda", "meta")

_CPU_HINT = ("device=cpu: Triton kernels run on CPU tensors only under the Triton interpreter; "
             "set TRITON_INTERPRET=1 before the triton backend is first loaded")


@dataclass(frozen=True)
class _TritonCapabilities(Capabilities):
    """Capabilities whose refusal of CPU tensors says how to get them accepted."""

    def reasons(self, call: CallInfo) -> list[str]:
        reasons = super().reasons(call)
        if call.device == "cpu" and "cpu" not in self.devices:
            reasons = [_CPU_HINT if r.startswith("device=cpu ") else r for r in reasons]
        return reasons


_op = _torch_op.define_attention_op("triton_attention", _attention.forward, _attention.backward,
                                 _attention.fake_saved)


def triton_attention(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None,
                     q_offset=None, scale=None, key_padding_mask=None):
    return _op(*_torch_op.normalise(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale),
               _torch_op.padding_mask(key_padding_mask, q))


def solve_statistics(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None,
                     q_offset=None, scale=None, key_padding_mask=None) -> dict:
    """Diagnostics of one forward (no autograd): out, c [B, H, Lq] (the row normalisers of
    SPEC.md 2.2; the kernels keep them relative to the row's top score, `top`),
    psum [B, H, Lq] = sum_j p_ij as the kernel computed it (unnormalised: 1 up to the solve's
    accuracy, 0 for rows with no allowed key) and passes [B, H, query tiles] (passes over the
    key tiles each query tile took: 1 for alpha = 1; bounds + Halley steps + output otherwise)."""
    args = _torch_op.normalise(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale)
    with torch.no_grad():
        out, c, bits, psum, passes = _attention.run_forward(
            *args, stats=True, key_padding_mask=_torch_op.padding_mask(key_padding_mask, q))
    return dict(out=out, c=c[..., 0] + c[..., 1], top=c[..., 0], psum=psum, passes=passes, tiles=bits)


#: Every attention feature of SPEC.md: entmax with alpha per head, span per head, causal,
#: key_lengths, q_offset, key_padding_mask (the kernels read it per key tile and exclude masked
#: keys as keys beyond key_lengths), GQA, and gradients for q, k, v, alpha and span.
FEATURES_IMPLEMENTED = frozenset(FEATURES["attention"])

TRITON = Backend(
    name="triton",
    version=f"{__version__} (triton {triton.__version__}{', interpreter' if INTERPRETED else ''})",
    kernels={
        "attention": Kernel("attention", triton_attention, _TritonCapabilities(
            array_type="torch", devices=DEVICES, dtypes=DTYPES, features=FEATURES_IMPLEMENTED)),
    },
    priority=0,
    automatic=False,
    description="Triton fused kernels (FlashAttention structure, Halley solve per row, tile skipping); "
                "explicit backend only",
)
