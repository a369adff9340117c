"""The backend registry: who is registered, loaded lazily, and what each one declares.

Three sources, all loaded lazily so that `import attnspec` needs NumPy alone:
- the NumPy reference, registered at import (it is part of the spec);
- attnspec's own backends, listed in `attnspec.backends.BUILTIN_BACKENDS` with the array types
  they serve, imported the first time a call of that array type (or `list_backends`) needs them;
- third-party backends from the entry-point group `attnspec.backends`. Each entry point names a
  `Backend`, or a callable returning one; it is loaded on first use, and one that fails to load
  is reported (by `list_backends` and `attnspec info`) without breaking the others.
"""

from __future__ import annotations

import difflib
import importlib
import threading
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable

from ..errors import BackendUnavailableError
from .capabilities import Kernel

ENTRY_POINT_GROUP = "attnspec.backends"


@dataclass(frozen=True)
class Backend:
    """A named set of kernels, one per op ('attention', 'entmax', 'span_mask', and 'partial': the
    per-block operations of SPEC.md section 10).

    priority: automatic selection takes the highest-priority backend that accepts a call.
    automatic: False for backends that run only when asked for by name.
    """

    name: str
    version: str
    kernels: dict
    priority: int = 0
    automatic: bool = True
    description: str = ""

    def kernel(self, op: str) -> Kernel | None:
        return self.kernels.get(op)


@dataclass
class _Entry:
    name: str
    source: str  # 'reference', 'builtin', 'entry point' or 'register_backend'
    loader: Callable[[], Backend] | None = None
    array_types: tuple | None = None  # known before loading, for builtins
    backend: Backend | None = None
    error: str | None = None
    error_detail: str | None = field(default=None, repr=False)
    missing: str | None = None  # the package whose absence stopped the load (not a failure)

    @property
    def loaded(self) -> bool:
        return self.backend is not None or self.error is not None


@dataclass(frozen=True)
class BackendStatus:
    """One line of `list_backends()` / `attnspec info`."""

    name: str
    source: str
    available: bool
    version: str | None
    priority: int | None
    automatic: bool | None
    ops: tuple
    array_types: tuple
    devices: tuple
    dtypes: tuple
    error: str | None
    description: str = ""
    missing: str | None = None  # set when the backend's framework is not installed


_lock = threading.RLock()
_entries: dict[str, _Entry] = {}
_discovered = False


def _as_backend(obj, name: str) -> Backend:
    if callable(obj) and not isinstance(obj, Backend):
        obj = obj()
    if not isinstance(obj, Backend):
        raise TypeError(f"expected an attnspec Backend, got {type(obj).__name__}")
    if obj.name != name:
        raise ValueError(f"registered as '{name}' but the backend is named '{obj.name}'")
    return obj


def _load(entry: _Entry) -> None:
    with _lock:
        if entry.loaded:
            return
        try:
            entry.backend = _as_backend(entry.loader(), entry.name)
        except Exception as exc:  # a broken backend must not break the others
            entry.error = f"{type(exc).__name__}: {exc}"
            entry.error_detail = traceback.format_exc()
            missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
            if missing and missing.split(".")[0] != "attnspec":
                entry.missing = missing.split(".")[0]
                entry.error = f"not installed: needs the package '{entry.missing}'"


def _discover() -> None:
    """Add the built-in backends and entry points once (lazily: no imports happen here)."""
    global _discovered
    with _lock:
        if _discovered:
            return
        _discovered = True
        from ..backends import BUILTIN_BACKENDS

        if "numpy" not in _entries:
            _entries["numpy"] = _Entry(
                "numpy", "reference", _module_loader("attnspec.backends.numpy", "BACKEND"), ("numpy",)
            )

        for name, (module, attr, array_types) in BUILTIN_BACKENDS.items():
            if name not in _entries:
                loader = _module_loader(module, attr)
                _entries[name] = _Entry(name, "builtin", loader, tuple(array_types))
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in _entries:  # a second backend of that name: report it, keep the first
                key = f"{ep.name} ({ep.value})"
                _entries[key] = _Entry(key, "entry point", error=f"the name '{ep.name}' is already taken")
                continue
            _entries[ep.name] = _Entry(ep.name, "entry point", ep.load)


def _module_loader(module: str, attr: str):
    def load():
        return getattr(importlib.import_module(module), attr)

    return load


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Register a backend object now. A name already taken raises unless replace=True."""
    if not isinstance(backend, Backend):
        raise TypeError(f"register_backend takes an attnspec Backend; got {type(backend).__name__}")
    with _lock:
        _discover()
        if backend.name in _entries and not replace:
            raise ValueError(
                f"a backend named '{backend.name}' is already registered "
                "(pass replace=True to replace it)"
            )
        _entries[backend.name] = _Entry(backend.name, "register_backend", backend=backend)
    return backend


def unregister_backend(name: str) -> None:
    """Remove a backend (for plugins and tests). The reference 'numpy' cannot be removed."""
    with _lock:
        if name == "numpy":
            raise ValueError("the reference backend 'numpy' cannot be unregistered")
        _entries.pop(name, None)


def names() -> list[str]:
    with _lock:
        _discover()
        return list(_entries)


def require_known(name: str, where: str = "backend") -> None:
    """ValueError for a name nobody registered, listing the known ones."""
    if not isinstance(name, str):
        raise TypeError(f"{where} must be a backend name (str); got {type(name).__name__}")
    known = names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"{where}='{name}' is not a registered backend (registered: {', '.join(known)}){hint}")


def entry(name: str) -> _Entry:
    require_known(name)
    return _entries[name]


def load(name: str) -> Backend:
    """The backend called `name`, loading it if needed; BackendUnavailableError if it failed."""
    item = entry(name)
    _load(item)
    if item.backend is None:
        raise BackendUnavailableError(f"backend '{name}' failed to load: {item.error}")
    return item.backend


def loaded_kernel(name: str, op: str) -> Kernel:
    """The kernel of an already loaded backend: plain lookups (torch.compile traces this)."""
    return _entries[name].backend.kernels[op]


def entries() -> list[_Entry]:
    with _lock:
        _discover()
        return list(_entries.values())


def list_backends(load_all: bool = True) -> list[BackendStatus]:
    """Every registered backend with its status; load_all=True loads them to read their
    declarations (importing their frameworks)."""
    out = []
    for item in entries():
        if load_all:
            _load(item)
        b = item.backend
        if b is None:
            out.append(BackendStatus(
                name=item.name, source=item.source, available=False, version=None, priority=None,
                automatic=None, ops=(), array_types=tuple(item.array_types or ()), devices=(),
                dtypes=(), error=item.error or "not loaded yet", missing=item.missing,
            ))
            continue
        caps = [k.capabilities for k in b.kernels.values()]
        out.append(BackendStatus(
            name=b.name, source=item.source, available=True, version=b.version,
            priority=b.priority, automatic=b.automatic, ops=tuple(b.kernels),
            array_types=tuple(sorted({c.array_type for c in caps})),
            devices=tuple(sorted({d for c in caps for d in c.devices})),
            dtypes=tuple(d for d in ("float16", "bfloat16", "float32", "float64")
                         if any(d in c.dtypes for c in caps)),
            error=None, description=b.description,
        ))
    return out


def _reset_for_tests() -> None:
    """Forget entry points and builtins so that the next use discovers them again."""
    global _discovered
    with _lock:
        for name in [n for n, e in _entries.items() if e.source in ("builtin", "entry point", "reference")]:
            del _entries[name]
        _discovered = False
