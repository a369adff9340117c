"""bench/shapes.py: its rows (simple JSON), the flatness summary, the table and the plot."""

import json

import pytest

pytest.importorskip("torch")

from attnspec.bench import shapes  # noqa: E402

KEYS = {"name", "family", "shape", "attnspec_s", "sdpa_s", "ratio", "target_ratio", "met", "backend"}


def test_rows_are_simple_json_with_their_backend_and_target():
    rows = shapes.overhead_rows(number=20, rounds=2)
    rows += shapes.decode_rows(shapes._targets(1), repeats=1, caches=(64, 256))
    json.loads(json.dumps(rows))
    for row in rows:
        assert KEYS <= set(row), row
        assert row["ratio"] == pytest.approx(row["attnspec_s"] / row["sdpa_s"])
    by = {(r["name"], r.get("cache")): r for r in rows}
    assert by[("tiny call alpha=1", None)]["backend"] == "torch-sdpa"
    assert by[("tiny call alpha=1", None)]["met"] == (by[("tiny call alpha=1", None)]["overhead_us"] <= 20.0)
    assert by[("decode alpha=1", 64)]["backend"] == "torch-sdpa"
    assert by[("decode alpha=1.5 span 256", 256)]["backend"] == "torch-decode"
    assert by[("decode alpha=1", 256)]["target_ratio"] == 1.2
    assert by[("decode alpha=1 span 256", 256)]["target_ratio"] is None  # its target is at 8192 keys
    flat = shapes.flatness(rows)
    assert [f["name"] for f in flat] == ["decode alpha=1 span 256", "decode alpha=1.5 span 256"]
    assert flat[0]["caches"] == [64, 256]


def test_table_and_plot(tmp_path):
    def row(name, family, ratio, target, **extra):
        return dict(name=name, family=family, shape=[1], attnspec_s=ratio * 1e-3, sdpa_s=1e-3, ratio=ratio, cpu_ratio=ratio,
                    target_ratio=target, met=None if target is None else ratio <= target, backend="torch", **extra)

    rows = [row(n, "decode", 0.5, 1.2, cache=c) for n, _, _ in shapes.DECODE_VARIANTS for c in shapes.CACHES]
    rows += [row("training alpha=1", "training", 1.05, 1.1), row("long alpha=1.5 L=2048", "long", 2.0, 1.5),
             row("tiny call alpha=1", "overhead", 2.0, None, overhead_us=9.0, target_overhead_us=20.0,
                 kernel_own_s=1e-6)]
    results = [dict(threads=t, load_average_before=[1.0, 1.0, 1.0], load_average_after=[1.0, 1.0, 1.0], rows=rows,
                    flat=shapes.flatness(rows)) for t in (1, 2)]
    table = shapes.format_table(results[0])
    assert "overhead 9.0 us (target <= 20 us)" in table and "NO" in table  # the long row misses
    path = tmp_path / "shapes.png"
    shapes.plot(results, str(path))
    assert path.stat().st_size > 10_000


def test_the_shapes_and_transformers_presets_run_their_programs(monkeypatch):
    import argparse
    import importlib

    from attnspec.bench import cli

    for preset, module in cli.PROGRAM_PRESETS.items():
        seen = []
        monkeypatch.setattr(importlib.import_module(module), "main", lambda argv, seen=seen: seen.append(argv))
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser)
        args = parser.parse_args(["--preset", preset, "--threads", "1", "--out", "results/x"])
        assert cli.run_command(args) == 0
        assert seen == [["--threads", "1", "--json", "results/x.json"]]


def test_padded_rows_compare_the_selected_kernel_with_the_tiled_one(monkeypatch):
    """bench/padded.py: a left-padded decode step goes to torch-sdpa (alpha = 1) and
    torch-decode (other alpha), the padded training call to torch-sdpa; rows are plain JSON."""
    from attnspec.bench import padded

    monkeypatch.setattr(padded, "TRAINING", (2, 2, 32, 16))
    rows = padded.decode_rows(repeats=1, caches=(64,)) + padded.training_rows(repeats=1)
    json.loads(json.dumps(rows))
    assert [(r["name"], r["backend"]) for r in rows] == [
        ("decode alpha=1", "torch-sdpa"), ("decode alpha=1.5", "torch-decode"),
        ("decode alpha=1.5 span 256", "torch-decode"), ("training alpha=1", "torch-sdpa")]
    for r in rows:
        assert r["ratio"] == pytest.approx(r["selected_s"] / r["tiled_s"])
        assert r["mask_cost"] == pytest.approx(r["selected_s"] / r["unpadded_s"])
    mask = padded._left_padding(4, 100)
    assert mask[0].all() and not mask.all() and all(row[int(row.int().argmax()):].all() for row in mask)
