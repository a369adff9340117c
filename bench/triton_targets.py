"""The Triton backend's GPU targets (issue: Triton backend), as ratios measured in one run.

    python -m attnspec.bench.triton_targets [--quick] [--out bench/results]

Needs a CUDA device, triton, and `pip install adasplash`; it stops with a message otherwise
(nothing here runs on a CPU). bfloat16, forward + backward, causal, D = 64, B x H chosen so
that B * H * L = 2^20 (fills a GPU at every length), median of repeated runs:

1. alpha = 1.5 at L = 8k, 16k, 32k, 64k: attnspec `triton` against AdaSplash's `adasplash`
   (target: >= 1.2x its throughput, i.e. time ratio <= 1/1.2);
2. alpha = 1, no span: against SDPA's flash kernel (target: >= 0.8x its throughput);
3. alpha = 1, span z = 512, R = 32 at L = 32k: against FlexAttention with a causal
   sliding-window block mask of width z + R (target: <= 1.5x its time);
4. peak memory (torch.cuda.max_memory_allocated) of one forward + backward per length: it
   must grow linearly in L (O(L), no L x L buffer);
5. accuracy at L = 4096 (B = H = 1), alpha = 1.5, causal, against the float64 NumPy reference
   on the same bfloat16-rounded inputs: max |out - out_ref|, max |p - p_ref| and the row sums
   of AdaSplash's entry points at their default iteration counts and of attnspec (whose solve
   runs to float32 accuracy), measured by bench/adasplash_accuracy.py's code (also run on its
   own, and under the interpreter on CPU).
Launch configurations per GPU family: bench/triton_autotune.py.

Writes bench/results/triton_targets_<gpu>.json (after each target, so a run cut short keeps
what it measured) and .png (the GPU's name in both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys


def _require_gpu():
    try:
        import torch
    except ImportError:
        sys.exit("triton_targets: needs torch with CUDA (pip install attnspec[triton])")
    if not torch.cuda.is_available():
        sys.exit("triton_targets: no CUDA device here; these targets are GPU measurements "
                 "(the interpreter-only checks are in tests/test_triton_backend.py)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("triton_targets: unset TRITON_INTERPRET (it would time the interpreter)")
    try:
        import adasplash  # noqa: F401
    except ImportError:
        sys.exit("triton_targets: needs the AdaSplash package for the comparison: pip install adasplash")
    return torch


def _inputs(torch, B, H, L, D=64, dtype=None, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dtype = dtype or torch.bfloat16
    return [torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g).requires_grad_(True)
            for _ in range(3)]


def _step(attend, q, k, v):
    def run():
        out = attend(q, k, v)
        out.backward(out.new_ones(out.shape))
        q.grad = k.grad = v.grad = None
    return run


def _time(torch, fn, repeats):
    from .timing import measure

    return measure(fn, repeats=repeats, warmup=2, sync=torch.cuda.synchronize)


def _peak(torch, fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


PARTS = ("ratios", "span", "accuracy")


def run(quick=False, repeats=5, checkpoint=None, lengths=None, parts=PARTS):
    """The targets' results; checkpoint(result) is called after each target with what is done.
    lengths: those of targets 1, 2 and 4 (default 8k-64k); parts: which of PARTS to run
    (ratios = targets 1, 2 and 4; span = 3; accuracy = 5), so that a run can be split into
    calls of limited time."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"parts {sorted(unknown)} are not among {PARTS}")
    torch = _require_gpu()
    import triton
    from adasplash import adasplash

    import attnspec

    from . import adasplash_accuracy

    lengths = lengths or ([8192, 16384] if quick else [8192, 16384, 32768, 65536])
    if "ratios" not in parts:
        lengths = []
    tokens = 1 << (18 if quick else 20)
    rows, memory = [], []
    result = dict(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                  torch=torch.__version__, triton=triton.__version__, machine=platform.machine(),
                  adasplash=adasplash_accuracy._versions(torch).get("adasplash"), dtype="bfloat16", rows=rows,
                  memory=memory, accuracy=None, parts=list(parts))
    save = checkpoint or (lambda result: None)

    def ours(alpha, span=None):
        return lambda q, k, v: attnspec.attention(q, k, v, alpha=alpha, span=span, ramp=32.0, causal=True,
                                                  backend="triton")

    for L in lengths:
        B_H = max(1, tokens // L)
        H = min(B_H, 16)
        B = max(1, B_H // H)
        q, k, v = _inputs(torch, B, H, L)
        t_ada = _time(torch, _step(lambda q, k, v: adasplash(q, k, v, alpha=1.5, is_causal=True), q, k, v), repeats)
        t_ours = _time(torch, _step(ours(1.5), q, k, v), repeats)
        rows.append(dict(target="alpha=1.5 vs AdaSplash", L=L, B=B, H=H, peer="adasplash", peer_s=t_ada.median,
                         ours_s=t_ours.median, throughput_ratio=t_ada.median / t_ours.median, goal=">= 1.2"))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

        t_sdpa = _time(torch, _step(flash, q, k, v), repeats)
        t_soft = _time(torch, _step(ours(1.0), q, k, v), repeats)
        rows.append(dict(target="alpha=1 vs SDPA flash", L=L, B=B, H=H, peer="sdpa flash", peer_s=t_sdpa.median,
                         ours_s=t_soft.median, throughput_ratio=t_sdpa.median / t_soft.median, goal=">= 0.8"))
        memory.append(dict(L=L, B=B, H=H, ours_mib=_peak(torch, _step(ours(1.5), q, k, v)),
                           sdpa_mib=_peak(torch, _step(flash, q, k, v))))
        del q, k, v
        save(result)

    if "span" in parts:
        _span_target(torch, quick, tokens, repeats, ours, rows)
        save(result)

    # 5. accuracy against the float64 reference, the same code as adasplash_accuracy.py.
    if "accuracy" in parts:
        result["accuracy"] = adasplash_accuracy.run(torch, "cuda", [4096], ["bfloat16"], causals=(True,),
                                                    kinds=("randn",))
        save(result)
    return result


def _span_target(torch, quick, tokens, repeats, ours, rows):
    # 3. span z = 512 at L = 32k against FlexAttention's sliding window of the same width.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    L = 16384 if quick else 32768
    z, R = 512.0, 32.0
    width = int(z + R)
    H = 16
    B = max(1, tokens // (L * H))
    q, k, v = _inputs(torch, B, H, L)

    def window(b, h, qi, kj):
        return (qi >= kj) & (qi - kj < width)

    mask = create_block_mask(window, B=None, H=None, Q_LEN=L, KV_LEN=L, device="cuda")
    flex = torch.compile(flex_attention)
    t_flex = _time(torch, _step(lambda q, k, v: flex(q, k, v, block_mask=mask), q, k, v), repeats)
    t_span = _time(torch, _step(ours(1.0, span=z), q, k, v), repeats)
    rows.append(dict(target="span z=512 vs FlexAttention window", L=L, B=B, H=H, peer="flex sliding window",
                     peer_s=t_flex.median, ours_s=t_span.median, time_ratio=t_span.median / t_flex.median,
                     goal="time <= 1.5x"))
    del q, k, v


def _plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for target in ("alpha=1.5 vs AdaSplash", "alpha=1 vs SDPA flash"):
        pts = [r for r in result["rows"] if r["target"] == target]
        axes[0].plot([r["L"] for r in pts], [r["throughput_ratio"] for r in pts], marker="o", label=target)
    axes[0].axhline(1.2, ls=":", c="C0")
    axes[0].axhline(0.8, ls=":", c="C1")
    axes[0].set(xscale="log", xlabel="L", ylabel="throughput ratio (peer time / ours)",
                title=f"fwd+bwd bf16 on {result['device']}")
    axes[0].legend()
    mem = result["memory"]
    axes[1].plot([m["L"] for m in mem], [m["ours_mib"] for m in mem], marker="o", label="attnspec triton, alpha=1.5")
    axes[1].plot([m["L"] for m in mem], [m["sdpa_mib"] for m in mem], marker="s", label="SDPA flash")
    axes[1].set(xscale="log", yscale="log", xlabel="L", ylabel="peak MiB (one fwd+bwd)", title="peak memory")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two lengths, fewer tokens (a smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", help="comma-separated L for targets 1, 2 and 4 (default 8k,16k,32k,64k)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--tag", default="", help="suffix of the output files (for a run split into parts)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    stem = {}

    def save(result):
        name = re.sub(r"[^A-Za-z0-9]+", "_", result["device"]).strip("_").lower()
        stem["path"] = os.path.join(args.out, f"triton_targets_{name}{'_' + args.tag if args.tag else ''}")
        with open(stem["path"] + ".json", "w") as f:
            json.dump(result, f, indent=2)

    lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else None
    result = run(quick=args.quick, repeats=args.repeats, checkpoint=save, lengths=lengths,
                 parts=tuple(args.parts.split(",")))
    stem = stem["path"]
    _plot(result, stem + ".png")
    print(f"{result['device']} (torch {result['torch']}, triton {result['triton']})")
    for r in result["rows"]:
        ratio = r.get("throughput_ratio", r.get("time_ratio"))
        print(f"{r['target']:<36} L={r['L']:<6} ours {r['ours_s'] * 1e3:8.2f} ms  {r['peer']} "
              f"{r['peer_s'] * 1e3:8.2f} ms  ratio {ratio:.2f} (goal {r['goal']})")
    for m in result["memory"]:
        print(f"peak memory L={m['L']:<6} ours {m['ours_mib']:8.1f} MiB  sdpa {m['sdpa_mib']:8.1f} MiB")
    for row in result["accuracy"] or []:
        print("accuracy:", json.dumps(row))
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
