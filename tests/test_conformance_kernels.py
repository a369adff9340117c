"""The suite judges real kernels: what a kernel declares (shapes, alpha, gradients) is what
the dispatcher enforces and what the strategies draw; refusals are rejected examples, not
failures; gradient coverage shows; the command line says what it checked."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import attnspec
import attnspec.conformance as conformance
from attnspec import Capabilities, Interval, Kernel, Lengths, cli, reference
from attnspec.conformance import strategies
from attnspec.conformance.runner import ALL_ATTENTION_FEATURES
from attnspec.dispatch.capabilities import all_features
from attnspec.errors import UnsupportedCallError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "third_party_backend"
ATTENTION_FEATURES = frozenset({"entmax", "alpha_per_head", "span", "span_per_head", "causal", "key_lengths",
                                "q_offset", "gqa"})


def _numpy_backend(name, caps_changes=None, fn=None, vjp=reference.attention_vjp, extra_reasons=None):
    caps = Capabilities(array_type="numpy", dtypes=("float32", "float64"), features=ATTENTION_FEATURES,
                        **(caps_changes or {}))
    kernel = Kernel("attention", fn or reference.attention, caps, vjp=vjp, extra_reasons=extra_reasons)
    return attnspec.Backend(name, "0", {"attention": kernel})


@pytest.fixture
def registered(clean_registry):
    """Register backends for one test (the registry is restored afterwards)."""
    def register(backend):
        attnspec.register_backend(backend, replace=True)
        return backend.name
    return register


def _qkv(B=1, H=2, Hkv=2, Lq=16, Lk=16, D=16, Dv=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(B, H, Lq, D)), rng.normal(size=(B, Hkv, Lk, D)), rng.normal(size=(B, Hkv, Lk, Dv))


# What a kernel declares, as the dispatcher and explain() read it ------------------------------

@pytest.mark.parametrize("changes, call, reason", [
    ({"head_dims": {16, 32, 64, 128}}, dict(D=40, Dv=40), "head dim D=40 (supported: 16, 32, 64, 128)"),
    ({"head_dims": range(16, 129)}, dict(D=8, Dv=16), "head dim D=8 (supported: 16..128)"),
    ({"head_dims": range(16, 129), "value_head_dims": {64}}, dict(Dv=32), "head dim Dv=32 (supported: 64)"),
    ({"lk": Lengths(multiple_of=16)}, dict(Lk=17), "Lk=17 (supported: a multiple of 16)"),
    ({"lq": Lengths(power_of_two=True, max=64)}, dict(Lq=96), "Lq=96 (supported: a power of two, <= 64)"),
    ({"equal_lengths": True}, dict(Lq=16, Lk=32), "Lq=16, Lk=32 (supported: Lq == Lk)"),
    ({"max_batch": 1}, dict(B=2), "batch B=2 (supported: <= 1)"),
    ({"max_heads": 1}, dict(H=2, Hkv=1), "heads H=2 (supported: <= 1)"),
])
def test_every_shape_field_gives_a_reason_naming_the_value(registered, changes, call, reason):
    name = registered(_numpy_backend("shapes", changes))
    q, k, v = _qkv(**call)
    decision = attnspec.explain(q, k, v, backend=name)
    assert decision.selected is None and reason in str(decision)
    with pytest.raises(UnsupportedCallError, match=reason.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        attnspec.attention(q, k, v, backend=name)
    ok = {key: 16 for key in call} if "equal_lengths" not in changes else {"Lq": 16, "Lk": 16}
    if changes.get("value_head_dims"):
        ok = {"Dv": 64}
    if "max_batch" in changes or "max_heads" in changes:
        ok = {key: 1 for key in call}
    q, k, v = _qkv(**ok)
    assert attnspec.explain(q, k, v, backend=name).selected == name


@pytest.mark.parametrize("alphas, good, bad, reason", [
    ({1.5}, 1.5, 1.25, "alpha=1.25 (supported: alpha in {1.5})"),
    (Interval.parse("(1, 2]"), 1.0001, 1.0, "alpha=1 (supported: alpha in (1, 2])"),
])
def test_the_alpha_a_kernel_runs(registered, alphas, good, bad, reason):
    name = registered(_numpy_backend("alphas", {"alphas": alphas}))
    q, k, v = _qkv()
    assert attnspec.explain(q, k, v, alpha=good, backend=name).selected == name
    # The selection cache must key on alpha: the same shape with another alpha is refused.
    attnspec.attention(q, k, v, alpha=good, backend=name)
    with pytest.raises(UnsupportedCallError, match=r"alpha="):
        attnspec.attention(q, k, v, alpha=bad, backend=name)
    assert reason in str(attnspec.explain(q, k, v, alpha=bad, backend=name))
    per_head = np.array([good, bad])
    assert "alpha=" in str(attnspec.explain(q, k, v, alpha=per_head, backend=name))


def test_call_info_carries_alpha_when_concrete_and_none_when_traced():
    from attnspec import validation

    q, k, v = _qkv()
    assert validation.validate_attention(q, k, v, alpha=1.5).alpha == 1.5
    assert validation.validate_attention(q, k, v, alpha=np.array([1.5, 1.2])).alpha == (1.2, 1.5)
    assert validation.validate_entmax(np.zeros((2, 3)), np.array([[1.5], [1.5]])).alpha == (1.5,)
    jax = pytest.importorskip("jax")
    seen = []
    caps = Capabilities(array_type="jax", features=frozenset({"entmax"}), alphas={1.5})

    @jax.jit
    def f(alpha):
        call = validation.validate_attention(*(jax.numpy.asarray(x) for x in (q, k, v)), alpha=alpha)
        seen.append((call.alpha, caps.reasons(call)))
        return alpha

    f(jax.numpy.float32(1.5))
    (alpha, reasons), = seen
    assert alpha is None and any("cannot be checked against alpha in {1.5}" in r for r in reasons)


def test_capabilities_reject_bad_declarations():
    with pytest.raises(ValueError, match="alphas must lie in"):
        Capabilities(array_type="numpy", alphas={2.5})
    with pytest.raises(ValueError, match="not an interval"):
        Interval.parse("1..2")
    with pytest.raises(ValueError, match="multiple_of"):
        Lengths(multiple_of=0)
    assert Capabilities(array_type="numpy", head_dims=[16, 32]).head_dims == frozenset({16, 32})


# The strategies draw only what is declared -----------------------------------------------------

CONSTRAINED = Capabilities(array_type="numpy", features=ATTENTION_FEATURES, head_dims={16, 32, 64, 128},
                           value_head_dims=range(16, 129), lq=Lengths(multiple_of=16), lk=Lengths(multiple_of=16, max=256),
                           max_batch=1, alphas={1.5})


@pytest.mark.parametrize("sizes", [None, strategies.PROFILE_SIZES["ci"]], ids=["small", "tile-crossing"])
@pytest.mark.parametrize("cell", [c for c in strategies.ATTENTION_CELLS], ids=lambda c: c.name)
def test_strategies_draw_only_declared_shapes_and_alphas(cell, sizes):
    @settings(max_examples=15, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategies.attention_cases(cell, CONSTRAINED.features, CONSTRAINED, "float32", sizes))
    def drawn(case):
        B, H, Lq, D = case.q.shape
        Lk, Dv = case.k.shape[2], case.v.shape[3]
        assert D in {16, 32, 64, 128} and 16 <= Dv <= 128
        assert Lq % 16 == 0 and Lk % 16 == 0 and Lk <= 256 and B == 1
        assert set(np.atleast_1d(case.alpha).tolist()) == {1.5}

    drawn()


def test_tile_crossing_sizes_are_drawn():
    cell = next(c for c in strategies.ATTENTION_CELLS if c.name == "combined")
    seen = []

    @settings(max_examples=60, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategies.attention_cases(cell, ALL_ATTENTION_FEATURES, None, "float32", strategies.PROFILE_SIZES["ci"]))
    def drawn(case):
        seen.append((case.q.shape[2], case.k.shape[2], case.q.shape[3], case.v.shape[3],
                     case.q.shape[1] // case.k.shape[1]))

    drawn()
    lengths = {n for s in seen for n in s[:2]}
    assert lengths & {15, 17, 31, 33, 63, 65, 127, 129, 255, 257} and max(lengths) > 128
    assert any(lq != lk for lq, lk, *_ in seen) and any(d != dv for _, _, d, dv, _ in seen)
    assert {d for s in seen for d in s[2:4]} & {40, 59, 96, 111}
    assert len({g for *_, g in seen}) >= 2
    assert {b[1] // b[2] for b in strategies.CI_LARGE_SHAPES} == {1, 2, 4, 8}


def test_a_shape_constrained_kernel_passes_and_its_refusals_are_rejected_examples(registered, tmp_path):
    """A kernel that declares its shapes passes; one that refuses some drawn examples through
    extra_reasons passes too, with the share it refused in the report."""
    name = registered(_numpy_backend("constrained", {k: getattr(CONSTRAINED, k) for k in (
        "head_dims", "value_head_dims", "lq", "lk", "max_batch", "alphas")}))
    report = conformance.check(name, dtypes=["float64"], cells=["causal", "gqa"], artifacts_dir=str(tmp_path))
    assert report.passed, str(report)
    assert all(c.refused == 0 and c.tile_crossing >= 1 for c in report.cells)

    def odd_heads(call):
        return ["H=%d: this kernel takes an even number of heads" % call.sizes["H"]] if call.sizes["H"] % 2 else []

    name = registered(_numpy_backend("picky", extra_reasons=odd_heads))
    report = conformance.check(name, dtypes=["float64"], cells=["entmax", "gqa"], artifacts_dir=str(tmp_path))
    assert report.passed, str(report)
    assert sum(c.refused for c in report.cells) > 0
    assert "refused" in report.table()
    assert any("even number of heads" in reason for c in report.cells for reason in c.refusals)
    assert 0 < json.loads(report.to_json())["cells"][0]["refused_share"] < 1


def test_a_cell_where_nothing_could_run_fails_with_the_reasons(registered, tmp_path):
    name = registered(_numpy_backend("refuses-all", extra_reasons=lambda call: ["needs a GPU that is not here"]))
    report = conformance.check(name, dtypes=["float64"], cells=["causal"], artifacts_dir=str(tmp_path))
    (cell,) = report.cells
    assert cell.status == "FAIL" and cell.failure.check == "no examples"
    assert "needs a GPU that is not here" in cell.failure.message


# Gradient coverage --------------------------------------------------------------------------

def test_gradient_coverage_shows_in_table_and_json(registered, tmp_path):
    full = registered(_numpy_backend("with-vjp"))
    values = registered(_numpy_backend("no-vjp", vjp=None))
    report = conformance.check(full, dtypes=["float64"], cells=["span"], artifacts_dir=str(tmp_path))
    assert "dq dk dv dα dz" in report.table()
    assert report.cells[0].gradients_checked == ["q", "k", "v", "alpha", "span"]
    assert json.loads(report.to_json())["cells"][0]["coverage"] == "values + gradients (dq dk dv dα dz)"
    report = conformance.check(values, dtypes=["float64"], cells=["span"], artifacts_dir=str(tmp_path))
    assert report.passed and "values only" in report.table() and report.cells[0].gradients_checked == []


def test_a_claimed_gradient_returned_as_none_fails(registered, tmp_path):
    def no_dalpha(*args, **kwargs):
        return reference.attention_vjp(*args, **kwargs)._replace(dalpha=None)

    name = registered(_numpy_backend("dalpha-missing", vjp=no_dalpha))
    report = conformance.check(name, dtypes=["float64"], cells=["entmax"], artifacts_dir=str(tmp_path))
    assert not report.passed and report.failures[0].check == "dalpha"
    assert "returned None" in report.failures[0].message


def test_gradients_not_declared_are_not_checked(registered, tmp_path):
    """A kernel declaring dq, dk, dv only: a wrong dalpha is not its claim, so not checked."""
    def wrong_dalpha(*args, **kwargs):
        g = reference.attention_vjp(*args, **kwargs)
        return g._replace(dalpha=np.asarray(g.dalpha) + 1.0)

    name = registered(_numpy_backend("qkv-only", {"gradients": {"q", "k", "v"}}, vjp=wrong_dalpha))
    report = conformance.check(name, dtypes=["float64"], cells=["entmax"], artifacts_dir=str(tmp_path))
    assert report.passed, str(report)
    assert report.cells[0].gradients_checked == ["q", "k", "v"] and "dq dk dv)" in report.table()


def test_an_autograd_kernel_without_alpha_grad_is_not_asked_for_dalpha(registered, tmp_path):
    """The gradient path goes through the dispatcher: a torch kernel not declaring alpha_grad
    gets no alpha that requires grad (and its wrong dalpha is not held against it)."""
    torch = pytest.importorskip("torch")
    base = attnspec.dispatch.registry.load("torch-eager").kernel("attention")

    def detached_alpha(q, k, v, *, alpha, **kwargs):
        assert not (isinstance(alpha, torch.Tensor) and alpha.requires_grad)
        return base.fn(q, k, v, alpha=alpha, **kwargs)

    caps = replace(base.capabilities, features=base.capabilities.features - {"alpha_grad"})
    name = registered(attnspec.Backend("torch-no-dalpha", "0", {"attention": Kernel("attention", detached_alpha, caps)}))
    report = conformance.check(name, dtypes=["float64"], cells=["entmax"], artifacts_dir=str(tmp_path))
    assert report.passed, str(report)
    assert report.cells[0].gradients_checked == ["q", "k", "v"]


# The command line and the Python API --------------------------------------------------------

def test_unknown_dtype_or_profile_is_an_error_naming_the_accepted_values(capsys):
    for argv, accepted in ((["--dtype", "fp32"], "float32"), (["--profile", "quick"], "thorough")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["check", "--backend", "numpy", "--quiet", *argv])
        assert exc.value.code == 2 and accepted in capsys.readouterr().err
    with pytest.raises(ValueError, match="dtype 'fp32' is not a dtype the suite checks.*float32"):
        conformance.check("numpy", dtypes=["fp32"])
    with pytest.raises(ValueError, match="profile='quick'.*ci, thorough"):
        conformance.check("numpy", profile="quick")
    with pytest.raises(ValueError, match="cell 'spans'.*span"):
        conformance.check("numpy", cells=["spans"])


def test_a_named_backend_that_cannot_load_is_one_line_with_the_cause(clean_registry, capsys):
    from attnspec.dispatch import registry

    def broken():
        raise ImportError("No module named 'fancykernels'")

    registry._entries["broken"] = registry._Entry("broken", "entry point", broken)
    assert cli.main(["check", "--backend", "broken", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fancykernels" in err[0] and "Traceback" not in err[0]
    assert cli.main(["check", "--backend", "no_such_module_xyz:backend", "--quiet"]) == 2
    assert "cannot import no_such_module_xyz" in capsys.readouterr().err


def test_backend_given_as_module_attribute_is_checked(monkeypatch, capsys, tmp_path):
    monkeypatch.syspath_prepend(str(EXAMPLE))
    code = cli.main(["check", "--backend", "attnspec_example:backend", "--quiet", "--dtype", "float64",
                     "--artifacts", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "examplekernel: passed" in out and "PASSED: 1 backend(s) checked" in out
    assert "examplekernel" not in attnspec.dispatch.registry.names()  # registered for the run only


def test_the_summary_says_what_was_not_checked_and_passed_counts_only_checked(registered, capsys):
    gpu_only = _numpy_backend("gpu-only")
    kernel = gpu_only.kernels["attention"]
    gpu_only = attnspec.Backend("gpu-only", "0", {"attention": replace(
        kernel, capabilities=replace(kernel.capabilities, devices=("cuda",)))})
    registered(gpu_only)
    assert cli.main(["check", "--backend", "gpu-only", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "gpu-only: not checked: device=cpu (supported: cuda)" in out
    assert "NOTHING CHECKED: 0 backend(s) checked" in out and "PASSED" not in out


def test_replayed_failures_raise_the_public_exception(registered, tmp_path):
    def wrong(q, k, v, **kwargs):
        return reference.attention(q, k, v, **kwargs) * 1.01

    name = registered(_numpy_backend("off-by-one-percent", fn=wrong))
    report = conformance.check(name, dtypes=["float64"], cells=["entmax"], artifacts_dir=str(tmp_path))
    with pytest.raises(conformance.ConformanceError, match=r"\[forward\]"):
        conformance.replay(report.failures[0].npz)


def test_a_backend_object_can_be_checked_from_python(tmp_path):
    backend = _numpy_backend("unregistered-object")
    report = conformance.check(backend, dtypes=["float64"], cells=["entmax"], artifacts_dir=str(tmp_path))
    assert report.passed and report.backend == "unregistered-object"
    assert "unregistered-object" not in attnspec.dispatch.registry.names()


# The shape-constrained, tiled example backend ------------------------------------------------

def _example():
    sys.path.insert(0, str(EXAMPLE))
    try:
        import attnspec_example
    finally:
        sys.path.remove(str(EXAMPLE))
    return attnspec_example


def test_example_kernel_is_tiled_and_exact_across_tiles():
    example = _example()
    rng = np.random.default_rng(1)
    for Lq, Lk, alpha in ((17, 65, 1.0), (113, 203, 1.5), (33, 97, np.array([1.0, 1.0 + 1e-6, 1.3, 2.0]))):
        q, k, v = rng.normal(size=(1, 4, Lq, 40)) * 3, rng.normal(size=(1, 2, Lk, 40)), rng.normal(size=(1, 2, Lk, 24))
        kwargs = dict(alpha=alpha, causal=True, key_lengths=np.array([Lk - 5]), q_offset=None, scale=None)
        out = example.attention(q, k, v, span=None, ramp=32.0, **kwargs)
        np.testing.assert_allclose(out, reference.attention(q, k, v, **kwargs), atol=1e-13)
    assert example.backend().kernels["attention"].capabilities.head_dims == range(16, 129)


def test_example_kernel_passes_at_tile_crossing_sizes_and_its_tile_bug_is_caught(monkeypatch, tmp_path):
    example = _example()
    report = conformance.check(example.backend(), dtypes=["float64"], artifacts_dir=str(tmp_path))
    assert report.passed, str(report)
    ran = [c for c in report.cells if c.status == "pass"]
    assert len(ran) == 6 and all(c.tile_crossing >= 1 for c in ran)
    monkeypatch.setenv("ATTNSPEC_EXAMPLE_BUG", "last-tile")
    report = conformance.check(example.backend(), dtypes=["float64"], artifacts_dir=str(tmp_path),
                               stop_on_first_failure=True, shrink=False)
    assert not report.passed and report.failures[0].check == "forward"
    assert "tile-crossing" in report.failures[0].example
    # Shrinking goes to the smallest tile-crossing shape that shows it: 33 keys, one past a tile.
    cell = report.failures[0].cell
    report = conformance.check(example.backend(), dtypes=["float64"], cells=[cell], artifacts_dir=str(tmp_path))
    assert not report.passed
    assert "k[2, 2, 33, 59]" in report.failures[0].example, report.failures[0].example


def test_plugin_rejects_an_unknown_dtype(pytester):
    pytester.makepyfile(test_own="def test_own_things():\n    assert True\n")
    result = pytester.runpytest_subprocess("--attnspec-backend=numpy", "--attnspec-dtype=fp32", "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*--attnspec-dtype: invalid choice: 'fp32'*float32*"])


def test_plugin_reports_a_backend_that_cannot_load_in_one_line(pytester):
    result = pytester.runpytest_subprocess("--attnspec-backend=no_such_module_xyz:backend", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*attnspec conformance: 11 items*",
                                 "*attnspec backend 'no_such_module_xyz:backend' cannot be loaded: *"
                                 "cannot import no_such_module_xyz*"])
    assert "Traceback" not in result.stdout.str()
    result.assert_outcomes(failed=11)
