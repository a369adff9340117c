"""How close a backend comes to the conformance bounds: run the suite with margin recording and
print, per dtype and check, the largest |error| / tolerance seen (1.0 is the edge).

    python -m attnspec.conformance.margins torch --profile thorough --seeds 1 2 3 4 5 --dtypes float16 bfloat16

Writes one JSON line per (seed, dtype) with the report's outcome and the margins, so that runs
of several backends can be collected into one table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ._compare import recording_margins
from .runner import check


def measure(backend: str, *, profile: str, seed, dtype: str, examples=None, cells=None) -> dict:
    with recording_margins() as margins:
        report = check(backend, profile=profile, seed=seed, dtypes=[dtype], examples=examples, cells=cells)
    failures = [f"{c.cell} {c.dtype}: {c.failure.message}" for c in report.cells if c.status == "FAIL" and c.failure]
    statuses = sorted({(c.cell, c.status) for c in report.cells})
    return {"backend": backend, "profile": profile, "seed": seed, "dtype": dtype, "passed": report.passed,
            "failures": failures, "cells": statuses, "seconds": round(report.seconds, 1),
            "margins": {f"{check_name}/{name}": round(value, 4) for (check_name, name), value in sorted(margins.items())}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("backend")
    parser.add_argument("--profile", default="thorough")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--examples", type=int, default=None)
    parser.add_argument("--cells", nargs="+", default=None)
    args = parser.parse_args(argv)
    ok = True
    for seed in args.seeds:
        for dtype in args.dtypes:
            start = time.time()
            row = measure(args.backend, profile=args.profile, seed=seed, dtype=dtype,
                          examples=args.examples, cells=args.cells)
            row["wall"] = round(time.time() - start, 1)
            ok &= row["passed"]
            print(json.dumps(row), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
