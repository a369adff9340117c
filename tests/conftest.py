"""Hypothesis profiles: `ci` (small, derandomised: the same examples every run) is the default;
HYPOTHESIS_PROFILE=thorough runs many more, with fresh randomness."""

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


@pytest.fixture
def clean_registry(monkeypatch):
    """No ATTNSPEC_BACKEND during the test, and every backend it registers removed after it."""
    from attnspec.dispatch import registry

    monkeypatch.delenv("ATTNSPEC_BACKEND", raising=False)
    before = set(registry.names())
    yield
    for name in set(registry.names()) - before:
        registry.unregister_backend(name)
