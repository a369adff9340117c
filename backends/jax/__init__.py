"""The JAX backend `jax`: jax arrays on CPU, GPU or TPU, float16 / bfloat16 / float32, and
float64 when `jax_enable_x64` is on (importing attnspec never switches it on). Half types
accumulate in float32.

Query tiles against the key tiles each can reach (causal, span and key_lengths bounds are
traced integers, so tiles that cannot contribute are skipped without recompiling); one number
per row (c, SPEC.md 2.2) is kept for the backward, which is analytic (jax.custom_vjp) and gives
gradients for q, k, v, alpha and span (and for scale and ramp given as arrays). Works under
jit, vmap, grad, jax.checkpoint and with sharded inputs (XLA's partitioner splits batch and
heads). Double differentiation is not supported (the backward's loops have traced bounds).
"""

from __future__ import annotations

import jax

from attnspec._version import __version__
from attnspec.dispatch.capabilities import Capabilities, Kernel, all_features
from attnspec.dispatch.registry import Backend

from . import attention as _attention
from . import entmax as _entmax
from . import partial as _partial
from . import span as _span

DTYPES = ("float16", "bfloat16", "float32", "float64")


def tiled_attention(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None, q_offset=None,
                    scale=None, key_padding_mask=None):
    return _attention.attention(q, k, v, alpha=alpha, span=span, ramp=ramp, causal=causal,
                                key_lengths=key_lengths, q_offset=q_offset, scale=scale,
                                key_padding_mask=key_padding_mask)


def _extra_reasons(call):
    # float64 jax arrays exist only under jax_enable_x64; say so rather than fail later.
    if call.dtype == "float64" and not jax.config.jax_enable_x64:
        return ["dtype=float64 needs jax_enable_x64 (jax.config.update('jax_enable_x64', True))"]
    return []


DEVICES = ("cpu", "gpu", "cuda", "rocm", "tpu")


def _kernel(op, fn, dtypes=DTYPES):
    caps = Capabilities(array_type="jax", devices=DEVICES, dtypes=dtypes, features=all_features(op))
    return Kernel(op, fn, caps, extra_reasons=_extra_reasons)


BACKEND = Backend(
    name="jax",
    version=f"{__version__} (jax {jax.__version__})",
    kernels={
        "attention": _kernel("attention", tiled_attention),
        "entmax": _kernel("entmax", _entmax.entmax),
        "span_mask": _kernel("span_mask", _span.span_mask),
        # The per-block operations (SPEC.md section 10) that attnspec.distributed.jax composes.
        "partial": _kernel("partial", _partial, ("float32", "float64")),
    },
    priority=10,
    description="JAX, query tiles x reachable key tiles, custom_vjp keeping one number per row; jit/vmap/grad",
)
