"""The PyTorch backend: the conformance suite, gradcheck, custom-op integration (meta tensors,
torch.compile, autocast), double backward, dispatch limits."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import attnspec  # noqa: E402
import attnspec.conformance as conformance  # noqa: E402

SPAN = [1.3, 2.7, 0.4, 5.2]
RAMP = 1.75  # no integer distance sits on a kink z or z + R


def inputs(dtype=torch.float64, B=2, H=4, Hkv=2, Lq=5, Lk=7, D=8, Dv=3, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    q, k, v = make(B, H, Lq, D), make(B, Hkv, Lk, D), make(B, Hkv, Lk, Dv)
    return [x.requires_grad_(requires_grad) for x in (q, k, v)]


def test_torch_eager_passes_the_conformance_suite(tmp_path):
    report = conformance.check("torch-eager", artifacts_dir=str(tmp_path))
    assert report.passed, str(report)
    assert {c.dtype for c in report.cells if c.status == "pass"} == {"float16", "bfloat16", "float32", "float64"}


def test_gradcheck_all_inputs_float64():
    q, k, v = inputs(requires_grad=True, Lq=3, Lk=6, D=4, Dv=2)
    alpha = torch.tensor([1.05, 1.3, 1.5, 1.9], dtype=torch.float64, requires_grad=True)
    span = torch.tensor(SPAN, dtype=torch.float64, requires_grad=True)
    lengths, offsets = torch.tensor([6, 5]), torch.tensor([2, -1])

    def fn(q, k, v, alpha, span):
        return attnspec.attention(q, k, v, alpha=alpha, span=span, ramp=RAMP, causal=True,
                                  key_lengths=lengths, q_offset=offsets, backend="torch-eager")

    assert torch.autograd.gradcheck(fn, (q, k, v, alpha, span), eps=1e-6, atol=1e-7, fast_mode=True)
    # scalar alpha and span: gradients summed over heads, shape []
    a = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    z = torch.tensor(3.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, a, z: attnspec.attention(q, k.detach(), v.detach(), alpha=a, span=z, ramp=2.25), (q, a, z),
        fast_mode=True)


def test_meta_tensors_give_shapes_without_computing():
    q, k, v = (x.to("meta") for x in inputs(torch.float32, Dv=5))
    out = attnspec.attention(q, k, v, alpha=1.5, span=torch.full((4,), 3.0, device="meta"), causal=True,
                             backend="torch-eager")
    assert out.device.type == "meta" and out.shape == (2, 4, 5, 5) and out.dtype == torch.float32


@pytest.mark.parametrize("compiler", ["aot_eager"])
def test_torch_compile_fullgraph_matches_eager(compiler):
    q, k, v = inputs(torch.float32, requires_grad=True)
    alpha = torch.tensor([1.0, 1.2, 1.5, 2.0], requires_grad=True)
    span = torch.tensor(SPAN, requires_grad=True)

    def fn(q, k, v, alpha, span):
        return attnspec.attention(q, k, v, alpha=alpha, span=span, ramp=RAMP, causal=True).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    eager_loss = fn(q, k, v, alpha, span)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v, alpha, span))
    loss = compiled(q, k, v, alpha, span)
    grads = torch.autograd.grad(loss, (q, k, v, alpha, span))
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_torch_compile_with_inductor():
    q, k, v = inputs(torch.float32, B=1, H=2, Hkv=2, Lq=4, Lk=4, D=4, Dv=4)
    fn = torch.compile(lambda q, k, v: attnspec.attention(q, k, v, alpha=1.5, causal=True), fullgraph=True)
    torch.testing.assert_close(fn(q, k, v), attnspec.attention(q, k, v, alpha=1.5, causal=True))


def test_autocast_runs_in_the_autocast_dtype():
    q, k, v = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attnspec.attention(q, k, v, alpha=1.5, causal=True)
    assert out.dtype == torch.bfloat16
    expected = attnspec.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), alpha=1.5, causal=True)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend, op", [("torch-eager", "eager_attention"), ("torch-decode", "decode_attention")])
def test_double_backward_raises_a_clear_error(backend, op):
    q, k, v = inputs(requires_grad=True)
    out = attnspec.attention(q, k, v, alpha=1.5, backend=backend)
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match=f"double backward through attnspec::{op} is not supported"):
        dq.sum().backward()


def test_eager_path_declares_a_size_cap():
    q = torch.empty(1, 4, 4096, 8, device="meta")
    k = torch.empty(1, 4, 4096, 8, device="meta")
    decision = attnspec.explain(q, k, k, alpha=1.5)
    assert decision.selected == "torch"  # the tiled path takes what the eager one refuses
    reasons = dict(decision.considered)["torch-eager"]
    assert reasons == ["B*H*Lq*Lk=67108864 score entries (supported: <= 16777216)"]
    assert attnspec.explain(q, k, k, backend="torch-eager").selected is None  # the cap holds by name too
    # automatic selection gives it tiny calls only (the tiled path is faster above); by name
    # it runs up to its cap. (Entmax calls of more than 64 queries: below, torch-decode.)
    q = torch.empty(1, 1, 65, 8, device="meta")
    small = torch.empty(1, 1, 63, 8, device="meta")
    assert attnspec.explain(q, small, small, alpha=1.5).selected == "torch-eager"
    larger = torch.empty(1, 1, 67, 8, device="meta")
    decision = attnspec.explain(q, larger, larger, alpha=1.5)
    assert decision.selected == "torch"
    assert dict(decision.considered)["torch-eager"] == [
        "B*H*Lq*Lk=4355 score entries: automatic selection gives it <= 4096 (runs larger calls when named)"]
    assert attnspec.explain(q, larger, larger, alpha=1.5, backend="torch-eager").selected == "torch-eager"


def test_empty_rows_and_nan_padding_give_zero_not_nan():
    q, k, v = inputs(torch.float32, requires_grad=True)
    with torch.no_grad():
        k[1, :, 3:] = float("nan")
        v[1, :, 3:] = float("inf")
    out = attnspec.attention(q, k, v, alpha=1.5, causal=True, key_lengths=torch.tensor([0, 3]))
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[0] == 0).all()
    assert (k.grad[1, :, 3:] == 0).all() and (v.grad[1, :, 3:] == 0).all()


def test_values_match_the_reference_on_cpu_float64():
    q, k, v = inputs()
    kw = dict(alpha=np.array([1.0, 1.3, 1.5, 2.0]), span=np.array(SPAN), ramp=RAMP, causal=True)
    out = attnspec.attention(q, k, v, alpha=torch.tensor(kw["alpha"]), span=torch.tensor(kw["span"]),
                             ramp=RAMP, causal=True)
    ref = attnspec.reference.attention(q.numpy(), k.numpy(), v.numpy(), **kw)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-14)


def test_torch_tiled_passes_the_conformance_suite(tmp_path):
    report = conformance.check("torch", artifacts_dir=str(tmp_path))
    assert report.passed, str(report)
    # Every attention cell ran examples at tile-crossing sizes, values and every gradient.
    attention = [c for c in report.cells if c.op == "attention"]
    assert all(c.tile_crossing >= 1 for c in attention)
    assert all(c.gradients_checked[:4] == ["q", "k", "v", "alpha"] for c in attention)


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Force the tiled backend to use tiles of a few rows, so that small inputs cross tiles."""
    import importlib

    tiled = importlib.import_module("attnspec.backends.torch.attention")
    monkeypatch.setattr(tiled, "BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(tiled, "SOFTMAX_BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(tiled, "MIN_TILE", 3)


def test_tiled_with_many_tiles_passes_the_conformance_suite(tiny_tiles, tmp_path):
    # Tiles of a few rows: the small shapes cross them already (large ones would be thousands).
    report = conformance.check("torch", dtypes=["float32", "float64"], artifacts_dir=str(tmp_path),
                               sizes=conformance.Sizes(large_share=0.0))
    assert report.passed, str(report)


@pytest.mark.parametrize("kw", [
    dict(alpha=1.5, span=torch.tensor([3.5, 9.25, 0.5, 20.0]), ramp=2.0, causal=True),
    dict(alpha=torch.tensor([1.0, 1.2, 1.7, 2.0]), span=6.5, ramp=4.0, causal=False),
    dict(alpha=1.3, causal=True, key_lengths=torch.tensor([40, 17]), q_offset=torch.tensor([3, -5])),
    # every head at alpha = 1 takes the softmax paths (forward and backward), dalpha included
    dict(alpha=torch.ones(4), span=torch.tensor([3.5, 9.25, 0.5, 20.0]), ramp=2.0, causal=True,
         key_lengths=torch.tensor([40, 17])),
    dict(alpha=torch.full((4,), 1.5), span=torch.tensor([3.5, 9.25, 0.5, 20.0]), ramp=2.0, causal=True),
])
def test_tiled_matches_eager_across_tiles_and_windows(tiny_tiles, kw):
    q, k, v = inputs(torch.float64, Lq=37, Lk=45, requires_grad=True)
    kw = {n: x.double().requires_grad_(True) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
          for n, x in kw.items()}
    wrt = [q, k, v] + [x for x in kw.values() if isinstance(x, torch.Tensor) and x.requires_grad]
    out = attnspec.attention(q, k, v, backend="torch", **kw)
    expected = attnspec.attention(q, k, v, backend="torch-eager", **kw)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, wrt, go)
    expected_grads = torch.autograd.grad(expected, wrt, go)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_tiled_skips_keys_out_of_reach():
    """A span-z causal head reads only the window [i + o - z - R, i + o] of each tile."""
    import importlib

    tiled = importlib.import_module("attnspec.backends.torch.attention")
    offsets = torch.tensor([0, 0])
    j0, j1 = tiled._window(1000, 1016, 4096, torch.tensor([100.0]), 32.0, True, None, offsets)
    assert (j0, j1) == (1000 - 132 + 1, 1016)  # the key at |d| = z + R has m = 0
    j0, j1 = tiled._window(0, 16, 4096, None, 32.0, False, torch.tensor([50, 10]), offsets)
    assert (j0, j1) == (0, 50)


# --- stand-alone entmax and span_mask (both torch backends share one implementation) ---------


def test_standalone_entmax_gradcheck_in_x_alpha_and_weights():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    # per-row alpha on axis 1 (size 1 there), away from 1 and 2 where one-sided limits apply
    alpha = torch.tensor([[[1.2]], [[1.5]], [[1.8]]], dtype=torch.float64).expand(3, 1, 6).clone()
    alpha.requires_grad_(True)
    # weights above 1 in some rows exercise the heavy-weight rescaling (SPEC.md 2.5)
    weights = (torch.rand(3, 5, 6, generator=g, dtype=torch.float64) * 2.5 + 0.05).requires_grad_(True)

    def fn(x, alpha, weights):
        return attnspec.entmax(x, alpha, axis=1, weights=weights, backend="torch")

    assert torch.autograd.gradcheck(fn, (x, alpha, weights), eps=1e-6, atol=1e-7)


def test_standalone_entmax_matches_reference_including_edge_rows():
    x = np.array([
        [-np.inf, -np.inf, -np.inf, -np.inf],    # all -inf: zeros, not NaN
        [-3e4, -3e4 + 1.0, -3e4 + 2.0, -3e4],     # very negative (the entmax package's fp16 NaN)
        [50.0, 0.0, -1.0, 0.5],                   # peaked
        [0.3, np.nan, -np.inf, 1.0],              # an allowed NaN poisons the row
    ])
    for alpha in (1.0, 1.25, 1.5, 2.0):
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            xt = torch.tensor(x).to(dtype)
            expected = attnspec.reference.entmax(xt.double().numpy(), alpha)  # on the rounded input
            out = attnspec.entmax(xt, alpha, backend="torch")
            assert out.dtype == dtype
            got = out.double().numpy()
            assert np.array_equal(np.isnan(got), np.isnan(expected)), (alpha, dtype)
            finite = ~np.isnan(expected)
            tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
            np.testing.assert_allclose(got[finite], expected[finite], atol=tol)


def test_standalone_entmax_under_torch_compile():
    x = torch.randn(4, 9, dtype=torch.float32)
    alpha = torch.full((4, 1), 1.4)
    fn = torch.compile(lambda x, a: attnspec.entmax(x, a), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x, alpha), attnspec.entmax(x, alpha, backend="torch"))


def test_standalone_span_mask_values_and_kink_gradients():
    span = torch.tensor([0.0, 2.0, 3.5], dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([0, 3])
    m = attnspec.span_mask(4, 6, span, 2.0, q_offset=offsets, backend="torch")
    expected = attnspec.reference.span_mask(4, 6, span.detach().numpy(), 2.0, q_offset=offsets.numpy())
    assert m.shape == (2, 3, 4, 6)
    np.testing.assert_array_equal(m.detach().numpy(), expected)
    grad = torch.linspace(-1, 1, m.numel(), dtype=torch.float64).reshape(m.shape)
    m.backward(grad)
    # integer span and ramp put many distances exactly on the kinks: the gradient there is 0,
    # as in the reference (autodiff through clamp would count them)
    want = attnspec.reference.span_mask_vjp(4, 6, span.detach().numpy(), 2.0, grad.numpy(), q_offset=offsets.numpy())
    np.testing.assert_allclose(span.grad.numpy(), want, rtol=1e-12, atol=1e-12)


def test_scale_or_ramp_requiring_grad_is_refused_not_silently_dropped():
    q, k, v = inputs(torch.float64)
    for name, value in (("scale", 0.5), ("ramp", 2.0)):
        with pytest.raises(NotImplementedError, match=name):
            attnspec.attention(q, k, v, span=3.0, **{name: torch.tensor(value, dtype=torch.float64, requires_grad=True)})


# --- the tiled forward's pieces: tiles, the closed-form lower bound, Newton from below --------


@pytest.mark.parametrize("kw", [
    dict(causal=True),
    dict(causal=False, span=torch.tensor([40.0, 3.0]), ramp=8.0),
    dict(causal=True, span=torch.tensor([40.0]), ramp=8.0, key_lengths=torch.tensor([300, 90]),
         q_offset=torch.tensor([0, 7])),
    dict(causal=True, key_lengths=torch.tensor([300, 90]), q_offset=torch.tensor([5, -20])),
])
def test_tiles_cover_every_row_once_within_the_block_budget(monkeypatch, kw):
    import importlib

    tiled = importlib.import_module("attnspec.backends.torch.attention")
    monkeypatch.setattr(tiled, "BLOCK_ELEMENTS", 2 * 4 * 3000)  # 3000 elements per (batch, head)
    args = dict(span=None, ramp=0.0, causal=False, key_lengths=None, q_offset=torch.tensor([0, 0]))
    args.update(kw)
    Lq, Lk = 333, 350
    tiles = list(tiled._tiles(2, 4, Lq, Lk, **args))
    heights = set()
    covered = []
    for i0, i1, j0, j1, masked_from in tiles:
        assert (j0, j1) == tiled._window(i0, i1, Lk, **args)
        assert j0 <= masked_from <= j1
        if args["span"] is None:  # keys before masked_from are allowed for every row of the tile
            for b, offset in enumerate(args["q_offset"].tolist()):
                for i in range(i0, i1):
                    limit = j1 if not args["causal"] else i + offset + 1
                    if args["key_lengths"] is not None:
                        limit = min(limit, int(args["key_lengths"][b]))
                    assert masked_from <= max(j0, limit)
        assert (i1 - i0) * (j1 - j0) <= 3000 or i1 - i0 <= tiled.MIN_TILE
        covered.extend(range(i0, i1))
        heights.add(i1 - i0)
    skipped = sorted(set(range(Lq)) - set(covered))
    assert covered == sorted(covered) and len(covered) == len(set(covered))
    for i in skipped:  # only rows that may read no key at all are left out
        assert tiled._window(i, i + 1, Lk, **args)[1] <= tiled._window(i, i + 1, Lk, **args)[0]
    if args["causal"] and args["span"] is None:
        assert len(heights) > 2  # early causal rows read few keys: their tiles are taller


def _exact_c(s, m, eps):
    """c of weighted entmax rows in float64 by the reference (p = m (1 + eps (s - c))^(1/eps))."""
    ref = attnspec.reference.entmax(s.numpy(), 1 + eps, axis=-1, weights=m.numpy())
    # any key with p > 0 gives c back: c = s - ((p / m)^eps - 1) / eps
    j = ref.argmax(-1)[..., None]
    p = np.take_along_axis(ref, j, -1)
    return np.take_along_axis(s.numpy(), j, -1) - ((p / np.take_along_axis(m.numpy(), j, -1)) ** eps - 1) / eps


@pytest.mark.parametrize("alpha", [1.05, 1.5, 2.0])
@pytest.mark.parametrize("weights", [None, "span", "random"])
def test_lower_bound_is_below_c_and_newton_from_below_reaches_it(alpha, weights):
    import importlib

    E = importlib.import_module("attnspec.backends.torch.entmax")
    g = torch.Generator().manual_seed(7)
    s = 2.0 * torch.randn(64, 700, generator=g, dtype=torch.float64)
    s[:, 650:] = -torch.inf  # keys not allowed (some chunks entirely)
    s[3] = -torch.inf  # a row with no key
    s[4, 10] = 40.0  # a peaked row: one key takes everything
    if weights == "span":  # soft span weights: 1 inside, a ramp of 32 keys, 0 beyond
        z = torch.rand(64, 1, generator=g, dtype=torch.float64) * 600
        m = ((32 + z - (649 - torch.arange(700, dtype=torch.float64))) / 32).clamp(0, 1)
    elif weights == "random":  # adversarial: any weight in (0, 1] anywhere
        m = torch.rand(64, 700, generator=g, dtype=torch.float64) * 0.99 + 0.01
    else:
        m = torch.ones(64, 700, dtype=torch.float64)
    s = torch.where(m > 0, s, -torch.inf)
    m = torch.where(torch.isfinite(s), m, 0.0)
    m_arg = None if weights is None else m
    eps = torch.full((64, 1), alpha - 1, dtype=torch.float64)
    chunk_top, chunk_weight = E._chunk_maxima(s, m_arg)
    top = chunk_top.amax(-1, keepdim=True)
    assert torch.equal(top, s.amax(-1, keepdim=True))
    top = torch.where(torch.isfinite(top), top, 0.0)
    bound = top + E._lower_bound(chunk_top - top, chunk_weight, eps)
    rows = torch.isfinite(s).any(-1)
    exact = torch.from_numpy(_exact_c(s[rows], m[rows], alpha - 1))
    assert (bound[rows] <= exact + 1e-12).all()
    p, _ = E.solve_masked_rows(s, m_arg, eps)
    if weights != "random":  # useful: few keys besides the support survive the test s > c0 - 1/eps
        candidates = (s > bound - 1 / eps).sum(-1)[rows]
        assert (candidates <= 4 * (p > 0).sum(-1)[rows]).all()
    shifted = torch.where(torch.isfinite(s), s - top, -torch.inf)
    c, converged = E._newton_from_below(shifted, m_arg, eps, bound - top, 80)
    assert converged
    c = top + c
    torch.testing.assert_close(c[rows], exact, rtol=0, atol=1e-12)
    # the unnormalised sum, not p / sum p, shows whether c is right
    torch.testing.assert_close(p.sum(-1)[rows], torch.ones(int(rows.sum()), dtype=torch.float64), rtol=0, atol=1e-12)
    assert (p[~rows] == 0).all()


def test_the_bracketed_fallback_takes_over_when_newton_from_below_runs_out_of_steps(monkeypatch):
    import importlib

    E = importlib.import_module("attnspec.backends.torch.entmax")
    g = torch.Generator().manual_seed(8)
    s = 3.0 * torch.randn(32, 500, generator=g, dtype=torch.float64)
    s[5] = -torch.inf  # a row with no key
    eps = torch.full((32, 1), 0.5, dtype=torch.float64)
    expected, c_expected = E.solve_masked_rows(s, None, eps)
    original, calls = E._bracketed, []

    def bracketed(*args):
        calls.append(1)
        return original(*args)

    # one Newton step per stage: too few to converge, so the fallback must finish the solve
    monkeypatch.setattr(E, "PRUNE_AFTER", 1)
    monkeypatch.setattr(E, "ITERATIONS", {torch.float64: 1, torch.float32: 1})
    monkeypatch.setattr(E, "_bracketed", bracketed)
    p, c = E.solve_masked_rows(s, None, eps)
    assert calls
    torch.testing.assert_close(c, c_expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-12)
