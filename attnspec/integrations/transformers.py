"""attnspec as an attention implementation of Hugging Face transformers.

    import attnspec.integrations.transformers as ats          # registers "attnspec"
    config = ats.configure(config, alpha=1.5, learn_alpha=True, max_span=256)  # optional
    model = AutoModelForCausalLM.from_config(config, attn_implementation="attnspec")

Importing this module registers an "attnspec" function in transformers' `AttentionInterface`
and a mask function of the same name in its `AttentionMaskInterface`, so every decoder that
builds its masks with `transformers.masking_utils` and calls its attention through the
interface (tested: Llama, Qwen2, Qwen3, Mistral, Gemma, Phi-3, OLMo 2, Granite, Mixtral) runs
`attnspec.attention`:

- the mask function receives what transformers knows (batch, query and key lengths, the
  query's and keys' first positions, the 2-D padding mask, the sliding window) and turns it
  into attnspec arguments: `key_padding_mask` [B, Lk] (None without padding), `q_offset`
  (query position minus first key position), `causal`, and the window W. It then builds the
  dense mask transformers would have used and checks that those arguments reproduce it
  exactly: a mask they cannot express (packed sequences, image-token overlays, chunked
  attention) raises instead of being approximated;
- K and V are passed with their own Hkv heads (no repetition);
- a sliding window W becomes the hard window z = W - 1, R = 1 (exact: m = 1 for d <= W - 1,
  0 beyond), which a learned span cannot share (refused);
- an arbitrary 4-D mask or bias, dropout > 0 while training, logit soft-capping and attention
  sinks are refused with the reason.

alpha and span per layer and head come from `config.attnspec` (see `configure`): every
attention module gets an `attnspec` submodule (`AttnspecHeads`, the same `HeadParameters` as
`attnspec.layers.torch.SpanAttention`: z = max_span * theta, alpha = 1 + sigmoid(a)) when the
model is built, so `save_pretrained` / `from_pretrained` store and load them with the other
weights. `attnspec.layers.torch.project_spans(model)` and `span_regularisation(model, c)` work
on such models as on SpanAttention ones. `add_heads(model, ...)` does the same for a model
already loaded (e.g. a pretrained checkpoint without attnspec weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import attnspec
from attnspec.layers.torch import HeadParameters

__all__ = ["NAME", "AttnspecHeads", "AttnspecMask", "add_heads", "attention_forward", "attention_layers", "configure",
           "mask_forward", "register", "span_cache"]

#: The attn_implementation name.
NAME = "attnspec"
#: The keys of config.attnspec and their defaults.
DEFAULTS = dict(alpha=1.0, learn_alpha=False, max_span=None, span_init=0.0, ramp=32.0, backend=None)


class AttnspecHeads(HeadParameters):
    """alpha and span of one attention layer's query heads (parameters `span_theta` and
    `alpha_logit` when learned); see attnspec.layers.torch.HeadParameters."""

    def __init__(self, n_heads: int, *, alpha=1.0, learn_alpha=False, max_span=None, span_init=0.0, ramp=32.0,
                 backend=None, device=None, dtype=None):
        super().__init__()
        self._init_heads(n_heads, max_span=max_span, ramp=ramp, span_init=span_init, alpha=alpha,
                         learn_alpha=learn_alpha, device=device, dtype=dtype)
        self.backend = backend
        self._initial = self.initial_values(n_heads, max_span=max_span, span_init=span_init, alpha=alpha,
                                            learn_alpha=learn_alpha)

    def initialise_(self, copy=None):
        """Set the parameters to their initial values (span_init, alpha). transformers calls this
        through the model's _init_weights for heads a checkpoint does not have; `copy` is its
        copy_, which leaves parameters already loaded alone."""
        copy = copy or (lambda param, value: param.data.copy_(value))
        for name, value in self._initial.items():
            param = getattr(self, name)
            copy(param, value.to(device=param.device, dtype=param.dtype))

    def extra_repr(self) -> str:
        span = "none" if self.max_span is None else f"max_span={self.max_span:g}, ramp={self.ramp:g}"
        alpha = "learned" if self.learn_alpha else f"{self.fixed_alpha:g}"
        return f"n_heads={self.n_heads}, span: {span}, alpha: {alpha}"


def configure(config, **settings):
    """Set config.attnspec (alpha, learn_alpha, max_span, span_init, ramp, backend; see
    AttnspecHeads) and attn_implementation = "attnspec"; returns the config. Models built from it
    have the heads' parameters from the start, and config.json records the settings."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown attnspec settings {unknown} (known: {', '.join(DEFAULTS)})")
    merged = dict(DEFAULTS, **settings)
    AttnspecHeads(1, **{k: v for k, v in merged.items()})  # validate now, with the heads' messages
    config.attnspec = merged
    config._attn_implementation = NAME
    return config


def attention_layers(model):
    """The attention modules of a transformers model: those with a layer index, a head dim and
    the config's head counts (LlamaAttention, Qwen2Attention, MistralAttention, ...)."""
    for module in model.modules():
        if (type(module).__name__.endswith("Attention") and hasattr(module, "layer_idx")
                and hasattr(module, "head_dim") and hasattr(module, "config")):
            yield module


def add_heads(model, **settings):
    """Give every attention module of `model` an `attnspec` submodule with these settings (or
    config.attnspec's, or the defaults), record them in model.config and switch the model to
    attn_implementation="attnspec". Modules that already have heads keep them. Returns model."""
    config = model.config
    if settings or getattr(config, "attnspec", None) is None:
        configure(config, **dict(getattr(config, "attnspec", None) or {}, **settings))
    _add_heads(model)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    return model


def _add_heads(model):
    settings = dict(DEFAULTS, **model.config.attnspec)
    for module in attention_layers(model):
        if isinstance(getattr(module, "attnspec", None), AttnspecHeads):
            continue
        n_heads = module.config.num_attention_heads
        reference = next(module.parameters(), None)
        device = None if reference is None else reference.device
        dtype = None if reference is None or not reference.is_floating_point() else reference.dtype
        module.attnspec = AttnspecHeads(n_heads, device=device, dtype=dtype, **settings)


def span_cache(model):
    """A transformers DynamicCache for `model.generate(..., cache=span_cache(model))`
    that keeps only the keys a span can still reach.

    A query reaches at most cache_bound() = ceil(max_h z_h + R) keys, its own included (keys
    further back have m = 0 for it and for every later query), so between steps a layer keeps
    the last cache_bound() - 1 positions of its own, as attnspec.layers.torch.KVCache does.

    transformers builds one mask for all layers, sized by the first layer it takes for a full
    one: the layers with the longest bound are marked so (they keep the most keys), the mask
    function receives their first kept position (kv_offset) and the padding mask sliced to
    their keys, and a layer that keeps fewer takes the last of them (every layer keeps the
    most recent positions, so its keys are the tail of those). Without a span on every layer
    nothing can be dropped: a plain DynamicCache. The spans must not change while the cache is
    in use."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    modules = list(attention_layers(model))
    bounds = [m.attnspec.cache_bound() if isinstance(getattr(m, "attnspec", None), AttnspecHeads) else None
              for m in modules]
    cache = DynamicCache(config=model.config)
    if not bounds or any(b is None for b in bounds) or any(layer.is_sliding for layer in cache.layers):
        return cache
    cache.layers = [DynamicSlidingWindowLayer(sliding_window=bound) for bound in bounds]
    for layer, bound in zip(cache.layers, bounds):
        if bound == max(bounds):
            layer.is_sliding = False  # the mask is sized by these layers
    return cache


# --- the mask ----------------------------------------------------------------------------------

@dataclass
class AttnspecMask:
    """What the mask function hands to the attention function: attnspec's arguments.

    key_padding_mask: [B, Lk] bool (True: readable) or None; q_offset: query slot 0's position
    minus key slot 0's (int or [B]); causal; window: the sliding window W or None.
    """

    key_padding_mask: Optional[Tensor]
    q_offset: object
    causal: bool
    window: Optional[int]
    kv_length: int


def _dense(key_padding_mask, q_length, kv_length, q_offset, causal, window, device):
    """[B, 1, Lq, Lk] bool: the mask these arguments express."""
    d = (torch.arange(q_length, device=device)[:, None] + q_offset - torch.arange(kv_length, device=device)[None, :])
    allowed = key_padding_mask[:, None, None, :]
    if causal:
        allowed = allowed & (d >= 0)
        if window is not None:
            allowed = allowed & (d < window)
    elif window is not None:
        allowed = allowed & (d.abs() < window)
    return allowed


def mask_forward(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, local_size=None, use_vmap=False, device="cpu", **kwargs):
    """The "attnspec" entry of transformers' AttentionMaskInterface (same arguments as its
    sdpa_mask). Returns an AttnspecMask, or raises NotImplementedError for a mask that causal,
    a sliding window and a key padding mask cannot express."""
    from transformers import masking_utils

    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    q_offset = int(q_offset) if isinstance(q_offset, Tensor) else int(q_offset)
    kv_offset = int(kv_offset) if isinstance(kv_offset, Tensor) else int(kv_offset)
    dense = masking_utils.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, local_size=local_size,
        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, use_vmap=use_vmap, device=device)
    dense = dense.expand(batch_size, 1, q_length, kv_length)
    # A key no query may read is excluded; whether that is padding or a causal/window bound
    # does not matter, as long as the arguments reproduce the whole mask (checked below).
    readable = dense.any(dim=2)[:, 0]  # [B, Lk]
    offset = q_offset - kv_offset
    for causal in (True, False):
        if bool((_dense(readable, q_length, kv_length, offset, causal, local_size, dense.device) == dense).all()):
            padding = None if bool(readable.all()) else readable
            return AttnspecMask(padding, offset, causal, local_size, kv_length)
    raise NotImplementedError(
        "attn_implementation='attnspec': this model's attention mask is not causal or bidirectional attention "
        "with a key padding mask and a sliding window (e.g. packed sequences, chunked attention or a custom mask "
        "function); attnspec cannot express it. Use attn_implementation='sdpa' for this model or input.")


# --- the attention function --------------------------------------------------------------------

def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, dropout: float = 0.0,
                      scaling: Optional[float] = None, sliding_window: Optional[int] = None, softcap=None,
                      is_causal: Optional[bool] = None, **kwargs):
    """The "attnspec" entry of transformers' AttentionInterface: query [B, H, Lq, D], key and
    value [B, Hkv, Lk, D] -> (out [B, Lq, H, Dv], None)."""
    if dropout and module.training:
        raise NotImplementedError(
            f"attn_implementation='attnspec' has no attention dropout; got dropout={dropout} while training "
            "(set config.attention_dropout = 0)")
    if softcap is not None:
        raise NotImplementedError(f"attn_implementation='attnspec' has no logit soft-capping; got softcap={softcap}")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attn_implementation='attnspec' has no attention sinks (s_aux)")
    Lq, Lk = query.shape[2], key.shape[2]
    if attention_mask is None:  # nothing masked: causal by the module's flag, bottom-right aligned
        causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
        mask = AttnspecMask(None, Lk - Lq, causal, sliding_window, Lk)
    elif isinstance(attention_mask, AttnspecMask):
        mask = attention_mask
    else:
        raise NotImplementedError(
            "attn_implementation='attnspec' received an explicit attention mask of shape "
            f"{list(getattr(attention_mask, 'shape', []))} (an arbitrary 4-D mask or bias); it takes the 2-D padding "
            "mask transformers builds its masks from, not a prepared one")
    if mask.kv_length > Lk:  # a layer of span_cache that keeps fewer keys: the tail of the mask's
        drop = mask.kv_length - Lk
        kpm = None if mask.key_padding_mask is None else mask.key_padding_mask[:, drop:]
        mask = AttnspecMask(kpm, mask.q_offset - drop, mask.causal, mask.window, Lk)
    if mask.kv_length != Lk:
        raise NotImplementedError(f"attn_implementation='attnspec': the mask covers {mask.kv_length} keys but the "
                                  f"layer has {Lk} (a cache layout it does not support)")
    heads = getattr(module, "attnspec", None)
    alpha, span, ramp, backend = 1.0, None, 32.0, None
    if isinstance(heads, AttnspecHeads):
        alpha, span, ramp, backend = heads.alpha, heads.span, heads.ramp, heads.backend
        if isinstance(alpha, Tensor):
            alpha = alpha.to(query.dtype) if query.dtype == torch.float64 else alpha.float()
        if span is not None:
            span = span.to(query.dtype) if query.dtype == torch.float64 else span.float()
    window = mask.window
    if window is not None:
        if span is not None:
            raise NotImplementedError(
                f"attn_implementation='attnspec': layer {getattr(module, 'layer_idx', '?')} has a sliding window "
                f"of {window} tokens and a learned span; attnspec has one span per head (set max_span=None for "
                "sliding-window layers, or remove the window)")
        span, ramp = float(window - 1), 1.0  # m = clip(W - |d|, 0, 1): 1 for d <= W - 1, else 0
    kpm = mask.key_padding_mask
    out = attnspec.attention(query, key, value, alpha=alpha, span=span, ramp=ramp, causal=mask.causal,
                             q_offset=mask.q_offset, scale=scaling, key_padding_mask=kpm, backend=backend)
    return out.transpose(1, 2).contiguous(), None


# --- registration ------------------------------------------------------------------------------

def _post_init_adds_heads():
    """transformers models call post_init() at the end of __init__: there a model whose config
    has attnspec settings gets its heads, before from_pretrained loads the weights into them."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.post_init
    if getattr(original, "_adds_attnspec_heads", False):
        return

    def post_init(self, *args, **kwargs):
        if getattr(self.config, "attnspec", None) is not None and not getattr(self, "_inits_attnspec_heads", False):
            _init_weights = self._init_weights

            def init_weights(module):  # heads missing from a checkpoint start at their initial values
                if isinstance(module, AttnspecHeads):
                    from transformers import initialization

                    module.initialise_(initialization.copy_)
                else:
                    _init_weights(module)

            self._init_weights = init_weights
            self._inits_attnspec_heads = True
        result = original(self, *args, **kwargs)
        if getattr(self.config, "attnspec", None) is not None:
            _add_heads(self)
            # The heads' alpha and span mean something only to attnspec's attention (config.json
            # does not record attn_implementation): a model with them runs it, never sdpa.
            self.config._attn_implementation = NAME
        return result

    post_init._adds_attnspec_heads = True
    PreTrainedModel.post_init = post_init


def register():
    """Register "attnspec" with transformers (done on import; calling it again is harmless)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_forward)
    _post_init_adds_heads()


register()
