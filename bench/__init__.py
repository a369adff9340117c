"""Cross-framework benchmarks (the subpackage `attnspec.bench`): `attnspec bench` on the command
line, `python -m attnspec.bench`, or from Python:

    from attnspec import bench
    result = bench.run(bench.PRESETS["quick"], baseline="sdpa")
    bench.write(result, "out/quick")              # out/quick.json, .md, .png
    bench.dispatch_overhead("torch")              # microseconds the dispatcher adds per call

Targets are every attnspec backend the dispatcher lists (`attnspec.list_backends()`), run
through a runner for its array type (numpy, torch, jax), and real peers through the wrappers of
`attnspec.conformance.peers`: torch SDPA, FlexAttention, the `entmax` package, AdaSplash,
`jax.nn.dot_product_attention`. A target that cannot run a case is listed with its reason.
Presets (`PRESETS`, docs/benchmarks.md) name the cases, the targets of each and how to measure.
Nothing here is imported by `import attnspec`; frameworks are imported when a target needs them.
"""

from .core import Result, run
from .overhead import dispatch_overhead
from .report import markdown, plot, write
from .sweep import PRESETS, Case, Cases, Preset, Sweep

__all__ = ["PRESETS", "Case", "Cases", "Preset", "Result", "Sweep", "dispatch_overhead", "markdown", "plot", "run",
           "write"]
