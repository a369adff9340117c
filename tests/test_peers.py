"""attnspec.conformance.peers: each peer, given attnspec's arguments, computes attnspec's
function where it can express the call (against the float64 reference), refuses with a clear
NotImplementedError where it cannot, and leaves the peer's own failures as they are."""

import warnings

import numpy as np
import pytest

import attnspec
from attnspec.conformance import peers

torch = pytest.importorskip("torch")

B, H, HKV, LQ, LK, D = 2, 4, 2, 5, 7, 8


@pytest.fixture(scope="module")
def qkv():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, LQ, D, generator=g), torch.randn(B, HKV, LK, D, generator=g),
            torch.randn(B, HKV, LK, D, generator=g))


def _reference(qkv, **kwargs):
    q, k, v = (x.double().numpy() for x in qkv)
    return attnspec.reference.attention(q, k, v, **kwargs)


def _close(out, qkv, atol=2e-6, **kwargs):
    np.testing.assert_allclose(np.asarray(out, dtype=np.float64), _reference(qkv, **kwargs), atol=atol, rtol=0)


# the masks of SPEC.md 5.1 in every form: default offset, padded keys, per-batch offsets, GQA
MASKS = [dict(), dict(causal=True), dict(causal=True, key_lengths=np.array([7, 4])),
         dict(causal=True, q_offset=np.array([0, 3])), dict(key_lengths=np.array([6, 7]), q_offset=1, scale=0.5)]


@pytest.mark.parametrize("kwargs", MASKS)
def test_sdpa_is_attnspec_at_alpha_1(qkv, kwargs):
    _close(peers.sdpa(*qkv, **kwargs), qkv, **kwargs)


def test_sdpa_uses_its_own_is_causal_where_it_is_the_same_mask(qkv, monkeypatch):
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    q = qkv[0][:, :, :LQ]
    square = (q, qkv[1][:, :, :LQ], qkv[2][:, :, :LQ])
    peers.sdpa(*square, causal=True)
    peers.sdpa(*qkv, causal=True)  # Lq != Lk: its top-left is_causal would be wrong, so a mask
    assert seen[0]["is_causal"] and seen[0]["attn_mask"] is None
    assert not seen[1]["is_causal"] and seen[1]["attn_mask"].shape == (1, 1, LQ, LK)


@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(causal=True, span=2.0, ramp=1.5),
                                    dict(span=np.array([1.0, 2.0, 3.0, 4.0]), ramp=2.0,
                                         key_lengths=np.array([7, 5]), q_offset=np.array([2, 3]))])
def test_flex_with_the_span_as_log_m_is_attnspec_at_alpha_1(qkv, kwargs):
    pytest.importorskip("torch.nn.attention.flex_attention")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention warns that it is slow
        out = peers.Flex(compile=False)(*qkv, **kwargs)
    _close(out, qkv, **kwargs)


def test_flex_window_is_a_hard_window_not_the_soft_span(qkv):
    pytest.importorskip("torch.nn.attention.flex_attention")
    window = peers.Flex(window=True, compile=False)
    assert not window.same_function and peers.flex.same_function
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = window(*qkv, causal=True, span=1.0, ramp=2.0).numpy()
    # keys with |d| < z + R = 3, weighted equally: softmax over that window (no log m)
    q, k, v = (x.double().numpy() for x in qkv)
    k, v = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    d = np.arange(LQ)[:, None] + (LK - LQ) - np.arange(LK)[None, :]
    s = np.where((d >= 0) & (d < 3), q @ k.transpose(0, 1, 3, 2) / np.sqrt(D), -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(out, (p / p.sum(-1, keepdims=True)) @ v, atol=2e-6)
    assert np.abs(out - _reference(qkv, causal=True, span=1.0, ramp=2.0)).max() > 1e-3


@pytest.mark.parametrize("name, alpha", [("entmax15", 1.5), ("sparsemax", 2.0), ("entmax_bisect", 1.3),
                                         ("entmax_bisect", torch.tensor([1.2, 1.5, 1.7, 2.0]))])
@pytest.mark.parametrize("kwargs", MASKS[1:4])
def test_the_entmax_package_is_attnspec_where_it_runs(qkv, name, alpha, kwargs):
    pytest.importorskip("entmax")
    out = peers.PEERS[name](*qkv, alpha=alpha, **kwargs)
    ref_alpha = alpha.double().numpy() if isinstance(alpha, torch.Tensor) else alpha
    _close(out, qkv, atol=2e-5 if name == "entmax_bisect" else 2e-6, alpha=ref_alpha, **kwargs)


def test_what_a_peer_cannot_express_is_a_clear_refusal(qkv):
    pytest.importorskip("entmax")
    cases = [
        (peers.sdpa, dict(alpha=1.5), "SDPA computes α = 1 only (got α = 1.5)"),
        (peers.sdpa, dict(span=8.0), "SDPA has no soft span"),
        (peers.sdpa, dict(alpha=torch.ones(H, requires_grad=True)), "no α argument"),
        (peers.entmax15, dict(alpha=1.5, span=8.0), "no weighted entmax"),
        (peers.entmax15, dict(alpha=1.0), "entmax.entmax15 computes α = 1.5 only (got α = 1)"),
        (peers.sparsemax, dict(alpha=1.5), "α = 2 only"),
        (peers.entmax_bisect, dict(alpha=1.0), "entmax_bisect needs α > 1"),
        (peers.PEERS["sdpa-flash"], dict(causal=True), "CUDA only"),
    ]
    for peer, kwargs, message in cases:
        assert any(message in r for r in peer.reasons(*qkv, **kwargs)), (peer.name, peer.reasons(*qkv, **kwargs))
        with pytest.raises(NotImplementedError, match=peer.name):
            peer.bind(*qkv, **kwargs)
    # per-head values the peer does run are accepted, whatever array carries them
    assert peers.sdpa.reasons(*qkv, alpha=torch.ones(H)) == []
    assert peers.entmax15.reasons(*qkv, alpha=np.full(H, 1.5)) == []


def test_adasplash_says_what_it_cannot_take(qkv):
    peer = peers.PEERS["adasplash"]
    reasons = " ".join(peer.reasons(*qkv, alpha=1.0, span=3.0, key_lengths=np.array([1, 2])))
    if peer.available():
        assert reasons == peer.available()
        with pytest.raises(ImportError, match="adasplash"):
            peer.bind(*qkv, alpha=1.5)
        return
    for part in ("no span", "α = 1 is softmax", "key_lengths", "Lq = Lk", "CUDA"):
        assert part in reasons


def test_the_peers_own_failures_are_not_repaired(qkv):
    """A row with no allowed key: the entmax package fails on it (deep-spin/entmax#19),
    entmax_bisect with NaN, entmax15 and sparsemax by indexing; the wrapper leaves both as
    they are (attnspec's reference gives zeros)."""
    pytest.importorskip("entmax")
    empty = dict(causal=True, key_lengths=np.array([0, 7]))
    out = peers.entmax_bisect(*qkv, alpha=1.5, **empty)
    assert torch.isnan(out[0]).all() and not torch.isnan(out[1]).any()
    assert np.all(_reference(qkv, alpha=1.5, **empty)[0] == 0)
    with pytest.raises((RuntimeError, IndexError)):
        peers.entmax15(*qkv, alpha=1.5, **empty)


def test_bind_sets_up_once_and_then_runs_on_new_tensors(qkv):
    fn = peers.sdpa.bind(*qkv, causal=True, key_lengths=np.array([7, 4]))
    q2 = qkv[0] * 2
    _close(fn(q2, *qkv[1:]), (q2, *qkv[1:]), causal=True, key_lengths=np.array([7, 4]))


@pytest.mark.parametrize("kwargs", MASKS)
def test_jax_dot_product_attention_is_attnspec_at_alpha_1(qkv, kwargs):
    jnp = pytest.importorskip("jax.numpy")
    jq, jk, jv = (jnp.asarray(x.numpy()) for x in qkv)
    _close(peers.jax_sdpa(jq, jk, jv, **kwargs), qkv, **kwargs)


def test_peers_are_listed_by_name_and_load_nothing_at_import():
    import subprocess
    import sys

    assert set(peers.PEERS) >= {"sdpa", "flex", "entmax15", "entmax_bisect", "sparsemax", "adasplash", "jax-sdpa"}
    with pytest.raises(ValueError, match="unknown peer 'nope'"):
        peers.peer("nope")
    assert 1.5 in peers.entmax_bisect.alphas and 1.0 not in peers.entmax_bisect.alphas
    assert str(peers.entmax_bisect.alphas) == "α in (1, 2]" and str(peers.entmax15.alphas) == "α = 1.5"
    code = ("import sys, attnspec.conformance.peers; "
            "print(sorted(m for m in ('torch', 'jax', 'entmax', 'triton') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"
