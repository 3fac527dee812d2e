"""Fixtures of the fuzz suite: one node with live state per module, and the run's tallies.

PYCNI_FUZZ_EXAMPLES sets the number of generated requests per plugin (default 300,
what CI runs); PYCNI_FUZZ_REPORT names a file to write the tallies to as JSON.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import pytest

from .harness import FuzzNode, Tally, fuzz_node

TALLIES: list[Tally] = []


@pytest.fixture(scope="module")
def fuzz_env(launcher_dir) -> Iterator[FuzzNode]:
    """A node namespace with a pod attached through bridge + portmap + bandwidth (removed at the end)."""
    with fuzz_node(launcher_dir) as fn:
        yield fn


@pytest.fixture(scope="session")
def tallies() -> Iterator[list[Tally]]:
    yield TALLIES
    target = os.environ.get("PYCNI_FUZZ_REPORT")
    if target and TALLIES:
        with open(target, "w", encoding="utf-8") as handle:
            json.dump([t.as_dict() for t in TALLIES], handle, indent=2)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not TALLIES:
        return
    terminalreporter.write_sep("-", "pycni fuzz: malformed requests per plugin")
    for t in TALLIES:
        terminalreporter.write_line(
            f"{t.plugin:<11} {t.cases:>5} cases ({t.processes} as processes), tracebacks {t.tracebacks}, "
            f"state changes {t.state_changes} in {t.batches} batches, codes {dict(sorted(t.codes.items(), key=str))}"
        )
