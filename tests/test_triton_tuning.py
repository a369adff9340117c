"""The Triton backend's launch-configuration table (backends/triton/tuning.py): which entry a
GPU family, head dim and dtype get, the override, and the table's own consistency. Pure
Python, no GPU; the last test checks that the launch code uses the selection.

Like tests/test_triton_backend.py, TRITON_INTERPRET=1 is set at import, before anything can load
the backend (Triton reads it when the kernels are defined).
"""

import json
import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("torch")
pytest.importorskip("triton")

from attnspec.backends.triton import tuning  # noqa: E402


def _entry(**kw):
    base = dict(BLOCK_M=64, BLOCK_N=64, forward=[4, 2], backward_dq=[4, 2], backward_dkdv=[4, 2], source="t")
    return dict(base, **kw)


TABLE = {
    "sm90": [_entry(max_head_dim=64, dtypes=["bfloat16", "float16"], BLOCK_M=128, forward=[8, 3], source="h100 d64"),
             _entry(max_head_dim=128, BLOCK_N=32, source="h100 d128"),
             _entry(BLOCK_M=32, BLOCK_N=32, source="h100 any")],
    "sm8x": [_entry(BLOCK_M=32, source="ampere family")],
    "default": [_entry(max_head_dim=128, source="default d128"), _entry(BLOCK_M=16, BLOCK_N=16, source="default any")],
}


@pytest.mark.parametrize("capability, head_dim, dtype, source, family", [
    ((9, 0), 64, "bfloat16", "h100 d64", "sm90"),
    ((9, 0), 64, "float32", "h100 d128", "sm90"),  # the d64 entry is for half types only
    ((9, 0), 65, "bfloat16", "h100 d128", "sm90"),
    ((9, 0), 256, "float16", "h100 any", "sm90"),
    ((8, 0), 64, "bfloat16", "ampere family", "sm8x"),  # no sm80 key: the major version's family
    ((8, 9), 512, "float32", "ampere family", "sm8x"),
    ((10, 0), 128, "bfloat16", "default d128", "default"),  # an unknown GPU
    ((10, 0), 129, "bfloat16", "default any", "default"),
    (None, 64, "bfloat16", "default d128", "default"),  # meta tensors
])
def test_selection_by_family_head_dim_and_dtype(capability, head_dim, dtype, source, family):
    cfg = tuning.select(capability, head_dim, dtype, table=TABLE, env={})
    assert (cfg.source, cfg.family) == (source, family)


def test_selected_values_and_per_kernel_options():
    cfg = tuning.select((9, 0), 64, "bfloat16", table=TABLE, env={})
    assert (cfg.block_m, cfg.block_n) == (128, 64)
    assert cfg.options("forward") == dict(num_warps=8, num_stages=3)
    assert cfg.options("backward_dkdv") == dict(num_warps=4, num_stages=2)


def test_the_interpreter_gets_its_fixed_small_config_whatever_the_gpu_or_override():
    env = {tuning.ENV: json.dumps(dict(BLOCK_M=128))}
    for capability in [(9, 0), (8, 0), None]:
        cfg = tuning.select(capability, 64, "float32", interpreted=True, table=TABLE, env=env)
        assert (cfg.block_m, cfg.block_n, cfg.family) == (16, 16, "interpreter")
        assert all(cfg.options(k) == dict(num_warps=1, num_stages=1) for k in tuning.KERNELS)


def test_the_override_replaces_only_the_fields_it_names():
    env = {tuning.ENV: json.dumps(dict(BLOCK_N=128, backward_dq=[8, 1]))}
    cfg = tuning.select((9, 0), 64, "bfloat16", table=TABLE, env=env)
    assert (cfg.block_m, cfg.block_n) == (128, 128)
    assert cfg.options("backward_dq") == dict(num_warps=8, num_stages=1)
    assert cfg.options("forward") == dict(num_warps=8, num_stages=3)
    assert cfg.source == f"{tuning.ENV} override"


@pytest.mark.parametrize("override, message", [
    ("{not json", "is not JSON"),
    ("[64, 64]", "must be a JSON object"),
    (json.dumps(dict(BLOCK_M=48)), "BLOCK_M=48 must be a power of two"),
    (json.dumps(dict(BLOCK_N=8)), "BLOCK_N=8 must be a power of two >= 16"),
    (json.dumps(dict(forward=[3, 2])), "forward num_warps=3"),
    (json.dumps(dict(backward_dkdv=[4, 0])), "backward_dkdv num_stages=0"),
    (json.dumps(dict(forward=4)), "forward=4 must be"),
    (json.dumps(dict(BLOCKM=64)), "unknown fields \\['BLOCKM'\\]"),
])
def test_a_bad_override_is_refused_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        tuning.select((9, 0), 64, "bfloat16", table=TABLE, env={tuning.ENV: override})


def test_the_shipped_table_is_consistent_and_marks_untuned_entries():
    tuning.check_table()
    assert {"sm90", "sm80", "default"} <= set(tuning.CONFIGS)
    for key, entries in tuning.CONFIGS.items():
        for entry in entries:
            # an entry is either measured (names the device and the results file) or says it was not
            assert entry["source"].startswith("untuned default") or "bench/results/" in entry["source"], (key, entry)
    # every family answers every head dim and dtype the kernels accept
    for capability in [(9, 0), (8, 0), (8, 6), (7, 5), (12, 0), None]:
        for head_dim in (16, 64, 128, 256, 512):
            for dtype in ("float16", "bfloat16", "float32"):
                tuning.select(capability, head_dim, dtype, env={})


@pytest.mark.parametrize("table, message", [
    ({"sm90": [_entry()]}, "needs a 'default' family"),
    ({"default": [_entry(max_head_dim=128)]}, "must end with an entry for any head dim"),
    ({"default": [_entry(dtypes=["bfloat16"])]}, "must end with an entry for any head dim"),
    ({"default": [_entry(dtypes=["float64"])]}, "dtypes=\\['float64'\\]"),
    ({"default": [{k: v for k, v in _entry().items() if k != "source"}]}, "lacks source"),
])
def test_check_table_refuses_inconsistent_tables(table, message):
    with pytest.raises(ValueError, match=message):
        tuning.check_table(table)


def test_the_launch_code_uses_the_selection(monkeypatch):
    """attention.config on CUDA-less CPU/meta tensors: the interpreter's config when the kernels
    were built for it; the tile map that fake_saved allocates follows the chosen tiles."""
    import torch

    from attnspec.backends.triton import attention

    if not attention.INTERPRETED:
        pytest.skip("the backend was loaded without TRITON_INTERPRET=1 in this process")
    cfg = attention.config(torch.device("cpu"), 64, 64, torch.float32)
    assert (cfg.block_m, cfg.block_n, cfg.family) == (16, 16, "interpreter")
    q = torch.empty(2, 3, 40, 64, device="meta")
    k = torch.empty(2, 3, 70, 64, device="meta")
    saved = attention.fake_saved(q, k, k, None, None, 32.0, False, None, None, 0.125)
    assert tuple(saved[1].shape) == (2, 3, 3, 5)  # ceil(40 / 16), ceil(70 / 16)
    # Compiled kernels (no interpreter) would take the table: the default family on meta tensors.
    monkeypatch.setattr(attention, "INTERPRETED", False)
    cfg = attention.config(torch.device("meta"), 64, 64, torch.bfloat16)
    assert cfg.family == "default" and (cfg.block_m, cfg.block_n) == (64, 64)
    monkeypatch.setenv(tuning.ENV, json.dumps(dict(BLOCK_M=128, BLOCK_N=32)))
    saved = attention.fake_saved(q, k, k, None, None, 32.0, False, None, None, 0.125)
    assert tuple(saved[1].shape) == (2, 3, 1, 3)
