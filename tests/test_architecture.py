"""The package's shape, as docs/architecture.md draws it: who may import whom.

Read from the source with `ast` (nothing is imported), counting imports inside functions too,
since a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: top-level folder -> the package name it is installed as (pyproject.toml's package-dir)
FOLDERS = {"attnspec": "attnspec", "backends": "attnspec.backends",
           "conformance": "attnspec.conformance", "bench": "attnspec.bench"}
FRAMEWORKS = ("torch", "jax", "jaxlib", "flax", "triton", "transformers")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> set[str]:
    """Every module (of ours or not) that `name` imports, anywhere in its source."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import sub` imports the module pkg.sub
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return found


GRAPH = {name: {m for m in _imports(name) if m in MODULES and m != name} for name in MODULES}


def _reaches(start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(GRAPH[node])
    return False


def _is_ancestor(a: str, b: str) -> bool:
    return b.startswith(a + ".")


def test_graph_sees_the_known_edges():
    assert "attnspec.validation" in GRAPH["attnspec.api"]
    assert "attnspec.dispatch.registry" in GRAPH["attnspec.backends.numpy"]


def test_no_two_modules_import_each_other():
    # A package's __init__ importing its own submodules is how a package exposes them; every
    # other cycle, direct or through others, is a design error.
    cycles = []
    for a in GRAPH:
        for b in GRAPH[a]:
            if _is_ancestor(b, a) or _is_ancestor(a, b):
                continue
            if _reaches(b, a):
                cycles.append(f"{a} -> {b} -> ... -> {a}")
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_reference_knows_no_dispatcher_and_no_framework():
    for name in MODULES:
        if name.startswith("attnspec.reference"):
            bad = {m for m in _imports(name)
                   if m.startswith(("attnspec.dispatch", "attnspec.backends", "attnspec.api"))
                   or m.split(".")[0] in FRAMEWORKS}
            assert not bad, f"{name} imports {bad}"


#: The spec's shared rules: pure functions every implementation may import (SPEC.md's geometry,
#: dtype rules and elementwise formulas). They import NumPy and each other, nothing else.
SPEC_RULES = ("attnspec.geometry", "attnspec.precision", "attnspec.formulas")


def test_spec_rules_import_no_framework_and_nothing_above_them():
    for name in SPEC_RULES:
        ours = {m for m in GRAPH[name]}
        assert ours <= set(SPEC_RULES), f"{name} imports {ours - set(SPEC_RULES)}"
        frameworks = {m for m in _imports(name) if m.split(".")[0] in FRAMEWORKS}
        assert not frameworks, f"{name} imports {frameworks}"


def test_backends_take_the_window_from_the_spec():
    for backend in ("torch", "jax", "triton"):
        users = [n for n in MODULES if n.startswith(f"attnspec.backends.{backend}")
                 and "attnspec.geometry" in GRAPH[n]]
        assert users, f"no module of the {backend} backend uses attnspec.geometry"


def test_no_backend_imports_another():
    backends = {n.split(".")[2] for n in MODULES if n.count(".") >= 2 and n.startswith("attnspec.backends.")}
    shared = {b for b in backends if b.startswith("_")}  # helper modules of the package, not backends
    for name in MODULES:
        if not name.startswith("attnspec.backends.") or name.split(".")[2] in shared:
            continue
        own = name.split(".")[2]
        for m in _imports(name):
            if m.startswith("attnspec.backends.") and m.split(".")[2] not in shared | {own}:
                pytest.fail(f"backend module {name} imports another backend: {m}")


def test_checkout_maps_exactly_three_subpackages(tmp_path):
    code = ("import importlib, attnspec\n"
            "for ok in ('backends', 'conformance', 'bench'):\n"
            "    importlib.import_module('attnspec.' + ok)\n"
            "for bad in ('tests', 'experiments', 'examples', 'tools', 'docs'):\n"
            "    try:\n"
            "        importlib.import_module('attnspec.' + bad)\n"
            "    except ModuleNotFoundError:\n"
            "        continue\n"
            "    raise SystemExit('attnspec.' + bad + ' imported')\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
