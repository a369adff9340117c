"""How accurate AdaSplash is at its default iteration count, against attnspec's float64 NumPy
reference, beside attnspec's `triton` backend on the same inputs.

    python tools/adasplash_accuracy.py --interpret   # CPU tensors, Triton interpreter
    python tools/adasplash_accuracy.py               # a CUDA device

Needs torch, triton and `pip install adasplash` (BSD-3-Clause; only called, never copied).
alpha = 1.5, B = H = 1, D = 64, causal and not. Per implementation and input:

- max |out - out_ref| on random q, k, v;
- max |p - p_ref|, p read back through the kernel itself: with v the identity on a block of 64
  keys (zeros elsewhere), out = p on those keys exactly (one product p * 1, the rest 0), so
  L / 64 calls give the whole [L, L] matrix as the kernel formed it;
- max |sum_j p_ij - 1| over rows with v = ones (out = sum_j p_ij, the kernel's own sum, which a
  solve that never renormalises leaves at its accuracy), and the number of (i, j) whose
  support (p > 0) differs from the reference's.

AdaSplash's entry points are each measured at the defaults their signatures declare: the
`adasplash` dispatcher (since 0.2: causal alpha = 1.5 goes to AdaSplash-2 with niter = 1,
anything else to v1 with niter = 10), `adasplash_no_block_mask` (v1's solve, niter = 10, no
block skipping) and `entmax_attention` (the dense v2 entmax activation, n_iter = 2). An entry
point that fails to run is recorded with the error and the line of adasplash that raised it
(under the interpreter some do: see the JSON); nothing of adasplash is patched.

A development tool of the checkout (not installed); tools/gpu_session.py runs it on a GPU.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import re
import sys
import time
import traceback

import numpy as np

# Run from a checkout (python tools/NAME.py): attnspec imports from the checkout when it is not
# installed; the tools themselves are not part of the installed package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "bench", "results")

ALPHA = 1.5
D = 64

#: name -> "module:function" of the adasplash package; each is called as fn(q, k, v,
#: alpha=ALPHA, is_causal=causal), every other argument left at its default.
ADASPLASH_ENTRY_POINTS = {
    "adasplash": "adasplash:adasplash",
    "adasplash_no_block_mask": "adasplash:adasplash_no_block_mask",
    "entmax_attention": "adasplash.attention:entmax_attention",
}
#: Input kinds: q, k, v ~ N(0, 1) (scores ~ N(0, 1) after the 1/sqrt(D) scale), and q scaled
#: by 8 (scores ~ N(0, 64): peaked rows with small supports, where the solve works harder).
Q_SCALES = {"randn": 1.0, "randn, q x 8": 8.0}


def _versions(torch):
    import triton

    out = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
               numpy=np.__version__, machine=platform.machine())
    try:
        from importlib import metadata

        meta = metadata.metadata("adasplash")
        out["adasplash"] = meta["Version"]
        licences = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License")]
        out["adasplash_licence"] = meta.get("License") or ", ".join(licences) or None
        import adasplash

        # The 0.2.2 wheel's adasplash.__version__ still reads 0.2.0: both are recorded.
        out["adasplash.__version__"] = getattr(adasplash, "__version__", None)
    except Exception as exc:  # not installed: recorded, the AdaSplash rows then say so too
        out["adasplash"] = f"unavailable ({type(exc).__name__}: {exc})"
    return out


def default_niter(fn):
    """The iteration-count default an adasplash function declares (niter or n_iter)."""
    params = inspect.signature(fn).parameters
    for name in ("niter", "n_iter"):
        if name in params:
            return {name: params[name].default}
    return {}


def _where(exc):
    """The innermost frame of the adasplash package in exc's traceback, as 'file:line'."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}adasplash{os.sep}" in f.filename]
    if not frames:
        return None
    f = frames[-1]
    return f"adasplash/{os.path.basename(f.filename)}:{f.lineno} ({f.name})"


def inputs(torch, L, dtype, device, q_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed + L)
    q, k, v = (torch.randn(1, 1, L, D, generator=g) for _ in range(3))
    return [x.to(device=device, dtype=dtype) for x in (q * q_scale, k, v)]


def reference_solution(q, k, v, causal):
    """(out, p) of the float64 reference on the inputs as given (already rounded to their dtype)."""
    from attnspec import reference

    q64, k64, v64 = (x.detach().double().cpu().numpy() for x in (q, k, v))
    L = k64.shape[2]
    out = reference.attention(q64, k64, v64, alpha=ALPHA, causal=causal)
    p = reference.attention(q64, k64, np.eye(L)[None, None], alpha=ALPHA, causal=causal)
    return out, p


def probe(torch, attend, q, k, v):
    """(out, p [1, 1, L, L], row sums [1, 1, L]) as the kernel computes them (see the module doc)."""
    L = k.shape[2]
    with torch.no_grad():
        out = attend(q, k, v)
        rowsum = attend(q, k, torch.ones_like(v))[..., 0]
        p = torch.zeros(1, 1, L, L, dtype=torch.float64)
        for j0 in range(0, L, D):
            width = min(D, L - j0)
            block = torch.zeros_like(v)
            block[0, 0, j0 + torch.arange(width), torch.arange(width)] = 1
            p[..., j0:j0 + width] = attend(q, k, block)[..., :width].double().cpu()
    return out.double().cpu().numpy(), p.numpy(), rowsum.double().cpu().numpy()


def errors(got, want):
    out, p, rowsum = got
    out_ref, p_ref = want
    return dict(max_abs_out_err=float(np.abs(out - out_ref).max()),
                max_abs_p_err=float(np.abs(p - p_ref).max()),
                max_abs_rowsum_err=float(np.abs(rowsum - 1.0).max()),
                support_mismatches=int(((p > 0) != (p_ref > 0)).sum()),
                reference_support_size=int((p_ref > 0).sum()))


def _adasplash_targets():
    import importlib

    targets = {}
    for name, where in ADASPLASH_ENTRY_POINTS.items():
        module, attr = where.split(":")
        try:
            targets[name] = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:  # recorded as the row's error
            targets[name] = exc
    return targets


def _implementations(torch, causal):
    """[(name, attend(q, k, v) or the exception that makes it unavailable, extra row fields)]."""
    import attnspec

    def ours(q, k, v):
        return attnspec.attention(q, k, v, alpha=ALPHA, causal=causal, backend="triton")

    impls = [("attnspec triton", ours, {"solve": "until float32 accuracy"})]
    for name, fn in _adasplash_targets().items():
        if isinstance(fn, Exception):
            impls.append((name, fn, {}))
        else:
            impls.append((name, lambda q, k, v, fn=fn: fn(q, k, v, alpha=ALPHA, is_causal=causal), default_niter(fn)))
    return impls


def run(torch, device, lengths, dtypes, causals=(False, True), kinds=tuple(Q_SCALES), log=print,
        budget_s=None, checkpoint=None):
    """One row per (implementation, dtype, L, causal, input kind): the errors, or the error that
    stopped it. Inputs not started within budget_s seconds get a row saying so; checkpoint(rows)
    is called after each input (to save partial results)."""
    rows = []
    start = time.perf_counter()
    for dtype_name, L, causal, kind in ((d, n, c, kd) for d in dtypes for n in lengths for c in causals
                                        for kd in kinds):
        if budget_s is not None and time.perf_counter() - start > budget_s:
            rows.append(dict(implementation="*", L=L, dtype=dtype_name, causal=causal, inputs=kind,
                             error=f"not run: past the {budget_s} s budget"))
            continue
        q, k, v = inputs(torch, L, getattr(torch, dtype_name), device, Q_SCALES[kind])
        want = reference_solution(q, k, v, causal)
        for name, attend, extra in _implementations(torch, causal):
            row = dict(implementation=name, L=L, dtype=dtype_name, causal=causal, inputs=kind, alpha=ALPHA, D=D,
                       **extra)
            if isinstance(attend, Exception):
                row["error"] = f"{type(attend).__name__}: {attend}"
            else:
                start = time.perf_counter()
                try:
                    row.update(errors(probe(torch, attend, q, k, v), want))
                    if name == "attnspec triton":
                        stats = sys.modules["attnspec.backends.triton"].solve_statistics(
                            q, k, v, alpha=ALPHA, causal=causal)
                        row["max_passes"] = int(stats["passes"].max())
                except Exception as exc:  # recorded with adasplash's line; the others go on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    row["raised_at"] = _where(exc)
                row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            log(_line(row))
        if checkpoint is not None:
            checkpoint(rows)
    return rows


def _line(row):
    head = (f"{row['implementation']:<24} L={row['L']:<5} {row['dtype']:<8} causal={row['causal']!s:<5} "
            f"{row['inputs']:<12}")
    if "error" in row:
        return f"{head} FAILED at {row.get('raised_at')}: {row['error'][:160]}"
    return (f"{head} |dout| {row['max_abs_out_err']:.2e}  |dp| {row['max_abs_p_err']:.2e}  "
            f"|sum p - 1| {row['max_abs_rowsum_err']:.2e}  support diff {row['support_mismatches']}"
            f"/{row['reference_support_size']}  ({row['seconds']} s)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--interpret", action="store_true",
                        help="CPU tensors under the Triton interpreter (sets TRITON_INTERPRET=1 before loading)")
    parser.add_argument("--lengths", default=None, help="comma-separated L (default 64,128,256 interpreted, "
                        "1024,4096 on CUDA)")
    parser.add_argument("--dtypes", default=None, help="default float32 interpreted, float32,bfloat16 on CUDA")
    parser.add_argument("--budget-s", type=float, help="start no new input after this many seconds")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if args.interpret:
        # Triton and adasplash read it when their kernels are defined, i.e. on first import.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("adasplash_accuracy: --interpret must be set before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("adasplash_accuracy: TRITON_INTERPRET=1 is set: pass --interpret for the CPU run")
    import torch

    if args.interpret:
        device, device_name = "cpu", "CPU, Triton interpreter"
    else:
        if not torch.cuda.is_available():
            sys.exit("adasplash_accuracy: no CUDA device; pass --interpret for the CPU run under the interpreter")
        device, device_name = "cuda", torch.cuda.get_device_name()
    lengths = [int(x) for x in (args.lengths or ("64,128,256" if args.interpret else "1024,4096")).split(",")]
    dtypes = (args.dtypes or ("float32" if args.interpret else "float32,bfloat16")).split(",")
    name = "cpu_interpreter" if args.interpret else re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_").lower()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"adasplash_accuracy_{name}.json")
    start = time.perf_counter()
    result = dict(device=device_name, processor=platform.processor() or None, versions=_versions(torch),
                  alpha=ALPHA, D=D, B=1, H=1, inputs={k: f"q, k, v ~ N(0, 1), q x {s:g}" for k, s in Q_SCALES.items()},
                  method="errors against attnspec.reference (float64) on the inputs rounded to dtype; p read "
                         "through identity blocks of v, row sums through v = ones (see the module doc)")

    def save(rows):
        result.update(seconds=round(time.perf_counter() - start, 1), rows=rows)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)

    save(run(torch, device, lengths, dtypes, budget_s=args.budget_s, checkpoint=save))
    print(f"wrote {path} ({result['seconds']} s)")
    return result


if __name__ == "__main__":
    main()
