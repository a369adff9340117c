"""The presets of `attnspec bench` beyond quick: each runs end to end at tiny sizes (the same
code as the committed runs, smaller), with its targets, baseline, clock and memory settings."""

import dataclasses
import json
import math

import pytest

from attnspec.bench import cli as bench_cli
from attnspec.bench import core, inputs, sweep
from attnspec.bench.sweep import Case, Cases, Preset, Sweep


def _run_cli(tmp_path, *args):
    from attnspec import cli

    out = tmp_path / "run"
    assert cli.main(["bench", *args, "--quiet", "--no-plot", "--out", str(out)]) == 0
    with open(f"{out}.json") as f:
        return json.load(f), open(f"{out}.md").read()


def test_the_cli_offers_exactly_the_presets():
    assert tuple(sweep.PRESETS) == bench_cli.PRESET_NAMES
    for name, preset in sweep.PRESETS.items():
        assert preset.name == name and preset.configs()


def test_torch_targets_preset(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("entmax")
    data, table = _run_cli(tmp_path, "--preset", "torch-targets", "--L", "32", "--D", "16", "--repeats", "1",
                           "--no-memory", "--threads", "1")
    assert data["preset"] == "torch-targets" and data["baseline"] == "sdpa" and data["options"]["threads"] == 1
    by_case = {}
    for row in data["rows"]:
        by_case.setdefault((row["alpha"], row["span"]), {})[row["target"]] = row
    # α = 1.5: the tiled and eager backends against SDPA and the entmax package, in one run
    entmax = by_case[(1.5, None)]
    assert set(entmax) == {"torch", "torch-eager", "entmax15", "entmax_bisect", "sdpa"}
    for row in entmax.values():
        assert row["status"] == "ok" and row["threads"] == 1 and row["threads_requested"] == 1, row
        assert math.isclose(row["ratio"], row["median_s"] / entmax["sdpa"]["median_s"])
    # α = 1 with span 256: only the backend and SDPA's full causal attention
    assert set(by_case[(1.0, 256.0)]) == {"torch", "sdpa"}
    assert "× sdpa" in table


def test_memory_with_both_allocator_settings_and_its_ratio():
    """One NumPy call per allocator setting, each in a fresh process; the memory ratio is to the
    baseline's peak under the same setting."""
    preset = Preset(name="memory-test", description="", sweep=Sweep(L=(128,), alpha=(1.5,), H=(2,), D=(8,),
                                                                    mode=("fwd",), targets=("numpy",), memory=True),
                    memory=False, allocators=("default", "fixed-mmap"), baseline="numpy", overhead=False,
                    repeats=1, numpy_max_scores=10**6)
    result = core.run(preset, progress=False)
    (row,) = result.rows
    assert row["status"] == "ok" and row["memory_error"] is None, row
    peaks = row["peak_bytes_by_allocator"]
    assert set(peaks) == {"default", "fixed-mmap"}
    # the reference holds float64 [B, H, L, L] score arrays: at least 2 of them (512 KiB)
    assert all(p >= 2 * 8 * 2 * 128 * 128 for p in peaks.values()), peaks
    assert row["memory_ratio"] == {"default": 1.0, "fixed-mmap": 1.0}
    assert result.options["allocators"] == ["default", "fixed-mmap"]


def test_jax_targets_preset(tmp_path):
    pytest.importorskip("jax")
    data, _ = _run_cli(tmp_path, "--preset", "jax-targets", "--L", "32", "--D", "16", "--repeats", "1")
    assert data["baseline"] == "jax-sdpa"
    rows = {(r["target"], r["alpha"], r["learned"]): r for r in data["rows"]}
    assert set(rows) == {("jax", 1.5, False), ("jax", 1.5, True), ("jax", 1.0, False),
                         ("jax-sdpa", 1.5, False), ("jax-sdpa", 1.5, True), ("jax-sdpa", 1.0, False)}
    for row in rows.values():
        assert row["status"] == "ok" and row["ratio"] > 0 and row["compile_s"] > 0, row
    # a learned α is an [H] array with its gradient: the same function, accurate
    assert rows[("jax", 1.5, True)]["same_function"] and rows[("jax", 1.5, True)]["max_abs_err"] < 1e-5


def test_torch_eager_crossover_preset_times_cpu_against_the_tiled_backend():
    pytest.importorskip("torch")
    preset = sweep.PRESETS["torch-eager-crossover"]
    assert preset.baseline == "torch" and preset.clock == "process"
    assert {(c.B, c.H, c.L, c.Lk) for c in preset.configs()} == set(sweep.CROSSOVER_SHAPES)
    small = dataclasses.replace(preset, sweep=Cases(preset.sweeps[0].cases[:4], targets=preset.sweeps[0].targets),
                                repeats=1)
    result = core.run(small, progress=False)
    assert result.options["clock"] == "process"
    assert {(r["target"], r["alpha"], r["L"], r["Lk"]) for r in result.rows} == {
        (t, a, L, L) for t in ("torch-eager", "torch") for a in (1.0, 1.5) for L in (8, 32)}
    for r in result.rows:
        assert r["status"] == "ok" and r["learned"] and r["span"] == r["Lk"] / 4 and r["max_abs_err"] < 1e-5, r
        if r["target"] == "torch":
            assert r["ratio"] == 1.0


def test_triton_targets_preset_pairs_each_case_with_its_yardstick():
    preset = sweep.PRESETS["triton-targets"]
    assert preset.device == "cuda"
    pairs = {}
    for case in preset.configs():
        assert case.B * case.H * case.L in (1 << 20, 2 * 16 * 32768) and case.dtype == "bfloat16"
        pairs.setdefault((preset.targets_of(case), preset.baseline_of(case)), []).append(case)
    assert sorted(pairs) == sorted([(("triton", "adasplash"), "adasplash"), (("triton", "sdpa-flash"), "sdpa-flash"),
                                    (("triton", "flex-window"), "flex-window")])
    assert [c.L for c in pairs[(("triton", "adasplash"), "adasplash")]] == [8192, 16384, 32768, 65536]
    (window,) = pairs[(("triton", "flex-window"), "flex-window")]
    assert (window.span, window.ramp, window.alpha) == (512.0, 32.0, 1.0) and not preset.memory_of(window)


def test_flex_window_is_compared_with_the_reference_of_its_hard_window():
    from attnspec.bench.targets import PeerTarget

    kwargs, note = PeerTarget("flex-window", as_softmax=True, keeps_span=True).computes(
        Case(L=8, alpha=1.0, span=5.0, ramp=2.0))
    assert kwargs == dict(alpha=1.0, span=6.0, ramp=0.5, causal=True) and "hard window" in note
    assert PeerTarget("flex", as_softmax=True, keeps_span=True).computes(Case(L=8, span=5.0, ramp=2.0))[1] is None


def test_cases_with_lq_not_lk_and_learned_parameters():
    case = Case(L=4, Lk=48, alpha=1.5, span=16.0, ramp=4.0, H=2, Hkv=1, D=16, learned=True)
    assert case.label().startswith("Lq=4 Lk=48 α=1.5 learned") and case.scores == 2 * 4 * 48
    q, k, v, g = inputs.draw_arrays(case, seed=0)
    assert q.shape == (1, 2, 4, 16) and k.shape == (1, 1, 48, 16) and g.shape == q.shape
    assert [a.tolist() for a in inputs.learned_values(case)] == [[1.5, 1.5], [16.0, 16.0]]
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Case(L=4, threads=0)
    with pytest.raises(ValueError, match="clock must be one of wall, process"):
        Preset(name="x", description="", sweep=Sweep(), clock="cpu")


def test_lengths_on_the_command_line_select_the_cases_of_a_listed_preset():
    import argparse

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    part1 = bench_cli.preset_from_args(parser.parse_args(["--preset", "triton-targets", "--L", "8192,16384"]))
    assert sorted({c.L for c in part1.configs()}) == [8192, 16384] and len(part1.configs()) == 4
    part2 = bench_cli.preset_from_args(parser.parse_args(["--preset", "triton-targets", "--L", "32768,65536"]))
    assert sum(c.span is not None for c in part2.configs()) == 1  # the FlexAttention window case comes along
    with pytest.raises(SystemExit, match="give one value"):
        bench_cli.preset_from_args(parser.parse_args(["--preset", "triton-targets", "--alpha", "1,1.5"]))


def test_cases_of_their_own_shape_are_plotted_as_ratios_against_size(tmp_path):
    """A crossover table has no two cases of one family: its plot is each target's ratio to
    the baseline against the case's size."""
    pytest.importorskip("matplotlib")
    from attnspec.bench import report

    rows = []
    for i, (L, Lk) in enumerate([(8, 8), (1, 256), (64, 64)]):
        case = Case(L=L, Lk=Lk, span=Lk / 4, learned=True)
        for target, ratio in (("torch", 1.0), ("torch-eager", 1.0 + i)):
            rows.append(core._row(case, target, "torch", "attnspec", median_s=1e-3 * ratio, ratio=ratio))
    data = dict(preset="x", baseline="torch", rows=rows, environment={"cpu": "test"}, options={"repeats": 1})
    path = report.plot(data, str(tmp_path / "x.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| torch-eager | attnspec |" in report.markdown(data)
