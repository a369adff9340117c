"""What a conformance run found: one result per (cell, dtype), failures with reproducers."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

DTYPE_ORDER = ("float16", "bfloat16", "float32", "float64")


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


def _status(result: CellResult) -> str:
    if result.status == "pass":
        skips = f", {result.gradient_skips} grad skipped" if result.gradient_skips else ""
        return f"pass ({result.examples}{skips})"
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
