"""The JAX backend's speed targets (issue: JAX backend), as ratios measured in one run.

    python -m attnspec.bench.jax_targets [--quick] [--repeats N] [--json FILE]

B=1, H=4, D=64, causal, jitted forward + backward (value_and_grad of out.sum() with respect to
q, k, v), median of repeated runs after one warm-up, on this machine's default jax device,
against `jax.nn.dot_product_attention` (softmax, full causal) in the same run:
1. alpha = 1.5 at L = 2048 (target <= 3x); also with alpha a traced [H] array (the path a
   learned alpha takes, with d alpha);
2. alpha = 1 with span z = 256, R = 32 at L = 4096 (target <= 1x).
Compile time (first call minus a steady call) is reported separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

import attnspec

from .timing import measure


def _inputs(L, B=1, H=4, D=64, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return [jax.random.normal(key, (B, H, L, D), jnp.float32) for key in keys]


def _step(attend, argnums=(0, 1, 2)):
    return jax.jit(jax.value_and_grad(lambda *a: attend(*a).sum(), argnums=argnums))


def _time(step, args, repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(*args))
    first = time.perf_counter() - start
    timing = measure(lambda: jax.block_until_ready(step(*args)), repeats=repeats, warmup=0)
    return timing, max(0.0, first - timing.median)


def _peer(q, k, v):
    # dot_product_attention takes [B, L, H, D].
    t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v), is_causal=True))


def run(quick=False, repeats=3):
    rows = []

    def add(config, name, timing, compile_s, peer):
        rows.append(dict(config=config, backend=name, seconds=timing.median, spread=timing.spread,
                         compile_seconds=compile_s, ratio_to_peer=timing.median / peer))

    L1 = 512 if quick else 2048
    q, k, v = _inputs(L1)
    config = f"alpha=1.5 L={L1}"
    peer, peer_compile = _time(_step(_peer), (q, k, v), repeats)
    add(config, "jax.nn.dot_product_attention", peer, peer_compile, peer.median)
    ours, compile_s = _time(_step(lambda q, k, v: attnspec.attention(q, k, v, alpha=1.5, causal=True,
                                                                      backend="jax")), (q, k, v), repeats)
    add(config, "attnspec jax", ours, compile_s, peer.median)
    alpha = jnp.full((4,), 1.5)
    traced, compile_s = _time(_step(lambda q, k, v, a: attnspec.attention(q, k, v, alpha=a, causal=True,
                                                                           backend="jax"), (0, 1, 2, 3)),
                              (q, k, v, alpha), repeats)
    add(config, "attnspec jax, alpha [H] traced + d alpha", traced, compile_s, peer.median)

    L2 = 1024 if quick else 4096
    q, k, v = _inputs(L2)
    config = f"alpha=1 span=256 R=32 L={L2}"
    peer, peer_compile = _time(_step(_peer), (q, k, v), repeats)
    add(config, "jax.nn.dot_product_attention (full causal)", peer, peer_compile, peer.median)
    span, compile_s = _time(_step(lambda q, k, v: attnspec.attention(q, k, v, alpha=1.0, span=256.0, ramp=32.0,
                                                                      causal=True, backend="jax")),
                            (q, k, v), repeats)
    add(config, "attnspec jax", span, compile_s, peer.median)
    return dict(jax=jax.__version__, device=str(jax.devices()[0]), machine=platform.machine(),
                processor=platform.processor(), rows=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    result = run(quick=args.quick, repeats=args.repeats)
    print(f"jax {result['jax']} on {result['device']}, {result['machine']}")
    print(f"{'config':<28} {'backend':<42} {'median s':>9} {'x peer':>7} {'compile s':>10}")
    for row in result["rows"]:
        print(f"{row['config']:<28} {row['backend']:<42} {row['seconds']:>9.3f} {row['ratio_to_peer']:>7.2f} "
              f"{row['compile_seconds']:>10.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
