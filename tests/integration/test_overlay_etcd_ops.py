"""The overlay agents on a three-member TLS etcd, through its failures and a compaction. Root only.

Three node namespaces on the test underlay (tests/multinode.py); a three-member etcd cluster in the
underlay namespace (on 192.168.100.1, client ports 2379, 22379, 32379), serving TLS only and asking
for client certificates (tests/cluster_helpers.py: make_tls_certs, start_etcd). Every agent is given
all three endpoints and the TLS flags (--etcd-cafile, --etcd-certfile, --etcd-keyfile):

    TLS          n0 and n1 lease distinct subnets and program each other's entries over TLS; a client
                 without a certificate is refused by etcd (the agents' certificate is what lets them in)
    one down     member 0 (the first endpoint, where the agents stream their watch) stopped: n2 joins
                 through the others and the running node n1 learns it at once
    compaction   n0 paused (SIGSTOP) while member 0 stops, n2 joins and the store is compacted past n0's
                 watch revision (the gateway's /v3/kv/compaction); n0 continues, its watch resumes on
                 another member, meets the compaction, re-lists (its own counter and log) and has n2's entries

Every etcd and agent is stopped by PID when the module ends, also on failure.
"""

from __future__ import annotations

import base64
import os
import signal
import sys
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cluster_helpers import (
    etcd_gateway,
    etcd_skip_reason,
    make_tls_certs,
    start_etcd,  # noqa: E402
    tcp_connections,
    wait_healthy,
)
from multinode import UNDERLAY_GATEWAY, cluster_topology, converged, wait_for  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.multinode, pytest.mark.etcd]

PYCNI = os.path.join(os.path.dirname(sys.executable), "pycni")
NETWORK = "10.244.0.0/16"
PORTS = ((2379, 2380), (22379, 22380), (32379, 32380))  # (client, peer) of members m0, m1, m2
VXLAN = "pycni.1"


class TLSCluster:
    def __init__(self, topo, members, certs) -> None:
        self.topo, self.members, self.certs = topo, members, certs
        self.url = "etcd://" + ",".join(m.endpoint for m in members)
        self.tls_args = (
            "--etcd-cafile",
            certs.ca,
            "--etcd-certfile",
            certs.client_cert,
            "--etcd-keyfile",
            certs.client_key,
        )
        self.agents: dict[str, object] = {}

    def start(self, node):
        # start_agent waits until the agent has written its state and listens on its socket.
        self.agents[node.name] = self.topo.start_agent(node, self.url, extra_args=self.tls_args)
        return self.agents[node.name]

    def status(self, node) -> dict:
        from pycni.agent.client import status

        return status(node.socket, timeout=5.0)["overlay"]


def remote_subnets(node) -> set[str]:
    """The subnets the node routes over its VXLAN device (one onlink route per remote node)."""
    return {r["dst"] for r in node.ip_json("route", "show", "dev", VXLAN) if "onlink" in r.get("flags", [])}


def bump_revision(member) -> int:
    """Write a key outside the cluster's prefix; the store's revision after it (past every lease event)."""
    status, answer = etcd_gateway(
        member,
        "/v3/kv/put",
        {"key": base64.b64encode(b"/eo-test/bump").decode(), "value": base64.b64encode(b"1").decode()},
    )
    assert status == 200, answer
    return int(answer["header"]["revision"])


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[TLSCluster]:
    reason = etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    with cluster_topology(3, "eo") as topo:
        certs = make_tls_certs(topo.path("tls"), [UNDERLAY_GATEWAY])
        initial = ",".join(f"m{i}=http://{UNDERLAY_GATEWAY}:{peer}" for i, (_client, peer) in enumerate(PORTS))
        members = []
        try:
            for i, (client, peer) in enumerate(PORTS):
                members.append(
                    start_etcd(
                        topo.underlay_path,
                        UNDERLAY_GATEWAY,
                        workdir=topo.path("etcd"),
                        name=f"m{i}",
                        client_port=client,
                        peer_port=peer,
                        tls=certs,
                        initial_cluster=initial,
                        cluster_token=f"eo-{topo.tag}",
                        wait=False,
                    )
                )
            wait_healthy(members)
            cluster = TLSCluster(topo, members, certs)
            n0 = topo.nodes[0]
            init = n0.run(
                PYCNI, "cluster", "init", "--store", cluster.url, *cluster.tls_args, "--network", NETWORK, check=False
            )
            assert init.returncode == 0, init.stdout + init.stderr
            cluster.start(topo.nodes[0])
            cluster.start(topo.nodes[1])
            wait_for(lambda: converged(topo.nodes[:2]), 20, what="n0 and n1 routing each other's subnet")
            yield cluster
        finally:
            topo.stop_all()
            for member in members:
                member.stop()


def test_agents_lease_and_converge_over_tls_and_a_client_without_a_certificate_is_refused(tls_cluster):
    c = tls_cluster
    n0, n1 = c.topo.nodes[:2]
    s0, s1 = n0.read_state(), n1.read_state()
    assert s0["subnet"] != s1["subnet"]
    assert remote_subnets(n0) == {s1["subnet"]} and remote_subnets(n1) == {s0["subnet"]}
    assert n0.ping(s1["gateway"]) and n1.ping(s0["gateway"])
    for node in (n0, n1):
        status = c.status(node)
        assert status["storeReachable"] is True and status["lease"] == "valid"
        assert status["store"]["watch"] == "streaming"
    # The same leases, read over TLS with the client certificate ...
    listed = n0.run(PYCNI, "cluster", "leases", "--store", c.url, *c.tls_args, check=False)
    assert listed.returncode == 0, listed.stderr
    assert s0["subnet"] in listed.stdout and s1["subnet"] in listed.stdout
    # ... and refused without it: etcd asks for a client certificate.
    refused = n0.run(
        PYCNI, "cluster", "leases", "--store", c.url, "--etcd-cafile", c.certs.ca, "--timeout", "2", check=False
    )
    assert refused.returncode != 0 and s0["subnet"] not in refused.stdout


def test_with_the_first_member_down_a_node_joins_and_a_compaction_makes_a_paused_node_list_again(tls_cluster):
    c = tls_cluster
    n0, n1, n2 = c.topo.nodes
    agent0 = c.agents[n0.name]
    # n0's watch streams from member 0, the first endpoint (this is what the compaction below relies on).
    assert tcp_connections(n0.path, PORTS[0][0], pid=agent0.pid), "n0's agent has no connection to member 0"
    compacted_at = 0
    os.kill(agent0.pid, signal.SIGSTOP)
    try:
        c.members[0].stop()
        wait_healthy(c.members[1:], timeout=10)
        c.start(n2)
        s2 = n2.read_state()
        wait_for(lambda: s2["subnet"] in remote_subnets(n1), 5, what="n1 learning n2 with member 0 down")
        wait_for(
            lambda: remote_subnets(n2) == {n0.read_state()["subnet"], n1.read_state()["subnet"]},
            5,
            what="n2 learning n0 and n1",
        )
        assert c.status(n1)["storeReachable"] is True
        # Compact the store past everything n0's watch has seen, n2's lease included (etcd keeps the
        # compaction revision itself: one more write puts n2's event behind it).
        compacted_at = bump_revision(c.members[1])
        status, answer = etcd_gateway(
            c.members[1], "/v3/kv/compaction", {"revision": str(compacted_at), "physical": True}
        )
        assert status == 200, answer
        assert s2["subnet"] not in remote_subnets(n0)  # paused: it has not seen n2 yet
    finally:
        os.kill(agent0.pid, signal.SIGCONT)
    assert compacted_at
    # n0's watch resumes on another member from a revision the store has compacted: it lists again.
    wait_for(lambda: s2["subnet"] in remote_subnets(n0), 10, what="n0 learning n2 after the compaction")
    status = c.status(n0)
    relists = status["store"]["relists"]
    assert relists >= 1, status["store"]
    assert status["storeRevision"] >= compacted_at
    with open(n0.log_path, errors="replace") as fh:
        assert "compacted the watched revision" in fh.read()
    assert n0.ping(s2["gateway"]) and n2.ping(n0.read_state()["gateway"])
    # And it keeps converging afterwards: n2 leaving (its lease released) disappears from n0 and n1.
    c.agents[n2.name].stop()
    left = n2.run(PYCNI, "agent", "leave", "--store", c.url, "--public-ip", n2.public_ip, *c.tls_args, check=False)
    assert left.returncode == 0, left.stderr
    wait_for(
        lambda: s2["subnet"] not in remote_subnets(n0) | remote_subnets(n1),
        5,
        what="n0 and n1 dropping n2 after it left",
    )
