"""The Triton backend's GPU measurements as a few steps, each a short batch of commands.

    python tools/gpu_session.py --list                  # the steps and their time limits (no GPU)
    python tools/gpu_session.py STEP --out DIR          # on a machine with a CUDA GPU
    python tools/gpu_session.py STEP --dry-run          # the commands, run nothing

Each STEP runs its sub-steps one after another as subprocesses, each under its own time limit
(`timeout`); a step's limits add up to at most 9 minutes, so that a step run on a rented or
shared GPU with a 10-minute limit per command ends inside it. After every sub-step the step's
files are packed again into DIR/<step>.tar.gz (results/ and logs/ inside, so a step cut short
still leaves what finished) and a line is added to DIR/<step>_summary.txt. Unpack the results
into the checkout with `tar xzf DIR/<step>.tar.gz -C bench/results --strip-components=1 results`;
every result file names the GPU (docs/benchmarks.md says how to commit them).

Steps and what they measure:
- conformance: the `thorough` profile on CUDA, backends triton and torch, every dtype each
  declares (torch also float64), cell by cell (conformance_<backend>_<dtype>_<gpu>.json; cells
  not reached within the budget are listed as not run, never as passed).
- targets: `attnspec bench --preset triton-targets` at L = 8k, 16k (AdaSplash, SDPA's flash
  kernel, peak memory), and tools/adasplash_accuracy.py on CUDA.
- autotune: tools/triton_autotune.py for head dim 64 (bfloat16), merged with any other runs in
  the step's results into table entries, then `attnspec bench --preset gpu` of the torch and
  triton backends against SDPA, FlexAttention and AdaSplash.
- targets-long: `attnspec bench --preset triton-targets` at L = 32k, 64k with the
  FlexAttention window target.
- autotune-d128: the same sweep for head dim 128.
In order of priority: conformance, targets, autotune, then targets-long and autotune-d128.

Wheels: for a GPU machine without a package index, put the adasplash and entmax wheels in the
checkout's .whl/ folder; a step first installs them with pip --no-index --no-deps into a folder
of its own and puts it on the subprocesses' PYTHONPATH.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass

# Run from a checkout (python tools/gpu_session.py): attnspec imports from the checkout when it
# is not installed; the tools themselves are not part of the installed package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TOOLS = os.path.join(ROOT, "tools")

#: The longest a step may take: its sub-steps' limits add up to at most this, leaving room
#: for installing wheels and packing within a 10-minute command.
STEP_LIMIT_S = 540


@dataclass(frozen=True)
class SubStep:
    name: str
    argv: tuple  # after "python"; {results}, {gpu} and {tools} are filled in
    timeout_s: int


def _check(backend, dtype, budget, timeout):
    report = "{results}/conformance_" + f"{backend}_{dtype}" + "_{gpu}.json"
    return SubStep(f"conformance {backend} {dtype}",
                   ("{tools}/gpu_session.py", "check", "--backend", backend, "--dtype", dtype,
                    "--budget-s", str(budget), "--json", report), timeout)


def _bench(*args):
    return ("-m", "attnspec", "bench", *args, "--quiet")


STEPS = {
    "conformance": [
        *(_check("triton", d, 100, 135) for d in ("bfloat16", "float16", "float32")),
        *(_check("torch", d, 20, 30) for d in ("bfloat16", "float16", "float32", "float64")),
    ],
    # AdaSplash autotunes (30 configurations per kernel) at each new L; the first L also compiles
    # them all, hence the lengths split over two steps.
    "targets": [
        SubStep("triton targets 8k 16k", _bench("--preset", "triton-targets", "--L", "8192,16384", "--out",
                                                "{results}/triton_targets_{gpu}_part1"), 400),
        SubStep("adasplash accuracy", ("{tools}/adasplash_accuracy.py", "--budget-s", "70", "--out", "{results}"),
                110),
    ],
    "autotune": [
        SubStep("autotune d64 bfloat16", ("{tools}/triton_autotune.py", "--head-dim", "64", "--dtype", "bfloat16",
                                          "--budget-s", "200", "--out", "{results}"), 260),
        SubStep("autotune merge", ("{tools}/triton_autotune.py", "--merge", "{results}"), 30),
        SubStep("dispatcher bench gpu", _bench("--preset", "gpu", "--target", "torch", "--target", "triton",
                                               "--target", "sdpa", "--target", "flex", "--target", "adasplash",
                                               "--L", "1024,4096,16384", "--no-memory",
                                               "--out", "{results}/bench_gpu_{gpu}"), 240),
    ],
    "targets-long": [
        SubStep("triton targets 32k 64k span", _bench("--preset", "triton-targets", "--L", "32768,65536", "--out",
                                                      "{results}/triton_targets_{gpu}_part2"), 500),
    ],
    "autotune-d128": [
        SubStep("autotune d128 bfloat16", ("{tools}/triton_autotune.py", "--head-dim", "128", "--dtype",
                                           "bfloat16", "--budget-s", "300", "--out", "{results}"), 380),
        SubStep("autotune merge", ("{tools}/triton_autotune.py", "--merge", "{results}"), 30),
    ],
}


def check_plan(steps=None) -> None:
    """Every step fits its limit: its sub-steps' limits add up to at most STEP_LIMIT_S."""
    for name, subs in (steps or STEPS).items():
        total = sum(s.timeout_s for s in subs)
        if total > STEP_LIMIT_S:
            raise ValueError(f"step {name}: sub-step limits add up to {total} s > {STEP_LIMIT_S} s")


def _slug(name):
    import re

    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def _gpu_name():
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        return None


def _environment(work):
    """Subprocess environment: the checkout (and the .whl/ wheels, installed once) on PYTHONPATH."""
    paths = [ROOT]
    wheels = sorted(glob.glob(os.path.join(ROOT, ".whl", "*.whl")))
    if wheels:
        site = os.path.join(work, "site")
        if not os.path.isdir(site):
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                            "--no-cache-dir", "--upgrade", "--target", site, *wheels], check=True)
        paths.append(site)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _pack(step, work, out):
    path = os.path.join(out, f"{step}.tar.gz")
    with tarfile.open(path + ".part", "w:gz") as tar:
        for sub in ("results", "logs"):
            if os.path.isdir(os.path.join(work, sub)):
                tar.add(os.path.join(work, sub), arcname=sub)
    os.replace(path + ".part", path)


def run_step(step, out, dry_run=False, log=print):
    check_plan()
    subs = STEPS[step]
    gpu = _slug(_gpu_name() or "no_gpu")
    work = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"attnspec_gpu_session_{step}")
    results, logs = os.path.join(work, "results"), os.path.join(work, "logs")
    commands = []
    for sub in subs:
        argv = [a.format(results=results, gpu=gpu, tools=TOOLS) for a in sub.argv]
        commands.append((sub, ["timeout", "--kill-after=10", str(sub.timeout_s), sys.executable, *argv]))
    if dry_run:
        for sub, cmd in commands:
            log(f"[{sub.name}] limit {sub.timeout_s} s: {shlex.join(cmd)}")
        return []
    os.makedirs(results, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    os.makedirs(out, exist_ok=True)
    env = _environment(work)
    summary_path = os.path.join(out, f"{step}_summary.txt")
    outcomes = []
    for sub, cmd in commands:
        start = time.perf_counter()
        with open(os.path.join(logs, _slug(sub.name) + ".log"), "w") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        seconds = time.perf_counter() - start
        status = "ok" if rc == 0 else ("TIMED OUT" if rc in (124, 137) else f"FAILED rc={rc}")
        line = f"{sub.name}: {status} in {seconds:.0f} s (limit {sub.timeout_s} s)"
        outcomes.append(dict(name=sub.name, rc=rc, seconds=round(seconds, 1)))
        with open(summary_path, "a") as f:
            f.write(line + "\n")
        log(line)
        _pack(step, work, out)
    return outcomes


# --- the conformance sub-step: cell by cell, so that a time limit still leaves a report --------

def conformance_by_cell(backend, dtype, budget_s, json_path, profile="thorough", device="cuda", examples=None,
                        log=print):
    """Run the suite one cell at a time, writing the JSON after each; cells not started within
    budget_s are listed under not_run (not passed)."""
    import attnspec.conformance as conformance

    start = time.perf_counter()
    reports, not_run = [], []
    payload = dict(backend=backend, dtype=dtype, device=device, profile=profile, gpu=_gpu_name())
    for cell in conformance.strategies.CELLS:
        if time.perf_counter() - start > budget_s:
            not_run.append(cell.name)
        else:
            report = conformance.check(backend, profile=profile, dtypes=[dtype], device=device, cells=[cell.name],
                                       examples=examples, artifacts_dir=os.path.join(os.path.dirname(json_path),
                                                                                     "failures"))
            reports.append(report.to_dict())
            for c in report.cells:
                log(f"{backend} {c.cell} {c.dtype}: {c.status} {c.reason or ''}".rstrip())
        cells = [c for r in reports for c in r["cells"]]
        payload.update(seconds=round(time.perf_counter() - start, 1), not_run=not_run,
                       passed=all(r["passed"] for r in reports) and not not_run, cells=cells,
                       failures=[f for r in reports for f in r.get("failures", [])])
        os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(payload, f, indent=2, default=str)
    return payload


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        parser = argparse.ArgumentParser(prog="gpu_session check", description="the conformance suite cell by cell")
        parser.add_argument("--backend", required=True)
        parser.add_argument("--dtype", required=True)
        parser.add_argument("--budget-s", type=float, required=True)
        parser.add_argument("--json", required=True)
        parser.add_argument("--profile", default="thorough", choices=["ci", "thorough"])
        parser.add_argument("--device", default="cuda")
        parser.add_argument("--examples", type=int)
        a = parser.parse_args(argv[1:])
        payload = conformance_by_cell(a.backend, a.dtype, a.budget_s, a.json, a.profile, a.device, a.examples)
        return 0 if payload["passed"] else 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", nargs="?", choices=list(STEPS))
    parser.add_argument("--list", action="store_true", help="list the steps and their limits")
    parser.add_argument("--dry-run", action="store_true", help="print the step's commands, run nothing")
    parser.add_argument("--out", default="gpu_session_out", help="where the step's archive and summary go")
    a = parser.parse_args(argv)
    check_plan()
    if a.list or a.step is None:
        for name, subs in STEPS.items():
            print(f"{name} (sub-step limits {sum(s.timeout_s for s in subs)} s of at most {STEP_LIMIT_S} s):")
            for s in subs:
                argv = " ".join(a.replace("{tools}", "tools") for a in s.argv)
                print(f"    {s.name:<28} {s.timeout_s:>4} s  python {argv}")
        return 0
    outcomes = run_step(a.step, a.out, dry_run=a.dry_run)
    return 0 if all(o["rc"] == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
