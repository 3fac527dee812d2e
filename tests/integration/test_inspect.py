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


# ---- dual-stack --------------------------------------------------------------------------------

NETWORK6 = "fd00:10:244::/56"


@dataclass
class DualPod:
    node: int
    name: str
    container_id: str
    addresses: dict[int, str]    # family -> address


@dataclass
class Dual:
    cluster: PodCluster
    underlay: str
    pods: list[DualPod]


@pytest.fixture(scope="module", params=["ipv4", "dual"], ids=["ipv4-underlay", "both-underlays"])
def dual(request) -> Iterator[Dual]:
    """Two dual-stack nodes with a pod each (the first with a hostPort): both pod families over the IPv4
    underlay's pycni.1, or (both underlays) the IPv6 pods over a second device, pycni6.1, on an IPv6 one."""
    with pod_cluster(2, "file", f"id{request.param[0]}", ipv6_network=NETWORK6, underlay=request.param) as c, \
            contextlib.ExitStack() as stack:
        pods = []
        for node in c.nodes:
            name = f"{c.topo.tag}-d{node.index}"
            netns.create(name)
            stack.callback(netns.delete, name)
            container_id = f"inspect-dual-n{node.index}"
            env = c.env(node)
            if node.index == 0:
                env["CAP_ARGS"] = json.dumps({"portMappings": [{"hostPort": HOST_PORT, "containerPort": 80,
                                                                "protocol": "tcp"}]})
            cmd = ["ip", "netns", "exec", node.name, PYCNI, "add", NET_NAME, name, "--container-id", container_id]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            stack.callback(subprocess.run, ["ip", "netns", "exec", node.name, PYCNI, "del", NET_NAME, name,
                                            "--container-id", container_id], env=env, capture_output=True)
            link = _ip_json("-n", name, "addr", "show", "eth0")[0]
            addresses = {4 if a["family"] == "inet" else 6: a["local"] for a in link["addr_info"]
                         if a.get("scope") != "link"}
            assert sorted(addresses) == [4, 6], link
            pods.append(DualPod(node.index, name, container_id, addresses))
        yield Dual(c, request.param, pods)


def inspect_dual(dual: Dual, index: int, *args: str) -> str:
    return inspect(Live(dual.cluster, []), index, *args).stdout.decode()


def test_dual_stack_text_shows_both_families_of_pods_nodes_and_remotes(dual):
    c = dual.cluster
    n0, n1 = c.nodes
    state, remote = n0.read_state(), n1.read_state()
    text = inspect_dual(dual, 0)
    pod = dual.pods[0]
    assert f"eth0 {pod.addresses[4]}/24, {pod.addresses[6]}/64" in text, text
    assert f"gateway {state['gateway']}, {state['ipv6Gateway']}" in text
    assert f"overlay: subnet {state['subnet']} of 10.244.0.0/16" in text
    assert f"overlay IPv6: subnet {state['ipv6Subnet']} of {NETWORK6}, gateway {state['ipv6Gateway']}" in text
    assert f"hostPort tcp {HOST_PORT} -> {pod.addresses[4]}:80" in text
    assert f"hostPort tcp {HOST_PORT} -> [{pod.addresses[6]}]:80" in text
    assert f"pod traffic leaving 10.244.0.0/16 and {NETWORK6} masqueraded" in text
    vtep6 = remote["ipv6Subnet"].split("/")[0]
    if dual.underlay == "ipv4":
        # One device carries both families to n1: one FDB entry, a neighbour and a route of each family.
        assert f"node n1  {n1.public_ip}  subnet {remote['subnet']}  VTEP {remote['vtepMAC']}" in text
        assert f"IPv6 subnet {remote['ipv6Subnet']}  VTEP at {vtep6}  (neighbour ok, route ok)" in text
        assert "pycni6.1" not in text
    else:
        assert f"node n0  {n0.public_ip} on eth0, {state['publicIPv6']} on eth0" in text
        assert f"vxlan pycni6.1  VNI 1  UDP 8472  local {state['publicIPv6']}" in text
        assert (f"node n1  {remote['publicIPv6']}  subnet {remote['ipv6Subnet']}  VTEP {remote['ipv6VtepMAC']} at "
                f"{vtep6}  (fdb ok, neighbour ok, route ok, in store)") in text
        assert (f"node n1  {n1.public_ip}  subnet {remote['subnet']}  VTEP {remote['vtepMAC']} at "
                f"{remote['subnet'].split('/')[0]}  (fdb ok, neighbour ok, route ok, in store)") in text
    assert "MISSING" not in text


def test_dual_stack_json_and_cluster_view_hold_both_families(dual):
    c = dual.cluster
    n0, n1 = c.nodes
    state, remote = n0.read_state(), n1.read_state()
    doc = json.loads(inspect_dual(dual, 0, "--format", "json"))
    assert (doc["subnet"], doc["subnet6"], doc["network6"]) == (state["subnet"], state["ipv6Subnet"], NETWORK6)
    (pod,) = doc["pods"]
    assert [a.split("/")[0] for a in pod["addresses"]] == [dual.pods[0].addresses[4], dual.pods[0].addresses[6]]
    remotes = {(vx["name"], r["subnet"], r["subnet6"], r["fdb"], r["neigh"], r["route"], r["neigh6"], r["route6"])
               for vx in doc["vxlans"] for r in vx["remotes"]}
    if dual.underlay == "ipv4":
        assert remotes == {("pycni.1", remote["subnet"], remote["ipv6Subnet"], True, True, True, True, True)}
    else:
        assert doc["public_ipv6"] == state["publicIPv6"]
        assert remotes == {("pycni.1", remote["subnet"], "", True, True, True, False, False),
                           ("pycni6.1", remote["ipv6Subnet"], "", True, True, True, False, False)}
    text = inspect_dual(dual, 1, "--cluster")
    assert text.splitlines()[0].startswith(f"cluster network 10.244.0.0/16: /24 per node, IPv6 network {NETWORK6}: "
                                           f"/64 per node")
    for node in c.nodes:
        s = node.read_state()
        line = next(line for line in text.splitlines() if line.startswith(f"n{node.index} "))
        assert s["subnet"] in line and s["ipv6Subnet"] in line, line
    cluster = json.loads(inspect_dual(dual, 1, "--cluster", "--format", "json"))
    assert cluster["ipv6Network"] == NETWORK6 and cluster["thisNode"] == n1.public_ip
    assert {l["ipv6Subnet"] for l in cluster["leases"]} == {n.read_state()["ipv6Subnet"] for n in c.nodes}


@needs_graphviz
def test_dual_stack_svg_draws_both_families(dual):
    c = dual.cluster
    svg = inspect_dual(dual, 0, "--format", "svg")
    texts = " ".join(t.text or "" for t in ET.fromstring(svg).iter() if t.tag.endswith("text"))
    remote = c.nodes[1].read_state()
    for expected in (*dual.pods[0].addresses.values(), remote["subnet"], remote["ipv6Subnet"]):
        assert expected in texts, f"{expected!r} not drawn"
    svg = inspect_dual(dual, 0, "--cluster", "--format", "svg")
    texts = " ".join(t.text or "" for t in ET.fromstring(svg).iter() if t.tag.endswith("text"))
    for node in c.nodes:
        assert node.read_state()["ipv6Subnet"] in texts


def test_a_missing_ipv6_neighbour_entry_is_shown_as_missing(dual):
    c = dual.cluster
    n0, n1 = c.nodes
    remote = n1.read_state()
    device = "pycni.1" if dual.underlay == "ipv4" else "pycni6.1"
    vtep6 = remote["ipv6Subnet"].split("/")[0]
    with agent_paused(c.agents[n0.name], c.store_dir):
        subprocess.run(["ip", "netns", "exec", n0.name, "ip", "-6", "neigh", "del", vtep6, "dev", device],
                       check=True, capture_output=True, timeout=10)
        text = inspect_dual(dual, 0)
        dot = inspect_dual(dual, 0, "--format", "dot")
    if dual.underlay == "ipv4":
        assert f"IPv6 subnet {remote['ipv6Subnet']}  VTEP at {vtep6}  (neighbour MISSING, route ok)" in text, text
        assert "missing: IPv6 neighbour" in dot
    else:
        assert "(fdb ok, neighbour MISSING, route ok, in store)" in text, text
        assert "missing: neighbour" in dot
