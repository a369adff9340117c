"""The example package's own tests: run the attnspec conformance suite on its backend, once per
feature cell, with a table in the failure message when something is off."""

import pytest

import attnspec.conformance


@pytest.mark.parametrize("cell", [c.name for c in attnspec.conformance.CELLS if c.op == "attention"])
def test_examplekernel_conforms(cell):
    report = attnspec.conformance.check("examplekernel", cells=[cell])
    assert report.passed, str(report)
