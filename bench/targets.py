"""What a benchmark runs: every attnspec backend the dispatcher knows, and real peers.

A target says, for a configuration and inputs of its framework, why it cannot run (a list of
reasons, the dispatcher's own for attnspec backends) or how it runs (a function of q, k, v).
`computes(cfg)` names the function it computes, as reference arguments: peers that compute a
different function (softmax SDPA at alpha = 1.5) are timed all the same, are marked, and their
accuracy is measured against the reference of what they do compute.

Layouts: every function takes q [B, H, L, D], k and v [B, Hkv, L, D], as attnspec does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .runners import framework_available, runner_for
from .sweep import Config


@dataclass
class Built:
    fn: Callable
    vjp: Callable | None = None  # NumPy targets: (q, k, v, g, **kwargs) -> gradients
    kwargs: dict = field(default_factory=dict)
    compiled: bool = False  # torch.compile: its first call compiles


@dataclass
class Target:
    name: str
    framework: str  # the runner (array type)
    kind: str  # "attnspec" or "peer"
    description: str
    available: Callable[[], str | None] = lambda: None  # None, or why it never runs here

    def reasons(self, cfg: Config, inputs: tuple, device: str) -> list[str]:
        return []

    def build(self, cfg: Config, device: str) -> Built:
        raise NotImplementedError

    def computes(self, cfg: Config) -> tuple[dict, str | None]:
        """(reference arguments of the function this target computes, a note when that differs
        from the configuration's function)."""
        return cfg.attention_kwargs(), None


def _softmax_function(cfg: Config, what: str) -> tuple[dict, str | None]:
    kwargs = dict(alpha=1.0, span=None, ramp=cfg.ramp, causal=cfg.causal)
    if cfg.alpha == 1.0 and cfg.span is None:
        return kwargs, None
    ignored = " and ".join(x for x in ("α" if cfg.alpha != 1.0 else "", "span" if cfg.span is not None else "") if x)
    return kwargs, f"{what}: softmax, ignores {ignored} (a different function; timed for scale)"


# ---------------------------------------------------------------------------------------------
# attnspec backends, discovered through the dispatcher


class BackendTarget(Target):
    """An attnspec backend, called through the dispatcher with backend=<name>."""

    def __init__(self, status, name):
        framework = status.array_types[0] if status.array_types else "?"
        super().__init__(name=name, framework=framework, kind="attnspec",
                         description=status.description or f"attnspec backend {status.name}")
        self.backend = status.name
        self.status = status

    def reasons(self, cfg, inputs, device):
        import attnspec
        from attnspec.dispatch import registry

        q, k, v = inputs[:3]
        decision = attnspec.explain(q, k, v, backend=self.backend, **cfg.attention_kwargs())
        if decision.selected is None:
            return list(dict(decision.considered).get(self.backend, ["not selected"]))
        if cfg.mode == "fwd+bwd" and self.framework == "numpy":
            if registry.load(self.backend).kernel("attention").vjp is None:
                return ["declares no vjp (NumPy has no autograd): no backward"]
        return []

    def build(self, cfg, device):
        import attnspec
        from attnspec.dispatch import registry

        kwargs = cfg.attention_kwargs()
        name = self.backend

        def fn(q, k, v):
            return attnspec.attention(q, k, v, backend=name, **kwargs)

        vjp = registry.load(name).kernel("attention").vjp if self.framework == "numpy" else None
        return Built(fn=fn, vjp=vjp, kwargs=kwargs)


def backend_targets(peer_names) -> list[Target]:
    import attnspec

    out = []
    for status in attnspec.list_backends():
        name = status.name if status.name not in peer_names else f"attnspec:{status.name}"
        if not status.available:
            t = Target(name=name, framework=",".join(status.array_types) or "?", kind="attnspec",
                       description=f"attnspec backend {status.name}")
            error = status.error
            t.available = lambda error=error: f"unavailable: {error}"
            out.append(t)
            continue
        if "attention" not in status.ops:
            continue  # not an attention backend: nothing to benchmark
        t = BackendTarget(status, name)
        if runner_for(t.framework) is None:
            framework = t.framework
            t.available = lambda framework=framework: f"no benchmark runner for {framework} arrays"
        out.append(t)
    return out


# ---------------------------------------------------------------------------------------------
# peers


def _repeat_kv(x, H):
    """[B, Hkv, L, D] -> [B, H, L, D]: query head h reads kv head h // (H / Hkv)."""
    Hkv = x.shape[1]
    return x if Hkv == H else x.repeat_interleave(H // Hkv, dim=1)


class SDPA(Target):
    def __init__(self):
        super().__init__("sdpa", "torch", "peer", "torch.nn.functional.scaled_dot_product_attention (softmax)",
                         available=lambda: None if framework_available("torch") else "torch is not installed")

    def build(self, cfg, device):
        import torch.nn.functional as F

        gqa = cfg.Hkv != cfg.H

        def fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal, enable_gqa=gqa)

        return Built(fn=fn)

    def computes(self, cfg):
        return _softmax_function(cfg, "SDPA")


class Flex(Target):
    """FlexAttention: the soft span as a score modification log(m) (alpha = 1 with a span is
    then exactly attnspec's weighted softmax) and a block mask for causal/span windows."""

    def __init__(self):
        def available():
            if not framework_available("torch"):
                return "torch is not installed"
            try:
                import torch.nn.attention.flex_attention  # noqa: F401
            except ImportError as exc:
                return f"FlexAttention is not in this torch ({exc})"
            return None

        super().__init__("flex", "torch", "peer", "torch FlexAttention under torch.compile (softmax, span as score_mod)",
                         available=available)
        self._compiled = None

    def reasons(self, cfg, inputs, device):
        if cfg.mode == "fwd+bwd" and device == "cpu":
            return ["FlexAttention has no backward on CPU (torch raises NotImplementedError)"]
        return []

    def build(self, cfg, device):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if self._compiled is None:
            self._compiled = torch.compile(flex_attention, dynamic=False)
        L, causal, span, ramp = cfg.L, cfg.causal, cfg.span, cfg.ramp

        def mask_mod(b, h, q_idx, kv_idx):
            keep = q_idx >= kv_idx if causal else q_idx >= 0
            if span is not None:
                keep = keep & ((q_idx - kv_idx).abs() < span + ramp)  # m > 0
            return keep

        def score_mod(score, b, h, q_idx, kv_idx):
            m = ((ramp + span - (q_idx - kv_idx).abs()) / ramp).clamp(0.0, 1.0)
            return score + torch.log(m)

        block_mask = create_block_mask(mask_mod, None, None, L, L, device=device)
        compiled, gqa = self._compiled, cfg.Hkv != cfg.H
        mod = score_mod if span is not None else None

        def fn(q, k, v):
            return compiled(q, k, v, score_mod=mod, block_mask=block_mask, enable_gqa=gqa)

        return Built(fn=fn, compiled=True)

    def computes(self, cfg):
        kwargs = dict(alpha=1.0, span=cfg.span, ramp=cfg.ramp, causal=cfg.causal)
        if cfg.alpha == 1.0:
            return kwargs, None
        return kwargs, "FlexAttention: softmax (α = 1 with the span), ignores α (a different function)"


class EntmaxPackage(Target):
    """The `entmax` package's mapping inside an eager attention (full score matrix)."""

    def __init__(self, which):
        self.which = which
        super().__init__(which, "torch", "peer", f"entmax.{which} in an eager attention (full score matrix)",
                         available=lambda: None if framework_available("entmax") else "entmax is not installed "
                         "(pip install attnspec[bench])")

    def reasons(self, cfg, inputs, device):
        reasons = []
        if cfg.span is not None:
            reasons.append("the entmax package has no weighted entmax: the span weights cannot enter the τ solve "
                           "(SPEC.md 5.2), so a span configuration would compute a different function")
        if self.which == "entmax15" and cfg.alpha != 1.5:
            reasons.append(f"entmax15 is α = 1.5 only (α = {cfg.alpha:g})")
        if self.which == "entmax_bisect" and cfg.alpha == 1.0:
            reasons.append("α = 1 is softmax: entmax_bisect needs α > 1 (it divides by α − 1)")
        return reasons

    def build(self, cfg, device):
        import entmax
        import torch

        L, H, alpha = cfg.L, cfg.H, cfg.alpha
        scale = 1.0 / math.sqrt(cfg.D)
        if self.which == "entmax15":
            def mapping(s):
                return entmax.entmax15(s, dim=-1)
        else:
            def mapping(s):
                return entmax.entmax_bisect(s, alpha=alpha, dim=-1)
        mask = torch.ones(L, L, dtype=torch.bool, device=device).tril() if cfg.causal else None

        def fn(q, k, v):
            s = (q @ _repeat_kv(k, H).transpose(-1, -2)) * scale
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf"))
            return mapping(s) @ _repeat_kv(v, H)

        return Built(fn=fn)


class AdaSplash(Target):
    """AdaSplash (Gonçalves et al., 2025): Triton alpha-entmax flash attention, CUDA only."""

    def __init__(self):
        super().__init__("adasplash", "torch", "peer", "adasplash.adasplash (Triton entmax attention, CUDA only)",
                         available=lambda: None if framework_available("adasplash") else
                         "adasplash is not installed (pip install adasplash; CUDA only)")

    def reasons(self, cfg, inputs, device):
        reasons = []
        if not device.startswith("cuda"):
            reasons.append(f"CUDA only (device={device})")
        if cfg.span is not None:
            reasons.append("no span support")
        if cfg.alpha == 1.0:
            reasons.append("α = 1 is softmax: AdaSplash needs α > 1")
        return reasons

    def build(self, cfg, device):
        from adasplash import adasplash

        H, alpha, causal = cfg.H, cfg.alpha, cfg.causal

        def fn(q, k, v):
            return adasplash(q, _repeat_kv(k, H), _repeat_kv(v, H), alpha=alpha, niter=10, is_causal=causal,
                             varlen=None)

        return Built(fn=fn)


class JaxSDPA(Target):
    def __init__(self):
        super().__init__("jax-sdpa", "jax", "peer", "jax.nn.dot_product_attention (softmax, XLA)",
                         available=lambda: None if framework_available("jax") else "jax is not installed")

    def build(self, cfg, device):
        import jax

        causal = cfg.causal

        def fn(q, k, v):
            # jax takes [B, L, heads, D]; GQA (fewer kv heads) is native.
            out = jax.nn.dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                               v.transpose(0, 2, 1, 3), is_causal=causal)
            return out.transpose(0, 2, 1, 3)

        return Built(fn=fn)

    def computes(self, cfg):
        return _softmax_function(cfg, "jax.nn.dot_product_attention")


PEERS = ("sdpa", "flex", "entmax15", "entmax_bisect", "adasplash", "jax-sdpa")


def peer_targets() -> list[Target]:
    return [SDPA(), Flex(), EntmaxPackage("entmax15"), EntmaxPackage("entmax_bisect"), AdaSplash(), JaxSDPA()]


def all_targets() -> list[Target]:
    """attnspec's backends (as the dispatcher lists them), then the peers."""
    return backend_targets(set(PEERS)) + peer_targets()


def find_target(name: str) -> Target:
    """One target by name, loading only the backend it needs (for the memory child process)."""
    from attnspec.dispatch import registry

    for peer in peer_targets():
        if peer.name == name:
            return peer
    backend = name.split(":", 1)[1] if name.startswith("attnspec:") else name
    registry.load(backend)
    import attnspec

    status = next(s for s in attnspec.list_backends(load_all=False) if s.name == backend)
    return BackendTarget(status, name)
