"""The PyTorch backends for torch tensors on CPU and CUDA, float16 / bfloat16 / float32 /
float64 (half types accumulate in float32):
- `torch-eager`: the full score matrix, for small calls (it declares a size cap, and a higher
  priority, so automatic selection takes it when it fits);
- `torch`: query tiles against the key window each tile can reach, one number per row kept
  for the backward; never a [B, H, Lq, Lk] buffer, and span/causal/key_lengths skip keys.

Gradients for q, k, v, alpha and span come from the analytic backward of SPEC.md section 4,
through a torch.library custom op pair (attnspec.backends._torch_op), so the op also runs on meta tensors,
under torch.compile(fullgraph=True) and under autocast. Double backward raises.
"""

from __future__ import annotations

import torch

from attnspec.backends import _torch_op
from attnspec._version import __version__
from attnspec.dispatch.capabilities import Capabilities, Kernel, all_features
from attnspec.dispatch.registry import Backend

from . import attention as _attention
from . import decode as _decode
from . import entmax as _entmax
from . import partial as _partial
from . import sdpa as _sdpa
from . import span as _span

DTYPES = ("float16", "bfloat16", "float32", "float64")
#: torch-eager materialises B*H*Lq*Lk scores (several buffers of them): it declares a cap.
EAGER_MAX_SCORES = 1 << 24
#: Automatic selection gives it only tiny calls, the sizes where it is about as fast as the
#: tiled path on CPU and never much faster (`attnspec bench --preset torch-eager-crossover`
#: measures the two: bench/results/torch_eager_crossover_cpu.md). Named, it runs up to
#: EAGER_MAX_SCORES.
EAGER_AUTOMATIC_MAX_SCORES = 1 << 12
#: torch-decode reads each batch row's key window once for all its queries: built for decode
#: steps and short query blocks against a cache. Longer blocks go to the tiled path, whose
#: tiles narrow the window row by row.
DECODE_MAX_QUERIES = 64


def _fake_saved(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, key_padding_mask=None):
    B, H, Lq, _ = q.shape
    shape = (B, H, Lq, k.shape[2])
    dtype = _torch_op.compute_dtype(q.dtype)
    return [q.new_empty(shape, dtype=dtype) for _ in range(3)]  # p, t, m


_eager_op = _torch_op.define_attention_op("eager_attention", _attention.forward, _attention.backward, _fake_saved)


def eager_attention(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None,
                    q_offset=None, scale=None, key_padding_mask=None):
    return _eager_op(*_torch_op.normalise(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale),
                _torch_op.padding_mask(key_padding_mask, q))


def _fake_c(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale, key_padding_mask=None):
    return [q.new_empty(q.shape[:3] + (1,), dtype=_torch_op.compute_dtype(q.dtype))]


_tiled_op = _torch_op.define_attention_op("tiled_attention", _attention.tiled_forward, _attention.tiled_backward,
                                       _fake_c)


def tiled_attention(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None,
                    q_offset=None, scale=None, key_padding_mask=None):
    return _tiled_op(*_torch_op.normalise(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale),
                _torch_op.padding_mask(key_padding_mask, q))


# With gradients, torch-decode runs the tiled forward: the backward rebuilds p from c and the
# scores it recomputes, and only the forward that computes them the same way gives a c exactly
# consistent with them (at large logits in float32 a key on the support's edge otherwise
# entered the rebuilt support). Without gradients (decode steps) it runs its windowed forward.
_decode_op = _torch_op.define_attention_op("decode_attention", _attention.tiled_forward, _attention.tiled_backward,
                                           _fake_c, inference=_decode.inference)


def decode_attention(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None,
                     q_offset=None, scale=None, key_padding_mask=None):
    return _decode_op(*_torch_op.normalise(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale),
                      _torch_op.padding_mask(key_padding_mask, q))


def _devices():
    # meta: shapes only, through the custom op's fake implementation.
    return ("cpu", "cuda", "meta") if torch.cuda.is_available() else ("cpu", "meta")


def _standalone_kernels():
    """entmax and span_mask: one implementation, shared by both torch backends (they differ
    only in how attention holds its scores)."""
    # No meta device: the row solver's early exits read tensor values.
    devices = tuple(d for d in _devices() if d != "meta")

    def caps(op):
        return Capabilities(array_type="torch", devices=devices, dtypes=DTYPES, features=all_features(op))

    return {
        "entmax": Kernel("entmax", _entmax.entmax, caps("entmax")),
        "span_mask": Kernel("span_mask", _span.span_mask, caps("span_mask")),
    }


EAGER = Backend(
    name="torch-eager",
    version=f"{__version__} (torch {torch.__version__})",
    kernels={
        "attention": Kernel("attention", eager_attention, Capabilities(
            array_type="torch", devices=_devices(), dtypes=DTYPES, features=all_features("attention"),
            max_scores=EAGER_MAX_SCORES, automatic_max_scores=EAGER_AUTOMATIC_MAX_SCORES)),
        **_standalone_kernels(),
    },
    priority=20,
    description="PyTorch, full score matrix (small calls), analytic backward",
)

#: The per-block operations (SPEC.md section 10) that attnspec.distributed.torch composes:
#: float32 and float64 (the compute dtypes; half inputs are cast before a block is scored).
PARTIAL = Kernel("partial", _partial, Capabilities(
    array_type="torch", devices=tuple(d for d in _devices() if d != "meta"), dtypes=("float32", "float64"),
    features=all_features("partial")))

TILED = Backend(
    name="torch",
    version=f"{__version__} (torch {torch.__version__})",
    kernels={
        "attention": Kernel("attention", tiled_attention, Capabilities(
            array_type="torch", devices=_devices(), dtypes=DTYPES, features=all_features("attention"))),
        **_standalone_kernels(),
        "partial": PARTIAL,
    },
    priority=10,
    description="PyTorch, query tiles x reachable key window, O(tile x window) memory, analytic backward",
)


#: SDPA declares no span and no entmax: automatic selection gives it exactly the alpha = 1
#: calls it can express, at every size (it runs torch's fused kernels, forward and backward).
SDPA_FEATURES = all_features("attention") - {"entmax", "span", "span_per_head", "span_grad"}

SDPA = Backend(
    name="torch-sdpa",
    version=f"{__version__} (torch {torch.__version__})",
    kernels={
        "attention": Kernel("attention", _sdpa.attention, Capabilities(
            array_type="torch", devices=_devices(), dtypes=DTYPES, features=SDPA_FEATURES)),
    },
    priority=40,
    description="PyTorch scaled_dot_product_attention: alpha = 1 without span (causal, key_lengths, "
                "key_padding_mask, q_offset as a mask; GQA), its own backward",
)

DECODE = Backend(
    name="torch-decode",
    version=f"{__version__} (torch {torch.__version__})",
    kernels={
        "attention": Kernel("attention", decode_attention, Capabilities(
            array_type="torch", devices=_devices(), dtypes=DTYPES,
            features=all_features("attention"), max_query_length=DECODE_MAX_QUERIES)),
    },
    priority=30,
    description=f"PyTorch, Lq <= {DECODE_MAX_QUERIES} queries against the key window each batch row "
                "reaches (decode steps), all rows solved at once; with gradients the tiled path",
)
