"""The NumPy backend 'numpy': the reference (attnspec.reference) registered as a backend, with
every feature, CPU only, and its analytic VJPs. Automatic selection takes it for NumPy arrays.

It lives here, beside the framework backends, so that the reference (the spec) knows nothing of
the dispatcher."""

import importlib.util

import numpy as np

from attnspec._version import __version__
from attnspec.dispatch.capabilities import Capabilities, Kernel, all_features
from attnspec.dispatch.registry import Backend
from attnspec.reference import attention, attention_vjp, entmax, entmax_vjp, span_mask, span_mask_vjp
from attnspec.reference import partial as _partial

# NumPy has bfloat16 arrays only through the ml_dtypes package (which JAX installs).
DTYPES = ("float16",) + (("bfloat16",) if importlib.util.find_spec("ml_dtypes") else ()) + ("float32", "float64")


def _kernel(op, fn, vjp):
    caps = Capabilities(array_type="numpy", devices=("cpu",), dtypes=DTYPES, features=all_features(op))
    return Kernel(op, fn, caps, vjp=vjp)


BACKEND = Backend(
    name="numpy",
    version=f"{__version__} (numpy {np.__version__})",
    kernels={
        "attention": _kernel("attention", attention, attention_vjp),
        "entmax": _kernel("entmax", entmax, entmax_vjp),
        "span_mask": _kernel("span_mask", span_mask, span_mask_vjp),
        # SPEC.md section 10, in float64 for every input dtype (within every dtype's bounds).
        "partial": Kernel("partial", _partial, Capabilities(array_type="numpy", devices=("cpu",), dtypes=DTYPES,
                                                            features=all_features("partial"))),
    },
    priority=0,
    description="NumPy float64 reference (the definition of SPEC.md)",
)
