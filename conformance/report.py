"""What a conformance run found: one result per (cell, dtype), failures with reproducers."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

DTYPE_ORDER = ("float16", "bfloat16", "float32", "float64")
#: How the report writes each gradient (z is the span).
GRADIENT_SYMBOLS = {"q": "dq", "k": "dk", "v": "dv", "alpha": "dα", "span": "dz", "x": "dx", "weights": "dw"}


@dataclass
class Failure:
    """A disagreement with the spec, with the minimal (shrunk) example that shows it.

    npz: the saved example; snippet: Python that re-runs the failing check on it.
    """

    backend: str
    cell: str
    dtype: str
    check: str
    message: str
    example: str
    npz: str | None = None
    snippet: str | None = None


@dataclass
class CellResult:
    cell: str
    op: str
    dtype: str
    status: str  # 'pass', 'FAIL' or 'unsupported'
    reason: str | None = None
    examples: int = 0
    gradient_checks: int = 0
    gradient_skips: int = 0
    failure: Failure | None = None
    tile_crossing: int = 0  # of the examples, those at tile-crossing sizes
    refused: int = 0  # drawn examples the kernel turned down through its own checks (drawn again)
    refusals: dict = field(default_factory=dict)  # reason -> count
    gradients_declared: list = field(default_factory=list)  # inputs the kernel provides gradients for
    gradients_checked: list = field(default_factory=list)  # those compared against the reference

    @property
    def refused_share(self) -> float:
        """The share of drawn examples the kernel refused."""
        drawn = self.examples + self.refused
        return self.refused / drawn if drawn else 0.0

    @property
    def coverage(self) -> str:
        """'values + gradients (dq dk dv dα dz)', 'values only', or what was declared but not
        reached ('values + gradients (dq dk dv; dα declared, not reached)')."""
        if not self.gradients_declared:
            return "values only"
        checked = " ".join(GRADIENT_SYMBOLS.get(n, "d" + n) for n in self.gradients_checked)
        unreached = " ".join(GRADIENT_SYMBOLS.get(n, "d" + n) for n in self.gradients_declared
                             if n not in self.gradients_checked)
        if not checked:
            return f"values only ({unreached} declared, not reached)"
        return f"values + gradients ({checked}" + (f"; {unreached} not reached)" if unreached else ")")


@dataclass
class Report:
    backend: str
    backend_version: str
    spec_version: str
    attnspec_version: str
    profile: str
    seed: int | None
    device: str | None
    cells: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not any(c.status == "FAIL" for c in self.cells)

    @property
    def checked(self) -> bool:
        """Whether any cell ran (a backend whose every cell was unsupported was not checked)."""
        return any(c.status != "unsupported" for c in self.cells)

    @property
    def not_checked_reason(self) -> str | None:
        """Why nothing was checked: the reason most cells gave (None if something ran)."""
        if self.checked:
            return None
        reasons = [c.reason for c in self.cells if c.reason]
        return max(set(reasons), key=reasons.count) if reasons else "no cell selected"

    def summary(self) -> str:
        """One line: what was checked for this backend."""
        if not self.checked:
            return f"{self.backend}: not checked: {self.not_checked_reason}"
        ran = [c for c in self.cells if c.status != "unsupported"]
        failed = sum(c.status == "FAIL" for c in ran)
        dtypes = [d for d in DTYPE_ORDER if any(c.dtype == d for c in ran)]
        return (f"{self.backend}: {'FAILED' if failed else 'passed'} {len(ran) - failed} of {len(ran)} cells "
                f"({', '.join(dtypes)}), {sum(c.examples for c in ran)} examples "
                f"({sum(c.tile_crossing for c in ran)} at tile-crossing sizes), "
                f"{sum(c.gradient_checks for c in ran)} gradient checks, {self.seconds:.1f} s")

    @property
    def failures(self) -> list:
        return [c.failure for c in self.cells if c.failure is not None]

    @property
    def skipped(self) -> list:
        """(cell, dtype, reason) for everything not checked: unsupported cells, and gradient
        checks skipped near the entmax support boundary (counted per cell)."""
        out = [(c.cell, c.dtype, c.reason) for c in self.cells if c.status == "unsupported"]
        out += [(c.cell, c.dtype, f"{c.gradient_skips} of {c.gradient_skips + c.gradient_checks} gradient checks "
                 "skipped: example within the support-boundary margin (or a gradient beyond the dtype's range)")
                for c in self.cells if c.gradient_skips]
        return out

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["passed"] = self.passed
        payload["checked"] = self.checked
        for cell, result in zip(payload["cells"], self.cells):
            cell["coverage"] = result.coverage if result.status != "unsupported" else None
            cell["refused_share"] = result.refused_share
        return payload

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), indent=kwargs.pop("indent", 2), **kwargs)

    def table(self) -> str:
        return format_table([self])

    def __str__(self) -> str:
        lines = [self.table()]
        for failure in self.failures:
            lines += ["", f"FAIL {failure.backend} / {failure.cell} / {failure.dtype}: {failure.message}",
                      f"  example: {failure.example}"]
            if failure.snippet:
                lines += ["  reproduce:", *("    " + line for line in failure.snippet.splitlines())]
        return "\n".join(lines)


def _coverage(result: CellResult) -> str:
    """'dq dk dv dα' (or 'values only') for a table cell."""
    text = result.coverage
    if text.startswith("values + gradients ("):
        return text[len("values + gradients ("):-1]
    return text


def _status(result: CellResult) -> str:
    if result.status == "pass":
        extra = f", {result.gradient_skips} grad skipped" if result.gradient_skips else ""
        if result.refused:
            extra += f", {result.refused_share:.0%} refused"
        return f"pass ({result.examples}{extra}; {_coverage(result)})"
    if result.status == "FAIL":
        return f"FAIL [{result.failure.check}]" if result.failure else "FAIL"
    return f"unsupported: {result.reason}"


def format_table(reports) -> str:
    """backend x feature (cell) x dtype, one row per backend and cell."""
    dtypes = [d for d in DTYPE_ORDER if any(c.dtype == d for r in reports for c in r.cells)]
    header = ["backend", "feature"] + dtypes
    rows = []
    for report in reports:
        cells = []
        for result in report.cells:
            if result.cell not in cells:
                cells.append(result.cell)
        for cell in cells:
            by_dtype = {c.dtype: c for c in report.cells if c.cell == cell}
            whole = by_dtype.get("-")  # a cell refused for every dtype (no kernel, no adapter)
            rows.append([report.backend, cell] + [
                _status(whole) if whole else _status(by_dtype[d]) if d in by_dtype else "-" for d in dtypes])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
