"""attnspec: adaptive-span and alpha-entmax attention, one specification, many frameworks."""

from . import reference  # noqa: E402
from ._version import SPEC_VERSION, __version__  # noqa: E402
