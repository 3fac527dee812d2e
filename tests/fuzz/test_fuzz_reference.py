"""The same malformed requests sent to the reference Go plugins in /usr/lib/cni: a survey, not a test.

Opt-in (``PYCNI_FUZZ_REFERENCE=1``): for each plugin with a reference, the
requests of test_fuzz_plugins.py (cniVersion 1.0.0, the reference's newest;
ADD, DEL and CHECK only) run as reference processes in a node namespace, and
every departure from what the spec asks is recorded: an exit status other
than 1, stdout that is no error object, a code outside the allowed ones, a
Go panic on stderr, a change to the node's state. Nothing is asserted about
the reference; the tallies go to the terminal and, with PYCNI_FUZZ_REPORT_REF,
to a JSON file. Requests whose strings name directories are left out: a Go
plugin decodes an unpaired surrogate to U+FFFD and would create that
directory wherever the mangled path points.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings

from tests.helpers.plugins import REFERENCE_DIR, has_reference

from .harness import Tally, error_code, fuzz_node, judge, run_process, snapshot, state_diff
from .profiles import PROFILES
from .requests import malformed_request

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("PYCNI_FUZZ_REFERENCE") != "1",
        reason="a survey of the reference plugins: set PYCNI_FUZZ_REFERENCE=1 to run it",
    ),
]

EXAMPLES = int(os.environ.get("PYCNI_FUZZ_EXAMPLES", "300"))
SURVEY: dict[str, dict] = {}


@pytest.fixture(scope="module")
def reference_env(launcher_dir):
    with fuzz_node(launcher_dir, tag="fzref") as fn:  # the base attachment is pycni's; requests go to Go
        fn.bin_dir = REFERENCE_DIR
        yield fn
    target = os.environ.get("PYCNI_FUZZ_REPORT_REF")
    if target:
        with open(target, "w", encoding="utf-8") as handle:
            json.dump(SURVEY, handle, indent=2)


@pytest.mark.parametrize("plugin", [p for p in sorted(PROFILES) if has_reference(p)])
def test_reference_survey(plugin, reference_env, capsys):
    profile = PROFILES[plugin]
    tally = Tally(plugin)
    departures: Counter = Counter()
    examples: dict[str, str] = {}
    state = {"before": snapshot(reference_env)}

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[__import__("hypothesis").Phase.generate],
    )
    @given(req=malformed_request(profile, reference_env))
    def one(req) -> None:
        assume(req.command in ("ADD", "DEL", "CHECK") and not req.in_process_only)
        assume(b"Dir" not in req.stdin or req.what.split("/")[0] not in ("string", "json"))
        req.stdin = req.stdin.replace(b'"1.1.0"', b'"1.0.0"')
        answer = run_process(reference_env, req)
        tally.cases += 1
        tally.processes += 1
        tally.codes[error_code(answer)] += 1
        kind = req.what
        problem = judge(req, answer, need_version=False)
        if answer.exit_code == 1 and answer.stdout.strip().startswith("{") and '"cniVersion"' not in answer.stdout:
            departures["error object without cniVersion (spec 1.0 requires it)"] += 1
        if "panic:" in answer.stderr or "goroutine " in answer.stderr:
            departures["panic"] += 1
            examples.setdefault("panic", f"{kind}: {answer.stderr[:300]}")
        if problem:
            label = (
                "accepted"
                if answer.exit_code == 0
                else f"code {error_code(answer)} not {'/'.join(map(str, sorted(req.expect)))}"
                if problem.startswith("code")
                else "no error object"
            )
            departures[f"{label}: {kind}"] += 1
            examples.setdefault(f"{label}: {kind}", f"{problem.splitlines()[0][:300]}\n{req.describe()[:700]}")
        after = snapshot(reference_env)
        if after != state["before"]:
            tally.state_changes += 1
            departures[f"state changed: {kind}"] += 1
            examples.setdefault(f"state changed: {kind}", state_diff(state["before"], after)[:500])
            state["before"] = after

    one()
    SURVEY[plugin] = {**tally.as_dict(), "departures": dict(departures.most_common()), "examples": examples}
    with capsys.disabled():
        print(
            f"\nreference {plugin}: {tally.cases} requests, state changes {tally.state_changes}, "
            f"codes {dict(sorted(tally.codes.items(), key=str))}"
        )
        for what, count in departures.most_common(25):
            print(f"  {count:>4}  {what}")
