"""Per-dtype tolerances of the conformance suite (SPEC.md section 9 explains them).

A backend's error has two sources, and the bound adds them:
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
