"""What a kernel supports, declared as data, and the reasons it gives when it cannot run a call.

As in xformers' ops/fmha: each kernel carries a `Capabilities` record; `not_supported_reasons`
turns it into a list of human-readable reasons (empty: it can run the call). The dispatcher,
`attnspec.explain`, errors, `attnspec info` and tests all read the same reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .._arrays import FLOAT_DTYPES
from ..validation import FEATURES, CallInfo


@dataclass(frozen=True)
class Capabilities:
    """What one kernel of one op supports.

    array_type: the framework whose arrays it takes ('numpy', 'torch', 'jax').
    devices, dtypes: device kinds and dtype names it runs on.
    features: the optional parts of SPEC.md it implements (names from validation.FEATURES).
    max_head_dim: largest D and Dv (None: no limit).
    max_scores: largest B*H*Lq*Lk, for paths that materialise the scores (None: no limit).
    automatic_max_scores: largest B*H*Lq*Lk that automatic selection gives this kernel (None:
        no limit); named explicitly it runs up to max_scores. For a path that is slower than
        another above some size but useful by name (e.g. an obviously-correct oracle).
    max_query_length: largest Lq (None: no limit), for paths built for short query blocks
        (decode steps against a key cache).
    """

    array_type: str
    devices: tuple = ("cpu",)
    dtypes: tuple = FLOAT_DTYPES
    features: frozenset = frozenset()
    max_head_dim: int | None = None
    max_scores: int | None = None
    automatic_max_scores: int | None = None
    max_query_length: int | None = None

    def automatic_reasons(self, call: CallInfo) -> list[str]:
        """Why automatic selection passes over a call this kernel could run (empty: it does not)."""
        scores = call.sizes.get("scores", 0)
        if self.automatic_max_scores is not None and scores > self.automatic_max_scores:
            return [f"B*H*Lq*Lk={scores} score entries: automatic selection gives it <= "
                    f"{self.automatic_max_scores} (runs larger calls when named)"]
        return []

    def reasons(self, call: CallInfo) -> list[str]:
        reasons = []
        if call.array_type != self.array_type:
            reasons.append(f"array type {call.array_type} (supported: {self.array_type})")
            return reasons  # nothing else is comparable across frameworks
        if call.device not in self.devices:
            reasons.append(f"device={call.device} (supported: {', '.join(self.devices)})")
        if call.dtype not in self.dtypes:
            reasons.append(f"dtype={call.dtype} (supported: {', '.join(self.dtypes)})")
        for feature in sorted(call.features - self.features):
            reasons.append(f"feature '{feature}' is not supported")
        sizes = call.sizes
        if self.max_head_dim is not None:
            for dim in ("D", "Dv"):
                if sizes.get(dim, 0) > self.max_head_dim:
                    reasons.append(f"head dim {dim}={sizes[dim]} (supported: <= {self.max_head_dim})")
        if self.max_query_length is not None and sizes.get("Lq", 0) > self.max_query_length:
            reasons.append(f"Lq={sizes['Lq']} queries (supported: <= {self.max_query_length})")
        if self.max_scores is not None and sizes.get("scores", 0) > self.max_scores:
            reasons.append(
                f"B*H*Lq*Lk={sizes['scores']} score entries (supported: <= {self.max_scores})"
            )
        return reasons


def all_features(op: str) -> frozenset:
    """Every optional feature of an op: what a complete implementation declares."""
    return frozenset(FEATURES[op])


@dataclass(frozen=True)
class Kernel:
    """One implementation of one op.

    fn takes the op's public arguments (without `backend`). extra_reasons, if given, adds
    checks that are not plain data (e.g. an environment variable that must be set).
    vjp: for array types without autograd (NumPy), the op's vector-Jacobian product with the
    signature of the reference's `*_vjp`; frameworks with autograd differentiate fn instead.
    """

    op: str
    fn: Callable
    capabilities: Capabilities
    extra_reasons: Callable[[CallInfo], list] | None = field(default=None, compare=False)
    vjp: Callable | None = field(default=None, compare=False)

    def not_supported_reasons(self, call: CallInfo) -> list[str]:
        reasons = self.capabilities.reasons(call)
        if self.extra_reasons is not None and not reasons:
            reasons = list(self.extra_reasons(call))
        return reasons

    def supports(self, call: CallInfo) -> bool:
        return not self.not_supported_reasons(call)
