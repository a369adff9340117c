"""All Hypothesis strategies of the suite, in one place (as in array-api-tests).

Array contents come from a NumPy generator seeded by a drawn integer, shaped by a few drawn
knobs (logit magnitude, ties, repeated keys): fast to generate, and shrinking still reduces the
knobs toward the plainest case. Shapes come from fixed buckets so that compiled backends do not
recompile for every example.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from .cases import AttentionCase, EntmaxCase, SpanMaskCase

#: (B, H, Hkv, Lq, Lk, D, Dv)
SHAPES_PLAIN = [(1, 2, 2, 6, 6, 8, 8), (2, 3, 3, 4, 9, 4, 6)]
SHAPES_GQA = [(2, 4, 2, 5, 7, 8, 8), (1, 4, 1, 3, 8, 8, 4), (1, 6, 2, 4, 6, 4, 4)]
SHAPES_DECODE = [(2, 4, 2, 1, 12, 8, 8), (3, 2, 1, 1, 5, 4, 4), (2, 2, 2, 1, 10, 8, 4)]

#: Logit magnitudes: typical first (shrinking goes there), up to 1e4.
LOGIT_SCALES = [1.0, 0.1, 3.0, 10.0, 100.0, 1e4]
RAMPS = [2.0, 0.5, 8.0, 64.0]


@dataclass(frozen=True)
class Cell:
    """A row of the report: an op and the SPEC.md features its examples exercise.

    required: features every example uses (a backend without them refuses the whole cell).
    optional: features examples may add when the backend declares them.
    """

    name: str
    op: str
    required: frozenset
    optional: frozenset

    def features(self, supported) -> frozenset:
        return self.required | (self.optional & frozenset(supported))


def _cell(name, op, required, optional):
    return Cell(name, op, frozenset(required), frozenset(optional))


ATTENTION_CELLS = [
    _cell("entmax", "attention", {"entmax"}, {"alpha_per_head"}),
    _cell("causal", "attention", {"causal"}, {"entmax", "alpha_per_head"}),
    _cell("span", "attention", {"span"}, {"span_per_head", "entmax", "alpha_per_head", "causal"}),
    _cell("key_lengths", "attention", {"key_lengths"}, {"entmax", "causal"}),
    _cell("q_offset", "attention", {"q_offset"}, {"causal", "span", "span_per_head", "entmax"}),
    _cell("gqa", "attention", {"gqa"}, {"entmax", "alpha_per_head", "causal"}),
    _cell("padding_mask", "attention", {"key_padding_mask"},  # a name as wide as the report column
          {"entmax", "causal", "span", "key_lengths", "q_offset", "gqa"}),
    _cell("combined", "attention", set(), {"entmax", "alpha_per_head", "span", "span_per_head", "causal",
                                           "key_lengths", "q_offset", "gqa"}),
]
OP_CELLS = [
    _cell("entmax op", "entmax", {"entmax"}, {"alpha_array", "weights"}),
    _cell("span_mask op", "span_mask", set(), {"span_per_head", "q_offset"}),
]
CELLS = ATTENTION_CELLS + OP_CELLS


def alphas():
    """alpha in [1, 2]: the closed-form values, anything, and alpha - 1 down to 1e-6 / near 2."""
    return st.one_of(
        st.sampled_from([1.5, 1.0, 2.0]),
        st.floats(1.0, 2.0),
        st.integers(1, 6).map(lambda e: 1.0 + 10.0**-e),
        st.integers(1, 6).map(lambda e: 2.0 - 10.0**-e),
    )


def _away_from_kinks(z, ramp):
    """Move z so that no integer distance sits within 0.05 of a kink (|d| = z or z + R)."""
    for _ in range(3):
        for point in (z, z + ramp):
            frac = point - np.floor(point)
            if frac < 0.05 or frac > 0.95:
                z = z + 0.1
    return z


@st.composite
def spans(draw, H, Lk, ramp, per_head):
    """(span, on_a_kink): z from 0 to beyond Lk, usually away from the mask's kinks, sometimes
    with R + z - |d| within a few ulps of 0 (where rounding decides whether a key is allowed)."""
    on_kink = draw(st.booleans()) if draw(st.integers(0, 4)) == 0 else False

    def one():
        if on_kink:
            d = draw(st.integers(1, Lk))
            ulps = draw(st.integers(-3, 3))
            z = max(0.0, float(d) - ramp)
            for _ in range(abs(ulps)):
                z = float(np.nextafter(z, np.inf if ulps > 0 else -np.inf))
            return max(z, 0.0)
        return _away_from_kinks(draw(st.floats(0.0, Lk + 4.0)), ramp)

    if per_head:
        return np.array([one() for _ in range(H)]), on_kink
    return one(), on_kink


@st.composite
def attention_cases(draw, cell: Cell, supported) -> AttentionCase:
    """An attention call exercising cell's features (and those optional ones `supported` has)."""
    features = cell.features(supported)
    buckets = SHAPES_GQA if "gqa" in cell.required else SHAPES_PLAIN
    if "gqa" in features and "gqa" not in cell.required:
        buckets = SHAPES_PLAIN + SHAPES_GQA
    if "q_offset" in cell.required:
        buckets = SHAPES_DECODE + SHAPES_PLAIN
    if "gqa" not in features:
        buckets = [b for b in buckets if b[1] == b[2]] or SHAPES_PLAIN
    B, H, Hkv, Lq, Lk, D, Dv = draw(st.sampled_from(buckets))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    logit_scale = draw(st.sampled_from(LOGIT_SCALES))
    q = rng.normal(size=(B, H, Lq, D)) * logit_scale
    k = rng.normal(size=(B, Hkv, Lk, D))
    v = rng.normal(size=(B, Hkv, Lk, Dv))
    if Lk > 1 and draw(st.booleans()):  # repeated keys: ties in every row
        src, dst = rng.choice(Lk, size=2, replace=False)
        k[:, :, dst], v[:, :, dst] = k[:, :, src], v[:, :, src] + draw(st.sampled_from([0.0, 1.0]))
    grad_out = rng.normal(size=(B, H, Lq, Dv))

    kw = {}
    if "entmax" in features:
        if "alpha_per_head" in features and draw(st.booleans()):
            kw["alpha"] = np.array([draw(alphas()) for _ in range(H)])
        else:
            kw["alpha"] = draw(alphas())
    gradients = True
    if "span" in features and ("span" in cell.required or draw(st.booleans())):
        ramp = draw(st.sampled_from(RAMPS))
        span, on_kink = draw(spans(H, Lk, ramp, per_head="span_per_head" in features and draw(st.booleans())))
        kw.update(span=span, ramp=ramp)
        gradients = not on_kink
    if "causal" in features:
        kw["causal"] = True if "causal" in cell.required else draw(st.booleans())
    if "key_lengths" in features and ("key_lengths" in cell.required or draw(st.booleans())):
        kw["key_lengths"] = np.array([draw(st.integers(0, Lk)) for _ in range(B)], dtype=np.int64)
    if "key_padding_mask" in features and ("key_padding_mask" in cell.required or draw(st.booleans())):
        kw["key_padding_mask"] = draw(key_padding_masks(B, Lk, rng))
    if "q_offset" in features and ("q_offset" in cell.required or draw(st.booleans())):
        if draw(st.booleans()):
            kw["q_offset"] = np.array([draw(st.integers(-Lq, Lk)) for _ in range(B)], dtype=np.int64)
        else:
            kw["q_offset"] = draw(st.integers(-Lq, Lk))
    if draw(st.integers(0, 3)) == 0:
        kw["scale"] = draw(st.sampled_from([1.0, 0.05, 2.0]))
    return AttentionCase(q=q, k=k, v=v, grad_out=grad_out, gradients=gradients,
                         note=f"seed={seed} logit_scale={logit_scale}", **kw)


@st.composite
def key_padding_masks(draw, B, Lk, rng):
    """[B, Lk] bool: left padding (a prefix masked, as batched generation pads), random holes,
    or a row with no readable key."""
    pattern = draw(st.sampled_from(["left", "holes", "none readable"]))
    if pattern == "left":
        pads = np.array([draw(st.integers(0, Lk)) for _ in range(B)])
        return np.arange(Lk)[None, :] >= pads[:, None]
    mask = rng.random((B, Lk)) > 0.35
    if pattern == "none readable":
        mask[0] = False
    return mask


@st.composite
def continuity_cases(draw, supported) -> AttentionCase:
    """SPEC 5.2 in general: the farthest key sits exactly on the outer kink (m = 0) and has the
    highest score by a margin, with a distinctive value. Entering the span must move the output
    only as much as it moves the reference's."""
    n = draw(st.integers(3, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=n) * draw(st.sampled_from([0.5, 1.0, 2.0]))
    scores[0] = scores[1:].max() + draw(st.floats(0.5, 6.0))  # key 0: the farthest, distance n-1
    values = rng.normal(size=n)
    values[0] = 10.0
    ramp = draw(st.sampled_from([1.0, 2.0]))  # <= n - 1, so that z = n - 1 - R >= 0
    alpha = draw(alphas()) if "entmax" in supported else 1.0
    q = np.zeros((1, 1, 1, 2))
    q[..., 0] = 1.0
    k = np.zeros((1, 1, n, 2))
    k[0, 0, :, 0] = scores
    return AttentionCase(q=q, k=k, v=values.reshape(1, 1, n, 1), grad_out=np.ones((1, 1, 1, 1)),
                         alpha=alpha, span=float(n - 1) - ramp, ramp=ramp, causal="causal" in supported,
                         scale=1.0, gradients=False, note=f"continuity seed={seed}")


@st.composite
def entmax_cases(draw, cell: Cell, supported) -> EntmaxCase:
    features = cell.features(supported)
    rows, n = draw(st.sampled_from([(4, 7), (2, 16), (3, 1)]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, n)) * draw(st.sampled_from(LOGIT_SCALES))
    pattern = draw(st.sampled_from(["none", "-inf entries", "all -inf row", "peaked", "very negative", "ties"]))
    if pattern == "-inf entries":
        x[rng.random(x.shape) < 0.3] = -np.inf
    elif pattern == "all -inf row":
        x[0] = -np.inf
    elif pattern == "peaked":
        x[:, 0] += 50.0
    elif pattern == "very negative":
        x -= 3e4
    elif pattern == "ties":
        x[:, : max(1, n // 2)] = x[:, :1]
    axis = draw(st.sampled_from([-1, 0]))
    if axis == 0:
        x = x.T
    if "alpha_array" in features and draw(st.booleans()):
        shape = (1, x.shape[1]) if axis == 0 else (x.shape[0], 1)
        alpha = np.array([draw(alphas()) for _ in range(int(np.prod(shape)))]).reshape(shape)
    else:
        alpha = draw(alphas())
    weights = None
    if "weights" in features and draw(st.booleans()):
        weights = rng.uniform(0.0, 1.0, size=x.shape)
        weights[rng.random(x.shape) < 0.2] = 0.0
    return EntmaxCase(x=x, grad_out=rng.normal(size=x.shape), alpha=alpha, axis=axis, weights=weights,
                      note=f"seed={seed} pattern={pattern}")


@st.composite
def span_mask_cases(draw, cell: Cell, supported) -> SpanMaskCase:
    features = cell.features(supported)
    Lq, Lk = draw(st.sampled_from([(4, 4), (3, 9), (1, 12)]))
    ramp = draw(st.sampled_from(RAMPS))
    per_head = "span_per_head" in features and draw(st.booleans())
    span, on_kink = draw(spans(3, Lk, ramp, per_head))
    q_offset = None
    shape = (Lq, Lk)
    if "q_offset" in features and draw(st.booleans()):
        q_offset = np.array([draw(st.integers(-Lq, Lk)) for _ in range(2)], dtype=np.int64)
        shape = (2,) + shape
    if per_head:
        shape = shape[:-2] + (3,) + shape[-2:]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return SpanMaskCase(Lq=Lq, Lk=Lk, span=span, ramp=ramp, grad_out=rng.normal(size=shape),
                        q_offset=q_offset, gradients=not on_kink)


def cases_for(cell: Cell, supported):
    """The strategy of a cell's examples."""
    if cell.op == "attention":
        return attention_cases(cell, frozenset(supported))
    if cell.op == "entmax":
        return entmax_cases(cell, frozenset(supported))
    return span_mask_cases(cell, frozenset(supported))
