"""The conformance suite: does an implementation obey SPEC.md, in values and gradients?

    import attnspec.conformance
    report = attnspec.conformance.check("numpy", profile="ci")
    print(report)                 # table: feature x dtype, pass / FAIL / unsupported: reason
    report.passed, report.failures, report.skipped, report.to_json()

Each failure carries its minimal (shrunk) example, saved as .npz, and a snippet that re-runs
it (`replay`, which raises `ConformanceError` while the failure persists). Also available as
`attnspec check` and as a pytest plugin (`pytest --attnspec-backend=NAME`). Layout, as in array-api-tests: strategies.py holds every
Hypothesis strategy, attention.py / entmax.py / span.py the checks per op, tolerances.py the
per-dtype tolerances of SPEC.md section 9.
"""

from ._compare import ConformanceError
from .cases import AttentionCase, EntmaxCase, SpanMaskCase, load_case, save_case
from .report import CellResult, Failure, Report, format_table
from .runner import PROFILES, check, replay
from .strategies import CELLS, PROFILE_SIZES, Sizes

__all__ = [
    "CELLS",
    "PROFILES",
    "PROFILE_SIZES",
    "AttentionCase",
    "CellResult",
    "ConformanceError",
    "EntmaxCase",
    "Failure",
    "Report",
    "SpanMaskCase",
    "Sizes",
    "check",
    "format_table",
    "load_case",
    "replay",
    "save_case",
]
