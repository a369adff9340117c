"""The public ops. Each validates its arguments once, asks the dispatcher for a kernel, and
calls it with the same arguments; results come back in the input's array type."""

from __future__ import annotations

from . import _arrays, validation
from .dispatch import selection


def _dispatch(op, args, kwargs, backend):
    """Validate, choose a kernel, run it. Under torch.compile the choice is made once, when
    the function is traced (attnspec._torch_compile.compiled_call), as jax.jit does with its own."""
    if _arrays.torch_compiling():
        from . import _torch_compile

        return _torch_compile.compiled_call(op, args, kwargs, backend)
    call = validation.VALIDATORS[op](*args, **kwargs)
    return selection.select(call, backend).fn(*args, **kwargs)


def attention(q, k, v, *, alpha=1.0, span=None, ramp=32.0, causal=False, key_lengths=None,
              q_offset=None, scale=None, backend=None, key_padding_mask=None):
    """Adaptive-span alpha-entmax attention (SPEC.md).

    Shapes: q [B, H, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] -> out [B, H, Lq, Dv], with
    H a multiple of Hkv (head h reads kv head h // (H / Hkv)).

    alpha: in [1, 2], a scalar or shape [H] (1: softmax, 1.5: entmax15, 2: sparsemax).
    span: None, or the span z >= 0 in tokens, a scalar or shape [H]; ramp R > 0: the soft mask
      m = clip((R + z - |d|) / R, 0, 1) over the distance d = i + q_offset - j weights the keys
      inside the entmax (not after it), so the output is continuous in z.
    causal: allow only keys with d >= 0. key_lengths [B]: allow only keys j < key_lengths[b].
    key_padding_mask: None, or a boolean [B, Lk] array (True: key j of batch b may be read); a
      masked key is excluded as one beyond key_lengths is (left padding); distances still count
      slots, d = i + q_offset - j.
    q_offset: int or [B]; default Lk - Lq (bottom-right alignment, as for a KV cache).
    scale: default 1/sqrt(D).
    backend: run on this backend (by name) or raise; None lets the dispatcher choose.
    """
    kwargs = dict(alpha=alpha, span=span, ramp=ramp, causal=causal, key_lengths=key_lengths,
                  q_offset=q_offset, scale=scale)
    if key_padding_mask is not None:  # only kernels that declare the feature ever receive it
        kwargs["key_padding_mask"] = key_padding_mask
    return _dispatch("attention", (q, k, v), kwargs, backend)


def entmax(x, alpha, axis=-1, weights=None, *, backend=None):
    """Weighted alpha-entmax along `axis`: p_j = w_j [(alpha-1) x_j - tau]_+^(1/(alpha-1)), with
    tau such that the row sums to 1. alpha is a scalar in [1, 2] or broadcasts against x with
    size 1 on `axis`; weights (finite, >= 0) broadcast against x. Entries with x = -inf or
    weight 0 get 0; a row with none left gives zeros."""
    return _dispatch("entmax", (x, alpha), dict(axis=axis, weights=weights), backend)


def softmax(x, axis=-1, weights=None, *, backend=None):
    """entmax with alpha = 1: softmax(x + log weights)."""
    return entmax(x, 1.0, axis=axis, weights=weights, backend=backend)


def sparsemax(x, axis=-1, weights=None, *, backend=None):
    """entmax with alpha = 2."""
    return entmax(x, 2.0, axis=axis, weights=weights, backend=backend)


def entmax15(x, axis=-1, weights=None, *, backend=None):
    """entmax with alpha = 1.5."""
    return entmax(x, 1.5, axis=axis, weights=weights, backend=backend)


def span_mask(Lq, Lk, span, ramp, q_offset=None, *, backend=None):
    """The soft span mask m = clip((R + z - |d|) / R, 0, 1), shape [*B, *H, Lq, Lk] (B when
    q_offset is an array [B], H when span is an array [H]), in span's array type."""
    return _dispatch("span_mask", (Lq, Lk, span, ramp), dict(q_offset=q_offset), backend)


def explain(*args, op="attention", backend=None, **kwargs) -> selection.Decision:
    """Which backend would run this call, and why each other one would not.

    Takes the op's own arguments: explain(q, k, v, alpha=1.5, causal=True), or
    explain(x, 1.5, op="entmax"). Malformed arguments raise as the op would; a call that no
    backend can run returns a Decision with selected=None (print it to read the reasons).
    """
    if op not in validation.VALIDATORS:
        raise ValueError(f"op='{op}' is not an attnspec op (ops: {', '.join(validation.VALIDATORS)})")
    call = validation.VALIDATORS[op](*args, **kwargs)
    return selection.decide(call, backend, explain=True)
