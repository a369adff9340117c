"""What a kernel supports, declared as data, and the reasons it gives when it cannot run a call.

As in xformers' ops/fmha: each kernel carries a `Capabilities` record; `not_supported_reasons`
turns it into a list of human-readable reasons (empty: it can run the call). The dispatcher,
`attnspec.explain`, errors, `attnspec info`, the conformance suite's strategies and tests all
read the same fields.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from .._arrays import FLOAT_DTYPES
from ..validation import FEATURES, CallInfo

#: The inputs each op can be differentiated with respect to (the names of its `*_vjp` results).
GRADIENTS = {
    "attention": ("q", "k", "v", "alpha", "span"),
    "entmax": ("x", "alpha", "weights"),
    "span_mask": ("span",),
    "partial": (),  # each per-block operation returns its own gradient pieces (SPEC.md 10)
}
#: The call features (validation.FEATURES) that ask a kernel for a gradient with respect to an
#: input, per op: a kernel declaring the feature provides that gradient.
_GRADIENT_FEATURES = {
    "attention": {"grad": ("q", "k", "v"), "alpha_grad": ("alpha",), "span_grad": ("span",)},
    "entmax": {"grad": ("x",), "alpha_grad": ("alpha",), "weights_grad": ("weights",)},
    "span_mask": {"grad": ("span",)},
    "partial": {},
}
#: Array types whose frameworks differentiate a kernel's function themselves (autograd).
AUTOGRAD_ARRAY_TYPES = frozenset({"torch", "jax"})


def _number(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Interval:
    """A real interval such as (1, 2] for the alphas a kernel runs: `Interval(1, 2, low_open=True)`
    or `Interval.parse("(1, 2]")`."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __post_init__(self):
        if not self.low <= self.high:
            raise ValueError(f"an interval needs low <= high; got low={self.low}, high={self.high}")

    @classmethod
    def parse(cls, text: str) -> "Interval":
        match = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*", text)
        if match is None:
            raise ValueError(f"not an interval: {text!r} (write e.g. '(1, 2]' or '[1.5, 1.5]')")
        left, low, high, right = match.groups()
        return cls(float(low), float(high), low_open=left == "(", high_open=right == ")")

    def __contains__(self, x) -> bool:
        x = float(x)
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        return (f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}")


@dataclass(frozen=True)
class Lengths:
    """Rules for one sequence length (Lq or Lk): a multiple of `multiple_of`, a power of two,
    at least `min`, at most `max`."""

    multiple_of: int = 1
    power_of_two: bool = False
    min: int = 0
    max: int | None = None

    def __post_init__(self):
        if not (isinstance(self.multiple_of, int) and self.multiple_of >= 1):
            raise ValueError(f"Lengths.multiple_of must be an integer >= 1; got {self.multiple_of!r}")

    def allows(self, n: int) -> bool:
        return not self.violations(n)

    def violations(self, n: int) -> list[str]:
        """What n breaks, each as 'what is allowed' (empty: n is allowed)."""
        out = []
        if n % self.multiple_of:
            out.append(f"a multiple of {self.multiple_of}")
        if self.power_of_two and (n < 1 or n & (n - 1)):
            out.append("a power of two")
        if n < self.min:
            out.append(f">= {self.min}")
        if self.max is not None and n > self.max:
            out.append(f"<= {self.max}")
        return out

    def __str__(self) -> str:
        parts = [] if self.multiple_of == 1 else [f"a multiple of {self.multiple_of}"]
        if self.power_of_two:
            parts.append("a power of two")
        if self.min:
            parts.append(f">= {self.min}")
        if self.max is not None:
            parts.append(f"<= {self.max}")
        return ", ".join(parts) or "any"


def _describe_dims(dims) -> str:
    if isinstance(dims, range):
        step = "" if dims.step == 1 else f" in steps of {dims.step}"
        return f"{dims.start}..{dims.stop - 1}{step}" if len(dims) else "none"
    return ", ".join(str(d) for d in sorted(dims))


def describe_alphas(alphas) -> str:
    if isinstance(alphas, Interval):
        return f"alpha in {alphas}"
    return "alpha in {" + ", ".join(_number(a) for a in sorted(alphas)) + "}"


def alpha_allowed(alphas, value: float) -> bool:
    if alphas is None:
        return True
    if isinstance(alphas, Interval):
        return value in alphas
    return any(float(value) == float(a) for a in alphas)


@dataclass(frozen=True)
class Capabilities:
    """What one kernel of one op supports.

    array_type: the framework whose arrays it takes ('numpy', 'torch', 'jax').
    devices, dtypes: device kinds and dtype names it runs on.
    features: the optional parts of SPEC.md it implements (names from validation.FEATURES).
    max_head_dim: largest D and Dv (None: no limit).
    head_dims: the D it runs: a set ({16, 32, 64, 128}) or a range (range(16, 129)); None: any.
    value_head_dims: the Dv it runs, likewise; None: the same rule as head_dims.
    lq, lk: rules for the query and key lengths (`Lengths`: multiple of n, power of two, min,
        max); None: any length.
    equal_lengths: the kernel needs Lq == Lk.
    max_batch, max_heads: largest B and largest H (None: no limit).
    alphas: the alpha values it runs: a set ({1.5}) or an `Interval` ((1, 2]); None: every
        alpha in [1, 2] (with the 'entmax' feature; alpha = 1 only without it). A call whose
        alpha is not concrete (traced under jit, or an array on an accelerator read only under
        ATTNSPEC_VALIDATE=full) cannot be verified, and a kernel that restricts alpha refuses it.
    gradients: the inputs it returns gradients for (names from GRADIENTS[op], e.g. {'q', 'k',
        'v'}); None: derived (Kernel.gradients): a declared vjp gives every gradient of the op;
        on an autograd framework the gradient features ('grad', 'alpha_grad', 'span_grad', ...)
        give theirs.
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
    head_dims: frozenset | range | None = None
    value_head_dims: frozenset | range | None = None
    lq: Lengths | None = None
    lk: Lengths | None = None
    equal_lengths: bool = False
    max_batch: int | None = None
    max_heads: int | None = None
    alphas: frozenset | Interval | None = None
    gradients: frozenset | None = None

    max_query_length: int | None = None

    def __post_init__(self):
        for name in ("head_dims", "value_head_dims", "alphas", "gradients"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (range, Interval, frozenset)):
                object.__setattr__(self, name, frozenset(value))  # a set, tuple or list
        if self.alphas is not None and not isinstance(self.alphas, Interval):
            bad = [a for a in self.alphas if not 1.0 <= float(a) <= 2.0]
            if bad:
                raise ValueError(f"alphas must lie in [1, 2]; got {sorted(bad)}")

    @property
    def has_shape_rules(self) -> bool:
        """Whether a rule beyond plain upper limits decides which sizes it runs."""
        return (self.head_dims is not None or self.value_head_dims is not None or self.lq is not None
                or self.lk is not None or self.equal_lengths)

    # The questions a strategy asks to draw only what the kernel runs.
    def allows_head_dim(self, d: int, which: str = "D") -> bool:
        if self.max_head_dim is not None and d > self.max_head_dim:
            return False
        dims = self.value_head_dims if which == "Dv" and self.value_head_dims is not None else self.head_dims
        return dims is None or d in dims

    def allows_length(self, n: int, which: str) -> bool:
        rule = self.lq if which == "Lq" else self.lk
        return rule is None or rule.allows(n)

    def allows_alpha(self, alpha: float) -> bool:
        if float(alpha) != 1.0 and "entmax" not in self.features:
            return False
        return alpha_allowed(self.alphas, alpha)

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
        if call.op == "attention":
            reasons += self._shape_reasons(sizes)
        if self.alphas is not None and call.op in ("attention", "entmax"):
            reasons += self._alpha_reasons(call)
        return reasons

    def _shape_reasons(self, sizes: dict) -> list[str]:
        reasons = []
        for dim, dims in (("D", self.head_dims), ("Dv", self.value_head_dims if self.value_head_dims is not None
                                                    else self.head_dims)):
            if dims is not None and dim in sizes and sizes[dim] not in dims:
                reasons.append(f"head dim {dim}={sizes[dim]} (supported: {_describe_dims(dims)})")
        for name, rule in (("Lq", self.lq), ("Lk", self.lk)):
            if rule is not None and name in sizes:
                broken = rule.violations(sizes[name])
                if broken:
                    reasons.append(f"{name}={sizes[name]} (supported: {', '.join(broken)})")
        if self.equal_lengths and sizes.get("Lq") != sizes.get("Lk"):
            reasons.append(f"Lq={sizes.get('Lq')}, Lk={sizes.get('Lk')} (supported: Lq == Lk)")
        if self.max_batch is not None and sizes.get("B", 0) > self.max_batch:
            reasons.append(f"batch B={sizes['B']} (supported: <= {self.max_batch})")
        if self.max_heads is not None and sizes.get("H", 0) > self.max_heads:
            reasons.append(f"heads H={sizes['H']} (supported: <= {self.max_heads})")
        return reasons

    def _alpha_reasons(self, call: CallInfo) -> list[str]:
        allowed = describe_alphas(self.alphas)
        if call.alpha is None:
            return [f"alpha is not concrete here (traced, or on an accelerator without "
                    f"ATTNSPEC_VALIDATE=full), so it cannot be checked against {allowed}"]
        values = (call.alpha,) if isinstance(call.alpha, float) else call.alpha
        bad = [a for a in values if not alpha_allowed(self.alphas, a)]
        if bad:
            shown = ", ".join(_number(a) for a in bad[:4]) + (", ..." if len(bad) > 4 else "")
            return [f"alpha={shown} (supported: {allowed})"]
        return []


def all_features(op: str) -> frozenset:
    """Every optional feature of an op: what a complete implementation declares."""
    return frozenset(FEATURES[op])


@dataclass(frozen=True)
class Kernel:
    """One implementation of one op.

    fn takes the op's public arguments (without `backend`); for the op 'partial' it is the
    namespace (a module) of the per-block operations of SPEC.md section 10, with the names and
    arguments of attnspec.reference.partial. extra_reasons, if given, adds
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

    @property
    def gradients(self) -> frozenset:
        """The inputs this kernel returns gradients for: the declared ones, plus those its
        gradient features imply on an autograd framework (a declared vjp implies every one)."""
        caps = self.capabilities
        names = GRADIENTS.get(self.op, ())
        implied = set()
        if self.vjp is not None and caps.gradients is None:
            implied.update(names)
        if caps.array_type in AUTOGRAD_ARRAY_TYPES:
            for feature, inputs in _GRADIENT_FEATURES.get(self.op, {}).items():
                if feature in caps.features:
                    implied.update(inputs)
        declared = set(caps.gradients or ())
        return frozenset(n for n in names if n in implied | declared)
