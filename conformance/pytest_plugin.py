"""pytest plugin (entry point `pytest11`): run the conformance suite from any test session.

Inert unless asked: `pytest --attnspec-backend=mykernel` adds one test item per feature cell
of the suite (e.g. `attnspec[mykernel][span]`), each running every dtype the backend declares.
A kernel author's own tests can instead parametrise over the names of `attnspec.conformance.CELLS`
and call `attnspec.conformance.check(name, cells=[cell.name])`.
"""

from __future__ import annotations

import pytest

from attnspec import SPEC_VERSION


def pytest_addoption(parser):
    group = parser.getgroup("attnspec", "attnspec conformance suite")
    group.addoption("--attnspec-backend", action="append", default=[], metavar="NAME",
                    help="check this attnspec backend against SPEC.md: a registered name, or "
                         "package.module:attr naming a Backend object (repeatable)")
    group.addoption("--attnspec-profile", default="ci", choices=["ci", "thorough"],
                    help="Hypothesis profile of the conformance suite (default: ci)")
    group.addoption("--attnspec-dtype", action="append", default=None,
                    choices=["float16", "bfloat16", "float32", "float64"],
                    help="only this dtype (repeatable; default: all the backend declares)")
    group.addoption("--attnspec-seed", type=int, default=None, help="Hypothesis seed")


def pytest_report_header(config):
    backends = config.getoption("attnspec_backend")
    if backends:
        return (f"attnspec conformance: backends {', '.join(backends)}, profile "
                f"{config.getoption('attnspec_profile')}, SPEC.md {SPEC_VERSION}")
    return None


def skip_reason(report) -> str:
    """Why a cell was not checked, one clause per reason with the dtypes that gave it."""
    by_reason = {}
    for c in report.cells:
        reason = "dtype not declared" if c.reason == f"dtype {c.dtype} not declared" else c.reason
        by_reason.setdefault(reason, []).append(c.dtype)
    parts = []
    for reason, dtypes in by_reason.items():
        dtypes = [d for d in dtypes if d != "-"]
        parts.append(f"{reason} ({', '.join(dtypes)})" if dtypes else str(reason))
    return "not checked: " + "; ".join(parts)


class ConformanceItem(pytest.Item):
    def __init__(self, *, backend, cell, **kwargs):
        super().__init__(**kwargs)
        self.backend, self.cell = backend, cell

    def runtest(self):
        from . import check
        from .runner import resolve_backend

        config = self.config
        report = check(resolve_backend(self.backend), profile=config.getoption("attnspec_profile"),
                       dtypes=config.getoption("attnspec_dtype"), seed=config.getoption("attnspec_seed"),
                       cells=[self.cell.name])
        self.user_properties.append(("attnspec_report", report.to_json()))
        if not report.passed:
            raise ConformanceFailure(report)
        if not report.checked:
            pytest.skip(skip_reason(report))
        coverage = sorted({c.coverage for c in report.cells if c.status == "pass"})
        self.user_properties.append(("attnspec_coverage", "; ".join(coverage)))

    def repr_failure(self, excinfo):
        from attnspec.errors import BackendUnavailableError

        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value.report)
        if isinstance(excinfo.value, BackendUnavailableError):  # one line with the cause
            return f"attnspec backend {self.backend!r} cannot be loaded: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"attnspec[{self.backend}][{self.cell.name}]"


class ConformanceFailure(AssertionError):
    def __init__(self, report):
        self.report = report
        super().__init__(str(report))


def pytest_collection_modifyitems(session, config, items):
    backends = config.getoption("attnspec_backend")
    if not backends:
        return
    from .strategies import CELLS

    added = 0
    for backend in backends:
        for cell in CELLS:
            items.append(ConformanceItem.from_parent(session, name=f"attnspec[{backend}][{cell.name}]",
                                                     backend=backend, cell=cell))
            added += 1
    config._attnspec_items = added


def pytest_report_collectionfinish(config, start_path, items):
    added = getattr(config, "_attnspec_items", 0)
    if not added:
        return None
    backends = config.getoption("attnspec_backend")
    return (f"attnspec conformance: {added} items ({len(backends)} backend(s) x one per feature cell; "
            f"each runs every dtype the backend declares)")
