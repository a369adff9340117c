"""attnspec's ops inside torch.compile: the backend is chosen once, when Dynamo traces the call.

Imported by `attnspec.api` only while torch.compile traces (so torch is already imported).
"""

from __future__ import annotations

import torch

from . import validation
from .dispatch import registry, selection


@torch.compiler.assume_constant_result
def _chosen_backend(op, backend, n_args, names, *values) -> str:
    """Validation and selection, run once when torch.compile traces the call (Dynamo cannot
    trace the dispatcher's context variable and locks, and need not: the choice is constant
    for a traced graph). Errors are raised at trace time, as in eager mode."""
    args, kwargs = values[:n_args], dict(zip(names, values[n_args:]))
    call = validation.VALIDATORS[op](*args, **kwargs)
    return selection.decide_or_raise(call, backend).selected


def compiled_call(op, args, kwargs, backend):
    """attnspec's ops inside torch.compile: the backend is chosen when the function is traced;
    changing use_backend / ATTNSPEC_BACKEND afterwards takes effect at the next trace
    (torch._dynamo.reset() or a new torch.compile), as with jax.jit."""
    # Dynamo hands tensors to an assume_constant_result function only as direct arguments.
    name = _chosen_backend(op, backend, len(args), tuple(kwargs), *args, *kwargs.values())
    return registry.loaded_kernel(name, op).fn(*args, **kwargs)
