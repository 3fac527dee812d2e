"""The skip policy (tests/skip_policy.py) in sessions of its own (pytester): with PYCNI_STRICT_SKIPS=1 a skip
for a reason CI must not have fails the session and is listed; a machine's reason does not; without the
variable nothing changes."""

from __future__ import annotations

import os
import sys

import pytest

from tests.skip_policy import ENV, allowed

pytest_plugins = ["pytester"]

TESTS = """
import pytest

def test_runs():
    assert True

@pytest.mark.skipif(True, reason="kernel lacks bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)")
def test_kernel_feature():
    pass

@pytest.mark.skipif(True, reason="writes docs/inspect-*.png: set PYCNI_DOCS_PICTURES=1 to make the README's pictures")
def test_pictures():
    pass

@pytest.mark.xfail(reason="an expected failure is no skip")
def test_expected_failure():
    assert False
"""
DISALLOWED = """

def test_needs_a_tool():
    pytest.skip("/usr/bin/etcd is missing (apt-get install -y etcd-server)")
"""


def run(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    pytester.makepyfile(test_sample=source)
    return pytester.runpytest_subprocess("-p", "tests.skip_policy", "-rs")


@pytest.fixture
def importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's subprocess imports tests.skip_policy from this checkout."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, *sys.path]))


@pytest.fixture
def strict(monkeypatch: pytest.MonkeyPatch, importable: None) -> None:
    monkeypatch.setenv(ENV, "1")


def test_a_disallowed_skip_fails_the_session_and_is_listed(pytester, strict):
    result = run(pytester, TESTS + DISALLOWED)
    assert result.ret == 1
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    result.stdout.fnmatch_lines(
        [
            f"*{ENV}=1: 1 tests skipped for reasons CI must not have*",
            "SKIP NOT ALLOWED test_sample.py::test_needs_a_tool: /usr/bin/etcd is missing (apt-get install -y etcd-server)",
        ]
    )
    assert "SKIP NOT ALLOWED test_sample.py::test_kernel_feature" not in result.stdout.str()


def test_allowed_skips_pass_the_session(pytester, strict):
    result = run(pytester, TESTS)
    assert result.ret == 0
    result.assert_outcomes(passed=1, skipped=2, xfailed=1)
    assert "SKIP NOT ALLOWED" not in result.stdout.str()


def test_a_module_skipped_at_collection_counts_too(pytester, strict):
    result = run(pytester, 'import pytest\npytest.skip("needs root", allow_module_level=True)\n')
    assert result.ret == 1
    result.stdout.fnmatch_lines(["SKIP NOT ALLOWED test_sample.py: needs root"])


def test_without_the_variable_nothing_changes(pytester, monkeypatch, importable):
    monkeypatch.delenv(ENV, raising=False)
    result = run(pytester, TESTS + DISALLOWED)
    assert result.ret == 0
    assert "SKIP NOT ALLOWED" not in result.stdout.str()


@pytest.mark.parametrize(
    "reason",
    [
        "kernel lacks bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING)",
        "cannot create a VXLAN device in a namespace: RTNETLINK answers: Operation not supported",
        "writes docs/inspect-*.png: set PYCNI_DOCS_PICTURES=1 to make the README's pictures",
        "a survey of the reference plugins: set PYCNI_FUZZ_REFERENCE=1 to run it",
        "the reference v1.1.1 implements CNI spec up to 1.0.0 (GC/STATUS: 'missing containerID')",
    ],
)
def test_machine_reasons_are_allowed(reason):
    assert allowed(reason)


@pytest.mark.parametrize(
    "reason",
    [
        "needs root to create network namespaces",
        "marked integration: needs root to create network namespaces",
        "/usr/bin/etcd is missing (apt-get install -y etcd-server)",
        "cnitool cannot be built: Go is not installed (Debian package golang-go)",
        "the vagrant binary is missing (apt-get install vagrant)",
        "Graphviz's dot is missing (apt-get install graphviz)",
        "iperf3 not installed",
        "reference CNI plugins not installed in /usr/lib/cni",
        "needs a C compiler (cc or gcc)",
        "the installed package carries no compiled shim built from its source",
        "warm mode needs root (the agent enters network namespaces)",
    ],
)
def test_reasons_ci_must_not_have_are_not(reason):
    assert allowed(reason) is None
