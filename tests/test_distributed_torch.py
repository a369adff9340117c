"""Context-parallel attention on torch.distributed (gloo, CPU): every value and gradient of
the sharded call equals the call on a single device on the whole sequence (float64 to 1e-12,
float32 within SPEC.md section 9), with 2 and 4 processes on uneven blocks."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from attnspec.distributed import geometry  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import distributed_cases  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _spawn(world, tmp_path, only=()):
    mp.spawn(distributed_cases.worker, args=(world, str(tmp_path / "init"), str(tmp_path), list(only)),
             nprocs=world, join=True)
    failures = []
    for rank in range(world):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        failures += [f"rank {rank}: {line}" for line in text.splitlines() if line]
    return failures


def test_two_processes_match_the_single_device_call(tmp_path):
    failures = _spawn(2, tmp_path)
    assert not failures, "\n".join(failures)


def test_four_processes_match_the_single_device_call(tmp_path):
    failures = _spawn(4, tmp_path)
    assert not failures, "\n".join(failures)


# --- geometry -----------------------------------------------------------------------------------


def test_reach_is_the_largest_readable_distance():
    # |d| < R + z exactly (the spec's reach): R + z = 5 reads d = 4 at most; 5.5 reads d = 5.
    assert geometry.reach_keys(3.0, 2.0, "float32") == 4
    assert geometry.reach_keys(3.5, 2.0, "float32") == 5
    assert geometry.reach_keys(0.0, 0.5, "float32") == 0
    # fl(2 + 3.0000002) rounds down to 5.0 in float32, but |d| = 5 has m > 0: it is read.
    assert geometry.reach_keys(3.0000002, 2.0, "float32") == 5
    with pytest.raises(ValueError, match="span and ramp must be finite"):
        geometry.reach_keys(float("nan"), 2.0, "float32")


def test_windows_and_pieces_cover_several_shards():
    layout = geometry.Layout((5, 7, 6, 6))
    assert layout.starts == (0, 5, 12, 18) and layout.total == 24
    # causal, halo 9: rank 2 (positions 12..17) reads keys 3..17, from ranks 0, 1 and itself
    assert geometry.window(layout, 2, 9, True, 0, 0) == (3, 18)
    # both sides: up to 9 after position 17, clipped at the end
    assert geometry.window(layout, 2, 9, False, 0, 0) == (3, 24)
    windows = [geometry.window(layout, r, 9, True, 0, 0) for r in range(4)]
    pieces = [p for p in geometry.exchange(layout, windows) if p.reader == 2]
    assert [(p.owner, p.lo, p.hi) for p in pieces] == [(0, 3, 5), (1, 5, 12), (2, 12, 18)]
    with pytest.raises(ValueError, match="at least one position"):
        geometry.Layout((3, 0))


# --- per-block operations -----------------------------------------------------------------------


def test_the_ring_uses_the_declared_per_block_operations():
    """The ring composes the torch backend's 'partial' kernel, the one the conformance suite's
    'partial op' cell checks against attnspec.reference.partial (SPEC.md section 10)."""
    from attnspec.dispatch import registry
    from attnspec.distributed import torch as cp

    kernel = registry.load("torch").kernel("partial")
    assert kernel is not None and cp._ops() is kernel.fn
    assert {"float32", "float64"} <= set(kernel.capabilities.dtypes)


def test_refuses_without_a_process_group():
    from attnspec.distributed import torch as cp

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    q = torch.zeros(1, 1, 4, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.attention(q, q, q)
