"""attnspec: adaptive-span and alpha-entmax attention, one specification, many frameworks.

    import attnspec
    out = attnspec.attention(q, k, v, alpha=1.5, span=z, ramp=32.0, causal=True)

SPEC.md defines the semantics; `attnspec.reference` is its NumPy float64 implementation; the
dispatcher picks a backend per call (`backend=`, `use_backend`, ATTNSPEC_BACKEND, or
automatically) and `explain` says why.
"""

from . import _checkout

_checkout.install(__path__[0])  # noqa: F821 (package __path__): backends/, conformance/, bench/

from . import reference  # noqa: E402
from ._version import SPEC_VERSION, __version__  # noqa: E402
from .api import attention, entmax, entmax15, explain, softmax, span_mask, sparsemax  # noqa: E402
from .dispatch import (  # noqa: E402
    Backend,
    BackendStatus,
    Capabilities,
    Decision,
    Interval,
    Kernel,
    Lengths,
    list_backends,
    register_backend,
    unregister_backend,
    use_backend,
)
from .errors import BackendUnavailableError, UnsupportedCallError  # noqa: E402

__all__ = [
    "SPEC_VERSION",
    "Backend",
    "BackendStatus",
    "BackendUnavailableError",
    "Capabilities",
    "Decision",
    "Interval",
    "Kernel",
    "Lengths",
    "UnsupportedCallError",
    "__version__",
    "attention",
    "entmax",
    "entmax15",
    "explain",
    "list_backends",
    "reference",
    "register_backend",
    "softmax",
    "span_mask",
    "sparsemax",
    "unregister_backend",
    "use_backend",
]
