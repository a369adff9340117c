"""Other projects' kernels as attnspec backends, so that the conformance suite can judge them.

    import attnspec
    from attnspec.conformance import adapters

    attnspec.register_backend(adapters.backend("entmax15"))   # registered only when asked
    print(attnspec.conformance.check("peer-entmax15"))

Each adapter wraps one peer of `attnspec.conformance.peers` (the wrappers the benchmark times)
in a `Backend` named `peer-<name>` whose Capabilities say honestly what the peer computes: the
features it can express, the dtypes and devices it runs on, and the gradients it gives (its
gradient features). What the peer returns is reported as it is: its empty rows, NaN and
errors are never repaired here.

| adapter | alpha | features | gradients |
| --- | --- | --- | --- |
| peer-entmax15 | 1.5 | causal, key_lengths, q_offset, gqa (masks at -inf) | q, k, v |
| peer-sparsemax | 2 | the same | q, k, v |
| peer-entmax_bisect | (1, 2] (per head) | the same | q, k, v, alpha |
| peer-sdpa | 1 | causal, key_lengths, q_offset (one boolean mask), gqa | q, k, v |
| peer-flex | 1 | span (score_mod adding log m, block mask), causal, key_lengths, q_offset, gqa | q, k, v on CUDA; none on CPU (no backward there) |
| peer-adasplash, peer-adasplash_no_block_mask | (1, 2] | causal, gqa; Lq = Lk, default scale | q, k, v |

The alphas a peer runs, and AdaSplash's sizes, are refused through `Kernel.extra_reasons` (and
by the kernel function itself, which the suite's gradient path calls directly); `ALPHAS` holds
the alphas as data for the report's strategies (`peers_report`). AdaSplash runs on CUDA; on
CPU only adasplash_no_block_mask, under TRITON_INTERPRET=1, at the sizes it takes there.
"""

from __future__ import annotations

import importlib.metadata
import os

from attnspec import Backend, Capabilities, Kernel
from attnspec.errors import UnsupportedCallError

from . import peers

__all__ = ["ADAPTERS", "ALPHAS", "backend", "backend_name"]

_ALL_DTYPES = ("float16", "bfloat16", "float32", "float64")
_MASKS = frozenset({"causal", "key_lengths", "q_offset", "gqa"})

#: Adapter name -> (peer name, features, dtypes). Features are validation.FEATURES names.
ADAPTERS = {
    "entmax15": ("entmax15", _MASKS | {"entmax", "alpha_per_head", "grad"}, _ALL_DTYPES),
    "sparsemax": ("sparsemax", _MASKS | {"entmax", "alpha_per_head", "grad"}, _ALL_DTYPES),
    "entmax_bisect": ("entmax_bisect", _MASKS | {"entmax", "alpha_per_head", "grad", "alpha_grad"}, _ALL_DTYPES),
    "sdpa": ("sdpa", _MASKS | {"grad"}, _ALL_DTYPES),
    "flex": ("flex", _MASKS | {"span", "span_per_head"}, _ALL_DTYPES),
    "adasplash": ("adasplash", frozenset({"entmax", "causal", "gqa", "grad"}), ("float16", "bfloat16", "float32")),
    "adasplash_no_block_mask": ("adasplash_no_block_mask", frozenset({"entmax", "causal", "gqa", "grad"}),
                                ("float16", "bfloat16", "float32")),
}

#: The alphas each adapter's peer computes (peers.AlphaSet: `a in ALPHAS[name]`).
ALPHAS = {name: peers.peer(peer_name).alphas for name, (peer_name, _, _) in ADAPTERS.items()}


def backend_name(name: str) -> str:
    return f"peer-{name}"


def _version(peer) -> str:
    package = {"entmax15": "entmax", "sparsemax": "entmax", "entmax_bisect": "entmax",
               "adasplash": "adasplash", "adasplash_no_block_mask": "adasplash"}.get(peer.name, "torch")
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package} (not installed)"


def _devices(name: str) -> tuple:
    if name.startswith("adasplash"):
        interpreted = os.environ.get("TRITON_INTERPRET") == "1" and name == "adasplash_no_block_mask"
        return ("cuda", "cpu") if interpreted else ("cuda",)
    return ("cpu", "cuda")


def _flex_features(features: frozenset) -> frozenset:
    """FlexAttention has no backward on CPU (torch raises): gradients only where CUDA is."""
    import torch

    return features | {"grad"} if torch.cuda.is_available() else features


#: Sizes AdaSplash's Triton kernels take under the interpreter, as measured there: Lq = Lk a
#: power of two (it asserts so without varlen) of at least 64, D in {32, 64}; smaller tiles
#: (D = 16, L = 16) crashed the process.
_INTERPRETED_ADASPLASH = {"head_dims": (32, 64), "min_length": 64}


def _shape_reasons(name: str, sizes: dict) -> list:
    if not name.startswith("adasplash"):
        return []
    Lq, Lk, D, Dv = (sizes.get(n) for n in ("Lq", "Lk", "D", "Dv"))
    reasons = []
    if Lq != Lk or Lk < 1 or Lk & (Lk - 1):
        reasons.append(f"Lq={Lq}, Lk={Lk} (supported: Lq = Lk, a power of two)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        rule = _INTERPRETED_ADASPLASH
        if D not in rule["head_dims"] or Dv != D:
            reasons.append(f"D={D}, Dv={Dv} (supported under the interpreter: D = Dv in {rule['head_dims']})")
        if Lk is not None and Lk < rule["min_length"]:
            reasons.append(f"Lk={Lk} (supported under the interpreter: >= {rule['min_length']})")
    return reasons


def _alpha_reasons(name: str, call) -> list:
    """alpha outside what the peer computes. The call information carries alpha where it is
    concrete (a number, or the values of an array); where it does not, the kernel refuses in
    its function instead."""
    alpha = getattr(call, "alpha", None)
    if alpha is None:
        return []
    values = (alpha,) if isinstance(alpha, (int, float)) else tuple(alpha)
    bad = [a for a in values if float(a) not in ALPHAS[name]]
    return [f"alpha={', '.join(f'{a:g}' for a in bad[:4])} (supported: {ALPHAS[name]})"] if bad else []


def torch_compute_dtype(q):
    import torch

    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _readable(x):
    """The peers module reads array values through NumPy, which has no bfloat16: hand its
    checks a float32 copy (gradient tracking kept). The peer itself gets the original."""
    dtype = getattr(x, "dtype", None)
    return x.float() if dtype is not None and str(dtype) == "torch.bfloat16" else x


def backend(name: str, gradients: bool = True) -> Backend:
    """The adapter `peer-<name>` (names: ADAPTERS). gradients=False declares no gradients
    (values only), so that the suite's value checks are not hidden behind a gradient failure of
    the same example. Raises ImportError naming the missing package when the peer cannot run."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter {name!r} (adapters: {', '.join(ADAPTERS)})")
    peer_name, features, dtypes = ADAPTERS[name]
    peer = peers.peer(peer_name)
    if name == "flex":
        peer = _flex_for_this_machine()
    missing = peer.available()
    if missing:
        raise ImportError(f"{backend_name(name)}: {missing}")
    if name == "flex":
        features = _flex_features(features)
    if not gradients:
        features = features - {"grad", "alpha_grad", "span_grad"}
    label = backend_name(name)

    def attention(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None, q_offset=None,
                  scale=None):
        kwargs = dict(alpha=alpha, span=span, ramp=ramp, causal=causal, key_lengths=key_lengths, q_offset=q_offset,
                      scale=scale)
        sizes = dict(Lq=q.shape[2], Lk=k.shape[2], D=q.shape[3], Dv=v.shape[3])
        reasons = _shape_reasons(name, sizes) or peer.reasons(q, k, v, **dict(kwargs, alpha=_readable(alpha),
                                                                               span=_readable(span)))
        if reasons:  # what the peer cannot express is a refusal, never a silent substitute
            raise UnsupportedCallError("attention", f"the {label} adapter", {label: reasons})
        if isinstance(peer, _Flex):
            peer.mask_dtype = torch_compute_dtype(q)
        # Peer.bind would check the reasons again on arrays it cannot read (bfloat16): bind the
        # checked call directly, with the arguments as the user passed them.
        return peer._bind(peers.describe(q, k, v, **kwargs))(q, k, v)

    caps = Capabilities(array_type="torch", devices=_devices(name), dtypes=dtypes, features=features)
    kernel = Kernel("attention", attention, caps,
                    extra_reasons=lambda call: _shape_reasons(name, call.sizes) + _alpha_reasons(name, call))
    return Backend(name=label, version=_version(peer), kernels={"attention": kernel}, priority=-100,
                   automatic=False, description=peer.description)


class _Flex(peers.Flex):
    """peers.Flex with the span weight of SPEC.md section 3: m = (z - (|d| - R)) / R in the
    compute dtype (float64 for float64 inputs), so that what is judged is FlexAttention, not the
    rounding of a weight the wrapper forms as (R + z) - |d| in float32. The rest (block mask,
    GQA, scale, compilation) is the wrapper's."""

    mask_dtype = None  # set per call: float64 for float64 inputs, else float32

    def _bind(self, call):
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        if call.span is None:
            return super()._bind(call)
        if self.compile and self._compiled is None:
            self._compiled = torch.compile(flex_attention, dynamic=False)
        attend = self._compiled if self.compile else flex_attention
        dtype, device, causal = self.mask_dtype or torch.float32, call.device, call.causal
        ramp = torch.tensor(float(call.ramp), dtype=dtype, device=device)
        offset = peers._torch_offset(call)
        per_batch = not isinstance(offset, int)
        offset = offset.reshape(-1) if per_batch else offset
        lengths = None if call.key_lengths is None else torch.as_tensor(call.key_lengths, device=device)
        if hasattr(call.span, "detach"):
            span = call.span.detach().to(device=device, dtype=dtype).reshape(-1)
        else:  # a Python number, read in the mask's dtype (not torch's float32 default)
            span = torch.tensor([float(call.span)], dtype=dtype, device=device)
        per_head = span.numel() > 1 or getattr(call.span, "ndim", 0) == 1

        def weight(b, h, q_idx, kv_idx):
            d = (q_idx + (offset[b] if per_batch else offset) - kv_idx).abs().to(dtype)
            z = span[h] if per_head else span[0]
            return ((z - (d - ramp)) / ramp).clamp(0.0, 1.0), q_idx + (offset[b] if per_batch else offset) - kv_idx

        def mask_mod(b, h, q_idx, kv_idx):
            m, d = weight(b, h, q_idx, kv_idx)
            keep = m > 0
            if causal:
                keep = keep & (d >= 0)
            if lengths is not None:
                keep = keep & (kv_idx < lengths[b])
            return keep

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + torch.log(weight(b, h, q_idx, kv_idx)[0]).to(score.dtype)

        block_mask = create_block_mask(mask_mod, call.B if (lengths is not None or per_batch) else None,
                                       call.H if per_head else None, call.Lq, call.Lk, device=device)
        gqa, scale = call.Hkv != call.H, call.scale

        def run(q, k, v):
            return attend(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=gqa)

        return run


def _flex_for_this_machine():
    """FlexAttention compiled (as its documentation advises) where CUDA is; on CPU its eager
    path, the same function (torch.compile per shape costs about 30 s each on a CPU)."""
    import torch

    return _Flex(compile=torch.cuda.is_available())
