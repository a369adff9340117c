"""What a benchmark sweeps over (one `Config` per measured call) and the presets.

A configuration is one attention call: B, H (query heads), Hkv (key/value heads), L (Lq = Lk),
D, dtype, alpha, span/ramp (None: no span), causal, and the mode: "fwd" (forward only) or
"fwd+bwd" (forward and the backward of sum(out * g) for q, k and v).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field

MODES = ("fwd", "fwd+bwd")
DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Config:
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

    def __post_init__(self):
        if self.Hkv is None:
            object.__setattr__(self, "Hkv", self.H)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if not 1.0 <= self.alpha <= 2.0:
            raise ValueError(f"alpha must lie in [1, 2]; got {self.alpha}")
        if self.H % self.Hkv:
            raise ValueError(f"H={self.H} must be a multiple of Hkv={self.Hkv}")
        for name in ("L", "B", "H", "Hkv", "D"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")

    @property
    def scores(self) -> int:
        return self.B * self.H * self.L * self.L

    def attention_kwargs(self) -> dict:
        """The arguments of attnspec.attention (and of the reference) besides q, k, v."""
        return dict(alpha=self.alpha, span=self.span, ramp=self.ramp, causal=self.causal)

    def family(self) -> Config:
        """The configuration without its length: one line per target in the plots."""
        return _Family(**{k: v for k, v in asdict(self).items() if k != "L"})

    def label(self, with_L=True) -> str:
        parts = [f"L={self.L}"] if with_L else []
        parts.append(f"α={self.alpha:g}")
        if self.span is not None:
            parts.append(f"span={self.span:g}/R={self.ramp:g}")
        parts.append("causal" if self.causal else "full")
        heads = f"H={self.H}" if self.Hkv == self.H else f"H={self.H}/Hkv={self.Hkv}"
        parts += [f"B={self.B} {heads} D={self.D}", self.dtype, self.mode]
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Family:
    """A Config without L: the key of one plot panel."""

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

    def label(self) -> str:
        return Config(L=1, **asdict(self)).label(with_L=False)


@dataclass(frozen=True)
class Sweep:
    """The cross product of these values, in this order (L varies fastest, so that a target
    that becomes too slow at some L is skipped for the larger ones with its reason)."""

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

    def configs(self) -> list[Config]:
        out = []
        for mode, dtype, B, H, Hkv, D, causal, span, alpha in itertools.product(
                self.mode, self.dtype, self.B, self.H, self.Hkv, self.D, self.causal, self.span, self.alpha):
            for L in sorted(self.L):
                out.append(Config(L=L, alpha=float(alpha), span=None if span is None else float(span),
                                  ramp=float(self.ramp), causal=bool(causal), B=B, H=H,
                                  Hkv=H if Hkv is None else Hkv, D=D, dtype=dtype, mode=mode))
        return out


@dataclass
class Preset:
    """Sweeps (their configurations in order) and how to measure them."""

    name: str
    sweep: Sweep | tuple
    description: str
    repeats: int = 5
    warmup: int = 1
    memory: bool = True  # peak memory in a fresh process per (configuration, target)
    memory_modes: tuple = MODES  # only configurations of these modes get a memory measurement
    max_call_seconds: float = 20.0  # skip a target at larger L once one call would take longer
    numpy_max_scores: int = 1 << 21  # the float64 NumPy reference only up to this B*H*L*L
    reference_rows: int = 64  # rows of the float64 reference per head above reference_full_scores
    reference_full_scores: int = 1 << 22
    exclude: tuple = ()  # targets not run in this preset (listed in the output with this reason)
    exclude_reason: str = ""
    device: str | None = None  # None: CUDA when available, else CPU
    overhead: bool = True  # the dispatch-overhead micro-benchmark
    extra: dict = field(default_factory=dict)

    @property
    def sweeps(self) -> tuple:
        return self.sweep if isinstance(self.sweep, tuple) else (self.sweep,)

    def configs(self) -> list[Config]:
        out = []
        for sweep in self.sweeps:
            out += [c for c in sweep.configs() if c not in out]
        return out


PRESETS = {
    # A smoke run for CI: every code path (all runners and peers that are installed, reference
    # subsets, ratios, table, plot), tiny sizes, no subprocesses. Well under a minute on 2 cores.
    "quick": Preset(
        name="quick",
        description="CI smoke run: tiny sizes, every path once",
        sweep=(Sweep(L=(32, 64), alpha=(1.0, 1.5), span=(None, 16.0), ramp=4.0, H=(2,), Hkv=(1,), D=(16,),
                     mode=("fwd+bwd",)),
               Sweep(L=(64,), alpha=(1.5,), ramp=4.0, H=(2,), Hkv=(1,), D=(16,), mode=("fwd",))),
        repeats=3, warmup=1, memory=False, max_call_seconds=5.0, overhead=False,
        numpy_max_scores=2 * 32 * 32, reference_rows=16, reference_full_scores=2 * 32 * 32,
        exclude=("flex",),
        exclude_reason="torch.compile of FlexAttention takes tens of seconds on CPU (run it with --target flex)",
    ),
    # The committed CPU run: 2 cores, about 10 minutes.
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
}
