"""`pycni conformance` on a 3-node netns cluster: green when healthy, and each injected fault caught.

Three node namespaces on an underlay bridge (tests/multinode.py), one node
agent each against a cluster store (a file store; etcd running in the
underlay namespace), every node with its own CNI bin dir (`pycni install`),
network configuration (the example vxlan conflist: vxlan + portmap +
bandwidth) and result cache. `pycni conformance run` runs on all three nodes
at once (`ip netns exec NODE pycni conformance run ...`, each a real process
that meets the others in the store), then `pycni conformance report --json`.

Then the cluster is broken on purpose, one fault at a time, and exactly the
rows the fault must break fail, each with a message naming it:

    SNAT     masquerade of pod traffic leaving n0 through the VXLAN device
    FDB      the FDB entry for n2's VTEP deleted on n1 (n1's agent SIGSTOPped
             so it cannot repair it; n1 attaches its probes on the cold path)
    MTU      the underlay port of n2 set to MTU 1400 (in the underlay namespace)
    firewall new connections arriving at n1 through the VXLAN device dropped

Every fault lives in a test namespace and is removed again, also on failure.

Then a dual-stack cluster (--network 10.244.0.0/16 --ipv6-network
fd00:10:244::/56 on the IPv4 underlay): every row of both families passes
(the IPv6 rows named <check>/ipv6), and an IPv6-only firewall drop
(`meta nfproto ipv6`) fails exactly the IPv6 paths into its node while every
IPv4 row passes. Last, two nodes of each other kind (both underlays, an IPv6
underlay, IPv6 only) pass the rows they have.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
from typing import Iterator, Sequence

import pytest

import netns
from pycni.conformance.probe import is_echo_process, probe_netns_names

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from multinode import Node, wait_for  # noqa: E402
from pod_cluster import (  # noqa: E402
    CLUSTER_NETWORK,
    NET_NAME,
    PYCNI,
    PodCluster,
    agent_paused,
    pod_cluster,
    remove_leftover_probes,
)

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

CHECK_TIMEOUT = "2"
PASSING = {"pass", "skip"}
RUN_TIMEOUT = 120


# ---- running conformance on every node at once ------------------------------------------------


def conformance_command(cluster: PodCluster, node: Node, *extra: str) -> list[str]:
    return cluster.conformance_command(node, "--check-timeout", CHECK_TIMEOUT, *extra)


def conformance_everywhere(
    cluster: PodCluster,
    cni_paths: dict[str, str] | None = None,
    extra: Sequence[str] = (),
    nodes: Sequence[Node] | None = None,
) -> dict:
    """`pycni conformance run` on every node (or ``nodes``) concurrently, then the report (JSON) and its exit status."""
    outputs = cluster.conformance_runs(
        nodes, lambda _node: ("--check-timeout", CHECK_TIMEOUT, "--wait", "60", *extra), cni_paths, RUN_TIMEOUT
    )
    for rc, out, err in outputs.values():
        assert rc in (0, 1), f"conformance run crashed (exit {rc}):\n{out}\n{err}"
    done = cluster.pycni(cluster.nodes[0], "conformance", "report", "--store", cluster.store_url, "--json")
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    report["exit"] = done.returncode
    report["runs"] = outputs
    table = cluster.pycni(cluster.nodes[0], "conformance", "report", "--store", cluster.store_url)
    report["table"] = table.stdout
    assert table.returncode == done.returncode
    return report


def probe_addresses(report: dict) -> dict[str, set[str]]:
    """node id -> its probe pod's addresses, as each node's run logged them ("node n0 (ip): probe pod A[, B] ...")."""
    out: dict[str, set[str]] = {}
    for _rc, out_text, err_text in report["runs"].values():
        for node, addresses in re.findall(
            r"node (\S+) \([^)]*\): probe pod ([^ ]+(?:, [^ ]+)*) \(hostPort", out_text + err_text
        ):
            out.setdefault(node, set()).update(addresses.split(", "))
    assert out, "no run logged its probe pod's addresses"
    return out


def failing(report: dict) -> dict[tuple[str, str, str], str]:
    return {(r["check"], r["from"], r["to"]): r["message"] for r in report["checks"] if r["result"] == "fail"}


def skipped(report: dict) -> set[tuple[str, str, str]]:
    return {(r["check"], r["from"], r["to"]) for r in report["checks"] if r["result"] == "skip"}


def probe_names(cluster: PodCluster) -> set[str]:
    return {name for node in cluster.nodes for name in probe_netns_names(f"n{node.index}", node.state_dir)}


def no_leftovers(cluster: PodCluster) -> None:
    names = probe_names(cluster) & set(netns.list_names())
    assert not names, f"probe namespaces left behind: {names}"
    for node in cluster.nodes:
        assert not os.path.exists(os.path.join(node.state_dir, "conformance.json"))


EXPECTED_ROWS = 3 * 6 + 6 * 6  # per node: 6 on itself; per ordered pair of nodes: 6
OWN_ROWS = {"gateway-mac", "store-entries"}  # a node's own set-up: no exchange, no latency


# ---- the healthy cluster -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["file", pytest.param("etcd", marks=pytest.mark.etcd)])
def cluster(request) -> Iterator[PodCluster]:
    with pod_cluster(3, request.param, "cf") as c:
        yield c


def test_a_healthy_cluster_passes_every_check(cluster):
    report = conformance_everywhere(cluster)
    assert report["exit"] == 0, report["table"]
    assert report["passed"] is True
    assert len(report["checks"]) == EXPECTED_ROWS, report["table"]
    assert {r["result"] for r in report["checks"]} == {"pass"}, report["table"]
    nodes = {r["from"] for r in report["checks"]}
    assert nodes == {"n0", "n1", "n2"}
    checks = {r["check"] for r in report["checks"]}
    assert (
        checks
        == {"pod-pod-same-node", "pod-pod-other-node", "no-snat", "node-pod", "pod-node", "hostport", "pmtu"} | OWN_ROWS
    )
    for row in report["checks"]:
        if row["check"] not in OWN_ROWS:
            assert row["latencyMs"] is not None and row["latencyMs"] >= 0
    # pod -> another node's own address leaves masqueraded: that node sees the sending node's address.
    publics = {f"n{n.index}": n.public_ip for n in cluster.nodes}
    for row in report["checks"]:
        if row["check"] == "pod-node" and row["from"] != row["to"]:
            assert row["message"] == f"seen from {publics[row['from']]}", row
    # No SNAT: every receiver on another node saw the sending probe pod's own address (each run logs it).
    senders = probe_addresses(report)
    for row in report["checks"]:
        if row["check"] == "no-snat" and row["from"] != row["to"]:
            seen = row["message"].split(" saw ")[1].split(",")[0]
            assert seen in senders[row["from"]], (row, senders)
    assert f"PASS: {EXPECTED_ROWS} checks" in report["table"]
    for rc, out, _err in report["runs"].values():
        assert rc == 0 and "FAIL" not in out.replace("FAIL:", "")
    no_leftovers(cluster)
    # `clean` removes the store keys; a report afterwards has nothing to show.
    done = cluster.pycni(
        cluster.nodes[1],
        "conformance",
        "clean",
        "--store",
        cluster.store_url,
        "--state-dir",
        cluster.nodes[1].state_dir,
    )
    assert done.returncode == 0, done.stderr
    assert "3 key(s)" in done.stdout
    done = cluster.pycni(cluster.nodes[0], "conformance", "report", "--store", cluster.store_url)
    assert done.returncode == 1 and "no conformance results" in done.stderr


# ---- faults ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def file_cluster() -> Iterator[PodCluster]:
    with pod_cluster(3, "file", "cff") as c:
        yield c


def nft_in(node: Node, script: str) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", node.name, "nft", "-f", "-"], input=script, text=True, capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr


@contextlib.contextmanager
def nft_fault(node: Node, family: str, table: str, body: str) -> Iterator[None]:
    nft_in(node, f"table {family} {table} {{\n{body}\n}}\n")
    try:
        yield
    finally:
        subprocess.run(
            ["ip", "netns", "exec", node.name, "nft", "delete", "table", family, table], capture_output=True, timeout=30
        )


def assert_exactly(
    report: dict,
    expected_fail: set[tuple[str, str, str]],
    words: str,
    expected_skip: set[tuple[str, str, str]] = frozenset(),
) -> None:
    fails = failing(report)
    assert set(fails) == expected_fail, report["table"]
    assert skipped(report) == set(expected_skip), report["table"]
    for key, message in fails.items():
        assert words in message, f"{key}: {message}"
    assert report["exit"] == 1
    assert len(report["checks"]) == EXPECTED_ROWS


def test_snat_between_nodes_fails_no_snat_only(file_cluster):
    c = file_cluster
    n0 = c.nodes[0]
    body = (
        "  chain postrouting {\n    type nat hook postrouting priority srcnat - 10; policy accept;\n"
        f'    oifname "pycni.1" ip saddr {CLUSTER_NETWORK} masquerade\n  }}'
    )
    with nft_fault(n0, "ip", "conformance_fault_snat", body):
        report = conformance_everywhere(c)
    assert_exactly(report, {("no-snat", "n0", "n1"), ("no-snat", "n0", "n2")}, "SNAT between nodes")
    vtep = str(__import__("ipaddress").ip_network(c.subnet(n0)).network_address)
    for message in failing(report).values():
        assert f"reply came from {vtep} (node n0's VXLAN device address), not the pod" in message
        assert "conformance_fault_snat" in message  # the rule that did it, from n0's published facts
    no_leftovers(c)


def fdb_entries(node: Node) -> set[tuple[str, str]]:
    out = subprocess.run(
        ["ip", "netns", "exec", node.name, "bridge", "-j", "fdb", "show", "dev", "pycni.1"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    return {(e["mac"], e.get("dst", "")) for e in json.loads(out or "[]")}


def test_missing_fdb_entry_fails_the_overlay_paths_between_two_nodes(file_cluster):
    c = file_cluster
    n1, n2 = c.nodes[1], c.nodes[2]
    vtep_mac = n2.read_state()["vtepMAC"]
    assert (vtep_mac, n2.public_ip) in fdb_entries(n1)
    with agent_paused(c.agents[n1.name], c.store_dir):
        subprocess.run(
            ["ip", "netns", "exec", n1.name, "bridge", "fdb", "del", vtep_mac, "dev", "pycni.1", "dst", n2.public_ip],
            check=True,
            capture_output=True,
            timeout=10,
        )
        assert (vtep_mac, n2.public_ip) not in fdb_entries(n1)
        # n1's agent is stopped, so n1 attaches its probes without it (the plugins' cold path).
        report = conformance_everywhere(c, cni_paths={n1.name: c.dir(n1, "coldbin")})
    wait_for(lambda: (vtep_mac, n2.public_ip) in fdb_entries(n1), 15, what="the agent to restore the FDB entry")
    # pod -> node is not among them: it leaves masqueraded, so the answer comes back over the underlay.
    expected = {
        ("pod-pod-other-node", "n1", "n2"),
        ("pod-pod-other-node", "n2", "n1"),
        ("node-pod", "n1", "n2"),
        ("node-pod", "n2", "n1"),
    }
    skipped_rows = {("no-snat", "n1", "n2"), ("no-snat", "n2", "n1"), ("pmtu", "n1", "n2"), ("pmtu", "n2", "n1")}
    assert_exactly(report, expected, "missing FDB entry", skipped_rows)
    for (_check, src, _dst), message in failing(report).items():
        assert f"no ARP/FDB for remote VTEP {vtep_mac} -> {n2.public_ip}" in message
        if src == "n2":
            assert "the replies' way back" in message
    no_leftovers(c)


def test_mtu_mismatch_on_the_underlay_fails_pmtu_only(file_cluster):
    c = file_cluster
    n2 = c.nodes[2]
    port = n2.port  # n2's veth end in the underlay namespace
    subprocess.run(["ip", "-n", c.topo.underlay, "link", "set", port, "mtu", "1400"], check=True, timeout=10)
    try:
        report = conformance_everywhere(c)
    finally:
        subprocess.run(["ip", "-n", c.topo.underlay, "link", "set", port, "mtu", "1500"], check=True, timeout=10)
    expected = {("pmtu", a, b) for a, b in (("n0", "n2"), ("n2", "n0"), ("n1", "n2"), ("n2", "n1"))}
    assert_exactly(report, expected, "MTU mismatch")
    for message in failing(report).values():
        assert "no reply to 1400-byte DF packets while small packets pass" in message
    no_leftovers(c)


def test_firewall_drop_fails_the_paths_into_that_node(file_cluster):
    c = file_cluster
    n1 = c.nodes[1]
    body = (
        "  chain forward {\n    type filter hook forward priority filter; policy accept;\n"
        '    iifname "pycni.1" ct state new drop\n  }'
    )
    with nft_fault(n1, "inet", "conformance_fault_fw", body):
        report = conformance_everywhere(c)
    expected = {(check, src, "n1") for check in ("pod-pod-other-node", "node-pod") for src in ("n0", "n2")}
    skipped_rows = {(check, src, "n1") for check in ("no-snat", "pmtu") for src in ("n0", "n2")}
    assert_exactly(report, expected, "packets dropped: firewall", skipped_rows)
    for message in failing(report).values():
        assert "node n1: table inet conformance_fault_fw chain forward (forward): 1 drop/reject rule" in message
    no_leftovers(c)


def test_a_node_that_never_runs_is_reported_missing(file_cluster):
    from ipam.cluster import open_store
    from pycni.conformance.model import Check, NodeResults, results_key

    c = file_cluster
    # n2 took part in an earlier run (a passing row of then must not hide its absence now).
    with open_store(c.store_url) as store:
        store.put(
            results_key("n2"),
            NodeResults(
                "n2", c.nodes[2].public_ip, "earlier", 1.0, 2.0, [Check("pmtu", "n2", "n0", "pass", 0.1)]
            ).to_json(),
        )
    report = conformance_everywhere(c, nodes=c.nodes[:2], extra=("--wait", "3"))
    missing = c.nodes[2].public_ip
    assert set(failing(report)) == {
        ("rendezvous", "n0", missing),
        ("rendezvous", "n1", missing),
        ("rendezvous", missing, "-"),
    }, report["table"]
    assert all(f"{missing} holds a subnet lease but" in m for m in failing(report).values())
    assert len(report["checks"]) == 2 * (6 + 6 + 1) + 1
    # n2's results of the earlier runs are not mixed in: they are named as ignored.
    assert [n["node"] for n in report["ignored"]] == ["n2"]
    assert "ignored results of an earlier run from n2" in report["table"]
    assert {r["result"] for r in report["checks"] if r["check"] != "rendezvous"} == {"pass"}
    no_leftovers(c)


def test_a_node_that_cannot_attach_its_probe_says_why(file_cluster):
    c = file_cluster
    n0 = c.nodes[0]
    done = subprocess.run(
        [
            "nsenter",
            f"--net={n0.path}",
            PYCNI,
            "conformance",
            "run",
            "--store",
            c.store_url,
            "--network",
            "no-such-network",
            "--state-dir",
            n0.state_dir,
            "--wait",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=c.env(n0),
    )
    assert done.returncode == 1 and "no network named 'no-such-network'" in done.stderr
    report = c.pycni(n0, "conformance", "report", "--store", c.store_url, "--json")
    rows = json.loads(report.stdout)["checks"]
    assert rows[0]["check"] == "probe-pod" and rows[0]["result"] == "fail" and rows[0]["from"] == "n0"
    assert "cannot attach a probe pod to network 'no-such-network'" in rows[0]["message"]
    no_leftovers(c)


def test_what_a_killed_run_left_goes_with_the_cluster(file_cluster):
    """SIGKILL gives a run no chance to remove its probe pods; the cluster's teardown (remove_leftover_probes,
    a callback of pod_cluster) removes them as the run's record names them: DEL, namespace, echo services."""
    c = file_cluster
    n0 = c.nodes[0]
    proc = subprocess.Popen(
        conformance_command(c, n0, "--wait", "60"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=c.env(n0),
    )
    try:
        key = os.path.join(c.store_dir, "conformance", "n0")
        wait_for(lambda: os.path.exists(key) or proc.poll() is not None, 30, what="the run to publish its probe")
        assert proc.poll() is None
        proc.kill()  # by PID: the run we started
        proc.wait(timeout=10)
        with open(os.path.join(n0.state_dir, "conformance.json")) as fh:
            record = json.load(fh)
        left = {os.path.basename(p["netns"]) for p in record["probes"]}
        assert len(left) == 2 and left <= set(netns.list_names())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    remove_leftover_probes(c)
    assert not left & set(netns.list_names())
    for pid in record["echo_pids"]:
        assert not is_echo_process(pid), f"echo service {pid} still runs"
    # DEL ran for each probe: host-local holds no address for them any more.
    held = [
        name
        for root, _dirs, names in os.walk(c.dir(n0, "ipam"))
        for name in names
        if "pycni-conformance-" in open(os.path.join(root, name), errors="replace").read()
    ]
    assert not held, held
    no_leftovers(c)


def test_sigterm_removes_what_a_run_made(file_cluster):
    c = file_cluster
    n0 = c.nodes[0]
    log = open(c.topo.path("sigterm-run.log"), "w+")
    # nsenter execs pycni: the PID is the run's own.
    proc = subprocess.Popen(
        conformance_command(c, n0, "--wait", "60"), stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=c.env(n0)
    )
    try:
        key = os.path.join(c.store_dir, "conformance", "n0")
        wait_for(lambda: os.path.exists(key) or proc.poll() is not None, 30, what="the run to publish its probe")
        assert proc.poll() is None
        with open(os.path.join(n0.state_dir, "conformance.json")) as fh:
            record = json.load(fh)
        assert len(record["probes"]) == 2 and len(record["echo_pids"]) == 2
        assert all(netns.exists(p["netns"]) for p in record["probes"])
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    log.seek(0)
    assert "interrupted" in log.read()
    assert not os.path.exists(key)
    for pid in record["echo_pids"]:
        assert not is_echo_process(pid), f"echo service {pid} still runs"
    no_leftovers(c)


def test_kept_probes_are_removed_by_clean(file_cluster):
    c = file_cluster
    report = conformance_everywhere(c, extra=("--keep-probes",))
    assert report["exit"] == 0, report["table"]
    kept = {name for name in probe_names(c) if not name.endswith("-churn")}  # the gateway check's pod went
    assert kept <= set(netns.list_names())
    assert not (probe_names(c) - kept) & set(netns.list_names())
    for node in c.nodes:
        leases = os.listdir(os.path.join(c.dir(node, "ipam"), NET_NAME))
        assert len([f for f in leases if f[0].isdigit()]) == 2
        done = subprocess.run(
            [
                "nsenter",
                f"--net={node.path}",
                PYCNI,
                "conformance",
                "clean",
                "--store",
                c.store_url,
                "--state-dir",
                node.state_dir,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=c.env(node),
        )
        assert done.returncode == 0, done.stderr
        assert "removed 2 probe pod(s) on this node" in done.stdout
        leases = os.listdir(os.path.join(c.dir(node, "ipam"), NET_NAME))
        assert not [f for f in leases if f[0].isdigit()], "the probes' addresses were not released"
        assert not os.listdir(os.path.join(c.dir(node, "cache"), "results"))
    assert not os.path.exists(os.path.join(c.store_dir, "conformance", "results", "n0"))
    no_leftovers(c)


def test_the_cluster_is_green_again_after_the_faults(file_cluster):
    report = conformance_everywhere(file_cluster)
    assert report["exit"] == 0, report["table"]
    no_leftovers(file_cluster)


# ---- dual-stack --------------------------------------------------------------------------------

NETWORK6 = "fd00:10:244::/56"


def expected_rows(names: Sequence[str], families: Sequence[int], node_addresses: Sequence[int]) -> set:
    """The rows of a healthy run: per node its own set-up and its own probe, per ordered pair of nodes the
    paths between them, once per pod family (the IPv6 rows named <check>/ipv6); pod-node and hostport only
    in the families the nodes have an address of their own of."""

    def name(check: str, version: int) -> str:
        return check + "/ipv6" if version == 6 else check

    rows = {(check, a, a) for a in names for check in OWN_ROWS}
    for version in families:
        own = ["pod-pod-same-node", "no-snat", "node-pod"] + (["pod-node"] if version in node_addresses else [])
        pair = ["pod-pod-other-node", "no-snat", "node-pod", "pmtu"] + (
            ["pod-node", "hostport"] if version in node_addresses else []
        )
        rows |= {(name(check, version), a, a) for a in names for check in own}
        rows |= {(name(check, version), a, b) for a in names for b in names if a != b for check in pair}
    return rows


# On the IPv4 underlay the nodes have no IPv6 address of their own: no pod-node/ipv6, no hostport/ipv6.
DUAL_ROWS = EXPECTED_ROWS + 3 * 3 + 6 * 4


@pytest.fixture(scope="module")
def dual_cluster() -> Iterator[PodCluster]:
    with pod_cluster(3, "file", "cfd", network=CLUSTER_NETWORK, ipv6_network=NETWORK6) as c:
        yield c


def dual_rows(cluster: PodCluster) -> set[tuple[str, str, str]]:
    return expected_rows([f"n{n.index}" for n in cluster.nodes], [4, 6], [4])


def test_a_healthy_dual_stack_cluster_passes_every_row_of_both_families(dual_cluster):
    import time

    c = dual_cluster
    started = time.monotonic()
    report = conformance_everywhere(c)
    took = time.monotonic() - started
    assert report["exit"] == 0, report["table"]
    assert {(r["check"], r["from"], r["to"]) for r in report["checks"]} == dual_rows(c), report["table"]
    assert len(report["checks"]) == DUAL_ROWS == 87
    assert {r["result"] for r in report["checks"]} == {"pass"}, report["table"]
    # Every IPv6 exchange went between the pods' IPv6 addresses, with no translation on the way.
    subnets6 = {f"n{n.index}": ipaddress.ip_network(n.read_state()["ipv6Subnet"]) for n in c.nodes}
    senders = probe_addresses(report)
    for row in report["checks"]:
        if row["check"] == "no-snat/ipv6":
            seen = ipaddress.ip_address(row["message"].split(" saw ")[1].split(",")[0])
            assert seen in subnets6[row["from"]], row
            if row["from"] != row["to"]:  # across nodes the sender is the probe pod: its own IPv6 address
                assert str(seen) in senders[row["from"]], (row, senders)
        if row["check"] == "pmtu/ipv6":
            assert row["message"].startswith("1280-byte and 1400-byte packets cross unfragmented"), row
    assert f"PASS: {DUAL_ROWS} checks" in report["table"]
    print(f"\nconformance on the 3-node dual-stack cluster: {took:.1f} s for {DUAL_ROWS} rows")
    no_leftovers(c)


def test_an_ipv6_only_firewall_drop_fails_exactly_the_ipv6_paths_into_that_node(dual_cluster):
    c = dual_cluster
    n1 = c.nodes[1]
    body = (
        "  chain forward {\n    type filter hook forward priority filter; policy accept;\n"
        '    iifname "pycni.1" meta nfproto ipv6 ct state new drop\n  }'
    )
    with nft_fault(n1, "inet", "conformance_fault_fw6", body):
        report = conformance_everywhere(c)
    expected = {(check, src, "n1") for check in ("pod-pod-other-node/ipv6", "node-pod/ipv6") for src in ("n0", "n2")}
    skipped_rows = {(check, src, "n1") for check in ("no-snat/ipv6", "pmtu/ipv6") for src in ("n0", "n2")}
    assert set(failing(report)) == expected, report["table"]
    assert skipped(report) == skipped_rows, report["table"]
    assert report["exit"] == 1 and len(report["checks"]) == DUAL_ROWS
    for message in failing(report).values():
        assert message.startswith("IPv6 TCP "), message
        assert (
            "packets dropped: firewall (node n1: table inet conformance_fault_fw6 chain forward (forward): "
            "1 drop/reject rule, IPv6 only)"
        ) in message, message
        assert "the same check passes in IPv4 between these nodes, so the fault is IPv6's alone" in message
    # Every IPv4 row still passes.
    assert {r["result"] for r in report["checks"] if not r["check"].endswith("/ipv6")} == {"pass"}
    no_leftovers(c)


KINDS = {
    # kind: (network, IPv6 network, underlay, the families the nodes have an address of their own of, prefix)
    "dual-both-underlays": (CLUSTER_NETWORK, NETWORK6, "dual", [4, 6], "ckb"),
    "dual-ipv6-underlay": (CLUSTER_NETWORK, NETWORK6, "ipv6", [6], "ck6"),
    "ipv6-only": ("", NETWORK6, "ipv4", [4], "cko"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_of_dual_stack_and_ipv6_cluster_passes_the_rows_it_has(kind):
    """Two nodes of each other cluster kind: with an IPv6 address of their own the nodes get pod-node/ipv6
    and hostport/ipv6 rows (and without an IPv4 one no IPv4 pod-node or hostport rows); an IPv6-only
    cluster has only IPv6 rows."""
    network, network6, underlay, node_addresses, prefix = KINDS[kind]
    with pod_cluster(2, "file", prefix, network=network, ipv6_network=network6, underlay=underlay) as c:
        report = conformance_everywhere(c)
        families = [4, 6] if network else [6]
        assert report["exit"] == 0, report["table"]
        assert {(r["check"], r["from"], r["to"]) for r in report["checks"]} == expected_rows(
            ["n0", "n1"], families, node_addresses
        ), report["table"]
        assert {r["result"] for r in report["checks"]} == {"pass"}, report["table"]
        if 6 in node_addresses:
            publics6 = {
                f"n{n.index}": n.public_ip if ":" in n.public_ip else n.read_state()["publicIPv6"] for n in c.nodes
            }
            for row in report["checks"]:
                if row["check"] in ("pod-node/ipv6", "hostport/ipv6") and row["from"] != row["to"]:
                    # pod -> another node's IPv6 address leaves masqueraded, like IPv4
                    assert row["message"] == f"seen from {publics6[row['from']]}", row
        no_leftovers(c)
