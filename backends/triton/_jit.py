"""`device_function`: triton.jit for the kernels' helper functions, cheaper under the interpreter.

Compiled (a GPU), it is triton.jit. Under TRITON_INTERPRET=1 every call of a jitted helper
re-patches triton.language (inspect.getmembers over it, on every call), which made helpers
the interpreter's main cost. The kernel launch has patched triton.language already for its
whole run, so a helper can run its rewritten body directly. If an interpreter of another
Triton version lacks that method, the helper keeps the ordinary (slower) path.
"""

from __future__ import annotations

import triton


class _InterpretedHelper:
    def __init__(self, jitted):
        self._jitted = jitted
        self._body = None
        self.__name__ = getattr(jitted, "__name__", "helper")
        self.__doc__ = getattr(getattr(jitted, "fn", None), "__doc__", None)

    def __call__(self, *args, **kwargs):
        if self._body is None:
            self._body = self._jitted.rewrite()
        return self._body(*args, **kwargs)


def device_function(fn):
    jitted = triton.jit(fn)
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - an interpreter-less build
        return jitted
    if isinstance(jitted, InterpretedFunction) and hasattr(jitted, "rewrite"):
        return _InterpretedHelper(jitted)
    return jitted


# tl.sum / tl.max are themselves jitted functions of triton.language, so under the interpreter
# each call re-patches the language as above. One tl.reduce with the standard combine
# functions is what they compile to, and the interpreter runs it as one NumPy reduction.
import triton.language as tl  # noqa: E402


@device_function
def row_sum(x):
    """Sum of a float32 [M, N] block over axis 1."""
    return tl.reduce(x, 1, tl.standard._sum_combine)


@device_function
def row_max(x):
    """Max of an [M, N] block over axis 1."""
    return tl.reduce(x, 1, tl.standard._elementwise_max)


@device_function
def any_true(x):
    """Whether any element of a 1-D boolean block is set, as a scalar."""
    return tl.reduce(x.to(tl.int32), 0, tl.standard._elementwise_max) > 0


@device_function
def any_true_2d(x):
    """Whether any element of a 2-D boolean block is set, as a scalar."""
    rows = tl.reduce(x.to(tl.int32), 1, tl.standard._elementwise_max)
    return tl.reduce(rows, 0, tl.standard._elementwise_max) > 0
