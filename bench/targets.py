"""What a benchmark runs: every attnspec backend the dispatcher knows, and real peers.

A target says, for a case and inputs of its framework, why it cannot run (a list of reasons:
the dispatcher's own for attnspec backends, the peer wrapper's for peers) or how it runs (a
function of q, k, v and the learned parameters). `computes(case)` names the function it
computes, as reference arguments: peers that compute a different function (softmax SDPA at
alpha = 1.5) are timed all the same, are marked, and their accuracy is measured against the
reference of what they do compute.

Peers are the wrappers of attnspec.conformance.peers, called as their users call them.
Layouts: every function takes q [B, H, Lq, D], k and v [B, Hkv, Lk, D], as attnspec does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .runners import runner_for
from .sweep import Case


@dataclass
class Built:
    fn: Callable  # fn(q, k, v, *params): params are the case's learned arrays (alpha, span)
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
    default: bool = True  # False: runs only when a preset's sweep or --target names it

    def reasons(self, case: Case, inputs: tuple, device: str) -> list[str]:
        return []

    def build(self, case: Case, inputs: tuple, device: str) -> Built:
        raise NotImplementedError

    def computes(self, case: Case) -> tuple[dict, str | None]:
        """(reference arguments of the function this target computes, a note when that differs
        from the case's function)."""
        return case.attention_kwargs(), None


def _params(case: Case, inputs: tuple) -> tuple:
    """The learned arrays among the inputs (q, k, v, g, *params)."""
    return tuple(inputs[4:]) if case.learned else ()


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

    def reasons(self, case, inputs, device):
        import attnspec
        from attnspec.dispatch import registry

        q, k, v = inputs[:3]
        decision = attnspec.explain(q, k, v, backend=self.backend, **case.attention_kwargs(_params(case, inputs)))
        if decision.selected is None:
            return list(dict(decision.considered).get(self.backend, ["not selected"]))
        if case.mode == "fwd+bwd" and self.framework == "numpy":
            if registry.load(self.backend).kernel("attention").vjp is None:
                return ["declares no vjp (NumPy has no autograd): no backward"]
        return []

    def build(self, case, inputs, device):
        import attnspec
        from attnspec.dispatch import registry

        name = self.backend

        def fn(q, k, v, *params):
            return attnspec.attention(q, k, v, backend=name, **case.attention_kwargs(params))

        vjp = registry.load(name).kernel("attention").vjp if self.framework == "numpy" else None
        return Built(fn=fn, vjp=vjp, kwargs=case.attention_kwargs(_params(case, inputs)))


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


class PeerTarget(Target):
    """A peer of attnspec.conformance.peers. as_softmax: a softmax peer (SDPA, FlexAttention)
    is timed on every case for scale; on a case with α != 1 (or, for SDPA, a span) it computes
    softmax (with FlexAttention's span) instead, and the row says it is a different function.
    Other peers run only the case's own function, and refuse what they cannot express."""

    def __init__(self, name, *, as_softmax=False, keeps_span=False, default=True, options=None, label=None):
        from attnspec.conformance import peers

        self.peer = peers.peer(name)
        if options:
            self.peer = type(self.peer)(**options)
        super().__init__(name=name, framework=self.peer.framework, kind="peer",
                         description=label or self.peer.description, available=self.peer.available, default=default)
        self.as_softmax, self.keeps_span = as_softmax, keeps_span

    def computes(self, case):
        if not self.as_softmax:
            return case.attention_kwargs(), None
        span = case.span if self.keeps_span else None
        kwargs = dict(alpha=1.0, span=span, ramp=case.ramp, causal=case.causal)
        what = _PEER_LABELS.get(self.name, self.name)
        if self.name == "flex-window" and span is not None:
            # keys with |d| < z + R at weight 1: the soft span with z' = ceil(z + R) - 1 and a
            # ramp of 1/2 keeps exactly those integer distances at m = 1
            kwargs.update(span=float(math.ceil(span + case.ramp) - 1), ramp=0.5)
            return kwargs, (f"{what}: softmax over the hard window |d| < z + R, ignores the soft ramp"
                            + (" and α" if case.alpha != 1.0 else "") + " (a different function; timed for scale)")
        ignored = [x for x, differs in (("α", case.alpha != 1.0), ("span", case.span != span)) if differs]
        if not ignored:
            return kwargs, None
        return kwargs, f"{what}: softmax, ignores {' and '.join(ignored)} (a different function; timed for scale)"

    def _kwargs(self, case, inputs):
        kwargs, note = self.computes(case)
        if note is None:
            kwargs = case.attention_kwargs(_params(case, inputs))
        return kwargs

    def reasons(self, case, inputs, device):
        return self.peer.reasons(*inputs[:3], **self._kwargs(case, inputs))

    def build(self, case, inputs, device):
        bound = self.peer.bind(*inputs[:3], **self._kwargs(case, inputs))

        def fn(q, k, v, *params):
            return bound(q, k, v)

        return Built(fn=fn, compiled=getattr(self.peer, "compile", False))


_PEER_LABELS = {"sdpa": "SDPA", "sdpa-flash": "SDPA flash", "flex": "FlexAttention (α = 1 with the span)",
                "flex-window": "FlexAttention window", "jax-sdpa": "jax.nn.dot_product_attention"}

#: The bench's peer targets, in table order. sdpa-flash and flex-window are yardsticks of the
#: Triton targets: they run only where a preset or --target names them.
PEERS = ("sdpa", "sdpa-flash", "flex", "flex-window", "entmax15", "entmax_bisect", "adasplash", "jax-sdpa")


def peer_targets() -> list[Target]:
    return [
        PeerTarget("sdpa", as_softmax=True),
        PeerTarget("sdpa-flash", as_softmax=True, default=False),
        PeerTarget("flex", as_softmax=True, keeps_span=True),
        PeerTarget("flex-window", as_softmax=True, keeps_span=True, default=False),
        PeerTarget("entmax15"),
        PeerTarget("entmax_bisect"),
        # niter=10: AdaSplash v1's iteration count (its dispatcher's default for causal α = 1.5
        # is AdaSplash-2 with one iteration).
        PeerTarget("adasplash", options=dict(entry="adasplash", niter=10),
                   label="adasplash.adasplash, niter=10 (Triton α-entmax attention, CUDA)"),
        PeerTarget("jax-sdpa", as_softmax=True),
    ]


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
