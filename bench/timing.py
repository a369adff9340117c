"""A small timing helper: warm-up, repeats, median and spread, device synchronisation.

    from attnspec.bench.timing import measure
    result = measure(lambda: step(), repeats=5, warmup=1, sync=torch.cuda.synchronize)
    result.median, result.spread
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


@dataclass
class Timing:
    median: float  # seconds
    spread: float  # (max - min) / median over the repeats
    samples: list

    def __str__(self) -> str:
        return f"{self.median * 1e3:.1f} ms (±{self.spread * 50:.0f}%)"


def measure(fn, *, repeats: int = 5, warmup: int = 1, sync=None) -> Timing:
    """Median wall time of fn() over `repeats` runs after `warmup` runs; `sync` (e.g.
    torch.cuda.synchronize) is called before each clock read so asynchronous work is counted."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - start)
    median = statistics.median(samples)
    return Timing(median=median, spread=(max(samples) - min(samples)) / median if median else 0.0, samples=samples)
