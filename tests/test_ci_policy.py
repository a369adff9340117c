"""No silent skips in CI (tests/conftest.py): with CI set, a missing test dependency stops the
run, and a skip not listed in EXPECTED_SKIPS fails; without CI both stay skips."""

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


@pytest.fixture
def project(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_deps="import pytest\n\npytest.importorskip('attnspec_absent_dependency')\n\n\ndef test_a():\n    pass\n",
        test_inside="import pytest\n\n\ndef test_b():\n    pytest.skip('not today')\n\n\ndef test_c():\n    pass\n",
    )
    return pytester


def test_without_ci_skips_stay_skips(project, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    project.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1, skipped=2)


def test_in_ci_every_unlisted_skip_fails(project, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "test_inside.py")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_b was skipped in CI (Skipped: not today)*EXPECTED_SKIPS*"])
    # a module skipped for want of an import is a collection error, which stops the run
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "test_deps.py")
    result.assert_outcomes(errors=1)
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*test_deps.py was skipped in CI*attnspec_absent_dependency*"])


def test_in_ci_a_missing_test_dependency_stops_the_run(pytester, monkeypatch):
    conftest = CONFTEST.replace('TEST_DEPENDENCIES = ("torch",', 'TEST_DEPENDENCIES = ("attnspec_absent_dependency", "torch",')
    assert conftest != CONFTEST
    pytester.makeconftest(conftest)
    pytester.makepyfile(test_a="def test_a():\n    pass\n")
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*CI is set but test dependencies are missing: attnspec_absent_dependency*"])
    monkeypatch.delenv("CI")
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_every_listed_skip_names_a_test_that_exists():
    from conftest import EXPECTED_SKIPS

    for nodeid, reason in EXPECTED_SKIPS.items():
        path, name = nodeid.split("::")
        source = (Path(__file__).parents[1] / path).read_text()
        assert f"def {name}(" in source, nodeid
        assert reason
