"""The node agent on a real etcd with many nodes: an event costs one node's entries, steady state costs the
keep-alive. Root only.

Two node namespaces on an underlay (tests/multinode.py), etcd in the underlay namespace, one real agent on n0
with a short lease TTL (6 s: a keep-alive every 2 s), and 150 more nodes as leases written straight into etcd
through the same store code (no netlink: simulated remote nodes). Then:

    - after the agent programmed them all, one node joining changes exactly its three entries on n0's VXLAN
      device (netlink notifications read in n0: one FDB entry, one neighbour, one route) and no full
      reconcile runs (the agent's own counters), and one leaving removes exactly its three;
    - over 5 idle seconds the agent asks the store for nothing but the lease keep-alive, on the watch it
      opened once (the store's own request counters, read through `pycni agent status`);
    - `pycni agent status` shows the store side.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

import netns

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster_helpers import etcd_skip_reason, start_etcd  # noqa: E402
from multinode import UNDERLAY_GATEWAY, cluster_topology, wait_for  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.multinode,
    pytest.mark.etcd,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
    pytest.mark.skipif(etcd_skip_reason() is not None, reason=etcd_skip_reason() or ""),
]

PYCNI = os.path.join(os.path.dirname(sys.executable), "pycni")
NETWORK = "10.244.0.0/16"
SIMULATED = 150
VXLAN = "pycni.1"


def status(node) -> dict:
    done = subprocess.run(
        [PYCNI, "agent", "status", "--socket", node.socket, "--json"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["overlay"]


def fdb_count(node) -> int:
    out = node.run("bridge", "-j", "fdb", "show", "dev", VXLAN).stdout
    return sum(1 for e in json.loads(out or "[]") if e.get("dst"))


class Notifications:
    """rtnetlink notifications in one namespace, read from a socket opened there (the agent's own decoder)."""

    def __init__(self, path: str) -> None:
        from pycni.overlay.monitor import GROUPS

        with netns.enter(path):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        self.sock.bind((0, GROUPS))
        self.sock.settimeout(0.2)

    def collect(self, seconds: float) -> list:
        from pycni.overlay.monitor import changes

        out, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            found = changes(data)
            assert found is not None, "notifications were lost"
            out.extend(found)
        return out

    def close(self) -> None:
        self.sock.close()


def entry_keys(found: list, index: int) -> set[tuple[str, bool, str]]:
    """(kind, deleted, what) of the neighbour, FDB and route changes on the device ``index``."""
    keys = set()
    for change in found:
        if change.index != index or change.kind not in ("fdb", "neigh", "route"):
            continue
        what = change.mac if change.kind == "fdb" else change.ip if change.kind == "neigh" else change.dst
        if change.kind == "fdb" and not change.ip:
            continue  # the device's own address
        if change.kind in ("fdb", "neigh") and not change.deleted and not change.permanent:
            continue  # the kernel's own state changes (a deleted entry still referenced goes FAILED)
        if change.kind == "route" and (change.table != 254 or not change.gateway):
            continue  # the kernel's own (local and link-local) routes of the device
        keys.add((change.kind, change.deleted, what))
    return keys


def test_one_event_costs_one_nodes_entries_and_steady_state_only_the_keep_alive():
    from ipam.cluster import ClusterConfig, acquire_lease, open_store, release_lease

    with cluster_topology(2, "inc") as topo:
        etcd = start_etcd(topo.underlay_path, UNDERLAY_GATEWAY, workdir=topo.path("etcd"), name="inc")
        try:
            url = etcd.url
            n0 = topo.nodes[0]
            assert n0.run(PYCNI, "cluster", "init", "--store", url, "--network", NETWORK).returncode == 0
            with netns.enter(n0.path):
                store = open_store(url)
            try:
                cfg = ClusterConfig(NETWORK)
                for i in range(SIMULATED):
                    acquire_lease(
                        store,
                        cfg,
                        f"172.16.{i // 250}.{i % 250 + 1}",
                        f"0a:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}",
                        node_name=f"sim{i}",
                        ttl=3600,
                    )
                agent = topo.start_agent(n0, url, extra_args=("--lease-ttl", "6", "--log-level", "debug"))
                wait_for(lambda: fdb_count(n0) == SIMULATED, 30, interval=0.2, what="n0 programming every node")
                index = n0.ip_json("link", "show", VXLAN)[0]["ifindex"]
                wait_for(lambda: status(n0)["store"]["watch"] == "streaming", 10, what="the watch streaming")
                before = status(n0)

                # -- a node joins: exactly its three entries appear
                watcher = Notifications(n0.path)
                try:
                    joined = acquire_lease(store, cfg, "172.16.9.9", "0a:00:00:00:99:99", node_name="joiner", ttl=3600)
                    found = watcher.collect(1.5)
                finally:
                    watcher.close()
                vtep = joined.subnet.split("/")[0]
                assert entry_keys(found, index) == {
                    ("fdb", False, "0a:00:00:00:99:99"),
                    ("neigh", False, vtep),
                    ("route", False, joined.subnet),
                }
                after = status(n0)
                assert after["reconciles"] == before["reconciles"], (
                    f"a full reconcile ran for one event:\n{agent.log_tail(30)}"
                )
                assert after["events"] == before["events"] + 1
                assert after["changes"] == before["changes"] + 3

                # -- it leaves: exactly its three entries go
                watcher = Notifications(n0.path)
                try:
                    assert release_lease(store, "172.16.9.9")
                    found = watcher.collect(1.5)
                finally:
                    watcher.close()
                assert entry_keys(found, index) == {
                    ("fdb", True, "0a:00:00:00:99:99"),
                    ("neigh", True, vtep),
                    ("route", True, joined.subnet),
                }
                assert status(n0)["reconciles"] == before["reconciles"]
            finally:
                store.close()

            # -- steady state: the keep-alive and nothing else, on the one watch
            first = status(n0)["store"]["requests"]["requests"]
            time.sleep(5.0)
            last = status(n0)["store"]
            asked = {
                op: count - first.get(op, 0)
                for op, count in last["requests"]["requests"].items()
                if count != first.get(op, 0)
            }
            assert set(asked) <= {"lease_keepalive"}, f"the idle agent asked the store for {asked}"
            assert 1 <= asked.get("lease_keepalive", 0) <= 4, asked
            assert last["relists"] == 0 and last["watch"] == "streaming"
            text = subprocess.run(
                [PYCNI, "agent", "status", "--socket", n0.socket], capture_output=True, text=True, timeout=30
            ).stdout
            assert "store:    watch streaming at revision" in text and "lease_keepalive" in text
            assert agent.running()
        finally:
            topo.stop_all()
            etcd.stop()
