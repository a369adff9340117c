"""attnspec.bench: the quick preset end to end, the pieces it relies on, and the dispatch-overhead
micro-benchmark. No timing targets are asserted here (speed claims live in bench/ as ratios)."""

import dataclasses
import json
import math

import numpy as np
import pytest

import attnspec
from attnspec import bench
from attnspec.bench import core, report, runners, sweep
from attnspec.bench import inputs as bench_inputs
from attnspec.bench.targets import Target


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """The quick preset, run once for the module through the CLI entry point."""
    from attnspec import cli

    out = tmp_path_factory.mktemp("bench") / "quick"
    assert cli.main(["bench", "--preset", "quick", "--quiet", "--out", str(out)]) == 0
    with open(f"{out}.json") as f:
        return out, json.load(f)


def test_quick_preset_writes_json_table_and_plot(quick):
    out, data = quick
    assert data["preset"] == "quick" and data["baseline"] == "sdpa"
    env = data["environment"]
    for key in ("python", "cpu", "cpus_usable", "attnspec", "numpy", "date", "load_average_at_start"):
        assert key in env
    configs = {r["config"] for r in data["rows"]}
    assert len(configs) == len(sweep.PRESETS["quick"].configs())
    # every default target appears in every case: run, or with a reason (opt-in yardsticks
    # such as flex-window run only where a preset names them)
    targets = {t.name for t in bench.targets.all_targets() if t.default}
    assert {"sdpa-flash", "flex-window"} & targets == set()
    for config in configs:
        assert {r["target"] for r in data["rows"] if r["config"] == config} == targets
    for row in data["rows"]:
        if row["status"] == "ok":
            assert row["median_s"] > 0 and row["q1_s"] <= row["median_s"] <= row["q3_s"]
            assert row["min_s"] <= row["median_s"] <= row["max_s"] and row["repeats"] >= 1
            assert row["ratio"] is not None and row["ratio"] > 0
            assert 0 <= row["sparsity"] <= 1 and row["max_abs_err"] is not None
        else:
            assert row["reason"], row
    table = open(f"{out}.md").read()
    assert "| target | kind | median ms | IQR ms | × sdpa |" in table
    pytest.importorskip("matplotlib")
    with open(f"{out}.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_quick_preset_rows_are_honest(quick):
    _, data = quick
    rows = {(r["target"], r["config"]): r for r in data["rows"]}
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    # the baseline is 1x itself; attnspec backends compute the configuration's function accurately
    assert all(math.isclose(r["ratio"], 1.0) for r in ok if r["target"] == "sdpa")
    for r in ok:
        if r["kind"] == "attnspec":
            assert r["same_function"] and r["max_abs_err"] < 1e-5, r
    # a peer that computes another function says so, and is compared with what it computes
    sdpa = [r for r in ok if r["target"] == "sdpa" and r["alpha"] == 1.5]
    assert sdpa and all(not r["same_function"] and "different function" in r["note"] for r in sdpa)
    assert all(r["max_abs_err"] < 1e-5 for r in sdpa)
    # unavailable or unsupported peers are listed with their reasons
    for (target, config), r in rows.items():
        if target == "adasplash":
            assert r["status"] in ("unavailable", "unsupported") and ("CUDA" in r["reason"] or "install" in r["reason"])
        if target.startswith("entmax") and r["span"] is not None and r["status"] != "unavailable":
            assert r["status"] == "unsupported" and "no weighted entmax" in r["reason"]
        if target == "numpy" and r["B"] * r["H"] * r["L"] ** 2 > sweep.PRESETS["quick"].numpy_max_scores:
            assert r["status"] == "skipped" and "--numpy-max-scores" in r["reason"]
        if target == "flex":
            assert r["status"] == "not run" and r["reason"]
    # the zero probabilities of entmax configurations (alpha = 1.5) exceed those of softmax
    sparsity = {(r["alpha"], r["span"], r["L"]): r["sparsity_allowed"] for r in ok if r["sparsity"] is not None}
    assert sparsity[(1.5, None, 64)] > sparsity[(1.0, None, 64)] == 0.0


def test_a_backend_that_cannot_run_is_listed_with_the_dispatchers_reasons():
    """A registered backend shows up without any benchmark code, and refusals carry the
    dispatcher's own reasons."""
    from attnspec import Backend, Capabilities, Kernel

    def fn(q, k, v, **kwargs):
        return attnspec.reference.attention(q, k, v, **kwargs)

    caps = Capabilities(array_type="numpy", dtypes=("float32",), features=frozenset({"causal"}))
    attnspec.register_backend(Backend(name="bench-test", version="0",
                                      kernels={"attention": Kernel("attention", fn, caps)}, automatic=False))
    try:
        preset = dataclasses.replace(sweep.PRESETS["quick"], sweep=sweep.Sweep(L=(16,), alpha=(1.0, 1.5),
                                     H=(2,), D=(8,), mode=("fwd",)), numpy_max_scores=10**6, overhead=False)
        result = core.run(preset, targets=["bench-test", "numpy"], baseline="numpy", progress=False)
    finally:
        attnspec.unregister_backend("bench-test")
    rows = {(r["target"], r["alpha"]): r for r in result.rows}
    assert rows[("bench-test", 1.0)]["status"] == "ok" and rows[("bench-test", 1.0)]["max_abs_err"] < 1e-6
    refused = rows[("bench-test", 1.5)]
    assert refused["status"] == "unsupported" and refused["reason"] == "feature 'entmax' is not supported"
    assert rows[("numpy", 1.5)]["ratio"] == 1.0
    assert "sdpa" not in {r["target"] for r in result.rows}  # only what was asked for (and the baseline)


def test_jax_runner_with_the_jax_peer():
    pytest.importorskip("jax")
    cfg = sweep.Case(L=24, alpha=1.0, causal=True, H=4, Hkv=2, D=8, mode="fwd+bwd")
    runner = runners.runner_for("jax")
    inputs, arrays = bench_inputs.make_inputs(runner, cfg, "cpu", seed=1)
    target = next(t for t in bench.targets.all_targets() if t.name == "jax-sdpa")
    prepared = runner.prepare(target.build(cfg, inputs, "cpu").fn, inputs, cfg.mode)
    assert prepared.compile_s > 0
    out, (dq, dk, dv) = prepared.step()
    assert dk.shape == (1, 2, 24, 8)
    ref = attnspec.reference.attention(*arrays[:3], alpha=1.0, causal=True)
    np.testing.assert_allclose(prepared.output(), ref, atol=1e-5)


def test_rounding_to_dtype_is_exact_and_shared():
    a = np.random.default_rng(0).standard_normal(1000) * 10
    for dtype in ("float16", "float32", "float64"):
        np.testing.assert_array_equal(runners.round_to_dtype(a, dtype), a.astype(dtype).astype(np.float64))
    b = runners.round_to_dtype(a, "bfloat16")
    assert np.all(np.abs(b - a) <= np.abs(a) * 2.0**-8)
    bits = b.astype(np.float32).view(np.uint32)
    assert np.all(bits & 0xFFFF == 0)
    torch = pytest.importorskip("torch")
    expected = torch.tensor(a, dtype=torch.float32).to(torch.bfloat16).double().numpy()
    np.testing.assert_array_equal(b, expected)


def test_reference_rows_subset_matches_the_full_reference():
    cfg = sweep.Case(L=48, alpha=1.5, span=6.0, ramp=3.0, causal=True, H=2, Hkv=1, D=4)
    q, k, v, _ = bench_inputs.draw_arrays(cfg, seed=3)
    blocks = core.reference_rows(cfg, full_scores=0, rows=16)
    assert len(blocks) == 4 and blocks[-1][1] == 48
    part = core.reference(q, k, v, blocks, **cfg.attention_kwargs())
    full = attnspec.reference.attention(q, k, v, **cfg.attention_kwargs())
    expected = np.concatenate([full[:, :, a:b] for a, b in blocks], axis=2)
    np.testing.assert_allclose(part["out"], expected, rtol=0, atol=1e-12)
    assert 0 < part["sparsity_allowed"] < part["sparsity"] < 1


def test_timing_statistics():
    calls = []
    t = bench.timing.measure(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and len(t.samples) == 4
    assert t.min <= t.q1 <= t.median <= t.q3 <= t.max and t.iqr >= 0
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        bench.timing.measure(lambda: None, repeats=0)


def test_unknown_targets_and_baselines_are_errors():
    with pytest.raises(ValueError, match="unknown benchmark target 'nope'"):
        core.run(sweep.PRESETS["quick"], targets=["nope"], progress=False)
    with pytest.raises(ValueError, match="--baseline 'nope' is not a benchmark target"):
        core.run(sweep.PRESETS["quick"], baseline="nope", progress=False)


def test_a_failing_target_is_reported_not_dropped(monkeypatch):
    class Broken(Target):
        def build(self, cfg, inputs, device):
            raise RuntimeError("kernel exploded")

    broken = Broken("broken", "numpy", "peer", "always fails")
    monkeypatch.setattr(core, "all_targets", lambda: bench.targets.all_targets() + [broken])
    preset = dataclasses.replace(sweep.PRESETS["quick"], sweep=sweep.Sweep(L=(8,), alpha=(1.0,), H=(1,), D=(4,),
                                 mode=("fwd",)), numpy_max_scores=10**6)
    result = core.run(preset, targets=["broken", "numpy"], baseline="numpy", progress=False)
    row = next(r for r in result.rows if r["target"] == "broken")
    assert row["status"] == "error" and row["reason"] == "RuntimeError: kernel exploded"
    assert "error: RuntimeError: kernel exploded" in report.markdown(result)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="Linux peak-RSS measurement")
def test_peak_memory_in_a_fresh_process():
    """One numpy call in a child process: the peak growth sees its score buffers."""
    from attnspec.bench import memory

    cfg = sweep.Case(L=256, alpha=1.5, H=2, D=8, mode="fwd")
    result = memory.measure(cfg, "numpy", "cpu", seed=0, timeout=120)
    assert "error" not in result, result
    # the reference holds several float64 [B, H, L, L] arrays: at least 2 of them (2 MiB)
    assert result["peak_bytes"] >= 2 * 8 * cfg.scores, result


def test_dispatch_overhead_reports_sane_numbers():
    o = bench.dispatch_overhead("numpy", number=200, rounds=3, backends=False)
    for key in ("validation_us", "selection_us", "null_direct_us", "null_dispatched_us"):
        assert 0 < o[key] < 10**5 and 0 < o[key.replace("_us", "_cpu_us")] < 10**5
    assert o["null_dispatched_us"] > o["null_direct_us"]
    assert math.isclose(o["overhead_us"], o["null_dispatched_us"] - o["null_direct_us"])
    assert "bench-null-kernel" not in attnspec.dispatch.registry.names()  # cleaned up
    text = report.overhead_markdown(o)
    assert "dispatch overhead" in text and "target ≤ 20 µs" in text


def test_time_prediction_for_skipping_large_sizes():
    assert core._predict([], 512) is None
    assert core._predict([(256, 1.0)], 512)[0] == 2.0  # one size: linear, a lower bound
    assert math.isclose(core._predict([(256, 1.0), (512, 4.0)], 1024)[0], 16.0)  # L^2
    assert math.isclose(core._predict([(256, 1.0), (512, 1.0)], 1024)[0], 2.0)  # clamped to L^1
    assert math.isclose(core._predict([(256, 1.0), (512, 16.0)], 1024)[0], 64.0)  # clamped to L^2
