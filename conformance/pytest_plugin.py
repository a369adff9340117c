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
                    help="check this registered attnspec backend against SPEC.md (repeatable)")
    group.addoption("--attnspec-profile", default="ci", choices=["ci", "thorough"],
                    help="Hypothesis profile of the conformance suite (default: ci)")
    group.addoption("--attnspec-dtype", action="append", default=None, metavar="DTYPE",
                    help="only this dtype (repeatable; default: all the backend declares)")
    group.addoption("--attnspec-seed", type=int, default=None, help="Hypothesis seed")


def pytest_report_header(config):
    backends = config.getoption("attnspec_backend")
    if backends:
        return (f"attnspec conformance: backends {', '.join(backends)}, profile "
                f"{config.getoption('attnspec_profile')}, SPEC.md {SPEC_VERSION}")
    return None


class ConformanceItem(pytest.Item):
    def __init__(self, *, backend, cell, **kwargs):
        super().__init__(**kwargs)
        self.backend, self.cell = backend, cell

    def runtest(self):
        from . import check

        config = self.config
        report = check(self.backend, profile=config.getoption("attnspec_profile"),
                       dtypes=config.getoption("attnspec_dtype"), seed=config.getoption("attnspec_seed"),
                       cells=[self.cell.name])
        self.user_properties.append(("attnspec_report", report.to_json()))
        if not report.passed:
            raise ConformanceFailure(report)
        if all(c.status == "unsupported" for c in report.cells):
            pytest.skip("; ".join(sorted({f"{c.dtype}: {c.reason}" for c in report.cells})))

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value.report)
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

    for backend in backends:
        for cell in CELLS:
            items.append(ConformanceItem.from_parent(session, name=f"attnspec[{backend}][{cell.name}]",
                                                     backend=backend, cell=cell))
