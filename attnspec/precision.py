"""Dtype rules every implementation shares (SPEC.md sections 4.3 and 6), by dtype name.

Pure functions and constants, no framework: the backends look their compute dtype and their
psi series up here rather than restating them, and the conformance suite and the bench round
their inputs with `round_to`.
"""

from __future__ import annotations

import numpy as np


def compute_dtype(dtype: str) -> str:
    """The dtype a call computes in (SPEC.md section 6): float64 computes in float64; float16,
    bfloat16 and float32 accumulate in float32."""
    return "float64" if dtype == "float64" else "float32"


#: psi(eps, t) = d/d eps [log1p(eps t)/eps] is evaluated from its series below |eps t| <
#: threshold and from the closed form above (SPEC.md section 4.3): (threshold, terms) per
#: compute dtype. The closed form's relative error is about 4 eps_dtype / |x| and the series'
#: about 2 |x|^terms, so the switch sits where both are small: float64, 12 terms below 1e-2
#: (series error ~1e-24, closed form <= 4.4e-14); float32, 16 terms below 0.3 (series ~1e-8,
#: closed form ~2e-6).
PSI_SERIES = {"float64": (1e-2, 12), "float32": (0.3, 16)}


def psi_series_coefficients(terms: int) -> list[float]:
    """The bracket's coefficients (-1)^(k+1) (k-1)/k for k = terms + 1 down to 2, highest power
    first (Horner's order): psi = t^2 sum_{k>=2} (-1)^(k+1) (k-1)/k x^(k-2), x = eps t."""
    return [(-1.0) ** (k + 1) * (k - 1) / k for k in range(terms + 1, 1, -1)]


def round_to(x, dtype: str) -> np.ndarray:
    """x rounded to `dtype` (round to nearest even), returned as float64 holding those values.

    bfloat16 has no NumPy dtype without ml_dtypes: x is rounded to float32 (exact for values
    already that close), then to its upper 16 bits with round-to-nearest-even, which is
    bfloat16's definition."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "bfloat16":
        bits = x.astype(np.float32).view(np.uint32)
        bits = (bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) & np.uint32(0xFFFF0000)
        return bits.view(np.float32).astype(np.float64)
    if dtype not in ("float16", "float32", "float64"):
        raise ValueError(f"dtype must be float16, bfloat16, float32 or float64; got {dtype!r}")
    return x.astype(dtype).astype(np.float64)


__all__ = ["PSI_SERIES", "compute_dtype", "psi_series_coefficients", "round_to"]
