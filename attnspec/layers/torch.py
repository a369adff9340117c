"""A PyTorch multi-head attention layer that learns its span and its alpha per head.

Written from the papers (Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers";
Correia et al. 2019, "Adaptively Sparse Transformers"; Su et al. 2021, RoFormer) and SPEC.md:

- span: head h reads keys at distance d with weight m = clip((R + z_h - d) / R, 0, 1), inside
  the entmax (SPEC.md 3, 5.2). z_h = max_span * theta_h. The forward uses theta as it is, so
  the gradient of z is never cut by a clamp; the training loop keeps theta in [0, 1] by calling
  `project_spans(model)` (or `layer.project_()`) after each optimiser step, as the paper does.
- alpha: fixed (one value, or one per head), or learned per head as alpha_h = 1 + sigmoid(a_h),
  always inside [1, 2].
- grouped-query heads (n_kv_heads < n_heads), rotary position embeddings at absolute positions
  (applied to keys before they are cached, so a decoding step sees exactly the keys a full
  recomputation would), and q/k/v/o projections.
- `KVCache`: a query reaches at most ceil(max_h z_h + R) keys (its own included: m > 0 needs
  distance d < z + R). Between steps a layer keeps the last ceil(max_h z_h + R) - 1 positions,
  exactly those the next query can reach besides itself; keys further back have m = 0 for
  every later query (their distance only grows), so dropping them changes nothing. Memory is
  bounded by the learned span, not by the length of the context.

The attention itself is `attnspec.attention` (the dispatcher chooses the backend; pass
`backend=` to pin one).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

import attnspec
from attnspec import geometry, precision

__all__ = [
    "HeadParameters",
    "KVCache",
    "SpanAttention",
    "apply_rope",
    "project_spans",
    "span_layers",
    "span_regularisation",
]


def apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding of x [B, H, L, D] at absolute positions [L] (RoFormer).

    Dimension pairs (i, i + D/2) rotate by the angle position * base^(-2i/D). Angles are formed
    in float64 and rounded once, so the same position gives the same rotation whether the token
    is embedded in a full sequence or in a one-token decoding step.
    """
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"rotary embeddings need an even head dimension; got D={D}")
    half = D // 2
    inv_freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2.0 / D)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [L, D/2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Keys (after RoPE) and values of one layer for decoding, [B, Hkv, n, D], holding the
    absolute positions start .. start + n - 1; `seen` tokens have been appended in all.

    After each call a layer with a span keeps only its last `layer.cache_bound() - 1` positions
    (so a step attends to at most cache_bound() keys); the spans must not change while a cache
    is in use. A layer without a span keeps everything. `max_length` records the longest the
    cache has been between calls.
    """

    def __init__(self):
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None
        self.start = 0
        self.seen = 0
        self.max_length = 0

    def __len__(self) -> int:
        return 0 if self.k is None else int(self.k.shape[2])

    def append(self, k: Tensor, v: Tensor):
        """(k_all, v_all): the cached entries followed by the new ones."""
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat((self.k, k), dim=2)
            self.v = torch.cat((self.v, v), dim=2)
        self.seen += k.shape[2]
        return self.k, self.v

    def trim(self, keep: Optional[int]):
        """Keep only the last `keep` positions (None: all)."""
        n = len(self)
        if keep is not None and n > keep:
            # Copy so the dropped prefix is freed (a view would keep the whole buffer alive).
            self.k = self.k[:, :, n - keep:].clone()
            self.v = self.v[:, :, n - keep:].clone()
            self.start += n - keep
        self.max_length = max(self.max_length, len(self))


class HeadParameters(nn.Module):
    """The span and alpha of H heads, fixed or learned: what SpanAttention and the transformers
    integration (attnspec.integrations.transformers) share, so both have one parametrisation,
    one regulariser (span_loss) and one cache bound.

    - span: z_h = max_span * theta_h (parameter `span_theta`, kept in [0, 1] by project_());
    - alpha: fixed, or alpha_h = 1 + sigmoid(a_h) (parameter `alpha_logit`).
    Subclasses call `_init_heads` in their __init__.
    """

    @staticmethod
    def initial_values(n_heads: int, *, max_span: Optional[float], span_init, alpha, learn_alpha: bool) -> dict:
        """{parameter name: its initial value [H]}, float64 on the CPU (whatever device context
        a model is being built under): theta = span_init, a = logit(alpha - 1)."""
        values = {}
        if max_span is not None:
            values["span_theta"] = HeadParameters.per_head("span_init", span_init, n_heads)
        if learn_alpha:
            a0 = HeadParameters.per_head("alpha", alpha, n_heads)
            values["alpha_logit"] = torch.log(a0 - 1) - torch.log1p(-(a0 - 1))
        return values

    @staticmethod
    def per_head(name: str, value, n_heads: int) -> Tensor:
        """`value` (a number, or one number per head) as H float64 values on the CPU; anything
        else raises, naming the argument."""
        try:
            values = torch.as_tensor(value, dtype=torch.float64, device="cpu")
        except (TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"{name}={value!r} must be a number or n_heads={n_heads} numbers (one per head)") from error
        if values.dim() > 1 or (values.dim() == 1 and values.numel() != n_heads):
            raise ValueError(f"{name}={value!r} must be a number or n_heads={n_heads} numbers (one per head); "
                             f"got shape {list(values.shape)}")
        return values.expand(n_heads).clone()

    def _init_heads(self, n_heads: int, *, max_span: Optional[float], ramp: float, span_init, alpha,
                    learn_alpha: bool, device=None, dtype=None):
        if not (ramp > 0 and math.isfinite(ramp)):
            raise ValueError(f"ramp={ramp} must be a finite number > 0")
        self.n_heads = n_heads
        self.ramp = float(ramp)
        if max_span is None:
            self.max_span = None
            self.register_parameter("span_theta", None)
        else:
            if not (max_span > 0 and math.isfinite(max_span)):
                raise ValueError(f"max_span={max_span} must be a finite number > 0 (or None for no span)")
            self.max_span = float(max_span)
            theta = self.per_head("span_init", span_init, n_heads)
            if not bool(((theta >= 0) & (theta <= 1)).all()):
                raise ValueError(f"span_init={span_init} must lie in [0, 1] (a fraction of max_span)")
            self.span_theta = nn.Parameter(theta.to(device=device, dtype=dtype or torch.get_default_dtype()))

        self.learn_alpha = bool(learn_alpha)
        if self.learn_alpha:
            a0 = self.per_head("alpha", alpha, n_heads)
            if not bool(((a0 > 1) & (a0 < 2)).all()):
                raise ValueError(f"learn_alpha=True needs an initial alpha in (1, 2) (alpha = 1 + sigmoid(a)); "
                                 f"got alpha={alpha}")
            a = self.initial_values(n_heads, max_span=None, span_init=None, alpha=alpha, learn_alpha=True)["alpha_logit"]
            self.alpha_logit = nn.Parameter(a.to(device=device, dtype=dtype or torch.get_default_dtype()))
            self.fixed_alpha = None
        else:
            a = self.per_head("alpha", alpha, n_heads)
            if not bool(((a >= 1) & (a <= 2)).all()):  # NaN fails too
                raise ValueError(f"alpha={alpha} must lie in [1, 2]")
            self.register_parameter("alpha_logit", None)
            # One float when the heads agree (the scalar-alpha fast paths), else a tuple of H floats.
            values = a.tolist()
            self.fixed_alpha = values[0] if len(set(values)) == 1 else tuple(values)

    # --- the learned quantities ---------------------------------------------------------------

    @property
    def span(self) -> Optional[Tensor]:
        """z [H] in tokens (differentiable), or None without a span."""
        return None if self.span_theta is None else self.max_span * self.span_theta

    @property
    def alpha(self):
        """alpha [H] (differentiable) when learned, the fixed float when every head has it, else
        the fixed [H] values (float64, on the CPU)."""
        if self.alpha_logit is None:
            if isinstance(self.fixed_alpha, tuple):
                return torch.tensor(self.fixed_alpha, dtype=torch.float64)
            return self.fixed_alpha
        return 1 + torch.sigmoid(self.alpha_logit)

    def alpha_for(self, x: Tensor):
        """alpha as attnspec.attention takes it next to x: `alpha`, with fixed per-head values on
        x's device (float64 for a float64 x, else float32)."""
        if isinstance(self.fixed_alpha, tuple) and self.alpha_logit is None:
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            return torch.tensor(self.fixed_alpha, dtype=dtype, device=x.device)
        return self.alpha

    def alpha_repr(self) -> str:
        if self.learn_alpha:
            return "learned"
        if isinstance(self.fixed_alpha, tuple):
            return "[" + ", ".join(f"{a:g}" for a in self.fixed_alpha) + "]"
        return f"{self.fixed_alpha:g}"

    @torch.no_grad()
    def project_(self):
        """Clamp theta back into [0, 1] (call after each optimiser step)."""
        if self.span_theta is not None:
            self.span_theta.clamp_(0.0, 1.0)

    def span_loss(self) -> Tensor:
        """The mean span over heads, in tokens (the paper's regulariser, before its coefficient)."""
        if self.span_theta is None:
            raise ValueError("span_loss() needs a layer with a span (max_span is None)")
        return self.span.mean()

    def cache_bound(self) -> Optional[int]:
        """ceil(max_h z_h + R): the most keys a query can reach, its own included (None without
        a span). A KVCache keeps one fewer between steps.

        This is attnspec.geometry.reach with z and R in the dtype the backend computes the mask in
        (float64 for float64 layers, else float32): m > 0 needs d < R + z exactly (SPEC.md
        section 3), so every key the bound drops has m = 0 there.
        """
        if self.span_theta is None:
            return None
        dtype = precision.compute_dtype(str(self.span_theta.dtype).removeprefix("torch."))
        with torch.no_grad():
            spans = self.span.tolist()
        return max(1, geometry.reach(spans, self.ramp, dtype))


class SpanAttention(HeadParameters):
    """Causal multi-head self-attention with learnable per-head span and alpha.

    Args:
      d_model: width of the input and output.
      n_heads: query heads H. n_kv_heads: key/value heads (a divisor of H; default H).
      head_dim: per-head width (default d_model // n_heads; even when rope=True).
      max_span: the largest span in tokens; None gives full causal attention (no span).
      ramp: R, the width of the soft edge of the span mask.
      span_init: the initial theta = z / max_span, a number or [H] values in [0, 1] (the
        paper starts at 0: spans grow only where the loss asks for it).
      alpha: the fixed alpha in [1, 2], or with learn_alpha=True the initial alpha (then in
        the open interval (1, 2), alpha = 1 + sigmoid(a)); a number or [H] values.
      rope, rope_base: rotary position embeddings on q and k.
      backend: passed to attnspec.attention (None: the dispatcher chooses).
    """

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, max_span: Optional[float] = None, ramp: float = 32.0,
                 span_init=0.0, alpha=1.0, learn_alpha: bool = False, rope: bool = True,
                 rope_base: float = 10000.0, bias: bool = False, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a positive multiple of n_kv_heads={n_kv_heads}")
        head_dim = d_model // n_heads if head_dim is None else head_dim
        if head_dim < 1:
            raise ValueError(f"head_dim={head_dim} must be positive (d_model={d_model}, n_heads={n_heads})")
        if rope and head_dim % 2:
            raise ValueError(f"rope=True needs an even head_dim; got head_dim={head_dim}")
        factory = dict(device=device, dtype=dtype)
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.rope, self.rope_base = rope, float(rope_base)
        self.backend = backend
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias, **factory)
        self._init_heads(n_heads, max_span=max_span, ramp=ramp, span_init=span_init, alpha=alpha,
                         learn_alpha=learn_alpha, device=device, dtype=dtype)

    # --- forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor, cache: Optional[KVCache] = None) -> Tensor:
        """x [B, L, d_model] -> [B, L, d_model], causal.

        Without a cache the tokens sit at positions 0 .. L-1. With one, they continue the cached
        sequence (positions cache.seen ..), their keys and values are appended, and the cache is
        trimmed to the `cache_bound() - 1` positions the next query can reach besides itself;
        L = 1 is a decoding step.
        """
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, L, d_model={self.d_model}]; got {tuple(x.shape)}")
        B, L, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, L, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, L, Hkv, D).transpose(1, 2)
        v = self.v_proj(x).view(B, L, Hkv, D).transpose(1, 2)
        first = 0 if cache is None else cache.seen
        if self.rope:
            positions = torch.arange(first, first + L, device=x.device)
            q = apply_rope(q, positions, self.rope_base)
            k = apply_rope(k, positions, self.rope_base)
        q_offset = None
        if cache is not None:
            # Keys cover positions cache.start .. first + L - 1; query i sits at first + i.
            k, v = cache.append(k, v)
            q_offset = first - cache.start
        out = attnspec.attention(q, k, v, alpha=self.alpha_for(q), span=self.span, ramp=self.ramp, causal=True,
                                 q_offset=q_offset, backend=self.backend)
        if cache is not None:
            bound = self.cache_bound()
            cache.trim(None if bound is None else bound - 1)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, H * D))

    def extra_repr(self) -> str:
        span = "none" if self.max_span is None else f"max_span={self.max_span:g}, ramp={self.ramp:g}"
        alpha = self.alpha_repr()
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, span: {span}, alpha: {alpha}, rope={self.rope}")


# --- helpers for a model made of such layers ----------------------------------------------------

def span_layers(model: nn.Module) -> Iterable[HeadParameters]:
    """The layers of a model that have a span: SpanAttention layers, and the heads that
    attnspec.integrations.transformers adds to a transformers model."""
    return [m for m in model.modules() if isinstance(m, HeadParameters) and m.span_theta is not None]


def project_spans(model: nn.Module) -> None:
    """Clamp every layer's theta into [0, 1]; call after each optimiser step."""
    for layer in span_layers(model):
        layer.project_()


def span_regularisation(model: nn.Module, coefficient: float) -> Tensor:
    """coefficient * sum over span layers of the mean span in tokens (the adaptive-span paper's
    auxiliary loss: each layer adds coefficient * max_span * mean(theta)). Zero without spans."""
    layers = span_layers(model)
    if not layers:
        return torch.zeros(())
    return coefficient * torch.stack([layer.span_loss() for layer in layers]).sum()
