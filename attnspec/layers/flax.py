"""The Flax (linen) counterpart of `attnspec.layers.torch.SpanAttention`.

Same model as the PyTorch layer (see its module docstring): per-head span z = max_span * theta
with theta projected back to [0, 1] after each optimiser step by `project_spans(params)` (never
clamped in the forward), alpha fixed or 1 + sigmoid(a) per head, grouped-query heads, rotary
positions at absolute positions, q/k/v/o projections, and attention through
`attnspec.attention` (the dispatcher picks a JAX backend; one must be registered).

Span regulariser: the layer sows its mean span (tokens) into the "losses" collection:

    y, state = model.apply(params, x, mutable=["losses"])
    loss = task_loss + span_regularisation(state["losses"], 2e-6)

Decoding: `layer.apply(params, x_step, cache)` returns (y, new_cache); the cache keeps the last
ceil(max_h z_h + R) - 1 positions. Trimming needs the spans' concrete values, so cached decoding
runs outside `jax.jit` (or with params closed over as constants).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import attnspec
from attnspec import geometry

__all__ = ["KVCache", "SpanAttention", "apply_rope", "project_spans", "span_regularisation"]


def apply_rope(x, positions, base: float = 10000.0):
    """Rotary embedding of x [B, H, L, D] at integer positions [L]: pairs (i, i + D/2) rotate by
    position * base^(-2i/D).

    Concrete positions (the layer's always are) get their angles, cos and sin in float64 with
    NumPy, rounded once, as the torch layer does: in float32 the angle of position 1e5 is off by
    ~4e-3 rad. Traced positions fall back to float32 angles (jax has float64 only under x64)."""
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"rotary embeddings need an even head dimension; got D={D}")
    half = D // 2
    if isinstance(positions, jax.core.Tracer):
        inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / D)
        angles = jnp.asarray(positions, jnp.float32)[:, None] * inv_freq[None, :]
        cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    else:
        inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2.0 / D)
        angles = np.asarray(positions, np.float64)[:, None] * inv_freq[None, :]
        cos, sin = jnp.asarray(np.cos(angles), x.dtype), jnp.asarray(np.sin(angles), x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1)


class KVCache(NamedTuple):
    """Keys (after RoPE) and values [B, Hkv, n, D] at absolute positions start .. start + n - 1;
    `seen` tokens appended in all. An empty cache: KVCache()."""

    k: Any = None
    v: Any = None
    start: int = 0
    seen: int = 0

    def __len__(self):
        return 0 if self.k is None else int(self.k.shape[2])


class SpanAttention(nn.Module):
    """Causal multi-head self-attention with learnable per-head span and alpha (see the module
    docstring; arguments as attnspec.layers.torch.SpanAttention)."""

    d_model: int
    n_heads: int
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_span: Optional[float] = None
    ramp: float = 32.0
    span_init: Any = 0.0
    alpha: Any = 1.0
    learn_alpha: bool = False
    rope: bool = True
    rope_base: float = 10000.0
    use_bias: bool = False
    backend: Optional[str] = None
    param_dtype: Any = jnp.float32

    def _dims(self):
        H = self.n_heads
        Hkv = H if self.n_kv_heads is None else self.n_kv_heads
        D = self.d_model // H if self.head_dim is None else self.head_dim
        if H < 1 or Hkv < 1 or H % Hkv:
            raise ValueError(f"n_heads={H} must be a positive multiple of n_kv_heads={Hkv}")
        if D < 1:
            raise ValueError(f"head_dim={D} must be positive")
        if self.rope and D % 2:
            raise ValueError(f"rope=True needs an even head_dim; got head_dim={D}")
        if not (self.ramp > 0 and math.isfinite(self.ramp)):
            raise ValueError(f"ramp={self.ramp} must be a finite number > 0")
        return H, Hkv, D

    def _span(self, H):
        if self.max_span is None:
            return None
        if not (self.max_span > 0 and math.isfinite(self.max_span)):
            raise ValueError(f"max_span={self.max_span} must be a finite number > 0 (or None for no span)")

        theta0 = np.broadcast_to(np.asarray(self.span_init, np.float64), (H,))
        if not bool(np.all((theta0 >= 0) & (theta0 <= 1))):
            raise ValueError(f"span_init={self.span_init} must lie in [0, 1] (a fraction of max_span)")

        def init(key):
            return jnp.asarray(theta0, self.param_dtype)

        theta = self.param("span_theta", init)
        z = self.max_span * theta
        # Replaced, not appended, on each call: a "losses" collection carried over from init()
        # must not count a layer twice.
        self.sow("losses", "span_mean", jnp.mean(z), init_fn=lambda: jnp.zeros(()),
                 reduce_fn=lambda previous, value: value)
        return z

    def _alpha(self, H):
        if not self.learn_alpha:
            if not (1.0 <= float(self.alpha) <= 2.0):
                raise ValueError(f"alpha={self.alpha} must lie in [1, 2]")
            return float(self.alpha)

        a0 = np.broadcast_to(np.asarray(self.alpha, np.float64), (H,))
        if not bool(np.all((a0 > 1) & (a0 < 2))):
            raise ValueError(f"learn_alpha=True needs an initial alpha in (1, 2) (alpha = 1 + sigmoid(a)); "
                             f"got alpha={self.alpha}")

        def init(key):
            return jnp.asarray(np.log(a0 - 1) - np.log1p(-(a0 - 1)), self.param_dtype)

        return 1 + jax.nn.sigmoid(self.param("alpha_logit", init))

    @nn.compact
    def __call__(self, x, cache: Optional[KVCache] = None):
        """x [B, L, d_model] -> y, or (y, new cache) when a cache is given (see module doc)."""
        H, Hkv, D = self._dims()
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, L, d_model={self.d_model}]; got {tuple(x.shape)}")
        B, L, _ = x.shape
        dense = dict(use_bias=self.use_bias, param_dtype=self.param_dtype)
        q = nn.DenseGeneral((H, D), name="q_proj", **dense)(x).transpose(0, 2, 1, 3)
        k = nn.DenseGeneral((Hkv, D), name="k_proj", **dense)(x).transpose(0, 2, 1, 3)
        v = nn.DenseGeneral((Hkv, D), name="v_proj", **dense)(x).transpose(0, 2, 1, 3)
        z = self._span(H)
        alpha = self._alpha(H)
        first = 0 if cache is None else int(cache.seen)
        if self.rope:
            positions = np.arange(first, first + L)
            q = apply_rope(q, positions, self.rope_base)
            k = apply_rope(k, positions, self.rope_base)
        q_offset = None
        if cache is not None:
            if cache.k is not None:
                k = jnp.concatenate((cache.k, k), axis=2)
                v = jnp.concatenate((cache.v, v), axis=2)
            q_offset = first - int(cache.start)
        out = attnspec.attention(q, k, v, alpha=alpha, span=z, ramp=self.ramp, causal=True, q_offset=q_offset,
                                 backend=self.backend)
        y = nn.DenseGeneral(self.d_model, axis=(-2, -1), name="o_proj", **dense)(out.transpose(0, 2, 1, 3))
        if cache is None:
            return y
        start = int(cache.start)
        if z is not None:
            # concrete spans needed (see module doc)
            keep = max(1, geometry.reach(np.asarray(z, dtype=np.float32), self.ramp, "float32")) - 1
            n = k.shape[2]
            if n > keep:
                k, v, start = k[:, :, n - keep:], v[:, :, n - keep:], start + n - keep
        return y, KVCache(k, v, start, first + L)


def project_spans(params):
    """params with every `span_theta` clipped to [0, 1] (call after each optimiser step)."""
    def clip(path, leaf):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return jnp.clip(leaf, 0.0, 1.0) if name == "span_theta" else leaf

    return jax.tree_util.tree_map_with_path(clip, params)


def span_regularisation(losses, coefficient: float):
    """coefficient * the sum over layers of their mean span (tokens), from the "losses"
    collection that `apply(..., mutable=["losses"])` returns."""
    values = [leaf for leaf in jax.tree_util.tree_leaves(losses)]
    if not values:
        return jnp.zeros(())
    return coefficient * sum(values)
