"""The Triton backend, run under the Triton interpreter on CPU tensors (no GPU needed): the
conformance suite, gradients against the reference on inputs spanning several tiles, the
convergence of the per-row solve (sum p = 1 unnormalised), the tile map, and the device rules.

Triton reads TRITON_INTERPRET when the kernels are defined, i.e. when attnspec first loads the
backend, so this module sets it at import (pytest imports every test module before running
any test). ATTNSPEC_TRITON_FULL=1 runs the whole `ci` profile (about 12x the examples; tens
of minutes under the interpreter).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

os.environ["TRITON_INTERPRET"] = "1"
torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import attnspec  # noqa: E402
import attnspec.conformance as conformance  # noqa: E402
from attnspec import reference  # noqa: E402
from attnspec.conformance.attention import value_bounds  # noqa: E402
from attnspec.conformance.cases import AttentionCase  # noqa: E402
from cells import assert_every_declared_cell_ran  # noqa: E402
from attnspec.dispatch import registry  # noqa: E402
from attnspec.errors import UnsupportedCallError  # noqa: E402


@pytest.fixture(scope="module")
def backend():
    b = registry.load("triton")
    module = sys.modules["attnspec.backends.triton"]
    if not module.INTERPRETED:
        pytest.fail("the triton backend was loaded before TRITON_INTERPRET=1 was set; run this module alone")
    return module


#: Tile-crossing sizes for the interpreter: its tiles are 16 x 16 (tuning.INTERPRETER), so
#: lengths to 40 cross two tile edges (15, 17, 31, 33) while a call stays within seconds.
INTERPRETER_SIZES = conformance.Sizes(large_share=0.5, max_length=40, head_dims=(16, 40), max_scores=8_000)


def test_conformance_suite_under_the_interpreter(backend, tmp_path):
    """Every declared cell runs and passes: fresh thorough-profile examples, two per cell (the
    interpreter is slow; ATTNSPEC_TRITON_FULL=1 runs the whole profile)."""
    full = os.environ.get("ATTNSPEC_TRITON_FULL") == "1"
    report = conformance.check("triton", device="cpu", profile="thorough", seed=1, examples=None if full else 2,
                               artifacts_dir=str(tmp_path), sizes=INTERPRETER_SIZES)
    assert report.passed, str(report) + "\n" + "\n".join(f.message for f in report.failures)
    assert_every_declared_cell_ran(report)
    passed = {(c.cell, c.dtype) for c in report.cells if c.status == "pass"}
    cells = {c.name for c in conformance.strategies.ATTENTION_CELLS}
    assert "padding_mask" in cells
    assert passed == {(cell, dtype) for cell in cells for dtype in ("float16", "bfloat16", "float32")}
    # Every attention cell ran examples that cross the interpreter's tiles, with gradients.
    attention = [c for c in report.cells if c.cell in cells and c.status == "pass"]
    assert all(c.tile_crossing >= 1 and "dq dk dv" in c.coverage for c in attention)
    refused = {c.cell: c.reason for c in report.cells if c.status == "unsupported"}
    assert refused.get("entmax op", "").startswith("does not implement")
    assert any(c.dtype == "float64" and c.status == "unsupported" for c in report.cells)


def _torch_kwargs(kw, dtype):
    out = {}
    for name, value in kw.items():
        if isinstance(value, np.ndarray):
            value = torch.tensor(value)
            if value.dtype == torch.float64:
                value = value.to(torch.float32)
        out[name] = value
    return out


# Shapes over several 16 x 16 tiles (the interpreter's tile size): windows, tile skipping, GQA.
GRADIENT_CASES = {
    "span causal gqa": dict(B=2, H=4, Hkv=2, Lq=37, Lk=45, alpha=np.array([1.0, 1.3, 1.7, 2.0]),
                            span=np.array([3.4, 9.6, 20.2, 0.3]), ramp=4.0, causal=True,
                            key_lengths=np.array([45, 30]), q_offset=np.array([8, 2])),
    "entmax dense q_offset": dict(B=1, H=2, Hkv=1, Lq=20, Lk=40, alpha=np.array([1.05, 1.5]),
                                  q_offset=np.array([-5])),
    "softmax span": dict(B=1, H=3, Hkv=3, Lq=33, Lk=33, alpha=1.0, span=6.5, ramp=2.0),
}


@pytest.mark.parametrize("name", list(GRADIENT_CASES))
def test_gradients_match_the_reference_across_tiles(backend, name):
    case = dict(GRADIENT_CASES[name])
    B, H, Hkv, Lq, Lk = (case.pop(k) for k in ("B", "H", "Hkv", "Lq", "Lk"))
    rng = np.random.default_rng(1)
    q, k, v = rng.normal(size=(B, H, Lq, 16)) * 2, rng.normal(size=(B, Hkv, Lk, 16)), rng.normal(size=(B, Hkv, Lk, 8))
    dout = rng.normal(size=(B, H, Lq, 8))
    q, k, v = (x.astype(np.float32).astype(np.float64) for x in (q, k, v))
    kw = {n: (x.astype(np.float32).astype(np.float64) if isinstance(x, np.ndarray) and x.dtype == np.float64 else x)
          for n, x in case.items()}
    want = reference.attention_vjp(q, k, v, dout, **kw)
    out_ref = reference.attention(q, k, v, **kw)
    tkw = _torch_kwargs(kw, torch.float32)
    leaves = [torch.tensor(x, dtype=torch.float32, requires_grad=True) for x in (q, k, v)]
    alpha = tkw.pop("alpha")
    alpha = (alpha if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha))).requires_grad_(True)
    span = tkw.pop("span", None)
    if span is not None:
        span = (span if isinstance(span, torch.Tensor) else torch.tensor(float(span))).requires_grad_(True)
    out = attnspec.attention(*leaves, alpha=alpha, span=span, backend="triton", **tkw)
    out.backward(torch.tensor(dout, dtype=torch.float32))
    bounds = value_bounds(AttentionCase(q, k, v, dout, **kw), "float32", out_ref, want)
    np.testing.assert_allclose(out.detach().double().numpy(), out_ref, rtol=0, atol=bounds["out"])
    got = dict(q=leaves[0].grad, k=leaves[1].grad, v=leaves[2].grad, alpha=alpha.grad,
               span=None if span is None else span.grad)
    for n, g in got.items():
        ref = getattr(want, "d" + n)
        if ref is None:
            continue
        np.testing.assert_allclose(g.double().numpy(), ref, rtol=0, atol=bounds[n], err_msg="d" + n)


ALPHAS = [1.0, 1.0001, 1.5, 1.9, 2.0]


def _rows(kind, dtype, L=32, D=16):
    """One batch, one head per alpha in ALPHAS, rows of a given kind."""
    g = torch.Generator().manual_seed(3)
    H = len(ALPHAS)
    q = torch.randn(1, H, L, D, generator=g)
    k = torch.randn(1, H, L, D, generator=g)
    v = torch.randn(1, H, L, D, generator=g)
    if kind == "dense":  # scores within ~0.05: every key in the support
        q = q * 0.05
    elif kind == "peaked":  # one key far above the rest
        q = q * 0.3
        k[:, :, 7] = q.mean(2) * 40
    elif kind == "very negative":  # every score near -3e4 (shift invariance, no overflow)
        q[..., 0] = 1.0
        k[..., 0] = -3.0e4
        q[..., 1:] *= 0.5
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["dense", "peaked", "very negative"])
def test_the_solve_reaches_float32_accuracy(backend, kind, dtype):
    """sum_j p_ij as the kernel computed it, not renormalised, is 1 to float32 accuracy on
    every row (scores accumulate in float32 whatever the input dtype), and the per-row solve
    stops well before its safety cap."""
    q, k, v = _rows(kind, dtype)
    stats = backend.solve_statistics(q, k, v, alpha=torch.tensor(ALPHAS), scale=1.0 if kind == "very negative" else None)
    psum = stats["psum"].double()
    assert torch.isfinite(psum).all()
    # 32 float32 ulps of 1: the sum of 32 terms rounds by a few ulps, the solve stops at 4.
    worst = (psum - 1).abs().amax(dim=(0, 2))
    assert (worst <= 32 * 2.0**-23).all(), f"|sum p - 1| per head (alpha {ALPHAS}): {worst.tolist()}"
    passes = stats["passes"]
    assert int(passes[:, 0].max()) == 1  # alpha = 1: one online-softmax pass
    assert int(passes.max()) <= 16, passes  # bounds + Halley steps + output; the cap is 64
    case = AttentionCase(*(x.double().numpy() for x in (q, k, v)), np.zeros(tuple(v.shape)), alpha=np.array(ALPHAS),
                         scale=1.0 if kind == "very negative" else None)
    out_ref = reference.attention(case.q, case.k, case.v, **case.kwargs)
    atol = value_bounds(case.rounded(str(dtype).split(".")[1]), str(dtype).split(".")[1], out_ref)["out"]
    ratio = np.abs(stats["out"].double().numpy() - out_ref) / atol  # atol is per element in half precision
    assert ratio.max() <= 1.0, f"|out - out_ref| / bound up to {ratio.max():.3g} at {np.unravel_index(ratio.argmax(), ratio.shape)}"


def test_rows_without_keys_are_zeros_not_nan(backend):
    """key_lengths = 0, or a query before every key under causal: zeros and zero gradients,
    also when q holds NaN there and padded keys hold NaN/Inf (SPEC.md 5.3)."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2, 5, 8, generator=g)
    k = torch.randn(2, 1, 6, 8, generator=g)
    v = torch.randn(2, 1, 6, 4, generator=g)
    q[1] = float("nan")  # batch 1 reads no key
    k[0, :, 4:] = float("nan")
    v[0, :, 4:] = float("inf")
    for alpha in (1.0, 1.5, 2.0):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        a = torch.tensor([alpha, 1.3], requires_grad=True)
        out = attnspec.attention(*leaves, alpha=a, causal=True, key_lengths=torch.tensor([4, 0]),
                                 q_offset=torch.tensor([-2, 0]), backend="triton")
        assert torch.isfinite(out).all()
        assert (out[1] == 0).all() and (out[0, :, :2] == 0).all()  # rows before every key
        out.backward(torch.ones_like(out))
        for x in leaves:
            assert torch.isfinite(x.grad).all()
        assert (leaves[0].grad[1] == 0).all() and (leaves[1].grad[0, :, 4:] == 0).all()
        assert (leaves[2].grad[0, :, 4:] == 0).all() and torch.isfinite(a.grad).all()


def test_the_tile_map_records_only_tiles_with_support(backend):
    """A span of 3 (ramp 2) at L = 64: query tile i reaches key tiles i-1..i+1 only. Without a
    span, scores A cos(w (i - j)) put each 2-entmax row's support next to its diagonal, and
    the map of tiles holding any p > 0 (the tiles the backward visits) is that band."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 64, 16, generator=g) for _ in range(3))
    band = torch.tensor([[abs(i - j) <= 1 for j in range(4)] for i in range(4)])
    tiles = backend.solve_statistics(q, k, v, alpha=1.5, span=3.0, ramp=2.0)["tiles"][0, 0]
    assert (tiles[~band] == 0).all() and (tiles.diagonal() == 1).all()
    angle = torch.arange(64.0) * (2 * torch.pi / 128)
    pos = torch.zeros(1, 1, 64, 16)
    pos[..., 0], pos[..., 1] = 50 * torch.cos(angle), 50 * torch.sin(angle)
    stats = backend.solve_statistics(pos, pos / 50, v, alpha=2.0, scale=1.0)
    tiles = stats["tiles"][0, 0]
    assert (tiles[~band] == 0).all() and (tiles.diagonal() == 1).all()
    case = AttentionCase(*(x.double().numpy() for x in (pos, pos / 50, v)), np.ones((1, 1, 64, 16)), alpha=2.0,
                         scale=1.0)
    ref = reference.attention(case.q, case.k, case.v, **case.kwargs)
    want = reference.attention_vjp(case.q, case.k, case.v, case.grad_out, **case.kwargs)
    bounds = value_bounds(case, "float32", ref, want)
    np.testing.assert_allclose(stats["out"].double().numpy(), ref, rtol=0, atol=bounds["out"])
    # the backward skips the other tiles and still gets every gradient
    leaves = [x.clone().requires_grad_(True) for x in (pos, pos / 50, v)]
    out = attnspec.attention(*leaves, alpha=2.0, scale=1.0, backend="triton")
    out.backward(torch.ones_like(out))
    for leaf, name in zip(leaves, "qkv"):
        np.testing.assert_allclose(leaf.grad.double().numpy(), getattr(want, "d" + name), rtol=0, atol=bounds[name])


def test_runs_only_when_named_and_works_on_meta_tensors(backend):
    q = torch.randn(1, 2, 4, 8)
    assert attnspec.explain(q, q, q, alpha=1.5).selected != "triton"
    status = {s.name: s for s in attnspec.list_backends()}["triton"]
    assert status.available and status.automatic is False and "cpu" in status.devices
    out = attnspec.attention(q.to("meta"), q.to("meta"), q.to("meta"), alpha=1.5, backend="triton")
    assert out.device.type == "meta" and out.shape == (1, 2, 4, 8)
    with pytest.raises(UnsupportedCallError, match="dtype=float64"):
        attnspec.attention(q.double(), q.double(), q.double(), backend="triton")


def test_cpu_tensors_are_refused_without_the_interpreter():
    """In a process without TRITON_INTERPRET the backend loads (no GPU needed) and refuses CPU
    tensors with a reason that says how to run them."""
    code = (
        "import torch, attnspec\n"
        "from attnspec.errors import UnsupportedCallError\n"
        "q = torch.randn(1, 1, 4, 8)\n"
        "try:\n"
        "    attnspec.attention(q, q, q, backend='triton')\n"
        "except UnsupportedCallError as exc:\n"
        "    print(exc.reasons['triton'])\n"
    )
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         timeout=300).stdout
    assert "set TRITON_INTERPRET=1" in out, out


_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import attnspec.backends.triton.attention as A

dtype = sys.argv[1]
common = dict(HAS_SPAN=True, CAUSAL=True, HAS_LENGTHS=True, HAS_MASK=True, F32=dtype == "fp32", UPCAST=False,
              LIBDEVICE=True, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, BLOCK_DV=64)
x, f, i = "*" + dtype, "*fp32", "*i32"
pointers = dict(Q=x, K=x, V=x, Out=x, DO=x, DQ=x, DK=x, DV=x, Bits="*i8", Passes=i, Lengths=i, Offsets=i,
                Mask="*i8")
kernels = [(A._forward_kernel, dict(STATS=True, MAX_ITERS=64, HTOL=A.H_TOL, CTOL=A.C_TOL)),
           (A._backward_dq_kernel, dict(ALPHA_GRAD=True, SPAN_GRAD=True)), (A._backward_dkdv_kernel, {})]
for fn, extra in kernels:
    constexprs = dict(common, **extra)
    signature = {n: "constexpr" if n in constexprs else "fp32" if n in ("scale", "ramp")
                 else "i32" if n in ("H", "G", "Lq", "Lk", "D", "Dv", "n_qt", "n_kt") else pointers.get(n, f)
                 for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 80, 32), options=dict(num_warps=4, num_stages=2))
    assert "cubin" in kernel.asm, fn.__name__
    print(fn.__name__, "compiled, shared memory", kernel.metadata.shared)
"""


@pytest.mark.skipif(os.environ.get("ATTNSPEC_TRITON_COMPILE") != "1",
                    reason="compiling for CUDA takes minutes; set ATTNSPEC_TRITON_COMPILE=1")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_a_cuda_target(dtype):
    """The compiled (non-interpreter) path has its own rules (types of if-branches, constexprs,
    libdevice): compile every kernel to a cubin for sm_80 without a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = subprocess.run([sys.executable, "-c", _COMPILE, dtype], capture_output=True, text=True, env=env,
                         timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("compiled") == 3, out.stdout


def test_equal_score_rows_solve_to_float32_in_few_passes(backend):
    """Equal scores put the root at the bracket's upper end, c_hi = -expm1(-eps log n)/eps,
    exactly (SPEC.md 2.4), where h(c) = log n + log1p(-eps c)/eps steepens towards its pole
    at 1/eps: Newton/Halley steps on h overshoot the bracket and plain bisection creeps (it
    took up to 16 steps). Causal rows i = 0..63 hold n = i + 1 keys: single-key rows, dense
    rows at L = 64, and every count between; c must match the closed form to float32 accuracy."""
    alphas = [1.0, 1.0001, 1.1, 1.5, 1.9, 2.0]
    q = torch.zeros(1, len(alphas), 64, 16)
    k = torch.randn(1, len(alphas), 64, 16, generator=torch.Generator().manual_seed(6))
    stats = backend.solve_statistics(q, k, k, alpha=torch.tensor(alphas), causal=True)
    n = torch.arange(1, 65, dtype=torch.float64)
    for h, a in enumerate(alphas):
        eps = a - 1
        want = n.log() if eps == 0 else -torch.expm1(-eps * n.log()) / eps
        got = stats["c"][0, h].double()
        err = ((got - want).abs() / (2.0**-23 * want.abs().clamp(min=1))).max()
        assert err <= 4, f"alpha={a}: c off by {float(err):.1f} float32 ulps"
    assert int(stats["passes"][0, 1:].max()) <= 8, stats["passes"][0]


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered")  # the interpreter's NumPy max of a NaN row
def test_a_row_reading_a_nan_score_outputs_nan(backend):
    """SPEC.md 2.1 / 5.3: an allowed NaN score makes the row's p NaN (NaN advised for the
    output); it must not be dropped silently as if p were 0 there. Other rows are unaffected."""
    g = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 3, 20, 16, generator=g), torch.randn(1, 1, 20, 16, generator=g)
    v = torch.randn(1, 1, 20, 8, generator=g)
    q[0, :, 3] = float("nan")
    k[0, 0, 11, 0] = float("nan")  # read by the causal rows i >= 11 only
    for causal in (False, True):
        out = attnspec.attention(q, k, v, alpha=torch.tensor([1.0, 1.5, 2.0]), causal=causal, backend="triton")
        reads_nan = torch.zeros(20, dtype=torch.bool)
        reads_nan[3] = True
        reads_nan[11 if causal else 0:] = True
        assert out[0, :, reads_nan].isnan().all(), out[0, :, :, 0]
        assert torch.isfinite(out[0, :, ~reads_nan]).all()
