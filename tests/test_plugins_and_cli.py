"""Third-party backends through the `attnspec.backends` entry-point group, and the CLI."""

import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import attnspec
from attnspec import cli
from attnspec.dispatch import registry

REPO = Path(__file__).resolve().parents[1]

GOOD_PLUGIN = '''
import attnspec
from attnspec import Backend, Capabilities, Kernel


def _entmax(x, alpha, axis=-1, weights=None):
    return attnspec.reference.entmax(x, alpha, axis=axis, weights=weights)


def make():
    caps = Capabilities(array_type="numpy", dtypes=("float64",), features=frozenset({"entmax"}))
    return Backend(name="goodplugin", version="1.2.3", kernels={"entmax": Kernel("entmax", _entmax, caps)},
                   priority=5)
'''

BROKEN_PLUGIN = '''
raise ImportError("the vendor library libfancy.so is missing")
'''


def install_fake_distribution(root: Path):
    """A dist-info folder on sys.path is all importlib.metadata needs to find entry points."""
    (root / "goodplugin_mod.py").write_text(GOOD_PLUGIN)
    (root / "brokenplugin_mod.py").write_text(BROKEN_PLUGIN)
    info = root / "fakeplugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [attnspec.backends]
        goodplugin = goodplugin_mod:make
        brokenplugin = brokenplugin_mod:make
        numpy = goodplugin_mod:make
        """))


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    install_fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._reset_for_tests()
    yield tmp_path
    monkeypatch.undo()
    registry._reset_for_tests()


def test_entry_point_backends_load_and_failures_are_reported(plugins):
    statuses = {s.name: s for s in attnspec.list_backends()}
    good, broken = statuses["goodplugin"], statuses["brokenplugin"]
    assert good.available and good.version == "1.2.3" and good.source == "entry point"
    assert not broken.available and "libfancy.so is missing" in broken.error
    # A plugin may not take a name that is already registered.
    clash = [s for s in statuses.values() if s.name.startswith("numpy (")]
    assert clash and "already taken" in clash[0].error
    # The good plugin wins automatic selection for what it declares, the broken one harms nothing.
    x = np.array([[0.1, 0.7, -0.3]])
    assert attnspec.explain(x, 1.5, op="entmax").selected == "goodplugin"
    assert attnspec.explain(x.astype(np.float32), 1.5, op="entmax").selected == "numpy"
    np.testing.assert_array_equal(attnspec.entmax(x, 1.5), attnspec.reference.entmax(x, 1.5))


def test_info_lists_failed_plugins(plugins, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "goodplugin" in out and "FAILED" in out
    assert "brokenplugin (entry point) failed to load: ImportError: the vendor library libfancy.so is missing" in out
    assert cli.main(["info", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["spec"] == attnspec.SPEC_VERSION
    names = {b["name"]: b for b in payload["backends"]}
    assert names["numpy"]["available"] and not names["brokenplugin"]["available"]


def test_demo_prints_the_continuity_example(capsys):
    assert cli.main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "1.000001  0.674033            10.000000" in out
    assert "attention: backend 'numpy' (automatic selection)" in out


def test_console_script_from_a_source_checkout():
    """`python -m attnspec` works from the source tree alone (PYTHONPATH), as on the GPU machine,
    with backends/, conformance/ and bench/ importable as attnspec subpackages."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    code = "import attnspec.backends, attnspec.conformance, attnspec.bench; print(attnspec.backends.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", check=True)
    assert Path(out.stdout.strip()).parent == REPO / "backends"
    info = subprocess.run([sys.executable, "-m", "attnspec", "info"], capture_output=True, text=True, env=env,
                          cwd="/", check=True)
    assert re.search(r"^numpy +available", info.stdout, re.M)
