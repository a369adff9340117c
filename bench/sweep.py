"""What a benchmark sweeps over (one `Case` per measured call) and the presets.

A case is one attention call: B, H (query heads), Hkv (key/value heads), L (query length) and
Lk (key length, default L), D, dtype, alpha, span/ramp (None: no span), causal, the mode: "fwd"
(forward only) or "fwd+bwd" (forward and the backward of sum(out * g) for q, k and v), whether
alpha and the span are learned ([H] arrays of the framework, with their gradients), and the
framework threads to run with (None: the framework's own choice).

A preset is a list of sweeps (cross products) and explicit case lists, each optionally limited
to some targets and with its own memory setting, plus how to measure: repeats, clock, baseline,
allocators for the peak-memory measurement.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

MODES = ("fwd", "fwd+bwd")
DTYPES = ("float16", "bfloat16", "float32", "float64")
CLOCKS = ("wall", "process")
#: How the peak-memory child configures glibc's allocator: "default" (what a user sees,
#: including heap fragmentation, which varies from run to run) or "fixed-mmap" (a fixed mmap
#: threshold of 64 KiB: every large tensor is mapped on its own and unmapped when freed, so the
#: peak RSS is the peak of live memory, the same every run).
ALLOCATORS = ("default", "fixed-mmap")


@dataclass(frozen=True)
class Case:
    L: int
    alpha: float = 1.0
    span: float | None = None
    ramp: float = 32.0
    causal: bool = True
    B: int = 1
    H: int = 4
    Hkv: int | None = None  # None: H (no grouped-query heads)
    D: int = 64
    dtype: str = "float32"
    mode: str = "fwd+bwd"
    Lk: int | None = None  # None: L (self-attention)
    learned: bool = False  # alpha (and span) as [H] arrays of the framework, with gradients
    threads: int | None = None  # framework threads for this case (None: leave as they are)

    def __post_init__(self):
        if self.Hkv is None:
            object.__setattr__(self, "Hkv", self.H)
        if self.Lk is None:
            object.__setattr__(self, "Lk", self.L)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if not 1.0 <= self.alpha <= 2.0:
            raise ValueError(f"alpha must lie in [1, 2]; got {self.alpha}")
        if self.H % self.Hkv:
            raise ValueError(f"H={self.H} must be a multiple of Hkv={self.Hkv}")
        for name in ("L", "Lk", "B", "H", "Hkv", "D"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None; got {self.threads}")

    @property
    def scores(self) -> int:
        return self.B * self.H * self.L * self.Lk

    def attention_kwargs(self, params=()) -> dict:
        """The arguments of attnspec.attention (and of the reference) besides q, k, v; params:
        the learned [H] arrays (alpha, then span when there is one) that replace the numbers."""
        kwargs = dict(alpha=self.alpha, span=self.span, ramp=self.ramp, causal=self.causal)
        if params:
            kwargs["alpha"] = params[0]
            if self.span is not None:
                kwargs["span"] = params[1]
        return kwargs

    def family(self) -> _Family:
        """The case without its length: one line per target in the plots."""
        return _Family(**{k: v for k, v in asdict(self).items() if k not in ("L", "Lk")},
                       decode=self.Lk != self.L)

    def label(self, with_L=True) -> str:
        parts = []
        if with_L:
            parts.append(f"L={self.L}" if self.Lk == self.L else f"Lq={self.L} Lk={self.Lk}")
        parts.append(f"α={self.alpha:g}" + (" learned" if self.learned else ""))
        if self.span is not None:
            parts.append(f"span={self.span:g}/R={self.ramp:g}")
        parts.append("causal" if self.causal else "full")
        heads = f"H={self.H}" if self.Hkv == self.H else f"H={self.H}/Hkv={self.Hkv}"
        parts += [f"B={self.B} {heads} D={self.D}", self.dtype, self.mode]
        if self.threads is not None:
            parts.append(f"{self.threads} thread{'s' if self.threads > 1 else ''}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Family:
    """A Case without L: the key of one plot panel."""

    alpha: float
    span: float | None
    ramp: float
    causal: bool
    B: int
    H: int
    Hkv: int
    D: int
    dtype: str
    mode: str
    learned: bool
    threads: int | None
    decode: bool = False

    def label(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if k != "decode"}
        return Case(L=1, **fields).label(with_L=False) + (" (Lq != Lk)" if self.decode else "")


@dataclass(frozen=True)
class Sweep:
    """The cross product of these values, in this order (L varies fastest, so that a target
    that becomes too slow at some L is skipped for the larger ones with its reason).
    targets: only these targets (None: every target of the run); memory: whether these cases
    get a peak-memory measurement (None: the preset's setting)."""

    L: tuple = (256, 512)
    alpha: tuple = (1.0, 1.5)
    span: tuple = (None,)  # None, or a span z; all with the one ramp below
    ramp: float = 32.0
    causal: tuple = (True,)
    B: tuple = (1,)
    H: tuple = (4,)
    Hkv: tuple = (None,)  # None: Hkv = H
    D: tuple = (64,)
    dtype: tuple = ("float32",)
    mode: tuple = ("fwd+bwd",)
    learned: tuple = (False,)
    threads: tuple = (None,)
    targets: tuple | None = None
    memory: bool | None = None
    baseline: str | None = None  # the ratio's baseline for these cases (None: the run's)

    def configs(self) -> list[Case]:
        out = []
        for threads, mode, dtype, B, H, Hkv, D, causal, span, learned, alpha in itertools.product(
                self.threads, self.mode, self.dtype, self.B, self.H, self.Hkv, self.D, self.causal, self.span,
                self.learned, self.alpha):
            for L in sorted(self.L):
                out.append(Case(L=L, alpha=float(alpha), span=None if span is None else float(span),
                                ramp=float(self.ramp), causal=bool(causal), B=B, H=H,
                                Hkv=H if Hkv is None else Hkv, D=D, dtype=dtype, mode=mode, learned=bool(learned),
                                threads=threads))
        return out


@dataclass(frozen=True)
class Cases:
    """An explicit list of cases (shapes no cross product gives, such as Lq != Lk or a span
    that depends on Lk), with the same target and memory options as a Sweep."""

    cases: tuple
    targets: tuple | None = None
    memory: bool | None = None
    baseline: str | None = None

    def configs(self) -> list[Case]:
        return list(self.cases)


@dataclass
class Preset:
    """Sweeps (their cases in order) and how to measure them."""

    name: str
    sweep: Sweep | Cases | tuple
    description: str
    repeats: int = 5
    warmup: int = 1
    memory: bool = True  # peak memory in a fresh process per (case, target)
    memory_modes: tuple = MODES  # only cases of these modes get a memory measurement
    allocators: tuple = ("default",)  # glibc settings of the memory measurement (ALLOCATORS)
    max_call_seconds: float = 20.0  # skip a target at larger L once one call would take longer
    numpy_max_scores: int = 1 << 21  # the float64 NumPy reference only up to this B*H*Lq*Lk
    reference_rows: int = 64  # rows of the float64 reference per head above reference_full_scores
    reference_full_scores: int = 1 << 22
    exclude: tuple = ()  # targets not run in this preset (listed in the output with this reason)
    exclude_reason: str = ""
    device: str | None = None  # None: CUDA when available, else CPU
    overhead: bool = True  # the dispatch-overhead micro-benchmark
    baseline: str = "sdpa"  # every row's time ratio is to this target on the same case
    clock: str = "wall"  # "process": this process's CPU time (less sensitive to other load)
    targets: tuple | None = None  # the targets of the run (None: every target); --target overrides

    def __post_init__(self):
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {', '.join(CLOCKS)}; got {self.clock!r}")
        for a in self.allocators:
            if a not in ALLOCATORS:
                raise ValueError(f"allocator must be one of {', '.join(ALLOCATORS)}; got {a!r}")

    @property
    def sweeps(self) -> tuple:
        return self.sweep if isinstance(self.sweep, tuple) else (self.sweep,)

    def configs(self) -> list[Case]:
        out = []
        for sweep in self.sweeps:
            out += [c for c in sweep.configs() if c not in out]
        return out

    def _holding(self, case: Case) -> list:
        return [s for s in self.sweeps if case in s.configs()]

    def targets_of(self, case: Case) -> tuple | None:
        """The targets that run this case (None: all): the union over the sweeps holding it."""
        names = []
        for sweep in self._holding(case):
            if sweep.targets is None:
                return None
            names += [t for t in sweep.targets if t not in names]
        return tuple(names)

    def memory_of(self, case: Case) -> bool:
        return next((s.memory for s in self._holding(case) if s.memory is not None), self.memory)

    def baseline_of(self, case: Case) -> str:
        return next((s.baseline for s in self._holding(case) if s.baseline is not None), self.baseline)


def _triton_cases(lengths=(8192, 16384, 32768, 65536), tokens=1 << 20) -> Cases:
    """B x H x L = tokens (a full GPU at every length), H = min(B x H, 16), bfloat16, causal,
    D = 64: α = 1.5 against AdaSplash and α = 1 against SDPA's flash kernel, with peak memory."""
    entmax, softmax = [], []
    for L in lengths:
        heads = max(1, tokens // L)
        H = min(heads, 16)
        B = max(1, heads // H)
        shape = dict(L=L, B=B, H=H, D=64, dtype="bfloat16", causal=True, mode="fwd+bwd")
        entmax.append(Case(alpha=1.5, **shape))
        softmax.append(Case(alpha=1.0, **shape))
    return (Cases(tuple(entmax), targets=("triton", "adasplash"), baseline="adasplash"),
            Cases(tuple(softmax), targets=("triton", "sdpa-flash"), baseline="sdpa-flash"))


#: torch-eager against the tiled torch backend from tiny calls up: (B, H, Lq, Lk), with a
#: learned α and span (span Lk / 4, R = 16), causal, D = 64. It sets torch-eager's size cap.
CROSSOVER_SHAPES = ((1, 4, 8, 8), (1, 4, 32, 32), (4, 4, 32, 32), (1, 8, 1, 256), (4, 4, 64, 64),
                    (2, 4, 128, 128), (8, 8, 1, 1024), (1, 4, 512, 512), (8, 4, 256, 256))

#: Presets are the commands of docs/benchmarks.md. A new one (for example call shapes that
#: models use, or attention inside a model) is a name here with its sweeps; the harness,
#: formats and plots need nothing more.
PRESETS = {
    # A smoke run for CI: every code path (all runners and peers that are installed, reference
    # subsets, ratios, table, plot, Lq != Lk, learned α and span), tiny sizes, no subprocesses.
    "quick": Preset(
        name="quick",
        description="CI smoke run: tiny sizes, every path once",
        sweep=(Sweep(L=(32, 64), alpha=(1.0, 1.5), span=(None, 16.0), ramp=4.0, H=(2,), Hkv=(1,), D=(16,),
                     mode=("fwd+bwd",)),
               Sweep(L=(64,), alpha=(1.5,), ramp=4.0, H=(2,), Hkv=(1,), D=(16,), mode=("fwd",)),
               Cases((Case(L=4, Lk=48, alpha=1.5, span=16.0, ramp=4.0, H=2, Hkv=1, D=16, learned=True),))),
        repeats=3, warmup=1, memory=False, max_call_seconds=5.0, overhead=False,
        numpy_max_scores=2 * 32 * 32, reference_rows=16, reference_full_scores=2 * 32 * 32,
        exclude=("flex",),
        exclude_reason="torch.compile of FlexAttention takes tens of seconds on CPU (run it with --target flex)",
    ),
    # The committed CPU run: 2 cores, about 15 minutes.
    "cpu": Preset(
        name="cpu",
        description="CPU: causal, B=1 H=4 D=64 float32, L 256-4096, softmax/entmax, with and without span",
        sweep=Sweep(L=(256, 512, 1024, 2048, 4096), alpha=(1.0, 1.5), span=(None, 256.0), ramp=32.0,
                    mode=("fwd+bwd",)),
        repeats=5, warmup=1, memory=True, max_call_seconds=8.0,
        numpy_max_scores=1 << 20, reference_rows=64, reference_full_scores=1 << 20,
    ),
    # A GPU run: longer sequences, bfloat16, forward and forward+backward.
    "gpu": Preset(
        name="gpu",
        description="GPU: causal, B=4 H=16 Hkv=4 D=64 bfloat16, L 1024-16384, fwd and fwd+bwd",
        sweep=Sweep(L=(1024, 2048, 4096, 8192, 16384), alpha=(1.0, 1.5), span=(None, 512.0), ramp=64.0,
                    B=(4,), H=(16,), Hkv=(4,), dtype=("bfloat16",), mode=("fwd", "fwd+bwd")),
        repeats=10, warmup=3, memory=True, max_call_seconds=10.0,
        numpy_max_scores=1 << 20, reference_rows=32, reference_full_scores=1 << 22,
        device="cuda",
    ),
    # The PyTorch backend's CPU targets: α = 1.5 at L = 2048 (target <= 4x SDPA, beside the
    # entmax package), α = 1 span 256 at L = 4096 (target <= 1x SDPA's full causal attention),
    # peak memory of one fwd+bwd at L = 8192 (target within 2x SDPA) with glibc's default
    # allocator and with a fixed mmap threshold.
    "torch-targets": Preset(
        name="torch-targets",
        description="PyTorch backend targets on CPU: B=1 H=4 D=64 causal fwd+bwd, ratios to SDPA; peak memory at 8192",
        sweep=(Sweep(L=(2048,), alpha=(1.5,), targets=("torch", "torch-eager", "entmax15", "entmax_bisect", "sdpa"),
                     memory=False),
               Sweep(L=(4096,), alpha=(1.0,), span=(256.0,), ramp=32.0, targets=("torch", "sdpa"), memory=False),
               Sweep(L=(8192,), alpha=(1.5,), targets=("torch", "sdpa"), memory=True),
               Sweep(L=(8192,), alpha=(1.0,), span=(256.0,), ramp=32.0, targets=("torch", "sdpa"), memory=True)),
        repeats=3, warmup=1, memory=False, memory_modes=("fwd+bwd",), allocators=("default", "fixed-mmap"),
        max_call_seconds=30.0, overhead=False, reference_rows=64, reference_full_scores=1 << 20, device="cpu",
    ),
    # torch-eager against the tiled torch backend (the ratio), CPU time of this process.
    "torch-eager-crossover": Preset(
        name="torch-eager-crossover",
        description="torch-eager / torch (tiled) from tiny calls up, learned α and span: torch-eager's size cap",
        sweep=Cases(tuple(Case(L=Lq, Lk=Lk, B=B, H=H, D=64, alpha=alpha, span=Lk / 4, ramp=16.0, causal=True,
                               learned=True, mode="fwd+bwd")
                          for B, H, Lq, Lk in CROSSOVER_SHAPES for alpha in (1.0, 1.5)),
                    targets=("torch-eager", "torch")),
        repeats=5, warmup=1, memory=False, overhead=False, baseline="torch", clock="process",
        max_call_seconds=30.0, reference_rows=16, reference_full_scores=1 << 18, device="cpu",
    ),
    # The JAX backend's CPU targets against jax.nn.dot_product_attention: α = 1.5 at L = 2048
    # (target <= 3x; also with α a learned [H] array and dα), α = 1 span 256 at L = 4096
    # (target <= 1x). Compile time is reported separately.
    "jax-targets": Preset(
        name="jax-targets",
        description="JAX backend targets on CPU: B=1 H=4 D=64 causal jitted fwd+bwd, ratios to jax.nn.dot_product_attention",
        sweep=(Sweep(L=(2048,), alpha=(1.5,), learned=(False, True), targets=("jax", "jax-sdpa")),
               Sweep(L=(4096,), alpha=(1.0,), span=(256.0,), ramp=32.0, targets=("jax", "jax-sdpa"))),
        repeats=3, warmup=1, memory=False, overhead=False, baseline="jax-sdpa", max_call_seconds=30.0,
        reference_rows=64, reference_full_scores=1 << 20, device="cpu",
    ),
    # The Triton backend's GPU targets: α = 1.5 against AdaSplash (target time ratio <= 1/1.2),
    # α = 1 against SDPA's flash kernel (<= 1/0.8), peak memory growing linearly in L, and α = 1
    # span 512 at L = 32k against FlexAttention's causal window of width z + R (<= 1.5x).
    "triton-targets": Preset(
        name="triton-targets",
        description="Triton backend targets on CUDA: bf16 causal fwd+bwd, B*H*L = 2^20, L 8k-64k",
        sweep=(*_triton_cases(),
               Cases((Case(L=32768, B=2, H=16, D=64, alpha=1.0, span=512.0, ramp=32.0, dtype="bfloat16"),),
                     targets=("triton", "flex-window"), baseline="flex-window", memory=False)),
        repeats=5, warmup=2, memory=True, overhead=False, max_call_seconds=60.0, numpy_max_scores=0,
        reference_rows=32, reference_full_scores=1 << 22, device="cuda",
    ),
}
