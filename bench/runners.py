"""One runner per array type: how to make inputs, run a forward or a forward+backward step,
wait for the device, read results back, and measure device memory. Targets (attnspec backends
and peers) give a function of (q, k, v) in their framework; the runner does the rest, so a new
backend of a known array type needs no benchmark code.

Inputs are drawn in float64 and rounded once, here, to the configuration's dtype
(`round_to_dtype`); every framework receives those exact values, and the float64 reference
runs on them too.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


def round_to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """a rounded to `dtype` (round to nearest even), returned as float64 holding those values."""
    if dtype == "float64":
        return np.array(a, dtype=np.float64)
    if dtype in ("float32", "float16"):
        return a.astype(dtype).astype(np.float64)
    if dtype == "bfloat16":
        # Round to float32 (exact for values already that close), then keep the upper 16 bits
        # with round-to-nearest-even: bfloat16's definition, without ml_dtypes or torch.
        bits = a.astype(np.float32).view(np.uint32)
        bits = (bits + (((bits >> 16) & 1) + np.uint32(0x7FFF))) & np.uint32(0xFFFF0000)
        return bits.view(np.float32).astype(np.float64)
    raise ValueError(f"unknown dtype {dtype!r}")


@dataclass
class Prepared:
    """A target ready to time. step() runs one measured call (forward, or forward and backward)
    and waits for the device; output() returns the forward output as float64 NumPy;
    compile_s is the ahead-of-time compile time where the runner compiles (JAX)."""

    step: Callable[[], object]
    output: Callable[[], np.ndarray]
    compile_s: float | None = None


class Runner:
    name = ""
    module = ""  # the framework's import name

    def unavailable(self) -> str | None:
        if importlib.util.find_spec(self.module) is None:
            return f"{self.module} is not installed"
        return None

    def resolve_device(self, requested: str | None) -> str:
        return "cpu"

    def device_reason(self, device: str) -> str | None:
        """Why this runner cannot use `device` (None: it can)."""
        return None if device == "cpu" else f"{self.name} runner: device {device} is not available"

    def dtype_reason(self, dtype: str) -> str | None:
        """Why this runner cannot make arrays of `dtype` (None: it can)."""
        return None

    def inputs(self, arrays: tuple, dtype: str, device: str, grad: bool) -> tuple:
        raise NotImplementedError

    def params(self, values: tuple, dtype: str, device: str, grad: bool) -> tuple:
        """Learned [H] parameters (alpha, span) as arrays of this framework: float32, or float64
        for float64 cases (SPEC.md: alpha and z are cast to the compute dtype)."""
        raise NotImplementedError

    def prepare(self, fn, inputs: tuple, mode: str, vjp=None, kwargs=None) -> Prepared:
        """inputs: (q, k, v, g, *params); fn(q, k, v, *params); the backward differentiates
        sum(out * g) with respect to q, k, v and the params."""
        raise NotImplementedError

    def threads(self) -> int | None:
        return None

    def set_threads(self, n: int) -> str | None:
        """Run with n threads from now on; None, or why this runner cannot (then it runs with
        what the framework chose at start)."""
        return f"{self.name} reads its thread count at start (environment variables), not per case"

    def environment(self) -> dict:
        return {}

    # Device memory (accelerators): begin() before the measured call, end() after it gives the
    # peak bytes the call allocated above what was allocated at begin(). CPU: None (peak RSS is
    # measured by the caller).
    def memory_begin(self, device: str):
        return None

    def memory_end(self, device: str, token) -> int | None:
        return None


class NumpyRunner(Runner):
    name = module = "numpy"

    def dtype_reason(self, dtype):
        if dtype == "bfloat16" and not framework_available("ml_dtypes"):
            return "NumPy has bfloat16 arrays only with the ml_dtypes package"
        return None

    def inputs(self, arrays, dtype, device, grad):
        if dtype == "bfloat16":
            import ml_dtypes  # the NumPy reference declares bfloat16 only when this is installed

            return tuple(a.astype(ml_dtypes.bfloat16) for a in arrays)
        return tuple(a.astype(dtype) for a in arrays)

    def params(self, values, dtype, device, grad):
        return tuple(np.asarray(a, dtype=np.float64 if dtype == "float64" else np.float32) for a in values)

    def prepare(self, fn, inputs, mode, vjp=None, kwargs=None):
        q, k, v, g, *params = inputs

        def forward():
            return fn(q, k, v, *params)

        if mode == "fwd":
            step = forward
        else:
            def step():
                out = fn(q, k, v, *params)
                grads = vjp(q, k, v, g, **kwargs)
                return out, grads
        return Prepared(step=step, output=lambda: np.asarray(forward(), dtype=np.float64))

    def threads(self):
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            if os.environ.get(var, "").isdigit():
                return int(os.environ[var])
        return None

    def environment(self):
        return dict(numpy=np.__version__)


class TorchRunner(Runner):
    name = module = "torch"

    def resolve_device(self, requested):
        import torch

        if requested:
            return requested
        return "cuda" if torch.cuda.is_available() else "cpu"

    def device_reason(self, device):
        import torch

        if device == "cpu":
            return None
        if device.startswith("cuda"):
            return None if torch.cuda.is_available() else "torch: CUDA is not available"
        return None

    def inputs(self, arrays, dtype, device, grad):
        import torch

        torch_dtype = getattr(torch, dtype)
        out = [torch.tensor(a, dtype=torch.float64).to(device=device, dtype=torch_dtype) for a in arrays]
        if grad:
            for t in out[:3]:
                t.requires_grad_(True)
        return tuple(out)

    def params(self, values, dtype, device, grad):
        import torch

        torch_dtype = torch.float64 if dtype == "float64" else torch.float32
        return tuple(torch.tensor(a, dtype=torch_dtype, device=device).requires_grad_(grad) for a in values)

    def _sync(self, device):
        import torch

        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def prepare(self, fn, inputs, mode, vjp=None, kwargs=None):
        import torch

        q, k, v, g, *params = inputs
        device = q.device.type

        if mode == "fwd":
            def step():
                with torch.no_grad():
                    out = fn(q, k, v, *params)
                self._sync(device)
                return out
        else:
            def step():
                out = fn(q, k, v, *params)
                # allow_unused: a peer that takes no alpha or span gives no gradient for them
                grads = torch.autograd.grad(out, (q, k, v, *params), g, allow_unused=bool(params))
                self._sync(device)
                return grads

        def output():
            with torch.no_grad():
                return fn(q, k, v, *params).detach().to(device="cpu", dtype=torch.float64).numpy()

        return Prepared(step=step, output=output)

    def threads(self):
        import torch

        return torch.get_num_threads()

    def set_threads(self, n):
        import torch

        torch.set_num_threads(n)
        return None

    def environment(self):
        import torch

        env = dict(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                   torch_interop_threads=torch.get_num_interop_threads(), cuda=torch.cuda.is_available())
        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name()
            env["cuda_version"] = torch.version.cuda
        return env

    def memory_begin(self, device):
        import torch

        if not device.startswith("cuda"):
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()

    def memory_end(self, device, token):
        import torch

        if token is None:
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - token


class JaxRunner(Runner):
    name = module = "jax"

    def resolve_device(self, requested):
        import jax

        if requested in (None, "cuda", "gpu"):
            platform = jax.default_backend()
            if requested in ("cuda", "gpu") and platform != "gpu":
                return "gpu"  # device_reason explains
            return platform
        return requested

    def device_reason(self, device):
        import jax

        try:
            jax.devices(device)
        except RuntimeError as exc:
            return f"jax: no {device} device ({exc})"
        return None

    def dtype_reason(self, dtype):
        import jax

        if dtype == "float64" and not jax.config.jax_enable_x64:
            return "JAX computes float64 only with x64 enabled (JAX_ENABLE_X64=1); it would silently use float32"
        return None

    def _device(self, device):
        import jax

        return jax.devices(device)[0]

    def inputs(self, arrays, dtype, device, grad):
        import jax
        import jax.numpy as jnp

        target = self._device(device)
        return tuple(jax.device_put(jnp.asarray(a, dtype=getattr(jnp, dtype)), target) for a in arrays)

    def params(self, values, dtype, device, grad):
        import jax
        import jax.numpy as jnp

        param_dtype = jnp.float64 if dtype == "float64" else jnp.float32
        return tuple(jax.device_put(jnp.asarray(a, dtype=param_dtype), self._device(device)) for a in values)

    def prepare(self, fn, inputs, mode, vjp=None, kwargs=None):
        import jax

        if mode == "fwd":
            def program(q, k, v, g, *params):
                return fn(q, k, v, *params)
        else:
            def program(q, k, v, g, *params):
                out, pullback = jax.vjp(fn, q, k, v, *params)
                return out, pullback(g)
        start = time.perf_counter()
        compiled = jax.jit(program).lower(*inputs).compile()
        compile_s = time.perf_counter() - start

        def step():
            return jax.block_until_ready(compiled(*inputs))

        def output():
            result = step()
            out = result if mode == "fwd" else result[0]
            return np.asarray(out, dtype=np.float64)

        return Prepared(step=step, output=output, compile_s=compile_s)

    def environment(self):
        import jax

        env = dict(jax=jax.__version__, jax_backend=jax.default_backend(),
                   jax_devices=[str(d) for d in jax.devices()])
        try:
            import jaxlib

            env["jaxlib"] = jaxlib.__version__
        except ImportError:
            pass
        if os.environ.get("XLA_FLAGS"):
            env["XLA_FLAGS"] = os.environ["XLA_FLAGS"]
        return env

    def memory_begin(self, device):
        if device == "cpu":
            return None
        stats = self._device(device).memory_stats() or {}
        return stats.get("bytes_in_use")

    def memory_end(self, device, token):
        if token is None:
            return None
        stats = self._device(device).memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        return None if peak is None else peak - token


RUNNERS: dict[str, Runner] = {r.name: r for r in (NumpyRunner(), TorchRunner(), JaxRunner())}


def runner_for(array_type: str) -> Runner | None:
    return RUNNERS.get(array_type)


def framework_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def import_optional(name: str):
    """The module, or None when it is not installed (other import errors propagate)."""
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)
