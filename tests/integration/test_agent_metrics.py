"""`pycni agent --metrics-address`: /metrics and /healthz of real agents, read from inside their namespaces.

Every agent runs in a network namespace of the test and its endpoint listens on
127.0.0.1 of that namespace (loopback up), never in the machine's own; the
test reads it by entering the namespace on its own thread (``http_get``).
/metrics is parsed with prometheus_client's own parser.

- warm path only: real CNI requests through the shims move the request counts
  and histograms; refused and failed requests land where they should;
  /healthz is 200 while the agent serves and 503 while it stops; slow and
  surplus clients are cut off without stalling the endpoint.
- overlay mode on namespace nodes (tests/multinode.py) with etcd: remote
  nodes and reconciles after real reconciles; the store going away (503),
  the lease lapsing past a short --lease-ttl (503) and coming back (200).
- overlay mode with the file store: the underlay address removed, so no
  reconcile completes; /healthz turns 503 once the last one is stale, and
  200 again when the address is back.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import netns
from tests.cluster_helpers import etcd_skip_reason, start_etcd
from tests.helpers.plugins import run_plugin
from tests.multinode import UNDERLAY_GATEWAY, cluster_topology, converged, ip_in
from tests.multinode import wait_for as wait_until
from tests.plugin_modes import AgentProcess, install

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

PORT = 9917
ADDRESS = f"127.0.0.1:{PORT}"
NET = "metricsnet"
SUBNET = "10.93.0.0/24"
PYCNI = os.path.join(os.path.dirname(sys.executable), "pycni")
NETWORK = "10.244.0.0/16"


# ---- reading the endpoint ------------------------------------------------------------------------


def http_get(ns: str, path: str, timeout: float = 10.0, port: int = PORT) -> tuple[int, str, str]:
    """(status, content type, body) of GET http://127.0.0.1:PORT/PATH inside namespace ``ns``."""
    with netns.enter(ns):  # the connection's socket is made (and stays) in the namespace
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.connect()
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read().decode()
    finally:
        conn.close()


def scrape(ns: str) -> dict[str, dict[tuple, float]]:
    """/metrics as name -> {sorted (label, value) pairs: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    code, content_type, body = http_get(ns, "/metrics")
    assert code == 200 and content_type.startswith("text/plain; version=0.0.4"), (code, content_type, body[:200])
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def healthz(ns: str) -> tuple[int, str]:
    code, content_type, body = http_get(ns, "/healthz")
    assert content_type.startswith("text/plain") and body.endswith("\n") and body.count("\n") == 1, body
    return code, body.strip()


def wait_health(ns: str, predicate, timeout: float, what: str) -> tuple[int, str]:
    seen: list[tuple[int, str]] = []

    def check() -> bool:
        try:
            seen.append(healthz(ns))
        except (OSError, http.client.HTTPException) as exc:  # refused, or closed unanswered: not yet
            seen.append((0, f"{type(exc).__name__}: {exc}"))
            return False
        return predicate(*seen[-1])

    try:
        wait_until(check, timeout, interval=0.2, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last /healthz: {seen[-1:]}") from None
    return seen[-1]


# ---- an agent without overlay mode -------------------------------------------------------------


@contextlib.contextmanager
def metrics_agent(
    workdir: Path, extra: tuple[str, ...] = (), address: str = ADDRESS, wait: bool = True
) -> Iterator[AgentProcess]:
    """An agent in a namespace of its own (loopback up) serving metrics on its 127.0.0.1; stopped by PID."""
    with netns.temporary("agm") as ns:
        ip_in(ns.name, "link", "set", "lo", "up")
        agent = AgentProcess(str(workdir / "run" / "agent.sock"), str(workdir / "agent.log"), ns.name)
        try:
            agent.start(["--metrics-address", address, *extra], wait=wait)
            yield agent
        finally:
            agent.stop()


def host_local_conf(data_dir: Any, version: str = "1.0.0") -> dict:
    return {
        "cniVersion": version,
        "name": NET,
        "type": "bridge",
        "ipam": {"type": "host-local", "dataDir": str(data_dir), "ranges": [[{"subnet": SUBNET}]]},
    }


def test_real_requests_move_the_counts_and_histograms(tmp_path, make_node):
    from cni_plugins.spec.registry import PLUGINS
    from pycni.agent.shim import script
    from pycni.install import MARKER

    node = make_node()
    with metrics_agent(tmp_path) as agent:
        assert healthz(agent.ns_name) == (200, "ok")
        before = scrape(agent.ns_name)
        assert value(before, "pycni_agent_requests_served_total") == 0
        assert value(before, "pycni_agent_serving") == 1 and value(before, "pycni_agent_healthy") == 1
        bin_dir = tmp_path / "bin"
        install(str(bin_dir), agent.socket_path)
        exe = str(bin_dir / "host-local")
        for cid in ("c1", "c2", "c3"):
            add = run_plugin(exe, "ADD", host_local_conf(node.ipam_dir), node=node, netns=node.pod(), container_id=cid)
            assert add.code == 0 and "not reached" not in add.err, add
        delete = run_plugin(exe, "DEL", host_local_conf(node.ipam_dir), node=node, netns=node.pod(), container_id="c1")
        assert delete.code == 0
        bad = run_plugin(
            str(bin_dir / "bridge"), "ADD", {"cniVersion": "1.0.0", "name": "x y"}, node=node, netns=node.pod()
        )
        assert bad.code == 1 and bad.out["code"] == 7
        lo = run_plugin(
            str(bin_dir / "loopback"),
            "ADD",
            {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"},
            node=node,
            netns=node.pod(),
        )
        assert lo.code == 0
        # A shim of another pycni release: refused, and run cold by its shim.
        other = bin_dir / "host-local-other"
        other.write_text(
            script(
                "host-local",
                PLUGINS["host-local"],
                sys.executable,
                f"{MARKER}: test",
                agent.socket_path,
                version="0.0.0+other",
            )
        )
        other.chmod(0o755)
        assert (
            run_plugin(
                str(other), "ADD", host_local_conf(node.ipam_dir), node=node, netns=node.pod(), container_id="c9"
            ).code
            == 0
        )

        got = scrape(agent.ns_name)
        assert value(got, "pycni_agent_requests_total", plugin="host-local", command="ADD", outcome="success") == 3
        assert value(got, "pycni_agent_requests_total", plugin="host-local", command="DEL", outcome="success") == 1
        assert value(got, "pycni_agent_requests_total", plugin="bridge", command="ADD", outcome="error") == 1
        assert value(got, "pycni_agent_requests_total", plugin="loopback", command="ADD", outcome="success") == 1
        assert value(got, "pycni_agent_requests_served_total") == 6
        assert value(got, "pycni_agent_requests_not_served_total", reason="refused") == 1
        assert value(got, "pycni_agent_requests_not_served_total", reason="declined") == 0
        # The histogram: every request in +Inf, counts never fall from one bound to the next, a real sum.
        labels = {"plugin": "host-local", "command": "ADD"}
        assert value(got, "pycni_agent_request_duration_seconds_count", **labels) == 3
        assert 0 < value(got, "pycni_agent_request_duration_seconds_sum", **labels) < 30
        histogram = got["pycni_agent_request_duration_seconds_bucket"]
        buckets = sorted(
            (float(dict(k)["le"]), v)
            for k, v in histogram.items()
            if dict(k)["plugin"] == "host-local" and dict(k)["command"] == "ADD"
        )
        assert buckets[-1] == (float("inf"), 3)
        assert [v for _le, v in buckets] == sorted(v for _le, v in buckets)
        assert value(got, "pycni_agent_requests_in_flight") == 0
        assert value(got, "pycni_agent_info", version=agent.status()["version"]) == 1
        assert value(got, "process_resident_memory_bytes") > 0
        # The same figures as `pycni agent status`.
        doc = agent.status()
        assert doc["latency"]["host-local"]["ADD"]["count"] == 3 and doc["requests"]["refused"] == 1
        # Nothing but /metrics and /healthz.
        assert http_get(agent.ns_name, "/")[0] == 404
        assert "Traceback" not in agent.log_text()


@contextlib.contextmanager
def store_locked(data_dir: Path) -> Iterator[None]:
    """Hold host-local's lock on NET: every ADD of it waits (in flight) until the block ends."""
    path = data_dir / NET
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_healthz_is_503_while_the_agent_stops(tmp_path, make_node):
    node = make_node()
    with metrics_agent(tmp_path, ("--grace", "20")) as agent:
        bin_dir = tmp_path / "bin"
        install(str(bin_dir), agent.socket_path)
        outcomes: list[Any] = []
        with store_locked(node.ipam_dir):
            pending = threading.Thread(
                target=lambda: outcomes.append(
                    run_plugin(
                        str(bin_dir / "host-local"),
                        "ADD",
                        host_local_conf(node.ipam_dir),
                        node=node,
                        netns=node.pod(),
                        container_id="held",
                    )
                ),
                daemon=True,
            )
            pending.start()
            wait_until(lambda: agent.status()["in_flight"] == 1, 10, what="the request to be in flight")
            assert value(scrape(agent.ns_name), "pycni_agent_requests_in_flight") == 1
            agent.signal(signal.SIGTERM)  # it drains the request in flight (up to --grace) before it exits
            code, reason = wait_health(agent.ns_name, lambda c, _r: c == 503, 10, "503 while stopping")
            assert reason == "the agent is stopping"
            assert value(scrape(agent.ns_name), "pycni_agent_serving") == 0
        pending.join(60)
        assert outcomes and outcomes[0].code == 0, outcomes
        assert agent.proc.wait(20) == 0
    # The endpoint went with the agent.
    assert "metrics on http://127.0.0.1:9917/metrics" in agent.log_text()


def test_slow_and_surplus_clients_cannot_stall_the_endpoint(tmp_path):
    from pycni.agent.metrics import CONNECTION_DEADLINE, MAX_CONNECTIONS

    with metrics_agent(tmp_path) as agent:
        with netns.enter(agent.ns_name):
            slow = socket.create_connection(("127.0.0.1", PORT), timeout=10)
        try:
            slow.sendall(b"GET /metr")  # and then nothing more
            started = time.monotonic()
            assert healthz(agent.ns_name) == (200, "ok")
            assert time.monotonic() - started < 2
            assert slow.recv(100) == b""  # cut off: the whole request must come within the deadline
            assert time.monotonic() - started < CONNECTION_DEADLINE + 3
        finally:
            slow.close()
        # Every slot taken by a silent client: one more is closed unanswered at once, and once the
        # deadline has cut the silent ones off the endpoint answers again.
        idle = []
        try:
            with netns.enter(agent.ns_name):
                for _ in range(MAX_CONNECTIONS):
                    idle.append(socket.create_connection(("127.0.0.1", PORT), timeout=10))
                time.sleep(0.3)
                surplus = socket.create_connection(("127.0.0.1", PORT), timeout=10)
            with surplus:
                started = time.monotonic()
                try:
                    assert surplus.recv(100) == b""
                except ConnectionResetError:
                    pass
                assert time.monotonic() - started < 2
            wait_health(agent.ns_name, lambda c, _r: c == 200, CONNECTION_DEADLINE + 5, "the endpoint back")
        finally:
            for conn in idle:
                conn.close()
        assert agent.alive()


def test_an_address_the_namespace_lacks_stops_the_agent_with_a_reason(tmp_path):
    with metrics_agent(tmp_path, address="192.0.2.1:9917", wait=False) as agent:  # no such address in there
        assert agent.proc.wait(30) == 1
        assert "cannot serve metrics on 192.0.2.1:9917: Cannot assign requested address" in agent.log_text()
        assert not os.path.exists(agent.socket_path)
    bad = subprocess.run([PYCNI, "agent", "--metrics-address", "127.0.0.1"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


def test_under_systemd_the_agent_log_carries_journal_priorities(tmp_path, monkeypatch):
    """JOURNAL_STREAM naming the agent's stderr (here its log file, as journald's stream would be)."""
    log = tmp_path / "agent.log"
    log.touch()
    st = log.stat()
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    with metrics_agent(tmp_path) as agent:
        assert healthz(agent.ns_name) == (200, "ok")
    lines = [line for line in log.read_text().splitlines() if not line.startswith("---- ")]
    assert "<6>INFO pycni.agent: metrics on http://127.0.0.1:9917/metrics, health on /healthz" in lines
    assert '<7>DEBUG pycni.agent.metrics: metrics endpoint: 127.0.0.1 "GET /healthz HTTP/1.1" 200 -' in lines
    assert lines and all(line[:3] in ("<6>", "<7>", "<4>", "<3>") for line in lines), lines
    assert not any(line[3:7].isdigit() for line in lines)  # no timestamp: journald has one


# ---- overlay mode ----------------------------------------------------------------------------------


def _cluster_init(node, store_url: str) -> None:
    done = node.run(PYCNI, "cluster", "init", "--store", store_url, "--network", NETWORK, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.etcd
def test_overlay_metrics_and_health_through_a_store_outage_and_a_lapsed_lease(tmp_path):
    if etcd_skip_reason():
        pytest.skip(etcd_skip_reason())
    with cluster_topology(2, "amx") as topo:
        etcd = start_etcd(topo.underlay_path, UNDERLAY_GATEWAY, workdir=topo.path("etcd"), name="amx")
        try:
            store = f"etcd://{UNDERLAY_GATEWAY}:2379"
            n0, n1 = topo.nodes
            _cluster_init(n0, store)
            watched = topo.start_agent(
                n0, store, extra_args=("--metrics-address", ADDRESS, "--lease-ttl", "3", "--reconcile-interval", "0.5")
            )
            topo.start_agent(n1, store)
            wait_until(lambda: converged(topo.nodes), 20, what="both nodes routing each other's subnet")
            wait_health(n0.name, lambda c, _r: c == 200, 10, "a healthy node")

            got = scrape(n0.name)
            subnet = n0.read_state()["subnet"]
            assert value(got, "pycni_overlay_remote_nodes") == 1 and value(got, "pycni_overlay_remote_subnets") == 1
            assert value(got, "pycni_overlay_lease_state", state="valid") == 1
            assert value(got, "pycni_overlay_leases_held") == 1
            assert value(got, "pycni_overlay_lease_subnet", subnet=subnet) == 1
            assert value(got, "pycni_overlay_store_reachable") == 1
            assert value(got, "pycni_overlay_store_watch", state="streaming") == 1
            assert value(got, "pycni_overlay_kernel_changes_total") >= 3  # FDB, neighbour, route for n1
            assert value(got, "pycni_overlay_ready") == 1 and value(got, "pycni_agent_healthy") == 1
            assert (
                value(
                    got,
                    "pycni_overlay_info",
                    node="n0",
                    public_ip=n0.public_ip,
                    network=NETWORK,
                    vni="1",
                    vxlan_device="pycni.1",
                )
                == 1
            )
            assert value(got, "pycni_overlay_store_requests_total", operation="range") >= 1
            # Real reconciles (every 0.5 s here) move the count and the time of the last one.
            reconciles = value(got, "pycni_overlay_reconciles_total")
            last = value(got, "pycni_overlay_last_reconcile_timestamp_seconds")
            assert reconciles >= 1 and abs(time.time() - last) < 10
            wait_until(
                lambda: value(scrape(n0.name), "pycni_overlay_reconciles_total") >= reconciles + 2,
                10,
                interval=0.2,
                what="two more reconciles",
            )
            assert value(scrape(n0.name), "pycni_overlay_last_reconcile_timestamp_seconds") > last
            errors = value(got, "pycni_overlay_store_errors_total")

            # The store goes away: 503 naming it; past the 3 s TTL the lease lapses too.
            etcd.stop()
            try:
                code, reason = wait_health(
                    n0.name, lambda c, r: c == 503 and "cluster store" in r, 20, "503 for the store"
                )
                assert reason.startswith("the cluster store did not answer"), reason
                code, reason = wait_health(n0.name, lambda c, r: "lapsed" in r, 20, "503 for the lapsed lease")
                assert code == 503 and f"the subnet lease of {subnet} is lapsed" in reason, reason
                down = scrape(n0.name)
                assert value(down, "pycni_overlay_store_reachable") == 0
                assert value(down, "pycni_overlay_store_errors_total") > errors
                assert value(down, "pycni_overlay_lease_state", state="lapsed") == 1
                assert value(down, "pycni_overlay_leases_held") == 0
                assert value(down, "pycni_agent_healthy") == 0
                assert watched.running()
            finally:
                etcd = start_etcd(topo.underlay_path, UNDERLAY_GATEWAY, workdir=topo.path("etcd"), name="amx")
            # Back: the node renews its lease and is healthy again.
            wait_health(n0.name, lambda c, _r: c == 200, 40, "200 once the store is back")
            back = scrape(n0.name)
            assert value(back, "pycni_overlay_lease_state", state="valid") == 1
            assert value(back, "pycni_overlay_store_reachable") == 1
            assert n0.read_state()["subnet"] == subnet
        finally:
            topo.stop_all()
            etcd.stop()


def test_overlay_health_turns_503_when_the_reconcile_goes_stale(tmp_path):
    from pycni.agent.metrics import reconcile_max_age

    with cluster_topology(1, "ams") as topo:
        node = topo.nodes[0]
        store = "file://" + topo.path("store")
        _cluster_init(node, store)
        handle = topo.start_agent(node, store, extra_args=("--metrics-address", ADDRESS, "--reconcile-interval", "0.5"))
        wait_health(node.name, lambda c, _r: c == 200, 10, "a healthy node")
        # Without its public address the node finds no underlay: no reconcile completes from here on.
        ip_in(node.name, "addr", "del", f"{node.public_ip}/24", "dev", "eth0")
        try:
            limit = reconcile_max_age(0.5)
            started = time.monotonic()
            code, reason = wait_health(node.name, lambda c, _r: c == 503, limit + 15, "503 for a stale reconcile")
            assert time.monotonic() - started > limit - 2
            assert reason.startswith("the last reconcile completed") and f"stale after {limit:g} s" in reason, reason
            assert "store" not in reason and "lease" not in reason  # the file store and the lease are fine
            assert value(scrape(node.name), "pycni_agent_healthy") == 0
        finally:
            ip_in(node.name, "addr", "add", f"{node.public_ip}/24", "dev", "eth0")
        wait_health(node.name, lambda c, _r: c == 200, 20, "200 once the node reconciles again")
        assert handle.running()
