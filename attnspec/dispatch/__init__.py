"""The runtime dispatcher: capability declarations, the backend registry, and selection."""

from .capabilities import Capabilities, Interval, Kernel, Lengths
from .registry import Backend, BackendStatus, list_backends, register_backend, unregister_backend
from .selection import Decision, use_backend

__all__ = [
    "Backend",
    "BackendStatus",
    "Capabilities",
    "Decision",
    "Interval",
    "Kernel",
    "Lengths",
    "list_backends",
    "register_backend",
    "unregister_backend",
    "use_backend",
]
