"""The `attnspec` command.

    attnspec info [--json]   backends, their status (failed imports with the error), versions
    attnspec check           the conformance suite over every available backend (see --help)
    attnspec demo            a worked example: the spec's continuity-in-span example, explain()
    attnspec bench           benchmarks: backends and peers, tables and plots (see --help)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from importlib import metadata

import numpy as np

from . import SPEC_VERSION, __version__, api, list_backends, reference

#: Frameworks whose versions `info` reports (read from package metadata: nothing is imported).
_FRAMEWORKS = ("numpy", "torch", "jax", "jaxlib", "triton", "flax", "entmax", "adasplash", "hypothesis")


def _framework_versions() -> dict:
    versions = {}
    for name in _FRAMEWORKS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _table(rows, header) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def cmd_info(args) -> int:
    statuses = list_backends()
    frameworks = _framework_versions()
    if args.json:
        payload = {
            "attnspec": __version__,
            "spec": SPEC_VERSION,
            "python": platform.python_version(),
            "frameworks": frameworks,
            "backends": [s.__dict__ for s in statuses],
        }
        print(json.dumps(payload, indent=2, default=list))
        return 0
    print(f"attnspec {__version__} (SPEC.md {SPEC_VERSION}), Python {platform.python_version()}")
    print("frameworks: " + ", ".join(f"{n} {v or '(not installed)'}" for n, v in frameworks.items()))
    print()
    rows = []
    for s in statuses:
        if s.available:
            rows.append((s.name, "available", s.version, s.priority, ",".join(s.array_types),
                         ",".join(s.devices), ",".join(s.dtypes), ",".join(s.ops)))
        else:
            status = f"not installed ({s.missing})" if s.missing else "FAILED"
            rows.append((s.name, status, "-", "-", ",".join(s.array_types) or "-", "-", "-", "-"))
    print(_table(rows, ("backend", "status", "version", "priority", "arrays", "devices", "dtypes", "ops")))
    failed = [s for s in statuses if not s.available and not s.missing]
    for s in failed:
        print(f"\n{s.name} ({s.source}) failed to load: {s.error}")
    return 0


def _continuity_example():
    """SPEC.md section 5.2: keys at distance 0, 1, 2 with scores (0, 0.5, 3) and values
    (0, 1, 10), ramp 1, alpha 1.5. The query sits at position 2, so key j is at distance 2 - j."""
    q = np.ones((1, 1, 1, 1))
    k = np.array([3.0, 0.5, 0.0]).reshape(1, 1, 3, 1)
    v = np.array([10.0, 1.0, 0.0]).reshape(1, 1, 3, 1)
    rows = []
    for z in (1.0, 1.000001):
        out = api.attention(q, k, v, alpha=1.5, span=z, ramp=1.0, scale=1.0)
        m = reference.span_mask(1, 3, z, 1.0)[0]
        plain = reference.entmax(np.where(m > 0, k[0, 0, :, 0], -np.inf), 1.5)
        reweighted = (m * plain / np.sum(m * plain)) @ v[0, 0, :, 0]
        rows.append((z, out.item(), reweighted))
    return rows


def cmd_demo(args) -> int:
    print("1. Weighted entmax is continuous in the span z (SPEC.md section 5.2).")
    print("   Scores (0, 0.5, 3) at distances (0, 1, 2), values (0, 1, 10), alpha = 1.5, ramp 1.\n")
    rows = _continuity_example()
    table = [(f"{z:.6f}", f"{ours:.6f}", f"{other:.6f}") for z, ours, other in rows]
    print(_table(table, ("span z", "attnspec.attention", "entmax then re-weight")))
    (_, ours0, other0), (_, ours1, other1) = rows
    print(f"\n   When the far key enters the span, re-weighting after the entmax jumps by "
          f"{other1 - other0:.3g};\n   attnspec's weighted entmax moves by {ours1 - ours0:.2g}.\n")

    rng = np.random.default_rng(0)
    q, k, v = rng.normal(size=(2, 4, 8, 16)), rng.normal(size=(2, 2, 8, 16)), rng.normal(size=(2, 2, 8, 16))
    alpha = np.array([1.0, 1.25, 1.5, 2.0])
    span = np.array([2.0, 4.0, 6.0, 8.0])
    kwargs = dict(alpha=alpha, span=span, ramp=2.0, causal=True)
    print("2. A call with per-head alpha and span, causal, grouped-query heads (H=4, Hkv=2):\n")
    print("   " + str(api.explain(q, k, v, **kwargs)).replace("\n", "\n   "))
    out = api.attention(q, k, v, **kwargs)
    p_zero = np.mean(reference.entmax(rng.normal(size=(1000, 64)), 1.5) == 0)
    print(f"\n   out.shape = {out.shape}; a 1.5-entmax row of 64 N(0,1) scores is {p_zero:.0%} zeros.")
    grads = reference.attention_vjp(q, k, v, np.ones_like(out), **kwargs)
    print(f"   gradients per head: dalpha = {np.round(grads.dalpha, 4)}, dspan = {np.round(grads.dspan, 4)}")
    return 0


class _ProgressBar:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def __call__(self, done, total, label):
        width = 30
        filled = int(width * done / max(total, 1))
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120) + ("\n" if done == total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def cmd_check(args) -> int:
    from . import conformance
    from .conformance.runner import resolve_backend
    from .errors import BackendUnavailableError

    named = args.backend != "all"
    if named:
        try:
            targets = [resolve_backend(args.backend)]
        except (ValueError, BackendUnavailableError) as exc:
            print(f"attnspec check: error: {exc}", file=sys.stderr)
            return 2
        unavailable = []
    else:
        targets = [s.name for s in list_backends() if s.available]
        unavailable = [s for s in list_backends() if not s.available]
    reports = []
    progress = None if args.quiet else _ProgressBar()
    skipped = []
    for target in targets:
        name = getattr(target, "name", target)
        try:
            report = conformance.check(target, profile=args.profile, dtypes=args.dtype, device=args.device,
                                       seed=args.seed, artifacts_dir=args.artifacts, progress=progress,
                                       examples=args.examples)
        except BackendUnavailableError as exc:  # a named backend that cannot load: its cause, one line
            print(f"attnspec check: error: {exc}", file=sys.stderr)
            return 2
        except ValueError as exc:  # e.g. --device that this backend does not declare
            if named:
                print(f"attnspec check: error: {exc}", file=sys.stderr)
                return 2
            skipped.append(f"{name}: not checked ({exc})")
            continue
        reports.append(report)
    print(conformance.format_table(reports))
    for report in reports:
        for failure in report.failures:
            print(f"\nFAIL {failure.backend} / {failure.cell} / {failure.dtype}: {failure.message}")
            print(f"  example: {failure.example}")
            if failure.snippet:
                print("  reproduce:\n" + "\n".join("    " + line for line in failure.snippet.splitlines()))
    print()
    for report in reports:
        print(report.summary())
    for s in unavailable:
        print(f"{s.name}: not checked: unavailable ({s.error})")
    for line in skipped:
        print(line)
    checked = [r for r in reports if r.checked]
    seconds = sum(r.seconds for r in reports)
    passed = all(r.passed for r in reports)
    if not checked:
        verdict, code = "NOTHING CHECKED", 1
    else:
        verdict, code = ("PASSED", 0) if passed else ("FAILED", 1)
    print(f"\n{verdict}: {len(checked)} backend(s) checked, profile {args.profile}, "
          f"SPEC.md {SPEC_VERSION}, {seconds:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.to_dict() for r in reports], f, indent=2)
    return code


def cmd_bench(args) -> int:
    from .bench import cli as bench_cli

    return bench_cli.run_command(args, args.bench_argv)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attnspec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="list backends, versions and status")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=cmd_info)
    check = sub.add_parser("check", help="run the conformance suite against backends")
    check.add_argument("--backend", default="all",
                       help="a backend name, 'all' (default), or package.module:attr naming a Backend object")
    check.add_argument("--profile", default="ci", choices=["ci", "thorough"],
                       help="ci: fast, derandomised; thorough: more and larger examples (see docs/conformance.md)")
    check.add_argument("--dtype", action="append", choices=["float16", "bfloat16", "float32", "float64"],
                       help="only this dtype (repeatable)")
    check.add_argument("--device", help="device to run on, e.g. cuda (default: the backend's first)")
    check.add_argument("--seed", type=int, help="Hypothesis seed (default: ci is derandomised)")
    check.add_argument("--examples", type=int, help="examples per cell and dtype (default: the profile's)")
    check.add_argument("--json", metavar="FILE", help="also write the reports as JSON")
    check.add_argument("--artifacts", metavar="DIR", help="where failing examples are saved")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(run=cmd_check)
    demo = sub.add_parser("demo", help="a worked example")
    demo.set_defaults(run=cmd_demo)
    from .bench import cli as bench_cli  # argparse only: no framework is imported

    bench = sub.add_parser("bench", help="benchmark backends and peers (JSON, Markdown table, plots)")
    bench_cli.add_arguments(bench)
    bench.set_defaults(run=cmd_bench)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.bench_argv = argv[1:]
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
