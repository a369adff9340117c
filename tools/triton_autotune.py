"""Autotune the Triton backend's launch configuration for this GPU.

    python tools/triton_autotune.py --head-dim 64 --dtype bfloat16 [--budget-s 240]
    python tools/triton_autotune.py --merge bench/results   # no GPU needed
    python tools/triton_autotune.py --dry-run               # the plan, no GPU needed

One run tunes one (head dim, dtype) on the CUDA device, on a representative shape: causal,
alpha = 1.5 (the solve's several passes are the kernels' main cost), B x H x L = 2^18 tokens
at L = 8192, H = 16, D = Dv = head dim. It times the forward (attention.run_forward) and the
backward (attention.backward) kernels directly, medians of `--repeats` after warm-up (which
also compiles), under the ATTNSPEC_TRITON_CONFIG override of backends/triton/tuning.py:

1. tile sizes (BLOCK_M x BLOCK_N, shared by the three kernels since they fix the saved tile
   map) at 4 warps / 2 stages: forward + backward time per pair;
2. for the fastest `--finalists` pairs, each kernel's (num_warps, num_stages) in turn, the other
   kernels held at their best so far (coordinate search; the forward is timed for `forward`,
   the backward for `backward_dq` and `backward_dkdv`).

A candidate that fails (too much shared memory, a compile error) is recorded with its error.
The run stops starting new timings after --budget-s seconds and records that it was cut.
Each run writes bench/results/triton_autotune_<gpu>_d<D>_<dtype>.json; `--merge DIR` gathers
every such file, per GPU, into triton_autotune_<gpu>.json and .png, with `table_entries`:
the entries to paste into backends/triton/tuning.py's CONFIGS[<family>], ahead of its untuned
ones (also printed). It also records alpha = 1 times and the winner's largest output
difference against the untuned default (a tile order changes only the rounding).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import re
import sys
import time

# Run from a checkout (python tools/NAME.py): attnspec imports from the checkout when it is not
# installed; the tools themselves are not part of the installed package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "bench", "results")

TILES = [(64, 64), (128, 64), (64, 128), (128, 128), (128, 32), (64, 32), (32, 64), (32, 32)]
WARPS_STAGES = [(4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3), (2, 2)]
KERNELS = ("forward", "backward_dq", "backward_dkdv")
DEFAULT_LAUNCH = [4, 2]
SHAPE = dict(L=8192, H=16, tokens=1 << 18, alpha=1.5, causal=True)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def family_of(capability) -> str:
    """The table key a tuned entry is written for: the exact capability (sm90, sm80, sm89)."""
    major, minor = capability
    return f"sm{major}{minor}"


def plan(head_dims=(64, 128), dtypes=("bfloat16",), finalists=2) -> list[dict]:
    """The candidate configurations each stage times (for --dry-run and the tests)."""
    steps = []
    for head_dim in head_dims:
        for dtype in dtypes:
            steps.append(dict(head_dim=head_dim, dtype=dtype, stage=1,
                              candidates=[dict(BLOCK_M=m, BLOCK_N=n, **{k: DEFAULT_LAUNCH for k in KERNELS})
                                          for m, n in TILES]))
            steps.append(dict(head_dim=head_dim, dtype=dtype, stage=2,
                              candidates=f"{finalists} fastest tile pairs x {len(KERNELS)} kernels x "
                                         f"{len(WARPS_STAGES)} (num_warps, num_stages): "
                                         f"{finalists * len(KERNELS) * len(WARPS_STAGES)} timings"))
    return steps


# --- on the GPU -----------------------------------------------------------------------------

def _require_gpu():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_autotune: unset TRITON_INTERPRET (it would time the interpreter)")
    import torch

    if not torch.cuda.is_available():
        sys.exit("triton_autotune: no CUDA device here (--dry-run and --merge need none)")
    return torch


class _Timer:
    def __init__(self, torch, head_dim, dtype, repeats, seed=0):
        from attnspec.backends import _torch_op
        from attnspec.backends.triton import attention

        self.torch, self.attention, self.repeats = torch, attention, repeats
        L, H = SHAPE["L"], SHAPE["H"]
        B = max(1, SHAPE["tokens"] // (L * H))
        g = torch.Generator(device="cuda").manual_seed(seed)
        q, k, v = (torch.randn(B, H, L, head_dim, device="cuda", dtype=getattr(torch, dtype), generator=g)
                   for _ in range(3))
        self.shape = dict(B=B, H=H, L=L, D=head_dim, dtype=dtype, causal=SHAPE["causal"])
        self.dout = torch.randn(B, H, L, head_dim, device="cuda", dtype=q.dtype, generator=g)
        self.args = {a: _torch_op.normalise(q, k, v, a, None, 32.0, SHAPE["causal"], None, None, None)
                     for a in (SHAPE["alpha"], 1.0)}

    def time(self, config, alpha=None):
        """(forward s, backward s, out) under `config` (a tuning entry's fields)."""
        from attnspec.bench.timing import measure

        torch, attention = self.torch, self.attention
        args = self.args[SHAPE["alpha"] if alpha is None else alpha]
        os.environ["ATTNSPEC_TRITON_CONFIG"] = json.dumps(config)
        try:
            saved = {}

            def forward():
                saved["out"], saved["c"], saved["bits"] = attention.run_forward(*args)

            def backward():
                attention.backward(self.dout, saved["c"], saved["bits"], *args)

            fwd = measure(forward, repeats=self.repeats, warmup=2, sync=torch.cuda.synchronize)
            bwd = measure(backward, repeats=self.repeats, warmup=2, sync=torch.cuda.synchronize)
            return fwd.median, bwd.median, saved["out"]
        finally:
            os.environ.pop("ATTNSPEC_TRITON_CONFIG", None)


def tune(head_dim, dtype, repeats=10, finalists=2, budget_s=240.0, log=print, timer=None):
    """The sweep's result (see the module doc). `timer` (tests): an object with .shape and
    .time(config, alpha=None) -> (forward s, backward s, out), instead of the GPU's."""
    torch = _require_gpu()
    import triton

    start = time.perf_counter()
    timer = timer or _Timer(torch, head_dim, dtype, repeats)
    rows, cut = [], False

    def over():
        return time.perf_counter() - start > budget_s

    def attempt(stage, config, what):
        try:
            fwd, bwd, _ = timer.time(config)
            row = dict(stage=stage, tuning=what, config=config, forward_s=fwd, backward_s=bwd, total_s=fwd + bwd)
        except Exception as exc:  # out of shared memory / registers for this GPU: recorded
            row = dict(stage=stage, tuning=what, config=config, error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
        log(json.dumps(row))
        return row

    # Stage 1: tile pairs at the default launch options.
    for m, n in TILES:
        if over():
            cut = True
            break
        attempt(1, dict(BLOCK_M=m, BLOCK_N=n, **{k: DEFAULT_LAUNCH for k in KERNELS}), "tiles")
    ok = sorted((r for r in rows if "error" not in r), key=lambda r: r["total_s"])
    best = dict(ok[0]) if ok else None
    # Stage 2: per-kernel launch options for the finalists.
    for finalist in ok[:finalists]:
        current = dict(finalist)
        for kernel in KERNELS:
            timed = list(current["config"][kernel])  # already timed: the starting value
            for warps, stages in WARPS_STAGES:
                if [warps, stages] == timed:
                    continue
                if over():
                    cut = True
                    break
                row = attempt(2, dict(current["config"], **{kernel: [warps, stages]}), kernel)
                part = "forward_s" if kernel == "forward" else "backward_s"
                if "error" not in row and row[part] < current[part]:
                    current = dict(current, config=row["config"], **{part: row[part]})
                    current["total_s"] = current["forward_s"] + current["backward_s"]
        if best is None or current["total_s"] < best["total_s"]:
            best = current
    result = dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                  family=family_of(torch.cuda.get_device_capability()),
                  versions=dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version()),
                  date=datetime.date.today().isoformat(), shape=dict(timer.shape, alpha=SHAPE["alpha"]),
                  repeats=repeats, budget_s=budget_s, cut_by_budget=cut, rows=rows,
                  seconds=round(time.perf_counter() - start, 1))
    if best is not None:
        default = dict(BLOCK_M=64, BLOCK_N=64, **{k: DEFAULT_LAUNCH for k in KERNELS})
        fwd_d, bwd_d, out_d = timer.time(default)
        fwd_b, bwd_b, out_b = timer.time(best["config"])
        soft_d, soft_b = timer.time(default, alpha=1.0), timer.time(best["config"], alpha=1.0)
        result["best"] = dict(config=best["config"], forward_s=fwd_b, backward_s=bwd_b,
                              untuned_forward_s=fwd_d, untuned_backward_s=bwd_d,
                              speedup=(fwd_d + bwd_d) / (fwd_b + bwd_b),
                              alpha1_forward_backward_s=soft_b[0] + soft_b[1],
                              alpha1_untuned_forward_backward_s=soft_d[0] + soft_d[1],
                              max_abs_out_diff_vs_untuned=float((out_b.float() - out_d.float()).abs().max()))
    return result


# --- merging the runs of one GPU into table entries (no GPU) ---------------------------------

def table_entries(results: list[dict], results_file: str) -> list[dict]:
    """Entries for CONFIGS[family], smallest head dim first; half-precision results cover both
    half types. Every entry names the device and the results file it came from."""
    entries = []
    for r in sorted(results, key=lambda r: (r["shape"]["D"], r["shape"]["dtype"])):
        if "best" not in r:
            continue
        dtype = r["shape"]["dtype"]
        dtypes = ["bfloat16", "float16"] if dtype in ("bfloat16", "float16") else [dtype]
        cfg = r["best"]["config"]
        entries.append(dict(max_head_dim=r["shape"]["D"], dtypes=dtypes, BLOCK_M=cfg["BLOCK_M"],
                            BLOCK_N=cfg["BLOCK_N"], **{k: list(cfg[k]) for k in KERNELS},
                            source=f"tuned on {r['device']} (triton {r['versions']['triton']}, {r['date']}): "
                                   f"{results_file}"))
    return entries


RUN_FILE = re.compile(r"^triton_autotune_(.+)_d(\d+)_(bfloat16|float16|float32)\.json$")


def merge(directory: str) -> list[dict]:
    """Per GPU among the runs under `directory`: triton_autotune_<gpu>.json and .png, and the
    table entries printed for pasting."""
    files = sorted(f for f in glob.glob(os.path.join(directory, "triton_autotune_*.json"))
                   if RUN_FILE.match(os.path.basename(f)))
    if not files:
        sys.exit(f"triton_autotune: no triton_autotune_<gpu>_d<D>_<dtype>.json under {directory}")
    by_device = {}
    for f in files:
        run = json.load(open(f))
        by_device.setdefault(run["device"], []).append(run)
    merged_all = []
    for device, runs in sorted(by_device.items()):
        stem = os.path.join(directory, f"triton_autotune_{slug(device)}")
        results_file = f"bench/results/{os.path.basename(stem)}.json"
        merged = dict(device=device, capability=runs[0]["capability"], family=runs[0]["family"],
                      runs=runs, table_entries=table_entries(runs, results_file))
        with open(stem + ".json", "w") as f:
            json.dump(merged, f, indent=2)
        _plot(merged, stem + ".png")
        print(f"wrote {stem}.json and {stem}.png")
        print(f"paste into backends/triton/tuning.py, CONFIGS[{merged['family']!r}], ahead of its untuned entries:")
        for entry in merged["table_entries"]:
            print(f"    {json.dumps(entry)},")
        merged_all.append(merged)
    return merged_all


def _plot(merged, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = merged["runs"]
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(5.5 * max(1, len(runs)), 4), squeeze=False)
    for ax, run in zip(axes[0], runs):
        ok = [r for r in run["rows"] if "error" not in r]
        for stage, marker in ((1, "o"), (2, "x")):
            pts = [r for r in ok if r["stage"] == stage]
            ax.scatter([r["forward_s"] * 1e3 for r in pts], [r["backward_s"] * 1e3 for r in pts], marker=marker,
                       label="tiles (4 warps, 2 stages)" if stage == 1 else "warps/stages per kernel")
        for r in ok:
            if r["stage"] == 1:
                ax.annotate(f"{r['config']['BLOCK_M']}x{r['config']['BLOCK_N']}", (r["forward_s"] * 1e3,
                            r["backward_s"] * 1e3), fontsize=7)
        if "best" in run:
            b = run["best"]
            ax.scatter([b["forward_s"] * 1e3], [b["backward_s"] * 1e3], marker="*", s=150, c="k",
                       label=f"chosen ({b['speedup']:.2f}x the untuned)")
        s = run["shape"]
        ax.set(xlabel="forward ms", ylabel="backward ms",
               title=f"D={s['D']} {s['dtype']} L={s['L']} B={s['B']} H={s['H']} alpha={s['alpha']}")
        ax.legend(fontsize=7)
    fig.suptitle(f"attnspec triton launch configurations on {merged['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--finalists", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="start no new timing after this many seconds (the run then records cut_by_budget)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--merge", metavar="DIR", help="merge the runs under DIR into one JSON + plot + table entries")
    parser.add_argument("--dry-run", action="store_true", help="print the candidates, time nothing")
    args = parser.parse_args(argv)
    if args.dry_run:
        for step in plan((args.head_dim,), (args.dtype,), args.finalists):
            print(json.dumps(step))
        return None
    if args.merge:
        return merge(args.merge)
    result = tune(args.head_dim, args.dtype, args.repeats, args.finalists, args.budget_s)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"triton_autotune_{slug(result['device'])}_d{args.head_dim}_{args.dtype}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")
    if "best" in result:
        print("best:", json.dumps(result["best"]))
    return result


if __name__ == "__main__":
    main()
