"""The one validation layer: every backend's call passes through here before dispatch.

Each function checks shapes, dtypes and (where they can be read cheaply) values, raises a
ValueError or TypeError that names the argument, the expectation and what it received, and
returns a `CallInfo`: the framework-neutral description of the call that capability checks read.

Where value checks run (SPEC.md, "Validation"): Python numbers and NumPy arrays always; CPU
arrays of other frameworks when they are not being traced; arrays on an accelerator only under
ATTNSPEC_VALIDATE=full (reading them would wait for the device); traced values never (jit,
torch.compile), where a backend may express them as the framework's own checks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np

from . import _arrays
from ._arrays import FLOAT_DTYPES
from .geometry import MAX_OFFSET
from .precision import compute_dtype


@dataclass(frozen=True)
class CallInfo:
    """What a capability check needs to know about a call, read from its arguments.

    features: names of the optional parts of SPEC.md the call uses (see FEATURES).
    sizes: named sizes, e.g. B, H, Hkv, Lq, Lk, D, Dv and scores = B*H*Lq*Lk for attention.
    alpha: the call's alpha when it can be read cheaply (see `_arrays.concrete_value`): a float
        for a scalar, the sorted distinct values (a tuple of floats) for an array; None when it
        cannot be read (traced under jit or torch.compile, or on an accelerator without
        ATTNSPEC_VALIDATE=full). A kernel that declares the alphas it runs refuses None.
    """

    op: str
    array_type: str
    device: str
    dtype: str
    features: frozenset = frozenset()
    sizes: dict = field(default_factory=dict)
    alpha: float | tuple | None = None

    @classmethod
    def _trusted(cls, op, array_type, device, dtype, features, sizes, alpha=None):
        """The validators' constructor: the frozen dataclass's __init__ sets each field through
        object.__setattr__, which costs more than the rest of a fast validation."""
        self = object.__new__(cls)
        self.__dict__.update(op=op, array_type=array_type, device=device, dtype=dtype, features=features,
                             sizes=sizes, alpha=alpha)
        return self


#: Optional parts of SPEC.md a call may use, per op. Kernels declare the subset they support.
FEATURES = {
    "attention": (
        "entmax",  # alpha is not known to be exactly 1
        "alpha_per_head",
        "span",
        "span_per_head",
        "causal",
        "key_lengths",
        "key_padding_mask",  # a boolean [B, Lk] mask of readable keys (SPEC.md 5.1)
        "q_offset",
        "gqa",
        "grad",  # some input asks for a gradient (frameworks with requires_grad)
        "alpha_grad",
        "span_grad",
    ),
    "entmax": ("entmax", "alpha_array", "weights", "grad", "alpha_grad", "weights_grad"),
    "span_mask": ("span_per_head", "q_offset", "grad"),
    # The per-block operations of SPEC.md section 10 (attnspec.reference.partial): what a
    # block's keys may be restricted by.
    "partial": ("entmax", "span", "causal", "key_lengths", "key_padding_mask", "q_offset", "gqa"),
}


def _type_name(x) -> str:
    return _arrays.array_type(x) or type(x).__name__


# The hot path. Every op validates every call, so the common cases (Python numbers, arrays of
# a type seen before) avoid numpy and abstract-base-class isinstance checks, which cost
# microseconds each. Each fast path only accepts what the general code would accept; anything
# else (including every error) goes through the general code, so messages are unchanged.

_ARRAY_TYPES: dict = {}  # type -> _arrays.array_type() (it depends on the type alone)
_DTYPE_NAMES: dict = {}  # dtype object -> _arrays.dtype_name()


def _array_type(x):
    cls = type(x)
    try:
        return _ARRAY_TYPES[cls]
    except KeyError:
        kind = _ARRAY_TYPES[cls] = _arrays.array_type(x)
        return kind


def _dtype_name(x) -> str:
    dtype = x.dtype
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype object
        name = _arrays.dtype_name(x)
        try:
            _DTYPE_NAMES[dtype] = name
        except TypeError:
            pass
        return name


def _is_number(x) -> bool:
    """A plain Python float or int (bool excluded): the usual alpha, span, ramp, scale."""
    cls = type(x)
    return cls is float or cls is int


def _shape(x) -> tuple:
    if _is_number(x):
        return ()
    if _is_array_fast(x):
        shape = x.shape
        # A NumPy shape is a tuple of ints already; torch.Size and JAX shapes are converted
        # (int() also makes symbolic sizes concrete, as _arrays.shape_of does).
        return shape if type(x) is np.ndarray else tuple(map(int, shape))
    return _arrays.shape_of(x)


def _is_array_fast(x) -> bool:
    return _array_type(x) is not None and _arrays.is_array(x)


def _require_array(name, x):
    if not _arrays.is_array(x):
        hint = ""
        if isinstance(x, (list, tuple)) or _is_number(x):
            hint = (f" (convert it first: np.asarray({name}, dtype=np.float32), torch.tensor({name}) "
                    f"or jnp.asarray({name}))")
        raise TypeError(f"{name} must be an array with .shape and .dtype; got {type(x).__name__}{hint}")


def _require_float_dtype(name, x):
    dtype = _dtype_name(x)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}.dtype={dtype} is not supported (supported: {', '.join(FLOAT_DTYPES)})"
        )
    return dtype


def _check_parameter_kind(name, x, array_type, *, integer):
    """x is a Python number or an array of the inputs' framework, of a real dtype."""
    if x is None:
        return
    cls = type(x)
    if cls is int or (cls is float and not integer):
        return
    if isinstance(x, bool) or isinstance(x, np.bool_):
        raise TypeError(f"{name} must be a number or an array, not bool ({x!r})")
    if isinstance(x, (Integral, Real)):
        if integer and not isinstance(x, Integral):
            raise TypeError(f"{name} must be an integer or an integer array; got {x!r}")
        return
    if not _arrays.is_array(x):
        raise TypeError(
            f"{name} must be a Python number or a {array_type} array; got {type(x).__name__}"
        )
    kind = _array_type(x)
    if kind != array_type:
        raise TypeError(
            f"{name} must be a Python number or a {array_type} array like q; got a {kind} array"
        )
    dtype = _dtype_name(x)
    if integer and not (dtype.startswith("int") or dtype.startswith("uint")):
        raise TypeError(f"{name}.dtype={dtype}: {name} must hold integers")
    if not integer and dtype not in FLOAT_DTYPES and not dtype.startswith(("int", "uint")):
        raise TypeError(f"{name}.dtype={dtype}: {name} must hold real numbers")


def _check_scalar_or_heads(name, x, H):
    """alpha and span: shape [] or [H]; anything else raises."""
    shape = _shape(x)
    if shape not in ((), (H,)):
        raise ValueError(f"{name} must be a scalar or have shape [H]=[{H}]; got shape {list(shape)}")
    return shape


def _check_finite_number(name, x, *, positive=False):
    # An int is finite, and compares with 0 without overflowing a float.
    if _is_number(x) and (type(x) is int or math.isfinite(x)) and (not positive or x > 0):
        return
    value = _arrays.concrete_value(x)
    if value is None:
        return
    if _shape(x) != ():
        raise ValueError(f"{name} must be a scalar; got shape {list(_shape(x))}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite; got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}")


def _check_range(name, x, low, high, rule):
    """Every concrete value of x is finite and in [low, high]; `rule` words the error."""
    if _is_number(x) and low <= x <= high and (type(x) is int or math.isfinite(x)):
        return
    value = _arrays.concrete_value(x)
    if value is None:
        return
    value = np.asarray(value, dtype=np.float64)
    bad = ~(np.isfinite(value) & (value >= low) & (value <= high))
    if bad.any():
        raise ValueError(f"{name} must {rule}; got {value[bad].ravel()[:4].tolist()}")


def _check_alpha_values(alpha):
    _check_range("alpha", alpha, 1.0, 2.0, "lie in [1, 2] and be finite")


def _check_span_values(span):
    _check_range("span", span, 0.0, np.inf, "be finite and >= 0")


def _device_key(x):
    """Where an array's data lives, exactly ('cuda:1', 'cpu', 'meta'), or None for numbers,
    NumPy arrays and frameworks that place arrays themselves (jax)."""
    if _array_type(x) != "torch":
        return None
    return str(x.device)


def _check_devices(arrays: dict, parameters: dict) -> None:
    """Every tensor of a call on one device (SPEC.md 7). `arrays` must agree exactly; a
    parameter (alpha, span, key_lengths, ...) too, except a 0-dim CPU tensor for alpha or span,
    which torch itself accepts beside CUDA tensors."""
    keys = {name: _device_key(x) for name, x in arrays.items()}
    present = {n: d for n, d in keys.items() if d is not None}
    if len(set(present.values())) > 1:
        got = ", ".join(f"{n} on {d}" for n, d in present.items())
        raise ValueError(f"{', '.join(present)} must be on one device; got {got}")
    if not present:
        return
    first, device = next(iter(present.items()))
    for name, x in parameters.items():
        key = _device_key(x) if x is not None and not _is_number(x) else None
        if key is None or key == device:
            continue
        if name in ("alpha", "span") and key == "cpu" and _shape(x) == ():
            continue
        raise ValueError(
            f"{name} is on {key} but {first} is on {device}: move {name} to {device} "
            f"(only a 0-dim CPU tensor may stand for alpha or span on another device)"
        )


#: The largest finite value of each compute dtype (SPEC.md 6: float64 inputs compute in
#: float64, every other dtype in float32).
_COMPUTE_MAX = {"float64": float(np.finfo(np.float64).max), "float32": float(np.finfo(np.float32).max)}


def _in_compute_dtype(x, dtype: str):
    """The concrete values of a number or array as the compute dtype holds them, or None."""
    value = x if _is_number(x) else _arrays.concrete_value(x)
    if value is None:
        return None
    with np.errstate(over="ignore"):
        return np.asarray(value, dtype=np.float64).astype(compute_dtype(dtype))


def _check_representable(dtype: str, ramp, span, scale) -> None:
    """SPEC.md 7: z, R and scale are cast to the compute dtype (section 6); a value that is not
    finite there, an R that rounds to 0 or whose 1/R overflows, or an R + z that overflows, would
    give wrong numbers, so it is refused."""
    cdt = compute_dtype(dtype)
    biggest = _COMPUTE_MAX[cdt]
    if (_is_number(ramp) and 1.0 / biggest < ramp <= biggest and (span is None or (
            _is_number(span) and span + ramp <= biggest)) and (scale is None or (
            _is_number(scale) and -biggest <= scale <= biggest))):
        return  # the usual numbers: nothing to cast
    where = f"in {cdt}, the compute dtype of {dtype} inputs (SPEC.md 6)"
    for name, x in (("ramp", ramp), ("span", span), ("scale", scale)):
        value = None if x is None else _in_compute_dtype(x, dtype)
        if value is not None and not np.isfinite(value).all():
            raise ValueError(f"{name}={_plain(x)} is not finite {where}")
    R = None if ramp is None else _in_compute_dtype(ramp, dtype)
    if R is None:
        return
    with np.errstate(over="ignore", divide="ignore"):
        if (R == 0).any() or not np.isfinite(np.asarray(1, R.dtype) / R).all():
            raise ValueError(f"ramp={_plain(ramp)} is too small {where}: 1/R overflows")
        z = None if span is None else _in_compute_dtype(span, dtype)
        if z is not None and not np.isfinite(R + z).all():
            raise ValueError(f"span + ramp = {_plain(span)} + {_plain(ramp)} is not finite {where}")


def _plain(x):
    if _is_number(x):
        return x
    value = _arrays.concrete_value(x)
    return x if value is None else np.asarray(value).ravel()[:4].tolist()


def _check_offset_range(q_offset):
    value = q_offset if isinstance(q_offset, Integral) else _arrays.concrete_value(q_offset)
    if value is None:
        return
    if isinstance(value, Integral):
        bad = abs(int(value)) >= MAX_OFFSET
    else:
        bad = bool(np.any(np.abs(np.asarray(value, dtype=object)) >= MAX_OFFSET))
    if bad:
        raise ValueError(f"q_offset must lie in (-2**62, 2**62); got {value}")


def _alpha_value(alpha):
    """CallInfo.alpha: a float, the sorted distinct values of an array, or None (unreadable)."""
    if _is_number(alpha) or isinstance(alpha, (Integral, Real)):
        return float(alpha)
    value = _arrays.concrete_value(alpha)
    if value is None:
        return None
    value = np.asarray(value, dtype=np.float64)
    if value.ndim == 0:
        return float(value)
    return tuple(float(a) for a in np.unique(value))


def _may_differ_from_one(alpha_value) -> bool:
    """From CallInfo.alpha: whether alpha may be other than 1 (unknown values may)."""
    if alpha_value is None:
        return True
    if isinstance(alpha_value, float):
        return alpha_value != 1.0
    return any(a != 1.0 for a in alpha_value)


def _fast_device(x, kind) -> str:
    if kind == "numpy":
        return "cpu"
    if kind == "torch" and x.is_cpu:  # x.device builds a torch.device object, dearer than this check
        return "cpu"
    return _arrays.device_of(x)


def _fast_attention(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale):
    """The common well-formed call, checked without the general code's generality: concrete
    arrays of one known class, parameters given as Python numbers. Returns None (never raises)
    for anything else, which then goes through the general checks and their messages."""
    cls = type(q)
    if type(k) is not cls or type(v) is not cls or type(causal) is not bool or key_lengths is not None:
        return None
    kind = _array_type(q)
    if kind not in ("numpy", "torch", "jax") or not _is_number(alpha) or not _is_number(ramp):
        return None
    if kind == "torch" and not (q.is_cpu and k.is_cpu and v.is_cpu):
        return None  # the general path compares devices
    if not (1 <= alpha <= 2) or not ramp > 0 or alpha != alpha or ramp == math.inf:
        return None
    if span is not None and (not _is_number(span) or not 0 <= span < math.inf):
        return None
    if scale is not None and (not _is_number(scale) or not -math.inf < scale < math.inf):
        return None
    if q_offset is not None and (type(q_offset) is not int or not -MAX_OFFSET < q_offset < MAX_OFFSET):
        return None
    if kind == "jax" and _arrays.is_traced(q):
        return None
    try:
        B, H, Lq, D = q.shape
        Bk, Hkv, Lk, Dk = k.shape
        Bv, Hv, Lv, Dv = v.shape
    except (TypeError, ValueError):
        return None
    dtype = _dtype_name(q)
    if (Bk != B or Bv != B or Hv != Hkv or Lv != Lk or Dk != D or D < 1 or Hkv < 1 or H < 1 or H % Hkv
            or dtype not in FLOAT_DTYPES or _dtype_name(k) != dtype or _dtype_name(v) != dtype):
        return None
    biggest = _COMPUTE_MAX["float64" if dtype == "float64" else "float32"]
    if not (1.0 / biggest < ramp <= biggest) or (span is not None and span + ramp > biggest) or (
            scale is not None and not -biggest <= scale <= biggest):
        return None
    B, H, Hkv, Lq, Lk, D, Dv = int(B), int(H), int(Hkv), int(Lq), int(Lk), int(D), int(Dv)
    features = set()
    if alpha != 1:
        features.add("entmax")
    if span is not None:
        features.add("span")
    if causal:
        features.add("causal")
    if q_offset is not None:
        features.add("q_offset")
    if Hkv != H:
        features.add("gqa")
    if kind == "torch" and (q.requires_grad or k.requires_grad or v.requires_grad):
        features.add("grad")
    return CallInfo._trusted(
        "attention", kind, _fast_device(q, kind), dtype, frozenset(features),
        dict(B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, scores=B * H * Lq * Lk), float(alpha),
    )


def _check_key_padding_mask(mask, array_type, q, B, Lk):
    """A boolean [B, Lk] array of q's framework, on q's device (True: the key may be read)."""
    if not _arrays.is_array(mask):
        raise TypeError(f"key_padding_mask must be a boolean {array_type} array [B, Lk]; got {type(mask).__name__}")
    kind = _array_type(mask)
    if kind != array_type:
        raise TypeError(f"key_padding_mask must be a {array_type} array like q; got a {kind} array")
    dtype = _arrays.dtype_name(mask)
    if dtype != "bool":
        raise TypeError(f"key_padding_mask.dtype={dtype}: key_padding_mask must hold booleans "
                        "(True: the key may be read)")
    if _shape(mask) != (B, Lk):
        raise ValueError(f"key_padding_mask must have shape [B, Lk]=[{B}, {Lk}]; got shape {list(_shape(mask))}")
    if array_type == "torch":  # the index matters too (cuda:0 vs cuda:1)
        device, q_device = str(mask.device), str(q.device)
    else:
        device, q_device = _arrays.device_of(mask), _arrays.device_of(q)
    if device != q_device:
        raise ValueError(f"key_padding_mask must be on q's device ({q_device}); got device {device}")


def validate_attention(
    q,
    k,
    v,
    *,
    alpha=1.0,
    span=None,
    ramp=32.0,
    causal=False,
    key_lengths=None,
    q_offset=None,
    scale=None,
    key_padding_mask=None,
) -> CallInfo:
    """Check an attention call against SPEC.md; raise ValueError/TypeError or describe it."""
    if key_padding_mask is None:
        info = _fast_attention(q, k, v, alpha, span, ramp, causal, key_lengths, q_offset, scale)
        if info is not None:
            return info
    for name, x in (("q", q), ("k", k), ("v", v)):
        _require_array(name, x)
    kinds = {name: _array_type(x) for name, x in (("q", q), ("k", k), ("v", v))}
    if len(set(kinds.values())) != 1:
        got = ", ".join(f"{n}: {t}" for n, t in kinds.items())
        raise TypeError(f"q, k and v must be arrays of one framework; got {got}")
    array_type = kinds["q"]

    shapes = {"q": _shape(q), "k": _shape(k), "v": _shape(v)}
    layouts = {"q": "[B, H, Lq, D]", "k": "[B, Hkv, Lk, D]", "v": "[B, Hkv, Lk, Dv]"}
    for name, shape in shapes.items():
        if len(shape) != 4:
            raise ValueError(f"{name} must have shape {layouts[name]}; got shape {list(shape)}")
    dtypes = {name: _require_float_dtype(name, x) for name, x in (("q", q), ("k", k), ("v", v))}
    if len(set(dtypes.values())) != 1:
        got = ", ".join(f"{n}: {t}" for n, t in dtypes.items())
        raise TypeError(f"q, k and v must have one dtype; got {got}")

    B, H, Lq, D = shapes["q"]
    Bk, Hkv, Lk, Dk = shapes["k"]
    Bv, Hv, Lv, Dv = shapes["v"]
    if Bk != B or Bv != B:
        raise ValueError(f"q, k and v must have one batch size B; got q: {B}, k: {Bk}, v: {Bv}")
    if Hv != Hkv or Lv != Lk:
        raise ValueError(
            f"k [B, Hkv, Lk, D] and v [B, Hkv, Lk, Dv] must agree on Hkv and Lk; "
            f"got k shape {list(shapes['k'])}, v shape {list(shapes['v'])}"
        )
    if Dk != D:
        raise ValueError(f"q and k must have one head dim D; got q: {D}, k: {Dk}")
    if D < 1:
        raise ValueError(f"the head dim D must be >= 1; got {D}")
    if Hkv < 1 or H < 1 or H % Hkv != 0:
        raise ValueError(
            f"the number of query heads H={H} must be a positive multiple of the number of "
            f"key/value heads Hkv={Hkv}"
        )
    _check_devices({"q": q, "k": k, "v": v}, {"alpha": alpha, "span": span, "ramp": ramp, "scale": scale,
                                              "key_lengths": key_lengths, "q_offset": q_offset})

    _check_parameter_kind("alpha", alpha, array_type, integer=False)
    _check_scalar_or_heads("alpha", alpha, H)
    _check_alpha_values(alpha)
    if span is not None:
        _check_parameter_kind("span", span, array_type, integer=False)
        _check_scalar_or_heads("span", span, H)
        _check_span_values(span)
    _check_parameter_kind("ramp", ramp, array_type, integer=False)
    _check_finite_number("ramp", ramp, positive=True)
    if scale is not None:
        _check_parameter_kind("scale", scale, array_type, integer=False)
        _check_finite_number("scale", scale)
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool; got {type(causal).__name__}")
    _check_representable(dtypes["q"], ramp, span, scale)

    if key_lengths is not None:
        _check_parameter_kind("key_lengths", key_lengths, array_type, integer=True)
        if _shape(key_lengths) != (B,):
            raise ValueError(
                f"key_lengths must have shape [B]=[{B}]; got shape {list(_shape(key_lengths))}"
            )
        value = _arrays.concrete_value(key_lengths)
        if value is not None and ((value < 0) | (value > Lk)).any():
            raise ValueError(f"key_lengths must lie in [0, Lk]=[0, {Lk}]; got {np.asarray(value).tolist()}")
    if q_offset is not None:
        _check_parameter_kind("q_offset", q_offset, array_type, integer=True)
        if _shape(q_offset) not in ((), (B,)):
            raise ValueError(
                f"q_offset must be an integer or have shape [B]=[{B}]; "
                f"got shape {list(_shape(q_offset))}"
            )
        _check_offset_range(q_offset)
    if key_padding_mask is not None:
        _check_key_padding_mask(key_padding_mask, array_type, q, B, Lk)

    features = set()
    alpha_value = _alpha_value(alpha)
    if _may_differ_from_one(alpha_value):
        features.add("entmax")
    if _shape(alpha) == (H,):
        features.add("alpha_per_head")
    if span is not None:
        features.add("span")
        if _shape(span) == (H,):
            features.add("span_per_head")
    if causal:
        features.add("causal")
    if key_lengths is not None:
        features.add("key_lengths")
    if key_padding_mask is not None:
        features.add("key_padding_mask")
    if q_offset is not None:
        features.add("q_offset")
    if Hkv != H:
        features.add("gqa")
    if _arrays.requires_grad(alpha):
        features.add("alpha_grad")
    if span is not None and _arrays.requires_grad(span):
        features.add("span_grad")
    if features & {"alpha_grad", "span_grad"} or any(_arrays.requires_grad(x) for x in (q, k, v)):
        features.add("grad")

    return CallInfo(
        op="attention",
        array_type=array_type,
        device=_arrays.device_of(q),
        dtype=dtypes["q"],
        features=frozenset(features),
        sizes=dict(B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv, scores=B * H * Lq * Lk),
        alpha=alpha_value,
    )


def _normalise_axis(axis, ndim, name="axis"):
    if isinstance(axis, bool) or not isinstance(axis, Integral):
        raise TypeError(f"{name} must be an integer; got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}={axis} is out of range for an array of {ndim} dimensions")
    return int(axis) % ndim


def validate_entmax(x, alpha, *, axis=-1, weights=None) -> CallInfo:
    """Check a stand-alone entmax call: x floating, alpha in [1, 2] broadcasting with size 1 on
    `axis`, weights finite and >= 0 broadcasting against x."""
    _require_array("x", x)
    array_type = _arrays.array_type(x)
    dtype = _require_float_dtype("x", x)
    shape = _arrays.shape_of(x)
    if len(shape) == 0:
        raise ValueError("x must have at least one dimension")
    ax = _normalise_axis(axis, len(shape))

    _check_parameter_kind("alpha", alpha, array_type, integer=False)
    alpha_shape = _arrays.shape_of(alpha)
    try:
        broadcast = np.broadcast_shapes(alpha_shape, shape)
    except ValueError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(
            f"alpha must broadcast against x without growing it; got alpha shape "
            f"{list(alpha_shape)}, x shape {list(shape)}"
        )
    if len(alpha_shape) >= len(shape) - ax and alpha_shape[ax - len(shape)] != 1:
        raise ValueError(
            f"alpha must have size 1 on axis {axis} (one alpha per row); got alpha shape "
            f"{list(alpha_shape)}, x shape {list(shape)}"
        )
    _check_alpha_values(alpha)
    _check_devices({"x": x}, {"alpha": alpha, "weights": weights})

    features = set()
    alpha_value = _alpha_value(alpha)
    if _may_differ_from_one(alpha_value):
        features.add("entmax")
    if alpha_shape != ():
        features.add("alpha_array")
    if weights is not None:
        _require_array("weights", weights)
        if _arrays.array_type(weights) != array_type:
            raise TypeError(
                f"weights must be a {array_type} array like x; got a {_arrays.array_type(weights)} array"
            )
        try:
            ok = np.broadcast_shapes(_arrays.shape_of(weights), shape) == shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"weights must broadcast against x; got weights shape "
                f"{list(_arrays.shape_of(weights))}, x shape {list(shape)}"
            )
        weights_dtype = _arrays.dtype_name(weights)
        if weights_dtype not in FLOAT_DTYPES and not weights_dtype.startswith(("int", "uint")):
            raise TypeError(f"weights.dtype={weights_dtype}: weights must hold real numbers")
        value = _arrays.concrete_value(weights)
        if value is not None:
            value = np.asarray(value, dtype=np.float64)
            if not (np.isfinite(value) & (value >= 0)).all():
                raise ValueError("weights must be finite and >= 0")
        features.add("weights")
        if _arrays.requires_grad(weights):
            features.update(("grad", "weights_grad"))
    if _arrays.requires_grad(alpha):
        features.update(("grad", "alpha_grad"))
    if _arrays.requires_grad(x):
        features.add("grad")
    return CallInfo(
        op="entmax",
        array_type=array_type,
        device=_arrays.device_of(x),
        dtype=dtype,
        features=frozenset(features),
        sizes=dict(n=shape[ax], elements=int(np.prod(shape))),
        alpha=alpha_value,
    )


def validate_span_mask(Lq, Lk, span, ramp, *, q_offset=None) -> CallInfo:
    """Check a stand-alone span_mask call: Lq, Lk >= 0 integers; span a scalar or 1-D, finite and
    >= 0; ramp finite and > 0; q_offset an integer or an integer array of shape [B]."""
    for name, n in (("Lq", Lq), ("Lk", Lk)):
        if isinstance(n, bool) or not isinstance(n, Integral) or n < 0:
            raise ValueError(f"{name} must be an integer >= 0; got {n!r}")
    array_type = _arrays.array_type(span) or "numpy"
    _check_parameter_kind("span", span, array_type, integer=False)
    if len(_arrays.shape_of(span)) > 1:
        raise ValueError(f"span must be a scalar or have shape [H]; got shape {list(_arrays.shape_of(span))}")
    _check_span_values(span)
    _check_parameter_kind("ramp", ramp, array_type, integer=False)
    _check_finite_number("ramp", ramp, positive=True)
    _check_devices({"span": span}, {"ramp": ramp, "q_offset": q_offset})
    features = set()
    if _arrays.shape_of(span) != ():
        features.add("span_per_head")
    if q_offset is not None:
        _check_parameter_kind("q_offset", q_offset, array_type, integer=True)
        if len(_arrays.shape_of(q_offset)) > 1:
            raise ValueError(
                f"q_offset must be an integer or have shape [B]; got shape {list(_arrays.shape_of(q_offset))}"
            )
        _check_offset_range(q_offset)
        features.add("q_offset")
    if _arrays.requires_grad(span):
        features.add("grad")
    dtype = _arrays.dtype_name(span) if _arrays.is_array(span) else "float64"
    if dtype not in FLOAT_DTYPES:
        dtype = "float64"
    _check_representable(dtype, ramp, span, None)
    return CallInfo(
        op="span_mask",
        array_type=array_type,
        device=_arrays.device_of(span),
        dtype=dtype,
        features=frozenset(features),
        sizes=dict(Lq=int(Lq), Lk=int(Lk)),
    )


#: The validator of each public op, by op name (the dispatcher's `op` strings).
VALIDATORS = {
    "attention": validate_attention,
    "entmax": validate_entmax,
    "span_mask": validate_span_mask,
}
