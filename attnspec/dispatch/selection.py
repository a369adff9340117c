"""Which backend runs a call: policy only; every fact comes from the kernels' declarations.

Order (first that applies):
1. the call's `backend=` argument;
2. the innermost `attnspec.use_backend(...)` context (a contextvar: thread- and async-safe);
3. the environment variable ATTNSPEC_BACKEND (comma-separated names);
4. automatic: the highest-priority backend of the call's array type that accepts the call.
Steps 1-3 name backends explicitly: the first named one that accepts the call runs, and if none
does the call fails with every one's reasons. There is never a silent fallback to a backend
that was not named.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass, field

from ..errors import BackendUnavailableError, UnsupportedCallError
from ..validation import CallInfo
from . import registry
from .capabilities import Capabilities, Kernel

ENV_VAR = "ATTNSPEC_BACKEND"

_enabled: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("attnspec_backends", default=None)


@contextlib.contextmanager
def use_backend(*names: str):
    """Run the calls inside the block on the named backends only, in this order of preference.

        with attnspec.use_backend("torch"):
            out = attnspec.attention(q, k, v, alpha=1.5)

    Like torch.nn.attention.sdpa_kernel: the enabled set is saved and restored on exit, and
    nested blocks replace (not extend) the outer one. Unknown names raise ValueError at once.
    """
    if len(names) == 1 and isinstance(names[0], (list, tuple)):
        names = tuple(names[0])
    if not names:
        raise ValueError("use_backend needs at least one backend name")
    for name in names:
        registry.require_known(name, "use_backend")
    token = _enabled.set(tuple(names))
    try:
        yield
    finally:
        _enabled.reset(token)


@dataclass
class Decision:
    """The outcome of selection for one call: what runs, why, and why not the others.

    source: 'backend= argument', 'use_backend', 'ATTNSPEC_BACKEND' or 'automatic selection'.
    considered: (backend name, reasons) in the order they were tried; [] means it accepted.
    """

    op: str
    source: str
    selected: str | None = None
    kernel: Kernel | None = field(default=None, repr=False)
    considered: list = field(default_factory=list)

    def __str__(self) -> str:
        head = (
            f"{self.op}: backend '{self.selected}' ({self.source})"
            if self.selected
            else f"{self.op}: no backend can run this call ({self.source})"
        )
        lines = [head]
        for name, reasons in self.considered:
            status = ("selected" if name == self.selected else "accepts") if not reasons else "; ".join(reasons)
            lines.append(f"  {name}: {status}")
        return "\n".join(lines)


def _requested(backend) -> tuple[tuple | None, str]:
    if backend is not None:
        registry.require_known(backend, "backend")
        return (backend,), "backend= argument"
    enabled = _enabled.get()
    if enabled is not None:
        return enabled, "use_backend"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        named = tuple(n.strip() for n in env.split(",") if n.strip())
        if not named:
            raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} names no backend (unset it for automatic selection)")
        for name in named:
            registry.require_known(name, ENV_VAR)
        return named, ENV_VAR
    return None, "automatic selection"


def _reasons(entry, call: CallInfo, automatic: bool):
    """(kernel or None, reasons) for one registry entry, loading it only if it could qualify."""
    if not entry.loaded and entry.array_types is not None and call.array_type not in entry.array_types:
        return None, [f"array type {call.array_type} (supported: {', '.join(entry.array_types)})"]
    registry._load(entry)
    if entry.backend is None:
        return None, [f"unavailable: {entry.error}"]
    kernel = entry.backend.kernel(call.op)
    if kernel is None:
        return None, [f"does not implement '{call.op}'"]
    try:
        reasons = kernel.not_supported_reasons(call)
    except Exception as exc:  # a plugin's own check is arbitrary code: it must not break selection
        if not automatic:
            raise RuntimeError(
                f"backend '{entry.name}': its capability check (extra_reasons) raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return None, [f"its capability check (extra_reasons) raised {type(exc).__name__}: {exc}"]
    if automatic and not entry.backend.automatic and not reasons:
        reasons = ["runs only when named (backend=, use_backend or ATTNSPEC_BACKEND)"]
    if automatic and not reasons:
        reasons = kernel.capabilities.automatic_reasons(call)
    return kernel, reasons


def _automatic_order(array_type: str):
    """Every entry by priority. Entries that might serve this array type are loaded first, so
    that their declared priority (not the order of earlier calls) decides."""
    entries = registry.entries()
    for entry in entries:
        if not entry.loaded and (entry.array_types is None or array_type in entry.array_types):
            registry._load(entry)

    def key(entry):
        priority = entry.backend.priority if entry.backend is not None else 0
        return (-priority, entry.name)

    return sorted(entries, key=key)


def decide(call: CallInfo, backend=None, *, explain: bool = False) -> Decision:
    """Choose the backend for `call`. With explain=True every candidate's reasons are collected;
    otherwise the search stops at the first backend that accepts."""
    named, source = _requested(backend)
    automatic = named is None
    candidates = _automatic_order(call.array_type) if automatic else [registry.entry(n) for n in named]
    decision = Decision(op=call.op, source=source)
    for entry in candidates:
        if decision.selected is not None and not explain:
            break
        kernel, reasons = _reasons(entry, call, automatic)
        decision.considered.append((entry.name, reasons))
        if not reasons and decision.selected is None:
            decision.selected, decision.kernel = entry.name, kernel
    return decision


# A cache of successful selections, for the per-call hot path (`select`). Selection is a pure
# function of (the policy, the registry, the call's description), so a decision is reused only
# when all three are the same:
# - the policy: the backend= argument, the use_backend context and the raw ATTNSPEC_BACKEND
#   string, read on every call (a changed variable is a new key, so it is seen at once);
# - the registry: the entry objects and their loaded backends, compared by identity on every
#   call (any register/unregister/replace/load empties the cache; the snapshot holds them, so
#   an id cannot be reused by a new object while it is cached);
# - the call: op, array type, device, dtype, features, and a size class: on which side of every
#   size limit declared by a kernel of that op its sizes fall (all sizes when a kernel's
#   Capabilities is a subclass, whose reasons may read anything, or declares shape rules such
#   as "a multiple of 16"); and alpha's values when some kernel of the op declares its alphas.
# Kernels with `extra_reasons` (arbitrary code: an environment variable, a device property)
# are asked again on every hit, and a different answer falls back to a full decision.
# Failures are never cached: errors are always built by `decide` with every reason.
_cache: dict = {}
_snapshot: tuple = ((), ())  # (entries, their backends) the cache is valid for
_limits: dict = {}  # op -> (((size name, limit), ...) or None for "key on every size", alpha in key)
_CACHE_MAX = 4096


def _registry_changed(entries) -> bool:
    old_entries, old_backends = _snapshot
    if len(entries) != len(old_entries):
        return True
    for entry, old_entry, old_backend in zip(entries, old_entries, old_backends):
        if entry is not old_entry or entry.backend is not old_backend:
            return True
    return False


def _size_limits(op: str, backends) -> tuple | None:
    limits = set()
    for backend in backends:
        kernel = backend.kernel(op) if backend is not None else None
        if kernel is None:
            continue
        caps = kernel.capabilities
        if type(caps) is not Capabilities or caps.has_shape_rules:
            return None  # rules such as "a multiple of 16" have no single threshold
        if caps.max_head_dim is not None:
            limits.update((("D", caps.max_head_dim), ("Dv", caps.max_head_dim)))
        if caps.max_scores is not None:
            limits.add(("scores", caps.max_scores))
        if caps.automatic_max_scores is not None:
            limits.add(("scores", caps.automatic_max_scores))
        for name, limit in (("B", caps.max_batch), ("H", caps.max_heads)):
            if limit is not None:
                limits.add((name, limit))
        if caps.max_query_length is not None:
            limits.add(("Lq", caps.max_query_length))
    return tuple(sorted(limits))


def _alpha_matters(op: str, backends) -> bool:
    """Whether some kernel of the op declares the alphas it runs (then alpha is in the key)."""
    for backend in backends:
        kernel = backend.kernel(op) if backend is not None else None
        if kernel is not None and kernel.capabilities.alphas is not None:
            return True
    return False


def _environment_value():
    """ATTNSPEC_BACKEND as os.environ holds it, read without os.environ.get's str encoding and
    decoding (a microsecond, a tenth of a cached selection): same source, same freshness."""
    data = getattr(os.environ, "_data", None)
    if _ENV_KEY is None or not isinstance(data, dict):
        return os.environ.get(ENV_VAR)
    return data.get(_ENV_KEY)


try:
    _ENV_KEY = os.environ.encodekey(ENV_VAR)
except Exception:  # an os.environ without encodekey: use the public mapping
    _ENV_KEY = None


def _cache_key(call: CallInfo, backend):
    global _snapshot
    if not registry._discovered:
        registry.entries()
    entries = tuple(registry._entries.values())
    if _registry_changed(entries):
        _cache.clear()
        _limits.clear()
        _snapshot = (entries, tuple(e.backend for e in entries))
    try:
        limits, alpha_matters = _limits[call.op]
    except KeyError:
        limits, alpha_matters = _limits[call.op] = (_size_limits(call.op, _snapshot[1]),
                                                    _alpha_matters(call.op, _snapshot[1]))
    sizes = call.sizes
    if limits is None:
        size_class = tuple(sorted(sizes.items()))
    else:
        size_class = tuple([sizes.get(name, 0) > limit for name, limit in limits])
    key = (call.op, call.array_type, call.device, call.dtype, call.features, size_class, backend,
           _enabled.get(), _environment_value())
    if alpha_matters:
        key += (call.alpha,)
    return key, _snapshot[0]


def _extra_checks(decision: Decision, call: CallInfo):
    """(kernel, accepted) for each kernel with extra_reasons that selection asked on its way to
    the selected backend: what a cached decision must ask again."""
    checks = []
    for name, reasons in decision.considered:
        entry = registry._entries.get(name)
        kernel = entry.backend.kernel(call.op) if entry is not None and entry.backend is not None else None
        if kernel is not None and kernel.extra_reasons is not None and not kernel.capabilities.reasons(call):
            checks.append((kernel, not reasons))
        if name == decision.selected:
            break
    return tuple(checks)


def select(call: CallInfo, backend=None) -> Kernel:
    """The kernel that runs `call`; raises if none of the allowed backends can."""
    if backend is not None and type(backend) is not str:
        return decide_or_raise(call, backend).kernel  # decide raises the TypeError
    key, snapshot = _cache_key(call, backend)
    hit = _cache.get(key)
    # The snapshot check closes a race: a decision taken while another thread changed the
    # registry may be stored after that thread emptied the cache; it carries the old snapshot.
    if hit is not None and hit[2] is _snapshot[0]:
        kernel, checks, _ = hit
        try:
            if all((not k.extra_reasons(call)) == accepted for k, accepted in checks):
                return kernel
        except Exception:  # a check that now raises: the full decision reports it by name
            pass
    decision = decide_or_raise(call, backend)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[key] = (decision.kernel, _extra_checks(decision, call), snapshot)
    return decision.kernel


def decide_or_raise(call: CallInfo, backend=None) -> Decision:
    """decide(), raising BackendUnavailableError / UnsupportedCallError when nothing qualifies."""
    decision = decide(call, backend)
    if decision.kernel is not None:
        return decision
    reasons = dict(decision.considered)
    if reasons and all(r[0].startswith("unavailable:") for r in reasons.values()):
        detail = "; ".join(f"{n}: {r[0]}" for n, r in reasons.items())
        raise BackendUnavailableError(f"no backend named by {decision.source} can be loaded: {detail}")
    raise UnsupportedCallError(call.op, decision.source, reasons)
