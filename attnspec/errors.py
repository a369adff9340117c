"""Exception types. Each kind of failure has its own type, as in JAX and xformers:

- malformed input (wrong shape, dtype, out-of-range value): ValueError / TypeError, raised by
  `attnspec.validation` before any backend is chosen;
- a backend that is not installed or failed to import: BackendUnavailableError (a RuntimeError);
- a valid call that no allowed backend supports: UnsupportedCallError (a NotImplementedError),
  carrying every candidate's reasons.
"""

from __future__ import annotations


class BackendUnavailableError(RuntimeError):
    """A backend that was asked for cannot be loaded (missing framework, import error)."""


class UnsupportedCallError(NotImplementedError):
    """A valid call that none of the allowed backends can run.

    `reasons` maps each candidate backend's name to the list of reasons it gave.
    """

    def __init__(self, op: str, source: str, reasons: dict[str, list[str]]):
        self.op = op
        self.source = source
        self.reasons = reasons
        lines = [f"no backend can run this {op} call (backends from {source}):"]
        for name, why in reasons.items():
            lines.append(f"  {name}: " + "; ".join(why))
        super().__init__("\n".join(lines))
