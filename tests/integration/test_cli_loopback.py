"""`pycni install` + pycni's own loopback plugin, run through `pycni add/check/del`."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.helpers.plugins import pycni_command
from tests.helpers.state import link

pytestmark = pytest.mark.integration


def lo_is_up(pod) -> bool:
    return "UP" in link(pod, "lo")["flags"]


def test_installed_loopback_through_pycni(make_node, tmp_path):
    node = make_node()
    pod = node.pod()
    bin_dir = tmp_path / "bin"
    # A socket of the test's own (no agent there: the shims run cold), never the machine's /run/pycni one,
    # where an agent of someone else's may be serving.
    socket_path = tmp_path / "run" / "agent.sock"
    installed = subprocess.run(
        [*pycni_command(), "install", "--cni-bin-dir", str(bin_dir), "--agent-socket", str(socket_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    assert (bin_dir / "loopback").exists()

    node.write_network({"cniVersion": "1.0.0", "name": "lonet", "plugins": [{"type": "loopback"}]})
    node.cni_path = str(bin_dir)

    assert not lo_is_up(pod)
    added = node.pycni("add", "lonet", pod.name)
    assert added.returncode == 0, added.stderr
    result = json.loads(added.stdout)
    assert result["interfaces"][0]["name"] == "lo"
    assert "127.0.0.1/8" in [ip["address"] for ip in result["ips"]]
    assert lo_is_up(pod)

    checked = node.pycni("check", "lonet", pod.name)
    assert checked.returncode == 0, checked.stderr

    for _ in range(2):
        deleted = node.pycni("del", "lonet", pod.name)
        assert deleted.returncode == 0, deleted.stderr
    assert not lo_is_up(pod)
    assert os.listdir(node.cache_dir / "results") == []
