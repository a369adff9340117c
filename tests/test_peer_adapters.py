"""Peers as backends (attnspec.conformance.adapters) and the report of how they meet SPEC.md
(attnspec.conformance.peers_report): the suite finds the entmax package's known failures."""

import numpy as np
import pytest

import attnspec
from attnspec.errors import UnsupportedCallError

torch = pytest.importorskip("torch")
pytest.importorskip("entmax")

from attnspec.conformance import adapters, peers_report  # noqa: E402


def test_adapters_are_registered_only_when_asked():
    names = {b.name for b in attnspec.list_backends()}
    assert not any(n.startswith("peer-") for n in names)
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        adapters.backend("nope")


@pytest.fixture
def registered():
    added = []

    def register(name, **kwargs):
        backend = adapters.backend(name, **kwargs)
        attnspec.register_backend(backend, replace=True)
        added.append(backend.name)
        return backend.name

    yield register
    for name in added:
        attnspec.unregister_backend(name)


def _qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, 5, 8, generator=g, dtype=dtype) for _ in range(3))


def test_an_alpha_the_peer_does_not_compute_is_refused_not_substituted(registered):
    name = registered("entmax15")
    q, k, v = _qkv()
    out = attnspec.attention(q, k, v, alpha=1.5, causal=True, backend=name)
    ref = attnspec.reference.attention(*(x.double().numpy() for x in (q, k, v)), alpha=1.5, causal=True)
    np.testing.assert_allclose(out.double().numpy(), ref, atol=1e-5)
    with pytest.raises(UnsupportedCallError, match="supported: α = 1.5"):
        attnspec.attention(q, k, v, alpha=1.2, backend=name)
    with pytest.raises(UnsupportedCallError, match="span"):
        attnspec.attention(q, k, v, alpha=1.5, span=2.0, backend=name)  # no span feature: the dispatcher


def test_bfloat16_alpha_arrays_are_read_for_the_peers_checks(registered):
    name = registered("entmax15")
    q, k, v = _qkv(torch.bfloat16)
    out = attnspec.attention(q, k, v, alpha=torch.full((2,), 1.5, dtype=torch.bfloat16), backend=name)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_the_peers_own_nan_is_reported_as_it_is(registered):
    """An empty row (key_lengths = 0): the reference gives zeros, entmax_bisect NaN (#19)."""
    name = registered("entmax_bisect")
    q, k, v = _qkv()
    out = attnspec.attention(q, k, v, alpha=1.5, key_lengths=torch.tensor([0]), backend=name)
    assert torch.isnan(out).all()


def test_sdpa_passes_where_it_can_express_the_call(tmp_path):
    _, report, why = peers_report.run("sdpa", gradients=True, dtypes=["float32"], cells=["causal", "gqa"],
                                      examples=4, artifacts_dir=str(tmp_path))
    assert why is None and report.passed, str(report)
    assert {c.status for c in report.cells if c.dtype != "-"} == {"pass"}
    assert sum(c.gradient_checks for c in report.cells) > 0


def test_the_entmax_package_is_flagged_for_its_four_known_failures(tmp_path):
    """deep-spin/entmax 1.3: empty rows give NaN or an IndexError (#19); half precision with a
    large row max gives NaN (#30); entmax_bisect's values and dalpha are off near alpha = 1."""
    # (#30 in the NaN-only pass: in half precision the package's inaccuracy fails first, and a
    # failing example shrinks to it)
    runs = [("entmax15", False, "float32", "key_lengths", False), ("entmax_bisect", False, "float16", "entmax", True),
            ("entmax_bisect", False, "float32", "entmax", False), ("entmax_bisect", True, "float32", "entmax", False)]
    results = {}
    for name, gradients, dtype, cell, nan_only in runs:
        backend, report, why = peers_report.run(name, gradients=gradients, dtypes=[dtype], cells=[cell],
                                                nan_only=nan_only,
                                                artifacts_dir=str(tmp_path / f"{name}-{gradients}-{dtype}"))
        assert why is None
        label = "values and gradients" if gradients else "values"
        results.setdefault(name, []).append((label, backend, report, why))
    found = peers_report.known_failures(list(results.items()))
    assert len(found) == 4
    for what, hits in found:
        assert hits, f"the suite missed: {what}"
    text = peers_report.markdown(list(results.items()), "test")
    assert "NOT found" not in text and "deep-spin/entmax #19" in text and "**FAIL**" in text


def test_adasplash_declares_cuda_and_refuses_sizes_it_cannot_take(monkeypatch):
    pytest.importorskip("adasplash")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert adapters.backend("adasplash_no_block_mask").kernels["attention"].capabilities.devices == ("cuda",)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = adapters.backend("adasplash_no_block_mask")
    assert backend.kernels["attention"].capabilities.devices == ("cuda", "cpu")
    assert adapters.backend("adasplash").kernels["attention"].capabilities.devices == ("cuda",)
    attnspec.register_backend(backend, replace=True)
    try:
        small = tuple(torch.randn(1, 2, 16, 16) for _ in range(3))  # crashed the interpreter: refused first
        with pytest.raises(UnsupportedCallError, match="supported under the interpreter"):
            attnspec.attention(*small, alpha=1.5, backend=backend.name)
        ragged = tuple(torch.randn(1, 2, 70, 32) for _ in range(3))
        with pytest.raises(UnsupportedCallError, match="a power of two"):
            attnspec.attention(*ragged, alpha=1.5, backend=backend.name)
    finally:
        attnspec.unregister_backend(backend.name)
