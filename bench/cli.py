"""`attnspec bench` and `python -m attnspec.bench`: argument parsing and the run.

Light to import (argparse only): attnspec's main CLI builds its `bench` subcommand from
`add_arguments` without importing any framework.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys


def _floats_or_none(text):
    return tuple(None if x.strip().lower() in ("none", "off", "no") else float(x) for x in text.split(","))


def _floats(text):
    return tuple(float(x) for x in text.split(","))


def _ints(text):
    return tuple(int(x) for x in text.split(","))


def _bools(text):
    values = []
    for x in text.split(","):
        x = x.strip().lower()
        if x not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"expected true/false values; got {x!r}")
        values.append(x in ("true", "1", "yes"))
    return tuple(values)


def _strs(text):
    return tuple(x.strip() for x in text.split(",") if x.strip())


#: The presets' names, here so that the CLI needs no import of the sweep definitions; a test
#: holds them equal to sweep.PRESETS.
PRESET_NAMES = ("quick", "cpu", "gpu", "torch-targets", "torch-eager-crossover", "jax-targets", "triton-targets")
#: Presets measured by programs of their own (calls at the shapes models use; whole models), not
#: by a sweep of cases: `attnspec bench --preset NAME` runs them with --threads, --out and --quiet.
PROGRAM_PRESETS = {"shapes": "attnspec.bench.shapes", "transformers": "attnspec.bench.transformers_bench",
                   "padded": "attnspec.bench.padded"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quick", choices=PRESET_NAMES + tuple(PROGRAM_PRESETS),
                        help="the sweep and its settings (default: quick, a smoke run; docs/benchmarks.md says what "
                             "each measures); the options below override it")
    parser.add_argument("--out", metavar="PREFIX",
                        help="write PREFIX.json, PREFIX.md and PREFIX.png (default: attnspec-bench-<preset>)")
    parser.add_argument("--baseline",
                        help="every row's ratio is to this target (default: the preset's, e.g. sdpa)")
    parser.add_argument("--target", action="append", metavar="NAME",
                        help="run only this target (repeatable; see --list-targets)")
    parser.add_argument("--exclude", action="append", metavar="NAME", default=[], help="do not run this target")
    parser.add_argument("--list-targets", action="store_true", help="list the targets and whether they can run here")
    sweep = parser.add_argument_group("sweep (comma-separated values override the preset)")
    sweep.add_argument("--L", type=_ints, help="sequence lengths (Lq = Lk), e.g. 256,512,1024; for a preset that lists "
                       "its cases one by one (triton-targets), the cases of these lengths")
    sweep.add_argument("--alpha", type=_floats, help="alpha values in [1, 2], e.g. 1,1.5")
    sweep.add_argument("--span", type=_floats_or_none, help="spans z (none: no span), e.g. none,256")
    sweep.add_argument("--ramp", type=float, help="the span's ramp R")
    sweep.add_argument("--causal", type=_bools, help="e.g. true,false")
    sweep.add_argument("--B", type=_ints)
    sweep.add_argument("--H", type=_ints, help="query heads")
    sweep.add_argument("--Hkv", type=_ints, help="key/value heads (GQA; default H)")
    sweep.add_argument("--D", type=_ints, help="head dim")
    sweep.add_argument("--dtype", type=_strs, help="float16, bfloat16, float32, float64")
    sweep.add_argument("--mode", type=_strs, help="fwd, fwd+bwd")
    how = parser.add_argument_group("measurement")
    how.add_argument("--repeats", type=int, help="timed calls per row (median and IQR over them)")
    how.add_argument("--warmup", type=int, help="untimed calls first")
    how.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                     help="peak memory per row in a fresh process (default: the preset's)")
    how.add_argument("--allocators", type=_strs,
                     help="glibc settings of the memory measurement: default, fixed-mmap (default: the preset's)")
    how.add_argument("--threads", type=int, help="framework threads for every case (torch; default: its own choice)")
    how.add_argument("--clock", choices=["wall", "process"],
                     help="wall time, or this process's CPU time (default: the preset's)")
    how.add_argument("--max-call-seconds", type=float,
                     help="skip a target at larger L once one call would take longer (default: the preset's)")
    how.add_argument("--numpy-max-scores", type=int, help="largest B*H*L*L for the NumPy reference target")
    how.add_argument("--reference-rows", type=int, help="query rows of the float64 accuracy reference at large L")
    how.add_argument("--device", help="cpu or cuda (default: the preset's, else CUDA when available)")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--overhead", action=argparse.BooleanOptionalAction, default=None,
                     help="also run the dispatch-overhead micro-benchmark (default: the preset's)")
    parser.add_argument("--no-plot", action="store_true", help="no PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _override(sweep, changes):
    """A Sweep with the given value lists; a Cases list keeps its cases whose L is listed (their
    lengths stay as they are: Lq goes with Lk) and takes single values for the other fields."""
    from .sweep import Cases

    if not isinstance(sweep, Cases):
        return dataclasses.replace(sweep, **changes)
    cases = sweep.cases
    if "L" in changes:
        cases = tuple(c for c in cases if c.L in changes["L"])
    single = {}
    for name, value in changes.items():
        if name == "L":
            continue
        if name != "ramp" and len(value) != 1:
            raise SystemExit(f"--{name}: the preset lists its cases one by one; give one value, not {value}")
        single[name] = value if name == "ramp" else value[0]
    return dataclasses.replace(sweep, cases=tuple(dataclasses.replace(c, **single) for c in cases))


def preset_from_args(args):
    from .sweep import PRESETS

    preset = dataclasses.replace(PRESETS[args.preset])
    sweep_changes = {}
    for name in ("L", "alpha", "span", "causal", "B", "H", "Hkv", "D", "dtype", "mode"):
        value = getattr(args, name, None)
        if value is not None:
            sweep_changes[name] = value
    if args.ramp is not None:
        sweep_changes["ramp"] = args.ramp
    if sweep_changes:
        preset.sweep = tuple(_override(s, sweep_changes) for s in preset.sweeps)
    for option, field in (("repeats", "repeats"), ("warmup", "warmup"), ("max_call_seconds", "max_call_seconds"),
                          ("numpy_max_scores", "numpy_max_scores"), ("reference_rows", "reference_rows"),
                          ("overhead", "overhead"), ("allocators", "allocators"), ("clock", "clock")):
        value = getattr(args, option, None)
        if value is not None:
            setattr(preset, field, value)
    return preset


def list_targets(device=None) -> str:
    from .inputs import make_inputs
    from .runners import runner_for
    from .sweep import Case
    from .targets import BackendTarget, all_targets

    probe = Case(L=16, H=1, D=16, mode="fwd")  # a tiny call: can the backend run here at all?
    lines = []
    for t in all_targets():
        why = t.available()
        runner = runner_for(t.framework)
        if not why and runner is not None:
            why = runner.unavailable()
            if not why:
                resolved = runner.resolve_device(device)
                why = runner.device_reason(resolved)
            if not why and isinstance(t, BackendTarget):
                # The backend's own declarations decide (e.g. triton on a CPU-only machine).
                why = "; ".join(t.reasons(probe, make_inputs(runner, probe, resolved, seed=0)[0], resolved))
        opt_in = "" if t.default else " (runs only when named)"
        lines.append(f"{t.name:<16} {t.kind:<9} {t.framework:<6} {'ok' if not why else why}  -- {t.description}{opt_in}")
    return "\n".join(lines)


def _run_program(args) -> int:
    """A program preset: its own module's main, with the options that apply to it."""
    import importlib

    program = importlib.import_module(PROGRAM_PRESETS[args.preset])
    argv = []
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.out:
        argv += ["--json", args.out + ".json"]
    return program.main(argv) or 0


def run_command(args, argv=None) -> int:
    from . import core, report
    from .overhead import dispatch_overhead

    if args.list_targets:
        print(list_targets(args.device))
        return 0
    if args.preset in PROGRAM_PRESETS:
        return _run_program(args)
    preset = preset_from_args(args)
    command = "attnspec bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:]))
    dataclasses.replace(preset)  # validates the clock and allocators
    result = core.run(preset, targets=args.target, exclude=args.exclude, baseline=args.baseline, seed=args.seed,
                      progress=not args.quiet, device=args.device, memory=args.memory, command=command,
                      threads=args.threads)
    if preset.overhead:
        frameworks = ["numpy"] + [f for f in ("torch", "jax") if any(r["framework"] == f and r["status"] == "ok"
                                                                     for r in result.rows)]
        result.overhead = [dispatch_overhead(f) for f in frameworks]
    prefix = args.out or f"attnspec-bench-{preset.name}"
    paths = report.write(result, prefix, plots=not args.no_plot)
    print(report.markdown(result))
    print()
    print("wrote " + ", ".join(paths.values()) + f" ({result.seconds:.0f} s)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attnspec bench",
                                     description="Benchmark attnspec backends against peers (attnspec.bench)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command(args, argv if argv is not None else sys.argv[1:])
