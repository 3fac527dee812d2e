"""The README's main job: `pycni demo` builds, checks and removes a live network."""
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
    assert not [name for name in netns.list_names() if name.startswith("pycni-demo-")]
