"""Context-parallel attention under jax.shard_map on 4 host devices: values and gradients (q,
k, v, alpha, span) equal the call on a single device (float64 to 1e-12, float32 within SPEC.md 9).
The cases run in a fresh interpreter: the host device count must be set before jax starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")


def test_shard_map_on_four_devices_matches_the_single_device_call():
    script = os.path.join(os.path.dirname(__file__), "distributed_jax_cases.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 7, done.stdout
    failures = []
    for r in results:
        if not r["uses"]:
            failures.append(f"{r['case']}: the program does not use {r['expect']}")
        for name, err, bound in r["rows"]:
            if not err <= bound:
                failures.append(f"{r['case']}: {name} differs by {err:.3g} (bound {bound:.3g})")
    assert not failures, "\n".join(failures)


def test_a_malformed_padding_mask_raises_before_any_collective():
    """The mask is this device's block [B, Lb] of booleans: checked before the axis is read."""
    import jax.numpy as jnp

    from attnspec.distributed import jax as cp

    q = jnp.zeros((2, 2, 8, 4))
    with pytest.raises(ValueError, match=r"key_padding_mask must be this device's block \[B, Lb\] = \[2, 8\]"):
        cp.attention(q, q, q, axis_name="seq", key_padding_mask=jnp.ones((2, 32), bool))
    with pytest.raises(TypeError, match="key_padding_mask must hold booleans"):
        cp.attention(q, q, q, axis_name="seq", key_padding_mask=jnp.ones((2, 8)))


def test_geometry_is_shared_and_q_offset_must_be_static():
    from attnspec.distributed import jax as cp

    assert cp._static_offsets(None, 2) == [0, 0]
    assert cp._static_offsets([3], 2) == [3, 3]
    with pytest.raises(ValueError, match="q_offset"):
        cp._static_offsets([1, 2, 3], 2)


def test_the_ring_uses_the_declared_per_block_operations():
    """The ring composes the jax backend's 'partial' kernel, the one the conformance suite's
    'partial op' cell checks against attnspec.reference.partial (SPEC.md section 10)."""
    from attnspec.dispatch import registry
    from attnspec.distributed import jax as cp

    kernel = registry.load("jax").kernel("partial")
    assert kernel is not None and cp._ops() is kernel.fn
    assert {"float32", "float64"} <= set(kernel.capabilities.dtypes)
