"""Check other projects' kernels against SPEC.md and write what the suite finds as Markdown.

    python -m attnspec.conformance.peers_report --out docs/peers.md
    python -m attnspec.conformance.peers_report --peers entmax15,entmax_bisect --dtypes float32

Each peer runs as its adapter (`attnspec.conformance.adapters`, registered for the run only)
through `attnspec.conformance.check`, one dtype at a time, with the `ci` profile's examples:
per cell and dtype pass, FAIL with the check that failed and the shrunk example, or why the
cell was not checked. Peers that cannot run here (a package or CUDA missing) are listed with
the reason. A failure is the peer's own behaviour on that example: the adapters repair
nothing.

Examples draw only the alphas a peer computes (adapters.ALPHAS), as they would be held in the
dtype under test: an array alpha of 1 + 1e-6 is 1 in float16, which entmax_bisect refuses.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import platform
import sys
import tempfile
from unittest import mock

import numpy as np
from hypothesis import strategies as st

import attnspec

from . import adapters, strategies
from ._compare import checking_nan_only
from .attention import _allowed
from .cases import load_case, round_to
from .report import DTYPE_ORDER
from .runner import check

__all__ = ["KNOWN", "known_failures", "main", "markdown", "run"]

DEFAULT_PEERS = ("entmax15", "entmax_bisect", "sparsemax", "sdpa", "flex", "adasplash", "adasplash_no_block_mask")


def _alpha_strategy(alphas, dtype, base):
    """The suite's alpha draws limited to what the peer computes, in the dtype under test."""
    if alphas.values:
        return st.sampled_from(sorted(alphas.values))
    return base().filter(lambda a: a in alphas and float(round_to(a, dtype)) in alphas)


@contextlib.contextmanager
def _drawing_alphas(name, dtype):
    """Draw only the alphas the peer computes while it is checked. (Capabilities carry no alpha
    rule here; with one, the strategies read it and this does nothing.)"""
    base = getattr(strategies, "alphas", None)
    if base is None or "entmax" not in adapters.ADAPTERS[name][1]:
        # A softmax-only peer is never drawn an alpha, except by the check that it refuses
        # alpha != 1, which must keep drawing them.
        yield
        return
    restricted = _alpha_strategy(adapters.ALPHAS[name], dtype, base)
    with mock.patch.object(strategies, "alphas", lambda *args, **kwargs: restricted):
        yield


def run(name, *, gradients=True, dtypes=DTYPE_ORDER, profile="ci", seed=None, cells=None, examples=None,
        artifacts_dir=None, progress=None, nan_only=False):
    """(backend, Report or None, why not checked) for one adapter; gradients=False checks values
    only (adapters.backend(name, gradients=False)); nan_only=True fails only NaN where the
    reference has a number (_compare.checking_nan_only)."""
    try:
        backend = adapters.backend(name, gradients=gradients)
    except ImportError as exc:
        return None, None, str(exc).split(": ", 1)[-1]
    attnspec.register_backend(backend, replace=True)
    try:
        merged = None
        for dtype in dtypes:
            with _drawing_alphas(name, dtype), (checking_nan_only() if nan_only else contextlib.nullcontext()):
                report = check(backend.name, profile=profile, dtypes=[dtype], seed=seed, cells=cells, examples=examples,
                               artifacts_dir=artifacts_dir or tempfile.mkdtemp(prefix="attnspec-peers-"))
            if merged is None:
                merged = report
            else:
                merged.cells += report.cells
                merged.seconds += report.seconds
            if progress is not None:
                what = "values and gradients" if gradients else "values"
                progress(f"{backend.name} {what} {dtype}: {'passed' if report.passed else 'FAILED'} "
                         f"({report.seconds:.0f} s)")
        return backend, merged, None
    finally:
        attnspec.unregister_backend(backend.name)


def _status(cell) -> str:
    if cell.status == "pass":
        return f"pass ({cell.examples})"
    if cell.status == "FAIL":
        return f"**FAIL** [{cell.failure.check}]" if cell.failure else "**FAIL**"
    return f"not checked: {cell.reason}"


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _gradients(backend) -> str:
    features = backend.kernels["attention"].capabilities.features
    names = (["q", "k", "v"] if "grad" in features else []) + [n for n in ("alpha", "span") if f"{n}_grad" in features]
    return ", ".join("d" + n for n in names) if names else "none (values only)"


# --- the entmax package's known failures, recognised in what the suite found ---------------------

def _case(failure):
    if not failure or not failure.npz:
        return None
    try:
        return load_case(failure.npz)[0]
    except (OSError, KeyError, ValueError):
        return None


def _empty_rows(case) -> bool:
    return bool((~_allowed(case).any(-1)).any())


def _near_one(case) -> bool:
    alpha = np.asarray(case.alpha, dtype=np.float64)
    return bool(np.any((alpha > 1) & (alpha - 1 <= 1e-2)))


def _broken(failure) -> bool:
    return failure.check == "error" or "nan" in failure.message


#: (adapters, what, predicate(dtype, case, failure)) for deep-spin/entmax 1.3's known failures.
KNOWN = [
    (("entmax15", "entmax_bisect", "sparsemax"), "all -inf rows give NaN or an IndexError (deep-spin/entmax #19)",
     lambda dtype, case, f: _broken(f) and _empty_rows(case)),
    (("entmax15", "entmax_bisect", "sparsemax"),
     "NaN (or an IndexError) in float16/bfloat16 when a row's max is large in magnitude (deep-spin/entmax #30)",
     lambda dtype, case, f: dtype in ("float16", "bfloat16") and _broken(f) and not _empty_rows(case)
     and case.max_score() >= 1e3),
    (("entmax_bisect",), "entmax_bisect's values near alpha = 1",
     lambda dtype, case, f: f.check == "forward" and _near_one(case) and not _broken(f)),
    (("entmax_bisect",), "entmax_bisect's dalpha near alpha = 1",
     lambda dtype, case, f: f.check == "dalpha" and _near_one(case)),
]


def known_failures(results):
    """[(what, [(adapter, pass, cell, dtype, relative error or None)])]: where the suite found
    each known failure of the entmax package (an empty list: it did not)."""
    found = []
    for names, what, predicate in KNOWN:
        hits = []
        for name, passes in results:
            if name not in names:
                continue
            for label, _backend, report, _why in passes:
                for cell in (report.cells if report else []):
                    case = _case(cell.failure) if cell.status == "FAIL" else None
                    if case is not None and predicate(cell.dtype, case, cell.failure):
                        hits.append((name, label, cell.cell, cell.dtype, _relative(cell.failure.message)))
        found.append((what, hits))
    return found


def _relative(message: str):
    """|actual - expected| / |expected| of the element a failure message names, if readable."""
    import re

    match = re.search(r"=np\.float64\(([^)]*)\), but should be np\.float64\(([^)]*)\)", message)
    if not match:
        return None
    actual, expected = (float(x) for x in match.groups())
    if not (np.isfinite(actual) and np.isfinite(expected)) or expected == 0:
        return None
    return abs(actual - expected) / abs(expected)


def markdown(results, command: str) -> str:
    """The report: results is [(adapter name, [(pass label, backend, Report or None, why not)])]."""
    versions = []
    for package in ("torch", "entmax", "adasplash", "triton"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    lines = [
        "# Other projects' kernels against SPEC.md",
        "",
        f"Made by `{command}` (attnspec {attnspec.__version__}, spec {attnspec.SPEC_VERSION}; "
        f"{', '.join(versions)}; Python {platform.python_version()}; CPU only). Each peer runs as its adapter "
        "(`attnspec.conformance.adapters`) through the conformance suite, `ci` profile, one dtype at a time, "
        "drawing only the alphas it computes: once for values alone, then (where it gives gradients) for values "
        "and gradients, so that a gradient failure does not hide a value failure of the same example. A FAIL is "
        "the peer's own output on the shrunk example shown: the adapters repair nothing. `declared but refused` "
        "is a call the peer cannot express although its declaration says it can; `error` an exception the peer "
        "raised.",
        "",
        "## Known failures of the entmax package, as the suite finds them",
        "",
    ]
    for what, hits in known_failures(results):
        if hits:
            where = []
            for n in dict.fromkeys(h[0] for h in hits):
                mine = [h for h in hits if h[0] == n]
                cells = ", ".join(dict.fromkeys(h[2] for h in mine))
                dtypes = ", ".join(d for d in DTYPE_ORDER if any(h[3] == d for h in mine))
                errors = [(h[4], h[3]) for h in mine if h[4] is not None]
                worst = max(errors) if errors else None
                where.append(f"{adapters.backend_name(n)} in {cells} ({dtypes})"
                             + (f", relative error up to {worst[0]:.2g} ({worst[1]})" if worst else ""))
            lines.append(f"- {what}: found {len(hits)} times: " + "; ".join(where) + ".")
        else:
            lines.append(f"- {what}: NOT found by this run.")
    lines.append("")
    for name, passes in results:
        title = adapters.backend_name(name)
        first = next((b for _, b, _, _ in passes if b is not None), None)
        if first is None:
            lines += [f"## {title}", "", f"Not checked here: {passes[0][3]}.", ""]
            continue
        caps = first.kernels["attention"].capabilities
        full = passes[-1][1]
        reports = [r for _, _, r, _ in passes]
        if all(c.status == "unsupported" for r in reports for c in r.cells):
            reasons = sorted({c.reason for r in reports for c in r.cells if c.dtype != "-"})
            lines += [f"## {title}", "", f"{first.description} ({first.version}). Not checked here: "
                      + "; ".join(reasons) + ".", ""]
            continue
        lines += [f"## {title}", "", f"{first.description} ({first.version}). alpha: {adapters.ALPHAS[name]}; "
                  f"features: {', '.join(sorted(caps.features - {'grad', 'alpha_grad', 'span_grad'}))}; "
                  f"gradients: {_gradients(full)}; devices: {', '.join(caps.devices)}.", ""]
        for label, _backend, report, _why in passes:
            lines += [f"### {label}", ""]
            dtypes = [d for d in DTYPE_ORDER if any(c.dtype == d for c in report.cells)]
            cells = []
            for c in report.cells:
                if c.cell not in cells and c.dtype != "-":
                    cells.append(c.cell)
            lines += ["| feature | " + " | ".join(dtypes) + " |", "| --- |" + " --- |" * len(dtypes)]
            for cell in cells:
                by_dtype = {c.dtype: c for c in report.cells if c.cell == cell}
                row = [_escape(_status(by_dtype[d])) if d in by_dtype else "-" for d in dtypes]
                lines.append(f"| {cell} | " + " | ".join(row) + " |")
            absent = sorted({c.cell for c in report.cells if c.dtype == "-"})
            if absent:
                lines += ["", f"Not implemented by the adapter: {', '.join(absent)}."]
            failures = [c for c in report.cells if c.status == "FAIL" and c.failure]
            if failures:
                lines += ["", "Failures (shrunk examples):", ""]
                for c in failures:
                    f = c.failure
                    message = f.message if len(f.message) <= 300 else f.message[:300] + " ..."
                    lines.append(f"- {c.cell} / {c.dtype}: `{_escape(f.example.strip())}` — {_escape(message)}")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnspec.conformance.peers_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the Markdown report here (default: print it)")
    parser.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                        help=f"comma-separated adapters (default: all: {', '.join(DEFAULT_PEERS)})")
    parser.add_argument("--dtypes", default=",".join(DTYPE_ORDER), help="comma-separated dtypes (default: all four)")
    parser.add_argument("--cells", default=None, help="comma-separated cells (default: every cell)")
    parser.add_argument("--seed", type=int, default=None, help="draw fresh examples from this seed (default: the "
                        "ci profile's fixed examples)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.peers.split(",") if n.strip()]
    unknown = [n for n in names if n not in adapters.ADAPTERS]
    if unknown:
        parser.error(f"unknown peer(s) {', '.join(unknown)} (known: {', '.join(adapters.ADAPTERS)})")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPE_ORDER]
    if bad:
        parser.error(f"unknown dtype(s) {', '.join(bad)} (dtypes: {', '.join(DTYPE_ORDER)})")
    cells = None if args.cells is None else [c.strip() for c in args.cells.split(",")]
    results = []
    for name in names:
        passes = []
        for gradients in (False, True):
            backend, report, why = run(name, gradients=gradients, dtypes=dtypes, seed=args.seed, cells=cells,
                                       progress=lambda line: print(line, file=sys.stderr, flush=True))
            if gradients and backend is not None and _gradients(backend).startswith("none"):
                break  # the peer gives no gradients here: the values pass was all
            passes.append(("values and gradients" if gradients else "values", backend, report, why))
            if backend is None:
                break
        half = [d for d in dtypes if d in ("float16", "bfloat16")]
        if half and passes and passes[0][1] is not None:
            # NaN where a number is defined, found even where an inaccuracy fails first
            backend, report, why = run(name, gradients=False, dtypes=half, seed=args.seed, cells=cells, nan_only=True,
                                       progress=lambda line: print(line, file=sys.stderr, flush=True))
            passes.append(("NaN only (half precision)", backend, report, why))
        results.append((name, passes))
    command = "python -m attnspec.conformance.peers_report " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(results, command.strip())
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
