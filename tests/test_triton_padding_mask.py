"""key_padding_mask (SPEC.md 1.1) in the Triton kernels, under the Triton interpreter on CPU
tensors: values and every gradient against the reference at sizes around the interpreter's
16 x 16 tiles (a last partial tile, a tile of masked keys only, left padding, holes, rows with
no readable key), masked keys holding NaN, +-Inf and huge values, and dk = dv = 0 exactly there.

Triton reads TRITON_INTERPRET when the kernels are defined, so this module sets it at import,
as tests/test_triton_backend.py does.
"""

import os
import sys

import numpy as np
import pytest

os.environ["TRITON_INTERPRET"] = "1"
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import attnspec  # noqa: E402
from attnspec import reference  # noqa: E402
from attnspec.conformance.attention import value_bounds  # noqa: E402
from attnspec.conformance.cases import AttentionCase  # noqa: E402
from attnspec.dispatch import registry  # noqa: E402


@pytest.fixture(scope="module")
def backend():
    registry.load("triton")
    module = sys.modules["attnspec.backends.triton"]
    if not module.INTERPRETED:
        pytest.fail("the triton backend was loaded before TRITON_INTERPRET=1 was set; run this module alone")
    return module


def _mask(B, Lk, kind, rng):
    """[B, Lk] bool masks of a few shapes (True: readable)."""
    mask = np.ones((B, Lk), bool)
    if kind == "left":  # left padding of different widths; batch 0 masks the whole first tile
        for b in range(B):
            mask[b, : min(Lk - 1, 17 + 5 * b) if Lk > 17 else Lk // 2 + b] = False
    elif kind == "holes":
        mask[:] = rng.random((B, Lk)) > 0.35
        mask[0, 16:32] = False  # a whole key tile (when Lk > 16)
    elif kind == "mixed":  # left padding in batch 0, holes in the others, one entry with nothing
        mask[0, : Lk // 2] = False
        mask[1:] = rng.random((B - 1, Lk)) > 0.5
        mask[-1] = False
    return mask


def _poison(x, mask):
    """Masked keys of K or V [B, Hkv, Lk, D] hold NaN, +Inf, -Inf and huge finite values."""
    x = x.copy()
    fills = np.array([np.nan, np.inf, -np.inf, 3e38, -1e30])
    for b, j in zip(*np.nonzero(~mask)):
        x[b, :, j] = fills[(b + j) % len(fills)]
    return x


# (B, H, Hkv, Lq, Lk, mask kind, call kwargs): ragged lengths around the 16-wide tiles.
CASES = {
    "softmax causal left Lk=33": (2, 2, 2, 33, 33, "left", dict(alpha=1.0, causal=True)),
    "entmax causal left Lk=17 q_offset": (2, 2, 1, 9, 17, "left",
                                          dict(alpha=np.array([1.5, 2.0]), causal=True, q_offset=np.array([8, 3]))),
    "entmax holes Lk=65 gqa span": (2, 4, 2, 20, 65, "holes",
                                    dict(alpha=np.array([1.0, 1.3, 1.7, 2.0]), span=np.array([3.4, 9.6, 40.2, 0.3]),
                                         ramp=4.0, q_offset=np.array([40, 10]))),
    "softmax span holes Lk=15": (2, 3, 3, 15, 15, "holes", dict(alpha=1.0, span=6.5, ramp=2.0, causal=True)),
    "entmax mixed key_lengths Lk=33": (3, 2, 1, 17, 33, "mixed",
                                       dict(alpha=np.array([1.2, 1.0]), span=np.array([12.0, 5.0]), ramp=3.0,
                                            key_lengths=np.array([33, 20, 30]))),
    "entmax mixed causal Lk=65": (3, 2, 2, 33, 65, "mixed",
                                  dict(alpha=1.5, causal=True, key_lengths=np.array([65, 50, 7]))),
}

#: Cases with rows that read no key: causal rows before the end of the left padding, and a
#: batch entry whose keys are all masked.
WITH_EMPTY_ROWS = ("softmax causal left Lk=33", "entmax mixed key_lengths Lk=33", "entmax mixed causal Lk=65")


def _run(name, seed=1):
    B, H, Hkv, Lq, Lk, kind, kw = CASES[name]
    rng = np.random.default_rng(seed)
    f32 = lambda x: x.astype(np.float32).astype(np.float64)  # noqa: E731
    q, k, v = f32(rng.normal(size=(B, H, Lq, 16)) * 2), f32(rng.normal(size=(B, Hkv, Lk, 16))), \
        f32(rng.normal(size=(B, Hkv, Lk, 8)))
    dout = f32(rng.normal(size=(B, H, Lq, 8)))
    mask = _mask(B, Lk, kind, rng)
    kw = {n: (f32(x) if isinstance(x, np.ndarray) and x.dtype == np.float64 else x) for n, x in kw.items()}
    # Masked entries zeroed for the reference and the tolerances; the kernels get them poisoned.
    k = np.where(mask[:, None, :, None], k, 0.0)
    v = np.where(mask[:, None, :, None], v, 0.0)
    want = reference.attention_vjp(q, k, v, dout, key_padding_mask=mask, **kw)
    out_ref = reference.attention(q, k, v, key_padding_mask=mask, **kw)
    bounds = value_bounds(AttentionCase(q, k, v, dout, key_padding_mask=mask, **kw), "float32", out_ref, want)

    leaves = [torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (q, _poison(k, mask), _poison(v, mask))]
    tkw = {n: torch.tensor(x) for n, x in kw.items() if isinstance(x, np.ndarray) and x.dtype != np.float64}
    params = {}
    for n in ("alpha", "span"):
        if n in kw:
            params[n] = torch.tensor(kw[n], dtype=torch.float32).requires_grad_(True)
    other = {n: x for n, x in kw.items() if n not in tkw and n not in params}
    out = attnspec.attention(*leaves, key_padding_mask=torch.tensor(mask), backend="triton", **tkw, **params, **other)
    out.backward(torch.tensor(dout, dtype=torch.float32))
    got = dict(q=leaves[0].grad, k=leaves[1].grad, v=leaves[2].grad, **{n: p.grad for n, p in params.items()})
    return mask, out, out_ref, got, want, bounds


@pytest.mark.parametrize("name", list(CASES))
def test_values_and_gradients_match_the_reference(backend, name):
    mask, out, out_ref, got, want, bounds = _run(name)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.detach().double().numpy(), out_ref, rtol=0, atol=bounds["out"])
    for n, g in got.items():
        assert torch.isfinite(g).all(), "d" + n
        np.testing.assert_allclose(g.double().numpy(), getattr(want, "d" + n), rtol=0, atol=bounds[n],
                                   err_msg="d" + n)
    masked = torch.tensor(~mask)[:, None, :].expand(got["k"].shape[:3])
    assert (got["k"][masked] == 0).all() and (got["v"][masked] == 0).all()
    # SPEC.md 5.3: a row with no readable key outputs zeros and passes no gradient to q, exactly.
    empty = torch.tensor(np.all(out_ref == 0, axis=-1) & np.all(want.dq == 0, axis=-1))
    assert (out.detach()[empty] == 0).all() and (got["q"][empty] == 0).all()
    if name in WITH_EMPTY_ROWS:
        assert 0 < int(empty.sum()) < empty.numel()


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_an_all_true_mask_changes_nothing(backend, alpha):
    """A mask of all True, and a mask equal to key_lengths, give the unmasked kernels' results
    bit for bit: the masked path adds only exact zeros."""
    g = torch.Generator().manual_seed(4)
    B, H, Lq, Lk = 2, 2, 20, 37
    q = torch.randn(B, H, Lq, 16, generator=g, requires_grad=True)
    k = torch.randn(B, 1, Lk, 16, generator=g, requires_grad=True)
    v = torch.randn(B, 1, Lk, 8, generator=g, requires_grad=True)
    dout = torch.randn(B, H, Lq, 8, generator=g)
    lengths = torch.tensor([37, 21])
    kw = dict(alpha=alpha, span=9.0, ramp=3.0, causal=True, backend="triton")

    def run(**extra):
        q.grad = k.grad = v.grad = None
        out = attnspec.attention(q, k, v, **kw, **extra)
        out.backward(dout)
        return out.detach(), q.grad, k.grad, v.grad

    plain = run()
    for got, want in zip(run(key_padding_mask=torch.ones(B, Lk, dtype=torch.bool)), plain):
        assert torch.equal(got, want)
    by_length = run(key_lengths=lengths)
    as_mask = run(key_padding_mask=torch.arange(Lk)[None, :] < lengths[:, None])
    for got, want in zip(as_mask, by_length):
        assert torch.equal(got, want)


def test_masked_tiles_hold_no_support_in_the_tile_map(backend):
    """A key tile of masked keys only is never marked in the tile map (the backward skips it),
    and sum p is 1 on rows with a readable key and 0 on the others."""
    g = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 2, 24, 16, generator=g), torch.randn(2, 2, 48, 16, generator=g), \
        torch.randn(2, 2, 48, 16, generator=g)
    mask = torch.ones(2, 48, dtype=torch.bool)
    mask[0, :32] = False  # key tiles 0 and 1 of batch 0
    mask[1, 16:32] = False  # key tile 1 of batch 1
    k[~mask[:, None, :].expand(2, 2, 48)] = float("nan")
    for alpha in (1.0, 1.5):
        stats = backend.solve_statistics(q, k, v, alpha=alpha, key_padding_mask=mask)
        assert stats["tiles"].shape[-1] == 3
        assert (stats["tiles"][0, :, :, :2] == 0).all() and (stats["tiles"][1, :, :, 1] == 0).all()
        assert (stats["tiles"][:, :, :, 2] == 1).all() and (stats["tiles"][1, :, :, 0] == 1).all()
        torch.testing.assert_close(stats["psum"], torch.ones_like(stats["psum"]), rtol=0, atol=4 * 2.0**-23 * 48)
        assert torch.isfinite(stats["out"]).all()
