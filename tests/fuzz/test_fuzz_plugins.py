"""Property-based fuzzing: every plugin refuses hundreds of malformed requests cleanly.

For each plugin, hypothesis generates malformed requests (seeded: derandomize,
so every run sends the same ones; ``PYCNI_FUZZ_EXAMPLES`` raises the count,
300 in CI) from the kinds listed in requests.py: broken JSON, wrong types in
every option, values out of range, injection strings, NUL and unpaired
surrogates, wrong environment, bad versions. Each request must

* exit 1 with a spec error object on stdout carrying an allowed code,
* write no Python traceback, and
* change nothing: the node's links, addresses, routes, qdiscs and filters,
  nftables and iptables state, the pod's links, and every file under the
  node's data directories are compared with a snapshot after each batch.

Most requests go through the skeleton's ``dispatch`` in this process, inside
the node namespace; one in ``PROCESS_EVERY`` runs as a real plugin process in
the node, as a runtime runs it.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .harness import Tally, error_code, judge, run_in_process, run_process, snapshot, state_diff
from .profiles import PROFILES
from .requests import malformed_request

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("PYCNI_FUZZ_EXAMPLES", "300"))
PROCESS_EVERY = 10  # one request in ten runs as a process
# PYCNI_FUZZ_SURVEY=1: record every problem and go on (a survey), rather than stop at the first
SURVEY = os.environ.get("PYCNI_FUZZ_SURVEY") == "1"
BATCH = 25  # requests between two state snapshots


def fuzz_settings():
    return settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


@pytest.mark.parametrize("plugin", sorted(PROFILES))
def test_malformed_requests_are_refused_cleanly(plugin, fuzz_env, tallies):
    profile = PROFILES[plugin]
    tally = Tally(plugin)
    tallies.append(tally)
    baseline = snapshot(fuzz_env)
    changes: list[str] = []
    pending: list = []

    def check_batch() -> None:
        nonlocal baseline
        if not pending:
            return
        now = snapshot(fuzz_env)
        tally.batches += 1
        if now != baseline:
            tally.state_changes += 1
            changes.append(
                state_diff(baseline, now)
                + "\nafter one of these requests:\n"
                + "\n".join(r.describe() for r in pending)
            )
            baseline = now  # the next batch is judged on its own
        pending.clear()

    @fuzz_settings()
    @given(req=malformed_request(profile, fuzz_env), pick=st.just(None))
    def one_request(req, pick) -> None:
        as_process = tally.cases % PROCESS_EVERY == 0 and not req.in_process_only
        answer = run_process(fuzz_env, req) if as_process else run_in_process(fuzz_env, req)
        tally.cases += 1
        tally.processes += as_process
        tally.in_process += not as_process
        tally.kinds[req.what.split("/")[0]] += 1
        tally.codes[error_code(answer)] += 1
        if "Traceback" in answer.stderr:
            tally.tracebacks += 1
        pending.append(req)
        if len(pending) >= BATCH:
            check_batch()
        problem = judge(req, answer)
        if problem:
            tally.problems.append(f"{req.what}: {problem.splitlines()[0]}\n{req.describe()}")
            if not SURVEY:
                raise AssertionError(f"{problem}\n{req.describe()}")

    one_request()
    check_batch()
    assert not tally.problems, "\n\n".join(tally.problems[:30])
    assert not changes, "\n\n".join(changes)
    assert tally.cases >= EXAMPLES, f"only {tally.cases} requests were generated"
    assert tally.processes >= EXAMPLES // PROCESS_EVERY // 2
