"""The JAX backend: the conformance suite (every dtype, one and many tiles), jit / vmap / grad /
checkpoint, check_grads in float64, a decode loop that does not recompile, sharding over 4 CPU
devices (in a subprocess), and which key tiles are skipped."""

import dataclasses
import importlib
import os
import subprocess
import sys
import textwrap
from functools import partial

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import attnspec  # noqa: E402
import attnspec.conformance as conformance  # noqa: E402
from cells import assert_every_declared_cell_ran  # noqa: E402

kernel = importlib.import_module("attnspec.backends.jax.attention")
# jax >= 0.6 has jax.enable_x64; older releases keep it in jax.experimental.
enable_x64 = jax.enable_x64 if hasattr(jax, "enable_x64") else importlib.import_module("jax.experimental").enable_x64

SPAN = [1.3, 2.7, 0.4, 5.2]
RAMP = 1.75  # no integer distance sits on a kink z or z + R
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inputs(B=2, H=4, Hkv=2, Lq=5, Lk=7, D=8, Dv=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, H, Lq, D)), rng.normal(size=(B, Hkv, Lk, D)), rng.normal(size=(B, Hkv, Lk, Dv))


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Tiles of 2 query rows and 3 keys: small inputs cross many (and partial) tiles."""
    monkeypatch.setattr(kernel, "TILE_Q", 2)
    monkeypatch.setattr(kernel, "TILE_K", 3)


def test_conformance_half_and_single_precision(tmp_path):
    report = conformance.check("jax", dtypes=["float16", "bfloat16", "float32"], artifacts_dir=str(tmp_path))
    assert report.passed, str(report)
    assert {c.dtype for c in report.cells if c.status == "pass"} == {"float16", "bfloat16", "float32"}
    # Every attention cell ran examples at tile-crossing sizes, values and gradients.
    attention = [c for c in report.cells if c.op == "attention"]
    assert all(c.tile_crossing >= 1 and c.gradients_checked[:3] == ["q", "k", "v"] for c in attention)
    assert_every_declared_cell_ran(report, dtypes=["float16", "bfloat16", "float32"])


def test_conformance_float64_under_x64(tmp_path):
    with enable_x64(True):
        report = conformance.check("jax", dtypes=["float64"], artifacts_dir=str(tmp_path))
    assert_every_declared_cell_ran(report, dtypes=["float64"])


def test_conformance_with_many_tiles(tiny_tiles, tmp_path):
    """The loops over query and key tiles (the path of every long sequence). Compiling costs
    more than running here, so CI runs the cell that draws every feature; the thorough profile
    runs them all."""
    cells = None if os.environ.get("HYPOTHESIS_PROFILE") == "thorough" else ["combined"]
    with enable_x64(True):
        report = conformance.check("jax", dtypes=["float64"], cells=cells, artifacts_dir=str(tmp_path),
                                   sizes=conformance.Sizes(large_share=0.0))
    assert report.passed, str(report)


def test_float64_without_x64_is_refused_with_the_reason():
    assert not jax.config.jax_enable_x64
    report = conformance.check("jax", dtypes=["float64"], cells=["causal"])
    (cell,) = report.cells
    assert cell.status == "unsupported" and "jax_enable_x64" in cell.reason
    call = attnspec.validation.validate_attention(*(np.zeros((1, 1, 2, 2)),) * 3)
    reasons = attnspec.dispatch.registry.load("jax").kernel("attention").not_supported_reasons(
        dataclasses.replace(call, array_type="jax"))
    assert any("jax_enable_x64" in r for r in reasons)


@pytest.mark.parametrize("kw, tiles", [
    (dict(alpha=1.0, causal=True), None),
    (dict(alpha=1.0, span=3.5, ramp=RAMP, key_lengths=[7, 4], q_offset=[3, -1]), (2, 3)),
])
def test_online_softmax_path_matches_the_reference_float64(kw, tiles):
    """alpha given as the Python number 1 takes the one-pass online softmax, whose gradients
    the conformance suite does not reach (it differentiates alpha, which needs the general
    path): values and dq, dk, dv against the reference here."""
    q, k, v = inputs()
    g = np.random.default_rng(1).normal(size=q.shape[:3] + (v.shape[-1],))
    ref_kw = {n: (np.asarray(x) if isinstance(x, list) else x) for n, x in kw.items()}
    ref = attnspec.reference.attention(q, k, v, **ref_kw)
    vjp = attnspec.reference.attention_vjp(q, k, v, g, **ref_kw)
    with enable_x64(True):
        jkw = {n: (jnp.asarray(x) if isinstance(x, list) else x) for n, x in kw.items()}
        tile_q, tile_k = tiles or (None, None)

        def f(q, k, v):
            return kernel.attention(q, k, v, tile_q=tile_q, tile_k=tile_k, **jkw)

        out, pullback = jax.vjp(f, *map(jnp.asarray, (q, k, v)))
        dq, dk, dv = pullback(jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-13)
    for mine, want in ((dq, vjp.dq), (dk, vjp.dk), (dv, vjp.dv)):
        np.testing.assert_allclose(np.asarray(mine), want, atol=1e-12)


def test_check_grads_float64_all_inputs():
    from jax.test_util import check_grads

    q, k, v = inputs(Lq=3, Lk=6, D=4, Dv=2)
    with enable_x64(True):
        q, k, v = map(jnp.asarray, (q, k, v))
        alpha = jnp.asarray([1.05, 1.3, 1.5, 1.9])
        span = jnp.asarray(SPAN)
        lengths, offsets = jnp.asarray([6, 5]), jnp.asarray([2, -1])

        def fn(q, k, v, alpha, span):
            return kernel.attention(q, k, v, alpha=alpha, span=span, ramp=RAMP, causal=True, key_lengths=lengths,
                                    q_offset=offsets, tile_q=2, tile_k=4)

        check_grads(fn, (q, k, v, alpha, span), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def _loss(q, k, v, alpha, span):
    return jnp.sum(jnp.sin(attnspec.attention(q, k, v, alpha=alpha, span=span, ramp=RAMP, causal=True)))


def test_jit_grad_vmap_and_checkpoint_agree_with_eager():
    q, k, v = map(jnp.asarray, inputs())
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    alpha, span = jnp.asarray([1.0, 1.2, 1.5, 2.0]), jnp.asarray(SPAN)
    grad = jax.grad(_loss, argnums=(0, 1, 2, 3, 4))
    eager = grad(q, k, v, alpha, span)
    jitted = jax.jit(grad)(q, k, v, alpha, span)
    remat = jax.jit(jax.grad(jax.checkpoint(_loss), argnums=(0, 1, 2, 3, 4)))(q, k, v, alpha, span)
    for a, b, c in zip(eager, jitted, remat):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)
    # vmap of the gradient over stacked queries and spans: each slice equals its own call
    qs, spans = jnp.stack([q, 2 * q]), jnp.stack([span, span + 1.0])
    batched = jax.jit(jax.vmap(grad, in_axes=(0, None, None, None, 0)))(qs, k, v, alpha, spans)
    second = grad(2 * q, k, v, alpha, span + 1.0)
    for i, (a, b) in enumerate(zip(eager, second)):
        np.testing.assert_allclose(np.asarray(batched[i][0]), np.asarray(a), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(batched[i][1]), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_decode_loop_with_traced_q_offset_compiles_once():
    B, H, Lk, D = 2, 4, 16, 8
    rng = np.random.default_rng(3)
    k = jnp.asarray(rng.normal(size=(B, H, Lk, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, H, Lk, D)), jnp.float32)
    traces = []

    @jax.jit
    def step(q, position, lengths):
        traces.append(1)  # runs only when jax traces the function
        return attnspec.attention(q, k, v, alpha=1.5, span=4.0, ramp=2.0, causal=True, key_lengths=lengths,
                                  q_offset=position)

    for t in range(6):
        q = jnp.asarray(rng.normal(size=(B, H, 1, D)), jnp.float32)
        position = jnp.asarray([t, t + 3], jnp.int32)
        out = step(q, position, position + 1)
        ref = attnspec.reference.attention(np.asarray(q, np.float64), np.asarray(k, np.float64),
                                           np.asarray(v, np.float64), alpha=1.5, span=4.0, ramp=2.0, causal=True,
                                           key_lengths=np.asarray(position) + 1, q_offset=np.asarray(position))
        np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5)
    assert len(traces) == 1


def test_eager_calls_share_the_compiled_kernels(monkeypatch):
    """With and without a key mask, at nearby lengths, and with gradients: one forward program
    and one backward program (the padding and conversions around them are small programs)."""
    traces = []

    def counted(fn, label):
        def traced(static, *args):
            traces.append(label)  # runs only when jax traces the program
            return fn(static, *args)
        return jax.jit(traced, static_argnums=0)

    monkeypatch.setattr(kernel, "_forward_jit", counted(kernel._forward, "forward"))
    monkeypatch.setattr(kernel, "_backward_jit", counted(kernel._backward, "backward"))
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.normal(size=(2, 4, 6, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 4, 7, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 4, 7, 8)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 7)) > 0.3)
    plain = attnspec.attention(q, k, v, alpha=1.5, backend="jax")
    masked = attnspec.attention(q, k, v, alpha=1.5, key_padding_mask=mask, backend="jax")
    shorter = attnspec.attention(q[:, :, :5], k, v, alpha=1.5, backend="jax")  # Lq 5 and 6 both pad to 8
    out, pullback = jax.vjp(lambda q: attnspec.attention(q, k, v, alpha=1.5, backend="jax"), q)
    (dq,) = pullback(jnp.ones_like(out))
    assert traces == ["forward", "backward"]
    ref = attnspec.reference.attention(*(np.asarray(x, np.float64) for x in (q, k, v)), alpha=1.5,
                                       key_padding_mask=np.asarray(mask))
    np.testing.assert_allclose(np.asarray(masked), ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(shorter), np.asarray(plain)[:, :, :5], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    assert dq.shape == q.shape and bool(jnp.isfinite(dq).all())


def test_entmax_op_shares_its_programs_across_input_dtypes_and_gradients(monkeypatch):
    from attnspec.backends.jax import entmax as ops

    traces = []

    def counted(program, label):
        def traced(*args, **kwargs):
            traces.append(label)  # runs only when jax traces the program
            return program.__wrapped__(*args, **kwargs)
        return jax.jit(traced, static_argnames=("axis",))

    monkeypatch.setattr(ops, "_forward_program", counted(ops._forward_program, "forward"))
    monkeypatch.setattr(ops, "_backward_program", counted(ops._backward_program, "backward"))
    x = np.random.default_rng(6).normal(size=(3, 7))
    outs = [attnspec.entmax(jnp.asarray(x, dtype), 1.5, backend="jax") for dtype in (jnp.float32, jnp.float16,
                                                                                      jnp.bfloat16)]
    p, pullback = jax.vjp(lambda x: attnspec.entmax(x, 1.5, backend="jax"), jnp.asarray(x, jnp.float32))
    (dx,) = pullback(jnp.asarray(np.arange(7.0) * np.ones((3, 1)), jnp.float32))
    assert traces == ["forward", "backward"]
    assert [o.dtype for o in outs] == [jnp.float32, jnp.float16, jnp.bfloat16]
    np.testing.assert_allclose(np.asarray(p), attnspec.reference.entmax(x, 1.5), atol=1e-6)
    assert np.allclose(np.asarray(dx).sum(-1), 0.0, atol=1e-5)  # p sums to 1 in every row: so do its moves


def test_empty_rows_and_nan_padding_give_zero_not_nan():
    q, k, v = (jnp.asarray(x, jnp.float32) for x in inputs())
    k = k.at[1, :, 3:].set(jnp.nan)
    v = v.at[1, :, 3:].set(jnp.inf)
    lengths = jnp.asarray([0, 3])

    out, pullback = jax.vjp(lambda q, k, v: attnspec.attention(q, k, v, alpha=1.5, causal=True,
                                                               key_lengths=lengths), q, k, v)
    assert bool(jnp.isfinite(out).all()) and bool((out[0] == 0).all())
    dq, dk, dv = pullback(jnp.ones_like(out))
    assert bool(jnp.isfinite(dq).all()) and bool((dq[0] == 0).all())
    assert bool((dk[1, :, 3:] == 0).all()) and bool((dv[1, :, 3:] == 0).all())


def test_key_tiles_skip_what_causal_span_and_lengths_exclude():
    def tiles_of(i0, Lq, Lk, causal, span=None, lengths=None, offset=None):
        call = kernel._Call(eps=None, span=None if span is None else jnp.full((1, 1), span), causal=jnp.asarray(causal),
                            ramp=jnp.asarray(2.0), scale=jnp.asarray(1.0),
                            lengths=jnp.asarray([Lk if lengths is None else lengths]),
                            positions=jnp.asarray([Lk - Lq if offset is None else offset]), Lq=jnp.asarray(Lq), Lk=Lk,
                            mask=jnp.ones((1, Lk), bool))
        cfg = kernel.StaticArgs(has_span=span is not None, softmax_only=False, need_dalpha=False, need_dspan=False,
                            tile_q=16, tile_k=16)
        lo, hi = kernel._key_tiles(jnp.asarray(i0), call, cfg)
        return int(lo), int(hi)

    assert tiles_of(0, 256, 256, causal=False) == (0, 16)
    assert tiles_of(0, 256, 256, causal=True) == (0, 1)  # rows 0..15 read keys 0..15
    assert tiles_of(128, 256, 256, causal=True) == (0, 9)
    # span 10, ramp 2: rows 128..143 read keys > 128 - 12 only
    assert tiles_of(128, 256, 256, causal=True, span=10.0) == (7, 9)
    assert tiles_of(128, 256, 256, causal=False, span=10.0) == (7, 10)
    assert tiles_of(0, 256, 256, causal=False, lengths=40) == (0, 3)
    assert tiles_of(0, 1, 256, causal=True, span=10.0, offset=200) == (11, 13)  # decode at position 200


SHARDING_PROGRAM = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import attnspec
    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    B, H, L, D = 4, 4, 24, 8
    q, k, v = (jnp.asarray(rng.normal(size=(B, H, L, D)), jnp.float32) for _ in range(3))
    alpha, span = jnp.asarray([1.0, 1.3, 1.5, 2.0]), jnp.asarray([3.5, 9.25, 0.5, 20.0])

    def loss(q, k, v, alpha, span):
        out = attnspec.attention(q, k, v, alpha=alpha, span=span, ramp=2.0, causal=True)
        return jnp.sum(out * out), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))
    (l0, out0), g0 = step(q, k, v, alpha, span)
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("batch", "heads"))
    rows = NamedSharding(mesh, P("batch", "heads"))
    heads = NamedSharding(mesh, P("heads"))
    args = [jax.device_put(x, rows) for x in (q, k, v)] + [jax.device_put(x, heads) for x in (alpha, span)]
    (l1, out1), g1 = step(*args)
    assert len(out1.sharding.device_set) == 4, out1.sharding
    np.testing.assert_allclose(np.asarray(out1), np.asarray(out0), rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    print("sharded ok")
""")


def test_sharded_over_four_cpu_devices_equals_unsharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run([sys.executable, "-c", SHARDING_PROGRAM], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sharded ok" in result.stdout


entmax_kernel = importlib.import_module("attnspec.backends.jax.entmax")


@partial(jax.jit, static_argnums=3)
def _solve_rows(s, m, alpha, iterations):
    """The kernel's row solve on one block of rows s, m [rows, n] (-inf / 0 where not allowed),
    alpha [rows]: (c, Newton passes over the keys, sum p)."""
    eps = (alpha - 1)[:, None]
    allowed = m > 0
    lo = jnp.where(allowed, entmax_kernel.one_alone(s, jnp.where(allowed, m, 1.0), eps), -jnp.inf).max(-1)
    hi = jnp.maximum(s.max(-1) + entmax_kernel.upper_bracket(m.sum(-1), eps[:, 0]), lo)

    def sums(c):
        return entmax_kernel.newton_sums(s, m, eps, c[..., None])

    c, passes = entmax_kernel.solve(sums, lo, hi, jnp.ones(lo.shape, bool), iterations)
    return c, passes, entmax_kernel.probabilities(s, m, eps, c[..., None])[0].sum(-1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_solve_reaches_a_root_on_the_upper_bracket_in_few_steps(dtype):
    """Tied rows (every allowed score equal: e.g. a zero query) put the root exactly on the
    analytic upper bracket c_hi of SPEC.md 2.4, and rounding can put the computed root a few
    ulps beyond it. Newton on log sum p overshoots from the left there and, unguarded,
    bisection crept towards c_hi one bit per pass over the keys (49 passes in float64 at
    alpha = 1.0001 with 1000 tied keys, 21 in float32 with 2)."""
    rows = [(n, w, a) for n, w in ((2, 1.0), (3, 1.0), (1000, 1.0), (8, 0.5), (2, 1e-3))
            for a in (1.0001, 1.05, 1.5, 1.9, 2.0)]
    s = np.full((len(rows), 1000), -np.inf)
    m = np.zeros((len(rows), 1000))
    for r, (n, w, _) in enumerate(rows):
        s[r, :n], m[r, :n] = 0.0, w
    alpha = np.asarray([a for _, _, a in rows])
    mass = np.asarray([n * w for n, w, _ in rows])
    root = -np.expm1(-(alpha - 1) * np.log(mass)) / (alpha - 1)  # c_hi, the root of a tied row
    with enable_x64(dtype == "float64"):
        c, passes, total = _solve_rows(jnp.asarray(s, dtype), jnp.asarray(m, dtype), jnp.asarray(alpha, dtype),
                                       kernel.ITERATIONS[dtype])
        eps_dtype = float(jnp.finfo(dtype).eps)
    assert int(passes) <= 14
    error = np.abs(np.asarray(c, np.float64) - root) / (1 + np.abs(root))
    assert error.max() <= 64 * eps_dtype, (error.max(), rows[int(error.argmax())])
    np.testing.assert_allclose(np.asarray(total, np.float64), 1.0, rtol=0, atol=8 * eps_dtype * 1000)


def test_scale_and_ramp_given_as_arrays_get_their_gradients():
    """scale and ramp may be jax arrays (a learned temperature, a learned ramp); their
    gradients were silently 0: dscale = sum_ij dS_ij (q_i . k_j), dR = sum_ij dm_ij (1 - m_ij)/R
    where m is strictly inside (0, 1)."""
    from jax.test_util import check_grads

    q, k, v = inputs(Lq=3, Lk=6, D=4, Dv=2)
    with enable_x64(True):
        q, k, v = map(jnp.asarray, (q, k, v))
        alpha, span = jnp.asarray([1.0, 1.3, 1.5, 2.0]), jnp.asarray(SPAN)

        def fn(scale, ramp):
            return kernel.attention(q, k, v, alpha=alpha, span=span, ramp=ramp, causal=True, scale=scale,
                                    tile_q=2, tile_k=4)

        check_grads(fn, (jnp.asarray(0.7), jnp.asarray(RAMP)), order=1, modes=["rev"], eps=1e-6, atol=1e-6,
                    rtol=1e-6)
        # softmax-only (alpha the number 1) and no span: the scale's gradient alone
        check_grads(lambda scale: kernel.attention(q, k, v, causal=True, scale=scale), (jnp.asarray(0.7),),
                    order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
