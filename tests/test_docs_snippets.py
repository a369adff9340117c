"""Every ```python block of README.md, docs/*.md and experiments/README.md runs.

Each block runs on its own, in a fresh namespace: a reader copies one block at a time, so each
one is a complete example (imports included). Blocks run with a temporary working directory
and without ATTNSPEC_BACKEND; the environment is restored afterwards and every backend they
register removed, so no block changes what the next one sees. Code is compiled with the
Markdown file's name and line numbers, so a traceback points at the line of the document.

What runs: blocks fenced as ```python. Blocks fenced as ```sh, ```toml or ```text are shown,
not run; a fence without a language is an error (it would escape this test unnoticed).

Skip rule (one place: `missing_requirements`): a block needs the optional packages it imports
(torch, jax, flax, triton, entmax, matplotlib, transformers), and whatever it names in a comment line
`# requires: cuda` (also: torch, jax, flax, triton, entmax, matplotlib). A block whose needs
are not met here is skipped with the reason; everything else must pass.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN = {"python"}
SHOW = {"sh", "toml", "text", "json"}

# Optional packages a block may need: a block needs one when a part of a module name it imports
# names it.
OPTIONAL_MODULES = ("torch", "jax", "flax", "triton", "entmax", "matplotlib", "transformers")
_FENCE = re.compile(r"^(\s*)```\s*([^`\s]*)\s*$")
_REQUIRES = re.compile(r"^\s*#\s*requires:\s*(.+)$")


def documents() -> list[Path]:
    """The Markdown files whose code blocks are tested."""
    docs = sorted((ROOT / "docs").glob("*.md")) if (ROOT / "docs").is_dir() else []
    files = [ROOT / "README.md", *docs, ROOT / "experiments" / "README.md"]
    return [f for f in files if f.is_file()]


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the first code line
    language: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, language = m.group(1), m.group(2).strip()
        start = i + 1
        j = start
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"{path.relative_to(ROOT)}:{i + 1}: code fence never closed")
        body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[start:j]]
        found.append(Block(path, start + 1, language, "\n".join(body) + "\n"))
        i = j + 1
    return found


def requirements(code: str) -> set[str]:
    """What a block needs: the optional packages it imports (any part of a dotted module name,
    so `attnspec.layers.torch` needs torch) and the names in its `# requires:` comments."""
    needs = set()
    for line in code.splitlines():
        m = _REQUIRES.match(line)
        if m:
            needs.update(name.strip() for name in m.group(1).split(",") if name.strip())
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return needs  # running it reports the error at the document's line
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules = [node.module]
        else:
            continue
        needs.update(part for module in modules for part in module.split(".") if part in OPTIONAL_MODULES)
    return needs


def missing_requirements(needs: set[str]) -> list[str]:
    """The skip rule: which of a block's needs this machine lacks (empty: it must run)."""
    missing = []
    for name in sorted(needs):
        if name == "cuda":
            if importlib.util.find_spec("torch") is None:
                missing.append("cuda (torch is not installed)")
            else:
                import torch

                if not torch.cuda.is_available():
                    missing.append("cuda (no CUDA device)")
        elif name in OPTIONAL_MODULES:
            if importlib.util.find_spec(name) is None:
                missing.append(f"{name} (not installed)")
        else:
            raise ValueError(f"unknown requirement {name!r} in a '# requires:' comment "
                             f"(known: cuda, {', '.join(OPTIONAL_MODULES)})")
    return missing


def run_block(block: Block) -> None:
    """Execute a block in a fresh namespace. Padding with blank lines makes tracebacks name the
    Markdown file's own line numbers."""
    code = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
    exec(code, {"__name__": "__docs__"})


ALL_BLOCKS = [b for path in documents() for b in blocks(path)]
PYTHON_BLOCKS = [b for b in ALL_BLOCKS if b.language in RUN]


def test_every_fence_names_a_known_language():
    unknown = [f"{b.id} ({b.language or 'no language'})" for b in ALL_BLOCKS if b.language not in RUN | SHOW]
    assert not unknown, f"fences must be one of {sorted(RUN | SHOW)}: {unknown}"


def test_the_documents_have_python_blocks():
    # The README's tour is Python: finding none means the extraction broke, not that all passed.
    readme = [b for b in PYTHON_BLOCKS if b.path.name == "README.md" and b.path.parent == ROOT]
    assert len(readme) >= 3, [b.id for b in PYTHON_BLOCKS]


def test_requirements_are_read_from_imports_and_comments():
    code = "import numpy as np\nimport attnspec, torch as t\nfrom jax import numpy\n# requires: cuda\n"
    assert requirements(code) == {"torch", "jax", "cuda"}
    assert requirements("def f():\n    from attnspec.layers.flax import SpanAttention\n") == {"flax"}
    assert requirements("import attnspec.conformance\nimport numpy\n") == set()
    with pytest.raises(ValueError, match="unknown requirement 'gpu'"):
        missing_requirements({"gpu"})


def test_a_failing_block_names_its_document_line(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\n```python\nx = 1\nassert x == 2, 'wrong'\n```\n\n```sh\nexit 1\n```\n")
    first, shell = blocks(doc)
    assert (first.line, first.language, shell.language) == (4, "python", "sh")
    with pytest.raises(AssertionError, match="wrong") as info:
        run_block(first)
    assert (info.traceback[-1].path, info.traceback[-1].lineno + 1) == (doc, 5)


@pytest.fixture
def isolated(tmp_path, monkeypatch, clean_registry):
    """A temporary working directory, the environment restored, registered backends removed."""
    monkeypatch.chdir(tmp_path)
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_python_block_runs(block, isolated):
    missing = missing_requirements(requirements(block.code))
    if missing:
        pytest.skip(f"{block.id} needs " + ", ".join(missing))
    run_block(block)
