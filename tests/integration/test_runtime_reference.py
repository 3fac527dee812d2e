"""`pycni add/check/del` driving the reference Go plugins (/usr/lib/cni) for real.

Every test builds its own node namespace (standing in for the host: the
bridge, its firewall rules and the IPAM directory live there) and pod
namespace, runs `pycni` inside the node namespace with `ip netns exec`, and
removes everything afterwards, also on failure.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

REFERENCE_BIN = "/usr/lib/cni"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(not os.path.exists(f"{REFERENCE_BIN}/bridge"),
                       reason="reference CNI plugins not installed in /usr/lib/cni"),
]


def pycni_command() -> list[str]:
    """The installed console script next to our interpreter, else the module."""
    script = Path(sys.executable).parent / "pycni"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "pycni.cli"]


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


@pytest.fixture
def namespaces():
    """Creates namespaces on demand; removes them all at the end."""
    created: list[str] = []

    def make(role: str) -> str:
        name = f"pt-{role}-{secrets.token_hex(4)}"
        sh("ip", "netns", "add", name)
        created.append(name)
        return name

    yield make
    for name in reversed(created):
        sh("ip", "netns", "del", name, check=False)


class Node:
    """A node namespace with its own config dir, IPAM dir and cache dir."""

    def __init__(self, name: str, root: Path, cni_path: str = REFERENCE_BIN) -> None:
        self.name = name
        self.root = root
        self.conf_dir = root / "net.d"
        self.ipam_dir = root / "ipam"
        self.cache_dir = root / "cache"
        self.cni_path = cni_path
        self.conf_dir.mkdir()

    def write_network(self, raw: dict) -> None:
        (self.conf_dir / f"10-{raw['name']}.conflist").write_text(json.dumps(raw))

    def pycni(self, *args: str, cap_args: dict | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_") and k != "CAP_ARGS"}
        env.update(NETCONFPATH=str(self.conf_dir), CNI_PATH=self.cni_path, CNI_CACHE_DIR=str(self.cache_dir))
        if cap_args is not None:
            env["CAP_ARGS"] = json.dumps(cap_args)
        return subprocess.run(["ip", "netns", "exec", self.name, *pycni_command(), *args],
                              capture_output=True, text=True, env=env, timeout=60, check=False)

    def nat_rules(self) -> str:
        return sh("ip", "netns", "exec", self.name, "iptables-save", "-t", "nat").stdout


@pytest.fixture
def node(namespaces, tmp_path) -> Node:
    return Node(namespaces("node"), tmp_path)


def bridge_network(name: str, subnet: str, ipam_dir: Path, with_portmap: bool) -> dict:
    plugins: list[dict] = [{
        "type": "bridge", "bridge": "cni-t0", "isGateway": True, "ipMasq": True,
        "ipam": {"type": "host-local", "subnet": subnet, "dataDir": str(ipam_dir),
                 "routes": [{"dst": "0.0.0.0/0"}]},
    }]
    if with_portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"cniVersion": "1.0.0", "name": name, "plugins": plugins}


def pod_addresses(pod: str) -> list[str]:
    out = json.loads(sh("ip", "-n", pod, "-j", "addr", "show").stdout)
    return [f"{a['local']}/{a['prefixlen']}" for link in out if link["ifname"] == "eth0"
            for a in link.get("addr_info", []) if a["family"] == "inet"]


def pod_links(pod: str) -> list[str]:
    return [link["ifname"] for link in json.loads(sh("ip", "-n", pod, "-j", "link", "show").stdout)]


def container_id_of(node: Node, network: str, pod: str) -> str:
    entries = os.listdir(node.cache_dir / "results")
    assert len(entries) == 1, entries
    cached = json.loads((node.cache_dir / "results" / entries[0]).read_text())
    assert cached["networkName"] == network and cached["netns"] == f"/var/run/netns/{pod}"
    return cached["containerId"]


def test_bridge_hostlocal_portmap_add_and_del(node, namespaces):
    pod = namespaces("pod")
    node.write_network(bridge_network("refnet", "10.99.7.0/24", node.ipam_dir, with_portmap=True))
    mapping = {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}

    added = node.pycni("add", "refnet", pod, cap_args=mapping)
    assert added.returncode == 0, added.stderr
    result = json.loads(added.stdout)
    assert result["cniVersion"] == "1.0.0"
    assert [ip["address"] for ip in result["ips"]] == ["10.99.7.2/24"]
    assert pod_addresses(pod) == ["10.99.7.2/24"]
    container_id = container_id_of(node, "refnet", pod)
    rules = node.nat_rules()
    assert container_id in rules and "--dport 18080" in rules and "CNI-DN-" in rules
    assert (node.ipam_dir / "refnet" / "10.99.7.2").exists()

    # CAP_ARGS is not needed again: DEL reuses what ADD cached.
    for attempt in (1, 2):
        deleted = node.pycni("del", "refnet", pod)
        assert deleted.returncode == 0, f"DEL #{attempt}: {deleted.stderr}"

    assert "eth0" not in pod_links(pod)
    assert sorted(os.listdir(node.ipam_dir / "refnet")) == ["last_reserved_ip.0", "lock"]
    rules = node.nat_rules()
    assert container_id not in rules
    assert "CNI-DN-" not in rules
    assert os.listdir(node.cache_dir / "results") == []


def test_check_passes_then_fails_when_address_removed(node, namespaces):
    pod = namespaces("pod")
    # No portmap here: Debian's v1.1.1 portmap CHECK fails on IPv4-only networks
    # (it looks for an ip6tables chain), which would hide what this test checks.
    node.write_network(bridge_network("chknet", "10.99.8.0/24", node.ipam_dir, with_portmap=False))
    added = node.pycni("add", "chknet", pod)
    assert added.returncode == 0, added.stderr

    checked = node.pycni("check", "chknet", pod)
    assert checked.returncode == 0, checked.stderr

    sh("ip", "-n", pod, "addr", "del", "10.99.8.2/24", "dev", "eth0")
    checked = node.pycni("check", "chknet", pod)
    assert checked.returncode != 0
    assert checked.stdout == ""
    assert checked.stderr.startswith("Error: plugin 'bridge' failed (CHECK)"), checked.stderr
    assert "CNI code" in checked.stderr

    for _ in range(2):
        deleted = node.pycni("del", "chknet", pod)
        assert deleted.returncode == 0, deleted.stderr
    assert "eth0" not in pod_links(pod)
    assert sorted(os.listdir(node.ipam_dir / "chknet")) == ["last_reserved_ip.0", "lock"]


def test_plugin_type_with_path_is_refused_before_anything_runs(node, namespaces, tmp_path):
    pod = namespaces("pod")
    # "../../something" seen from CNI_PATH=<tmp>/a/b would be <tmp>/something.
    bin_dir = tmp_path / "a" / "b"
    bin_dir.mkdir(parents=True)
    marker = tmp_path / "EXECUTED"
    evil = tmp_path / "something"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\necho '{{\"cniVersion\":\"1.0.0\"}}'\n")
    evil.chmod(0o755)
    # A harmless plugin first in the chain: not even it may run.
    first_marker = tmp_path / "FIRST-RAN"
    first = bin_dir / "first"
    first.write_text(f"#!/bin/sh\ntouch {first_marker}\necho '{{\"cniVersion\":\"1.0.0\"}}'\n")
    first.chmod(0o755)
    node.cni_path = str(bin_dir)
    node.write_network({"cniVersion": "1.0.0", "name": "evilnet",
                        "plugins": [{"type": "first"}, {"type": "../../something"}]})

    for command in ("add", "check", "del"):
        run = node.pycni(command, "evilnet", pod)
        assert run.returncode == 1
        assert "field 'plugins[1].type'" in run.stderr and "'../../something'" in run.stderr, run.stderr
        assert "(CNI code 7)" in run.stderr
    assert not marker.exists()
    assert not first_marker.exists()
    assert not node.cache_dir.exists()
