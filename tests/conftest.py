"""Hypothesis profiles: `ci` (small, derandomised: the same examples every run) is the default;
HYPOTHESIS_PROFILE=thorough runs many more, with fresh randomness.

No silent skips in CI: with the environment variable CI set, a missing test dependency stops
the run before any test, and a skip not listed in EXPECTED_SKIPS is a failure."""

import importlib.util
import os

import pytest

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
pytest_plugins = ["pytester"]

# The suite runs the Triton kernels on CPU, under Triton's interpreter. Triton reads the variable
# when the backend first loads, and any test can load it first (the dispatcher considers every
# backend), so it is set before any test runs rather than by the modules that need it.
# CUDA runs of the kernels go through tools/gpu_session.py, which clears it.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def clean_registry(monkeypatch):
    """No ATTNSPEC_BACKEND during the test, and every backend it registers removed after it."""
    from attnspec.dispatch import registry

    monkeypatch.delenv("ATTNSPEC_BACKEND", raising=False)
    before = set(registry.names())
    yield
    for name in set(registry.names()) - before:
        registry.unregister_backend(name)


#: What the test suite imports beyond numpy (the `test` extra of pyproject.toml installs them).
#: With CI set, the run fails unless all are importable.
TEST_DEPENDENCIES = ("torch", "jax", "flax", "triton", "entmax", "matplotlib", "transformers")

#: The only skips CI accepts: test (node id without parameters) -> why it may skip there.
EXPECTED_SKIPS = {
    "tests/test_peer_adapters.py::test_adasplash_declares_cuda_and_refuses_sizes_it_cannot_take":
        "AdaSplash is a peer, not a test dependency: it is checked where it is installed",
    "tests/test_docs_snippets.py::test_python_block_runs":
        "a documentation block marked `# requires: cuda` on a machine without CUDA (CI requires every "
        "test dependency, so no other requirement can be missing there)",
    "tests/test_conformance_gaps.py::test_span_weight_near_the_outer_kink":
        "a backend that does not run the dtype here: jax makes float64 only under jax_enable_x64, "
        "triton has no float64",
    "tests/test_triton_backend.py::test_kernels_compile_for_a_cuda_target":
        "compiling every kernel for a CUDA target takes minutes; runs with ATTNSPEC_TRITON_COMPILE=1",
    "tests/test_char_lm.py::test_committed_manifest_matches_when_the_python_version_does":
        "the corpus manifest is committed for one Python minor version (its results use 3.11)",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_dependencies(names=TEST_DEPENDENCIES) -> list:
    return [name for name in names if importlib.util.find_spec(name) is None]


def pytest_configure(config):
    if in_ci():
        missing = missing_dependencies()
        if missing:
            raise pytest.UsageError(
                f"CI is set but test dependencies are missing: {', '.join(missing)} "
                "(install the `test` extra: pip install -e '.[test]' -c constraints.txt)")


def _unexpected_skip(nodeid: str, report) -> bool:
    return in_ci() and report.skipped and not hasattr(report, "wasxfail") and nodeid.split("[")[0] not in EXPECTED_SKIPS


def _as_failure(report, nodeid):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (f"{nodeid} was skipped in CI ({reason}); CI accepts only the skips listed in "
                       "tests/conftest.py EXPECTED_SKIPS")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _unexpected_skip(item.nodeid, report):
        _as_failure(report, item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _unexpected_skip(collector.nodeid, report):  # e.g. a module-level importorskip
        _as_failure(report, collector.nodeid)
