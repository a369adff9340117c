"""Context-parallel attention on torch.distributed: bytes each rank sends and wall time of a
forward + backward, for span heads through the halo against the same heads through the ring
over all keys (max_span=None), on `world` processes over gloo on this machine (CPU).

    python -m attnspec.bench.distributed --world 4 --lengths 1024 2048 4096 \\
        --out bench/results/distributed_cpu

Each rank runs one thread. Bytes are counted at the calls into torch.distributed
(point-to-point sends; all-reduce/all-gather contributions listed apart) and are exact;
times are the median over --repeats of the slowest rank's time (barrier before and after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time


def _configs(lengths, span, ramp, heads, dim, alphas):
    for L in lengths:
        for alpha in alphas:
            for path in ("halo", "ring"):
                yield dict(L=L, alpha=alpha, path=path, span=span, ramp=ramp, H=heads, D=dim, causal=True)


def _worker(rank, world, init_file, out_file, configs, repeats):
    import torch
    import torch.distributed as dist

    from attnspec.distributed import torch as cp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = []
    for cfg in configs:
        L, H, D = cfg["L"], cfg["H"], cfg["D"]
        Lr = L // world
        g = torch.Generator().manual_seed(rank)
        q = torch.randn(1, H, Lr, D, generator=g, requires_grad=True)
        k = torch.randn(1, H, Lr, D, generator=g, requires_grad=True)
        v = torch.randn(1, H, Lr, D, generator=g, requires_grad=True)
        span = torch.full((H,), cfg["span"], requires_grad=True)
        alpha = torch.full((H,), cfg["alpha"], requires_grad=True)
        max_span = cfg["span"] if cfg["path"] == "halo" else None

        def step():
            out = cp.attention(q, k, v, alpha=alpha, span=span, ramp=cfg["ramp"], causal=cfg["causal"],
                               max_span=max_span)
            out.sum().backward()

        step()  # warm-up
        times, traffic = [], None
        for _ in range(repeats):
            cp.traffic(reset=True)
            dist.barrier()
            t0 = time.perf_counter()
            step()
            dist.barrier()
            times.append(time.perf_counter() - t0)
            traffic = cp.traffic()
        sent = torch.tensor([traffic["p2p_bytes"], traffic["allreduce_bytes"]], dtype=torch.float64)
        everyone = [torch.zeros_like(sent) for _ in range(world)]
        dist.all_gather(everyone, sent)
        if rank == 0:
            p2p = [int(x[0]) for x in everyone]
            rows.append(dict(cfg, seconds=statistics.median(times), p2p_bytes_per_rank=p2p,
                             collective_bytes_per_rank=[int(x[1]) for x in everyone]))
            print(json.dumps(rows[-1]), flush=True)
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _markdown(rows, meta):
    lines = [f"# Context-parallel attention, {meta['world']} processes (gloo, CPU, 1 thread each)", "",
             f"Command: `{meta['command']}`", "",
             f"Load average before / after: {meta['load_before']} / {meta['load_after']}; torch {meta['torch']}.",
             "Causal, B = 1, H = Hkv = 4, D = Dv = 32, float32, span z = "
             f"{rows[0]['span']} and ramp R = {rows[0]['ramp']} on every head; forward + backward.",
             "Bytes: point-to-point bytes sent by the busiest rank (all-reduce/all-gather bytes: the small "
             "metadata and stop flags, listed apart; exact). Time: median over repeats, slowest rank; with more "
             "processes than free cores (see the load) it includes waiting for a core, so the time ratios "
             "are indicative, the byte ratios exact.", "",
             "| L | alpha | path | p2p bytes sent (max rank) | collective bytes | time (s) | ring / halo bytes | ring / halo time |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    by_key = {(r["L"], r["alpha"], r["path"]): r for r in rows}
    for r in rows:
        ratio_b = ratio_t = ""
        if r["path"] == "ring" and (r["L"], r["alpha"], "halo") in by_key:
            h = by_key[(r["L"], r["alpha"], "halo")]
            ratio_b = f"{max(r['p2p_bytes_per_rank']) / max(1, max(h['p2p_bytes_per_rank'])):.1f}x"
            ratio_t = f"{r['seconds'] / h['seconds']:.2f}x"
        lines.append(f"| {r['L']} | {r['alpha']} | {r['path']} | {max(r['p2p_bytes_per_rank']):,} | "
                     f"{max(r['collective_bytes_per_rank']):,} | {r['seconds']:.3f} | {ratio_b} | {ratio_t} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.0, 1.5])
    parser.add_argument("--span", type=float, default=64.0)
    parser.add_argument("--ramp", type=float, default=32.0)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)

    import sys

    import torch
    import torch.multiprocessing as mp

    configs = list(_configs(args.lengths, args.span, args.ramp, args.heads, args.dim, args.alphas))
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(args.world, os.path.join(tmp, "init"), out_file, configs, args.repeats),
                 nprocs=args.world, join=True)
        with open(out_file) as f:
            rows = json.load(f)
    meta = dict(world=args.world, command="python -m attnspec.bench.distributed " + " ".join(sys.argv[1:] if argv is None else argv),
                load_before=[round(x, 2) for x in load_before], load_after=[round(x, 2) for x in os.getloadavg()],
                torch=torch.__version__)
    text = _markdown(rows, meta)
    print(text)
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(dict(meta, rows=rows), f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
