"""Fuzzing through the agent: malformed requests sent by the installed shims to a running `pycni agent`.

tests/fuzz/test_fuzz_plugins.py drives the plugins in-process and as cold processes; here the same
generated requests (requests.py, profiles.py: broken JSON, wrong types, values out of range,
injection strings, wrong environment, bad versions) go through the shims `pycni install` writes, to
an agent of this test (tests/plugin_modes.py: ``running_agent``, in a namespace of its own, on a socket
in the test's directory). A bounded number per plugin (``PYCNI_FUZZ_AGENT_EXAMPLES``, default 20). Then:

* every answer is a spec error object with an allowed code, exit 1, no traceback (``judge``);
* the agent took every request (served, or sent back to its caller's process by its own rules:
  ``declined``), refused none as a protocol error, and is alive afterwards;
* the agent holds no more file descriptors than before the batch (sockets, namespace descriptors and
  pipes of every request closed), and no more threads;
* nothing in the node changed (the same snapshot as test_fuzz_plugins.py takes);
* afterwards the agent itself still serves a valid request (loopback ADD) with a correct result.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings

from tests.plugin_modes import install, running_agent

from .harness import FuzzNode, fuzz_node, judge, run_process, snapshot, state_diff
from .profiles import PROFILES
from .requests import malformed_request

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("PYCNI_FUZZ_AGENT_EXAMPLES", "20"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


@pytest.fixture(scope="module")
def warm(tmp_path_factory) -> Iterator[tuple[FuzzNode, object]]:
    """A fuzz node whose plugins are shims of an agent of this module (the base pod attached through it)."""
    workdir = str(tmp_path_factory.mktemp("fuzz-agent"))
    bin_dir = os.path.join(workdir, "bin")
    with running_agent(workdir, ns_prefix="fzagt") as agent:
        install(bin_dir, agent.socket_path)
        with fuzz_node(bin_dir, tag="fzagt") as fn:
            yield fn, agent
        assert agent.alive(), agent.log_tail()


def steady(pid: int, count, settle: float = 3.0) -> int:
    """The count once it stops falling (requests' threads and descriptors may close a moment late)."""
    deadline = time.monotonic() + settle
    last = count(pid)
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = count(pid)
        if now == last:
            return now
        last = now
    return last


@pytest.mark.parametrize("plugin", sorted(PROFILES))
def test_malformed_requests_through_the_agent_are_refused_cleanly_and_leak_nothing(plugin, warm):
    fn, agent = warm
    profile = PROFILES[plugin]
    before_counts = agent.status()["requests"]
    fds, threads = steady(agent.pid, fd_count), steady(agent.pid, thread_count)
    baseline = snapshot(fn)
    sent: list[str] = []
    problems: list[str] = []

    @settings(
        max_examples=EXAMPLES, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(req=malformed_request(profile, fn))
    def one_request(req) -> None:
        assume(not req.in_process_only)  # a NUL in the environment cannot reach execve, nor the shim
        answer = run_process(fn, req)
        sent.append(req.what)
        problem = judge(req, answer)
        if problem:
            problems.append(f"{problem}\n{req.describe()}")
        assert agent.alive(), f"the agent died on:\n{req.describe()}\n{agent.log_tail()}"

    one_request()
    assert not problems, "\n\n".join(problems[:10])
    assert len(sent) >= EXAMPLES // 2, f"only {len(sent)} requests could be sent"
    after_counts = agent.status()["requests"]
    delta = {k: after_counts[k] - before_counts.get(k, 0) for k in after_counts}
    assert delta["served"] + delta["declined"] == len(sent), (delta, len(sent))
    assert delta["served"] >= len(sent) // 2, delta
    for kind in ("refused", "denied", "bad_requests", "timed_out", "busy", "over_capacity"):
        assert delta[kind] == 0, delta
    assert steady(agent.pid, fd_count) <= fds, f"the agent holds more descriptors: {fds} -> {fd_count(agent.pid)}"
    assert steady(agent.pid, thread_count) <= threads
    now = snapshot(fn)
    assert now == baseline, state_diff(baseline, now)
    assert "Traceback" not in agent.log_text(), agent.log_tail(80)


def test_the_agent_still_serves_valid_requests_after_the_fuzzing(warm):
    fn, agent = warm
    served = agent.status()["requests"]["served"]
    env = {"PATH": os.environ["PATH"], **{k: v for k, v in fn.env("ADD", ifname="lo").items() if v is not None}}
    done = subprocess.run(
        ["ip", "netns", "exec", fn.node.name, os.path.join(fn.bin_dir, "loopback")],
        input=b'{"cniVersion": "1.1.0", "name": "fuzznet", "type": "loopback"}',
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done
    result = json.loads(done.stdout)
    assert result["cniVersion"] == "1.1.0" and result["interfaces"][0]["name"] == "lo", result
    assert agent.status()["requests"]["served"] == served + 1
