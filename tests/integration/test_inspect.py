"""`pycni inspect` on a live 2-node netns cluster with pods: every format against the kernel's own answer.

Two node namespaces with agents (the file store), two pods per node attached
with the example vxlan network through `pycni add` (the first with a hostPort
and bandwidth limits). The expected values are read straight from the kernel
(`ip`, `bridge`, in the node's and the pods' namespaces), then `pycni inspect`
must show them: in text, JSON, SVG and PNG (Graphviz), for the node and for
the whole cluster; and a deleted FDB entry shows up as missing.
"""
from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Iterator

import pytest

import netns

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pod_cluster import NET_NAME, PYCNI, PodCluster, agent_paused, pod_cluster  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

needs_graphviz = pytest.mark.skipif(shutil.which("dot") is None,
                                    reason="Graphviz's dot is missing (apt-get install graphviz)")
HOST_PORT = 18000
BANDWIDTH = {"ingressRate": 10_000_000, "ingressBurst": 100_000, "egressRate": 20_000_000, "egressBurst": 100_000}


@dataclass
class LivePod:
    node: int
    name: str            # namespace name
    container_id: str
    address: str
    mac: str
    host_veth: str


@dataclass
class Live:
    cluster: PodCluster
    pods: list[LivePod]

    def on(self, index: int) -> list[LivePod]:
        return [p for p in self.pods if p.node == index]


def _ip_json(*args: str) -> list[dict]:
    return json.loads(subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True,
                                     timeout=10).stdout or "[]")


def _host_veth(node_ns: str, pod_ns: str) -> str:
    """The node-side veth whose peer is the pod's eth0 (by the peer's ifindex)."""
    peer_index = _ip_json("-n", pod_ns, "link", "show", "eth0")[0]["link_index"]
    return next(l["ifname"] for l in _ip_json("-n", node_ns, "link", "show") if l["ifindex"] == peer_index)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    with pod_cluster(2, "file", "in") as c, contextlib.ExitStack() as stack:
        pods = []
        for node in c.nodes:
            for j in range(2):
                name = f"{c.topo.tag}-n{node.index}p{j}"
                netns.create(name)
                stack.callback(netns.delete, name)
                container_id = f"inspect-n{node.index}-pod{j}"
                env = c.env(node)
                if node.index == 0 and j == 0:
                    env["CAP_ARGS"] = json.dumps({"portMappings": [{"hostPort": HOST_PORT, "containerPort": 80,
                                                                    "protocol": "tcp"}], "bandwidth": BANDWIDTH})
                cmd = ["ip", "netns", "exec", node.name, PYCNI, "add", NET_NAME, name, "--container-id", container_id]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, done.stderr
                stack.callback(subprocess.run, ["ip", "netns", "exec", node.name, PYCNI, "del", NET_NAME, name,
                                                "--container-id", container_id], env=env, capture_output=True)
                link = _ip_json("-n", name, "addr", "show", "eth0")[0]
                address = next(a["local"] for a in link["addr_info"] if a["family"] == "inet")
                pods.append(LivePod(node.index, name, container_id, address, link["address"],
                                    _host_veth(node.name, name)))
        yield Live(c, pods)


def inspect(live: Live, index: int, *args: str) -> subprocess.CompletedProcess:
    c = live.cluster
    node = c.nodes[index]
    cmd = ["ip", "netns", "exec", node.name, PYCNI, "inspect", "--state-dir", node.state_dir,
           "--cache-dir", c.dir(node, "cache"), "--ipam-dir", c.dir(node, "ipam"), "--store", c.store_url, *args]
    done = subprocess.run(cmd, capture_output=True, timeout=60, env=c.env(node))
    assert done.returncode == 0, done.stderr.decode()
    return done


def expected_strings(live: Live, index: int) -> list[str]:
    """What the picture of node ``index`` must show: its pods and the other node as the kernel has them."""
    c = live.cluster
    node, other = c.nodes[index], c.nodes[1 - index]
    state, remote = node.read_state(), other.read_state()
    out = [f"n{index}", state["vtepMAC"], remote["vtepMAC"], other.public_ip, remote["subnet"],
           state["gateway"]]
    for pod in live.on(index):
        out += [pod.container_id, pod.address, pod.mac, pod.host_veth, pod.name]
    return out


def test_text_shows_pods_veths_and_remote_nodes_as_the_kernel_has_them(live):
    for index in (0, 1):
        text = inspect(live, index).stdout.decode()
        for expected in expected_strings(live, index):
            assert expected in text, f"{expected!r} missing from:\n{text}"
        assert "fdb ok, neighbour ok, route ok, in store" in text
    text = inspect(live, 0).stdout.decode()
    pod = live.on(0)[0]
    assert f"hostPort tcp {HOST_PORT} -> {pod.address}:80" in text
    assert "to pod 10 Mbit/s" in text and "from pod 20 Mbit/s" in text
    assert "pycni_overlay  VXLAN accepted from members 192.168.100.10, 192.168.100.11" in text


def test_json_matches_the_live_state(live):
    doc = json.loads(inspect(live, 0, "--format", "json").stdout)
    c = live.cluster
    node = c.nodes[0]
    state = node.read_state()
    assert (doc["name"], doc["public_ip"], doc["subnet"]) == ("n0", node.public_ip, state["subnet"])
    got = {(p["container_id"], p["addresses"][0].split("/")[0], p["mac"], p["host_veth"], p["netns_name"])
           for p in doc["pods"]}
    want = {(p.container_id, p.address, p.mac, p.host_veth, p.name) for p in live.on(0)}
    assert got == want
    for pod in doc["pods"]:
        assert pod["bridge"] == state["bridge"] and pod["network"] == NET_NAME and pod["mtu"] == state["mtu"]
    shaped = next(p for p in doc["pods"] if p["container_id"] == live.on(0)[0].container_id)
    assert shaped["shaping"]["ingress_bits"] == BANDWIDTH["ingressRate"]
    assert shaped["shaping"]["egress_bits"] == BANDWIDTH["egressRate"]
    assert shaped["port_mappings"] == [{"protocol": "tcp", "host_port": HOST_PORT, "pod_ip": live.on(0)[0].address,
                                        "container_port": 80, "host_ip": ""}]
    (vx,) = doc["vxlans"]
    assert vx["name"] == state["vxlanDevice"] and vx["mac"] == state["vtepMAC"]
    other = c.nodes[1]
    assert [(r["public_ip"], r["subnet"], r["vtep_mac"], r["node_name"], r["fdb"], r["neigh"], r["route"])
            for r in vx["remotes"]] == [(other.public_ip, other.read_state()["subnet"],
                                         other.read_state()["vtepMAC"], "n1", True, True, True)]
    bridges = {b["name"]: b for b in doc["bridges"]}
    assert set(bridges[state["bridge"]]["ports"]) >= {p.host_veth for p in live.on(0)}


@needs_graphviz
def test_svg_is_a_drawing_of_the_same_state(live):
    svg = inspect(live, 1, "--format", "svg").stdout.decode()
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    texts = " ".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    for expected in expected_strings(live, 1):
        assert expected in texts, f"{expected!r} not drawn"


@needs_graphviz
def test_png_is_a_real_png(live, tmp_path):
    out = tmp_path / "node.png"
    inspect(live, 0, "--format", "png", "--output", str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert data[12:16] == b"IHDR" and 600 < width < 6000 and 150 < height < 4000
    assert len(data) < 500_000


@needs_graphviz
def test_cluster_view_draws_every_node_and_lease(live):
    c = live.cluster
    text = inspect(live, 0, "--cluster").stdout.decode()
    svg = inspect(live, 0, "--cluster", "--format", "svg").stdout.decode()
    for node in c.nodes:
        state = node.read_state()
        for value in (node.public_ip, state["subnet"], state["vtepMAC"], f"n{node.index}"):
            assert value in text and value in svg
    assert "this node" in text and "10.244.0.0/16" in text
    doc = json.loads(inspect(live, 1, "--cluster", "--format", "json").stdout)
    assert doc["thisNode"] == c.nodes[1].public_ip and len(doc["leases"]) == 2


def test_a_missing_fdb_entry_is_shown_as_missing(live):
    c = live.cluster
    n0, n1 = c.nodes
    mac = n1.read_state()["vtepMAC"]
    with agent_paused(c.agents[n0.name], c.store_dir):
        subprocess.run(["ip", "netns", "exec", n0.name, "bridge", "fdb", "del", mac, "dev", "pycni.1",
                        "dst", n1.public_ip], check=True, capture_output=True, timeout=10)
        text = inspect(live, 0).stdout.decode()
        dot = inspect(live, 0, "--format", "dot").stdout.decode()
    assert "fdb MISSING, neighbour ok, route ok, in store" in text
    assert "missing: FDB" in dot and dot.startswith("digraph")


def test_text_needs_no_graphviz(live, tmp_path):
    c = live.cluster
    node = c.nodes[0]
    env = c.env(node)
    env["PATH"] = str(tmp_path)  # no `dot` (nor anything else) on PATH
    tools = ("ip", "bridge", "nft", "tc")
    for tool in tools:
        os.symlink(shutil.which(tool), tmp_path / tool)
    cmd = ["ip", "netns", "exec", node.name, PYCNI, "inspect", "--state-dir", node.state_dir, "--cache-dir",
           c.dir(node, "cache")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0 and live.on(0)[0].address in done.stdout
    done = subprocess.run(cmd + ["--format", "svg"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1 and "Graphviz is not installed" in done.stderr
    assert ipaddress.ip_address(live.on(0)[0].address)
