"""How the suite talks to each array type: make arrays, read them back, differentiate.

One adapter per framework, imported lazily. NumPy has no autograd, so a NumPy kernel's
gradients come from its declared `vjp` (the reference's signature); frameworks with autograd
(torch, jax) differentiate the op called through the dispatcher with `backend=`, so that a
call asking for a gradient the kernel does not declare is refused as it would be for a user.
Only the inputs named in `wrt` (the kernel's declared gradients) are differentiated; a
gradient the framework leaves as None comes back as None (a declared gradient missing).
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np



class GradientsUnsupported(Exception):
    """The kernel offers no way to differentiate it (no autograd and no declared vjp)."""


#: The feature a kernel on an autograd framework declares to provide each gradient, per op.
_GRADIENT_FEATURE = {
    "attention": {"q": "grad", "k": "grad", "v": "grad", "alpha": "alpha_grad", "span": "span_grad"},
    "entmax": {"x": "grad", "alpha": "alpha_grad", "weights": "weights_grad"},
    "span_mask": {"span": "grad"},
}


def declared(kernel, wrt):
    """The inputs of wrt whose gradients an autograd kernel declares (its gradient features):
    the only ones differentiated, since asking for another would check a gradient the kernel
    never offered (and a kernel that refuses it would fail as 'declared but refused')."""
    features = kernel.capabilities.features
    names = [n for n in wrt if _GRADIENT_FEATURE.get(kernel.op, {}).get(n) in features]
    if not names:
        raise GradientsUnsupported(f"the {kernel.op} kernel declares no gradient features")
    return names


class NumpyFramework:
    name = "numpy"

    def available_dtypes(self):
        extra = ("bfloat16",) if importlib.util.find_spec("ml_dtypes") else ()
        return ("float16",) + extra + ("float32", "float64")

    def default_device(self, devices):
        return "cpu"

    def _dtype(self, dtype):
        if dtype == "bfloat16":
            return importlib.import_module("ml_dtypes").bfloat16
        return np.dtype(dtype)

    def array(self, x, dtype, device):
        return np.asarray(x).astype(self._dtype(dtype))

    def param(self, value, dtype, device):
        """alpha/span in the forms users pass them: Python numbers stay numbers; arrays become
        arrays of the input dtype (never a wider one, whose promotion would choose the path)."""
        if value is None or not isinstance(value, np.ndarray):
            return value
        return value.astype(self._dtype(dtype))

    def integers(self, value, device):
        return value if value is None or not isinstance(value, np.ndarray) else value.astype(np.int64)

    def to_numpy(self, x):
        return np.asarray(np.asarray(x), dtype=np.float64)

    def vjp(self, kernel, args: dict, static: dict, cotangent, wrt, backend):
        """(out, {name: gradient or None}) for the inputs named in wrt: the op runs through the
        dispatcher (backend=), its gradients come from the kernel's declared vjp."""
        out = _op(kernel.op)(**args, **static, backend=backend)
        if kernel.vjp is None:
            raise GradientsUnsupported(f"the {kernel.op} kernel declares no vjp")
        grads = _numpy_vjp(kernel, args, static, cotangent)
        return out, {name: grads.get(name) for name in wrt}


def _op(name):
    from attnspec import api

    return getattr(api, name)


def _numpy_vjp(kernel, args, static, cotangent):
    if kernel.op == "attention":
        g = kernel.vjp(args["q"], args["k"], args["v"], cotangent,
                       **{n: a for n, a in args.items() if n not in ("q", "k", "v")}, **static)
        return {"q": g.dq, "k": g.dk, "v": g.dv, "alpha": g.dalpha, "span": g.dspan}
    if kernel.op == "entmax":
        dx, dalpha, dweights = kernel.vjp(args["x"], args["alpha"], cotangent, axis=static["axis"],
                                          weights=args.get("weights"))
        return {"x": dx, "alpha": dalpha, "weights": dweights}
    if kernel.op == "span_mask":
        dspan = kernel.vjp(static["Lq"], static["Lk"], args["span"], static["ramp"], cotangent,
                           q_offset=static.get("q_offset"))
        return {"span": dspan}
    raise ValueError(f"unknown op {kernel.op}")


class TorchFramework:
    """torch tensors on CPU or CUDA; gradients by autograd through the kernel."""

    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch

    def available_dtypes(self):
        return ("float16", "bfloat16", "float32", "float64")

    def default_device(self, devices):
        return "cuda" if "cuda" in devices and self.torch.cuda.is_available() else "cpu"

    def array(self, x, dtype, device):
        return self.torch.tensor(np.asarray(x, dtype=np.float64), device=device).to(getattr(self.torch, dtype))

    def param(self, value, dtype, device):
        if value is None or not isinstance(value, np.ndarray):
            return value
        return self.torch.tensor(value, device=device).to(getattr(self.torch, dtype))

    def integers(self, value, device):
        if value is None or not isinstance(value, np.ndarray):
            return value
        return self.torch.tensor(value, dtype=self.torch.int64, device=device)

    def to_numpy(self, x):
        return x.detach().to(self.torch.float64).cpu().numpy()

    def vjp(self, kernel, args: dict, static: dict, cotangent, wrt, backend):
        """(out, {name: gradient or None}): autograd through the op called with backend=, so
        the dispatcher sees which inputs require gradients (and refuses what is undeclared)."""
        torch = self.torch
        args = dict(args)
        dtype = next(a.dtype for a in args.values() if isinstance(a, torch.Tensor))
        device = next(a.device for a in args.values() if isinstance(a, torch.Tensor))
        leaves = {}
        for name in declared(kernel, wrt):
            value = args.get(name)
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):  # a Python number: a 0-d tensor of the input dtype
                value = torch.tensor(float(value), dtype=dtype, device=device)
            leaves[name] = value.detach().clone().requires_grad_(True)
            args[name] = leaves[name]
        out = _op(kernel.op)(**args, **static, backend=backend)
        if leaves:
            out.backward(cotangent)
        return out, {n: t.grad for n, t in leaves.items()}




class JaxFramework:
    """jax arrays on the default device; gradients through jax.vjp of the kernel. float64
    exists only under jax_enable_x64 (attnspec never switches it on)."""

    name = "jax"

    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp

    def available_dtypes(self):
        x64 = ("float64",) if self.jax.config.jax_enable_x64 else ()
        return ("float16", "bfloat16", "float32") + x64

    def unavailable_reason(self, dtype):
        if dtype == "float64" and not self.jax.config.jax_enable_x64:
            return "jax makes float64 arrays only under jax_enable_x64 (off here)"
        return None

    def default_device(self, devices):
        return self.jax.default_backend()

    def _device(self, device):
        if device in (None, self.jax.default_backend()):
            return None
        return self.jax.devices(device)[0]

    def array(self, x, dtype, device):
        # Rounded on the host (NumPy, with ml_dtypes for bfloat16) and moved with device_put:
        # jnp.asarray would compile a program per shape (a conversion, or a copy).
        return self.jax.device_put(np.asarray(x, dtype=np.float64).astype(self.jnp.dtype(dtype)),
                                   self._device(device))

    def param(self, value, dtype, device):
        if value is None or not isinstance(value, np.ndarray):
            return value
        return self.array(value, dtype, device)

    def integers(self, value, device):
        if value is None or not isinstance(value, np.ndarray):
            return value
        dtype = self.jnp.int64 if self.jax.config.jax_enable_x64 else self.jnp.int32
        return self.jax.device_put(value.astype(self.jnp.dtype(dtype)), self._device(device))

    def to_numpy(self, x):
        return np.asarray(np.asarray(x, dtype=np.float32) if str(x.dtype) == "bfloat16" else np.asarray(x),
                          dtype=np.float64)

    def vjp(self, kernel, args: dict, static: dict, cotangent, wrt, backend):
        jnp = self.jnp
        dtype = next(a.dtype for a in args.values() if hasattr(a, "dtype"))
        args = dict(args)
        for name in wrt:  # Python numbers are differentiated as 0-d arrays of the input dtype
            if args.get(name) is not None and not hasattr(args[name], "dtype"):
                args[name] = jnp.asarray(float(args[name]), dtype)
        names = [n for n in declared(kernel, wrt) if args.get(n) is not None]

        op = _op(kernel.op)

        def fn(*values):
            return op(**{**args, **dict(zip(names, values))}, **static, backend=backend)

        out, pullback = self.jax.vjp(fn, *[args[n] for n in names])
        grads = pullback(cotangent.astype(out.dtype))
        return out, dict(zip(names, grads))


_ADAPTERS = {"numpy": NumpyFramework, "torch": TorchFramework, "jax": JaxFramework}


def register_framework(array_type: str, adapter_class) -> None:
    """Teach the suite a new array type (backends of new frameworks call this)."""
    _ADAPTERS[array_type] = adapter_class


def framework(array_type: str):
    """The adapter of an array type; torch and jax adapters are added by their backends."""
    if array_type not in _ADAPTERS:
        raise NotImplementedError(
            f"the conformance suite has no adapter for {array_type} arrays yet "
            f"(adapters: {', '.join(_ADAPTERS)}; see attnspec.conformance.frameworks.register_framework)"
        )
    return _ADAPTERS[array_type]()
