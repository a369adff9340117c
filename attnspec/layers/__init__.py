"""Attention layers built on `attnspec.attention`: per-head learnable span and alpha, rotary
positions, grouped-query heads, and a KV cache bounded by the learned span.

One module per framework, imported only when asked for, so `import attnspec.layers` needs
neither torch nor jax:

    from attnspec.layers.torch import SpanAttention, project_spans, span_regularisation

`attnspec.layers.flax` (a Flax linen module) needs a registered JAX backend.
"""

__all__ = ["torch", "flax"]


def __getattr__(name):
    # `attnspec.layers.torch` after `import attnspec.layers` (no explicit submodule import).
    if name in __all__:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
