"""`pycni conformance` flags: run --port, --host-port, --public-ip, --json; clean --keep-results. Root only.

Two node namespaces with agents on a file store (tests/pod_cluster.py), each with its own CNI bin
dir and the example vxlan conflist (vxlan + portmap + bandwidth). `pycni conformance run` runs on both
nodes at once (nsenter into each node's network namespace, as tests/integration/test_conformance.py
does), with a non-default echo port and hostPort and --json, keeping its probes; then:

    --port/--host-port  every row passes, the kept probe's hostPort DNAT in each node maps the given
                        hostPort to the given echo port, and the defaults (7080, 17080) appear nowhere
    --json              each run's stdout is one JSON document: this node's rows and its node entry
    --keep-results      `clean --keep-results` removes the kept probe pods (namespaces, hostPort rules) but
                        leaves conformance/results/*, so `report` still has them; a plain `clean` removes them
    --public-ip         n1 runs with an address of its own other than its lease's: the node checks
                        towards n1 use that address, and the run still meets n0

Everything lives in the cluster's namespaces and temporary directory; processes are stopped by PID.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Iterator, Sequence

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import netns  # noqa: E402
from pycni.conformance.probe import probe_netns_names  # noqa: E402
from pod_cluster import PYCNI, PodCluster, pod_cluster  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

ECHO_PORT, HOST_PORT = 7181, 17181
RUN_TIMEOUT = 90


def run_everywhere(cluster: PodCluster, per_node: dict[str, Sequence[str]], wait: str = "30") -> dict[str, tuple]:
    """`conformance run` on every node at once, with each node's extra flags; {node name: (rc, out, err)}."""
    return cluster.conformance_runs(
        args=lambda node: ("--check-timeout", "2", "--wait", wait, *per_node.get(node.name, ())), timeout=RUN_TIMEOUT
    )


def clean(cluster: PodCluster, node, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "nsenter",
            f"--net={node.path}",
            PYCNI,
            "conformance",
            "clean",
            "--store",
            cluster.store_url,
            "--state-dir",
            node.state_dir,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=cluster.env(node),
    )


def report(cluster: PodCluster) -> subprocess.CompletedProcess[str]:
    return cluster.pycni(cluster.nodes[0], "conformance", "report", "--store", cluster.store_url, "--json")


def store_keys(cluster: PodCluster) -> set[str]:
    base = os.path.join(cluster.store_dir, "conformance")
    return {os.path.relpath(os.path.join(d, f), base) for d, _dirs, files in os.walk(base) for f in files}


@pytest.fixture(scope="module")
def cluster() -> Iterator[PodCluster]:
    with pod_cluster(2, "file", "cfl") as c:
        yield c


def test_ports_json_and_clean_keep_results(cluster):
    c = cluster
    flags = ("--port", str(ECHO_PORT), "--host-port", str(HOST_PORT), "--json", "--keep-probes")
    outputs = run_everywhere(c, {node.name: flags for node in c.nodes})
    names = {node.name: c.name(node) for node in c.nodes}
    for node in c.nodes:
        rc, out, err = outputs[node.name]
        assert rc == 0, out + err
        doc = json.loads(out)  # --json: one document, nothing else
        assert doc["passed"] is True
        rows = doc["checks"]
        assert rows and {r["from"] for r in rows} == {names[node.name]}
        assert {r["result"] for r in rows} == {"pass"}, rows
        assert {"hostport", "pod-pod-other-node", "node-pod", "pod-node"} <= {r["check"] for r in rows}
        assert [(n["node"], n["publicIP"]) for n in doc["nodes"]] == [(names[node.name], node.public_ip)]
        # The kept probe's hostPort mapping: the given hostPort to the given echo port, no default anywhere.
        ruleset = node.run("nft", "list", "ruleset").stdout
        assert re.search(rf"tcp \. {HOST_PORT} comment [^:]*-probe/eth0\" : [0-9.]+ \. {ECHO_PORT}\b", ruleset), ruleset
        assert not re.search(r"tcp \. (7080|17080) ", ruleset) and not re.search(r"\. 7080 ", ruleset), ruleset
    assert store_keys(c) == {f"results/{names[n.name]}" for n in c.nodes}
    probes = {name for node in c.nodes for name in probe_netns_names(c.name(node), node.state_dir)}
    kept = probes & set(netns.list_names())
    assert len(kept) >= 2 * len(c.nodes), (probes, kept)  # --keep-probes: the pods are there
    # clean --keep-results: probes and rendezvous keys go, results stay and the report still shows them.
    for node in c.nodes:
        done = clean(c, node, "--keep-results")
        assert done.returncode == 0, done.stderr
        assert "removed 2 probe pod(s) on this node" in done.stdout
        assert f"tcp . {HOST_PORT} " not in node.run("nft", "list", "ruleset").stdout, (
            done.stdout + done.stderr
        )  # the hostPort mapping went
    assert store_keys(c) == {f"results/{names[n.name]}" for n in c.nodes}
    shown = report(c)
    assert shown.returncode == 0, shown.stderr
    assert {r["from"] for r in json.loads(shown.stdout)["checks"]} == set(names.values())
    assert not kept & set(netns.list_names()), "probe pods left after clean"
    # A plain clean removes the results too.
    done = clean(c, c.nodes[0])
    assert done.returncode == 0 and "2 key(s)" in done.stdout, done.stdout + done.stderr
    assert store_keys(c) == set()
    assert report(c).returncode == 1


def test_public_ip_names_the_address_the_node_checks_use(cluster):
    c = cluster
    n0, n1 = c.nodes
    other = "192.168.100.51"
    n1.ip("addr", "add", f"{other}/24", "dev", "eth0")
    try:
        outputs = run_everywhere(c, {n1.name: ("--public-ip", other, "--json")}, wait="8")
        rc, out, err = outputs[n1.name]
        assert rc == 0, out + err
        doc = json.loads(out)
        assert [n["publicIP"] for n in doc["nodes"]] == [other]
        assert outputs[n0.name][0] == 0, outputs[n0.name][1] + outputs[n0.name][2]
        rows = json.loads(report(c).stdout)["checks"]
        # n0's pod reaches n1's echo service on the given address: n1 saw it from n0 (masqueraded to n0's own).
        towards = [r for r in rows if (r["check"], r["from"], r["to"]) == ("pod-node", c.name(n0), c.name(n1))]
        assert towards and towards[0]["result"] == "pass", rows
        assert {r["from"] for r in rows} == {c.name(n0), c.name(n1)}
    finally:
        for node in c.nodes:
            clean(c, node)
        n1.ip("addr", "del", f"{other}/24", "dev", "eth0", check=False)
