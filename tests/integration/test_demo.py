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
    proc = subprocess.run([sys.executable, "-c", "from pycni.cli import main; main()", "demo", "--pods", "2"],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert "checks passed" in proc.stdout
    for line in ("arrives from the node", "keeps the pod address", "portmap to", "ping node ->"):
        assert line in proc.stdout
    # This run's tag and work directory, as it printed them.
    tag = re.search(r"node namespace: pycni-demo-node-([0-9a-f]+)", proc.stdout)
    workdir = re.search(r"work dir (/\S+)", proc.stdout)
    assert tag and workdir, proc.stdout
    assert not [name for name in netns.list_names() if name.startswith("pycni-demo-") and
                name.endswith(f"-{tag.group(1)}")], "the demo left its namespaces behind"
    assert not os.path.exists(workdir.group(1)), "the demo left its work directory behind"
