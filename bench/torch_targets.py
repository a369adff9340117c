"""The PyTorch backend's speed targets (issue: PyTorch backend), as ratios measured in one run.

    python -m attnspec.bench.torch_targets [--quick] [--json FILE]

B=1, H=4, D=64, causal, forward + backward, median of repeated runs, on this machine's CPU:
1. alpha = 1.5 at L = 2048 against torch's scaled_dot_product_attention (target <= 4x), and
   against the entmax package's entmax15 and entmax_bisect inside an eager attention;
2. alpha = 1 with span z = 256, R = 32 at L = 4096 against SDPA's full causal attention
   (target <= 1x);
3. with --memory: peak memory of one forward+backward at L = 8192 (target: within 2x of SDPA),
   as the growth of peak RSS in a fresh subprocess per configuration, with glibc's default
   allocator settings and with a fixed mmap threshold (live memory only, reproducible);
4. with --eager-crossover: torch-eager against the tiled torch from tiny calls up, which sets
   torch-eager's size cap (automatic selection gives it only calls where it is not slower).
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

import attnspec

from .timing import measure


def _inputs(L, B=1, H=4, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).requires_grad_(True) for _ in range(3)]


def _step(attend, q, k, v):
    def run():
        out = attend(q, k, v)
        out.sum().backward()
        q.grad = k.grad = v.grad = None
    return run


def _entmax_attention(mapping):
    def attend(q, k, v):
        L = q.shape[2]
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        mask = torch.ones(L, L, dtype=torch.bool).tril()
        s = s.masked_fill(~mask, float("-inf"))
        return mapping(s) @ v
    return attend


def run(quick=False, repeats=3):
    rows = []
    L1 = 512 if quick else 2048
    q, k, v = _inputs(L1)
    sdpa = measure(_step(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                         q, k, v), repeats=repeats)
    ours = measure(_step(lambda q, k, v: attnspec.attention(q, k, v, alpha=1.5, causal=True, backend="torch"),
                         q, k, v), repeats=repeats)
    eager = measure(_step(lambda q, k, v: attnspec.attention(q, k, v, alpha=1.5, causal=True,
                                                              backend="torch-eager"), q, k, v), repeats=repeats)
    rows.append(dict(config=f"alpha=1.5 L={L1}", backend="sdpa (softmax)", seconds=sdpa.median, ratio_to_sdpa=1.0))
    rows.append(dict(config=f"alpha=1.5 L={L1}", backend="attnspec torch", seconds=ours.median,
                     ratio_to_sdpa=ours.median / sdpa.median))
    rows.append(dict(config=f"alpha=1.5 L={L1}", backend="attnspec torch-eager", seconds=eager.median,
                     ratio_to_sdpa=eager.median / sdpa.median))
    try:
        import entmax
    except ImportError:
        entmax = None
    if entmax is not None:
        for name, fn in (("entmax.entmax15", lambda s: entmax.entmax15(s, dim=-1)),
                         ("entmax.entmax_bisect", lambda s: entmax.entmax_bisect(s, alpha=1.5, dim=-1))):
            t = measure(_step(_entmax_attention(fn), q, k, v), repeats=repeats)
            rows.append(dict(config=f"alpha=1.5 L={L1}", backend=name, seconds=t.median,
                             ratio_to_sdpa=t.median / sdpa.median))
    L2 = 1024 if quick else 4096
    q, k, v = _inputs(L2)
    sdpa = measure(_step(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                         q, k, v), repeats=repeats)
    span = measure(_step(lambda q, k, v: attnspec.attention(q, k, v, alpha=1.0, span=256.0, ramp=32.0, causal=True,
                                                             backend="torch"), q, k, v), repeats=repeats)
    rows.append(dict(config=f"alpha=1 span=256 L={L2}", backend="sdpa (full causal)", seconds=sdpa.median,
                     ratio_to_sdpa=1.0))
    rows.append(dict(config=f"alpha=1 span=256 L={L2}", backend="attnspec torch", seconds=span.median,
                     ratio_to_sdpa=span.median / sdpa.median))
    import os

    return dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                processor=platform.processor(), load_average=os.getloadavg(), rows=rows)


_MEMORY_PROGRAM = """
import sys, torch, attnspec

def kib(field):  # VmHWM (peak) / VmRSS of this process; fresh after exec, unlike ru_maxrss
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

L, which = int(sys.argv[1]), sys.argv[2]

def step(q, k, v):
    if which == 'sdpa':
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif which == 'entmax':
        out = attnspec.attention(q, k, v, alpha=1.5, causal=True, backend='torch')
    elif which == 'span':
        out = attnspec.attention(q, k, v, alpha=1.0, span=256.0, ramp=32.0, causal=True, backend='torch')
    out.sum().backward()

# A tiny call first, so that what loading the code costs (imports, op registration) is not
# counted as the call's memory.
step(*(torch.randn(1, 4, 16, 64, requires_grad=True) for _ in range(3)))
q, k, v = (torch.randn(1, 4, L, 64, requires_grad=True) for _ in range(3))
base = kib('VmHWM')
step(q, k, v)
print(kib('VmHWM'), base)
"""


#: glibc's allocator with a fixed mmap threshold: every large tensor is mapped on its own and
#: unmapped when freed, so the peak RSS is the peak of live memory. With glibc's default
#: (a threshold that rises to the largest block freed so far) the same call measured 76-97 MiB
#: on different runs of this machine, from heap fragmentation; with this setting the same to
#: 0.1 MiB every run.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def peak_memory(L=8192):
    """Peak RSS (MiB, Linux VmHWM) of one forward+backward in a fresh subprocess per
    configuration, minus the peak before the call (interpreter, torch and the inputs): with
    glibc's default allocator settings (allocator="default": what a user sees, including heap
    fragmentation, which varies from run to run) and with a fixed mmap threshold
    (allocator="fixed mmap threshold": the peak of live memory, reproducible)."""
    import os
    import subprocess
    import sys

    rows = []
    for allocator, extra_env in (("default", {}), ("fixed mmap threshold", FIXED_MMAP_THRESHOLD)):
        group = []
        for which in ("sdpa", "entmax", "span"):
            out = subprocess.run([sys.executable, "-c", _MEMORY_PROGRAM, str(L), which], capture_output=True,
                                 text=True, check=True, env={**os.environ, **extra_env}).stdout.split()
            peak, base = int(out[0]), int(out[1])
            group.append(dict(config=f"L={L}", backend=which, allocator=allocator, peak_mib=peak / 1024,
                              call_mib=(peak - base) / 1024))
        sdpa = group[0]["call_mib"]
        for row in group:
            row["ratio_to_sdpa"] = row["call_mib"] / sdpa if sdpa > 0 else float("nan")
        rows.extend(group)
    return rows


#: (B, H, Lq, Lk) of the crossover table, with a soft span of Lk / 4 and R = 16, causal.
CROSSOVER_SHAPES = [(1, 4, 8, 8), (1, 4, 32, 32), (4, 4, 32, 32), (1, 8, 1, 256), (4, 4, 64, 64),
                    (2, 4, 128, 128), (8, 8, 1, 1024), (1, 4, 512, 512), (8, 4, 256, 256)]


def eager_crossover(repeats=5):
    """Rows of torch-eager's and the tiled torch's forward+backward CPU time (process time,
    median) at alpha = 1 and 1.5, with gradients for q, k, v, alpha and span."""
    import time

    rows = []
    for B, H, Lq, Lk in CROSSOVER_SHAPES:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, Lq, 64, generator=g).requires_grad_(True)
        k, v = (torch.randn(B, H, Lk, 64, generator=g).requires_grad_(True) for _ in range(2))
        for alpha in (1.0, 1.5):
            seconds = {}
            for backend in ("torch-eager", "torch"):
                a = torch.full((H,), alpha, requires_grad=True)
                span = torch.full((H,), Lk / 4, requires_grad=True)

                def call():
                    out = attnspec.attention(q, k, v, alpha=a, span=span, ramp=16.0, causal=True, backend=backend)
                    out.sum().backward()

                call()
                times = []
                for _ in range(repeats):
                    start = time.process_time()
                    call()
                    times.append(time.process_time() - start)
                seconds[backend] = sorted(times)[len(times) // 2]
            rows.append(dict(B=B, H=H, Lq=Lq, Lk=Lk, scores=B * H * Lq * Lk, alpha=alpha, eager_s=seconds["torch-eager"],
                             tiled_s=seconds["torch"], eager_over_tiled=seconds["torch-eager"] / seconds["torch"]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--repeats", type=int, help="timed calls per row (default: 3; --eager-crossover: 5)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--memory", action="store_true",
                        help="also measure peak memory at L=8192 (fresh subprocess per configuration)")
    parser.add_argument("--eager-crossover", action="store_true",
                        help="only time torch-eager against the tiled torch from tiny calls up, and print that")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.eager_crossover:
        print(f"{'B':>2} {'H':>2} {'Lq':>4} {'Lk':>5} {'scores':>8} {'alpha':>5} {'eager ms':>9} {'tiled ms':>9} {'eager/tiled':>11}")
        rows = eager_crossover(args.repeats or 5)
        for r in rows:
            print(f"{r['B']:>2} {r['H']:>2} {r['Lq']:>4} {r['Lk']:>5} {r['scores']:>8} {r['alpha']:>5} "
                  f"{1e3 * r['eager_s']:>9.2f} {1e3 * r['tiled_s']:>9.2f} {r['eager_over_tiled']:>11.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(torch=torch.__version__, threads=torch.get_num_threads(), rows=rows), f, indent=2)
        return
    result = run(quick=args.quick, repeats=args.repeats or 3)
    if args.memory:
        result["memory"] = peak_memory(2048 if args.quick else 8192)
    print(f"torch {result['torch']}, {result['threads']} threads, {result['machine']}, "
          f"load average {result['load_average'][0]:.1f} at the end")
    print(f"{'config':<26} {'backend':<22} {'median s':>9} {'x SDPA':>7}")
    for row in result["rows"]:
        print(f"{row['config']:<26} {row['backend']:<22} {row['seconds']:>9.3f} {row['ratio_to_sdpa']:>7.2f}")
    for row in result.get("memory", []):
        print(f"peak memory {row['config']:<8} {row['backend']:<8} {row['call_mib']:>8.1f} MiB during the call "
              f"({row['ratio_to_sdpa']:.2f}x SDPA; process peak {row['peak_mib']:.0f} MiB; "
              f"{row['allocator']} allocator)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
