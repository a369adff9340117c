"""Other projects' attention kernels, called in attnspec's terms (the subpackage module
`attnspec.conformance.peers`).

Every peer takes the arguments of `attnspec.attention` (q [B, H, Lq, D], k and v
[B, Hkv, Lk, D|Dv], alpha, span, ramp, causal, key_lengths, q_offset, scale) and either runs
the peer the way its users run it, or raises `NotImplementedError` naming what the peer cannot
express (a span for SDPA, α = 1 for entmax_bisect, ...). What a peer returns is its own: NaN,
empty rows or padding leaks are never repaired here, so that the benchmark times the real call
and the conformance suite judges the real kernel.

    from attnspec.conformance import peers
    out = peers.sdpa(q, k, v, causal=True)                  # run once
    fn = peers.PEERS["flex"].bind(q, k, v, span=64.0)       # set up once (masks, compile) ...
    out = fn(q, k, v)                                       # ... then call (what the bench times)
    peers.PEERS["entmax15"].reasons(q, k, v, alpha=1.0)     # ["entmax15 computes α = 1.5 only ..."]

The peers (`PEERS`): `sdpa` (torch.nn.functional.scaled_dot_product_attention), `sdpa-flash`
(the same under its flash kernel, CUDA), `flex` (FlexAttention: α = 1, the span as a
score_mod adding log m and a block mask), `flex-window` (FlexAttention with the span as a hard
window |d| < z + R: not attnspec's function, a speed yardstick), `entmax15`,
`entmax_bisect`, `sparsemax` (the `entmax` package's mappings on the full score matrix, masked
keys at -inf), `adasplash` and `adasplash_no_block_mask` (AdaSplash, Triton), and `jax-sdpa`
(jax.nn.dot_product_attention). Frameworks are imported when a peer is bound, never at import.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Callable

__all__ = ["PEERS", "AlphaSet", "Call", "Peer", "adasplash", "entmax15", "entmax_bisect", "flex", "jax_sdpa",
           "peer", "sdpa", "sparsemax"]


# ---------------------------------------------------------------------------------------------
# what a peer computes


@dataclass(frozen=True)
class AlphaSet:
    """The α a peer runs: a finite set of values, or the interval (low, high] / [low, high]."""

    values: tuple = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = True

    def __contains__(self, alpha: float) -> bool:
        if self.values:
            return any(alpha == a for a in self.values)
        above = alpha > self.low if self.low_open else alpha >= self.low
        return above and alpha <= self.high

    def __str__(self) -> str:
        if self.values:
            return "α = " + " or ".join(f"{a:g}" for a in self.values)
        return f"α in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


SOFTMAX = AlphaSet(values=(1.0,))


@dataclass
class Call:
    """The arguments of one attention call, as attnspec reads them (SPEC.md 5.1)."""

    B: int
    H: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    alpha: object
    span: object
    ramp: float
    causal: bool
    key_lengths: object
    q_offset: object
    scale: object
    device: str

    @property
    def default_offset(self) -> bool:
        """q_offset is Lk - Lq for every batch (the default, bottom-right alignment)."""
        o = self.q_offset
        if o is None:
            return True
        if _is_number(o):
            return int(o) == self.Lk - self.Lq
        values = _values(o)
        return values is not None and all(int(x) == self.Lk - self.Lq for x in values)

    @property
    def default_scale(self) -> bool:
        return self.scale is None or (_is_number(self.scale) and float(self.scale) == 1.0 / math.sqrt(self.D))

    @property
    def scale_value(self) -> float:
        return 1.0 / math.sqrt(self.D) if self.scale is None else float(self.scale)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _values(x):
    """The values of a small array of any framework as Python floats (None if unreadable)."""
    try:
        import numpy as np

        if hasattr(x, "detach"):
            x = x.detach().cpu()
        return [float(a) for a in np.asarray(x, dtype=np.float64).reshape(-1)]
    except Exception:
        return None


def _requires_grad(x) -> bool:
    return bool(getattr(x, "requires_grad", False))


def _device(q) -> str:
    device = getattr(q, "device", "cpu")
    if hasattr(device, "type"):  # torch.device
        return str(device)
    if callable(getattr(q, "devices", None)):  # jax array
        return next(iter(q.devices())).platform
    return str(device)


def describe(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None, q_offset=None,
             scale=None) -> Call:
    B, H, Lq, D = q.shape
    return Call(B=B, H=H, Hkv=k.shape[1], Lq=Lq, Lk=k.shape[2], D=D, alpha=alpha, span=span, ramp=ramp,
                causal=causal, key_lengths=key_lengths, q_offset=q_offset, scale=scale, device=_device(q))


def _fixed_alpha_reasons(name: str, call: Call, alphas: AlphaSet) -> list[str]:
    """A peer without an α argument (or with a fixed one): α must be one of its values, and
    nothing can learn it."""
    if _is_number(call.alpha):
        return [] if float(call.alpha) in alphas else [f"{name} computes {alphas} only (got α = {call.alpha:g})"]
    if _requires_grad(call.alpha):
        return [f"{name} has no α argument: it cannot give a gradient with respect to α"]
    values = _values(call.alpha)
    if values is None or any(a not in alphas for a in values):
        return [f"{name} computes {alphas} only (got α = {values})"]
    return []


def _no_span_reason(name: str, call: Call, why: str) -> list[str]:
    return [] if call.span is None else [f"{name} has no soft span: {why}"]


# ---------------------------------------------------------------------------------------------
# the peers


class Peer:
    """One peer kernel. `reasons(...)` lists what it cannot express for a call (empty: it runs);
    `bind(...)` does the per-call setup once (masks, compilation) and returns fn(q, k, v);
    calling the peer does both. The arguments are those of attnspec.attention."""

    name = ""
    framework = "torch"  # the array type it takes
    description = ""
    requires: tuple = ("torch",)  # import names
    alphas: AlphaSet = SOFTMAX
    #: True when the output is attnspec's function for every call the peer accepts; False for
    #: a yardstick that computes something else (flex-window).
    same_function = True

    def available(self) -> str | None:
        """None, or why this peer can never run here (a package is missing)."""
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed"
        return None

    def reasons(self, q, k, v, **kwargs) -> list[str]:
        why = self.available()
        if why:
            return [why]
        return self._reasons(describe(q, k, v, **kwargs))

    def _reasons(self, call: Call) -> list[str]:
        return []

    def bind(self, q, k, v, **kwargs) -> Callable:
        why = self.available()
        if why:
            raise ImportError(f"{self.name}: {why}")
        call = describe(q, k, v, **kwargs)
        reasons = self._reasons(call)
        if reasons:
            raise NotImplementedError(f"{self.name}: " + "; ".join(reasons))
        return self._bind(call)

    def _bind(self, call: Call) -> Callable:
        raise NotImplementedError

    def __call__(self, q, k, v, **kwargs):
        return self.bind(q, k, v, **kwargs)(q, k, v)

    def __repr__(self) -> str:
        return f"<peer {self.name}: {self.description}>"


def _torch_allowed(call: Call, with_span: bool):
    """Boolean [B or 1, H or 1, Lq, Lk] of allowed keys (SPEC.md 5.1), or None when every key
    is allowed. with_span: also m > 0 (keys outside the span)."""
    import torch

    device = call.device
    i = torch.arange(call.Lq, device=device).view(1, 1, -1, 1)
    j = torch.arange(call.Lk, device=device).view(1, 1, 1, -1)
    offset = _torch_offset(call)
    allowed = None

    def both(a, b):
        return b if a is None else a & b

    if call.key_lengths is not None:
        lengths = torch.as_tensor(call.key_lengths, device=device).view(-1, 1, 1, 1)
        allowed = both(allowed, j < lengths)
    d = i + offset - j
    if call.causal:
        allowed = both(allowed, d >= 0)
    if with_span and call.span is not None:
        allowed = both(allowed, _torch_span_m(call, d) > 0)
    return allowed


def _torch_offset(call: Call):
    import torch

    if call.q_offset is None:
        return call.Lk - call.Lq
    if _is_number(call.q_offset):
        return int(call.q_offset)
    return torch.as_tensor(call.q_offset, device=call.device).view(-1, 1, 1, 1)


def _torch_span_m(call: Call, d):
    """m = clip((R + z - |d|) / R, 0, 1) in float32 ([.., H or 1, Lq, Lk])."""
    import torch

    z = call.span
    if not _is_number(z):
        z = torch.as_tensor(z, device=call.device).detach().float().view(1, -1, 1, 1)
    return ((call.ramp + z - d.abs()) / call.ramp).clamp(0.0, 1.0)


def _repeat_kv(x, H):
    """[B, Hkv, L, D] -> [B, H, L, D]: query head h reads kv head h // (H / Hkv)."""
    Hkv = x.shape[1]
    return x if Hkv == H else x.repeat_interleave(H // Hkv, dim=1)


class SDPA(Peer):
    """torch.nn.functional.scaled_dot_product_attention: softmax (α = 1), no span. causal with
    the default offset and Lq = Lk is its own is_causal (top-left and bottom-right alignment
    agree there); otherwise causal, key_lengths and q_offset become one boolean mask. GQA with
    enable_gqa. kernel="flash": only its flash kernel (sdpa_kernel), which takes no mask."""

    def __init__(self, kernel: str | None = None):
        self.kernel = kernel
        self.name = "sdpa" if kernel is None else f"sdpa-{kernel}"
        self.description = ("torch.nn.functional.scaled_dot_product_attention (softmax)" if kernel is None else
                            f"torch scaled_dot_product_attention, {kernel} kernel only (softmax)")

    def _reasons(self, call):
        reasons = _fixed_alpha_reasons("SDPA", call, SOFTMAX)
        reasons += _no_span_reason("SDPA", call, "its mask cannot weight keys inside the softmax (use flex)")
        if self.kernel == "flash":
            if not call.device.startswith("cuda"):
                reasons.append(f"the flash kernel of SDPA runs on CUDA only (device {call.device})")
            if call.key_lengths is not None or not call.default_offset or (call.causal and call.Lq != call.Lk):
                reasons.append("the flash kernel of SDPA takes no mask: key_lengths, q_offset and causal with "
                               "Lq != Lk need one")
        if not (call.scale is None or _is_number(call.scale)):
            reasons.append("SDPA takes the scale as a Python number")
        return reasons

    def _bind(self, call):
        import torch.nn.functional as F

        native_causal = call.causal and call.Lq == call.Lk and call.default_offset and call.key_lengths is None
        mask = None if native_causal else _torch_allowed(call, with_span=False)
        gqa = call.Hkv != call.H
        scale = call.scale

        def run(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=native_causal, scale=scale,
                                                  enable_gqa=gqa)

        if self.kernel is None:
            return run
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, f"{self.kernel.upper()}_ATTENTION")

        def run_kernel(q, k, v):
            with sdpa_kernel(backend):
                return run(q, k, v)

        return run_kernel


class Flex(Peer):
    """torch FlexAttention: softmax (α = 1); the soft span as a score_mod adding log m (with the
    weights inside the softmax this is exactly attnspec's α = 1 with a span) and a block mask
    for causal, key_lengths, q_offset and m > 0. window=True: the span as a hard window
    |d| < z + R and no score_mod (a different function: a speed yardstick for windowed
    kernels). compile=True (as its documentation advises) runs it under torch.compile; eager it
    runs its slow reference path. On CPU it has no backward (torch raises)."""

    requires = ("torch", "torch.nn.attention.flex_attention")

    def __init__(self, window: bool = False, compile: bool = True):
        self.window, self.compile = window, compile
        self.name = "flex-window" if window else "flex"
        self.same_function = not window
        self.description = ("torch FlexAttention, the span as a hard window |d| < z + R (softmax)" if window
                            else "torch FlexAttention (softmax, span as score_mod log m and a block mask)")
        self._compiled = None

    def available(self):
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed"
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as exc:
            return f"FlexAttention is not in this torch ({exc})"
        return None

    def _reasons(self, call):
        reasons = _fixed_alpha_reasons("FlexAttention", call, SOFTMAX)
        if call.span is not None and _requires_grad(call.span):
            reasons.append("FlexAttention's score_mod here closes over z: no gradient with respect to the span")
        if not (call.scale is None or _is_number(call.scale)):
            reasons.append("FlexAttention takes the scale as a Python number")
        return reasons

    def _bind(self, call):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if self.compile and self._compiled is None:
            self._compiled = torch.compile(flex_attention, dynamic=False)
        attend = self._compiled if self.compile else flex_attention
        device, ramp, causal, window = call.device, float(call.ramp), call.causal, self.window
        offset = _torch_offset(call)
        per_batch_offset = not isinstance(offset, int)
        lengths = None if call.key_lengths is None else torch.as_tensor(call.key_lengths, device=device)
        span = call.span
        per_head_span = span is not None and not _is_number(span)
        if per_head_span:
            span = torch.as_tensor(span, device=device).detach().float().reshape(-1)
        if per_batch_offset:
            offset = offset.reshape(-1)

        def distance(b, q_idx, kv_idx):
            o = offset[b] if per_batch_offset else offset
            return q_idx + o - kv_idx

        def z_of(h):
            return span[h] if per_head_span else span

        def mask_mod(b, h, q_idx, kv_idx):
            d = distance(b, q_idx, kv_idx)
            keep = d >= 0 if causal else kv_idx >= 0
            if lengths is not None:
                keep = keep & (kv_idx < lengths[b])
            if span is not None:
                keep = keep & (d.abs() < z_of(h) + ramp)  # m > 0
            return keep

        def score_mod(score, b, h, q_idx, kv_idx):
            m = ((ramp + z_of(h) - distance(b, q_idx, kv_idx).abs()) / ramp).clamp(0.0, 1.0)
            return score + torch.log(m)

        block_mask = create_block_mask(mask_mod, call.B if (lengths is not None or per_batch_offset) else None,
                                       call.H if per_head_span else None, call.Lq, call.Lk, device=device)
        mod = score_mod if span is not None and not window else None
        gqa, scale = call.Hkv != call.H, call.scale

        def run(q, k, v):
            return attend(q, k, v, score_mod=mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)

        return run


class EntmaxPackage(Peer):
    """The `entmax` package (Peters et al., 2019; Correia et al., 2019) as its users call it in
    attention: its mapping along the keys of the full score matrix, masked keys (causal,
    key_lengths, q_offset) at -inf, then P @ V. It has no weighted entmax, so no span. GQA by
    repeating k and v."""

    requires = ("torch", "entmax")

    def __init__(self, which: str):
        if which not in ("entmax15", "entmax_bisect", "sparsemax"):
            raise ValueError(f"which must be entmax15, entmax_bisect or sparsemax; got {which!r}")
        self.which = self.name = which
        self.description = f"entmax.{which} on the full score matrix (masked keys at -inf)"
        self.alphas = {"entmax15": AlphaSet(values=(1.5,)), "sparsemax": AlphaSet(values=(2.0,)),
                       "entmax_bisect": AlphaSet(low=1.0, high=2.0)}[which]

    def _reasons(self, call):
        reasons = _no_span_reason(f"entmax.{self.which}", call,
                                  "the package has no weighted entmax, so the span weights cannot enter the τ solve "
                                  "(SPEC.md 5.2)")
        if self.which != "entmax_bisect":
            reasons += _fixed_alpha_reasons(f"entmax.{self.which}", call, self.alphas)
        else:
            values = [float(call.alpha)] if _is_number(call.alpha) else _values(call.alpha)
            if values is not None and any(a not in self.alphas for a in values):
                reasons.append(f"entmax_bisect needs α > 1 (it divides by α - 1; α = 1 is softmax); got α = "
                               f"{values[0] if _is_number(call.alpha) else values}")
        if not (call.scale is None or _is_number(call.scale)):
            reasons.append("this wrapper takes the scale as a Python number")
        return reasons

    def _bind(self, call):
        import entmax

        allowed = _torch_allowed(call, with_span=False)
        H, scale = call.H, call.scale_value
        which = self.which
        alpha = call.alpha
        if which == "entmax_bisect" and not _is_number(alpha):
            alpha = alpha.reshape(1, -1, 1, 1) if alpha.ndim == 1 else alpha  # per head: broadcast over rows

        def mapping(s):
            if which == "entmax15":
                return entmax.entmax15(s, dim=-1)
            if which == "sparsemax":
                return entmax.sparsemax(s, dim=-1)
            return entmax.entmax_bisect(s, alpha=alpha, dim=-1)

        def run(q, k, v):
            s = (q @ _repeat_kv(k, H).transpose(-1, -2)) * scale
            if allowed is not None:
                s = s.masked_fill(~allowed, float("-inf"))
            return mapping(s) @ _repeat_kv(v, H)

        return run


class AdaSplash(Peer):
    """AdaSplash (Gonçalves et al., 2025): Triton α-entmax flash attention, `pip install
    adasplash`. entry="adasplash" (its dispatcher: since 0.2 causal α = 1.5 goes to
    AdaSplash-2) or "adasplash_no_block_mask" (v1's solve, the path its Triton interpreter can
    run on CPU); niter=None leaves the iteration count at the peer's default. α is a Python
    number > 1, Lq = Lk, the default scale; no span, key_lengths or q_offset. GQA by repeating
    k and v."""

    requires = ("torch", "triton", "adasplash")
    alphas = AlphaSet(low=1.0, high=2.0)

    def __init__(self, entry: str = "adasplash", niter: int | None = None):
        if entry not in ("adasplash", "adasplash_no_block_mask"):
            raise ValueError(f"entry must be adasplash or adasplash_no_block_mask; got {entry!r}")
        self.entry, self.niter = entry, niter
        self.name = entry
        self.description = f"adasplash.{entry} (Triton α-entmax attention)"

    def _reasons(self, call):
        import os

        reasons = _no_span_reason("AdaSplash", call, "it takes no span argument")
        if not _is_number(call.alpha):
            reasons.append("AdaSplash takes α as one Python number (no per-head α, no gradient with respect to α)")
        elif float(call.alpha) not in self.alphas:
            reasons.append(f"AdaSplash computes {self.alphas} only (got α = {call.alpha:g}; α = 1 is softmax)")
        if call.key_lengths is not None:
            reasons.append("key_lengths is not expressed (AdaSplash's varlen is not attnspec's key_lengths)")
        if call.Lq != call.Lk or not call.default_offset:
            reasons.append(f"AdaSplash takes Lq = Lk and no q_offset (got Lq={call.Lq}, Lk={call.Lk}, "
                           f"q_offset={call.q_offset})")
        if not call.default_scale:
            reasons.append("AdaSplash uses the scale 1/sqrt(D) only")
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if not call.device.startswith("cuda") and not (interpret and self.entry == "adasplash_no_block_mask"):
            reasons.append(f"AdaSplash runs on CUDA (device {call.device}); only adasplash_no_block_mask runs "
                           "under TRITON_INTERPRET=1 on CPU")
        return reasons

    def _bind(self, call):
        import adasplash

        fn = getattr(adasplash, self.entry)
        H, alpha, causal = call.H, float(call.alpha), call.causal
        extra = {} if self.niter is None else {"niter": self.niter}

        def run(q, k, v):
            return fn(q, _repeat_kv(k, H), _repeat_kv(v, H), alpha=alpha, is_causal=causal, **extra)

        return run


class JaxSDPA(Peer):
    """jax.nn.dot_product_attention (softmax, XLA): [B, L, heads, D] layout, GQA native;
    key_lengths as its key_value_seq_lengths; causal with the default offset and Lq = Lk as its
    is_causal, otherwise a boolean mask."""

    name = "jax-sdpa"
    framework = "jax"
    requires = ("jax",)
    description = "jax.nn.dot_product_attention (softmax, XLA)"

    def _reasons(self, call):
        reasons = _fixed_alpha_reasons("jax.nn.dot_product_attention", call, SOFTMAX)
        reasons += _no_span_reason("jax.nn.dot_product_attention", call, "its bias could add log m, but users "
                                   "of it do not; use attnspec for a span")
        if not (call.scale is None or _is_number(call.scale)):
            reasons.append("this wrapper takes the scale as a Python number")
        return reasons

    def _bind(self, call):
        import jax
        import jax.numpy as jnp

        native_causal = call.causal and call.Lq == call.Lk and call.default_offset
        mask = None
        if call.causal and not native_causal:
            o = call.Lk - call.Lq if call.q_offset is None else call.q_offset
            o = jnp.asarray(o).reshape(-1, 1, 1, 1)
            d = jnp.arange(call.Lq)[None, None, :, None] + o - jnp.arange(call.Lk)[None, None, None, :]
            mask = d >= 0
        lengths = None if call.key_lengths is None else jnp.asarray(call.key_lengths, dtype=jnp.int32)
        scale = call.scale

        def run(q, k, v):
            out = jax.nn.dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                               v.transpose(0, 2, 1, 3), mask=mask, scale=scale,
                                               is_causal=native_causal, key_value_seq_lengths=lengths)
            return out.transpose(0, 2, 1, 3)

        return run


PEERS: dict[str, Peer] = {p.name: p for p in (
    SDPA(), SDPA(kernel="flash"), Flex(), Flex(window=True), EntmaxPackage("entmax15"),
    EntmaxPackage("entmax_bisect"), EntmaxPackage("sparsemax"), AdaSplash(), AdaSplash("adasplash_no_block_mask"),
    JaxSDPA())}


def peer(name: str) -> Peer:
    """The peer of that name; unknown names raise with the known ones."""
    try:
        return PEERS[name]
    except KeyError:
        raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEERS)})") from None


sdpa = PEERS["sdpa"]
flex = PEERS["flex"]
entmax15 = PEERS["entmax15"]
entmax_bisect = PEERS["entmax_bisect"]
sparsemax = PEERS["sparsemax"]
adasplash = PEERS["adasplash"]
jax_sdpa = PEERS["jax-sdpa"]
