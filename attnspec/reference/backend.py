"""The NumPy reference as a registered backend named 'numpy': every feature, every dtype NumPy
has, CPU only. Automatic selection takes it for NumPy arrays."""

import numpy as np

from .._version import __version__
from ..dispatch.capabilities import Capabilities, Kernel, all_features
from ..dispatch.registry import Backend
from . import attention, entmax, span_mask


def _kernel(op, fn):
    return Kernel(op, fn, Capabilities(array_type="numpy", devices=("cpu",), features=all_features(op)))


BACKEND = Backend(
    name="numpy",
    version=f"{__version__} (numpy {np.__version__})",
    kernels={
        "attention": _kernel("attention", attention),
        "entmax": _kernel("entmax", entmax),
        "span_mask": _kernel("span_mask", span_mask),
    },
    priority=0,
    description="NumPy float64 reference (the definition of SPEC.md)",
)
