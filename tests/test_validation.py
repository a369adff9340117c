"""The validation layer: every malformed call raises a ValueError/TypeError naming the argument,
what is allowed and what it received (SPEC.md section 7)."""

import numpy as np
import pytest

import attnspec
from attnspec import validation


def qkv(B=2, H=4, Hkv=2, Lq=3, Lk=5, D=4, Dv=4, dtype=np.float32):
    return (np.zeros((B, H, Lq, D), dtype), np.zeros((B, Hkv, Lk, D), dtype), np.zeros((B, Hkv, Lk, Dv), dtype))


@pytest.mark.parametrize("change, error, message", [
    (dict(q=[[1.0]]), TypeError, "q must be an array"),
    (dict(q=np.zeros((2, 4, 3))), ValueError, r"q must have shape \[B, H, Lq, D\]; got shape \[2, 4, 3\]"),
    (dict(k=np.zeros((3, 2, 5, 4), np.float32)), ValueError, "one batch size B; got q: 2, k: 3"),
    (dict(v=np.zeros((2, 2, 6, 4), np.float32)), ValueError, "must agree on Hkv and Lk"),
    (dict(k=np.zeros((2, 2, 5, 3), np.float32)), ValueError, "one head dim D; got q: 4, k: 3"),
    (dict(k=np.zeros((2, 3, 5, 4), np.float32), v=np.zeros((2, 3, 5, 4), np.float32)), ValueError,
     "H=4 must be a positive multiple of the number of key/value heads Hkv=3"),
    (dict(q=np.zeros((2, 4, 3, 4), np.int32)), TypeError, r"q.dtype=int32 is not supported \(supported: float16"),
    (dict(v=np.zeros((2, 2, 5, 4), np.float64)), TypeError, "one dtype; got q: float32, k: float32, v: float64"),
    (dict(alpha=0.5), ValueError, r"alpha must lie in \[1, 2\]"),
    (dict(alpha=2.0000001), ValueError, r"alpha must lie in \[1, 2\]"),
    (dict(alpha=float("nan")), ValueError, r"alpha must lie in \[1, 2\] and be finite"),
    (dict(alpha=np.ones(3)), ValueError, r"alpha must be a scalar or have shape \[H\]=\[4\]; got shape \[3\]"),
    (dict(alpha=[1.5] * 4), TypeError, "alpha must be a Python number or a numpy array"),
    (dict(span=-1.0), ValueError, "span must be finite and >= 0"),
    (dict(span=np.array([1, 2, np.inf, 3.0])), ValueError, "span must be finite and >= 0; got \\[inf\\]"),
    (dict(span=np.ones((4, 1))), ValueError, r"span must be a scalar or have shape \[H\]"),
    (dict(ramp=0.0), ValueError, "ramp must be > 0; got 0.0"),
    (dict(ramp=float("inf")), ValueError, "ramp must be finite"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(key_lengths=np.array([1, 6])), ValueError, r"key_lengths must lie in \[0, Lk\]=\[0, 5\]; got \[1, 6\]"),
    (dict(key_lengths=np.array([-1, 2])), ValueError, r"key_lengths must lie in \[0, Lk\]"),
    (dict(key_lengths=np.array([1.0, 2.0])), TypeError, "key_lengths must hold integers"),
    (dict(key_lengths=np.array([1])), ValueError, r"key_lengths must have shape \[B\]=\[2\]"),
    (dict(q_offset=1.5), TypeError, "q_offset must be an integer"),
    (dict(q_offset=True), TypeError, "q_offset must be a number or an array, not bool"),
    (dict(q_offset=np.array([1, 2, 3])), ValueError, r"q_offset must be an integer or have shape \[B\]=\[2\]"),
    (dict(q_offset=2**70), ValueError, r"q_offset must lie in \(-2\*\*62, 2\*\*62\)"),
])
def test_malformed_attention_calls(change, error, message):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    kwargs = {}
    for name, value in change.items():
        (args if name in args else kwargs)[name] = value
    with pytest.raises(error, match=message):
        attnspec.attention(args["q"], args["k"], args["v"], **kwargs)
    # The reference validates identically when called directly.
    with pytest.raises(error, match=message):
        attnspec.reference.attention(args["q"], args["k"], args["v"], **kwargs)


def test_valid_edge_values():
    q, k, v = qkv()
    for kwargs in (dict(alpha=1), dict(alpha=2), dict(span=0.0), dict(q_offset=-100),
                   dict(q_offset=np.array([-3, 10**6])), dict(key_lengths=np.array([0, 5])),
                   dict(alpha=np.float32(1.5)), dict(scale=-0.5), dict(causal=np.bool_(True))):
        attnspec.attention(q, k, v, **kwargs)
    attnspec.attention(*qkv(Lq=0, Lk=0))  # empty sequences are valid
    attnspec.attention(*qkv(B=0))


def test_mixed_frameworks_are_rejected():
    torch = pytest.importorskip("torch")
    q, k, v = qkv()
    with pytest.raises(TypeError, match="one framework; got q: numpy, k: torch, v: numpy"):
        attnspec.attention(q, torch.zeros(2, 2, 5, 4), v)
    with pytest.raises(TypeError, match="alpha must be a Python number or a torch array like q; got a numpy array"):
        attnspec.attention(*(torch.zeros(x.shape) for x in (q, k, v)), alpha=np.float64(1.5) * np.ones(4))


def test_call_info_describes_the_call():
    q, k, v = qkv()
    info = validation.validate_attention(q, k, v, alpha=np.full(4, 1.5), span=2.0, causal=True,
                                         key_lengths=np.array([5, 5]))
    assert info.features == {"entmax", "alpha_per_head", "span", "causal", "key_lengths", "gqa"}
    assert info.sizes == dict(B=2, H=4, Hkv=2, Lq=3, Lk=5, D=4, Dv=4, scores=2 * 4 * 3 * 5)
    assert (info.array_type, info.device, info.dtype) == ("numpy", "cpu", "float32")
    plain = validation.validate_attention(*qkv(Hkv=4), alpha=1.0)
    assert plain.features == frozenset()


def test_torch_values_are_checked_on_cpu_and_grad_features_recorded():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.zeros(x.shape, requires_grad=True) for x in qkv())
    with pytest.raises(ValueError, match=r"alpha must lie in \[1, 2\]"):
        validation.validate_attention(q, k, v, alpha=torch.tensor(2.5))
    span = torch.ones(4, requires_grad=True)
    info = validation.validate_attention(q, k, v, alpha=torch.tensor(1.5, requires_grad=True), span=span)
    assert {"grad", "alpha_grad", "span_grad"} <= info.features
    assert info.dtype == "float32" and info.array_type == "torch"


def test_values_are_not_read_from_meta_tensors():
    """Traced/meta values have no concrete value: shape checks run, value checks are skipped."""
    torch = pytest.importorskip("torch")
    q, k, v = (torch.zeros(x.shape, device="meta") for x in qkv())
    info = validation.validate_attention(q, k, v, alpha=torch.tensor(7.0, device="meta"))
    assert info.device == "meta"
    with pytest.raises(ValueError, match="alpha must be a scalar or have shape"):
        validation.validate_attention(q, k, v, alpha=torch.ones(3, device="meta"))


@pytest.mark.parametrize("call, error, message", [
    (lambda: attnspec.entmax(np.zeros(3), 0.9), ValueError, r"alpha must lie in \[1, 2\]"),
    (lambda: attnspec.entmax(np.zeros((2, 3)), np.ones(3) * 1.5), ValueError, "size 1 on axis -1"),
    (lambda: attnspec.entmax(np.zeros((2, 3)), np.ones((4, 1))), ValueError, "must broadcast against x"),
    (lambda: attnspec.entmax(np.zeros(3), 1.5, axis=1), ValueError, "axis=1 is out of range"),
    (lambda: attnspec.entmax(np.zeros(3), 1.5, weights=-np.ones(3)), ValueError, "weights must be finite and >= 0"),
    (lambda: attnspec.entmax(np.zeros(3, np.int64), 1.5), TypeError, "x.dtype=int64"),
    (lambda: attnspec.entmax(np.zeros(3), 1.5, weights=np.array(["1", "2", "0"])), TypeError,
     "weights must hold real numbers"),
    (lambda: attnspec.entmax(np.array(1.0), 1.5), ValueError, "at least one dimension"),
    (lambda: attnspec.span_mask(-1, 3, 1.0, 1.0), ValueError, "Lq must be an integer >= 0"),
    (lambda: attnspec.span_mask(2, 3, -1.0, 1.0), ValueError, "span must be finite and >= 0"),
    (lambda: attnspec.span_mask(2, 3, 1.0, -1.0), ValueError, "ramp must be > 0"),
    (lambda: attnspec.span_mask(2, 3, np.ones((2, 2)), 1.0), ValueError, "span must be a scalar or have shape"),
])
def test_malformed_standalone_calls(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("mask, error, message", [
    (np.ones((2, 4), bool), ValueError, r"key_padding_mask must have shape \[B, Lk\]=\[2, 5\]; got shape \[2, 4\]"),
    (np.ones((2, 5), np.int64), TypeError, "key_padding_mask.dtype=int64: key_padding_mask must hold booleans"),
    ([[True] * 5] * 2, TypeError, "key_padding_mask must be a boolean numpy array"),
])
def test_malformed_key_padding_mask(mask, error, message):
    q, k, v = qkv()
    with pytest.raises(error, match=message):
        attnspec.attention(q, k, v, key_padding_mask=mask)
    with pytest.raises(error, match=message):
        attnspec.reference.attention(q, k, v, key_padding_mask=mask)


def test_key_padding_mask_is_a_feature_and_of_q_framework():
    torch = pytest.importorskip("torch")
    q, k, v = qkv()
    info = attnspec.validation.validate_attention(q, k, v, key_padding_mask=np.ones((2, 5), bool))
    assert "key_padding_mask" in info.features
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    with pytest.raises(TypeError, match="key_padding_mask must be a torch array like q; got a numpy array"):
        attnspec.attention(tq, tk, tv, key_padding_mask=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match=r"key_padding_mask must be on q's device \(cpu\); got device meta"):
        attnspec.attention(tq, tk, tv, key_padding_mask=torch.ones((2, 5), dtype=torch.bool, device="meta"))
