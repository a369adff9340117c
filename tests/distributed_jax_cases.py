"""Run by tests/test_distributed_jax.py in a fresh interpreter (4 host devices must be set
before jax initialises): each case compares the shard_map'ed call with the call on a single device
on the whole sequence and prints one JSON line of maximum errors and bounds."""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

jax.config.update("jax_enable_x64", True)

import attnspec  # noqa: E402
from attnspec.distributed import jax as cp  # noqa: E402

# Lb = 8 keys per device; a halo of 10 keys spans two blocks.
CASES = [
    ("halo-causal-gqa-mixed-alpha", dict(alpha=[1.0, 1.5, 1.2, 2.0], span=[3.0, 5.0, 2.0, 6.0], causal=True,
                                         max_span=6.0, expect="ppermute")),
    ("halo-two-blocks-both-sides-lengths-offset", dict(alpha=[1.3, 1.0, 1.7, 1.5], span=[9.0, 4.0, 1.0, 7.0],
                                                       causal=False, max_span=9.0, key_lengths=[29, 32],
                                                       q_offset=[1, 0], expect="ppermute")),
    ("head-beyond-bound-takes-the-ring", dict(alpha=1.5, span=[3.0, 20.0, 2.0, 2.0], causal=True, max_span=4.0,
                                              expect="cond")),
    ("no-span-ring-float32", dict(alpha=[1.0, 1.6, 1.0, 1.2], span=None, causal=True, dtype="float32",
                                  expect="while")),
    ("no-span-ring-both-sides-lengths", dict(alpha=[1.0, 1.6, 1.2, 2.0], span=None, causal=False,
                                             key_lengths=[29, 32], expect="while")),
    # key_padding_mask (PADDING): a fully masked block, left padding across a block boundary, holes
    ("padding-halo-causal", dict(alpha=[1.0, 1.5, 1.2, 2.0], span=[3.0, 5.0, 2.0, 6.0], causal=True,
                                 max_span=6.0, padding=True, expect="ppermute")),
    ("padding-ring-both-sides-lengths", dict(alpha=[1.0, 1.6, 1.2, 2.0], span=None, causal=False,
                                             key_lengths=[29, 32], padding=True, expect="while")),
]


def _padding(B, L):
    mask = np.ones((B, L), bool)
    mask[0, :8] = False  # device 0's whole block
    mask[1, :11] = False  # across the boundary at 8
    mask[1, [14, 20, 21, 27]] = False
    return mask


def run(name, c):
    dtype = jnp.float32 if c.get("dtype") == "float32" else jnp.float64
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("seq",))
    rng = np.random.default_rng(0)
    B, H, Hkv, L, D, Dv = 2, 4, 2, 32, 4, 3
    q = jnp.asarray(1.5 * rng.normal(size=(B, H, L, D)), dtype)
    k = jnp.asarray(1.5 * rng.normal(size=(B, Hkv, L, D)), dtype)
    v = jnp.asarray(rng.normal(size=(B, Hkv, L, Dv)), dtype)
    w = jnp.asarray(rng.normal(size=(B, H, L, Dv)), dtype)
    alpha = jnp.asarray(c["alpha"], dtype)
    span = jnp.asarray(c["span"] if c["span"] is not None else 0.0, dtype)
    has_span = c["span"] is not None
    kl = None if c.get("key_lengths") is None else jnp.asarray(c["key_lengths"])
    kw = dict(ramp=2.0, causal=c["causal"], key_lengths=kl)
    mask = _padding(B, L) if c.get("padding") else np.ones((B, L), bool)
    if c.get("padding"):  # masked keys may hold anything (SPEC.md 5.3)
        k = jnp.where(mask[:, None, :, None], k, jnp.nan)
        v = jnp.where(mask[:, None, :, None], v, jnp.inf)
    mask = jnp.asarray(mask)

    def local(q, k, v, alpha, span, mask):
        return cp.attention(q, k, v, axis_name="seq", alpha=alpha, span=span if has_span else None,
                            max_span=c.get("max_span"), q_offset=c.get("q_offset"),
                            key_padding_mask=mask if c.get("padding") else None, **kw)

    seq = P(None, None, "seq")
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, P(), P(), P(None, "seq")), out_specs=seq,
                            check_vma=False)

    def f(q, k, v, alpha, span):
        return sharded(q, k, v, alpha, span, mask)

    jaxpr = str(jax.make_jaxpr(f)(q, k, v, alpha, span))

    def ref(q, k, v, alpha, span):
        qo = None if c.get("q_offset") is None else jnp.asarray(c["q_offset"])
        return attnspec.attention(q.astype(jnp.float64), k.astype(jnp.float64), v.astype(jnp.float64),
                                  alpha=alpha.astype(jnp.float64),
                                  span=span.astype(jnp.float64) if has_span else None, q_offset=qo,
                                  key_padding_mask=mask if c.get("padding") else None, **kw)

    args = (q, k, v, alpha, span)
    n = 5 if has_span else 4
    out, grads = jax.jit(lambda *a: (f(*a), jax.grad(lambda *b: (f(*b) * w).sum(), argnums=tuple(range(n)))(*a)))(*args)
    out_r = ref(*args)
    grads_r = jax.grad(lambda *b: (ref(*b) * w.astype(jnp.float64)).sum(), argnums=tuple(range(n)))(*args)
    eps = 2.0**-23 if dtype == jnp.float32 else 2.0**-52
    max_s = float(jnp.abs(q).max() * jnp.nanmax(jnp.abs(k)) * D**0.5)
    rel = 8 * eps + 64 * eps * (1 + max_s)
    max_v = float(jnp.nanmax(jnp.where(jnp.isfinite(v), jnp.abs(v), 0.0)))
    rows = []
    names = ["dq", "dk", "dv", "dalpha", "dspan"]
    err = float(jnp.abs(out.astype(jnp.float64) - out_r).max())
    bound = 1e-12 * max(1.0, float(jnp.abs(out_r).max())) if dtype == jnp.float64 else rel * max_v
    rows.append(("out", err, bound))
    for nm, g, gr in zip(names, grads, grads_r):
        err = float(jnp.abs(g.astype(jnp.float64) - gr).max())
        scale = float(jnp.abs(gr).max())
        bound = (1e-12 * max(1.0, scale) if dtype == jnp.float64
                 else 16 * rel * max(scale, float(jnp.abs(w).max()) * max(1.0, max_v)))
        rows.append((nm, err, bound))
    masked = ~np.asarray(mask)  # dk and dv of masked keys: exactly 0
    zero = all(bool((np.asarray(g).transpose(0, 2, 1, 3)[masked] == 0).all()) for g in grads[1:3])
    rows.append(("masked dk, dv exactly 0", 0.0 if zero else 1.0, 0.0))
    return {"case": name, "rows": rows, "uses": c["expect"] in jaxpr, "expect": c["expect"]}


if __name__ == "__main__":
    for name, c in CASES:
        print(json.dumps(run(name, c)), flush=True)
