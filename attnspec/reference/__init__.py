"""The NumPy float64 reference: the executable definition of SPEC.md.

Every backend is judged against these functions. They take NumPy arrays, compute in float64
and return the input's dtype; the `*_vjp` functions give the analytic gradients.
"""

from .attention import AttentionGrads, attention, attention_vjp, support_gap
from .entmax import entmax, entmax15, entmax_vjp, softmax, sparsemax
from .span import span_mask, span_mask_vjp

__all__ = [
    "AttentionGrads",
    "attention",
    "attention_vjp",
    "entmax",
    "entmax15",
    "entmax_vjp",
    "softmax",
    "sparsemax",
    "span_mask",
    "span_mask_vjp",
    "support_gap",
]
