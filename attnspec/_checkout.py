"""Running from a source checkout without installing (PYTHONPATH=<checkout>).

The top-level folders backends/, conformance/ and bench/ are the subpackages attnspec.backends,
attnspec.conformance and attnspec.bench: pyproject.toml's package-dir maps them in an installed
or editable copy. From a bare checkout this finder maps exactly those three names, and nothing
else of the checkout (tests/, experiments/, examples/ stay outside the package).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

#: The subpackages that live in top-level folders of the checkout.
MAPPED = ("backends", "conformance", "bench")


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds attnspec.<name> for the MAPPED names in the checkout's top-level folders."""

    def __init__(self, checkout: str):
        self.checkout = checkout

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != "attnspec" or name not in MAPPED:
            return None
        folder = os.path.join(self.checkout, name)
        init = os.path.join(folder, "__init__.py")
        if not os.path.isfile(init):
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[folder])


def install(package_dir: str) -> None:
    """Map the three subpackages when `package_dir` (attnspec/) sits in a checkout that has them
    beside it; an installed copy has them inside and needs nothing."""
    if os.path.isdir(os.path.join(package_dir, "backends")):
        return
    checkout = os.path.dirname(package_dir)
    if not os.path.isfile(os.path.join(checkout, "backends", "__init__.py")):
        return
    if not any(isinstance(f, _CheckoutFinder) for f in sys.meta_path):
        # appended: an editable install's own finder (same folders) is asked first
        sys.meta_path.append(_CheckoutFinder(checkout))
