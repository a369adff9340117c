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
`attnspec.layers.torch.SpanAttention`: z = max_span * theta, alpha = 1 + sigmoid(a) when
learned) when the model is built, so `save_pretrained` / `from_pretrained` store and load them
with the other weights. Each setting is one value, or one per layer, and alpha (fixed or
initial) and span_init one per layer and head. A config carrying attnspec settings runs
attn_implementation="attnspec" (requesting another one raises). `attnspec.layers.torch.
project_spans(model)` and `span_regularisation(model, c)` work on such models as on
SpanAttention ones. `add_heads(model, ...)` does the same for a model already loaded (e.g. a
pretrained checkpoint without attnspec weights). `span_cache(model)` is a generation cache in
which each layer keeps only the keys it can still read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

import attnspec
from attnspec.layers.torch import HeadParameters

__all__ = ["NAME", "AttnspecHeads", "AttnspecMask", "SpanCache", "add_heads", "attention_forward", "attention_layers",
           "configure", "layer_settings", "mask_forward", "register", "span_cache"]

#: The attn_implementation name.
NAME = "attnspec"
#: The keys of config.attnspec and their defaults.
DEFAULTS = dict(alpha=1.0, learn_alpha=False, max_span=None, span_init=0.0, ramp=32.0, learn_span=True, backend=None)
#: The settings that may differ between layers (a list with one entry per layer) ...
PER_LAYER = ("alpha", "learn_alpha", "max_span", "span_init", "ramp", "learn_span")
#: ... and those whose entry for a layer may itself be a list with one value per query head.
PER_HEAD = ("alpha", "span_init")


class AttnspecHeads(HeadParameters):
    """alpha and span of one attention layer's query heads (parameters `span_theta` and
    `alpha_logit` when learned); see attnspec.layers.torch.HeadParameters. alpha and span_init
    are a number or one value per head; learn_span=False keeps theta fixed (a buffer `span_theta`
    that the checkpoint holds, not a parameter)."""

    def __init__(self, n_heads: int, *, alpha=1.0, learn_alpha=False, max_span=None, span_init=0.0, ramp=32.0,
                 learn_span=True, backend=None, device=None, dtype=None):
        super().__init__()
        self._init_heads(n_heads, max_span=max_span, ramp=ramp, span_init=span_init, alpha=alpha,
                         learn_alpha=learn_alpha, device=device, dtype=dtype)
        self.learn_span = bool(learn_span)
        if self.span_theta is not None and not self.learn_span:
            # A buffer, not a parameter with requires_grad=False: from_pretrained replaces
            # parameters with new ones (which want gradients again); a buffer stays a buffer, and
            # the checkpoint still holds it.
            theta = self.span_theta.detach()
            del self.span_theta
            self.register_buffer("span_theta", theta)
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
        if self.max_span is not None and not self.learn_span:
            span += " (fixed)"
        return f"n_heads={self.n_heads}, span: {span}, alpha: {self.alpha_repr()}"


def _plain(value):
    """Settings as config.json can hold them: tensors and arrays become (nested) lists."""
    if hasattr(value, "tolist") and not isinstance(value, (bool, int, float)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _decoder_config(config):
    getter = getattr(config, "get_text_config", None)
    return config if getter is None else getter(decoder=True)


def layer_settings(config) -> list:
    """config.attnspec resolved per layer: a list with one dict of AttnspecHeads arguments per
    layer. A setting is one value for every layer, or a list with one entry per layer
    (num_hidden_layers entries); for alpha and span_init that entry may itself be a list with
    one value per query head (num_attention_heads values). Raises ValueError naming the setting,
    the layer and the value for anything else, or for a value the heads refuse."""
    settings = dict(DEFAULTS, **(getattr(config, "attnspec", None) or {}))
    text = _decoder_config(config)
    n_layers, n_heads = text.num_hidden_layers, text.num_attention_heads
    per_layer = {}
    for key in PER_LAYER:
        value = settings[key]
        if isinstance(value, (list, tuple)):
            if len(value) != n_layers:
                hint = (f" (one value per head in every layer is [{list(value)!r}] * {n_layers})"
                        if key in PER_HEAD and len(value) == n_heads else "")
                raise ValueError(f"attnspec setting {key}={list(value)!r}: a list gives one entry per layer and the "
                                 f"model has num_hidden_layers={n_layers}; got {len(value)} entries{hint}")
            entries = list(value)
        else:
            entries = [value] * n_layers
        for i, entry in enumerate(entries):
            if isinstance(entry, (list, tuple)) and key not in PER_HEAD:
                raise ValueError(f"attnspec setting {key}[{i}]={entry!r}: {key} takes one value per layer, not a list "
                                 f"(per head: {', '.join(PER_HEAD)})")
        per_layer[key] = entries
    layers = [dict({key: per_layer[key][i] for key in PER_LAYER}, backend=settings["backend"]) for i in range(n_layers)]
    for i, layer in enumerate(layers):
        try:
            AttnspecHeads(n_heads, **layer)
        except ValueError as error:
            raise ValueError(f"attnspec settings of layer {i} (of num_hidden_layers={n_layers}, with "
                             f"num_attention_heads={n_heads}): {error}") from None
    return layers


def configure(config, **settings):
    """Set config.attnspec (alpha, learn_alpha, max_span, span_init, ramp, learn_span, backend;
    see AttnspecHeads and layer_settings: each may be one value, or one per layer, and alpha and
    span_init one per layer and head) and attn_implementation = "attnspec"; returns the config.
    Models built from it have the heads' parameters from the start, and config.json records the
    settings (so from_pretrained builds the same heads)."""
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown attnspec settings {unknown} (known: {', '.join(DEFAULTS)})")
    merged = dict(DEFAULTS, **{key: _plain(value) for key, value in settings.items()})
    previous = getattr(config, "attnspec", None)
    config.attnspec = merged
    try:
        layer_settings(config)  # validate now, before a model is built
    except ValueError:
        config.attnspec = previous
        raise
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
    layers = layer_settings(model.config)
    for module in attention_layers(model):
        if isinstance(getattr(module, "attnspec", None), AttnspecHeads):
            continue
        n_heads = module.config.num_attention_heads
        reference = next(module.parameters(), None)
        device = None if reference is None else reference.device
        dtype = None if reference is None or not reference.is_floating_point() else reference.dtype
        module.attnspec = AttnspecHeads(n_heads, device=device, dtype=dtype, **layers[module.layer_idx])


def _keeps(layer) -> float:
    """How many positions a cache layer keeps between steps (inf: all)."""
    window = getattr(layer, "sliding_window", None)
    return math.inf if window is None else window - 1


class SpanCache(DynamicCache):
    """A DynamicCache whose masks are sized by the layer of each kind (full attention, sliding
    window) that keeps the most positions; see span_cache."""

    def get_mask_sizes(self, query_length, layer_idx):
        if layer_idx >= len(self.layers):
            return super().get_mask_sizes(query_length, layer_idx)
        kind = self.is_sliding[layer_idx]
        same = [i for i, layer in enumerate(self.layers) if isinstance(layer, DynamicLayer) and self.is_sliding[i] == kind]
        widest = max(same, key=lambda i: _keeps(self.layers[i]), default=layer_idx)
        return super().get_mask_sizes(query_length, widest)


def span_cache(model):
    """A transformers DynamicCache for `model.generate(..., cache=span_cache(model))` in which
    every layer keeps only the keys it can still read:

    - a layer with a span: a query reaches at most cache_bound() = ceil(max_h z_h + R) keys, its
      own included (keys further back have m = 0 for it and for every later query), so between
      steps the layer keeps its last cache_bound() - 1 positions, as
      attnspec.layers.torch.KVCache does;
    - a sliding-window layer of the model (window W): its last W - 1 positions, as transformers'
      own cache does (the smaller of the two if it had both);
    - a layer that reads every key (no span, no window): everything.

    transformers builds one mask per kind of layer (full attention, sliding window) and sizes it
    by one layer of that kind. Here it is sized by the layer of that kind that keeps the most
    positions: the mask function receives that layer's first kept position (kv_offset) and the
    padding mask for its keys, and a layer that keeps fewer takes the last of them (every layer
    keeps the most recent positions, so its keys are the tail of those): attention_forward
    slices the padding mask and shifts q_offset to match. The spans must not change while the
    cache is in use."""
    cache = SpanCache(config=model.config)  # the model's own layout: its windows and full layers
    modules = {module.layer_idx: module for module in attention_layers(model)}
    for i, layer in enumerate(cache.layers):
        heads = getattr(modules.get(i), "attnspec", None)
        bound = heads.cache_bound() if isinstance(heads, AttnspecHeads) else None
        if bound is None or type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            continue
        keep = bound - 1
        if keep >= _keeps(layer):
            continue
        # DynamicSlidingWindowLayer(W) keeps W - 1 positions, and W = 1 would keep them all.
        trimmed = DynamicSlidingWindowLayer(sliding_window=max(keep, 1) + 1)
        trimmed.is_sliding = layer.is_sliding  # it still reads the mask of its kind of layer
        cache.layers[i] = trimmed
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
        alpha, span, ramp, backend = heads.alpha_for(query), heads.span, heads.ramp, heads.backend
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

def _wrap_model_class():
    """Two hooks on transformers' PreTrainedModel, both inert unless the model's config carries
    attnspec settings (config.attnspec, set by `configure`):

    - the check of the attention implementation (made in __init__ and by
      set_attn_implementation): such a config runs attnspec, since the heads' alpha and span
      mean something only to it. With no implementation requested (config.json does not record
      one) it becomes "attnspec"; another one requested explicitly raises ValueError rather than
      silently running attnspec or silently ignoring the heads;
    - post_init() (the end of every model's __init__): the model gets its heads there, before
      from_pretrained loads the weights into them, and heads a checkpoint lacks start at their
      initial values.
    """
    from transformers import PreTrainedModel

    if getattr(PreTrainedModel.post_init, "_adds_attnspec_heads", False):
        return
    original_check = PreTrainedModel._check_and_adjust_attn_implementation
    original_post_init = PreTrainedModel.post_init

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        if getattr(self.config, "attnspec", None) is not None:
            if attn_implementation is None:
                attn_implementation = NAME
            elif attn_implementation != NAME:
                # from_config / from_pretrained wrote the request into the caller's config; a
                # refused request is not kept there.
                self.config._attn_implementation_internal = NAME
                raise ValueError(
                    f"attn_implementation={attn_implementation!r} was requested for a {type(self).__name__} whose config "
                    f"carries attnspec settings (config.attnspec = {self.config.attnspec}); its per-head alpha and span "
                    f"are read only by attn_implementation={NAME!r}. Request {NAME!r} (or nothing), or delete "
                    "config.attnspec to run the model without them.")
        return original_check(self, attn_implementation, *args, **kwargs)

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
        result = original_post_init(self, *args, **kwargs)
        if getattr(self.config, "attnspec", None) is not None:
            _add_heads(self)
        return result

    post_init._adds_attnspec_heads = True
    PreTrainedModel._check_and_adjust_attn_implementation = _check_and_adjust_attn_implementation
    PreTrainedModel.post_init = post_init


def register():
    """Register "attnspec" with transformers (done on import; calling it again is harmless)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_forward)
    _wrap_model_class()


register()
