"""The overlay node agent on three node namespaces, with the file store and with etcd. Root only.

Topology (tests/multinode.py): an underlay namespace with a bridge (192.168.100.1/24) and
node namespaces n0..n2 at 192.168.100.10-12; etcd, when used, runs in the underlay
namespace on 192.168.100.1. Each node runs a real agent process (`pycni agent`, or
`python -m pycni.overlay` where that CLI is not installed) inside its namespace.

Every assertion is on kernel state read with `ip`/`bridge`/`nft` inside the node
namespaces, or on packets that really cross the overlay. The tests of one store
kind share one cluster and run in file order; each leaves the three agents running.
"""

from __future__ import annotations

import ipaddress
import os
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import netns  # noqa: E402
from cluster_helpers import etcd_gateway, etcd_skip_reason, start_etcd  # noqa: E402
from multinode import UNDERLAY_GATEWAY, cluster_topology, wait_agent_ready, wait_for  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

NETWORK = "10.244.0.0/16"
VNI = 1
PORT = 8472
VXLAN = f"pycni.{VNI}"
PYCNI = os.path.join(os.path.dirname(sys.executable), "pycni")
CONVERGE_LIMIT = 1.0  # join/leave must be seen by every other node within this (seconds)


# ---- kernel state as the tools show it ------------------------------------------------------


def fdb(node) -> set[tuple[str, str]]:
    """(mac, dst) of the permanent `self` FDB entries on the node's VXLAN device."""
    return {
        (e["mac"], e["dst"])
        for e in node.ip_json_cmd("bridge", "-j", "fdb", "show", "dev", VXLAN)
        if e.get("dst") and e.get("state") == "permanent" and "self" in e.get("flags", [])
    }


def neighbours(node) -> set[tuple[str, str]]:
    return {
        (e["dst"], e["lladdr"])
        for e in node.ip_json("neigh", "show", "dev", VXLAN)
        if "PERMANENT" in e.get("state", [])
    }


def routes(node) -> set[tuple[str, str]]:
    return {
        (e["dst"], e["gateway"])
        for e in node.ip_json("route", "show", "dev", VXLAN)
        if "onlink" in e.get("flags", []) and e.get("gateway")
    }


def expected_entries(remote_state: dict) -> tuple[tuple[str, str], tuple[str, str], tuple[str, str]]:
    vtep_address = remote_state["subnet"].split("/")[0]
    return (
        (remote_state["vtepMAC"], remote_state["publicIP"]),
        (vtep_address, remote_state["vtepMAC"]),
        (remote_state["subnet"], vtep_address),
    )


def has_entries_for(node, remote_state: dict) -> bool:
    f, n, r = expected_entries(remote_state)
    return f in fdb(node) and n in neighbours(node) and r in routes(node)


def has_no_entries_for(node, remote_state: dict) -> bool:
    f, n, r = expected_entries(remote_state)
    return (
        not any(e[1] == remote_state["publicIP"] for e in fdb(node))
        and n not in neighbours(node)
        and not any(e[0] == remote_state["subnet"] for e in routes(node))
    )


def nft_counter(node, comment: str) -> int:
    import json

    data = json.loads(node.run("nft", "-j", "list", "table", "inet", "pycni_overlay").stdout)
    for obj in data["nftables"]:
        rule = obj.get("rule")
        if rule and rule.get("comment") == comment:
            for expr in rule["expr"]:
                if "counter" in expr:
                    return expr["counter"]["packets"]
    raise AssertionError(f"no rule with comment {comment!r}")


def rx_packets(node, dev: str = VXLAN) -> int:
    return node.ip_json("-s", "link", "show", dev)[0]["stats64"]["rx"]["packets"]


class FastProbe:
    """Polls one node's VXLAN entries through netlink from this process (no subprocess per poll)."""

    def __init__(self, node) -> None:
        from cni_plugins.kernel import ip as kip

        self.node = node
        with netns.enter(node.path):
            self.ipr = kip.open_netlink()  # the socket stays in the node's namespace

    def entries(self) -> tuple[set, set, set]:
        from cni_plugins.kernel import vxlan as kvx

        link = self.ipr.link_lookup(ifname=VXLAN)
        if not link:
            return set(), set(), set()
        index = link[0]
        return (
            {(e.mac, e.dst) for e in kvx.fdb_entries(self.ipr, index)},
            {(e.ip, e.mac) for e in kvx.neigh_entries(self.ipr, index)},
            {(e.dst, e.gw) for e in kvx.onlink_routes(self.ipr, index)},
        )

    def has(self, remote_state: dict) -> bool:
        f, n, r = expected_entries(remote_state)
        fs, ns, rs = self.entries()
        return f in fs and n in ns and r in rs

    def lacks(self, remote_state: dict) -> bool:
        f, n, r = expected_entries(remote_state)
        fs, ns, rs = self.entries()
        return f not in fs and n not in ns and r not in rs

    def close(self) -> None:
        self.ipr.close()


def measure(probes: list[FastProbe], check, timeout: float) -> float:
    """Seconds until check(probe) holds on every probe, polling every 2 ms (bounded)."""
    start = time.monotonic()
    pending = list(probes)
    for _ in range(int(timeout / 0.002) + 1):
        pending = [p for p in pending if not check(p)]
        if not pending:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            break
        time.sleep(0.002)
    raise AssertionError(f"not converged within {timeout} s on {[p.node.name for p in pending]}")


# ---- the cluster -------------------------------------------------------------------------------


class Cluster:
    def __init__(self, topo, store_url: str, kind: str, etcd=None) -> None:
        self.topo, self.store_url, self.kind, self.etcd = topo, store_url, kind, etcd
        self.agents: dict[int, object] = {}

    @property
    def nodes(self):
        return self.topo.nodes[:3]

    def state(self, node) -> dict:
        state = node.read_state()
        assert state is not None, f"{node.name} has no overlay state"
        return state

    def start(self, node, extra=()):
        handle = self.topo.start_agent(node, self.store_url, extra_args=extra)
        self.agents[node.index] = handle
        return handle

    def store(self):
        """A store client opened inside node 0 (where the store is reachable)."""
        from ipam.cluster import open_store

        with netns.enter(self.topo.nodes[0].path):
            return open_store(self.store_url)


def _add_json_helper(node) -> None:
    import json

    def ip_json_cmd(*args: str) -> list:
        out = node.run(*args).stdout.strip()
        return json.loads(out) if out else []

    node.ip_json_cmd = ip_json_cmd


@pytest.fixture(scope="module", params=["file", pytest.param("etcd", marks=pytest.mark.etcd)])
def cluster(request):
    kind = request.param
    if kind == "etcd" and etcd_skip_reason():
        pytest.skip(etcd_skip_reason())
    with cluster_topology(3, "ov") as topo:
        c = Cluster(topo, "", kind)
        try:
            if kind == "etcd":
                c.etcd = start_etcd(topo.underlay_path, UNDERLAY_GATEWAY, workdir=topo.path("etcd"), name="ov")
                c.store_url = f"etcd://{UNDERLAY_GATEWAY}:2379"
            else:
                c.store_url = "file://" + topo.path("store")
            init = topo.nodes[0].run(
                PYCNI,
                "cluster",
                "init",
                "--store",
                c.store_url,
                "--network",
                NETWORK,
                "--vni",
                str(VNI),
                "--port",
                str(PORT),
                check=False,
            )
            assert init.returncode == 0, init.stderr
            for node in topo.nodes:
                _add_json_helper(node)
                c.start(node)
            states = [c.state(n) for n in c.nodes]
            for node in c.nodes:
                for other in states:
                    if other["publicIP"] != node.public_ip:
                        wait_for(
                            lambda: has_entries_for(node, other), 5, what=f"{node.name} learning {other['subnet']}"
                        )
            yield c
        finally:
            topo.stop_all()
            if c.etcd is not None:
                c.etcd.stop()


# ---- tests ---------------------------------------------------------------------------------------


def test_each_node_leases_a_distinct_subnet_and_builds_its_devices(cluster):
    states = [cluster.state(n) for n in cluster.nodes]
    subnets = [s["subnet"] for s in states]
    assert len(set(subnets)) == 3
    for node, state in zip(cluster.nodes, states):
        assert state["network"] == NETWORK and state["publicIP"] == node.public_ip
        link = node.ip_json("-d", "link", "show", VXLAN)[0]
        info = link["linkinfo"]["info_data"]
        assert link["linkinfo"]["info_kind"] == "vxlan"
        assert info["id"] == VNI and info["port"] == PORT and info["local"] == node.public_ip
        assert info["learning"] is False
        underlay_mtu = node.ip_json("link", "show", "eth0")[0]["mtu"]
        assert link["mtu"] == underlay_mtu - 50 == state["mtu"]
        assert link["address"] == state["vtepMAC"]
        assert "UP" in link["flags"]
        vx_addrs = [
            (a["local"], a["prefixlen"])
            for a in node.ip_json("addr", "show", VXLAN)[0]["addr_info"]
            if a["family"] == "inet"
        ]
        assert vx_addrs == [(state["subnet"].split("/")[0], 32)]
        br_addrs = [
            (a["local"], a["prefixlen"])
            for a in node.ip_json("addr", "show", "pycni0")[0]["addr_info"]
            if a["family"] == "inet"
        ]
        assert br_addrs == [(state["gateway"], int(state["subnet"].split("/")[1]))]
        assert node.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"


def test_every_node_has_permanent_entries_for_every_other(cluster):
    states = {n.index: cluster.state(n) for n in cluster.nodes}
    for node in cluster.nodes:
        others = [s for i, s in states.items() if i != node.index]
        want_fdb, want_neigh, want_routes = zip(*(expected_entries(s) for s in others))
        assert fdb(node) == set(want_fdb)
        assert neighbours(node) == set(want_neigh)
        assert routes(node) == set(want_routes)


def test_traffic_crosses_the_overlay(cluster):
    for a in cluster.nodes:
        for b in cluster.nodes:
            if a is not b:
                assert a.ping(cluster.state(b)["gateway"]), f"{a.name} cannot reach {b.name}'s gateway"
    a, b = cluster.nodes[0], cluster.nodes[1]
    gateway = cluster.state(b)["gateway"]
    # 1400 bytes of ICMP payload + 28 of headers fit the 1450-byte overlay MTU without fragmenting.
    assert a.ping(gateway, count=3, size=1400, dont_fragment=True)
    assert a.ping(gateway, size=1450 - 28, dont_fragment=True)
    assert not a.ping(gateway, size=1450 - 27, dont_fragment=True, timeout=1)  # one byte over the MTU
    # The pod-to-pod path keeps the source: the answer comes back to node A's own overlay address.
    assert a.ping(gateway, src=cluster.state(a)["gateway"])


def test_join_and_leave_converge_within_a_second(cluster, capsys):
    from ipam.cluster import list_leases, release_lease

    topo = cluster.topo
    newcomer = topo.nodes[3] if len(topo.nodes) > 3 else topo.add_node()
    _add_json_helper(newcomer)
    probes = [FastProbe(n) for n in cluster.nodes]
    store = cluster.store()
    try:
        spawned = time.monotonic()
        handle = topo.start_agent(newcomer, cluster.store_url, wait=False)
        cluster.agents[newcomer.index] = handle
        # Timestamp the moment the newcomer's lease is in the store (polled every ms, bounded) ...
        leased_at, lease = None, None
        for _ in range(20000):
            lease = next((l for l in list_leases(store)[0] if l.public_ip == newcomer.public_ip), None)
            if lease is not None:
                leased_at = time.monotonic()
                break
            assert handle.running(), handle.log_tail()
            time.sleep(0.001)
        assert lease is not None and leased_at is not None, "the newcomer never leased a subnet"
        # ... then until every other node has its FDB, neighbour and route entries.
        published = {"subnet": lease.subnet, "publicIP": lease.public_ip, "vtepMAC": lease.vtep_mac}
        measure(probes, lambda p: p.has(published), timeout=10)
        learned = time.monotonic()
        join_time = learned - leased_at
        wait_agent_ready(handle)
        state = cluster.state(newcomer)
        assert (state["subnet"], state["vtepMAC"]) == (lease.subnet, lease.vtep_mac)

        # Leave: the agent stops (keeping its devices), then its lease is released.
        handle.stop()
        assert any(l.public_ip == newcomer.public_ip for l in list_leases(store)[0])
        assert release_lease(store, newcomer.public_ip)
        leave_time = measure(probes, lambda p: p.lacks(state), timeout=10)
        with capsys.disabled():
            print(
                f"\n[{cluster.kind}] join: lease in store -> entries on all 3 other nodes {join_time * 1000:.0f} ms "
                f"(agent process start -> done {(learned - spawned) * 1000:.0f} ms); "
                f"leave: lease released -> entries gone on all 3 {leave_time * 1000:.0f} ms"
            )
        assert join_time < CONVERGE_LIMIT
        assert leave_time < CONVERGE_LIMIT
    finally:
        for probe in probes:
            probe.close()
        store.close()


def test_restart_keeps_subnet_and_vtep_mac(cluster):
    node, peer = cluster.nodes[1], cluster.nodes[0]
    before = cluster.state(node)
    mac_before = node.ip_json("link", "show", VXLAN)[0]["address"]
    peer_fdb_before = fdb(peer)
    assert cluster.agents[node.index].stop() == 0  # SIGTERM: a clean exit
    # The entries outlive the agent: traffic keeps flowing while it is down.
    assert peer.ping(before["gateway"])
    assert node.ip_json("link", "show", VXLAN)[0]["address"] == mac_before
    cluster.start(node)
    after = cluster.state(node)
    assert after["subnet"] == before["subnet"]
    assert after["vtepMAC"] == before["vtepMAC"] == mac_before
    assert node.ip_json("link", "show", VXLAN)[0]["address"] == mac_before
    assert fdb(peer) == peer_fdb_before
    assert peer.ping(after["gateway"])


def test_a_renumbered_node_keeps_its_subnet_and_drops_the_old_address(cluster):
    """The node's underlay address changes while its agent is down (DHCP, a moved VM): the lease moves with it."""
    node, peers = cluster.nodes[2], cluster.nodes[:2]
    old_ip, new_ip = node.public_ip, "192.168.100.60"
    before = cluster.state(node)

    def renumber(frm: str, to: str) -> None:
        assert cluster.agents[node.index].stop() == 0
        node.ip("addr", "del", f"{frm}/24", "dev", "eth0")  # first: deleting a primary drops its secondaries
        node.ip("addr", "add", f"{to}/24", "dev", "eth0")
        node.public_ip = to
        cluster.start(node)

    renumber(old_ip, new_ip)
    try:
        after = cluster.state(node)
        assert (after["subnet"], after["publicIP"]) == (before["subnet"], new_ip)
        assert after["vtepMAC"] != before["vtepMAC"]  # derived from the address
        info = node.ip_json("-d", "link", "show", VXLAN)[0]["linkinfo"]["info_data"]
        assert info["local"] == new_ip
        with cluster.store() as store:
            from ipam.cluster import list_leases

            held = {l.public_ip: l.subnet for l in list_leases(store)[0]}
        assert held.get(new_ip) == before["subnet"] and old_ip not in held, held
        for peer in peers:
            stale_neigh = expected_entries(before)[1]
            wait_for(
                lambda: (
                    has_entries_for(peer, after)
                    and not any(dst == old_ip for _mac, dst in fdb(peer))
                    and stale_neigh not in neighbours(peer)
                ),
                5,
                what=f"{peer.name} following the renumbered node",
            )
            assert old_ip not in nft_members(peer)
            assert peer.ping(after["gateway"])
    finally:
        renumber(new_ip, old_ip)
    restored = cluster.state(node)
    assert (restored["subnet"], restored["publicIP"], restored["vtepMAC"]) == (
        before["subnet"],
        old_ip,
        before["vtepMAC"],
    )
    for peer in peers:
        wait_for(lambda: has_entries_for(peer, restored), 5, what=f"{peer.name} following the node back")


def test_hand_deleted_entries_are_repaired(cluster):
    node, remote = cluster.nodes[0], cluster.nodes[2]
    rs = cluster.state(remote)
    (mac, dst), (neigh_ip, _), (subnet, gw) = expected_entries(rs)
    node.run("bridge", "fdb", "del", mac, "dev", VXLAN, "dst", dst, "self")
    took = wait_for(lambda: has_entries_for(node, rs), 5, what="FDB entry repaired")
    node.run("ip", "neigh", "del", neigh_ip, "dev", VXLAN)
    wait_for(lambda: has_entries_for(node, rs), 5, what="neighbour entry repaired")
    node.run("ip", "route", "del", subnet, "via", gw, "dev", VXLAN)
    wait_for(lambda: has_entries_for(node, rs), 5, what="route repaired")
    # A wrong MAC written by hand is put right too.
    node.run("ip", "neigh", "replace", neigh_ip, "lladdr", "02:00:00:00:00:99", "dev", VXLAN, "nud", "permanent")
    wait_for(lambda: has_entries_for(node, rs) and len(neighbours(node)) == 2, 5, what="neighbour entry corrected")
    # Even the device itself: deleted, it comes back with every entry.
    node.ip("link", "del", VXLAN)
    wait_for(
        lambda: (
            node.ip("link", "show", VXLAN, check=False).returncode == 0
            and all(has_entries_for(node, cluster.state(o)) for o in cluster.nodes if o is not node)
        ),
        5,
        what="VXLAN device re-created",
    )
    assert node.ping(rs["gateway"])
    print(f"\n[{cluster.kind}] FDB entry repaired {took * 1000:.0f} ms after `bridge fdb del`")


def test_agent_leave_command_removes_the_node_everywhere(cluster):
    leaver = cluster.nodes[2]
    state = cluster.state(leaver)
    others = [n for n in cluster.nodes if n is not leaver]
    cluster.agents[leaver.index].stop()
    for node in others:
        assert has_entries_for(node, state)
    done = cluster.topo.leave(leaver, cluster.store_url)
    assert done.returncode == 0, done.stderr
    for node in others:
        wait_for(lambda: has_no_entries_for(node, state), 5, what=f"{node.name} dropping {state['subnet']}")
        wait_for(lambda: leaver.public_ip not in nft_members(node), 5, what=f"{node.name} dropping the member")
    assert not others[0].ping(state["gateway"], timeout=1)
    # Rejoining (the state file is still there) takes the same subnet back.
    cluster.start(leaver)
    assert cluster.state(leaver)["subnet"] == state["subnet"]
    for node in others:
        wait_for(lambda: has_entries_for(node, state), 5, what=f"{node.name} re-learning {state['subnet']}")
    assert others[0].ping(state["gateway"])


def test_agent_started_with_leave_removes_itself_on_sigterm(cluster):
    topo = cluster.topo
    node = topo.nodes[3] if len(topo.nodes) > 3 else topo.add_node()
    _add_json_helper(node)
    handle = cluster.start(node, extra=("--leave",))
    state = cluster.state(node)
    for other in cluster.nodes:
        wait_for(lambda: has_entries_for(other, state), 5, what=f"{other.name} learning {state['subnet']}")
    assert handle.stop() == 0
    for other in cluster.nodes:
        wait_for(lambda: has_no_entries_for(other, state), 5, what=f"{other.name} dropping {state['subnet']}")
    assert node.ip("link", "show", VXLAN, check=False).returncode != 0
    assert node.ip("link", "show", "pycni0", check=False).returncode != 0
    assert node.run("nft", "list", "table", "inet", "pycni_overlay", check=False).returncode != 0
    assert node.read_state() is None


def nft_members(node) -> set[str]:
    import json

    data = json.loads(node.run("nft", "-j", "list", "set", "inet", "pycni_overlay", "members").stdout)
    for obj in data["nftables"]:
        if "set" in obj:
            return set(obj["set"].get("elem", []))
    return set()


def test_vxlan_from_a_non_member_is_dropped(cluster):
    topo = cluster.topo
    target, member = cluster.nodes[1], cluster.nodes[0]
    ts = cluster.state(target)
    wait_for(lambda: nft_members(target) == {n.public_ip for n in cluster.nodes}, 5, what="member set in step")
    outsider = topo.hosts[0] if topo.hosts else topo.add_host()
    # The outsider builds a VTEP of its own that speaks the cluster's VNI and port and knows the target's
    # VTEP MAC: its frames are valid VXLAN, they only come from an address that holds no lease.
    if outsider.ip("link", "show", "vx", check=False).returncode != 0:
        outsider.ip(
            "link",
            "add",
            "vx",
            "type",
            "vxlan",
            "id",
            str(VNI),
            "dstport",
            str(PORT),
            "local",
            outsider.public_ip,
            "dev",
            "eth0",
            "nolearning",
        )
        outsider.ip("link", "set", "vx", "up")
        outsider.ip("addr", "add", "10.244.250.0/32", "dev", "vx")
        outsider.run("bridge", "fdb", "append", ts["vtepMAC"], "dev", "vx", "dst", target.public_ip)
        vtep_address = ts["subnet"].split("/")[0]
        outsider.ip("neigh", "replace", vtep_address, "lladdr", ts["vtepMAC"], "dev", "vx", "nud", "permanent")
        outsider.ip("route", "replace", ts["subnet"], "via", vtep_address, "dev", "vx", "onlink")
    dropped, accepted, rx = (
        nft_counter(target, "vxlan from non-members"),
        nft_counter(target, "vxlan from ipv4 members"),
        rx_packets(target),
    )
    assert not outsider.ping(ts["gateway"], count=5, timeout=0.3)
    dropped_after, rx_after = nft_counter(target, "vxlan from non-members"), rx_packets(target)
    assert dropped_after - dropped >= 5, "the outsider's VXLAN packets were not dropped by the member filter"
    assert rx_after - rx < 5, "the outsider's frames reached the VXLAN device"
    # A member's VXLAN traffic to the same node passes the same filter.
    assert member.ping(ts["gateway"], count=3)
    assert nft_counter(target, "vxlan from ipv4 members") - accepted >= 3
    assert rx_packets(target) - rx_after >= 3


def test_pod_traffic_is_masqueraded_only_when_it_leaves_the_cluster(cluster):
    """A pod on node A: to another node's subnet and to its own node it keeps its address; to another
    node's own address and to the outside world (an underlay host that is no cluster member) it leaves
    with node A's address (a strict host's rp_filter would drop a pod source arriving on its underlay)."""
    topo = cluster.topo
    a, b = cluster.nodes[0], cluster.nodes[1]
    sa, sb = cluster.state(a), cluster.state(b)
    pod_ip = str(ipaddress.ip_network(sa["subnet"]).network_address + 5)
    pod = topo.add_pod(a, f"{pod_ip}/{sa['subnet'].split('/')[1]}", sa["gateway"], sa["mtu"])
    outside = topo.hosts[0] if topo.hosts else topo.add_host()
    assert pod.ping(sb["gateway"]), "pod on A cannot reach node B's pod subnet"
    assert udp_source(pod, b, sb["gateway"]) == pod_ip  # pod -> other node's pod network: no NAT
    assert udp_source(pod, b, b.public_ip) == a.public_ip  # pod -> another node's own address: NAT
    assert udp_source(pod, a, a.public_ip) == pod_ip  # pod -> its own node: no NAT
    assert udp_source(pod, outside, outside.public_ip) == a.public_ip  # pod -> outside: masqueraded
    assert pod.ping(outside.public_ip)


def udp_source(sender, receiver, address: str, port: int = 9999) -> str:
    """Send one UDP datagram from ``sender`` to ``address`` (held by ``receiver``); the source it arrives with."""
    import socket

    with netns.enter(receiver.path):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netns.enter(sender.path):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind((address, port))
        rx.settimeout(3)
        tx.sendto(b"hello", (address, port))
        _data, (source, _port) = rx.recvfrom(64)
        return source
    finally:
        rx.close()
        tx.close()


def test_store_outage_keeps_traffic_and_recovers(cluster):
    if cluster.kind != "etcd":
        pytest.skip("only an etcd store can go away")
    a, b = cluster.nodes[0], cluster.nodes[1]
    gateway = cluster.state(b)["gateway"]
    etcd = cluster.etcd
    etcd.stop()
    try:
        time.sleep(1.5)  # the agents notice and back off
        for node in cluster.nodes:
            assert cluster.agents[node.index].running(), f"agent on {node.name} died with the store"
        assert a.ping(gateway, count=3), "traffic stopped while the store was down"
        assert has_entries_for(a, cluster.state(b))
    finally:
        restarted = start_etcd(etcd.netns, etcd.ip, workdir=os.path.dirname(etcd.data_dir), name=etcd.name)
        cluster.etcd = restarted
    # A node that joins after the store is back is learned by every agent that lived through the outage.
    topo = cluster.topo
    newcomer = topo.add_node()
    _add_json_helper(newcomer)
    cluster.start(newcomer)
    state = cluster.state(newcomer)
    # Bounded by the agents' back-off (capped at 5 s) plus one store request timeout (5 s).
    started = time.monotonic()
    for node in cluster.nodes:
        try:
            wait_for(lambda: has_entries_for(node, state), 20, what=f"{node.name} learning the newcomer")
        except AssertionError as exc:
            agent = cluster.agents[node.index]
            agent.dump_threads()
            raise AssertionError(f"{exc}\n{agent.log_tail(120)}") from None
    print(
        f"\n[etcd] after the outage, a new node was learned by all {len(cluster.nodes)} nodes "
        f"{time.monotonic() - started:.2f} s after it was ready"
    )
    assert a.ping(state["gateway"])


# ---- the OverlayNode API in-process ------------------------------------------------------------


RENEW_TTL = 6  # seconds: the in-process node's lease; it keeps it alive every TTL/3 = 2 s
RENEW_WATCH = 5.5  # seconds of watching the lease in etcd: at least two keep-alives


def lease_in_etcd(member, key: str) -> tuple[int, int, int]:
    """(lease ID, seconds left, granted TTL) of the etcd lease attached to ``key`` (under /pycni/), read
    through etcd's JSON gateway (KV range, then LeaseTimeToLive); (0, -1, 0) when the key is gone."""
    import base64

    status, answer = etcd_gateway(member, "/v3/kv/range", {"key": base64.b64encode(f"/pycni/{key}".encode()).decode()})
    assert status == 200, answer
    kvs = answer.get("kvs") or []
    lease = int(kvs[0].get("lease", 0)) if kvs else 0
    if not lease:
        return 0, -1, 0
    status, answer = etcd_gateway(member, "/v3/lease/timetolive", {"ID": str(lease)})
    assert status == 200, answer
    return lease, int(answer.get("TTL", -1)), int(answer.get("grantedTTL", 0))


def watch_lease(member, key: str, seconds: float, interval: float = 0.2) -> list[tuple[float, int, int, int]]:
    """Samples (time, lease ID, seconds left, granted TTL) of the lease of ``key`` for ``seconds`` (bounded)."""
    samples = []
    started = time.monotonic()
    for _ in range(int(seconds / interval) + 1):
        samples.append((time.monotonic() - started, *lease_in_etcd(member, key)))
        if time.monotonic() - started >= seconds:
            break
        time.sleep(max(0.0, interval - (time.monotonic() - started) % interval))
    return samples


def assert_kept_alive(samples: list[tuple[float, int, int, int]], ttl: int) -> None:
    """The keep-alive itself, seen in etcd: one lease all along (never expired and re-created), granted
    ``ttl``, refreshed again and again, and never left to drop below half its TTL."""
    table = "\n".join(
        f"  {t:5.2f} s  lease {lease:x}  {left} s left of {granted}" for t, lease, left, granted in samples
    )
    leases = {lease for _t, lease, _left, _granted in samples}
    assert len(leases) == 1 and 0 not in leases, f"the lease changed or vanished (it expired):\n{table}"
    assert {granted for *_rest, granted in samples} == {ttl}, table
    lowest = min(left for _t, _lease, left, _granted in samples)
    assert lowest >= ttl / 2, f"the lease fell to {lowest} s left of {ttl} before it was renewed:\n{table}"
    refreshes = sum(1 for before, after in zip(samples, samples[1:]) if after[2] > before[2])
    expected = int(samples[-1][0] // (ttl / 3))  # renewal periods watched
    assert refreshes >= expected >= 2, f"{refreshes} keep-alives seen in {expected} renewal periods:\n{table}"


@pytest.mark.etcd
def test_in_process_node_renews_a_short_lease_and_leaves_cleanly():
    """OverlayNode driven directly: TTL renewal against etcd, status(), close(leave=True).

    Renewal is proven on the lease itself, not on the key's presence (an expired lease is re-created by
    the watch within milliseconds): etcd's LeaseTimeToLive, sampled over two renewal periods, shows one
    lease ID throughout, refreshed every TTL/3 and never below TTL/2.
    """
    if etcd_skip_reason():
        pytest.skip(etcd_skip_reason())
    from cni_plugins.kernel.ethtool import get_tx_checksum
    from ipam.cluster import list_leases
    from pycni.overlay.node import OverlayNode, OverlayOptions

    with cluster_topology(2, "ovp") as topo:
        etcd = start_etcd(topo.underlay_path, UNDERLAY_GATEWAY, workdir=topo.path("etcd"), name="ovp")
        try:
            store_url = f"etcd://{UNDERLAY_GATEWAY}:2379"
            a, b = topo.nodes
            _add_json_helper(b)
            assert a.run(PYCNI, "cluster", "init", "--store", store_url, "--network", NETWORK).returncode == 0
            topo.start_agent(b, store_url)
            node = OverlayNode(
                OverlayOptions(
                    store_url=store_url,
                    public_ip=a.public_ip,
                    state_dir=a.state_dir,
                    node_name="in-process",
                    lease_ttl=RENEW_TTL,
                    reconcile_interval=0.5,
                    tx_checksum_offload=False,
                )
            )
            stop = threading.Event()
            started, failure = threading.Event(), []

            def serve() -> None:
                try:
                    with netns.enter(a.path):
                        node.start()
                        started.set()
                        node.run(stop)
                except BaseException as exc:
                    failure.append(exc)
                    started.set()

            thread = threading.Thread(target=serve, daemon=True)
            thread.start()
            try:
                assert started.wait(20) and not failure, failure
                assert node.ready()
                mine = a.read_state()
                wait_for(lambda: has_entries_for(b, mine), 5, what="B learning the in-process node")
                wait_for(lambda: node.status()["remotes"] == 1, 5, what="the node seeing B")
                status = node.status()
                assert status["storeReachable"] and status["subnet"] == mine["subnet"]
                assert status["vtepMAC"] == mine["vtepMAC"] and status["nodeName"] == "in-process"
                with netns.enter(a.path):
                    assert get_tx_checksum(VXLAN) is False
                key = node._keeper.lease.key
                assert_kept_alive(watch_lease(etcd, key, RENEW_WATCH), RENEW_TTL)
                store = topo.nodes[0]
                with netns.enter(store.path):
                    from ipam.cluster import open_store

                    client = open_store(store_url)
                try:
                    assert any(l.public_ip == a.public_ip for l in list_leases(client)[0]), "the lease expired"
                    assert has_entries_for(b, mine)
                    stop.set()
                    thread.join(10)
                    node.close(leave=True)
                    assert not any(l.public_ip == a.public_ip for l in list_leases(client)[0])
                finally:
                    client.close()
                wait_for(lambda: has_no_entries_for(b, mine), 5, what="B dropping the node that left")
                assert a.ip("link", "show", VXLAN, check=False).returncode != 0
                assert a.ip("link", "show", "pycni0", check=False).returncode != 0
                assert a.run("nft", "list", "table", "inet", "pycni_overlay", check=False).returncode != 0
                assert a.read_state() is None
            finally:
                stop.set()
                thread.join(10)
                if node.ready():
                    node.close()
        finally:
            topo.stop_all()
            etcd.stop()
