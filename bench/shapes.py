"""Speed where models call attention, as ratios to torch's scaled_dot_product_attention (SDPA)
measured in the same run: decode steps over key caches, a small training call, long causal
calls, and the per-call overhead of `attnspec.attention` on a tiny call.

    python -m attnspec.bench.shapes --threads 1 --json bench/results/shapes_cpu_1thread.json
    python -m attnspec.bench.shapes --threads 2 --json bench/results/shapes_cpu_2thread.json
    python -m attnspec.bench.shapes --plot bench/results/shapes_cpu.png RESULT.json [RESULT.json ...]

Each row is plain JSON: name, family, shape, attnspec_s, sdpa_s, ratio, target_ratio, met
(target_ratio and met are null where the row has no target), plus its backend (the one
automatic selection chose) and notes. Times are medians of `repeats` calls, attnspec and SDPA
alternating in blocks of consecutive calls so that both see the same load; the load average before and after
the run is recorded. At alpha != 1 SDPA computes softmax, not entmax: the ratio says what the
entmax costs over the softmax a model would otherwise call.

The overhead row: the time of `attnspec.attention(...)` minus the time of calling the selected
kernel's own computation directly on the same tensors (no validation, no selection, no
argument normalisation, no custom-op glue), on a tiny call [1, 1, 4, 16] without gradients;
the target is <= 20 us.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

#: (name, alpha, span) of the decode rows, each over every cache length.
DECODE_VARIANTS = [
    ("decode alpha=1", 1.0, None),
    ("decode alpha=1.5", 1.5, None),
    ("decode alpha=1 span 256", 1.0, 256.0),
    ("decode alpha=1.5 span 256", 1.5, 256.0),
]
CACHES = (1024, 8192, 32768)
#: B, H, Hkv, D of the decode rows (a GQA model's decode step).
DECODE_MODEL = (1, 8, 2, 64)
RAMP = 32.0
OVERHEAD_TARGET_US = 20.0
#: attnspec's time over 32k cached keys against 1k, for span decode: "flat" (a window of
#: ~290 keys either way; what is left is the per-call work that does not depend on the cache).
FLAT_TARGET = 1.5


def _targets(threads):
    """target ratio per row name (and cache length for decode), at this thread count."""
    return {
        ("decode alpha=1", None): 1.2,
        ("decode alpha=1.5", None): 2.0,
        ("decode alpha=1 span 256", 8192): 0.1,
        ("decode alpha=1.5 span 256", 8192): 0.2,
        ("training alpha=1", None): 1.1,
        ("training learned alpha=1.5", None): 2.0,
        ("long alpha=1.5 L=2048", None): 1.5 if threads <= 1 else 2.0,
        ("long alpha=1 span 256 L=4096", None): 0.3,
    }


def _median_pair(first, second, repeats, warmup=2, blocks=3):
    """Medians of two callables timed in alternating blocks of consecutive calls (repeats calls
    each in all): ((wall, cpu) of first, (wall, cpu) of second) in seconds. Blocks, not call
    by call: a decode step right after SDPA over a 32k-key cache ran 6x slower than in a row
    (SDPA's pass over the cache evicts the caches the small call needs), which would measure
    SDPA's footprint, not attnspec. cpu is the process's CPU time (every thread of it): on a
    shared machine the wall clock also counts the time other processes hold the cores."""
    for _ in range(warmup):
        first()
        second()
    times = [[], [], [], []]
    per_block = max(1, -(-repeats // blocks))
    for _ in range(blocks):
        for fn, wall, cpu in ((first, times[0], times[1]), (second, times[2], times[3])):
            fn()  # back in this block's steady state
            for _ in range(per_block):
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                c1, w1 = time.process_time(), time.perf_counter()
                wall.append(w1 - w0)
                cpu.append(c1 - c0)
    a_wall, a_cpu, b_wall, b_cpu = (statistics.median(t) for t in times)
    return (a_wall, a_cpu), (b_wall, b_cpu)


def _per_call(fn, number, rounds):
    """(wall, cpu): the fastest of `rounds` rounds of the mean time of `number` calls
    (seconds), for calls of microseconds, where one clock reading would be most of the
    measurement; as timeit advises, the minimum is the cost with the least interference.
    Many short rounds (a few ms each): on a shared machine some of them run without being
    preempted."""
    for _ in range(max(1, number // 10)):
        fn()
    wall, cpu = [], []
    for _ in range(rounds):
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(number):
            fn()
        c1, w1 = time.process_time(), time.perf_counter()
        wall.append((w1 - w0) / number)
        cpu.append((c1 - c0) / number)
    return min(wall), min(cpu)


def _row(name, family, shape, ours, sdpa, target, backend, **extra):
    """ours, sdpa: (wall, cpu) seconds. ratio and met read the wall clock; cpu_ratio is the
    same ratio by CPU time (see _median_pair)."""
    ratio = ours[0] / sdpa[0]
    return dict(name=name, family=family, shape=shape, attnspec_s=ours[0], sdpa_s=sdpa[0], ratio=ratio,
                target_ratio=target, met=None if target is None else bool(ratio <= target), backend=backend,
                attnspec_cpu_s=ours[1], sdpa_cpu_s=sdpa[1], cpu_ratio=ours[1] / sdpa[1], **extra)


def _selected(*args, **kwargs):
    import attnspec

    return attnspec.explain(*args, **kwargs).selected


def decode_rows(targets, repeats, caches=CACHES):
    import torch
    import torch.nn.functional as F

    import attnspec

    B, H, Hkv, D = DECODE_MODEL
    g = torch.Generator().manual_seed(0)
    rows = []
    for Lk in caches:
        q = torch.randn(B, H, 1, D, generator=g)
        k = torch.randn(B, Hkv, Lk, D, generator=g)
        v = torch.randn(B, Hkv, Lk, D, generator=g)

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        for name, alpha, span in DECODE_VARIANTS:
            kwargs = dict(alpha=alpha, causal=True)
            if span is not None:
                kwargs.update(span=span, ramp=RAMP)

            def ours():
                return attnspec.attention(q, k, v, **kwargs)

            with torch.no_grad():
                t_ours, t_sdpa = _median_pair(ours, sdpa, repeats)
            target = targets.get((name, Lk), targets.get((name, None)))
            rows.append(_row(name, "decode", [B, H, Hkv, 1, Lk, D], t_ours, t_sdpa, target,
                             _selected(q, k, v, **kwargs), cache=Lk))
    return rows


def flatness(rows):
    """Span decode over the largest cache against the smallest: attnspec's own time."""
    out = []
    for name, _, span in DECODE_VARIANTS:
        if span is None:
            continue
        mine = {r["cache"]: r for r in rows if r["name"] == name}
        if len(mine) < 2:
            continue
        small, large = mine[min(mine)], mine[max(mine)]
        growth = large["attnspec_s"] / small["attnspec_s"]
        out.append(dict(name=name, caches=[min(mine), max(mine)], attnspec_s=[small["attnspec_s"], large["attnspec_s"]],
                        growth=growth, cpu_growth=large.get("attnspec_cpu_s", 0) / small.get("attnspec_cpu_s", 1),
                        target_growth=FLAT_TARGET, met=bool(growth <= FLAT_TARGET)))
    return out


def _step(attend, q, k, v, extra=()):
    def run():
        out = attend(q, k, v)
        out.sum().backward()
        for t in (q, k, v, *extra):
            t.grad = None
    return run


def _grad_inputs(B, H, L, D, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).requires_grad_(True) for _ in range(3)]


def training_rows(targets, repeats):
    """[8, 4, 256, 64] causal forward + backward: alpha = 1, and alpha = 1.5 learned (a [H]
    parameter asking for its gradient)."""
    import torch
    import torch.nn.functional as F

    import attnspec

    B, H, L, D = 8, 4, 256, 64
    q, k, v = _grad_inputs(B, H, L, D)
    alpha = torch.full((H,), 1.5).requires_grad_(True)
    sdpa = _step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    rows = []
    for name, kwargs, extra in (("training alpha=1", dict(causal=True), ()),
                                ("training learned alpha=1.5", dict(alpha=alpha, causal=True), (alpha,))):
        ours = _step(lambda q, k, v, kw=kwargs: attnspec.attention(q, k, v, **kw), q, k, v, extra)
        t_ours, t_sdpa = _median_pair(ours, sdpa, repeats)
        rows.append(_row(name, "training", [B, H, H, L, L, D], t_ours, t_sdpa, targets.get((name, None)),
                         _selected(q, k, v, **kwargs), notes="causal, forward + backward"))
    return rows


def long_rows(targets, repeats):
    """B=1, H=4, D=64 causal forward + backward: alpha = 1.5 at L = 2048; alpha = 1 with span
    256 at L = 4096 against SDPA over all (causal) keys."""
    import torch.nn.functional as F

    import attnspec

    rows = []
    for name, L, kwargs in (("long alpha=1.5 L=2048", 2048, dict(alpha=1.5, causal=True)),
                            ("long alpha=1 span 256 L=4096", 4096, dict(span=256.0, ramp=RAMP, causal=True))):
        q, k, v = _grad_inputs(1, 4, L, 64)
        sdpa = _step(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
        ours = _step(lambda q, k, v, kw=kwargs: attnspec.attention(q, k, v, **kw), q, k, v)
        t_ours, t_sdpa = _median_pair(ours, sdpa, repeats, warmup=1, blocks=1)
        rows.append(_row(name, "long", [1, 4, 4, L, L, 64], t_ours, t_sdpa, targets.get((name, None)),
                         _selected(q, k, v, **kwargs), notes="causal, forward + backward"))
    return rows


def _kernel_own(backend, q, k, v, kwargs):
    """The selected kernel's computation called directly: for the torch custom-op kernels
    their forward function on arguments normalised beforehand, for torch-sdpa its function."""
    import torch

    from attnspec.backends import _torch_op
    from attnspec.backends import torch as torch_backends

    if backend == "torch-sdpa":
        fn = torch_backends.SDPA.kernel("attention").fn
        return lambda: fn(q, k, v, **kwargs)
    forward = {"torch-decode": torch_backends._decode.forward, "torch-eager": torch_backends._attention.forward,
               "torch": torch_backends._attention.tiled_forward}[backend]
    full = dict(alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None, q_offset=None, scale=None)
    full.update(kwargs)
    args = _torch_op.normalise(q, k, v, *full.values())

    def call():
        with torch.no_grad():
            return forward(*args)[0]
    return call


def overhead_rows(number=100, rounds=100):
    """The tiny call [1, 1, 4, 16] without gradients: attnspec.attention against the selected
    kernel's own computation (the overhead, target <= 20 us) and against SDPA."""
    import torch
    import torch.nn.functional as F

    import attnspec

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 16, generator=g) for _ in range(3))
    rows = []
    for name, kwargs in (("tiny call alpha=1", dict(causal=True)), ("tiny call alpha=1.5", dict(alpha=1.5, causal=True))):
        backend = _selected(q, k, v, **kwargs)
        own = _kernel_own(backend, q, k, v, kwargs)
        with torch.no_grad():
            t_api = _per_call(lambda: attnspec.attention(q, k, v, **kwargs), number, rounds)
            t_own = _per_call(own, number, rounds)
            t_sdpa = _per_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), number, rounds)
        overhead_us = (t_api[0] - t_own[0]) * 1e6
        row = _row(name, "overhead", [1, 1, 1, 4, 4, 16], t_api, t_sdpa, None, backend,
                   kernel_own_s=t_own[0], overhead_us=overhead_us, overhead_cpu_us=(t_api[1] - t_own[1]) * 1e6,
                   target_overhead_us=OVERHEAD_TARGET_US,
                   notes="no grad; overhead = attnspec.attention - the kernel's own computation; fastest of "
                         f"{rounds} rounds of {number} calls")
        row["met"] = bool(overhead_us <= OVERHEAD_TARGET_US)
        rows.append(row)
    return rows


def run(threads=1, repeats=None, quick=False):
    import torch

    import attnspec

    torch.set_num_threads(threads)
    repeats = repeats or (5 if quick else 21)
    targets = _targets(threads)
    load_before = os.getloadavg()
    start = time.time()
    rows = overhead_rows(rounds=20 if quick else 100)
    rows += decode_rows(targets, max(repeats, 11) if quick else 2 * repeats, caches=(1024, 8192) if quick else CACHES)
    rows += training_rows(targets, max(3, repeats // 2))
    if not quick:
        rows += long_rows(targets, max(3, repeats // 6))
    return dict(
        benchmark="shapes", threads=threads, repeats=repeats, torch=torch.__version__,
        attnspec=attnspec.__version__, platform=platform.platform(), processor=platform.processor(),
        load_average_before=list(load_before), load_average_after=list(os.getloadavg()),
        seconds=time.time() - start, rows=rows, flat=flatness(rows),
        note="ratios to torch.nn.functional.scaled_dot_product_attention in the same run; "
             "SDPA computes softmax, not entmax, at alpha != 1",
    )


def format_table(result):
    lines = [f"threads={result['threads']}  load average before {result['load_average_before']} "
             f"after {result['load_average_after']}",
             f"{'call':34s} {'shape':28s} {'backend':13s} {'attnspec':>10s} {'SDPA':>10s} {'ratio':>7s} "
             f"{'target':>7s} met  cpu ratio"]
    for r in result["rows"]:
        target = "" if r["target_ratio"] is None else f"{r['target_ratio']:.2f}"
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"{r['name']:34s} {str(r['shape']):28s} {r['backend'] or '-':13s} "
                     f"{r['attnspec_s'] * 1e3:8.3f}ms {r['sdpa_s'] * 1e3:8.3f}ms {r['ratio']:7.2f} {target:>7s} {met:4s} "
                     f"{r.get('cpu_ratio', float('nan')):6.2f}")
        if "overhead_us" in r:
            lines.append(f"{'':34s} overhead {r['overhead_us']:.1f} us (target <= {r['target_overhead_us']:.0f} us), "
                         f"by CPU time {r.get('overhead_cpu_us', float('nan')):.1f} us; "
                         f"kernel's own {r['kernel_own_s'] * 1e6:.1f} us")
    for f in result.get("flat", []):
        lines.append(f"{f['name']}: {f['caches'][1]} keys / {f['caches'][0]} keys = {f['growth']:.2f}x "
                     f"(target <= {f['target_growth']}) {'yes' if f['met'] else 'NO'}; by CPU time "
                     f"{f.get('cpu_growth', float('nan')):.2f}x")
    return "\n".join(lines)


FAMILIES = [("decode", "decode step, B=1 H=8 Hkv=2 D=64 (x: cached keys)"),
            ("training", "training call [8, 4, 256, 64], causal fwd+bwd"),
            ("long", "B=1 H=4 D=64 causal fwd+bwd"),
            ("overhead", "tiny call [1, 1, 4, 16], no grad")]


def plot(results, path):
    """One panel per shape family: attnspec's time over SDPA's per row, one colour per target
    (row name) in every run, marker per thread count; targets as short bars of the row's
    colour; the legend below the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for result in results:
        for r in result["rows"]:
            if r["name"] not in names:
                names.append(r["name"])
    colours = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    markers = {1: "o", 2: "s", 4: "^"}
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    handles = {}
    for ax, (family, title) in zip(axes.ravel(), FAMILIES):
        entmax = False
        for result in results:
            threads = result["threads"]
            marker = markers.get(threads, "D")
            rows = [r for r in result["rows"] if r["family"] == family]
            if family == "decode":
                for name, alpha, _ in DECODE_VARIANTS:
                    mine = sorted((r["cache"], r["ratio"]) for r in rows if r["name"] == name)
                    if not mine:
                        continue
                    entmax |= alpha != 1
                    h, = ax.plot([c for c, _ in mine], [x for _, x in mine], marker=marker, color=colours[name],
                                 linestyle="-" if threads == 1 else "--")
                    handles.setdefault(name, h)
                    for r in rows:
                        if r["name"] == name and r["target_ratio"] is not None:
                            ax.hlines(r["target_ratio"], r["cache"] * 0.8, r["cache"] * 1.25, color=colours[name],
                                      linewidth=3, alpha=0.5)
                ax.set_xscale("log", base=2)
                ax.set_xticks(CACHES, [f"{c // 1024}k" for c in CACHES])
                ax.set_xlabel("cached keys")
            elif family == "overhead":  # the overhead itself, against its target
                for i, r in enumerate(rows):
                    h = ax.scatter([i], [max(r["overhead_us"], 0.1)], marker=marker, color=colours[r["name"]], s=60,
                                   zorder=3)
                    handles.setdefault(r["name"], h)
                    ax.hlines(r["target_overhead_us"], i - 0.3, i + 0.3, color=colours[r["name"]], linewidth=3,
                              alpha=0.5)
            else:
                for i, r in enumerate(rows):
                    entmax |= "1.5" in r["name"]
                    h = ax.scatter([i], [r["ratio"]], marker=marker, color=colours[r["name"]], s=60, zorder=3)
                    handles.setdefault(r["name"], h)
                    if r["target_ratio"] is not None:
                        ax.hlines(r["target_ratio"], i - 0.3, i + 0.3, color=colours[r["name"]], linewidth=3, alpha=0.5)

        if family != "decode":
            names = [r["name"] for r in results[0]["rows"] if r["family"] == family]
            ax.set_xticks(range(len(names)), [n.replace(" ", "\n", 2) for n in names], fontsize=8)
            ax.set_xlim(-0.7, max(len(names), 1) - 0.3)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        if family == "overhead":
            ax.set_ylabel("overhead (us): attnspec.attention - kernel's own")
        else:
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
            ax.set_ylabel("attnspec time / SDPA time (same run)")
        if entmax:
            ax.text(0.02, 0.98, "at alpha != 1, SDPA computes softmax, not entmax", transform=ax.transAxes,
                    fontsize=8, va="top")
    legend = [(h, n) for n, h in handles.items()]
    from matplotlib.lines import Line2D

    for threads, marker in markers.items():
        if any(r["threads"] == threads for r in results):
            legend.append((Line2D([], [], marker=marker, color="black", linestyle="-" if threads == 1 else "--"),
                           f"{threads} thread{'s' if threads > 1 else ''}"))
    legend.append((Line2D([], [], color="grey", linewidth=3, alpha=0.5), "target (same colour as its row)"))
    fig.legend([h for h, _ in legend], [n for _, n in legend], loc="lower center", ncol=4, fontsize=9,
               frameon=False)
    loads = ", ".join(f"{r['threads']} thr: load {r['load_average_before'][0]:.1f}" for r in results)
    fig.suptitle(f"attnspec against torch scaled_dot_product_attention, same run, CPU ({loads})", fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m attnspec.bench.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=None, help="calls per median (default 21; decode twice that)")
    parser.add_argument("--quick", action="store_true", help="fewer calls, no long rows (a smoke run)")
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--plot", help="draw the results given as arguments into this PNG, and exit")
    parser.add_argument("results", nargs="*", help="result JSON files for --plot")
    args = parser.parse_args(argv)
    if args.plot:
        results = []
        for name in args.results:
            with open(name) as f:
                results.append(json.load(f))
        plot(results, args.plot)
        return 0
    result = run(threads=args.threads, repeats=args.repeats, quick=args.quick)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
