"""`pycni add/check/del` driving the reference Go plugins (/usr/lib/cni) for real.

Every test builds its own node namespace (standing in for the host: the
bridge, its firewall rules and the IPAM directory live there) and pod
namespace, runs `pycni` inside the node namespace with `ip netns exec`, and
removes everything afterwards, also on failure.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers.netenv import Node
from tests.helpers.plugins import has_reference
from tests.helpers.state import addresses, iptables_save, link_names

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not has_reference("bridge"), reason="reference CNI plugins not installed in /usr/lib/cni"),
]


def bridge_network(name: str, subnet: str, node: Node, with_portmap: bool) -> dict:
    plugins: list[dict] = [
        {
            "type": "bridge",
            "bridge": "cni-t0",
            "isGateway": True,
            "ipMasq": True,
            "ipam": node.host_local(subnet=subnet, routes=[{"dst": "0.0.0.0/0"}]),
        }
    ]
    if with_portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True}})
    return {"cniVersion": "1.0.0", "name": name, "plugins": plugins}


def pod_addresses(pod) -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for a in addresses(pod) if a["ifname"] == "eth0" and a["family"] == "inet"]


def container_id_of(node: Node, network: str, pod) -> str:
    entries = os.listdir(node.cache_dir / "results")
    assert len(entries) == 1, entries
    cached = json.loads((node.cache_dir / "results" / entries[0]).read_text())
    assert cached["networkName"] == network and cached["netns"] == pod.path
    return cached["containerId"]


def test_bridge_hostlocal_portmap_add_and_del(node):
    pod = node.pod()
    node.write_network(bridge_network("refnet", "10.99.7.0/24", node, with_portmap=True))
    mapping = {"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}

    added = node.pycni("add", "refnet", pod.name, cap_args=mapping)
    assert added.returncode == 0, added.stderr
    result = json.loads(added.stdout)
    assert result["cniVersion"] == "1.0.0"
    assert [ip["address"] for ip in result["ips"]] == ["10.99.7.2/24"]
    assert pod_addresses(pod) == ["10.99.7.2/24"]
    container_id = container_id_of(node, "refnet", pod)
    rules = iptables_save(node, "nat")
    assert container_id in rules and "--dport 18080" in rules and "CNI-DN-" in rules
    assert (node.ipam_dir / "refnet" / "10.99.7.2").exists()

    # CAP_ARGS is not needed again: DEL reuses what ADD cached.
    for attempt in (1, 2):
        deleted = node.pycni("del", "refnet", pod.name)
        assert deleted.returncode == 0, f"DEL #{attempt}: {deleted.stderr}"

    assert "eth0" not in link_names(pod)
    assert sorted(os.listdir(node.ipam_dir / "refnet")) == ["last_reserved_ip.0", "lock"]
    rules = iptables_save(node, "nat")
    assert container_id not in rules
    assert "CNI-DN-" not in rules
    assert os.listdir(node.cache_dir / "results") == []


def test_check_passes_then_fails_when_address_removed(node):
    pod = node.pod()
    # No portmap here: Debian's v1.1.1 portmap CHECK fails on IPv4-only networks
    # (it looks for an ip6tables chain), which would hide what this test checks.
    node.write_network(bridge_network("chknet", "10.99.8.0/24", node, with_portmap=False))
    added = node.pycni("add", "chknet", pod.name)
    assert added.returncode == 0, added.stderr

    checked = node.pycni("check", "chknet", pod.name)
    assert checked.returncode == 0, checked.stderr

    pod.ip("addr", "del", "10.99.8.2/24", "dev", "eth0")
    checked = node.pycni("check", "chknet", pod.name)
    assert checked.returncode != 0
    assert checked.stdout == ""
    assert checked.stderr.startswith("Error: plugin 'bridge' failed (CHECK)"), checked.stderr
    assert "CNI code" in checked.stderr

    for _ in range(2):
        deleted = node.pycni("del", "chknet", pod.name)
        assert deleted.returncode == 0, deleted.stderr
    assert "eth0" not in link_names(pod)
    assert sorted(os.listdir(node.ipam_dir / "chknet")) == ["last_reserved_ip.0", "lock"]


def test_plugin_type_with_path_is_refused_before_anything_runs(node, tmp_path):
    pod = node.pod()
    # "../../something" seen from CNI_PATH=<tmp>/a/b would be <tmp>/something.
    bin_dir = tmp_path / "a" / "b"
    bin_dir.mkdir(parents=True)
    marker = tmp_path / "EXECUTED"
    evil = tmp_path / "something"
    evil.write_text(f'#!/bin/sh\ntouch {marker}\necho \'{{"cniVersion":"1.0.0"}}\'\n')
    evil.chmod(0o755)
    # A harmless plugin first in the chain: not even it may run.
    first_marker = tmp_path / "FIRST-RAN"
    first = bin_dir / "first"
    first.write_text(f'#!/bin/sh\ntouch {first_marker}\necho \'{{"cniVersion":"1.0.0"}}\'\n')
    first.chmod(0o755)
    node.cni_path = str(bin_dir)
    node.write_network(
        {"cniVersion": "1.0.0", "name": "evilnet", "plugins": [{"type": "first"}, {"type": "../../something"}]}
    )

    for command in ("add", "check", "del"):
        run = node.pycni(command, "evilnet", pod.name)
        assert run.returncode == 1
        assert "field 'plugins[1].type'" in run.stderr and "'../../something'" in run.stderr, run.stderr
        assert "(CNI code 7)" in run.stderr
    assert not marker.exists()
    assert not first_marker.exists()
    assert not node.cache_dir.exists()
