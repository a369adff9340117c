"""Per-dtype tolerances of the conformance suite (SPEC.md section 9 explains them).

float16 and bfloat16 (`LOW_PRECISION`): per example and per element, what the roundings a
plain kernel in that dtype may do (SPEC.md section 6: P, dS, the results) can cost there
(`conformance.emulation`), plus the float32 error of the scores (`rounding_atol`). A bound
built from constants relative to the largest value would let a half-precision kernel be
several percent off.

float32 and float64: a backend's error has two sources, and the bound adds them:
- rounding to the input dtype (the output, and P before P·V as FlashAttention does): relative
  to the size of the values, `8 · eps_input`;
- computing in the compute dtype (float64 for float64 inputs, float32 otherwise): a score
  carries an absolute error of about `eps_compute · |s|`, which moves p by about as much, so
  the bound grows with the largest score magnitude: `64 · eps_compute · (1 + max|s|)`.
Outputs are convex combinations of the values, so forward errors scale with `max|v|`. Gradients
get a 16x looser factor (they chain several products) relative to the larger of the reference
gradient's size and `max|dout| · max|v|`.
"""

from __future__ import annotations

import numpy as np

#: Machine epsilon (the spacing of numbers near 1) per dtype; unit_roundoff is half of it.
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}
#: Half the smallest subnormal per dtype: the largest absolute error of rounding a tiny number.
TINY = {"float64": 2.0**-1075, "float32": 2.0**-150, "bfloat16": 2.0**-134, "float16": 2.0**-25}
#: The dtype a conforming backend computes (accumulates) in, per input dtype.
COMPUTE = {"float64": "float64", "float32": "float32", "bfloat16": "float32", "float16": "float32"}

INPUT_FACTOR = 8.0
COMPUTE_FACTOR = 64.0
GRADIENT_FACTOR = 16.0

#: Dtypes whose bounds come per element from the roundings a plain kernel may do.
LOW_PRECISION = frozenset({"float16", "bfloat16"})
#: The multiple of that first-order rounding bound a kernel may reach (FlashAttention's tests
#: allow 2x a plain kernel's error); measured margins are in SPEC.md section 9.1.
ROUNDING_MULTIPLE = 2.0


def unit_roundoff(dtype: str) -> float:
    """The largest relative error of rounding to `dtype` (half the spacing near 1)."""
    return EPS[dtype] / 2.0


def _max_abs(x) -> float:
    x = np.abs(np.asarray(x, dtype=np.float64))
    x = x[np.isfinite(x)]
    return float(x.max()) if x.size else 0.0


def rounding_atol(result_dtype: str, dtype: str, reference, magnitude, compute_atol: float) -> np.ndarray:
    """The half-precision bound on one array, per element (SPEC.md section 9.1): ROUNDING_MULTIPLE
    x (what the roundings a plain kernel may do can cost, `u_input · magnitude` from
    conformance.emulation, plus one rounding of the result to its own dtype, `u_result ·
    |x_ref|`), plus `compute_atol`, the float32 part (`compute_forward_atol`,
    `compute_gradient_atol`)."""
    reference = np.abs(np.asarray(reference, dtype=np.float64))
    reference = np.where(np.isfinite(reference), reference, 0.0)
    rounding = unit_roundoff(dtype) * np.asarray(magnitude) + unit_roundoff(result_dtype) * reference + TINY[result_dtype]
    return ROUNDING_MULTIPLE * rounding + compute_atol


def compute_forward_atol(dtype: str, max_score: float, max_value: float) -> float:
    """The compute dtype's part of the forward bound (the scores' absolute error moves p)."""
    return COMPUTE_FACTOR * EPS[COMPUTE[dtype]] * (1.0 + max_score) * max(max_value, 1e-30)


def compute_gradient_atol(dtype: str, max_score: float, reference_grad, floor: float) -> float:
    """The compute dtype's part of a gradient's bound, relative to the gradient's size (or the
    floor, for gradients near zero)."""
    size = _max_abs(reference_grad)
    return GRADIENT_FACTOR * COMPUTE_FACTOR * EPS[COMPUTE[dtype]] * (1.0 + max_score) * max(size, floor, 1e-30)


def relative_error_bound(dtype: str, max_score: float) -> float:
    """The bound on a relative (to the values' size) error for inputs of `dtype`."""
    return INPUT_FACTOR * EPS[dtype] + COMPUTE_FACTOR * EPS[COMPUTE[dtype]] * (1.0 + max_score)


def score_error(dtype: str, max_score: float) -> float:
    """How far a conforming backend's scores may be from the reference's, in score units."""
    return COMPUTE_FACTOR * EPS[COMPUTE[dtype]] * (1.0 + max_score)


def forward_atol(dtype: str, max_score: float, max_value: float) -> float:
    return relative_error_bound(dtype, max_score) * max(max_value, 1e-30)


def gradient_atol(dtype: str, max_score: float, reference_grad: np.ndarray, floor: float) -> float:
    size = float(np.max(np.abs(reference_grad))) if np.size(reference_grad) else 0.0
    return GRADIENT_FACTOR * relative_error_bound(dtype, max_score) * max(size, floor, 1e-30)


def gradient_margin(dtype: str, max_score: float) -> float:
    """Examples whose support boundary is closer than this (in score units) skip gradient checks:
    a score error of that size may move an entry across the boundary, where p has a kink."""
    return 2.0 * score_error(dtype, max_score)
