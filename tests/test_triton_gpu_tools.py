"""The CPU-side logic of the Triton backend's GPU tooling in tools/ (nothing here needs a GPU):
tools/adasplash_accuracy.py's measuring code, tools/triton_autotune.py's table entries and
merge, and tools/gpu_session.py's plan and cell-by-cell conformance runs.

TRITON_INTERPRET=1 is set at import, as in tests/test_triton_backend.py, in case anything here
is the first to load the triton backend.
"""

import importlib
import json
import os
import pathlib
import sys

import numpy as np
import pytest

os.environ["TRITON_INTERPRET"] = "1"
torch = pytest.importorskip("torch")

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))  # the tools are scripts of the checkout, not installed modules

import adasplash_accuracy  # noqa: E402
import gpu_session  # noqa: E402
import triton_autotune  # noqa: E402

from attnspec import reference  # noqa: E402


def test_the_tools_are_not_part_of_the_installed_package():
    for name in ("gpu_session", "triton_autotune", "adasplash_accuracy"):
        with pytest.raises(ImportError):
            importlib.import_module(f"attnspec.bench.{name}")
    assert pathlib.Path(gpu_session.__file__).parent == TOOLS


def _reference_attend(causal, factor=1.0):
    """An 'implementation' computing the float64 reference, its p optionally scaled."""
    def attend(q, k, v):
        out = reference.attention(*(x.double().numpy() for x in (q, k, v)), alpha=1.5, causal=causal)
        return torch.from_numpy(out * factor).to(q.dtype)
    return attend


@pytest.mark.parametrize("causal", [False, True])
def test_the_probe_reads_p_and_row_sums_through_the_kernel(causal):
    """L = 100 (a partial last block of 64 keys): an implementation equal to the reference has
    errors at float32 rounding; one whose p is 0.1% too large shows it in p and the row sums."""
    q, k, v = adasplash_accuracy.inputs(torch, 100, torch.float32, "cpu", q_scale=3.0)
    want = adasplash_accuracy.reference_solution(q, k, v, causal)
    exact = adasplash_accuracy.errors(adasplash_accuracy.probe(torch, _reference_attend(causal), q, k, v), want)
    assert exact["max_abs_p_err"] <= 1e-7 and exact["max_abs_rowsum_err"] <= 1e-6, exact
    assert exact["support_mismatches"] == 0 and exact["reference_support_size"] == int((want[1] > 0).sum())
    assert 100 <= exact["reference_support_size"] < (5050 if causal else 10000)  # sparse, every row non-empty
    off = adasplash_accuracy.errors(adasplash_accuracy.probe(torch, _reference_attend(causal, 1.001), q, k, v), want)
    assert 0.9e-3 <= off["max_abs_rowsum_err"] <= 1.1e-3
    assert off["max_abs_p_err"] == pytest.approx(1e-3 * float(want[1].max()), rel=1e-3)


def test_an_entry_point_that_fails_is_recorded_with_its_line(monkeypatch):
    def broken(q, k, v):
        raise TypeError("no tiles")

    monkeypatch.setattr(adasplash_accuracy, "_implementations",
                        lambda torch, causal: [("ref", _reference_attend(causal), {}), ("broken", broken, {})])
    rows = adasplash_accuracy.run(torch, "cpu", [64], ["float32"], causals=(True,), kinds=("randn",),
                                  log=lambda line: None)
    assert rows[0]["max_abs_out_err"] <= 1e-6 and "error" not in rows[0]
    assert rows[1]["error"] == "TypeError: no tiles" and rows[1]["raised_at"] is None  # not adasplash's line
    late = adasplash_accuracy.run(torch, "cpu", [64, 128], ["float32"], causals=(True,), kinds=("randn",),
                                  log=lambda line: None, budget_s=0.0)
    assert [r["error"] for r in late] == ["not run: past the 0.0 s budget"] * 2


def test_default_niter_reads_the_declared_default():
    def v1(q, k, v, alpha=1.5, niter=10):
        pass

    def v2(x, alpha=1.5, n_iter=2):
        pass

    assert adasplash_accuracy.default_niter(v1) == {"niter": 10}
    assert adasplash_accuracy.default_niter(v2) == {"n_iter": 2}
    assert adasplash_accuracy.default_niter(lambda q: q) == {}


def _run(D, dtype, device="NVIDIA H100 80GB HBM3", best=(128, 64)):
    cfg = dict(BLOCK_M=best[0], BLOCK_N=best[1], forward=[8, 3], backward_dq=[4, 2], backward_dkdv=[8, 1])
    rows = [dict(stage=1, tuning="tiles", config=dict(cfg, forward=[4, 2]), forward_s=2e-3, backward_s=5e-3,
                 total_s=7e-3),
            dict(stage=1, tuning="tiles", config=dict(cfg, BLOCK_M=32), error="OutOfResources: shared memory"),
            dict(stage=2, tuning="forward", config=cfg, forward_s=1.5e-3, backward_s=5e-3, total_s=6.5e-3)]
    return dict(device=device, capability=[9, 0], family="sm90", versions=dict(triton="3.6.0"), date="2026-01-01",
                shape=dict(B=2, H=16, L=8192, D=D, dtype=dtype, causal=True, alpha=1.5), rows=rows,
                best=dict(config=cfg, forward_s=1.5e-3, backward_s=5e-3, speedup=1.08))


def test_merged_autotune_runs_give_entries_the_table_accepts(tmp_path, capsys):
    from attnspec.backends.triton import tuning

    for D, dtype in [(128, "bfloat16"), (64, "bfloat16"), (64, "float32")]:
        (tmp_path / f"triton_autotune_nvidia_h100_80gb_hbm3_d{D}_{dtype}.json").write_text(json.dumps(_run(D, dtype)))
    (merged,) = triton_autotune.merge(str(tmp_path))
    assert (tmp_path / "triton_autotune_nvidia_h100_80gb_hbm3.png").stat().st_size > 0
    entries = merged["table_entries"]
    assert [(e["max_head_dim"], e["dtypes"]) for e in entries] == [
        (64, ["bfloat16", "float16"]), (64, ["float32"]), (128, ["bfloat16", "float16"])]
    assert all("bench/results/triton_autotune_nvidia_h100_80gb_hbm3.json" in e["source"] for e in entries)
    # as printed: JSON lines that are also Python literals, pasted ahead of the untuned entries
    printed = [json.loads(line.strip().rstrip(",")) for line in capsys.readouterr().out.splitlines()
               if line.startswith("    {")]
    assert printed == entries
    table = dict(tuning.CONFIGS, sm90=printed + tuning.CONFIGS["sm90"])
    tuning.check_table(table)
    chosen = tuning.select((9, 0), 64, "float16", table=table, env={})
    assert (chosen.block_m, chosen.block_n, chosen.options("forward")) == (128, 64, dict(num_warps=8, num_stages=3))
    assert tuning.select((9, 0), 256, "bfloat16", table=table, env={}).source.startswith("untuned default")


def test_merge_writes_one_file_per_gpu_and_ignores_merged_files(tmp_path, capsys):
    (tmp_path / "triton_autotune_a_d64_bfloat16.json").write_text(json.dumps(_run(64, "bfloat16", device="A")))
    (tmp_path / "triton_autotune_b_d64_bfloat16.json").write_text(json.dumps(_run(64, "bfloat16", device="B")))
    first = triton_autotune.merge(str(tmp_path))
    assert [m["device"] for m in first] == ["A", "B"]
    assert (tmp_path / "triton_autotune_a.json").exists() and (tmp_path / "triton_autotune_b.json").exists()
    assert [m["device"] for m in triton_autotune.merge(str(tmp_path))] == ["A", "B"]  # merged files not re-read
    with pytest.raises(SystemExit, match="no triton_autotune"):
        triton_autotune.merge(str(tmp_path / "missing"))


class _FakeTimer:
    """Synthetic timings with one best configuration: tiles 128 x 64, forward (8, 3),
    backward_dq (4, 1), backward_dkdv (8, 2); 128 x 128 runs out of shared memory."""
    shape = dict(B=2, H=16, L=8192, D=64, dtype="bfloat16", causal=True)

    def __init__(self):
        self.calls = 0

    def time(self, config, alpha=None):
        self.calls += 1
        tiles = (config["BLOCK_M"], config["BLOCK_N"])
        if tiles == (128, 128):
            raise RuntimeError("OutOfResources: shared memory, Required: 264192")
        tile_cost = 1.0 if tiles == (128, 64) else 1.3 if tiles == (64, 64) else 2.0

        def launch(kernel, best):
            return 1.0 if config[kernel] == list(best) else 1.1

        fwd = tile_cost * launch("forward", (8, 3))
        bwd = tile_cost * (launch("backward_dq", (4, 1)) + launch("backward_dkdv", (8, 2)))
        return fwd * 1e-3, bwd * 1e-3, torch.full((2, 2), float(tiles[0] + tiles[1]))


def test_the_sweep_finds_the_best_tiles_and_launch_options_per_kernel(monkeypatch):
    monkeypatch.setattr(triton_autotune, "_require_gpu", lambda: torch)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    timer = _FakeTimer()
    result = triton_autotune.tune(64, "bfloat16", log=lambda line: None, timer=timer)
    best = result["best"]["config"]
    assert (best["BLOCK_M"], best["BLOCK_N"]) == (128, 64)
    assert (best["forward"], best["backward_dq"], best["backward_dkdv"]) == ([8, 3], [4, 1], [8, 2])
    assert result["family"] == "sm90" and result["cut_by_budget"] is False
    errors = [r for r in result["rows"] if "error" in r]
    assert [(r["config"]["BLOCK_M"], r["config"]["BLOCK_N"]) for r in errors] == [(128, 128)]
    assert result["best"]["speedup"] > 1.3 and result["best"]["max_abs_out_diff_vs_untuned"] == 64.0
    # finalists 128x64 and 64x64, each kernel's other 6 launch options: 8 + 2 * 3 * 6 timings
    assert sum(r["stage"] == 2 for r in result["rows"]) == 36
    # a budget already spent: nothing timed, and the result says it was cut
    cut = triton_autotune.tune(64, "bfloat16", log=lambda line: None, timer=_FakeTimer(), budget_s=0.0)
    assert cut["cut_by_budget"] is True and cut["rows"] == [] and "best" not in cut


def test_the_autotune_plan_lists_every_tile_pair_at_the_default_launch():
    stage1, stage2 = triton_autotune.plan((64,), ("bfloat16",), finalists=2)
    assert [(c["BLOCK_M"], c["BLOCK_N"]) for c in stage1["candidates"]] == triton_autotune.TILES
    assert "42 timings" in stage2["candidates"]


def test_every_gpu_session_step_fits_its_time_limit():
    gpu_session.check_plan()
    with pytest.raises(ValueError, match="add up to 600 s"):
        gpu_session.check_plan({"x": [gpu_session.SubStep("a", ("m",), 300), gpu_session.SubStep("b", ("m",), 300)]})
    for step, subs in gpu_session.STEPS.items():
        lines = []
        assert gpu_session.run_step(step, "unused", dry_run=True, log=lines.append) == []
        limits = [int(line.split("timeout --kill-after=10 ")[1].split()[0]) for line in lines]
        assert limits == [s.timeout_s for s in subs] and "{" not in "".join(lines)  # every placeholder filled


def test_the_gpu_session_runs_the_bench_presets_and_the_tools_by_path():
    lines = []
    gpu_session.run_step("targets", "unused", dry_run=True, log=lines.append)
    assert "-m attnspec bench --preset triton-targets --L 8192,16384" in lines[0]
    assert f"{TOOLS}/adasplash_accuracy.py --budget-s 70" in lines[1]
    steps = " ".join(" ".join(s.argv) for subs in gpu_session.STEPS.values() for s in subs)
    assert "attnspec.bench." not in steps and "$" not in steps


def test_the_gpu_session_conformance_runs_cell_by_cell_and_lists_cells_past_the_budget(tmp_path, monkeypatch):
    from attnspec.conformance import strategies

    path = tmp_path / "r.json"
    none = gpu_session.conformance_by_cell("numpy", "float64", 0.0, str(path), profile="ci", device=None,
                                           log=lambda line: None)
    assert none["passed"] is False and none["cells"] == []
    assert json.loads(path.read_text())["not_run"] == [c.name for c in strategies.CELLS]
    monkeypatch.setattr(strategies, "CELLS", strategies.CELLS[:2])
    two = gpu_session.conformance_by_cell("numpy", "float64", 600.0, str(path), profile="ci", device=None,
                                          examples=1, log=lambda line: None)
    assert two["passed"] is True and two["not_run"] == []
    assert [c["cell"] for c in two["cells"]] == [c.name for c in strategies.CELLS]
    assert all(c["status"] == "pass" and c["dtype"] == "float64" for c in two["cells"])
    assert json.loads(path.read_text())["cells"] == two["cells"] and np.isfinite(two["seconds"])


def test_a_gpu_session_step_packs_what_finished_and_reports_a_time_limit(tmp_path, monkeypatch):
    import tarfile

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setitem(gpu_session.STEPS, "smoke", [
        gpu_session.SubStep("list steps", ("{tools}/gpu_session.py", "--list"), 120),
        gpu_session.SubStep("too slow", ("-m", "timeit", "-n1", "-r1", "import time; time.sleep(30)"), 1),
    ])
    out = tmp_path / "out"
    outcomes = gpu_session.run_step("smoke", str(out), log=lambda line: None)
    assert [o["rc"] for o in outcomes] == [0, 124]
    summary = (out / "smoke_summary.txt").read_text().splitlines()
    assert summary[0].startswith("list steps: ok") and summary[1].startswith("too slow: TIMED OUT")
    with tarfile.open(out / "smoke.tar.gz") as tar:
        names = set(tar.getnames())
        log = tar.extractfile("logs/list_steps.log").read().decode()
    assert {"results", "logs/list_steps.log", "logs/too_slow.log"} <= names
    assert "conformance (sub-step limits" in log
