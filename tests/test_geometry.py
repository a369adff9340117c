"""The spec's geometry (attnspec/geometry.py) and every backend's copy of it.

A backend skips the keys outside its window, so its window must never be narrower than the set
of keys it may read: a key with m > 0 (as that backend computes m), within key_lengths and
(causal) not after the query, is never skipped. Each property draws ragged sizes, several batch
entries and heads, q_offset of either sign, causal or not, and spans on the kinks (z + R an
integer, where the key at |d| = z + R has m = 0 exactly).

The Triton functions run under the interpreter (TRITON_INTERPRET=1, set before the backend
loads, as tests/test_triton_backend.py does).
"""

from __future__ import annotations

import importlib
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from attnspec import geometry, precision

os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parents[1]


@st.composite
def windows(draw):
    """A call's geometry and a query tile: dict(B, Lq, Lk, offsets, lengths, causal, spans,
    ramp, i0, i1)."""
    B = draw(st.integers(1, 3))
    Lq, Lk = draw(st.integers(1, 40)), draw(st.integers(1, 48))
    # mostly rows whose positions sit among the keys (the window's ends inside [0, Lk)), some far out
    near = st.integers(-Lq, max(-Lq, Lk - Lq - 10))
    offsets = draw(st.lists(near | near | st.integers(-45, 60), min_size=B, max_size=B))
    lengths = draw(st.none() | st.lists(st.integers(0, Lk), min_size=B, max_size=B))
    ramp = draw(st.sampled_from([0.5, 1.0, 2.0, 3.25, 7.0]) | st.floats(0.05, 8.0))
    spans = None
    if draw(st.booleans()):
        spans = []
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.sampled_from(["kink", "any", "zero"]))
            # mostly spans well inside the sequence, so that the window's ends are not clipped
            top = draw(st.sampled_from([6, 6, 30]))
            if kind == "kink":  # z + R an integer, up to the rounding of z = n - R
                n = draw(st.integers(math.ceil(ramp), math.ceil(ramp) + top))
                spans.append(float(n) - ramp)
            elif kind == "any":
                spans.append(draw(st.floats(0.0, float(top))))
            else:
                spans.append(0.0)
    i0 = draw(st.integers(0, Lq - 1))
    i1 = draw(st.integers(i0 + 1, Lq))
    return dict(B=B, Lq=Lq, Lk=Lk, offsets=offsets, lengths=lengths, causal=draw(st.booleans()), spans=spans,
                ramp=ramp, i0=i0, i1=i1)


#: Windows whose both ends lie inside [0, Lk), so that a window one key too narrow shows: a span
#: off the kinks, one on a kink (z + R = 5), and ragged batch entries with a negative q_offset.
INTERIOR = [
    dict(B=1, Lq=10, Lk=40, offsets=[5], lengths=None, causal=False, spans=[3.0], ramp=2.5, i0=2, i1=4),
    dict(B=1, Lq=12, Lk=40, offsets=[14], lengths=None, causal=False, spans=[1.0, 3.0], ramp=2.0, i0=3, i1=4),
    dict(B=2, Lq=16, Lk=40, offsets=[-3, 9], lengths=[39, 30], causal=False, spans=[4.25], ramp=0.75, i0=8,
         i1=12),
]


def _read(w, m):
    """[B, H, Lq, Lk] bool: the keys each row may read, for span weights m [B, H, Lq, Lk] (or
    None without span) as some implementation computed them."""
    B, Lq, Lk = w["B"], w["Lq"], w["Lk"]
    d = _distances(w)
    allowed = np.ones((B, 1, Lq, Lk), bool)
    if w["lengths"] is not None:
        allowed &= (np.arange(Lk)[None, :] < np.asarray(w["lengths"])[:, None])[:, None, None, :]
    if w["causal"]:
        allowed &= d[:, None] >= 0
    if m is not None:
        allowed = allowed & (m > 0)
    return allowed


def _distances(w):
    """d [B, Lq, Lk] = i + o_b - j, int64."""
    rows = np.arange(w["Lq"])[:, None] - np.arange(w["Lk"])[None, :]
    return np.asarray(w["offsets"], np.int64)[:, None, None] + rows


def _numpy_mask(w, dtype):
    """m as SPEC.md section 3 forms it in `dtype`: (z - (|d| - R)) / R, clipped."""
    if w["spans"] is None:
        return None
    d = np.abs(_distances(w)).astype(dtype)[:, None]
    z = np.asarray(w["spans"], dtype)[None, :, None, None]
    R = np.asarray(w["ramp"], dtype)
    return np.clip((z - (d - R)) / R, 0, 1)


def _keys_read(w, m):
    """The keys some row i0..i1-1 of some batch entry and head may read."""
    return set(np.flatnonzero(_read(w, m)[:, :, w["i0"]:w["i1"]].any((0, 1, 2))).tolist())


def _spec_window(w, dtype):
    reach = None if w["spans"] is None else geometry.reach(w["spans"], w["ramp"], dtype)
    return geometry.key_window(w["i0"], w["i1"], w["Lk"], offsets=w["offsets"], causal=w["causal"], reach=reach,
                               key_lengths=w["lengths"])


# --- the spec ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=200)  # pure Python: many examples in well under a second
@given(w=windows())
@example(w=INTERIOR[0])
@example(w=INTERIOR[1])
@example(w=INTERIOR[2])
def test_key_window_holds_every_key_with_weight_and_no_more_at_its_ends(dtype, w):
    lo, hi = _spec_window(w, dtype)
    assert 0 <= lo <= hi <= w["Lk"]
    read = _keys_read(w, _numpy_mask(w, dtype))
    assert read <= set(range(lo, hi))
    # Tight: for one row of one batch entry and one head, with no other bound, both ends are read.
    if w["spans"] is not None and len(w["spans"]) == 1 and w["B"] == 1 and w["i1"] == w["i0"] + 1 \
            and not w["causal"] and w["lengths"] is None:
        position = w["i0"] + w["offsets"][0]
        r = geometry.reach(w["spans"], w["ramp"], dtype)
        if 0 <= position - r + 1 and position + r <= w["Lk"]:
            assert lo in read and hi - 1 in read


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@settings(max_examples=200)
@given(w=windows(), first_key=st.integers(0, 39), width=st.integers(1, 16))
def test_query_window_holds_every_row_that_reads_the_keys(dtype, w, first_key, width):
    first_key = min(first_key, w["Lk"] - 1)
    stop_key = min(w["Lk"], first_key + width)
    read = _read(w, _numpy_mask(w, dtype))[:, :, :, first_key:stop_key].any((1, 3))  # [B, Lq]
    reach = None if w["spans"] is None else geometry.reach(w["spans"], w["ramp"], dtype)
    for b, offset in enumerate(w["offsets"]):
        lo, hi = geometry.query_window(first_key, stop_key, w["Lq"], offset=offset, causal=w["causal"], reach=reach)
        assert 0 <= lo <= hi <= w["Lq"]
        assert set(np.flatnonzero(read[b]).tolist()) <= set(range(lo, hi))


def test_reach_is_the_ceiling_of_the_exact_sum_in_the_compute_dtype():
    # ceil of the exact sum: fl(R + z) would round 2**24 + 3 to 2**24 + 4 in float32.
    assert geometry.reach(2.0**24 + 2, 1.0, "float64") == 2**24 + 3
    assert geometry.reach(2.0**24 + 2, 1.0, "float32") == 2**24 + 3
    assert geometry.reach(3.0000002, 2.0, "float32") == 6  # fl(5.0000002) = 5.0; |d| = 5 has m > 0
    assert geometry.reach([3.0, 9.5, 0.0], 2.0) == 12  # the largest head; |d| < 11.5 reads 11
    assert geometry.reach(0.0, 0.25) == 1  # only d = 0


def test_validation_and_backends_take_the_limits_from_the_spec():
    from attnspec import validation

    assert validation.MAX_OFFSET is geometry.MAX_OFFSET
    assert precision.compute_dtype("bfloat16") == "float32" and precision.compute_dtype("float64") == "float64"


def test_round_to_bfloat16_rounds_to_nearest_even():
    one_ulp = 2.0**-7  # bfloat16 spacing at 1
    x = np.array([1.0, 1 + one_ulp / 2, 1 + 1.5 * one_ulp, 1 + 0.49 * one_ulp, 1 / 3, -3.0])
    got = precision.round_to(x, "bfloat16")
    # ties go to the even neighbour; 1/3 is 0x3EAB in bfloat16
    assert got.tolist() == [1.0, 1.0, 1 + 2 * one_ulp, 1.0, 0.333984375, -3.0]
    with pytest.raises(ValueError, match="dtype must be"):
        precision.round_to(x, "int8")


# --- the backends -------------------------------------------------------------------------------


@settings(max_examples=50)
@given(w=windows())
@example(w=INTERIOR[0])
@example(w=INTERIOR[1])
@example(w=INTERIOR[2])
def test_torch_window_is_the_spec_window_and_skips_no_key_with_weight(w):
    torch = pytest.importorskip("torch")
    tiled = importlib.import_module("attnspec.backends.torch.attention")
    span_mod = importlib.import_module("attnspec.backends.torch.span")
    dtype = torch.float32
    span = None if w["spans"] is None else torch.tensor(w["spans"], dtype=dtype)
    lengths = None if w["lengths"] is None else torch.tensor(w["lengths"])
    offsets = torch.tensor(w["offsets"])
    window = tiled._window(w["i0"], w["i1"], w["Lk"], span, w["ramp"], w["causal"], lengths, offsets)
    assert window == _spec_window(w, "float32")
    m = None
    if span is not None:  # the weights as the torch backend forms them
        d = span_mod.distances(w["Lq"], w["Lk"], offsets)[:, None]
        m = span_mod.soft_mask(d, span, w["ramp"], dtype).numpy()
    assert _keys_read(w, m) <= set(range(*window))


@settings(max_examples=50)
@given(w=windows(), tile_k=st.sampled_from([1, 4, 16]))
@example(w=INTERIOR[0], tile_k=1)
@example(w=INTERIOR[1], tile_k=1)
@example(w=INTERIOR[2], tile_k=4)
def test_jax_key_tiles_cover_the_spec_window_and_skip_no_key_with_weight(w, tile_k):
    pytest.importorskip("jax")
    import jax.numpy as jnp

    kernel = importlib.import_module("attnspec.backends.jax.attention")
    span_mod = importlib.import_module("attnspec.backends.jax.span")
    pdt = kernel.position_dtype()
    dtype = jnp.float32

    def three(values):  # repeating an entry changes no min or max, and fixed shapes compile once
        return (list(values) * 3)[:3]

    Lk = -(-w["Lk"] // tile_k) * tile_k  # the kernel pads keys to whole tiles; padding keys are masked
    lengths = [w["Lk"]] * w["B"] if w["lengths"] is None else w["lengths"]
    span = None if w["spans"] is None else jnp.asarray(three(w["spans"]), dtype).reshape(3, 1)
    call = kernel._Call(eps=None, span=span, causal=jnp.asarray(w["causal"]), ramp=jnp.asarray(w["ramp"], dtype),
                        scale=jnp.asarray(1.0, dtype), lengths=jnp.asarray(three(lengths), pdt),
                        positions=jnp.asarray(three(w["offsets"]), pdt), Lq=jnp.asarray(w["Lq"], jnp.int32), Lk=Lk,
                        mask=jnp.ones((3, Lk), bool))
    static = kernel.StaticArgs(has_span=span is not None, softmax_only=True, need_dalpha=False, need_dspan=False,
                               tile_q=w["i1"] - w["i0"], tile_k=tile_k)
    k_lo, k_hi = kernel._key_tiles(jnp.asarray(w["i0"], jnp.int32), call, static)
    keys = set(range(int(k_lo) * tile_k, min(w["Lk"], int(k_hi) * tile_k)))
    # the traced window is the spec's, formula for formula
    reach = None
    if span is not None:
        reach = span_mod.reach(call.span, call.ramp, pdt, geometry.POSITION_LIMITS[jnp.dtype(pdt).name])
    lo, hi = span_mod.key_window(w["i0"], w["i1"], w["Lk"], call.positions, call.causal, reach, call.lengths)
    assert (int(lo), int(hi)) == _spec_window(dict(w, lengths=lengths), "float32")
    # span.soft_mask forms m in float32 with the same operations, in the same order, as _numpy_mask
    assert _keys_read(w, _numpy_mask(w, "float32")) <= keys


@pytest.fixture(scope="module")
def triton_windows():
    """A kernel that evaluates the Triton key_window / query_window for one batch entry."""
    pytest.importorskip("torch")
    triton = pytest.importorskip("triton")
    import triton.language as tl

    # a kernel resolves names in its module's globals, not in this function's scope
    globals()["_triton_span"] = importlib.import_module("attnspec.backends.triton.span")

    @triton.jit
    def windows_kernel(Out, first_row, stop_row, first_key, stop_key, offset, kv_len, Lq, z, ramp,
                       HAS_SPAN: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
        lo, hi = _triton_span.key_window(first_row, stop_row, offset, kv_len, z, ramp, HAS_SPAN, CAUSAL, BLOCK)
        tl.store(Out + 0, lo)
        tl.store(Out + 1, hi)
        qlo, qhi = _triton_span.query_window(first_key, stop_key, offset, Lq, z, ramp, HAS_SPAN, CAUSAL, BLOCK)
        tl.store(Out + 2, qlo)
        tl.store(Out + 3, qhi)

    return windows_kernel


@pytest.mark.parametrize("block", [1, 16])
@given(w=windows(), first_key=st.integers(0, 39), width=st.integers(1, 16))
@example(w=INTERIOR[0], first_key=17, width=1)
@example(w=INTERIOR[1], first_key=16, width=2)
@example(w=INTERIOR[2], first_key=12, width=1)
def test_triton_windows_hold_the_spec_windows(triton_windows, block, w, first_key, width):
    import torch

    first_key = min(first_key, w["Lk"] - 1)
    for b, offset in enumerate(w["offsets"]):
        for z in w["spans"] or [0.0]:
            one = dict(w, B=1, offsets=[offset], lengths=None if w["lengths"] is None else [w["lengths"][b]],
                       spans=None if w["spans"] is None else [z])
            kv_len = w["Lk"] if w["lengths"] is None else w["lengths"][b]
            stop_key = min(kv_len, first_key + block * width)
            out = torch.zeros(4, dtype=torch.int32)
            triton_windows[(1,)](out, w["i0"], w["i1"], first_key, stop_key, offset, kv_len, w["Lq"], z, w["ramp"],
                                 HAS_SPAN=w["spans"] is not None, CAUSAL=w["causal"], BLOCK=block)
            lo, hi, qlo, qhi = out.tolist()
            spec_lo, spec_hi = _spec_window(one, "float32")
            if spec_hi > spec_lo:  # every key the spec window holds is visited, lo on a tile boundary
                assert lo <= spec_lo and spec_hi <= hi and lo % block == 0 and spec_lo - lo < block
            read = _keys_read(one, _numpy_mask(one, "float32"))
            assert read <= set(range(max(lo, 0), hi))
            if stop_key > first_key:
                reach = None if w["spans"] is None else geometry.reach([z], w["ramp"], "float32")
                q_lo, q_hi = geometry.query_window(first_key, stop_key, w["Lq"], offset=offset, causal=w["causal"],
                                                   reach=reach)
                if q_hi > q_lo:
                    assert qlo <= q_lo and q_hi <= qhi and qlo % block == 0


def test_triton_psi_series_is_the_spec_series():
    """The Triton psi writes PSI_SERIES["float32"] out as literals: they must match."""
    source = (ROOT / "backends" / "triton" / "entmax.py").read_text()
    body = source[source.index("def psi("):]
    body = body[:body.index("\n@")] if "\n@" in body else body
    threshold, terms = precision.PSI_SERIES["float32"]
    assert f"tl.abs(x) < {threshold}" in body
    literals = [float(x) for x in re.findall(r"series = (?:x \* 0\.0|series \* xs) \+ \(([-0-9.e]+)\)", body)]
    assert literals == precision.psi_series_coefficients(terms)
