"""The torch-sdpa and torch-decode backends: conformance, the spec's edge semantics SDPA does
not share (empty rows, NaN padding), windowed decode reads, and how selection uses them."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import attnspec  # noqa: E402
import attnspec.conformance as conformance  # noqa: E402
from attnspec import reference  # noqa: E402
from attnspec.backends.torch import decode as torch_decode  # noqa: E402
from cells import assert_every_declared_cell_ran  # noqa: E402


def make(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("backend", ["torch-sdpa", "torch-decode"])
def test_passes_the_conformance_suite(backend, tmp_path):
    report = conformance.check(backend, profile="ci", artifacts_dir=str(tmp_path))
    assert_every_declared_cell_ran(report)
    passed = {c.cell for c in report.cells if c.status == "pass"}
    assert {"causal", "key_lengths", "q_offset", "gqa", "padding_mask", "combined"} <= passed
    if backend == "torch-decode":
        assert {"entmax", "span"} <= passed


def _numpy(kw):
    return {n: (x.numpy() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}


@pytest.mark.parametrize("kw", [
    dict(causal=True, q_offset=torch.tensor([-3, 2])),           # rows before every key: empty
    dict(causal=True, key_lengths=torch.tensor([0, 4])),        # a batch row with no key at all
    dict(key_lengths=torch.tensor([2, 6]), q_offset=-1, causal=True),
    dict(causal=True, q_offset=-2),                              # static offset, empty first rows
])
def test_sdpa_empty_rows_give_zeros_and_nan_padding_never_leaks(kw):
    q, k, v = make(2, 4, 3, 8, seed=1), make(2, 2, 6, 8, seed=2), make(2, 2, 6, 5, seed=3)
    lengths = kw.get("key_lengths")
    if lengths is not None:  # padding keys may hold NaN / Inf
        for b, n in enumerate(lengths.tolist()):
            k[b, :, n:] = float("nan")
            v[b, :, n:] = float("inf")
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = attnspec.attention(*leaves, backend="torch-sdpa", **kw)
    expected = reference.attention(*(x.numpy() for x in (q, k, v)), **_numpy(kw))
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out.detach().numpy(), np.nan_to_num(expected), atol=1e-12)
    grad_out = make(*out.shape, seed=4)
    out.backward(grad_out)
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()
    if lengths is not None:
        for b, n in enumerate(lengths.tolist()):  # masked keys: exactly zero gradients
            assert (leaves[1].grad[b, :, n:] == 0).all() and (leaves[2].grad[b, :, n:] == 0).all()
    # the same gradients as the analytic tiled backward
    ref = [x.clone().requires_grad_(True) for x in (q, k, v)]
    attnspec.attention(*ref, backend="torch", **kw).backward(grad_out)
    for mine, theirs in zip(leaves, ref):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-12, rtol=1e-10)


def test_sdpa_gives_alpha_its_gradient_at_one():
    q, k, v = make(1, 4, 5, 8, seed=1), make(1, 2, 7, 8, seed=2), make(1, 2, 7, 3, seed=3)
    grads = {}
    for backend in ("torch-sdpa", "torch"):
        alpha = torch.ones(4, dtype=torch.float64, requires_grad=True)
        attnspec.attention(q, k, v, alpha=alpha, causal=True, backend=backend).backward(make(1, 4, 5, 3, seed=4))
        grads[backend] = alpha.grad
    assert (grads["torch"] != 0).all()
    torch.testing.assert_close(grads["torch-sdpa"], grads["torch"], atol=1e-12, rtol=1e-10)


def test_sdpa_refuses_what_it_cannot_compute():
    q = make(1, 2, 3, 4)
    with pytest.raises(attnspec.UnsupportedCallError, match="torch-sdpa: feature 'entmax' is not supported"):
        attnspec.attention(q, q, q, alpha=1.5, backend="torch-sdpa")
    with pytest.raises(ValueError, match="alpha = 1 only"):  # the kernel called directly
        attnspec.backends.torch.SDPA.kernel("attention").fn(q, q, q, alpha=1.5)


def test_decode_windows_follow_the_reach_of_each_batch_row():
    # span reach 10 + 2 around positions 100 and 5; causal stops at the row; lengths cut
    spans = torch_decode.windows(1, 1000, [100, 5], [1000, 3], True, 12.0)
    assert spans == [(88, 101), (0, 3)]
    assert torch_decode.windows(2, 50, [30], None, False, 4.0) == [(26, 36)]
    assert torch_decode.windows(1, 50, [-5], None, True, None) == [(0, 0)]


@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_decode_with_span_reads_only_the_window(alpha):
    """Keys beyond every row's reach are never read: NaN there cannot change anything (the
    cost of a span head does not grow with the cache)."""
    B, H, Hkv, Lk, D = 2, 4, 2, 4096, 8
    q, k, v = make(B, H, 2, D, seed=1), make(B, Hkv, Lk, D, seed=2), make(B, Hkv, Lk, D, seed=3)
    offsets = torch.tensor([Lk - 2, 1000])
    kw = dict(alpha=alpha, span=20.0, ramp=4.0, causal=True, q_offset=offsets)
    clean = attnspec.attention(q, k, v, backend="torch", **kw)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, : Lk - 40], v2[0, :, : Lk - 40] = float("nan"), float("nan")
    k2[1, :, :960], v2[1, :, :960] = float("nan"), float("nan")
    k2[1, :, 1002:], v2[1, :, 1002:] = float("nan"), float("nan")
    out = attnspec.attention(q, k2, v2, backend="torch-decode", **kw)
    torch.testing.assert_close(out, clean, atol=1e-12, rtol=1e-10)


def test_decode_without_grad_skips_the_custom_op_and_agrees_with_it():
    q, k, v = make(1, 4, 3, 8, seed=1), make(1, 2, 30, 8, seed=2), make(1, 2, 30, 8, seed=3)
    kw = dict(alpha=1.5, span=4.0, ramp=2.0, causal=True)
    with torch.no_grad():
        fast = attnspec.attention(q, k, v, backend="torch-decode", **kw)
    slow = attnspec.attention(q.requires_grad_(True), k, v, backend="torch-decode", **kw)
    assert slow.grad_fn is not None and fast.grad_fn is None
    # windowed forward (sorted solve) without gradients, the tiled one with them
    torch.testing.assert_close(fast, slow.detach(), atol=1e-13, rtol=1e-12)


def test_selection_prefers_sdpa_for_softmax_and_decode_for_short_blocks():
    q1 = torch.empty(1, 8, 1, 64, device="meta")
    k = torch.empty(1, 2, 8192, 64, device="meta")
    assert attnspec.explain(q1, k, k, causal=True).selected == "torch-sdpa"
    assert attnspec.explain(q1, k, k, alpha=1.5, causal=True).selected == "torch-decode"
    assert attnspec.explain(q1, k, k, span=256.0, causal=True).selected == "torch-decode"
    q64, q65 = torch.empty(1, 8, 64, 64, device="meta"), torch.empty(1, 8, 65, 64, device="meta")
    assert attnspec.explain(q64, k, k, alpha=1.5).selected == "torch-decode"
    decision = attnspec.explain(q65, k, k, alpha=1.5)
    assert decision.selected == "torch"
    assert dict(decision.considered)["torch-decode"] == ["Lq=65 queries (supported: <= 64)"]
    assert attnspec.explain(q65, k, k, alpha=1.5, backend="torch-decode").selected is None


def test_selection_of_padded_calls():
    """A key_padding_mask (batched generation with left padding) no longer sends a call to the
    tiled path: SDPA takes alpha = 1 at every length, torch-decode short blocks of other alpha."""
    k = torch.empty(2, 2, 4096, 64, device="meta")
    mask = torch.ones(2, 4096, dtype=torch.bool, device="meta")
    q1, q64, q65 = (torch.empty(2, 8, n, 64, device="meta") for n in (1, 64, 65))
    q_train = torch.empty(2, 8, 4096, 64, device="meta")
    assert attnspec.explain(q1, k, k, causal=True, key_padding_mask=mask).selected == "torch-sdpa"
    assert attnspec.explain(q_train, k, k, causal=True, key_padding_mask=mask).selected == "torch-sdpa"
    assert attnspec.explain(q1, k, k, alpha=1.5, causal=True, key_padding_mask=mask).selected == "torch-decode"
    assert attnspec.explain(q64, k, k, span=64.0, causal=True, key_padding_mask=mask).selected == "torch-decode"
    assert attnspec.explain(q65, k, k, alpha=1.5, causal=True, key_padding_mask=mask).selected == "torch"
    considered = dict(attnspec.explain(q1, k, k, causal=True, key_padding_mask=mask).considered)
    assert considered["torch-sdpa"] == [] and considered["torch-decode"] == []


@pytest.mark.parametrize("backend", ["torch-sdpa", "torch-decode"])
def test_meta_autocast_and_compile(backend):
    q, k, v = make(2, 4, 3, 8, dtype=torch.float32), make(2, 2, 6, 8, seed=1, dtype=torch.float32), \
        make(2, 2, 6, 5, seed=2, dtype=torch.float32)
    kw = dict(causal=True, key_lengths=torch.tensor([6, 2]),
              key_padding_mask=torch.tensor([[False, True, True, True, True, True], [True, False] + [True] * 4]))
    meta = attnspec.attention(q.to("meta"), k.to("meta"), v.to("meta"), causal=True, backend=backend)
    assert meta.device.type == "meta" and meta.shape == (2, 4, 3, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attnspec.attention(q, k, v, backend=backend, **kw)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, attnspec.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend=backend, **kw))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]

    def loss(q, k, v):
        return attnspec.attention(q, k, v, backend=backend, **kw).square().sum()

    expected = torch.autograd.grad(loss(*leaves), leaves)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for a, b in zip(torch.autograd.grad(compiled(*leaves), leaves), expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [40, 300])  # 300: above PRUNE_ABOVE, only the candidates are sorted
def test_sorted_closed_form_matches_the_iterative_solve(alpha, dtype, n):
    """Weighted rows with masked keys, ties, an empty row and large logits: the exact sorted
    solve of torch-decode's short windows agrees with solve_masked_rows (p and c)."""
    from attnspec.backends.torch import entmax as torch_entmax

    assert torch_decode.PRUNE_ABOVE < 300
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(6, n, generator=g, dtype=torch.float64) * torch.tensor([1, 3, 10, 100, 1e3, 1])[:, None])
    m = torch.rand(6, n, generator=g, dtype=torch.float64)
    s[1, 5:9] = s[1, 4]  # ties
    s[0, torch.rand(n, generator=g) < 0.3] = -torch.inf
    s[5] = -torch.inf  # a row with no key
    m = torch.where(torch.isfinite(s), m, 0.0)
    s, m = s.to(dtype), m.to(dtype)
    for weights in (None, m):
        p, c = torch_decode.sorted_closed_form(s, weights, alpha)
        p_ref, c_ref = torch_entmax.solve_masked_rows(s, weights, torch.full((6, 1), alpha - 1, dtype=dtype))
        tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(p, p_ref, **tol)
        torch.testing.assert_close(c[:5], c_ref[:5], **tol)
        assert (p[5] == 0).all()
        torch.testing.assert_close(p[:5].sum(-1), torch.ones(5, dtype=dtype), **tol)


@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decode_long_windows_match_the_tiled_path(alpha, dtype):
    """Windows of a few hundred keys (the sorted solve prunes them first; alpha 1.3 takes the
    iterative one) agree with the tiled path, with and without span."""
    B, H, Hkv, Lk, D = 2, 4, 2, 1024, 16
    q, k, v = make(B, H, 3, D, seed=1, dtype=dtype) * 3, make(B, Hkv, Lk, D, seed=2, dtype=dtype), \
        make(B, Hkv, Lk, D, seed=3, dtype=dtype)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=1e-4)
    for kw in (dict(span=200.0, ramp=16.0, causal=True), dict(causal=True, key_lengths=torch.tensor([700, 400]))):
        out = attnspec.attention(q, k, v, alpha=alpha, backend="torch-decode", **kw)
        torch.testing.assert_close(out, attnspec.attention(q, k, v, alpha=alpha, backend="torch", **kw), **tol)
