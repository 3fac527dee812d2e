"""`pycni inspect` on a live 2-node netns cluster with pods: every format against the kernel's own answer.

Two node namespaces with agents (the file store), two pods per node attached
with the example vxlan network through `pycni add` with the CNI_ARGS kubelet
passes (the first with a hostPort and bandwidth limits). The expected values
are read straight from the kernel (`ip`, `bridge`, in the node's and the
pods' namespaces), then `pycni inspect` must show them: in text, JSON, SVG
and PNG (Graphviz), for the node and for the whole cluster; and a deleted FDB
entry shows up as missing.

Twenty nodes: two more agents' worth of cluster with 18 further leases in the
store (nodes with no namespace behind them: the two agents program FDB,
neighbour and route entries for each, as for any node), so the pictures of
a 20-node cluster are drawn from real kernel state without 20 agents; they
must be no wider than 2.5:1 (read from the PNG's IHDR header) and show the
pod names the runtime passed and a health mark on every node.

PYCNI_DOCS_PICTURES=1 also writes docs/inspect-example.png (node n0 of the
2-node cluster) and docs/inspect-cluster.png (the 20-node cluster): that is
how the pictures in the README were made.
"""

from __future__ import annotations

import contextlib
import hashlib
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
from multinode import route_dsts, wait_for  # noqa: E402
from pod_cluster import NET_NAME, PYCNI, PodCluster, agent_paused, pod_cluster  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

needs_graphviz = pytest.mark.skipif(
    shutil.which("dot") is None, reason="Graphviz's dot is missing (apt-get install graphviz)"
)
HOST_PORT = 18000
BANDWIDTH = {"ingressRate": 10_000_000, "ingressBurst": 100_000, "egressRate": 20_000_000, "egressBurst": 100_000}


@dataclass
class LivePod:
    node: int
    name: str  # namespace name
    container_id: str
    address: str
    mac: str
    host_veth: str
    title: str  # K8S_POD_NAMESPACE/K8S_POD_NAME, as passed in CNI_ARGS


@dataclass
class Live:
    cluster: PodCluster
    pods: list[LivePod]

    def on(self, index: int) -> list[LivePod]:
        return [p for p in self.pods if p.node == index]


def _ip_json(*args: str) -> list[dict]:
    return json.loads(
        subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True, timeout=10).stdout or "[]"
    )


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
                title = f"shop/{('web', 'cache')[j]}-n{node.index}"
                env["CNI_ARGS"] = kubelet_args(*title.split("/"), container_id)
                if node.index == 0 and j == 0:
                    env["CAP_ARGS"] = json.dumps(
                        {
                            "portMappings": [{"hostPort": HOST_PORT, "containerPort": 80, "protocol": "tcp"}],
                            "bandwidth": BANDWIDTH,
                        }
                    )
                cmd = ["ip", "netns", "exec", node.name, PYCNI, "add", NET_NAME, name, "--container-id", container_id]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, done.stderr
                stack.callback(
                    subprocess.run,
                    ["ip", "netns", "exec", node.name, PYCNI, "del", NET_NAME, name, "--container-id", container_id],
                    env=env,
                    capture_output=True,
                )
                link = _ip_json("-n", name, "addr", "show", "eth0")[0]
                address = next(a["local"] for a in link["addr_info"] if a["family"] == "inet")
                pods.append(
                    LivePod(
                        node.index, name, container_id, address, link["address"], _host_veth(node.name, name), title
                    )
                )
        yield Live(c, pods)


def kubelet_args(namespace: str, name: str, container_id: str) -> str:
    """CNI_ARGS as the kubelet (through containerd or CRI-O) passes them."""
    return (
        f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};"
        f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=4c1f3a52-8d67-4b8e-9a31-{container_id[-12:]:0>12}"
    )


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk (the first one, right after the signature)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def svg_texts(svg: str) -> str:
    return " ".join(t.text or "" for t in ET.fromstring(svg).iter() if t.tag.endswith("text"))


def inspect(live: Live, index: int, *args: str) -> subprocess.CompletedProcess:
    c = live.cluster
    node = c.nodes[index]
    cmd = [
        "ip",
        "netns",
        "exec",
        node.name,
        PYCNI,
        "inspect",
        "--state-dir",
        node.state_dir,
        "--cache-dir",
        c.dir(node, "cache"),
        "--ipam-dir",
        c.dir(node, "ipam"),
        "--store",
        c.store_url,
        *args,
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=60, env=c.env(node))
    assert done.returncode == 0, done.stderr.decode()
    return done


def expected_strings(live: Live, index: int) -> list[str]:
    """What the picture of node ``index`` must show: its pods and the other node as the kernel has them."""
    c = live.cluster
    node, other = c.nodes[index], c.nodes[1 - index]
    state, remote = node.read_state(), other.read_state()
    out = [f"n{index}", state["vtepMAC"], remote["vtepMAC"], other.public_ip, remote["subnet"], state["gateway"]]
    for pod in live.on(index):
        out += [pod.container_id, pod.address, pod.mac, pod.host_veth, pod.name, pod.title]
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
    got = {
        (p["container_id"], p["addresses"][0].split("/")[0], p["mac"], p["host_veth"], p["netns_name"])
        for p in doc["pods"]
    }
    want = {(p.container_id, p.address, p.mac, p.host_veth, p.name) for p in live.on(0)}
    assert got == want
    for pod in doc["pods"]:
        assert pod["bridge"] == state["bridge"] and pod["network"] == NET_NAME and pod["mtu"] == state["mtu"]
    assert {(p["container_id"], p["title"]) for p in doc["pods"]} == {(p.container_id, p.title) for p in live.on(0)}
    assert doc["healthy"] is True and doc["problems"] == []
    shaped = next(p for p in doc["pods"] if p["container_id"] == live.on(0)[0].container_id)
    assert shaped["shaping"]["ingress_bits"] == BANDWIDTH["ingressRate"]
    assert shaped["shaping"]["egress_bits"] == BANDWIDTH["egressRate"]
    assert shaped["port_mappings"] == [
        {
            "protocol": "tcp",
            "host_port": HOST_PORT,
            "pod_ip": live.on(0)[0].address,
            "container_port": 80,
            "host_ip": "",
        }
    ]
    (vx,) = doc["vxlans"]
    assert vx["name"] == state["vxlanDevice"] and vx["mac"] == state["vtepMAC"]
    other = c.nodes[1]
    assert [
        (r["public_ip"], r["subnet"], r["vtep_mac"], r["node_name"], r["fdb"], r["neigh"], r["route"])
        for r in vx["remotes"]
    ] == [(other.public_ip, other.read_state()["subnet"], other.read_state()["vtepMAC"], "n1", True, True, True)]
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
    assert "✓ node ok" in texts and "✓ ok · vxlan" in texts and "✗" not in texts


@needs_graphviz
def test_png_is_a_real_png(live, tmp_path):
    out = tmp_path / "node.png"
    inspect(live, 0, "--format", "png", "--output", str(out))
    data = out.read_bytes()
    width, height = png_size(data)
    assert 400 < width <= 1400 and 300 < height < 4000 and width / height <= 2.5, (width, height)
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
    # Judged from n1's kernel: itself, and n0 through VXLAN; both marked healthy.
    assert doc["seenFrom"] == "n1" and doc["healthy"] is True
    assert {(l["nodeName"], l["mode"], l["healthy"]) for l in doc["leases"]} == {
        ("n0", "vxlan", True),
        ("n1", "this node", True),
    }
    assert svg_texts(svg).count("✓ ok") == 2


def test_a_missing_fdb_entry_is_shown_as_missing(live):
    c = live.cluster
    n0, n1 = c.nodes
    mac = n1.read_state()["vtepMAC"]
    with agent_paused(c.agents[n0.name], c.store_dir):
        subprocess.run(
            ["ip", "netns", "exec", n0.name, "bridge", "fdb", "del", mac, "dev", "pycni.1", "dst", n1.public_ip],
            check=True,
            capture_output=True,
            timeout=10,
        )
        text = inspect(live, 0).stdout.decode()
        dot = inspect(live, 0, "--format", "dot").stdout.decode()
        cluster = json.loads(inspect(live, 0, "--cluster", "--format", "json").stdout)
    assert "fdb MISSING, neighbour ok, route ok, in store" in text
    assert "  health: PROBLEM: 1 remote node unhealthy: n1" in text
    assert "missing: FDB" in dot and dot.startswith("digraph")
    assert {(l["nodeName"], tuple(l["problems"])) for l in cluster["leases"]} == {("n0", ()), ("n1", ("missing: FDB",))}


def test_text_needs_no_graphviz(live, tmp_path):
    c = live.cluster
    node = c.nodes[0]
    env = c.env(node)
    env["PATH"] = str(tmp_path)  # no `dot` (nor anything else) on PATH
    tools = ("ip", "bridge", "nft", "tc")
    for tool in tools:
        os.symlink(shutil.which(tool), tmp_path / tool)
    cmd = [
        "ip",
        "netns",
        "exec",
        node.name,
        PYCNI,
        "inspect",
        "--state-dir",
        node.state_dir,
        "--cache-dir",
        c.dir(node, "cache"),
    ]
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
    addresses: dict[int, str]  # family -> address


@dataclass
class Dual:
    cluster: PodCluster
    underlay: str
    pods: list[DualPod]


@pytest.fixture(scope="module", params=["ipv4", "dual"], ids=["ipv4-underlay", "both-underlays"])
def dual(request) -> Iterator[Dual]:
    """Two dual-stack nodes with a pod each (the first with a hostPort): both pod families over the IPv4
    underlay's pycni.1, or (both underlays) the IPv6 pods over a second device, pycni6.1, on an IPv6 one."""
    with (
        pod_cluster(2, "file", f"id{request.param[0]}", ipv6_network=NETWORK6, underlay=request.param) as c,
        contextlib.ExitStack() as stack,
    ):
        pods = []
        for node in c.nodes:
            name = f"{c.topo.tag}-d{node.index}"
            netns.create(name)
            stack.callback(netns.delete, name)
            container_id = f"inspect-dual-n{node.index}"
            env = c.env(node)
            if node.index == 0:
                env["CAP_ARGS"] = json.dumps(
                    {"portMappings": [{"hostPort": HOST_PORT, "containerPort": 80, "protocol": "tcp"}]}
                )
            cmd = ["ip", "netns", "exec", node.name, PYCNI, "add", NET_NAME, name, "--container-id", container_id]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            stack.callback(
                subprocess.run,
                ["ip", "netns", "exec", node.name, PYCNI, "del", NET_NAME, name, "--container-id", container_id],
                env=env,
                capture_output=True,
            )
            link = _ip_json("-n", name, "addr", "show", "eth0")[0]
            addresses = {
                4 if a["family"] == "inet" else 6: a["local"] for a in link["addr_info"] if a.get("scope") != "link"
            }
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
        assert (
            f"node n1  {remote['publicIPv6']}  subnet {remote['ipv6Subnet']}  VTEP {remote['ipv6VtepMAC']} at "
            f"{vtep6}  (fdb ok, neighbour ok, route ok, in store)"
        ) in text
        assert (
            f"node n1  {n1.public_ip}  subnet {remote['subnet']}  VTEP {remote['vtepMAC']} at "
            f"{remote['subnet'].split('/')[0]}  (fdb ok, neighbour ok, route ok, in store)"
        ) in text
    assert "MISSING" not in text


def test_dual_stack_json_and_cluster_view_hold_both_families(dual):
    c = dual.cluster
    n0, n1 = c.nodes
    state, remote = n0.read_state(), n1.read_state()
    doc = json.loads(inspect_dual(dual, 0, "--format", "json"))
    assert (doc["subnet"], doc["subnet6"], doc["network6"]) == (state["subnet"], state["ipv6Subnet"], NETWORK6)
    (pod,) = doc["pods"]
    assert [a.split("/")[0] for a in pod["addresses"]] == [dual.pods[0].addresses[4], dual.pods[0].addresses[6]]
    remotes = {
        (vx["name"], r["subnet"], r["subnet6"], r["fdb"], r["neigh"], r["route"], r["neigh6"], r["route6"])
        for vx in doc["vxlans"]
        for r in vx["remotes"]
    }
    if dual.underlay == "ipv4":
        assert remotes == {("pycni.1", remote["subnet"], remote["ipv6Subnet"], True, True, True, True, True)}
    else:
        assert doc["public_ipv6"] == state["publicIPv6"]
        assert remotes == {
            ("pycni.1", remote["subnet"], "", True, True, True, False, False),
            ("pycni6.1", remote["ipv6Subnet"], "", True, True, True, False, False),
        }
    text = inspect_dual(dual, 1, "--cluster")
    assert text.splitlines()[0].startswith(
        f"cluster network 10.244.0.0/16: /24 per node, IPv6 network {NETWORK6}: /64 per node"
    )
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
        subprocess.run(
            ["ip", "netns", "exec", n0.name, "ip", "-6", "neigh", "del", vtep6, "dev", device],
            check=True,
            capture_output=True,
            timeout=10,
        )
        text = inspect_dual(dual, 0)
        dot = inspect_dual(dual, 0, "--format", "dot")
    if dual.underlay == "ipv4":
        assert f"IPv6 subnet {remote['ipv6Subnet']}  VTEP at {vtep6}  (neighbour MISSING, route ok)" in text, text
        assert "missing: IPv6 neighbour" in dot
    else:
        assert "(fdb ok, neighbour MISSING, route ok, in store)" in text, text
        assert "missing: neighbour" in dot


# ---- twenty nodes: readable pictures, a health mark on every node, the pods' own names -----------------

TWENTY = 20
POD_ID = hashlib.sha256(b"pycni inspect web-0").hexdigest()  # 64 hex digits, as containerd's
UNNAMED_ID = hashlib.sha256(b"pycni inspect unnamed").hexdigest()


@dataclass
class Twenty:
    cluster: PodCluster
    macs: dict[str, str]  # node name -> VTEP MAC of the leases without an agent
    subnets: dict[str, str]  # node name -> pod subnet, all twenty


def fake_mac(index: int) -> str:
    return f"0a:58:c0:a8:64:{index:02x}"


@pytest.fixture(scope="module")
def twenty() -> Iterator[Twenty]:
    """n0 and n1 with agents, and n2..n19 as leases in the store that both agents program entries for; on n0 a pod
    attached with kubelet's CNI_ARGS (default/web-0) and one attached without any."""
    from ipam.cluster import acquire_lease, open_store, read_config

    with pod_cluster(2, "file", "iw") as c, contextlib.ExitStack() as stack:
        macs, subnets = {}, {f"n{node.index}": node.read_state()["subnet"] for node in c.nodes}
        with open_store(c.store_url) as store:
            cfg = read_config(store)
            for i in range(2, TWENTY):
                lease = acquire_lease(store, cfg, f"192.168.100.{10 + i}", fake_mac(i), node_name=f"n{i}")
                macs[f"n{i}"], subnets[f"n{i}"] = fake_mac(i), lease.subnet
        for node in c.nodes:
            others = set(subnets.values()) - {node.read_state()["subnet"]}
            wait_for(lambda: others <= route_dsts(node), 30, what=f"{node.name} routing the 19 other subnets")
        n0 = c.nodes[0]
        for container_id, cni_args in ((POD_ID, kubelet_args("default", "web-0", POD_ID)), (UNNAMED_ID, "")):
            name = f"{c.topo.tag}-{container_id[:6]}"
            netns.create(name)
            stack.callback(netns.delete, name)
            env = c.env(n0)
            if cni_args:
                env["CNI_ARGS"] = cni_args
            cmd = ["ip", "netns", "exec", n0.name, PYCNI, "add", NET_NAME, name, "--container-id", container_id]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            stack.callback(
                subprocess.run,
                ["ip", "netns", "exec", n0.name, PYCNI, "del", NET_NAME, name, "--container-id", container_id],
                env=env,
                capture_output=True,
            )
        yield Twenty(c, macs, subnets)


def inspect20(twenty: Twenty, *args: str) -> bytes:
    """`pycni inspect ARGS` on n0 with the store; its stdout."""
    return inspect(Live(twenty.cluster, []), 0, *args).stdout


def test_the_runtime_cache_keeps_the_pod_names_and_inspect_shows_them(twenty):
    c = twenty.cluster
    n0 = c.nodes[0]
    # The runtime path (`pycni add`, as libcni) cached the CNI_ARGS it passed with the result.
    cached = json.loads(open(os.path.join(c.dir(n0, "cache"), "results", f"{NET_NAME}-{POD_ID}-eth0")).read())
    assert ["K8S_POD_NAMESPACE", "default"] in cached["cniArgs"] and ["K8S_POD_NAME", "web-0"] in cached["cniArgs"]
    assert cached["result"]["ips"]
    text = inspect20(twenty).decode()
    assert f"pod default/web-0  container {POD_ID}  network {NET_NAME}" in text, text
    assert f"pod {UNNAMED_ID}  network {NET_NAME}" in text
    doc = json.loads(inspect20(twenty, "--format", "json"))
    titles = {p["container_id"]: p["title"] for p in doc["pods"]}
    assert titles == {POD_ID: "default/web-0", UNNAMED_ID: UNNAMED_ID[:12]}
    texts = svg_texts(inspect20(twenty, "--format", "svg").decode())
    assert "pod default/web-0" in texts and f"container {POD_ID[:12]}" in texts
    assert f"pod {UNNAMED_ID[:12]}" in texts and POD_ID not in texts


@needs_graphviz
def test_twenty_nodes_draw_as_a_grid_no_wider_than_two_and_a_half_to_one(twenty, tmp_path):
    out = tmp_path / "cluster.png"
    inspect20(twenty, "--cluster", "--format", "png", "--output", str(out))
    width, height = png_size(out.read_bytes())
    assert width / height <= 2.5 and width <= 1400, (width, height)
    texts = svg_texts(inspect20(twenty, "--cluster", "--format", "svg").decode())
    for name, subnet in twenty.subnets.items():
        assert f"node {name}" in texts and subnet in texts
    # A mark on every node: n0 itself, and each other node reachable from n0 through VXLAN.
    assert texts.count("✓ ok · vxlan") == TWENTY - 1 and texts.count("✓ ok · this node") == 1
    assert f"all {TWENTY} nodes healthy (seen from node n0)" in texts
    doc = json.loads(inspect20(twenty, "--cluster", "--format", "json"))
    assert len(doc["leases"]) == TWENTY and all(l["healthy"] for l in doc["leases"])


@needs_graphviz
def test_the_node_picture_of_a_twenty_node_cluster_is_no_wider_than_two_and_a_half_to_one(twenty, tmp_path):
    out = tmp_path / "node.png"
    inspect20(twenty, "--format", "png", "--output", str(out))
    width, height = png_size(out.read_bytes())
    assert width / height <= 2.5 and width <= 1400, (width, height)
    texts = svg_texts(inspect20(twenty, "--format", "svg").decode())
    assert texts.count("✓ ok · vxlan") == TWENTY - 1 and "✓ node ok" in texts
    assert "pycni.1: 19 other nodes" in texts
    for name, mac in twenty.macs.items():
        assert f"node {name}" in texts and f"VTEP {mac}" in texts


def test_an_unhealthy_node_among_twenty_keeps_its_red_mark_with_the_reason(twenty):
    c = twenty.cluster
    n0 = c.nodes[0]
    with agent_paused(c.agents[n0.name], c.store_dir):
        vtep = twenty.subnets["n7"].split("/")[0]
        subprocess.run(
            ["ip", "netns", "exec", n0.name, "ip", "neigh", "del", vtep, "dev", "pycni.1"],
            check=True,
            capture_output=True,
            timeout=10,
        )
        doc = json.loads(inspect20(twenty, "--cluster", "--format", "json"))
        texts = svg_texts(inspect20(twenty, "--cluster", "--format", "svg").decode())
    problems = {l["nodeName"]: l["problems"] for l in doc["leases"] if l["problems"]}
    assert problems == {"n7": ["missing: neighbour"]}
    assert texts.count("✗") == 2 and "missing: neighbour" in texts  # the title's and n7's
    assert texts.count("✓ ok") == TWENTY - 1
    assert "1 of 20 nodes unhealthy (seen from node n0)" in texts


def test_the_store_can_come_from_pycni_store(twenty):
    c = twenty.cluster
    node = c.nodes[1]
    env = {**c.env(node), "PYCNI_STORE": c.store_url}
    base = [
        "ip",
        "netns",
        "exec",
        node.name,
        PYCNI,
        "inspect",
        "--state-dir",
        node.state_dir,
        "--cache-dir",
        c.dir(node, "cache"),
    ]
    done = subprocess.run(base + ["--cluster"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert "(health as seen from node n1)" in done.stdout and len(done.stdout.splitlines()) >= TWENTY + 2
    env.pop("PYCNI_STORE")
    done = subprocess.run(base + ["--cluster"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "--cluster needs --store URL (or PYCNI_STORE)" in done.stderr


@pytest.mark.skipif(
    os.environ.get("PYCNI_DOCS_PICTURES") != "1",
    reason="writes docs/inspect-*.png: set PYCNI_DOCS_PICTURES=1 to make the README's pictures",
)
@needs_graphviz
def test_make_the_docs_pictures(live, twenty):
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs")
    wait_for(
        lambda: json.loads(inspect20(twenty, "--cluster", "--format", "json"))["healthy"],
        10,
        interval=0.5,
        what="every node healthy again (the agents repair what earlier tests removed)",
    )
    for name, data in (
        ("inspect-example.png", inspect(live, 0, "--format", "png").stdout),
        ("inspect-cluster.png", inspect20(twenty, "--cluster", "--format", "png")),
    ):
        width, height = png_size(data)
        assert width / height <= 2.5
        with open(os.path.join(docs, name), "wb") as fh:
            fh.write(data)
