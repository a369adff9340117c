"""The per-block operations of SPEC.md section 10 (attnspec.reference.partial), combined over
ragged key blocks, give the reference attention's output and gradients: the definition of each
piece is tied to the definition of the whole."""

import numpy as np
import pytest

from attnspec import reference
from attnspec.reference import partial as ref


@pytest.mark.parametrize("seed", range(6))
def test_blocks_combine_to_the_reference_attention(seed):
    rng = np.random.default_rng(seed)
    B, H, Hkv, L, D, Dv = 2, 4, 2, 11, 3, 2
    q, k = rng.normal(size=(B, H, L, D)), rng.normal(size=(B, Hkv, L, D))
    v, dout = rng.normal(size=(B, Hkv, L, Dv)), rng.normal(size=(B, H, L, Dv))
    alpha = np.array([1.0, 1.5, 2.0, 1.3])
    span = None if seed % 2 else np.array([2.25, 5.5, 20.75, 3.5])
    causal = seed % 3 == 0
    key_lengths = np.array([L, 8])
    mask = rng.random((B, L)) < 0.7
    mask[1, :4] = False  # left padding
    valid = mask & (np.arange(L)[None] < key_lengths[:, None])
    k = np.where(valid[:, None, :, None], k, np.nan)  # never read
    v = np.where(valid[:, None, :, None], v, np.nan)
    offsets = np.array([0, 2])
    kw = dict(alpha=alpha, span=span, ramp=2.0, causal=causal, key_lengths=key_lengths, q_offset=offsets,
              scale=0.5, key_padding_mask=mask)
    out = reference.attention(q, k, v, **kw)
    grads = reference.attention_vjp(q, k, v, dout, **kw)
    eps = (alpha - 1)[None, :, None, None]
    blocks = [(0, 3), (3, 4), (4, L)]

    def scores(a, b, c0, c1):
        return ref.block_scores(q[:, :, a:b], k[:, :, c0:c1], v[:, :, c0:c1], a, c0, span, 2.0, causal, key_lengths,
                                offsets, 0.5, mask[:, c0:c1])

    c = ref.normaliser(scores(0, L, 0, L), eps)
    got = np.zeros_like(out)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dalpha, dspan = np.zeros(H), np.zeros(H)
    for a, b in blocks:
        parts = [scores(a, b, c0, c1) for c0, c1 in blocks]
        # the bracket of SPEC.md 2.4 from the blocks' bounds holds c; sum p = 1 at c
        top = np.max([ref.row_bounds(p, eps)[0] for p in parts], 0)
        lone = np.max([ref.row_bounds(p, eps)[2] for p in parts], 0)
        lse = np.logaddexp.reduce([ref.row_bounds(p, eps)[3] for p in parts], 0)
        rows = c[:, :, a:b]
        readable = np.isfinite(top)
        entmax_rows = readable & (eps > 0)
        assert np.all(lone[entmax_rows] <= rows[entmax_rows] + 1e-12)
        np.testing.assert_allclose(np.where(readable & (eps == 0), lse, 0), np.where(readable & (eps == 0), rows, 0),
                                   atol=1e-12)
        sum_p = sum(ref.row_sums(p, eps, rows)[0] for p in parts)
        np.testing.assert_allclose(sum_p, readable.astype(float), atol=1e-12)
        pv = sum(ref.weighted_values(p, eps, rows)[0] for p in parts)
        np.testing.assert_allclose(pv, out[:, :, a:b], atol=1e-12)
        wv = sum(ref.weighted_values(p, eps, rows)[1] for p in parts)
        wsum = sum(ref.weighted_values(p, eps, rows)[2] for p in parts)
        gbar = ref.gbar(dout[:, :, a:b], wv, wsum)
        for (c0, c1), p in zip(blocks, parts):
            g = ref.backward_block(p, eps, rows, gbar, dout[:, :, a:b], 0.5, 2.0, True)
            dq[:, :, a:b] += g[0]
            dk[:, :, c0:c1] += g[1]
            dv[:, :, c0:c1] += g[2]
            dalpha += g[3]
            if span is not None:
                dspan += g[4]
        # alpha = 1 heads: the online merge of the blocks' softmax results
        lse_m, out_m = ref.softmax_block(parts[0])
        for p in parts[1:]:
            lse_m, out_m = ref.merge_softmax(lse_m, out_m, *ref.softmax_block(p))
        np.testing.assert_allclose(out_m[:, 0], out[:, 0, a:b], atol=1e-12)
        got[:, :, a:b] = pv
    np.testing.assert_allclose(dq, grads.dq, atol=1e-12)
    np.testing.assert_allclose(dk, grads.dk, atol=1e-12)
    np.testing.assert_allclose(dv, grads.dv, atol=1e-12)
    assert np.all(dk[~np.broadcast_to(valid[:, None, :, None], dk.shape)] == 0)  # keys that do not exist
    np.testing.assert_allclose(dalpha, grads.dalpha, atol=1e-11)
    if span is not None:
        np.testing.assert_allclose(dspan, grads.dspan, atol=1e-11)
