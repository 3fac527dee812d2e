"""A node that boots before its store: the agent serves, retries the store with back-off, and joins when it answers.

As on a real boot: the agent starts (systemd) while etcd is not up yet, or is up but nobody has run `pycni
cluster init`. The agent must not exit (a unit under a start limit would stay failed for good); it serves CNI
requests at once, /healthz says why it is not healthy, every retry is logged, and once the store answers it
leases its subnet and writes its state and flannel's subnet.env. `--exit-on-store-error` keeps the old
behaviour: one error line, exit 1.

Everything runs in namespaces of the test (tests/multinode.py: an underlay namespace and node namespaces;
etcd listens on the underlay bridge's address), agents on sockets of the test, stopped by PID.
"""

from __future__ import annotations

import http.client
import os
import re
import subprocess
import sys
import time

import pytest

import netns

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cluster_helpers import CLIENT_PORT, etcd_skip_reason, start_etcd  # noqa: E402
from multinode import UNDERLAY_GATEWAY, cluster_topology, wait_for  # noqa: E402
from pod_cluster import PYCNI  # noqa: E402

pytestmark = [
    pytest.mark.integration,
    pytest.mark.multinode,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

METRICS = "127.0.0.1:9918"


def healthz(ns_path: str) -> tuple[int, str]:
    with netns.enter(ns_path):
        conn = http.client.HTTPConnection("127.0.0.1", 9918, timeout=3)
        conn.connect()
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        return response.status, response.read().decode().strip()
    finally:
        conn.close()


def agent_status(socket_path: str) -> int:
    return subprocess.run(
        [PYCNI, "agent", "status", "--socket", socket_path], capture_output=True, text=True, timeout=30
    ).returncode


def read(path: str) -> dict[str, str]:
    with open(path) as fh:
        return dict(line.rstrip("\n").split("=", 1) for line in fh if line.strip())


@pytest.mark.etcd
def test_an_agent_started_20_s_before_etcd_serves_meanwhile_and_joins_once_etcd_answers():
    reason = etcd_skip_reason()
    if reason:
        pytest.skip(reason)
    with cluster_topology(1, "boot") as topo:
        node = topo.nodes[0]
        store_url = f"etcd://{UNDERLAY_GATEWAY}:{CLIENT_PORT}"  # nothing listens there yet
        handle = topo.start_agent(node, store_url, extra_args=("--metrics-address", METRICS), wait=False)
        member = None
        try:
            # It serves CNI requests at once, and says why it is not healthy.
            wait_for(
                lambda: os.path.exists(node.socket) and agent_status(node.socket) in (0, 1),
                20,
                what="the agent serving its socket",
            )
            code, why = healthz(node.path)
            assert code == 503 and "store" in why, why
            time.sleep(max(0.0, 20 - (time.time() - handle.started)))
            assert handle.running and node.read_state() is None
            log = open(node.log_path).read()
            retries = [line for line in log.splitlines() if "does not answer" in line and "; retry " in line]
            assert len(retries) >= 3, log[-2000:]  # 1, 2, 4, 8 s apart: each retry said, less often as it goes
            member = start_etcd(topo.underlay_path, UNDERLAY_GATEWAY, workdir=topo.path("etcd"))
            done = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    node.name,
                    PYCNI,
                    "cluster",
                    "init",
                    "--store",
                    store_url,
                    "--network",
                    "10.244.0.0/16",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            # 20 s in, the back-off has reached 16 s between attempts: the node joins within one more.
            wait_for(lambda: node.read_state() is not None, 40, interval=0.2, what="the node leasing its subnet")
            state = node.read_state()
            assert state["subnet"].startswith("10.244.")
            wait_for(lambda: healthz(node.path)[0] == 200, 20, interval=0.2, what="/healthz 200")
            # One line says when the store answered, measured from the first failed attempt (not from boot of the
            # machine), written before the node could report itself healthy.
            log = open(node.log_path).read()
            answered = re.search(r"the cluster store answered after (\d+) retries \(([\d.]+) s\)", log)
            assert answered, log[-2000:]
            assert int(answered.group(1)) >= 3
            assert 15 <= float(answered.group(2)) <= time.time() - handle.started + 1, answered.group(0)
            assert "reachable again" not in log, log[-2000:]
        finally:
            handle.stop()
            if member is not None:
                member.stop()


def test_an_uninitialised_store_is_waited_for_and_subnet_env_is_written_where_asked(tmp_path):
    with cluster_topology(1, "bootf") as topo:
        node = topo.nodes[0]
        store_url = "file://" + topo.path("store")
        subnet_file = str(tmp_path / "flannel" / "subnet.env")
        handle = topo.start_agent(node, store_url, extra_args=("--subnet-file", subnet_file, "--leave"), wait=False)
        try:
            wait_for(
                lambda: "holds no cluster configuration yet" in open(node.log_path).read(),
                20,
                what="the agent saying the store is not initialised",
            )
            assert handle.running and not os.path.exists(subnet_file)
            done = subprocess.run(
                [
                    PYCNI,
                    "cluster",
                    "init",
                    "--store",
                    store_url,
                    "--network",
                    "10.77.0.0/16",
                    "--subnet-len",
                    "26",
                    "--ipv6-network",
                    "fd00:77::/56",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            wait_for(
                lambda: node.read_state() is not None and os.path.exists(subnet_file),
                15,
                interval=0.1,
                what="the node joining",
            )
            state = node.read_state()
            env = read(subnet_file)
            gateway = state["gateway"]
            assert env == {
                "FLANNEL_NETWORK": "10.77.0.0/16",
                "FLANNEL_SUBNET": f"{gateway}/26",
                "FLANNEL_IPV6_NETWORK": "fd00:77::/56",
                "FLANNEL_IPV6_SUBNET": f"{state['ipv6Gateway']}/64",
                "FLANNEL_MTU": str(state["mtu"]),
                "FLANNEL_IPMASQ": "true",
            }, env
            assert oct(os.stat(subnet_file).st_mode & 0o777) == "0o644"
        finally:
            handle.stop()
        # --leave: the lease is given back and the file goes with the state.
        assert node.read_state() is None and not os.path.exists(subnet_file)


def test_exit_on_store_error_ends_the_agent_with_one_line():
    with cluster_topology(1, "boote") as topo:
        node = topo.nodes[0]
        handle = topo.start_agent(
            node, f"etcd://{UNDERLAY_GATEWAY}:{CLIENT_PORT}", extra_args=("--exit-on-store-error",), wait=False
        )
        handle.proc.wait(timeout=60)
        assert handle.proc.returncode == 1
        errors = [line for line in open(node.log_path).read().splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "does not answer" in errors[0] and "--exit-on-store-error" in errors[0], errors
