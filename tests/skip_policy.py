"""The skip policy: with PYCNI_STRICT_SKIPS=1 a test may skip only for a reason that belongs to the machine.

CI (.ci/run) sets PYCNI_STRICT_SKIPS=1. .ci/setup installs every tool and package the suite uses (etcd,
the reference plugins, Go and libcni, containerd, podman, Graphviz, vagrant, openssl, iperf3, a C
compiler) and CI runs as root, so a skip for a missing tool, for lack of root or for a failed build hides a
failure there: at the end of the session the offending tests are listed with their reasons and the exit
status is 1. What may still skip (``ALLOWED``):

- a kernel feature this machine lacks (DESIGN.md: no 802.1Q VLAN devices, no bridge VLAN filtering, no
  ipvlan, geneve, dummy links or WireGuard; a module or netlink kind the kernel refuses);
- an opt-in run that is not CI's: the README's pictures (PYCNI_DOCS_PICTURES=1), the survey of the
  reference plugins under fuzzing (PYCNI_FUZZ_REFERENCE=1);
- the installed reference plugins' own limits (Debian's v1.1.1 implements the CNI spec up to 1.0.0) and
  cases a parametrization does not apply to (the reference has no vxlan plugin; only an etcd store can
  go away).

Without PYCNI_STRICT_SKIPS=1 (a developer's machine) nothing changes. Registered from tests/conftest.py
(``pytest_plugins``); ``-p tests.skip_policy`` loads it on its own.
"""

from __future__ import annotations

import os
import re

import pytest

ENV = "PYCNI_STRICT_SKIPS"

ALLOWED: list[tuple[str, re.Pattern[str]]] = [
    (why, re.compile(pattern, re.IGNORECASE))
    for why, pattern in [
        (
            "a kernel feature the machine lacks",
            r"\bkernel\b.*\b(lacks|has no|does not|cannot|refuses|without)\b|\bCONFIG_[A-Z0-9_]+|"
            r"cannot create an? (VXLAN|VLAN|802\.1Q|ipvlan|macvlan|geneve|dummy|wireguard|ifb|veth|bridge)\b.*device|"
            r"\b(module|netlink kind|link kind)\b.*\b(missing|not available|unsupported|unknown|lacks)\b",
        ),
        ("an opt-in run (the README's pictures)", r"PYCNI_DOCS_PICTURES=1"),
        ("an opt-in run (the reference plugins under fuzzing)", r"PYCNI_FUZZ_REFERENCE=1"),
        ("the installed reference plugins' spec version", r"reference v1\.1\.1 implements CNI spec up to 1\.0\.0"),
        (
            "a parametrization that does not apply",
            r"the reference plugins have no vxlan plugin|"
            r"only an etcd store can go away",
        ),
    ]
]


def allowed(reason: str) -> str | None:
    """Why ``reason`` may skip under the strict policy (None: it may not)."""
    for why, pattern in ALLOWED:
        if pattern.search(reason):
            return why
    return None


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        text = str(longrepr[2])
    else:
        text = str(longrepr)
    return text.removeprefix("Skipped: ")


class SkipPolicy:
    """Collects every skip of the session; fails the session for the disallowed ones."""

    def __init__(self) -> None:
        self.offenders: list[tuple[str, str]] = []  # (test id, reason)

    def _seen(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = _reason(report)
            if allowed(reason) is None:
                self.offenders.append((report.nodeid, reason))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._seen(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        self._seen(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.offenders and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.offenders:
            return
        terminalreporter.write_sep(
            "=", f"{ENV}=1: {len(self.offenders)} tests skipped for reasons CI must not have", red=True, bold=True
        )
        for nodeid, reason in self.offenders:
            terminalreporter.write_line(f"SKIP NOT ALLOWED {nodeid}: {reason}")
        terminalreporter.write_line(
            "Only reasons that belong to the machine may skip (tests/skip_policy.py ALLOWED); "
            "install what is missing (.ci/setup) or fix what failed."
        )


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(ENV) == "1" and not config.pluginmanager.has_plugin("pycni-skip-policy"):
        config.pluginmanager.register(SkipPolicy(), "pycni-skip-policy")
