"""All Hypothesis strategies of the suite, in one place (as in array-api-tests).

Array contents come from a NumPy generator seeded by a drawn integer, shaped by a few drawn
knobs (logit magnitude, ties, repeated keys): fast to generate, and shrinking still reduces the
knobs toward the plainest case. Shapes come from fixed buckets so that compiled backends do not
recompile for every example.

Every strategy draws only what the kernel under test declares (`Capabilities`: head dims,
length rules, batch and head limits, alphas): sizes are moved to the nearest declared one, and
an example with no declared size near it is rejected (drawn again). Besides the small shapes, a
share of each cell's examples (`Sizes.large_share`, run as a plan of its own so that every cell
gets some) has tile-crossing sizes: lengths ragged around 16/32/64/128/256, Lq != Lk, real head
dims, D != Dv, GQA groups of 1, 2, 4 and 8. Lengths and head dims are sampled from ascending
lists, so shrinking goes to the smallest failing size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import assume
from hypothesis import strategies as st

from .cases import AttentionCase, EntmaxCase, PartialCase, SpanMaskCase

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
    _cell("partial op", "partial", set(), {"entmax", "span", "causal", "key_lengths", "key_padding_mask",
                                           "q_offset", "gqa"}),
]
CELLS = ATTENTION_CELLS + OP_CELLS


@dataclass(frozen=True)
class Sizes:
    """How large a profile's tile-crossing examples get (see PROFILE_SIZES).

    large_share: the share of each cell's examples drawn at tile-crossing sizes.
    max_length: the longest Lq or Lk drawn. head_dims: the head dims drawn (as the kernel
    declares). max_scores: B*H*Lq*Lk of one example at most (batch and heads shrink first).
    shapes: if given, tile-crossing shapes are sampled from these buckets instead of drawn
    freely, so that compiled backends (jax.jit) compile a few shapes, not one per example.
    """

    large_share: float = 0.17  # 2 of ci's 12 examples per cell and dtype
    max_length: int = 300
    head_dims: tuple = (16, 32, 40, 59, 64, 96, 111, 128)
    max_scores: int = 100_000
    shapes: tuple | None = None  # fixed (B, H, Hkv, Lq, Lk, D, Dv) to sample instead of free draws


#: Lengths ragged around the tile widths kernels use (16 .. 256), and the longer ones.
RAGGED_LENGTHS = (1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 300,
                  383, 511, 513, 799, 1023, 1024, 1100)
#: (Lq, Lk) pairs of FlashAttention's own tests, and a few more with Lq != Lk.
LENGTH_PAIRS = ((113, 203), (128, 217), (239, 1), (799, 3), (1023, 1024), (1, 300), (65, 17), (17, 129))

#: The ci profile's tile-crossing buckets (B, H, Hkv, Lq, Lk, D, Dv), smallest first (shrinking
#: goes there): ragged lengths around 16..256, FlashAttention's pairs, Lq != Lk, decoding,
#: head dims 16..128 with D != Dv, GQA groups 1, 2, 4 and 8.
CI_LARGE_SHAPES = (
    (2, 2, 2, 15, 33, 59, 16),
    (1, 2, 2, 17, 65, 40, 40),
    (1, 2, 2, 239, 1, 32, 32),
    (1, 2, 2, 1, 300, 64, 64),
    (1, 8, 1, 1, 257, 16, 16),
    (2, 4, 1, 63, 129, 111, 59),
    (1, 4, 2, 113, 203, 64, 32),
    (1, 2, 2, 128, 217, 96, 128),
    (1, 1, 1, 300, 255, 128, 96),
)

PROFILE_SIZES = {
    "ci": Sizes(shapes=CI_LARGE_SHAPES),
    "thorough": Sizes(large_share=0.2, max_length=1100,
                      head_dims=(16, 32, 40, 59, 64, 96, 111, 128, 160, 192, 256), max_scores=1_100_000),
}


def _fit_length(caps, n: int, which: str):
    """The declared length nearest n (the next one up first), or None."""
    if caps is None or caps.allows_length(n, which):
        return n
    rule = caps.lq if which == "Lq" else caps.lk
    top = rule.max if rule.max is not None else 4 * max(n, 64)
    for m in range(max(n, rule.min), top + 1):
        if rule.allows(m):
            return m
    for m in range(min(n, top), -1, -1):
        if rule.allows(m):
            return m
    return None


def _fit_head_dim(caps, d: int, which: str):
    """The declared head dim nearest d (the next one up first), or None."""
    if caps is None or caps.allows_head_dim(d, which):
        return d
    for m in list(range(d + 1, 2 * d + 129)) + list(range(d - 1, 0, -1)):
        if caps.allows_head_dim(m, which):
            return m
    return None


def fit_shape(caps, B, H, Hkv, Lq, Lk, D, Dv):
    """(B, H, Hkv, Lq, Lk, D, Dv) moved to sizes the kernel declares, or None if there are none."""
    if caps is None:
        return B, H, Hkv, Lq, Lk, D, Dv
    if caps.max_batch is not None:
        B = min(B, caps.max_batch)
    if caps.max_heads is not None and H > caps.max_heads:
        group = H // Hkv
        Hkv = max(1, caps.max_heads // group)
        H = Hkv * group
        if H > caps.max_heads:
            return None
    if caps.max_query_length is not None:  # a kernel for short query blocks (decode steps)
        Lq = min(Lq, caps.max_query_length)
    if caps.equal_lengths:
        Lk = Lq = max(Lq, Lk)
    Lq, Lk = _fit_length(caps, Lq, "Lq"), _fit_length(caps, Lk, "Lk")
    if caps.equal_lengths and Lq != Lk:
        Lq = Lk = _fit_length(caps, max(Lq or 0, Lk or 0), "Lq")
        if Lq is None or not caps.allows_length(Lq, "Lk"):
            return None
    D, Dv = _fit_head_dim(caps, D, "D"), _fit_head_dim(caps, Dv, "Dv")
    if None in (Lq, Lk, D, Dv) or B < 1:
        return None
    return B, H, Hkv, Lq, Lk, D, Dv


def alphas(caps=None, dtype=None):
    """alpha in [1, 2]: the closed-form values, anything, and alpha - 1 down to 1e-6 / near 2;
    only the alphas `caps` declares (as the kernel sees them: rounded to the compute dtype)."""
    base = st.one_of(
        st.sampled_from([1.5, 1.0, 2.0]),
        st.floats(1.0, 2.0),
        st.integers(1, 6).map(lambda e: 1.0 + 10.0**-e),
        st.integers(1, 6).map(lambda e: 2.0 - 10.0**-e),
    )
    if caps is None or (caps.alphas is None and "entmax" in caps.features):
        return base
    declared = caps.alphas
    if declared is not None and not isinstance(declared, frozenset):  # an Interval
        inside = st.floats(max(declared.low, 1.0), min(declared.high, 2.0),
                           exclude_min=declared.low_open, exclude_max=declared.high_open)
        base = st.one_of(base, inside)
    elif declared is not None:
        base = st.sampled_from(sorted(float(a) for a in declared))

    def runs(a):
        return caps.allows_alpha(_as_kernel_sees(a, dtype))

    return base.filter(runs)


def _as_kernel_sees(alpha, dtype):
    if dtype is None:
        return alpha
    from .cases import round_to
    from .tolerances import COMPUTE

    return float(round_to(alpha, COMPUTE[dtype]))


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


def _small_shape(draw, cell: Cell, features):
    buckets = SHAPES_GQA if "gqa" in cell.required else SHAPES_PLAIN
    if "gqa" in features and "gqa" not in cell.required:
        buckets = SHAPES_PLAIN + SHAPES_GQA
    if "q_offset" in cell.required:
        buckets = SHAPES_DECODE + SHAPES_PLAIN
    if "gqa" not in features:
        buckets = [b for b in buckets if b[1] == b[2]] or SHAPES_PLAIN
    return draw(st.sampled_from(buckets))


def _large_shape(draw, cell: Cell, features, sizes: Sizes):
    """A tile-crossing shape: ragged lengths, real head dims, D != Dv, GQA groups 1-8."""
    if sizes.shapes:
        gqa = [b for b in sizes.shapes if b[1] != b[2]]
        plain = [b for b in sizes.shapes if b[1] == b[2]]
        if "gqa" in cell.required:
            buckets = gqa
        elif "q_offset" in cell.required:  # decoding first
            buckets = sorted(sizes.shapes, key=lambda b: b[3] != 1) if "gqa" in features else \
                sorted(plain, key=lambda b: b[3] != 1)
        else:
            buckets = list(sizes.shapes) if "gqa" in features else plain
        return draw(st.sampled_from(buckets or plain or list(sizes.shapes)))
    gqa = "gqa" in features and ("gqa" in cell.required or draw(st.booleans()))
    group = draw(st.sampled_from([2, 4, 8])) if gqa else 1
    Hkv, B = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    lengths = [n for n in RAGGED_LENGTHS if n <= sizes.max_length]
    pairs = [p for p in LENGTH_PAIRS if max(p) <= sizes.max_length]
    if "q_offset" in cell.required and draw(st.booleans()):  # decoding: one query, a long cache
        Lq, Lk = 1, draw(st.sampled_from(lengths))
    elif pairs and draw(st.integers(0, 2)) == 2:
        Lq, Lk = draw(st.sampled_from(pairs))
    else:
        Lq, Lk = draw(st.sampled_from(lengths)), draw(st.sampled_from(lengths))
    D = draw(st.sampled_from(sizes.head_dims))
    Dv = D if draw(st.booleans()) else draw(st.sampled_from(sizes.head_dims))
    # Keep one example affordable for the float64 reference: fewer batches and heads first.
    while B * Hkv * group * Lq * Lk > sizes.max_scores and (B > 1 or Hkv > 1 or group > 2):
        if B > 1:
            B = 1
        elif Hkv > 1:
            Hkv = 1
        else:
            group //= 2
    return B, Hkv * group, Hkv, Lq, Lk, D, Dv


@st.composite
def attention_cases(draw, cell: Cell, supported, caps=None, dtype=None, sizes=None) -> AttentionCase:
    """An attention call exercising cell's features (and those optional ones `supported` has),
    at shapes and alphas `caps` declares (None: any): small shapes, or with `sizes` given,
    tile-crossing ones."""
    features = cell.features(supported)
    large = sizes is not None
    shape = _large_shape(draw, cell, features, sizes) if large else _small_shape(draw, cell, features)
    fitted = fit_shape(caps, *shape)
    assume(fitted is not None)
    B, H, Hkv, Lq, Lk, D, Dv = fitted
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
            kw["alpha"] = np.array([draw(alphas(caps, dtype)) for _ in range(H)])
        else:
            kw["alpha"] = draw(alphas(caps, dtype))
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
    note = f"seed={seed} logit_scale={logit_scale}" + (" tile-crossing" if large else "")
    # The ramp key's gradients (dz ~ 1/(R m) with m ~ 1e-7) exceed the half types' range; its
    # case, the cancellation of (R + z) - |d|, is one of the float32 and float64 compute dtypes.
    ramp_key_dtype = dtype is None or dtype in ("float32", "float64")
    if kw.get("span") is not None and gradients and ramp_key_dtype and draw(st.integers(0, 2)) == 0:
        odd = draw(st.sampled_from([41, 5, 1, 401]))
        if "alpha" in kw and (caps is None or caps.allows_alpha(1.0)) and draw(st.sampled_from([True, False])):
            # A tiny weight matters most near softmax: at alpha = 1.5 balancing m = 1e-5 takes
            # a score gap of 630, and the key's digits vanish in the scores' own error.
            kw["alpha"] = np.ones(H) if np.ndim(kw["alpha"]) else 1.0
        m = _ramp_key(q, k, kw, odd)
        if m is not None:
            note += f" ramp key m={m:.3g}"
    return AttentionCase(q=q, k=k, v=v, grad_out=grad_out, gradients=gradients, large=large, note=note, **kw)


def _ramp_key(q, k, kw, odd):
    """A key on the ramp with a tiny m whose score balances it against keys with m = 1, where
    forming R + z first would lose m's digits (SPEC.md section 3). The key j of the last row of
    batch 0 sits at a power of two |d| >= R, and z = |d| - R + odd * ulp(|d|) / 2 in float32:
    z then lies in the binade below |d|, and R + z = |d| + odd * ulp(|d|) / 2 falls halfway
    between float32 numbers, an error of 1/odd of m. Its score is raised above the row's others
    by what makes its p about that of the row's top key with m = 1. Sets kw["span"] (every head alike) and returns m, or None where no key fits."""
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    offset = np.broadcast_to(np.asarray(Lk - Lq if kw.get("q_offset") is None else kw["q_offset"]), (B,))
    length = Lk if kw.get("key_lengths") is None else int(kw["key_lengths"][0])
    ramp = kw["ramp"]
    d = int(offset[0]) + Lq - 1 - np.arange(min(length, Lk))  # distances of the last row, batch 0
    fits = (np.abs(d) >= ramp) & ((np.abs(d) & (np.abs(d) - 1)) == 0) & (d != 0)
    if kw.get("causal"):
        fits &= d >= 0
    if Lk < 2 or not fits.any():
        return None
    j = int(np.argmax(np.where(fits, np.abs(d), -1)))
    dist = float(abs(d[j]))
    delta = odd * float(np.spacing(np.float32(dist))) / 2
    m = delta / ramp
    scale = 1.0 / np.sqrt(D) if kw.get("scale") is None else kw["scale"]
    group = H // Hkv
    alpha = np.broadcast_to(np.asarray(kw.get("alpha", 1.0), dtype=np.float64), (H,))
    shifts = []
    for g in range(Hkv):
        row = q[0, g * group, Lq - 1]
        norm2 = float(row @ row)
        scores = scale * (k[0, g] @ row)
        # m u_j^(1/eps) = u_top^(1/eps) with u_top ~ 1: a gap of expm1(-eps log m) / eps
        # (log(1/m) at alpha = 1; SPEC.md section 2.2).
        eps = float(alpha[g * group]) - 1.0
        gap = np.log(1.0 / m) if eps == 0.0 else np.expm1(-eps * np.log(m)) / eps
        step = (np.delete(scores, j).max() + gap - scores[j]) / (scale * norm2) if norm2 > 0 else np.inf
        if gap > 64 or not abs(step) * np.sqrt(norm2) < 1e4:  # scores and keys must fit float16
            return None
        shifts.append(step * row)
    for g, shift in enumerate(shifts):
        k[0, g, j] += shift
    z = dist - ramp + delta
    kw["span"] = np.full(np.shape(kw["span"]), z) if np.ndim(kw["span"]) else z
    return m


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
def continuity_cases(draw, supported, caps=None, dtype=None) -> AttentionCase:
    """SPEC 5.2 in general: the farthest key sits exactly on the outer kink (m = 0) and has the
    highest score by a margin, with a distinctive value. Entering the span must move the output
    only as much as it moves the reference's.

    For a kernel with shape rules the example is padded to declared sizes without changing
    its meaning: extra keys go in front (farther than z + R, so outside the span), extra
    queries repeat the first, extra head-dim columns are zero."""
    n = draw(st.integers(3, 8))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=n) * draw(st.sampled_from([0.5, 1.0, 2.0]))
    scores[0] = scores[1:].max() + draw(st.floats(0.5, 6.0))  # key 0: the farthest, distance n-1
    values = rng.normal(size=n)
    values[0] = 10.0
    ramp = draw(st.sampled_from([1.0, 2.0]))  # <= n - 1, so that z = n - 1 - R >= 0
    alpha = draw(alphas(caps, dtype)) if "entmax" in supported else 1.0
    fitted = fit_shape(caps, 1, 1, 1, 1, n, 2, 1)
    assume(fitted is not None)
    _, _, _, Lq, Lk, D, Dv = fitted
    assume(Lk >= n and D >= 2)
    q = np.zeros((1, 1, Lq, D))
    q[..., 0] = 1.0
    k = np.zeros((1, 1, Lk, D))
    k[0, 0, Lk - n:, 0] = scores
    v = np.zeros((1, 1, Lk, Dv))
    v[0, 0, Lk - n:, 0] = values
    # With Lq > 1 the last query is the one built above; the others read the same keys nearer.
    return AttentionCase(q=q, k=k, v=v, grad_out=np.ones((1, 1, Lq, Dv)),
                         alpha=alpha, span=float(n - 1) - ramp, ramp=ramp, causal="causal" in supported,
                         scale=1.0, gradients=False, note=f"continuity seed={seed}")


@st.composite
def entmax_cases(draw, cell: Cell, supported, caps=None, dtype=None) -> EntmaxCase:
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
        alpha = np.array([draw(alphas(caps, dtype)) for _ in range(int(np.prod(shape)))]).reshape(shape)
    else:
        alpha = draw(alphas(caps, dtype))
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
    if cell.op == "partial":
        return partial_cases(cell, frozenset(supported))
    return span_mask_cases(cell, frozenset(supported))


#: (B, H, Hkv, L, D, Dv) of the per-block cases, and the ragged splits of each L.
SHAPES_PARTIAL = [(2, 2, 2, 9, 4, 3), (1, 1, 1, 7, 2, 1)]
SHAPES_PARTIAL_GQA = [(2, 4, 2, 9, 3, 4), (1, 2, 1, 7, 4, 3)]
SPLITS_PARTIAL = {9: [(4, 5), (2, 6, 1), (9,)], 7: [(3, 4), (1, 5, 1)]}


@st.composite
def partial_cases(draw, cell: Cell, supported) -> PartialCase:
    """A sequence of ragged length split in 1-3 ragged blocks, for the per-block operations:
    alphas 1, 1.5, 2 and between (per head), spans away from the mask's kinks (an integer
    distance never meets z + R - |d| in {0, R}), causal, key_lengths, key_padding_mask and
    q_offset as the kernel declares them; keys that do not exist hold NaN."""
    features = cell.features(supported)
    # (B, H, Hkv, L, D, Dv) and the splits from fixed buckets: JAX compiles each shape once.
    B, H, Hkv, L, D, Dv = draw(st.sampled_from(SHAPES_PARTIAL + (SHAPES_PARTIAL_GQA if "gqa" in features else [])))
    splits = np.asarray(draw(st.sampled_from(SPLITS_PARTIAL[L])), dtype=np.int64)
    entmax = "entmax" in features
    alpha = np.array([draw(st.sampled_from([1.5, 2.0, 1.0, 1.25, 1.8]) if entmax else st.just(1.0))
                      for _ in range(H)], dtype=np.float64)
    ramp = draw(st.sampled_from([2.0, 1.0, 3.0]))
    span = None
    if "span" in features and draw(st.booleans()):
        span = np.array([draw(st.integers(0, L)) + draw(st.sampled_from([0.25, 0.5, 0.75])) for _ in range(H)])
    causal = "causal" in features and draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = draw(st.sampled_from([1.0, 3.0, 0.3]))
    q = logits * rng.standard_normal((B, H, L, D))
    k = rng.standard_normal((B, Hkv, L, D))
    v = rng.standard_normal((B, Hkv, L, Dv))
    grad_out = rng.standard_normal((B, H, L, Dv))
    valid = np.ones((B, L), bool)
    key_lengths = None
    if "key_lengths" in features and draw(st.booleans()):
        key_lengths = rng.integers(0, L + 1, size=B).astype(np.int64)
        valid &= np.arange(L)[None, :] < key_lengths[:, None]
    mask = None
    if "key_padding_mask" in features and draw(st.booleans()):
        mask = rng.random((B, L)) < draw(st.sampled_from([0.7, 0.3]))
        valid &= mask
    k = np.where(valid[:, None, :, None], k, np.nan)  # keys that do not exist may hold anything (SPEC.md 5.3)
    v = np.where(valid[:, None, :, None], v, np.nan)
    q_offset = np.zeros(B, np.int64)
    if "q_offset" in features and draw(st.booleans()):
        q_offset = rng.integers(-3, 4, size=B).astype(np.int64)
    return PartialCase(q=q, k=k, v=v, grad_out=grad_out, splits=splits, alpha=alpha, span=span, ramp=ramp,
                       causal=bool(causal), key_lengths=key_lengths, q_offset=q_offset, scale=D**-0.5,
                       key_padding_mask=mask, query_block=draw(st.integers(0, len(splits) - 1)))
