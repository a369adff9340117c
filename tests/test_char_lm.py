"""experiments/char_lm.py: the corpus is checked by hash, the arms share weights and batches,
the cost formula, and the smoke preset end to end (a few seconds)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def char_lm():
    spec = importlib.util.spec_from_file_location("experiments.char_lm", ROOT / "experiments" / "char_lm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("experiments.char_lm", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def manifest(char_lm, tmp_path_factory):
    """This interpreter's corpus (the committed manifest is for the Python that made the results)."""
    path = tmp_path_factory.mktemp("corpus") / "manifest.json"
    char_lm.write_manifest(path)
    return path


def test_a_changed_file_is_a_clear_error(char_lm, manifest, tmp_path):
    data = json.loads(manifest.read_text())
    data["files"][3]["sha256"] = "0" * 64
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(char_lm.CorpusError, match=rf"{data['files'][3]['path']}: sha256 .* != 0{{64}}"):
        char_lm.load_corpus(bad)
    with pytest.raises(char_lm.CorpusError, match="--write-manifest"):
        char_lm.load_corpus(tmp_path / "missing.json")


def test_committed_manifest_matches_when_the_python_version_does(char_lm):
    path = char_lm.default_manifest()
    if not path.is_file():
        pytest.skip(f"no committed corpus manifest for Python {char_lm.python_minor()} (results use 3.11)")
    train, heldout, data = char_lm.load_corpus(path)
    assert len(train) + len(heldout) == sum(f["bytes"] for f in data["files"]) + 2 * (len(data["files"]) - 2)


def test_arms_of_a_seed_share_initial_weights_and_batches(char_lm):
    cfg = char_lm.PRESETS["smoke"]
    states = []
    for arm in char_lm.ARMS:
        torch.manual_seed(7)
        states.append(char_lm.build_model(cfg, arm).state_dict())
    shared = [name for name in states[0]]
    assert shared and all(torch.equal(states[0][n], s[n]) for s in states[1:] for n in shared)
    assert "blocks.0.attn.alpha_logit" in states[2] and "blocks.0.attn.span_theta" in states[1]
    a = char_lm.batch_starts(3, cfg, 10_000)
    assert (a == char_lm.batch_starts(3, cfg, 10_000)).all()
    assert (a != char_lm.batch_starts(4, cfg, 10_000)).any()


def test_attention_cost_formula(char_lm):
    # z = 0, R = 32, L = 256: a query with full history reads 32 keys of 256.
    at_context, in_window = char_lm.attention_cost([[0.0, 0.0]], 32.0, 256)
    assert at_context == pytest.approx(32 / 256)
    # In a window, positions i < 32 read all i + 1 keys.
    expected = (sum(range(1, 33)) + 32 * (256 - 32)) / sum(range(1, 257))
    assert in_window == pytest.approx(expected)
    assert char_lm.attention_cost([[300.0]], 32.0, 256) == (1.0, 1.0)
    assert char_lm.attention_cost([[10.5]], 4.0, 100)[0] == pytest.approx(math.ceil(14.5) / 100)


def test_smoke_preset_runs_end_to_end(char_lm, manifest, tmp_path):
    plots = importlib.util.find_spec("matplotlib") is not None
    result = char_lm.run("smoke", out_dir=tmp_path, workers=1, plots=plots, manifest=manifest)
    assert {r["arm"] for r in result["runs"]} == set(char_lm.ARMS)
    for r in result["runs"]:
        assert math.isfinite(r["heldout_bpc"]) and 0 < r["heldout_bpc"] < 9
        assert len(r["curve"]) == 2
    span = result["summary"]["span+alpha"]
    assert len(span["spans_per_head_mean"]) == 1 and len(span["spans_per_head_mean"][0]) == 2
    assert all(1 < a < 2 for a in span["alpha_per_head_mean"][0])
    assert (tmp_path / "char_lm_smoke.json").is_file() and "| span+alpha |" in (tmp_path / "char_lm_smoke.md").read_text()
    if plots:
        assert all(Path(p).stat().st_size > 0 for p in result["plots"])


def test_set_overrides_parse_by_field_type(char_lm):
    out = char_lm.parse_overrides(["lr=0.02", "steps=7", "arms=full,span", "backend=none", "seeds=1,2"])
    assert out == {"lr": 0.02, "steps": 7, "arms": ("full", "span"), "backend": None, "seeds": (1, 2)}
    with pytest.raises(ValueError, match="FIELD one of"):
        char_lm.parse_overrides(["learning_rate=1"])
    with pytest.raises(ValueError, match="arms must be"):
        char_lm.parse_overrides(["arms=full,nope"])


def test_bigram_yardstick(char_lm):
    # A strictly alternating text is predictable from the previous byte: close to 0 bits.
    assert char_lm.bigram_bpc(b"ab" * 500, b"ab" * 50) < 0.01
    # Bytes never seen after their predecessor cost many bits (smoothing keeps them finite).
    assert 10 < char_lm.bigram_bpc(b"ab" * 500, b"a" * 100) < 20
