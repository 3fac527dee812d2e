"""`pycni install` + pycni's own loopback plugin, run through `pycni add/check/del`."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]


def pycni_command() -> list[str]:
    script = Path(sys.executable).parent / "pycni"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pycni.cli"]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


@pytest.fixture
def node_and_pod():
    names = [f"pt-{role}-{secrets.token_hex(4)}" for role in ("node", "pod")]
    try:
        for name in names:
            sh("ip", "netns", "add", name)
        yield names
    finally:
        for name in names:
            sh("ip", "netns", "del", name, check=False)


def lo_is_up(pod: str) -> bool:
    link = json.loads(sh("ip", "-n", pod, "-j", "link", "show", "lo").stdout)[0]
    return "UP" in link["flags"]


def test_installed_loopback_through_pycni(node_and_pod, tmp_path):
    node, pod = node_and_pod
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    installed = subprocess.run([*pycni_command(), "install", "--cni-bin-dir", str(bin_dir)],
                               capture_output=True, text=True, check=False)
    assert installed.returncode == 0, installed.stderr
    assert (bin_dir / "loopback").exists()

    conf_dir.mkdir()
    (conf_dir / "99-lo.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "lonet", "plugins": [{"type": "loopback"}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    env.update(NETCONFPATH=str(conf_dir), CNI_PATH=str(bin_dir), CNI_CACHE_DIR=str(tmp_path / "cache"))

    def pycni(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", node, *pycni_command(), *args], capture_output=True,
                              text=True, env=env, timeout=60, check=False)

    assert not lo_is_up(pod)
    added = pycni("add", "lonet", pod)
    assert added.returncode == 0, added.stderr
    result = json.loads(added.stdout)
    assert result["interfaces"][0]["name"] == "lo"
    assert "127.0.0.1/8" in [ip["address"] for ip in result["ips"]]
    assert lo_is_up(pod)

    checked = pycni("check", "lonet", pod)
    assert checked.returncode == 0, checked.stderr

    for _ in range(2):
        deleted = pycni("del", "lonet", pod)
        assert deleted.returncode == 0, deleted.stderr
    assert not lo_is_up(pod)
    assert os.listdir(tmp_path / "cache" / "results") == []
