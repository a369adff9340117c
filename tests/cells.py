"""What a run of our own backends must cover: every cell of every op the backend implements, in
every dtype it declares (an 'unsupported' cell there is a gap, not a green skip)."""

from attnspec.conformance import strategies
from attnspec.dispatch import registry


def declared_cells(backend: str, dtypes=None, cells=None) -> set:
    """{(cell, dtype)} a run of `backend` must pass: cells whose required features it declares,
    of ops it implements, in the dtypes it declares (restricted to `dtypes` / `cells` if given)."""
    b = registry.load(backend)
    out = set()
    for cell in strategies.CELLS:
        kernel = b.kernel(cell.op)
        if kernel is None or (cells is not None and cell.name not in cells):
            continue
        if cell.required <= frozenset(kernel.capabilities.features):
            out |= {(cell.name, d) for d in kernel.capabilities.dtypes if dtypes is None or d in dtypes}
    return out


def assert_every_declared_cell_ran(report, dtypes=None, cells=None) -> None:
    """The report's passing cells are exactly the declared ones; the only cells not run are ops
    the backend does not implement, dtypes it does not declare, and cells whose features it does
    not declare."""
    assert report.passed, str(report)
    ran = {(c.cell, c.dtype) for c in report.cells if c.status == "pass" and c.examples > 0}
    assert ran == declared_cells(report.backend, dtypes, cells), str(report)
    b = registry.load(report.backend)

    required = {cell.name: cell.required for cell in strategies.CELLS}

    def undeclared(c):
        kernel = b.kernel(c.op)
        if kernel is None:
            return True
        if not required[c.cell] <= frozenset(kernel.capabilities.features):
            return True
        return c.dtype != "-" and c.dtype not in kernel.capabilities.dtypes

    others = [c for c in report.cells if c.status != "pass"]
    assert all(undeclared(c) for c in others), \
        "cells skipped although the backend declares them: " + "; ".join(f"{c.cell} {c.dtype}: {c.reason}" for c in others)
