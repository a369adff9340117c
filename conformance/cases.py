"""Test cases as plain data: float64 NumPy arrays and keyword arguments, framework-neutral.

A case can be rounded to a dtype (`rounded`), so that the reference runs on exactly the inputs
the backend sees, and saved to / loaded from an .npz file, which is how failures are reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from attnspec.precision import compute_dtype, round_to


def _round_param(value, dtype, array_dtype=None):
    """alpha/span/ramp/scale as the backend sees them. A Python number is cast to the compute
    dtype (SPEC.md section 6); an array reaches the backend as an array of the input dtype (the
    form a model in that dtype holds it, see frameworks.param), so it is rounded to that dtype
    (or to array_dtype where an op takes its arrays in another)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, np.ndarray):
        return round_to(value, array_dtype or dtype)
    return float(round_to(value, compute_dtype(dtype)))


def as_arrays(case, names):
    """The case with those parameters given as arrays (0-d for numbers): how they must reach a
    backend that is asked for their gradients."""
    values = {n: np.asarray(getattr(case, n), dtype=np.float64) for n in names
              if getattr(case, n) is not None and not isinstance(getattr(case, n), np.ndarray)}
    return replace(case, **values) if values else case


@dataclass
class AttentionCase:
    """One attention call. alpha/span: Python floats or float64 arrays [H]; key_lengths and
    q_offset: None, int or int64 arrays [B]. gradients=False marks cases built on a kink;
    large=True those drawn at tile-crossing sizes."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    grad_out: np.ndarray
    alpha: object = 1.0
    span: object = None
    ramp: float = 32.0
    causal: bool = False
    key_lengths: object = None
    q_offset: object = None
    scale: object = None
    gradients: bool = True
    note: str = ""
    large: bool = False  # tile-crossing sizes: the values and masked-key checks run on it
    key_padding_mask: object = None  # None or a bool array [B, Lk] (True: readable)

    op = "attention"

    @property
    def kwargs(self) -> dict:
        kw = dict(alpha=self.alpha, span=self.span, ramp=self.ramp, causal=self.causal,
                  key_lengths=self.key_lengths, q_offset=self.q_offset, scale=self.scale)
        if self.key_padding_mask is not None:
            kw["key_padding_mask"] = self.key_padding_mask
        return kw

    def rounded(self, dtype: str) -> "AttentionCase":
        return replace(
            self, q=round_to(self.q, dtype), k=round_to(self.k, dtype), v=round_to(self.v, dtype),
            grad_out=round_to(self.grad_out, dtype), alpha=_round_param(self.alpha, dtype),
            span=_round_param(self.span, dtype), ramp=_round_param(self.ramp, dtype),
            scale=_round_param(self.scale, dtype),
        )

    def max_score(self) -> float:
        if self.q.size == 0 or self.k.size == 0:
            return 0.0
        scale = 1.0 / np.sqrt(self.q.shape[-1]) if self.scale is None else abs(float(self.scale))
        H, Hkv = self.q.shape[1], self.k.shape[1]
        k = np.repeat(self.k, H // Hkv, axis=1)
        return scale * float(np.max(np.abs(np.einsum("bhid,bhjd->bhij", self.q, k))))


@dataclass
class EntmaxCase:
    """One stand-alone entmax call: x, alpha (float or array with size 1 on axis), weights."""

    x: np.ndarray
    grad_out: np.ndarray
    alpha: object = 1.5
    axis: int = -1
    weights: object = None
    gradients: bool = True
    note: str = ""

    op = "entmax"

    @property
    def kwargs(self) -> dict:
        return dict(alpha=self.alpha, axis=self.axis, weights=self.weights)

    def rounded(self, dtype: str) -> "EntmaxCase":
        weights = None if self.weights is None else round_to(self.weights, dtype)
        return replace(self, x=round_to(self.x, dtype), grad_out=round_to(self.grad_out, dtype),
                       alpha=_round_param(self.alpha, dtype), weights=weights)

    def max_score(self) -> float:
        finite = self.x[np.isfinite(self.x)]
        return float(np.max(np.abs(finite))) if finite.size else 0.0


@dataclass
class SpanMaskCase:
    """One stand-alone span_mask call."""

    Lq: int
    Lk: int
    span: object
    ramp: float
    grad_out: np.ndarray
    q_offset: object = None
    gradients: bool = True
    note: str = ""

    op = "span_mask"

    def rounded(self, dtype: str) -> "SpanMaskCase":
        compute = compute_dtype(dtype)  # span decides span_mask's dtype: it is passed in the compute dtype
        return replace(self, span=_round_param(self.span, dtype, compute), ramp=_round_param(self.ramp, dtype),
                       grad_out=round_to(self.grad_out, dtype))

    def max_score(self) -> float:
        return 0.0


@dataclass
class PartialCase:
    """The per-block operations (SPEC.md section 10) on one sequence split in blocks: q, k, v
    [B, H or Hkv, L, *] and grad_out [B, H, L, Dv] over the whole sequence; splits: the blocks'
    lengths (queries and keys are split alike); alpha [H] and span [H] (or None) arrays;
    key_lengths, q_offset: int64 [B] (or None); key_padding_mask: bool [B, L] (or None)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    grad_out: np.ndarray
    splits: np.ndarray
    alpha: np.ndarray
    span: object = None
    ramp: float = 2.0
    causal: bool = False
    key_lengths: object = None
    q_offset: object = None
    scale: float = 0.5
    key_padding_mask: object = None
    query_block: int = 0  # the block of queries checked against every block of keys
    gradients: bool = True
    note: str = ""

    op = "partial"

    def rounded(self, dtype: str) -> "PartialCase":
        return replace(self, q=round_to(self.q, dtype), k=round_to(self.k, dtype), v=round_to(self.v, dtype),
                       grad_out=round_to(self.grad_out, dtype), alpha=_round_param(self.alpha, dtype),
                       span=_round_param(self.span, dtype), ramp=_round_param(self.ramp, dtype),
                       scale=_round_param(self.scale, dtype))


CASE_TYPES = {cls.op: cls for cls in (AttentionCase, EntmaxCase, SpanMaskCase, PartialCase)}


def save_case(case, path, **context) -> None:
    """Write a case (and context such as backend, dtype, cell) to an .npz file."""
    payload = {"__op__": np.array(case.op)}
    for f in fields(case):
        value = getattr(case, f.name)
        if value is None:
            continue
        payload[f.name] = np.asarray(value)
        if not isinstance(value, np.ndarray):
            payload[f"__scalar__{f.name}"] = np.array(True)
    for key, value in context.items():
        payload[f"__context__{key}"] = np.asarray(value)
    np.savez(path, **payload)


def load_case(path):
    """(case, context) from a file written by save_case."""
    with np.load(path, allow_pickle=False) as data:
        op = str(data["__op__"])
        cls = CASE_TYPES[op]
        values, context = {}, {}
        for key in data.files:
            if key.startswith("__context__"):
                context[key[len("__context__"):]] = data[key].item() if data[key].ndim == 0 else data[key]
            elif not key.startswith("__"):
                value = data[key]
                if f"__scalar__{key}" in data.files:
                    value = value.item()
                values[key] = value
    return cls(**values), context


__all__ = ["AttentionCase", "EntmaxCase", "PartialCase", "SpanMaskCase", "load_case", "round_to", "save_case"]
