"""An example third-party backend for NumPy arrays.

It computes softmax/entmax attention through the reference (a real kernel would do its own
work here) and declares, as data, what it supports. Set ATTNSPEC_EXAMPLE_BUG=scale to plant a
bug (the softmax scale is ignored) and watch the conformance suite catch it.
"""

import os

import numpy as np

import attnspec
from attnspec import Backend, Capabilities, Kernel


def attention(q, k, v, *, alpha, span, ramp, causal, key_lengths, q_offset, scale):
    if os.environ.get("ATTNSPEC_EXAMPLE_BUG") == "scale":
        scale = 1.0
    return attnspec.reference.attention(q, k, v, alpha=alpha, span=span, ramp=ramp, causal=causal,
                                        key_lengths=key_lengths, q_offset=q_offset, scale=scale)


def attention_vjp(q, k, v, grad_out, **kwargs):
    # NumPy has no autograd, so a NumPy kernel declares its vector-Jacobian product.
    return attnspec.reference.attention_vjp(q, k, v, grad_out, **kwargs)


def backend():
    capabilities = Capabilities(
        array_type="numpy",
        devices=("cpu",),
        dtypes=("float32", "float64"),
        # No span support: the suite checks that such calls are refused, not computed.
        features=frozenset({"entmax", "alpha_per_head", "causal", "key_lengths", "q_offset", "gqa"}),
        max_head_dim=256,
    )
    return Backend(
        name="examplekernel",
        version="0.1.0 (numpy " + np.__version__ + ")",
        kernels={"attention": Kernel("attention", attention, capabilities, vjp=attention_vjp)},
        priority=-1,  # never preferred over the reference for automatic selection
    )
