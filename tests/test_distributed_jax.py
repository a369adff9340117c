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
    assert len(results) == 5, done.stdout
    failures = []
    for r in results:
        if not r["uses"]:
            failures.append(f"{r['case']}: the program does not use {r['expect']}")
        for name, err, bound in r["rows"]:
            if not err <= bound:
                failures.append(f"{r['case']}: {name} differs by {err:.3g} (bound {bound:.3g})")
    assert not failures, "\n".join(failures)


def test_geometry_is_shared_and_q_offset_must_be_static():
    from attnspec.distributed import jax as cp

    assert cp._static_offsets(None, 2) == [0, 0]
    assert cp._static_offsets([3], 2) == [3, 3]
    with pytest.raises(ValueError, match="q_offset"):
        cp._static_offsets([1, 2, 3], 2)


def test_partial_row_statistics_combine_to_the_reference():
    """The per-block sums of backends/jax/partial.py, added over two key blocks, give the
    reference's row statistics (float32, so to float32 accuracy): sum p = 1 at the reference's
    c, P V, gbar and the log-sum-exp."""
    import importlib

    import jax.numpy as jnp
    import numpy as np

    from attnspec.backends.jax import partial

    ref_entmax = importlib.import_module("attnspec.reference.entmax")
    rng = np.random.default_rng(0)
    B, H, Hkv, Lq, Lk, D, Dv = 1, 2, 1, 5, 9, 3, 2
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in ((B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)))
    dout = rng.normal(size=(B, H, Lq, Dv)).astype(np.float32)
    span = jnp.asarray([3.0, 6.0], jnp.float32)
    alpha = np.array([1.0, 1.6])
    eps = jnp.asarray(alpha - 1, jnp.float32)[None, :, None, None]
    offset = jnp.asarray([4])
    args = (span, 2.0, True, None, offset, 0.5)
    s, m, *_ = partial.block_scores(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 0, 0, *args)
    rows, weights = np.asarray(s, np.float64).reshape(-1, Lk), np.asarray(m, np.float64).reshape(-1, Lk)
    sol = ref_entmax.solve_rows(rows, weights, np.repeat(alpha - 1, Lq))
    p = sol.p.reshape(B, H, Lq, Lk)
    c = np.nanmean(rows - np.where(sol.p > 0, sol.t, np.nan), axis=-1).reshape(B, H, Lq, 1)
    c = jnp.asarray(c, jnp.float32)
    blocks = [partial.block_scores(jnp.asarray(q), jnp.asarray(k[:, :, a:b]), jnp.asarray(v[:, :, a:b]), 0, a, *args)
              for a, b in ((0, 4), (4, Lk))]
    sum_p = sum(partial.row_sums(b[0], b[1], eps, c)[0] for b in blocks)
    np.testing.assert_allclose(np.asarray(sum_p), 1.0, atol=1e-5)
    sums = [partial.weighted_values(b[0], b[1], eps, c, b[4]) for b in blocks]
    pv, wv, wsum = (sum(x[i] for x in sums) for i in range(3))
    p_ref = np.einsum("bhij,bjd->bhid", p, v[:, 0].astype(np.float64))
    np.testing.assert_allclose(np.asarray(pv), p_ref, atol=1e-5)
    w = np.where(p > 0, p / np.where(p > 0, sol.u.reshape(p.shape), 1), 0)
    g = np.einsum("bhid,bjd->bhij", dout.astype(np.float64), v[:, 0].astype(np.float64))
    gbar = np.asarray(partial.gbar(jnp.asarray(dout), wv, wsum))[..., 0]
    np.testing.assert_allclose(gbar, (w * g).sum(-1) / w.sum(-1), atol=1e-5)
    lse = jnp.logaddexp(*(partial.row_bounds(b[0], b[1], eps)[3] for b in blocks))
    np.testing.assert_allclose(np.asarray(lse)[:, 0], np.asarray(c)[:, 0], atol=1e-5)
