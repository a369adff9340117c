"""Facts about arrays of any framework, read without importing that framework.

`import attnspec` must work with NumPy alone, so nothing here imports torch or jax: we look at
the type's module and at attributes every array has (`shape`, `dtype`, `device`). A framework
that is in use has already been imported by the caller, so `sys.modules` tells us the rest.
"""

from __future__ import annotations

import os
import sys
from numbers import Integral, Real

import numpy as np

#: The floating dtypes of SPEC.md, by their framework-neutral names.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def array_type(x) -> str | None:
    """'numpy', 'torch', 'jax', another top-level module name, or None for Python numbers."""
    if x is None or isinstance(x, (bool, Integral, Real)):
        return None
    if isinstance(x, (np.ndarray, np.generic)):
        return "numpy"
    root = type(x).__module__.split(".", 1)[0]
    if root in ("jaxlib", "jax"):
        return "jax"
    return root


def is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (bool, int, float))


def dtype_name(x) -> str:
    """'float32' for numpy, torch ('torch.float32') and jax alike."""
    name = str(x.dtype)
    return name.rsplit(".", 1)[-1]


def shape_of(x) -> tuple[int, ...]:
    """The shape of an array or Python number; () for numbers."""
    if is_array(x):
        return tuple(int(n) for n in x.shape)
    return np.shape(x)


def is_traced(x) -> bool:
    """True for values that have no concrete value now (jax tracers, torch.compile fakes)."""
    kind = array_type(x)
    if kind == "jax":
        core = sys.modules.get("jax.core")
        tracer = getattr(core, "Tracer", None) if core is not None else None
        return tracer is not None and isinstance(x, tracer)
    if kind == "torch":
        torch = sys.modules.get("torch")
        if torch is None:
            return False
        compiler = getattr(torch, "compiler", None)
        if compiler is not None and compiler.is_compiling():
            return True
        fake = sys.modules.get("torch._subclasses.fake_tensor")
        if fake is not None and isinstance(x, fake.FakeTensor):
            return True
        return getattr(x, "device", None) is not None and x.device.type == "meta"
    return False


def torch_compiling() -> bool:
    """True while torch.compile (Dynamo) traces the caller; torch is never imported here."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def device_of(x) -> str:
    """'cpu', 'cuda', 'tpu', ... : the device kind an array lives on."""
    kind = array_type(x)
    if kind in (None, "numpy"):
        return "cpu"
    if kind == "torch":
        return x.device.type
    if kind == "jax":
        try:
            return next(iter(x.devices())).platform
        except Exception:  # a tracer has no devices: the default backend runs it
            jax = sys.modules.get("jax")
            return jax.default_backend() if jax is not None else "unknown"
    device = getattr(x, "device", None)
    return str(getattr(device, "type", device or "cpu"))


def full_value_checks() -> bool:
    """ATTNSPEC_VALIDATE=full also checks values that live on an accelerator (forces a sync)."""
    return os.environ.get("ATTNSPEC_VALIDATE", "").strip().lower() == "full"


def concrete_value(x) -> np.ndarray | None:
    """The value of `x` as a NumPy array when it can be read cheaply, else None.

    Cheap means: a Python number, a NumPy array, or a CPU array of another framework that is not
    being traced. Values on an accelerator are read only under ATTNSPEC_VALIDATE=full, because
    reading them waits for the device (see SPEC.md, "Where value checks run").
    """
    if x is None:
        return None
    kind = array_type(x)
    if kind is None:
        return np.asarray(x)
    if kind == "numpy":
        return np.asarray(x)
    if is_traced(x):
        return None
    if device_of(x) != "cpu" and not full_value_checks():
        return None
    if kind == "torch":
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
    try:
        return np.asarray(x)
    except Exception:  # an array type we do not know how to read: leave it to its backend
        return None


def requires_grad(x) -> bool:
    """Whether a torch tensor asks for a gradient (other frameworks differentiate by tracing)."""
    return bool(getattr(x, "requires_grad", False))
