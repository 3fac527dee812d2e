"""The flat pod network on nodes that look like real ones. Root only.

Three node namespaces on an underlay bridge (tests/multinode.py, tests/pod_cluster.py), one agent
per node against a cluster store (the file store, and a real etcd in the underlay namespace), pods
attached through each node's CNI bin dir. Each test reproduces one way real nodes broke the overlay
and asserts on kernel state and on packets that really flow:

    gateway MAC     a pod whose host veth MAC is the lowest comes and goes under a 10 ms ping flood
    rp_filter=1     on every interface of every node: pod <-> remote node, node -> remote pod, pod <-> pod
    bad entries     store values that are no lease (not JSON, 5000-deep, wrong types, zoned address,
                    outside the network, a pod address as public IP, one MAC claimed twice)
    node identity   a second agent with another node's public IP
    lapsed lease    an agent paused (SIGSTOP) past a short --lease-ttl, while nobody and while another
                    node takes its subnet; STATUS and ADD meanwhile
    drift           every attribute of the VXLAN device and the bridge changed by hand
    underlay        the underlay link deleted and created again
    FORWARD DROP    `iptables -P FORWARD DROP` on every node (what Docker sets)

The tests of one store kind share one cluster and run in file order; each leaves every agent of
the first three nodes running as it found it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import pytest

import netns

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from multinode import UNDERLAY_BRIDGE, UNDERLAY_GATEWAY, AgentHandle, Node, seen_source, wait_for  # noqa: E402
from pod_cluster import NET_NAME, PYCNI, PodCluster, agent_paused, pod_cluster  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.multinode,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

BRIDGE = "pycni0"
VXLAN = "pycni.1"
LOWEST_MAC = "00:00:00:00:00:01"  # lower than any MAC a veth gets: an unpinned bridge would take it
SHORT_TTL = "3"


# ---- pods --------------------------------------------------------------------------------------


@dataclass
class Pod:
    name: str
    path: str
    node: Node
    container_id: str
    address: str
    host_veth: str


def add_pod(cluster: PodCluster, node: Node, label: str, cold: bool = False) -> Pod:
    """A pod namespace attached by `pycni add` through the node's CNI bin dir (the warm path unless cold)."""
    name, path = cluster.topo.add_namespace(f"{label}-{uuid.uuid4().hex[:4]}")
    container_id = uuid.uuid4().hex
    done = cluster.pycni(
        node,
        "add",
        NET_NAME,
        path,
        "--container-id",
        container_id,
        cni_path=cluster.dir(node, "coldbin") if cold else None,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    address = result["ips"][0]["address"].split("/")[0]
    host_veth = next(i["name"] for i in result["interfaces"] if "sandbox" not in i and i["name"] != BRIDGE)
    return Pod(name, path, node, container_id, address, host_veth)


def del_pod(cluster: PodCluster, pod: Pod) -> None:
    done = cluster.pycni(pod.node, "del", NET_NAME, pod.path, "--container-id", pod.container_id)
    assert done.returncode == 0, done.stderr


def in_ns(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True, timeout=30)


def ping(ns: str, dst: str, count: int = 1, timeout: float = 2.0) -> bool:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(timeout), dst],
        capture_output=True,
        text=True,
        timeout=count * 3 + 10,
    )
    return done.returncode == 0


def vxlan_plugin(cluster: PodCluster, node: Node, command: str, pod: Pod | None = None) -> tuple[int, dict]:
    """The node's vxlan plugin as a process on the cold path (the agent may be paused): (exit, JSON output)."""
    conf = {
        "cniVersion": "1.1.0",
        "name": NET_NAME,
        "type": "vxlan",
        "stateDir": node.state_dir,
        "dataDir": cluster.dir(node, "ipam"),
    }
    env = {
        "PATH": os.environ["PATH"],
        "CNI_COMMAND": command,
        "CNI_PATH": cluster.dir(node, "coldbin"),
        "CNI_CONTAINERID": pod.container_id if pod else "",
        "CNI_NETNS": pod.path if pod else "",
        "CNI_IFNAME": "eth1",
        "PYCNI_NO_AGENT": "1",
    }
    done = subprocess.run(
        ["ip", "netns", "exec", node.name, os.path.join(cluster.dir(node, "coldbin"), "vxlan")],
        input=json.dumps(conf),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {})


def agent_status(node: Node) -> dict:
    done = subprocess.run(
        [PYCNI, "agent", "status", "--socket", node.socket, "--json"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["overlay"]


def restart_agent(cluster: PodCluster, node: Node, *extra: str) -> AgentHandle:
    cluster.agents[node.name].stop()
    handle = cluster.topo.start_agent(node, cluster.store_url, extra_args=extra)
    cluster.agents[node.name] = handle
    return handle


def link(node: Node, name: str) -> dict:
    return node.ip_json("-d", "link", "show", name)[0]


def addresses(node: Node, name: str) -> set[str]:
    return {f"{a['local']}/{a['prefixlen']}" for a in node.ip_json("addr", "show", name)[0]["addr_info"]}


def fdb(node: Node) -> set[tuple[str, str]]:
    out = node.run("bridge", "-j", "fdb", "show", "dev", VXLAN, check=False).stdout
    return {(e["mac"], e["dst"]) for e in json.loads(out or "[]") if e.get("dst") and e.get("state") == "permanent"}


def routes(node: Node) -> set[str]:
    return (
        {r["dst"] for r in node.ip_json("route", "show", "dev", VXLAN)}
        if node.ip("link", "show", VXLAN, check=False).returncode == 0
        else set()
    )


def programmed(node: Node, remote: Node) -> bool:
    """``node`` holds the FDB entry and the route for ``remote``."""
    state = remote.read_state()
    return bool(state) and (state["vtepMAC"], remote.public_ip) in fdb(node) and state["subnet"] in routes(node)


def members(node: Node) -> set[str]:
    out = node.run("nft", "-j", "list", "set", "inet", "pycni_overlay", "members").stdout
    for obj in json.loads(out)["nftables"]:
        if "set" in obj:
            return {e if isinstance(e, str) else json.dumps(e) for e in obj["set"].get("elem", [])}
    return set()


# ---- the cluster ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["file", pytest.param("etcd", marks=pytest.mark.etcd)])
def cluster(request) -> Iterator[PodCluster]:
    with pod_cluster(3, request.param, f"rn{request.param[0]}") as c:
        c.kind = request.param  # type: ignore[attr-defined]
        c.pods = {node.name: add_pod(c, node, f"p{node.index}") for node in c.nodes}  # type: ignore[attr-defined]
        yield c


# What is the node's own (its bridge, its devices, its firewall) does not depend on the store: one kind shows it.
NODE_LOCAL = pytest.mark.parametrize("cluster", ["file"], indirect=True)


def pods(cluster: PodCluster) -> dict[str, Pod]:
    return cluster.pods  # type: ignore[attr-defined]


def all_pairs_ping(cluster: PodCluster, nodes: list[Node] | None = None) -> list[str]:
    nodes = nodes or cluster.nodes[:3]
    failures = []
    for a in nodes:
        for b in nodes:
            if a is not b and not ping(pods(cluster)[a.name].name, pods(cluster)[b.name].address, timeout=1):
                failures.append(f"{a.name} pod -> {b.name} pod")
    return failures


# ---- 1. the gateway MAC -------------------------------------------------------------------------


@NODE_LOCAL
def test_gateway_mac_never_moves_while_a_pod_with_the_lowest_mac_comes_and_goes(cluster):
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    target, flooder = pods(cluster)[n0.name], pods(cluster)[n1.name]
    gateway = n0.read_state()["gateway"]
    mac_before = link(n0, BRIDGE)["address"]
    assert mac_before == agent_status(n0)["bridgeMAC"]
    # A flood of 10 ms pings from a pod on n1 into the pod on n0: its replies leave through the gateway.
    flood = subprocess.Popen(
        ["ip", "netns", "exec", flooder.name, "ping", "-n", "-q", "-i", "0.01", "-c", "400", "-W", "1", target.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen_macs = set()
    try:
        time.sleep(0.3)
        for round_ in range(3):
            churn = add_pod(cluster, n0, f"churn{round_}")
            n0.ip("link", "set", churn.host_veth, "address", LOWEST_MAC)
            # The target's ARP entry for the gateway expires while the churning pod is there: it resolves
            # the gateway again, to whatever the bridge's MAC is at that moment.
            in_ns(target.name, "ip", "neigh", "flush", "dev", "eth0")
            in_ns(target.name, "ping", "-c", "1", "-W", "1", gateway)
            seen_macs.add(link(n0, BRIDGE)["address"])
            time.sleep(0.3)
            del_pod(cluster, churn)
            seen_macs.add(link(n0, BRIDGE)["address"])
            time.sleep(0.3)
        out, _err = flood.communicate(timeout=30)
    finally:
        if flood.poll() is None:
            flood.kill()
            flood.wait(10)
    loss = float(re.search(r"([\d.]+)% packet loss", out).group(1))
    neigh = in_ns(target.name, "ip", "-j", "neigh", "show", gateway).stdout
    resolved = {e.get("lladdr") for e in json.loads(neigh or "[]")}
    assert seen_macs == {mac_before}, f"the gateway's MAC moved: {seen_macs} (was {mac_before})"
    assert resolved <= {mac_before, None}, f"the pod resolved its gateway to {resolved}, not {mac_before}"
    assert loss < 5.0, f"{loss} % of the flood was lost while pods came and went"


# ---- 2. strict hosts: rp_filter=1 everywhere ---------------------------------------------------


@contextlib.contextmanager
def strict_rp_filter(nodes: list[Node]) -> Iterator[None]:
    """rp_filter=1 on every interface of every node (RHEL's default); the old values come back after."""
    saved: dict[str, list[tuple[str, str]]] = {}
    try:
        for node in nodes:
            names = ["all", "default"] + [l["ifname"] for l in node.ip_json("link", "show")]
            saved[node.name] = []
            for name in names:
                key = f"net.ipv4.conf.{name.replace('.', '/')}.rp_filter"
                old = node.run("sysctl", "-n", key, check=False).stdout.strip()
                if old:
                    saved[node.name].append((key, old))
                    node.run("sysctl", "-qw", f"{key}=1")
        yield
    finally:
        for node in nodes:
            for key, old in saved.get(node.name, []):
                node.run("sysctl", "-qw", f"{key}={old}", check=False)


def test_strict_rp_filter_hosts_carry_every_path(cluster):
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    p0, p1 = pods(cluster)[n0.name], pods(cluster)[n1.name]
    with strict_rp_filter(cluster.nodes[:3]):
        # pod -> the other node's own address: masqueraded to its node's address, so rp_filter passes it
        assert seen_source(n1.path, p0.path, n1.public_ip) == n0.public_ip
        assert seen_source(n0.path, p1.path, n0.public_ip) == n1.public_ip
        # node -> remote pod: from the node's VXLAN address, never translated
        assert seen_source(p1.path, n0.path, p1.address) == cluster.subnet(n0).split("/")[0]
        # pod <-> pod across nodes keeps the pods' own addresses
        assert seen_source(p1.path, p0.path, p1.address) == p0.address
        assert seen_source(p0.path, p1.path, p0.address) == p1.address
        assert not all_pairs_ping(cluster)


@NODE_LOCAL
def test_no_ip_masq_leaves_pod_sources_alone(cluster):
    """--no-ip-masq: no NAT chain, and pod -> another node then arrives with the pod's address, which a
    strict host drops (the reason masquerading is the default)."""
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    p0 = pods(cluster)[n0.name]
    restart_agent(cluster, n0, "--no-ip-masq")
    try:
        table = n0.run("nft", "list", "table", "inet", "pycni_overlay").stdout
        assert "masquerade" not in table and "postrouting" not in table
        assert agent_status(n0)["ipMasq"] is False
        assert seen_source(n1.path, p0.path, n1.public_ip) == p0.address
        with strict_rp_filter([n1]):
            assert seen_source(n1.path, p0.path, n1.public_ip) is None
    finally:
        restart_agent(cluster, n0)
    assert "masquerade" in n0.run("nft", "list", "table", "inet", "pycni_overlay").stdout
    assert seen_source(n1.path, p0.path, n1.public_ip) == n0.public_ip


# ---- 3. node identity -----------------------------------------------------------------------------


def test_a_second_agent_with_another_nodes_public_ip_refuses_to_start(cluster):
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    before = n0.read_state()
    host = cluster.topo.add_host()
    state_dir = cluster.topo.path(f"impostor-{cluster.kind}")
    os.makedirs(state_dir, exist_ok=True)
    cmd = [
        "ip",
        "netns",
        "exec",
        host.name,
        PYCNI,
        "agent",
        "--store",
        cluster.store_url,
        "--public-ip",
        n0.public_ip,
        "--underlay-device",
        "eth0",
        "--node-name",
        "impostor",
        "--state-dir",
        state_dir,
        "--socket",
        os.path.join(state_dir, "agent.sock"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    assert "impostor" in done.stderr and "n0" in done.stderr and n0.public_ip in done.stderr, done.stderr
    # Nothing changed: n0 keeps its lease and every node still reaches it.
    assert n0.read_state()["vtepMAC"] == before["vtepMAC"] and n0.read_state()["subnet"] == before["subnet"]
    assert agent_status(n1)["remoteNodes"] and programmed(n1, n0)
    assert host.ip("link", "show", VXLAN, check=False).returncode != 0, "the impostor built a VXLAN device"
    assert not all_pairs_ping(cluster)


# ---- 4. lapsed and lost leases -------------------------------------------------------------------


@contextlib.contextmanager
def paused(cluster: PodCluster, handle: AgentHandle) -> Iterator[None]:
    if cluster.store_dir:
        with agent_paused(handle, cluster.store_dir):
            yield
    else:
        os.kill(handle.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(handle.pid, signal.SIGCONT)


def put_raw(cluster: PodCluster, key: str, value: bytes) -> None:
    """Write one value under the store's prefix the way anything else could: etcd's JSON gateway, or the
    file store's own code for a file store."""
    if cluster.store_dir:
        from ipam.cluster.filestore import FileStore

        with contextlib.closing(FileStore(cluster.store_dir)) as store:
            store.put(key, value)
        return
    body = json.dumps(
        {"key": base64.b64encode(f"/pycni/{key}".encode()).decode(), "value": base64.b64encode(value).decode()}
    )
    with netns.enter(cluster.nodes[0].path):
        conn = http.client.HTTPConnection(UNDERLAY_GATEWAY, 2379, timeout=10)
        conn.connect()
    try:
        conn.request("POST", "/v3/kv/put", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        response.read()
    finally:
        conn.close()


def delete_raw(cluster: PodCluster, key: str) -> None:
    if cluster.store_dir:
        from ipam.cluster.filestore import FileStore

        with contextlib.closing(FileStore(cluster.store_dir)) as store:
            store.delete(key)
        return
    body = json.dumps({"key": base64.b64encode(f"/pycni/{key}".encode()).decode()})
    with netns.enter(cluster.nodes[0].path):
        conn = http.client.HTTPConnection(UNDERLAY_GATEWAY, 2379, timeout=10)
        conn.connect()
    try:
        conn.request("POST", "/v3/kv/deleterange", body=body, headers={"Content-Type": "application/json"})
        conn.getresponse().read()
    finally:
        conn.close()


def lease_key(subnet: str) -> str:
    address, length = subnet.split("/")
    return f"subnets/{address}-{length}"


def test_a_lapsed_lease_is_taken_back_and_a_lost_one_never_renumbers_the_node(cluster):
    n0, n2 = cluster.nodes[0], cluster.nodes[2]
    handle = restart_agent(cluster, n2, "--lease-ttl", SHORT_TTL, "--reconcile-interval", "1")
    pod = pods(cluster)[n2.name]
    subnet = cluster.subnet(n2)
    try:
        # -- paused past its TTL while nobody takes the subnet
        with paused(cluster, handle):
            wait_for(lambda: not programmed(n0, n2), 15, what="the other nodes dropping the lapsed node")
            code, out = vxlan_plugin(cluster, n2, "STATUS")
            assert code != 0 and out["code"] == 50 and "lapsed" in out["msg"] and subnet in out["msg"], out
            code, out = vxlan_plugin(cluster, n2, "ADD", pod)
            assert code != 0 and out["code"] == 11 and subnet in out["msg"], out
        wait_for(lambda: programmed(n0, n2), 10, what="the node taking its subnet back")
        assert cluster.subnet(n2) == subnet
        assert agent_status(n2)["lease"] == "valid"
        assert vxlan_plugin(cluster, n2, "STATUS")[0] == 0
        assert ping(pods(cluster)[n0.name].name, pod.address, count=2)

        # -- paused past its TTL while another node takes the subnet
        thief = {
            "PublicIP": "192.168.100.99",
            "BackendType": "vxlan",
            "BackendData": {"VtepMAC": "0a:00:00:00:99:99"},
            "NodeName": "thief",
        }
        with paused(cluster, handle):
            wait_for(lambda: not programmed(n0, n2), 15, what="the other nodes dropping the lapsed node")
            put_raw(cluster, lease_key(subnet), json.dumps(thief).encode())
        wait_for(lambda: agent_status(n2)["lease"] == "lost", 10, what="the node noticing its subnet is taken")
        status = agent_status(n2)
        assert status["subnet"] == subnet and "192.168.100.99" in status["leaseProblem"]
        code, out = vxlan_plugin(cluster, n2, "STATUS")
        assert code != 0 and out["code"] == 50 and subnet in out["msg"], out
        code, out = vxlan_plugin(cluster, n2, "ADD", pod)
        assert code != 0 and out["code"] == 11 and subnet in out["msg"] and "192.168.100.99" in out["msg"], out
        # Nothing was renumbered: the pod keeps its address, the bridge its gateway, the state its subnet.
        assert cluster.subnet(n2) == subnet
        assert f"{pod.address}/{subnet.split('/')[1]}" in addresses_in(pod, "eth0")
        assert f"{n2.read_state()['gateway']}/{subnet.split('/')[1]}" in addresses(n2, BRIDGE)
        # The other node goes: the subnet is free, and the node takes it back.
        delete_raw(cluster, lease_key(subnet))
        wait_for(lambda: agent_status(n2)["lease"] == "valid", 10, what="the node winning its subnet back")
        assert cluster.subnet(n2) == subnet
        wait_for(lambda: programmed(n0, n2), 10, what="the others programming the node again")
        assert vxlan_plugin(cluster, n2, "STATUS")[0] == 0
    finally:
        restart_agent(cluster, n2)
    assert not all_pairs_ping(cluster)


def addresses_in(pod: Pod, ifname: str) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", pod.name, "-j", "addr", "show", ifname], capture_output=True, text=True, timeout=30
    ).stdout
    return {f"{a['local']}/{a['prefixlen']}" for a in json.loads(out)[0]["addr_info"]}


# ---- 5. drift -------------------------------------------------------------------------------------


@NODE_LOCAL
def test_every_kind_of_drift_is_repaired_within_a_second(cluster):
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    state = n0.read_state()
    vtep_mac, mtu, gateway = state["vtepMAC"], state["mtu"], state["gateway"]
    prefix = state["subnet"].split("/")[1]
    bridge_mac = link(n0, BRIDGE)["address"]

    def vx() -> dict:
        result = n0.ip("-d", "-j", "link", "show", VXLAN, check=False)
        return json.loads(result.stdout)[0] if result.returncode == 0 else {}

    def healthy() -> bool:
        info = vx()
        data = info.get("linkinfo", {}).get("info_data", {})
        return (
            info.get("address") == vtep_mac
            and info.get("mtu") == mtu
            and data.get("learning") is False
            and data.get("local") == n0.public_ip
            and data.get("port") == 8472
            and data.get("id") == 1
            and link(n0, BRIDGE)["address"] == bridge_mac
            and f"{gateway}/{prefix}" in addresses(n0, BRIDGE)
            and programmed(n0, n1)
        )

    def recreate(*args: str) -> None:
        # Another program re-creates the device its own way, while the agent is paused (it would
        # otherwise re-create its own device between the two steps); the clock runs from its resumption.
        with paused(cluster, cluster.agents[n0.name]):
            n0.ip("link", "del", VXLAN)
            n0.ip("link", "add", VXLAN, "type", "vxlan", "id", "1", *args)

    drifts = {
        "vxlan MAC": lambda: n0.ip("link", "set", VXLAN, "address", "02:11:22:33:44:55"),
        "vxlan MTU": lambda: n0.ip("link", "set", VXLAN, "mtu", str(mtu - 100)),
        "vxlan learning": lambda: n0.ip("link", "set", VXLAN, "type", "vxlan", "learning"),
        "vxlan local address": lambda: recreate("local", UNDERLAY_GATEWAY, "dstport", "8472", "nolearning"),
        "vxlan port": lambda: recreate("local", n0.public_ip, "dstport", "4789", "nolearning", "dev", "eth0"),
        "bridge MAC": lambda: n0.ip("link", "set", BRIDGE, "address", "02:66:77:88:99:aa"),
        "bridge address": lambda: n0.ip("addr", "del", f"{gateway}/{prefix}", "dev", BRIDGE),
    }
    assert healthy()
    slow = {}
    for what, change in drifts.items():
        change()
        took = wait_for(healthy, 5, interval=0.01, what=f"{what} repaired")
        if took > 1.0:
            slow[what] = round(took, 2)
    assert not slow, f"repaired later than 1 s: {slow}"
    assert not all_pairs_ping(cluster)


# ---- 6. the underlay link deleted and created again ----------------------------------------------


@NODE_LOCAL
def test_an_underlay_link_recreated_brings_the_overlay_back_within_two_seconds(cluster):
    n0, n1 = cluster.nodes[0], cluster.nodes[1]
    topo = cluster.topo
    n1.ip("link", "del", "eth0")  # its peer in the underlay goes too, and the kernel deletes the VXLAN device
    wait_for(lambda: n1.ip("link", "show", VXLAN, check=False).returncode != 0, 5, what="the VXLAN device gone")
    time.sleep(0.5)
    n1.ip("link", "add", "eth0", "type", "veth", "peer", "name", n1.port, "netns", topo.underlay)
    topo_ip = ["ip", "-n", topo.underlay]
    subprocess.run([*topo_ip, "link", "set", n1.port, "master", UNDERLAY_BRIDGE, "up"], check=True, timeout=30)
    n1.ip("addr", "add", f"{n1.public_ip}/24", "dev", "eth0")
    n1.ip("link", "set", "eth0", "up")
    back = time.monotonic()
    wait_for(lambda: programmed(n1, n0) and programmed(n0, n1), 10, interval=0.01, what="the overlay back on n1")
    took = time.monotonic() - back
    assert took < 2.0, f"the overlay came back {took:.2f} s after the underlay link"
    wait_for(lambda: not all_pairs_ping(cluster), 10, interval=0.5, what="pods reaching each other again")


# ---- 7. hosts whose FORWARD policy is DROP --------------------------------------------------------


def forward_rules(node: Node) -> list[str]:
    return node.run("iptables", "-w", "-S", "FORWARD").stdout.splitlines()


def test_forward_policy_drop_does_not_stop_pod_traffic(cluster):
    nodes = cluster.nodes[:3]
    outside = cluster.topo.hosts[0] if cluster.topo.hosts else cluster.topo.add_host()
    try:
        for node in nodes:
            node.run("iptables", "-w", "-P", "FORWARD", "DROP")
        # The agents find the drop policy at their next reconcile and put their accept rules first.
        for node in nodes:
            wait_for(
                lambda node=node: any("pycni" in r for r in forward_rules(node)[1:2]),
                15,
                what=f"accept rules first in {node.name}'s FORWARD chain",
            )
        assert not all_pairs_ping(cluster)
        p0 = pods(cluster)[nodes[0].name]
        assert seen_source(outside.path, p0.path, outside.public_ip) == nodes[0].public_ip
        # Someone inserts a drop above ours: the agent puts its rules back on top.
        nodes[1].run("iptables", "-w", "-I", "FORWARD", "1", "-s", "10.244.0.0/16", "-j", "DROP")
        wait_for(lambda: "pycni" in forward_rules(nodes[1])[1], 15, what="n1's accept rules first again")
        assert not all_pairs_ping(cluster)
        nodes[1].run("iptables", "-w", "-D", "FORWARD", "-s", "10.244.0.0/16", "-j", "DROP")
        # `pycni agent leave` (after the agent stopped) removes them.
        n2 = nodes[2]
        cluster.agents[n2.name].stop()
        done = cluster.topo.leave(n2, cluster.store_url)
        assert done.returncode == 0, done.stderr
        assert not any("pycni" in r for r in forward_rules(n2)), forward_rules(n2)
    finally:
        for node in nodes:
            node.run("iptables", "-w", "-P", "FORWARD", "ACCEPT", check=False)
        n2 = nodes[2]
        if not cluster.agents[n2.name].running():
            cluster.agents[n2.name] = cluster.topo.start_agent(n2, cluster.store_url)
    wait_for(
        lambda: all(programmed(a, b) for a in nodes for b in nodes if a is not b), 15, what="the node back everywhere"
    )


# ---- 8. bad entries in the store (last: it adds a fourth node) -------------------------------------

BAD_ENTRIES = {
    "subnets/10.244.200.0-24": b"this is not JSON {",
    "subnets/10.244.201.0-24": b"[" * 5000 + b"]" * 5000,
    "subnets/10.244.202.0-24": json.dumps({"PublicIP": 12, "BackendData": {"VtepMAC": ["x"]}}).encode(),
    "subnets/10.244.203.0-24": json.dumps(
        {"PublicIP": "192.168.100.77%eth0", "BackendType": "vxlan", "BackendData": {"VtepMAC": "0a:00:00:00:00:77"}}
    ).encode(),
    "subnets/10.99.0.0-24": json.dumps(
        {"PublicIP": "192.168.100.78", "BackendType": "vxlan", "BackendData": {"VtepMAC": "0a:00:00:00:00:78"}}
    ).encode(),
    # a pod's address as public IP, claiming a real node's VTEP MAC
    "subnets/10.244.204.0-24": b"",  # filled in by the test with n1's MAC
    # one MAC, two leases: neither is programmed
    "subnets/10.244.205.0-24": json.dumps(
        {"PublicIP": "192.168.100.79", "BackendType": "vxlan", "BackendData": {"VtepMAC": "0a:00:00:00:00:79"}}
    ).encode(),
    "subnets/10.244.206.0-24": json.dumps(
        {"PublicIP": "192.168.100.80", "BackendType": "vxlan", "BackendData": {"VtepMAC": "0a:00:00:00:00:79"}}
    ).encode(),
}
BAD_IPS = {"192.168.100.77", "192.168.100.78", "192.168.100.79", "192.168.100.80", "10.244.1.5"}


def test_bad_store_entries_are_skipped_and_never_stop_a_node(cluster):
    nodes = cluster.nodes[:3]
    entries = dict(BAD_ENTRIES)
    entries["subnets/10.244.204.0-24"] = json.dumps(
        {"PublicIP": "10.244.1.5", "BackendType": "vxlan", "BackendData": {"VtepMAC": nodes[1].read_state()["vtepMAC"]}}
    ).encode()
    if cluster.store_dir:  # and a record file that is no record at all
        os.makedirs(os.path.join(cluster.store_dir, "subnets"), exist_ok=True)
        with open(os.path.join(cluster.store_dir, "subnets", "10.244.207.0-24"), "w") as fh:
            fh.write("garbage")
    for key, value in entries.items():
        put_raw(cluster, key, value)
    time.sleep(1.5)
    for node in nodes:
        assert cluster.agents[node.name].running(), (
            f"the agent on {node.name} stopped:\n{cluster.agents[node.name].log_tail()}"
        )
    status = agent_status(nodes[0])
    rejected = {r["key"] for r in status["rejectedEntries"]}
    skipped = " ".join(status["skipped"])
    for key in (
        "subnets/10.244.200.0-24",
        "subnets/10.244.201.0-24",
        "subnets/10.244.202.0-24",
        "subnets/10.244.203.0-24",
        "subnets/10.99.0.0-24",
        "subnets/10.244.204.0-24",
    ):
        assert key in rejected, (key, status["rejectedEntries"])
    assert "10.244.205.0/24" in skipped and "10.244.206.0/24" in skipped, status["skipped"]
    # Nothing of them reached the kernel or the firewall.
    for node in nodes:
        assert not {ip for _mac, ip in fdb(node)} & BAD_IPS
        assert not members(node) & BAD_IPS
        assert not {r for r in routes(node) if r.startswith(("10.244.20", "10.99."))}
    assert not all_pairs_ping(cluster)
    # A node that joins now starts (it lists the same entries) and is programmed everywhere.
    newcomer = cluster.topo.add_node()
    cluster.agents[newcomer.name] = cluster.topo.start_agent(newcomer, cluster.store_url)
    for node in nodes:
        wait_for(
            lambda node=node: programmed(node, newcomer) and programmed(newcomer, node),
            10,
            what=f"{node.name} and the newcomer programming each other",
        )
    # One warning per bad entry, however many reconciles ran since.
    log = open(nodes[0].log_path, errors="replace").read()
    for key in entries:
        if key in rejected:
            assert log.count(f"ignoring the store entry {key} ") == 1, key
    for key in list(entries) + ["subnets/10.244.207.0-24"]:
        delete_raw(cluster, key)
