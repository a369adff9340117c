"""Calls with a key_padding_mask (batched generation with left padding; a padded training
batch): the kernel automatic selection gives them (torch-sdpa at alpha = 1, torch-decode for
short query blocks of other alpha) against the tiled `torch` backend, which took every padded
call before those kernels declared the mask; ratios measured in the same run.

    attnspec bench --preset padded --threads 1 --out bench/results/padded_cpu_1thread
    python -m attnspec.bench.padded --threads 1 --json bench/results/padded_cpu_1thread.json

Each row: name, shape [B, H, Hkv, Lq, Lk, D], backend (the one selected), selected_s, tiled_s,
ratio = selected_s / tiled_s (below 1: the padded call got faster), and unpadded_s: the same
kernel on the same call without a mask (mask_cost = selected_s / unpadded_s: what the mask
adds). Times are medians of alternating blocks of calls (attnspec.bench.shapes._median_pair);
the load average before and after the run is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from .shapes import _median_pair, _step

#: B, H, Hkv, D of the decode rows (a GQA model's batched decode step).
DECODE_MODEL = (4, 8, 2, 64)
CACHES = (1024, 8192)
#: B, H, L, D of the training row.
TRAINING = (8, 4, 256, 64)


def _left_padding(B, Lk, seed=0):
    """[B, Lk] bool: batch row b has a left padding of a different depth (0 for the first)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    depth = torch.randint(0, max(1, Lk // 4), (B,), generator=g)
    depth[0] = 0
    return torch.arange(Lk)[None, :] >= depth[:, None]


def _selected(*args, **kwargs):
    import attnspec

    return attnspec.explain(*args, **kwargs).selected


def _row(name, shape, backend, selected, tiled, unpadded, **extra):
    return dict(name=name, shape=shape, backend=backend, selected_s=selected[0], tiled_s=tiled[0],
                ratio=selected[0] / tiled[0], cpu_ratio=selected[1] / tiled[1], unpadded_s=unpadded[0],
                mask_cost=selected[0] / unpadded[0], **extra)


def decode_rows(repeats, caches=CACHES):
    """One query per batch row against a left-padded cache, no gradients."""
    import torch

    import attnspec

    B, H, Hkv, D = DECODE_MODEL
    g = torch.Generator().manual_seed(0)
    rows = []
    for Lk in caches:
        q = torch.randn(B, H, 1, D, generator=g)
        k = torch.randn(B, Hkv, Lk, D, generator=g)
        v = torch.randn(B, Hkv, Lk, D, generator=g)
        mask = _left_padding(B, Lk)
        for name, kwargs in (("decode alpha=1", dict(causal=True)),
                             ("decode alpha=1.5", dict(alpha=1.5, causal=True)),
                             ("decode alpha=1.5 span 256", dict(alpha=1.5, span=256.0, ramp=32.0, causal=True))):
            padded = dict(kwargs, key_padding_mask=mask)
            backend = _selected(q, k, v, **padded)

            def fast(kw=padded, backend=backend):
                return attnspec.attention(q, k, v, backend=backend, **kw)

            def tiled(kw=padded):
                return attnspec.attention(q, k, v, backend="torch", **kw)

            def unpadded(kw=kwargs, backend=backend):
                return attnspec.attention(q, k, v, backend=backend, **kw)

            with torch.no_grad():
                torch.testing.assert_close(fast(), tiled(), atol=1e-5, rtol=1e-4)  # the same call
                t_fast, t_tiled = _median_pair(fast, tiled, repeats)
                _, t_unpadded = _median_pair(fast, unpadded, repeats)
            rows.append(_row(name, [B, H, Hkv, 1, Lk, D], backend, t_fast, t_tiled, t_unpadded, cache=Lk,
                             notes="left padding, no grad"))
    return rows


def training_rows(repeats):
    """A causal forward + backward over a left-padded batch at alpha = 1."""
    import torch

    import attnspec

    B, H, L, D = TRAINING
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L, D, generator=g).requires_grad_(True) for _ in range(3))
    mask = _left_padding(B, L, seed=1)
    padded = dict(causal=True, key_padding_mask=mask)
    backend = _selected(q, k, v, **padded)
    fast = _step(lambda q, k, v: attnspec.attention(q, k, v, backend=backend, **padded), q, k, v)
    tiled = _step(lambda q, k, v: attnspec.attention(q, k, v, backend="torch", **padded), q, k, v)
    unpadded = _step(lambda q, k, v: attnspec.attention(q, k, v, backend=backend, causal=True), q, k, v)
    t_fast, t_tiled = _median_pair(fast, tiled, repeats)
    _, t_unpadded = _median_pair(fast, unpadded, repeats)
    return [_row("training alpha=1", [B, H, H, L, L, D], backend, t_fast, t_tiled, t_unpadded,
                 notes="left padding, causal, forward + backward")]


def run(threads=1, repeats=21):
    import torch

    import attnspec

    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    start = time.time()
    rows = decode_rows(repeats) + training_rows(max(3, repeats // 3))
    return dict(benchmark="padded", threads=threads, repeats=repeats, torch=torch.__version__,
                attnspec=attnspec.__version__, platform=platform.platform(), processor=platform.processor(),
                load_average_before=list(load_before), load_average_after=list(os.getloadavg()),
                seconds=time.time() - start, rows=rows,
                note="ratio: the selected kernel's time over the tiled torch backend's, same call, same run")


def format_table(result):
    lines = [f"threads={result['threads']}  load average before {result['load_average_before']} "
             f"after {result['load_average_after']}",
             f"{'call':28s} {'shape':30s} {'backend':13s} {'selected':>10s} {'torch':>10s} {'ratio':>6s} "
             f"{'cpu':>6s} {'unpadded':>10s} {'mask cost':>9s}"]
    for r in result["rows"]:
        lines.append(f"{r['name']:28s} {str(r['shape']):30s} {r['backend']:13s} {r['selected_s'] * 1e3:8.3f}ms "
                     f"{r['tiled_s'] * 1e3:8.3f}ms {r['ratio']:6.2f} {r['cpu_ratio']:6.2f} "
                     f"{r['unpadded_s'] * 1e3:8.3f}ms {r['mask_cost']:9.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnspec.bench.padded", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    result = run(threads=args.threads, repeats=args.repeats)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
