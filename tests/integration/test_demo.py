"""The README's main job: `pycni demo` builds, checks and removes a live network.

Hermetic: the demo names everything it makes after a random tag
(``pycni-demo-<role>-<tag>`` namespaces, a ``pycni-demo-*`` work directory it
prints), and only those are checked afterwards, so another demo, benchmark or
test running on the machine at the same time cannot make this test fail.
"""

import os
import re
import subprocess
import sys

import pytest

import netns

pytestmark = pytest.mark.integration  # the demo needs root


def test_demo_runs_green_and_leaves_nothing_behind():
    proc = subprocess.run(
        [sys.executable, "-c", "from pycni.cli import main; main()", "demo", "--pods", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert "checks passed" in proc.stdout
    for line in ("arrives from the node", "keeps the pod address", "portmap to", "ping node ->"):
        assert line in proc.stdout
    # This run's tag and work directory, as it printed them.
    tag = re.search(r"node namespace: pycni-demo-node-([0-9a-f]+)", proc.stdout)
    workdir = re.search(r"work dir (/\S+)", proc.stdout)
    assert tag and workdir, proc.stdout
    assert not [
        name for name in netns.list_names() if name.startswith("pycni-demo-") and name.endswith(f"-{tag.group(1)}")
    ], "the demo left its namespaces behind"
    assert not os.path.exists(workdir.group(1)), "the demo left its work directory behind"


def test_the_dual_stack_multinode_demo_runs_green_in_both_families_and_leaves_nothing_behind():
    proc = subprocess.run(
        [sys.executable, "-c", "from pycni.cli import main; main()", "demo", "--nodes", "2", "--dual-stack"],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert "dual-stack vxlan overlay" in proc.stdout and "IPv6 network fd00:10:244::/56" in proc.stdout
    # Every pod has an address of each family, and each family is checked: pings and TCP with the seen source.
    adds = re.findall(r"ADD node\d/pod\d: eth0 (\S+) via \S+, (\S+) via \S+", proc.stdout)
    assert len(adds) == 4 and all(":" not in v4 and v6.startswith("fd00:10:244:") for v4, v6 in adds), proc.stdout
    for line in (
        "across nodes",
        "IPv6 ping node0/pod0 -> node1/pod1",
        "IPv6 ping node0 -> node1/pod0",
        "rp_filter=1: IPv6 ping",
    ):
        assert line in proc.stdout, line
    # node0's gateway is the first address of whichever /64 node0 leased, and it answers after the churn.
    assert re.search(
        r"ok .*IPv6 ping node0/pod0 -> its gateway fd00:10:244:(?:[0-9a-f]{1,4}:)?:1 after the churn", proc.stdout
    ), proc.stdout
    seen = re.findall(r"IPv6 TCP node\d/pod0 \((\S+)\) -> .* seen from (\S+)", proc.stdout)
    assert len(seen) == 2 and all(src == got for src, got in seen), proc.stdout
    assert re.search(r"(\d+) of \1 checks passed", proc.stdout)
    tag = re.search(r"namespaces tagged (pycni-demo-[0-9a-f]+)", proc.stdout)
    workdir = re.search(r"work dir (/\S+)", proc.stdout)
    assert tag and workdir, proc.stdout
    assert not [name for name in netns.list_names() if name.startswith(tag.group(1))], "namespaces left behind"
    assert not os.path.exists(workdir.group(1)), "the demo left its work directory behind"


def test_dual_stack_needs_the_multinode_demo():
    proc = subprocess.run(
        [sys.executable, "-c", "from pycni.cli import main; main()", "demo", "--dual-stack"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2 and "--dual-stack needs --nodes N" in proc.stderr
