"""The benchmark's one timing helper: warm-up, repeats, median and spread, device
synchronisation, and the clock (wall time, or this process's CPU time, which leaves out the
time other processes hold the cores on a shared machine).

    from attnspec.bench.timing import measure
    result = measure(lambda: step(), repeats=5, warmup=1, sync=torch.cuda.synchronize)
    result.median, result.iqr, result.min, result.max
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field


def _quantile(sorted_samples, fraction):
    """Linear interpolation between order statistics (numpy's default 'linear' method)."""
    n = len(sorted_samples)
    position = fraction * (n - 1)
    low = int(position)
    high = min(low + 1, n - 1)
    return sorted_samples[low] + (sorted_samples[high] - sorted_samples[low]) * (position - low)


@dataclass
class Timing:
    median: float  # seconds
    spread: float  # (max - min) / median over the repeats
    samples: list
    q1: float = field(default=0.0)  # first and third quartiles (seconds)
    q3: float = field(default=0.0)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def to_dict(self) -> dict:
        return dict(median_s=self.median, q1_s=self.q1, q3_s=self.q3, min_s=self.min, max_s=self.max,
                    repeats=len(self.samples), samples_s=list(self.samples))

    def __str__(self) -> str:
        return f"{self.median * 1e3:.1f} ms (±{self.spread * 50:.0f}%)"


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def measure(fn, *, repeats: int = 5, warmup: int = 1, sync=None, clock: str = "wall") -> Timing:
    """Median time of fn() over `repeats` runs after `warmup` runs, by the wall clock or by
    this process's CPU time (clock="process", all its threads); `sync` (e.g.
    torch.cuda.synchronize) is called before each clock read so asynchronous work is counted."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}; got {clock!r}")
    now = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(repeats):
        start = now()
        fn()
        if sync:
            sync()
        samples.append(now() - start)
    median = statistics.median(samples)
    ordered = sorted(samples)
    return Timing(median=median, spread=(max(samples) - min(samples)) / median if median else 0.0, samples=samples,
                  q1=_quantile(ordered, 0.25), q3=_quantile(ordered, 0.75))
