"""Per-dtype tolerances of the conformance suite (SPEC.md section 9 explains them).

float16 and bfloat16 (`LOW_PRECISION`): per example and per checked array, a small multiple of
the error a plain kernel in that dtype makes on the same example (`conformance.emulation`:
the reference rounded wherever SPEC.md section 6 lets a kernel round), plus the rounding of
the result itself and the float32 error of the scores (`measured_atol`). A worst-case bound
built from constants would let a half-precision kernel be several percent off.

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

#: Unit roundoff (spacing of numbers near 1) per dtype.
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "bfloat16": 2.0**-7, "float16": 2.0**-10}
#: The dtype a conforming backend computes (accumulates) in, per input dtype.
COMPUTE = {"float64": "float64", "float32": "float32", "bfloat16": "float32", "float16": "float32"}

INPUT_FACTOR = 8.0
COMPUTE_FACTOR = 64.0
GRADIENT_FACTOR = 16.0

#: Dtypes whose bounds are measured per example against an emulated plain kernel.
LOW_PRECISION = frozenset({"float16", "bfloat16"})
#: A kernel's error may be this multiple of the emulated kernel's (FlashAttention's tests: 2).
EMULATION_MULTIPLE = 2.0


def unit_roundoff(dtype: str) -> float:
    """The largest relative error of rounding to `dtype` (half the spacing near 1)."""
    return EPS[dtype] / 2.0


def _max_abs(x) -> float:
    x = np.abs(np.asarray(x, dtype=np.float64))
    x = x[np.isfinite(x)]
    return float(x.max()) if x.size else 0.0


def measured_atol(result_dtype: str, reference, emulated, compute_atol: float) -> float:
    """The half-precision bound on one array: EMULATION_MULTIPLE x the emulated kernel's largest
    error on this example, plus one rounding (to `result_dtype`, the array's own dtype) of the
    array's largest entry (a kernel that keeps everything in float32 still rounds its result,
    and the emulation may round an entry luckily), plus `compute_atol`, the float32 part of the
    error (`compute_forward_atol`, `compute_gradient_atol`)."""
    reference = np.asarray(reference, dtype=np.float64)
    emulated = np.asarray(emulated, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        emulation_error = _max_abs(emulated - reference)
    return EMULATION_MULTIPLE * emulation_error + unit_roundoff(result_dtype) * _max_abs(reference) + compute_atol


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
