"""key_padding_mask (SPEC.md 1.1) on every backend: values and gradients equal the reference,
masked keys may hold NaN and get dk = dv = 0 exactly, a backend without the feature is passed
over with its reason."""

import importlib

import numpy as np
import pytest

import attnspec
import attnspec.reference as ref

B, H, Hkv, Lq, Lk, D = 2, 4, 2, 5, 9, 8
SPAN = np.array([1.3, 2.7, 0.4, 5.2])


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, H, Lq, D))
    k = rng.normal(size=(B, Hkv, Lk, D))
    v = rng.normal(size=(B, Hkv, Lk, D))
    mask = np.ones((B, Lk), bool)
    mask[0, :3] = False  # left padding
    mask[1, [2, 6]] = False  # holes
    k[~mask[:, None, :].repeat(Hkv, 1)] = np.nan
    v[~mask[:, None, :].repeat(Hkv, 1)] = np.nan
    go = rng.normal(size=(B, H, Lq, D))
    return q, k, v, mask, go


CONFIGS = [
    dict(alpha=1.0, causal=True),
    dict(alpha=1.5, span=SPAN, ramp=1.75, causal=True, q_offset=np.array([4, 2])),
    dict(alpha=np.array([1.0, 1.3, 1.6, 2.0]), span=3.5, ramp=2.0, key_lengths=np.array([9, 7])),
    dict(alpha=1.2, causal=True, q_offset=np.array([-2, 4])),  # empty rows in batch 0
]


def _expected(q, k, v, mask, go, kw):
    out = ref.attention(q, k, v, key_padding_mask=mask, **kw)
    grads = ref.attention_vjp(q, k, v, go, key_padding_mask=mask, **kw)
    return out, grads


@pytest.mark.parametrize("config", range(len(CONFIGS)))
@pytest.mark.parametrize("backend", ["torch", "torch-eager", "torch-decode"])
def test_torch_backends(backend, config):
    torch = pytest.importorskip("torch")
    q, k, v, mask, go = _inputs(config)
    kw = CONFIGS[config]
    out_ref, g_ref = _expected(q, k, v, mask, go, kw)

    def t(x, grad=False):
        return torch.tensor(x, requires_grad=grad)

    tq, tk, tv = t(q, True), t(k, True), t(v, True)
    tkw = {name: (t(val, name in ("alpha", "span")) if isinstance(val, np.ndarray) else val)
           for name, val in kw.items()}
    out = attnspec.attention(tq, tk, tv, key_padding_mask=torch.tensor(mask), backend=backend, **tkw)
    np.testing.assert_allclose(out.detach().numpy(), out_ref, atol=1e-12)
    out.backward(t(go))
    np.testing.assert_allclose(tq.grad.numpy(), g_ref.dq, atol=1e-11)
    np.testing.assert_allclose(tk.grad.numpy(), g_ref.dk, atol=1e-11)
    np.testing.assert_allclose(tv.grad.numpy(), g_ref.dv, atol=1e-11)
    masked = ~mask[:, None, :].repeat(Hkv, 1)
    assert (tk.grad.numpy()[masked] == 0).all() and (tv.grad.numpy()[masked] == 0).all()
    for name, expected in (("alpha", g_ref.dalpha), ("span", g_ref.dspan)):
        if isinstance(tkw.get(name), torch.Tensor):
            np.testing.assert_allclose(tkw[name].grad.numpy(), expected, atol=1e-10, err_msg=name)


# torch-sdpa and torch-decode: alpha = 1 through SDPA (fully masked rows give NaN there, and a
# NaN score plus its -inf mask is NaN), decode's windowed forward without gradients ---------------

def _padded(B, H, Hkv, Lq, Lk, D, seed, mask):
    """q, k, v, grad_out with NaN in masked keys and +Inf in masked values."""
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(B, H, Lq, D)), rng.normal(size=(B, Hkv, Lk, D)), rng.normal(size=(B, Hkv, Lk, D))
    masked = ~np.broadcast_to(mask[:, None, :], (B, Hkv, Lk))
    k[masked], v[masked] = np.nan, np.inf
    return q, k, v, rng.normal(size=(B, H, Lq, D))


def _masks(B, Lk, seed, holes=True):
    """Left padding of every depth (a whole row in the last batch row), plus holes in the first
    (holes=False: right padding there instead, its readable keys one range)."""
    rng = np.random.default_rng(seed)
    mask = np.arange(Lk)[None, :] >= np.linspace(0, Lk, B).astype(int)[:, None]  # last row: all masked
    if holes:
        mask[0] &= rng.random(Lk) > 0.3
    else:
        mask[0, 2:] = False
    return mask


FAST_CONFIGS = [
    dict(causal=True),                                     # left-padded prefill
    dict(),                                                # not causal: every query reads the same keys
    dict(causal=True, q_offset=np.array([-2, 4, 1])),      # rows before any key (empty) and per-row offsets
    dict(causal=True, q_offset=3),                         # a static offset
    dict(key_lengths=np.array([11, 6, 13]), causal=True),  # key_lengths together with the mask
    dict(key_lengths=np.array([0, 13, 9])),                # a batch row with no key at all
]


def _run(backend, q, k, v, mask, go, kw, grad):
    torch = pytest.importorskip("torch")
    tkw = {n: (torch.tensor(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}
    leaves = [torch.tensor(x, requires_grad=grad) for x in (q, k, v)]
    out = attnspec.attention(*leaves, key_padding_mask=torch.tensor(mask), backend=backend, **tkw)
    if not grad:
        assert out.grad_fn is None
        return out.numpy(), None
    out.backward(torch.tensor(go))
    return out.detach().numpy(), [x.grad.numpy() for x in leaves]


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("config", range(len(FAST_CONFIGS)))
@pytest.mark.parametrize("backend", ["torch-sdpa", "torch-decode", "torch-sdpa by slices"])
def test_fast_kernels_follow_the_reference_at_alpha_one(backend, config, grad, monkeypatch):
    """Left padding, holes, fully masked rows (NaN queries), NaN/Inf in masked K and V, GQA (4
    query heads on 2 kv heads): the reference's values and gradients, masked keys' dk = dv = 0
    exactly. 'by slices': torch-sdpa's one call per batch row on the range of keys it reads
    (every row's readable keys one range: left and right padding, no holes; no gradient)."""
    B, H, Hkv, Lq, Lk, D = 3, 4, 2, 5, 13, 8
    mask = _masks(B, Lk, config, holes=backend != "torch-sdpa by slices")
    calls = None
    if backend == "torch-sdpa by slices":
        from attnspec.backends.torch import sdpa

        backend = "torch-sdpa"
        monkeypatch.setattr(sdpa, "SLICE_MIN_ELEMENTS", 0)
        calls = []
        monkeypatch.setattr(sdpa, "_sdpa", lambda *a, _f=sdpa._sdpa: calls.append(a[1].shape) or _f(*a))
    q, k, v, go = _padded(B, H, Hkv, Lq, Lk, D, config, mask)
    q[-1] = np.nan  # queries of rows that read no key may hold anything (SPEC.md 5.3)
    kw = FAST_CONFIGS[config]
    out, grads = _run(backend, q, k, v, mask, go, kw, grad)
    np.testing.assert_allclose(out, ref.attention(q, k, v, key_padding_mask=mask, **kw), atol=1e-12)
    assert (out[-1] == 0).all()  # the batch row whose keys are all masked: empty rows
    if calls is not None and not grad:  # one call per batch row that reads some key, on its slice
        assert 1 <= len(calls) <= B - 1 and all(shape[0] == 1 for shape in calls), calls
    elif calls is not None:  # with gradients: one call on the zeroed copy
        assert [shape[0] for shape in calls] == [B], calls
    if grad:
        expected = ref.attention_vjp(q, k, v, go, key_padding_mask=mask, **kw)
        for name, got, want in zip("qkv", grads, (expected.dq, expected.dk, expected.dv)):
            np.testing.assert_allclose(got, want, atol=1e-11, err_msg=f"d{name}")
        masked = ~np.broadcast_to(mask[:, None, :], (B, Hkv, Lk))
        assert (grads[1][masked] == 0).all() and (grads[2][masked] == 0).all()
        assert (grads[0][-1] == 0).all()


def test_sdpa_readable_ranges():
    torch = pytest.importorskip("torch")
    from attnspec.backends.torch import sdpa

    mask = torch.tensor([[False, True, True, True], [True, True, False, False], [False] * 4])
    assert sdpa._readable_ranges(mask, None, 3, 4) == [(1, 4), (0, 2), (0, 0)]
    assert sdpa._readable_ranges(mask, torch.tensor([3, 4, 4]), 3, 4) == [(1, 3), (0, 2), (0, 0)]
    holes = torch.tensor([[True, False, True, True]] * 3)
    assert sdpa._readable_ranges(holes, None, 3, 4) is None
    assert sdpa._readable_ranges(holes, torch.tensor([1, 1, 2]), 3, 4) == [(0, 1), (0, 1), (0, 1)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sdpa_by_slices_equals_one_masked_call(dtype, monkeypatch):
    """Per-row slices (no gradient) and the one call on the zeroed copy: the same values, with
    key_lengths and per-row offsets; with gradients (alpha's at 1 included) slices never run."""
    torch = pytest.importorskip("torch")
    from attnspec.backends.torch import sdpa

    dt = getattr(torch, dtype)
    B, H, Hkv, Lq, Lk, D = 3, 4, 2, 6, 40, 16
    mask = torch.arange(Lk)[None, :] >= torch.tensor([0, 7, 30])[:, None]
    g = torch.Generator().manual_seed(0)
    q, k, v, go = (torch.randn(*shape, generator=g).to(dt)
                   for shape in ((B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), (B, H, Lq, D)))
    k[~mask[:, None, :].expand(B, Hkv, Lk)] = float("nan")
    kw = dict(causal=True, key_lengths=torch.tensor([40, 35, 38]), q_offset=torch.tensor([34, 20, 31]))
    outs = []
    for threshold in (0, 1 << 40):
        monkeypatch.setattr(sdpa, "SLICE_MIN_ELEMENTS", threshold)
        with torch.no_grad():
            outs.append(attnspec.attention(q, k, v, key_padding_mask=mask, backend="torch-sdpa", **kw))
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1])
    monkeypatch.setattr(sdpa, "SLICE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(sdpa, "_by_slices", None)  # a call would raise
    alpha = torch.ones(H, requires_grad=True)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out = attnspec.attention(*leaves, alpha=alpha, key_padding_mask=mask, backend="torch-sdpa", **kw)
    out.backward(go)
    torch.testing.assert_close(out.detach(), outs[1])
    assert torch.isfinite(alpha.grad).all() and (leaves[1].grad[~mask[:, None, :].expand(B, Hkv, Lk)] == 0).all()


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0, "mixed"])
@pytest.mark.parametrize("Lq, Lk", [(1, 40), (64, 90), (3, 300), (2, 1100)])
def test_decode_without_gradients_at_its_shapes(alpha, Lq, Lk):
    """The windowed forward (no gradient asked): one query to a full block of 64, windows past
    the sorted solve's pruning (128) and past its sort (1024); per-row offsets make the windows
    gathered, one offset a slice; span narrows them."""
    B, H, Hkv, D = 2, 4, 2, 8
    mask = np.ones((B, Lk), bool)
    mask[0, : Lk // 3] = False  # left padding
    mask[1, Lk // 2:: 7] = False  # holes
    q, k, v, _ = _padded(B, H, Hkv, Lq, Lk, D, Lq + Lk, mask)
    a = np.array([1.0, 1.3, 1.5, 2.0]) if alpha == "mixed" else alpha
    for kw in (dict(causal=True), dict(causal=True, q_offset=np.array([Lk - Lq, Lk // 2])),
               dict(span=np.array([3.0, 10.0, 40.0, 0.5]), ramp=4.0, causal=True, key_lengths=np.array([Lk, Lk - 5]))):
        kw = dict(kw, alpha=a)
        out, _ = _run("torch-decode", q, k, v, mask, None, kw, grad=False)
        expected = ref.attention(q, k, v, key_padding_mask=mask, **kw)
        np.testing.assert_allclose(out, expected, atol=1e-12, err_msg=str(kw))


def test_decode_rows_whose_own_key_is_masked_are_empty():
    """A causal row at a masked position that reads no other key (left padding longer than its
    offset) gives zeros, also through the sorted solve and SDPA on the window."""
    B, H, Lq, Lk, D = 2, 2, 4, 6, 4
    mask = np.array([[False] * 4 + [True] * 2, [True] * 6])
    q, k, v, _ = _padded(B, H, H, Lq, Lk, D, 3, mask)
    q[0, :, :4] = np.nan  # their queries may hold anything (SPEC.md 5.3)
    for alpha in (1.0, 1.5):
        out, _ = _run("torch-decode", q, k, v, mask, None, dict(alpha=alpha, causal=True, q_offset=0), grad=False)
        np.testing.assert_array_equal(out[0, :, :4], 0.0)
        np.testing.assert_allclose(out, ref.attention(q, k, v, key_padding_mask=mask, alpha=alpha, causal=True,
                                                      q_offset=0), atol=1e-12)


def test_fast_kernels_without_a_mask_build_none():
    """Without a mask nothing changes: SDPA's plan for a decode step is still no mask at all."""
    torch = pytest.importorskip("torch")
    from attnspec.backends.torch import sdpa

    q, k = torch.zeros(2, 4, 1, 8), torch.zeros(2, 2, 9, 8)
    assert sdpa._plan(q, k, True, None, None) == (None, False, None, None)
    allowed, is_causal, nonempty, key_valid = sdpa._plan(q, k, True, None, None, torch.ones(2, 9, dtype=torch.bool))
    assert allowed.shape == (2, 1, 1, 9) and nonempty is not None and key_valid.all()


def test_torch_tiled_with_many_tiles(monkeypatch):
    """Several query tiles and windows that key_lengths would skip: the mask still applies."""
    torch = pytest.importorskip("torch")
    from attnspec.backends.torch import attention as tiled

    monkeypatch.setattr(tiled, "BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(tiled, "SOFTMAX_BLOCK_ELEMENTS", 64)
    monkeypatch.setattr(tiled, "MIN_TILE", 1)
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(2, 2, 12, 4)), rng.normal(size=(2, 1, 12, 4)), rng.normal(size=(2, 1, 12, 4))
    mask = rng.random((2, 12)) > 0.3
    for alpha in (1.0, 1.5):
        kw = dict(alpha=alpha, span=4.0, ramp=2.0, causal=True, key_lengths=np.array([12, 10]))
        expected = ref.attention(q, k, v, key_padding_mask=mask, **kw)
        tkw = dict(kw, key_lengths=torch.tensor(kw["key_lengths"]))
        got = attnspec.attention(*(torch.tensor(x) for x in (q, k, v)), key_padding_mask=torch.tensor(mask),
                                 backend="torch", **tkw)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_jax_backend(config):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    q, k, v, mask, go = _inputs(config)
    kw = CONFIGS[config]
    enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else importlib.import_module("jax.experimental").enable_x64
    with enable_x64(True):
        out_ref, g_ref = _expected(q, k, v, mask, go, kw)
        jkw = {name: (jnp.asarray(val) if isinstance(val, np.ndarray) else val) for name, val in kw.items()}
        jmask = jnp.asarray(mask)

        def f(q, k, v):
            return attnspec.attention(q, k, v, key_padding_mask=jmask, backend="jax", **jkw)

        out, vjp = jax.vjp(f, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
        dq, dk, dv = vjp(jnp.asarray(go))
    np.testing.assert_allclose(np.asarray(out), out_ref, atol=1e-12)
    np.testing.assert_allclose(np.asarray(dq), g_ref.dq, atol=1e-11)
    np.testing.assert_allclose(np.asarray(dk), g_ref.dk, atol=1e-11)
    np.testing.assert_allclose(np.asarray(dv), g_ref.dv, atol=1e-11)
    masked = ~mask[:, None, :].repeat(Hkv, 1)
    assert (np.asarray(dk)[masked] == 0).all() and (np.asarray(dv)[masked] == 0).all()


def test_numpy_backend_and_explain():
    q, k, v, mask, _ = _inputs()
    out = attnspec.attention(q, k, v, key_padding_mask=mask, alpha=1.5, backend="numpy")
    np.testing.assert_array_equal(out, ref.attention(q, k, v, key_padding_mask=mask, alpha=1.5))
    assert np.isfinite(out).all()
    # A kernel written against SPEC 1.0 declares every feature but the mask: explain passes it
    # over with that reason, and a masked call never reaches it.
    from attnspec.dispatch.capabilities import all_features

    calls = []
    older = attnspec.Backend(
        name="spec-1-0-kernel", version="1.0", priority=100,
        kernels={"attention": attnspec.Kernel("attention", lambda *a, **kw: calls.append(kw) or ref.attention(*a, **kw),
                                              attnspec.Capabilities(array_type="numpy", dtypes=("float64",),
                                                                    features=all_features("attention")
                                                                    - {"key_padding_mask"}))})
    attnspec.register_backend(older)
    try:
        decision = attnspec.explain(q, k, v, key_padding_mask=mask)
        assert dict(decision.considered)["spec-1-0-kernel"] == ["feature 'key_padding_mask' is not supported"], \
            str(decision)
        assert decision.selected != "spec-1-0-kernel"
        attnspec.attention(q, k, v, key_padding_mask=mask)
        assert not calls
        # without a mask the same kernel is the first choice (its priority is the highest)
        assert attnspec.explain(q, k, v).selected == "spec-1-0-kernel"
    finally:
        attnspec.unregister_backend("spec-1-0-kernel")
    pytest.importorskip("triton")
    torch = pytest.importorskip("torch")
    tq, tk, tv = (torch.tensor(x, dtype=torch.float32) for x in (q, k, v))
    decision = attnspec.explain(tq, tk, tv, key_padding_mask=torch.tensor(mask))
    assert decision.selected is not None
    # every built-in torch kernel declares the mask: no reason names it
    for name, reasons in decision.considered:
        assert not any("key_padding_mask" in r for r in reasons), str(decision)
    meta = attnspec.explain(*(x.to("meta") for x in (tq, tk, tv)), key_padding_mask=torch.tensor(mask).to("meta"),
                            backend="triton")
    assert meta.selected == "triton", str(meta)


def test_torch_compile_fullgraph_with_a_mask():
    """The mask is an optional tensor argument of the custom op: it traces without graph breaks."""
    torch = pytest.importorskip("torch")
    q, k, v, mask, go = _inputs(7)
    tq = torch.tensor(q, requires_grad=True)
    tk, tv, tmask = torch.tensor(k), torch.tensor(v), torch.tensor(mask)

    def f(q, k, v, mask):
        return attnspec.attention(q, k, v, alpha=1.5, causal=True, key_padding_mask=mask, backend="torch")

    out = torch.compile(f, fullgraph=True)(tq, tk, tv, tmask)
    expected, grads = _expected(q, k, v, mask, go, dict(alpha=1.5, causal=True))
    np.testing.assert_allclose(out.detach().numpy(), expected, atol=1e-12)
    out.backward(torch.tensor(go))
    np.testing.assert_allclose(tq.grad.numpy(), grads.dq, atol=1e-11)


@pytest.mark.parametrize("alpha, backend", [(1.0, "torch-sdpa"), (1.5, "torch-decode")])
def test_left_padded_generation_selects_the_fast_kernels(alpha, backend, monkeypatch):
    """Batched generation with left padding passes a key_padding_mask on every call: prefill
    and decode steps go to torch-sdpa (alpha = 1) or torch-decode (a short prompt at alpha =
    1.5), not to the tiled path."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import attnspec.integrations.transformers as ats

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if alpha != 1.0:
        ats.configure(cfg, alpha=alpha)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="attnspec").eval()
    ids = torch.randint(0, 48, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, :1] = 0
    selected = []
    original = attnspec.attention

    def spy(*args, **kwargs):
        if kwargs.get("key_padding_mask") is not None:
            selected.append(attnspec.explain(*args, **kwargs).selected)
        return original(*args, **kwargs)

    monkeypatch.setattr(ats.attnspec, "attention", spy)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (3, 10)
    assert len(selected) == 3 and set(selected) == {backend}  # the prompt and two decode steps, one layer
