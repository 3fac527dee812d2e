"""Store: the overlay at 1000 nodes on one real etcd, measured from the outside.

flannel runs thousands of nodes on one etcd because in steady state a node
costs the store one idle watch and a lease keep-alive. This case measures
what pycni's nodes cost the store, from etcd's side (its /metrics: gRPC
requests by method, watch streams, bytes; the TCP connections it holds and
accepts) and from the real agents' side (CPU, RSS, connections and bytes of
their namespaces, `pycni agent status --json`), so the same method measures
whatever agent and store code the checkout holds.

Set-up: the underlay of bench/cases/overlay.py (a bridge in a namespace of its
own); one etcd (/usr/bin/etcd) in the underlay's namespace, listening only on
the underlay bridge's address; `pycni cluster init` with 10.0.0.0/8 and /24
node subnets; a few REAL agents (`pycni agent --store etcd://... --lease-ttl
TTL`) in node namespaces, and SIMULATED nodes up to 1000 in all: worker
processes (this module run as `python -m bench.cases.store sim`, in a
namespace of their own on the underlay, each holding a share of the leases)
that go through the store code the agents use: acquire_lease() with a TTL,
a keep-alive every TTL/3 (renew_lease() when the lease is gone), release_lease(). They program no kernel and do
not watch: a simulated node stands for a node's lease and keep-alives, the
real agents for a node's watch and reconcile.

- steady state: a window with only the simulated nodes (their keep-alives:
  the baseline), then the real agents start and converge, then the same
  window again. Requests by gRPC method (messages received, so a long-lived
  stream counts each message it carries) per node per minute over all nodes,
  per simulated node (baseline) and per real agent (the second window minus
  the baseline, scaled by the simulated nodes' own renewal counts, divided by
  the real agents; the simulated keep-alives pause for the milliseconds
  etcd's counters are read at each end, so no renewal straddles an end);
  open watch streams (sampled), watch streams started and
  TCP connections accepted during the window (etcd's counters; each real
  agent's own count of connections it opened); gRPC bytes/s in and out of
  etcd and each real agent's bytes on its underlay link; CPU % and RSS of the
  real agents, etcd and the simulator.
- join/leave: a simulated node joins (acquire_lease) and later leaves
  (release_lease); the time runs from the write (the event on the bench's
  own watch of the leases, or the simulated node's call returning if that
  was earlier: both follow the commit) to the matching FDB entry (the node's
  public IP on the agent's vxlan device) being added or deleted on every
  real agent (`bridge monitor fdb` in each node namespace, overlay.py's
  FdbMonitor). p50 and p99 over the events of the slowest agent per event.
  The store is never wrapped: a wrapper would send acquire_lease() down
  another path than the agents'.
- simultaneous starts: N more simulated nodes (fresh processes, a thread and
  a store connection per node) all released by one barrier (a pipe whose
  writer the bench closes) call acquire_lease(), again a second after a store
  error (as a restarted agent would); the time until all hold a lease, store
  writes per node (etcd Txn + Put + LeaseGrant + LeaseRevoke deltas / N),
  claim transactions that took nothing (Txn - nodes leased), store errors
  retried, failures and duplicate subnets (must be 0).
- compaction: while the real agents watch, a lease change, a physical
  compaction at the current revision, then more changes: every change must
  be programmed by every agent, and at the end every agent's FDB must match
  the store (no lost update).
- partition (full mode only): a 3-member etcd (each member in a namespace on
  the underlay), the agents given all three endpoints, one member cut off
  from the other two (blackhole routes in its namespace; clients still reach
  it) while changes are written through the other two: every agent must
  program every change once it fails over, and after the partition heals.

Targets from the issue are printed beside the figures and stored under
`targets`; the case states them, it does not fail on them.

`python -m bench --only store` runs it (not part of the default set).
"""

from __future__ import annotations

import base64
import collections
import heapq
import http.client
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .. import topology
from ..context import Context
from ..spawn import IP
from ..stats import summary

ETCD = "/usr/bin/etcd"
CLIENT_PORT = 2379
PEER_PORT = 2380
CLUSTER_NETWORK = "10.0.0.0/8"  # 65536 /24 node subnets
ETCD_START_TIMEOUT = 30.0
STORE_TIMEOUT = 5.0  # a simulated node's store requests, as an agent's (overlay/options.py)
WORKER_START_TIMEOUT = 60.0
HOLD_TIMEOUT = 900.0  # simulated nodes leasing their subnets
CONVERGE_TIMEOUT = 180.0  # real agents programming every node
EVENT_TIMEOUT = 30.0  # one join or leave reaching every agent
FAILOVER_TIMEOUT = 90.0  # a change reaching every agent across a partition
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REQUEST_METHODS = (
    "Range",
    "Txn",
    "Put",
    "DeleteRange",
    "LeaseGrant",
    "LeaseRevoke",
    "LeaseKeepAlive",
    "LeaseTimeToLive",
    "Watch",
    "Compact",
)
WRITE_METHODS = ("Txn", "Put", "LeaseGrant", "LeaseRevoke")
TARGETS = {
    "steady state": "keep-alives only (LeaseKeepAlive: 6 per node per minute when renewed every TTL/3 = 10 s), "
    "one watch stream per real agent, no new watch streams or connections during the window",
    "join/leave": "p99 < 1 s at 1000 nodes (lease written to programmed on every agent)",
    "simultaneous starts": "all leased < 30 s for 300 nodes, <= 3 store writes per node, 0 duplicate subnets",
    "compaction": "0 lost updates",
    "partition": "0 lost updates once an agent fails over",
}


@dataclass(frozen=True)
class Plan:
    nodes: int  # real + simulated nodes in the cluster
    real: int  # real agents
    workers: int  # simulated-node worker processes
    ttl: int  # lease TTL of every node (s); keep-alive every ttl/3
    steady_s: float  # each steady-state window
    events: int  # joins, and as many leaves
    starts: int  # simultaneous starts
    start_workers: int
    start_timeout: float
    compaction_changes: int
    partition: bool  # the 3-member etcd variant
    partition_changes: int


PLANS = {
    "smoke": Plan(
        nodes=30,
        real=2,
        workers=2,
        ttl=6,
        steady_s=5,
        events=2,
        starts=10,
        start_workers=2,
        start_timeout=60,
        compaction_changes=2,
        partition=False,
        partition_changes=2,
    ),
    "quick": Plan(
        nodes=1000,
        real=3,
        workers=4,
        ttl=30,
        steady_s=30,
        events=5,
        starts=100,
        start_workers=4,
        start_timeout=180,
        compaction_changes=4,
        partition=False,
        partition_changes=4,
    ),
    "full": Plan(
        nodes=1000,
        real=5,
        workers=8,
        ttl=30,
        steady_s=60,
        events=10,
        starts=300,
        start_workers=6,
        start_timeout=300,
        compaction_changes=6,
        partition=True,
        partition_changes=6,
    ),
}


def run(ctx: Context) -> dict[str, Any]:
    from .overlay import _pycni_command

    if not os.access(ETCD, os.X_OK):
        ctx.note(f"store: skipped, {ETCD} is missing (apt-get install etcd-server)")
        return {"skipped": f"{ETCD} missing"}
    if not ctx.pycni.has("vxlan"):
        ctx.note("store: skipped, pycni has no vxlan plugin")
        return {"skipped": "no vxlan plugin"}
    if (
        subprocess.run([*_pycni_command(), "agent", "--help"], capture_output=True, text=True, timeout=60).returncode
        != 0
    ):
        ctx.note("store: skipped, `pycni agent` is not available")
        return {"skipped": "no pycni agent"}
    plan = PLANS[ctx.settings.mode]
    figures: dict[str, Any] = {"targets": dict(TARGETS)}
    one = OneEtcd(ctx, plan)
    with ctx.cleanup.scope():
        outcome = ctx.attempt("store/one etcd", one.run)
    figures.update(one.figures)  # what was measured before a failure stands
    if "error" in outcome:
        figures["error"] = outcome["error"]
    if plan.partition:
        print("  store: 3-member etcd, one member partitioned", flush=True)
        with ctx.cleanup.scope():
            figures["partition"] = ctx.attempt("store/partition", lambda: _partition(ctx, plan))
    else:
        ctx.note("store: the 3-member etcd partition variant runs in full mode only")
        figures["partition"] = {"skipped": "full mode only"}
    _print_against_targets(figures, plan)
    return figures


# ---- etcd: members, metrics, counters from /proc --------------------------------------------


@dataclass
class EtcdMember:
    name: str
    ns: str
    ip: str
    data_dir: str
    log: str
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.ip}:{CLIENT_PORT}"

    def log_tail(self, lines: int = 10) -> str:
        try:
            with open(self.log, errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return "(no log)"


def _start_etcd(
    ctx: Context, workdir: str, ns: str, ip: str, name: str = "m0", initial: str = "", token: str = "pycni-bench"
) -> EtcdMember:
    """etcd in namespace ``ns``, listening on ``ip`` only (client and peer); registered for cleanup."""
    member = EtcdMember(name, ns, ip, os.path.join(workdir, f"{name}.data"), os.path.join(workdir, f"{name}.log"))
    peer = f"http://{ip}:{PEER_PORT}"
    client = f"http://{ip}:{CLIENT_PORT}"
    args = [
        ETCD,
        "--name",
        name,
        "--data-dir",
        member.data_dir,
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        initial or f"{name}={peer}",
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        token,
        # fast elections keep a partition's fail-over short (members on veths)
        "--heartbeat-interval",
        "50",
        "--election-timeout",
        "500",
        "--logger",
        "zap",
        "--log-level",
        "warn",
        "--log-outputs",
        "stderr",
    ]
    with open(member.log, "ab") as log:
        # `ip netns exec` execs etcd: the PID is etcd's own, stopped by PID.
        member.proc = ctx.cleanup.process(
            subprocess.Popen(
                [IP, "netns", "exec", ns, *args], stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True
            )
        )
    return member


def _stop_etcd(ctx: Context, member: EtcdMember) -> None:
    from pycni import procs

    if member.proc is not None:
        procs.stop(member.proc, 10.0)
        ctx.cleanup.stop_process(member.proc)


class EtcdClient:
    """One kept-alive HTTP connection to a member's client URL, opened inside its namespace:
    /metrics, /health, a revision, a compaction. Scraping adds no connection per scrape."""

    def __init__(self, member: EtcdMember) -> None:
        self.member = member
        self._conn: http.client.HTTPConnection | None = None

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> bytes:
        import netns

        for attempt in range(2):
            if self._conn is None:
                conn = http.client.HTTPConnection(self.member.ip, CLIENT_PORT, timeout=timeout)
                conn.auto_open = 0
                with netns.enter(self.member.ns):
                    conn.connect()
                self._conn = conn
            try:
                payload = json.dumps(body).encode() if body is not None else None
                self._conn.request(
                    method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {}
                )
                response = self._conn.getresponse()
                data = response.read()
                if response.will_close:
                    self.close()
                if response.status != 200:
                    raise RuntimeError(f"etcd {path}: HTTP {response.status}: {data[:200]!r}")
                return data
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def healthy(self) -> bool:
        try:
            return json.loads(self._request("GET", "/health", timeout=2.0)).get("health") == "true"
        except (OSError, http.client.HTTPException, RuntimeError, ValueError):
            return False

    def metrics(self) -> "Metrics":
        return Metrics.parse(self._request("GET", "/metrics").decode())

    def revision(self) -> int:
        answer = json.loads(
            self._request(
                "POST", "/v3/kv/range", {"key": base64.b64encode(b"/pycni/config").decode(), "count_only": True}
            )
        )
        return int(answer["header"]["revision"])

    def compact(self, revision: int) -> None:
        self._request("POST", "/v3/kv/compaction", {"revision": str(revision), "physical": True}, timeout=30.0)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _wait_healthy(members: list[EtcdMember], clients: list[EtcdClient]) -> None:
    deadline = time.monotonic() + ETCD_START_TIMEOUT
    for _ in range(int(ETCD_START_TIMEOUT / 0.1) + 1):
        for member in members:
            if member.proc is not None and member.proc.poll() is not None:
                raise RuntimeError(f"etcd {member.name} exited ({member.proc.returncode}):\n{member.log_tail()}")
        if all(client.healthy() for client in clients):
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    raise RuntimeError(f"etcd not healthy after {ETCD_START_TIMEOUT:g} s:\n{members[0].log_tail()}")


class WriteWatch:
    """The bench's own watch on the leases (inside etcd's namespace): each PUT and DELETE stamped as
    it arrives, i.e. when etcd published the write to its watchers. Join and leave delays run from
    there, whatever client code made the write (a wrapper around the store would change its path)."""

    def __init__(self, member: EtcdMember, prefix: bytes = b"/pycni/subnets/") -> None:
        import netns

        end = bytearray(prefix)
        end[-1] += 1
        body = {
            "create_request": {
                "key": base64.b64encode(prefix).decode(),
                "range_end": base64.b64encode(bytes(end)).decode(),
                "prev_kv": True,
            }
        }
        self._conn = http.client.HTTPConnection(member.ip, CLIENT_PORT, timeout=10.0)
        with netns.enter(member.ns):
            self._conn.connect()
        self._conn.request(
            "POST", "/v3/watch", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        self._response = self._conn.getresponse()
        if self._response.status != 200:
            raise RuntimeError(f"etcd /v3/watch: HTTP {self._response.status}")
        assert self._conn.sock is not None
        self._sock = self._conn.sock
        self._sock.settimeout(None)
        self.events: list[tuple[float, str, bool]] = []  # (time.time(), public IP, deleted)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for _ in range(10**9):
            try:
                line = self._response.readline()
            except (OSError, ValueError, AttributeError, http.client.HTTPException):
                # AttributeError: http.client closing a chunked response whose connection close() let go of
                return
            if not line:
                return
            stamp = time.time()
            try:
                events = (json.loads(line).get("result") or {}).get("events") or []
            except ValueError:
                continue
            for event in events:
                deleted = event.get("type") == "DELETE"
                kv = event.get("prev_kv" if deleted else "kv") or {}
                try:
                    public_ip = json.loads(base64.b64decode(kv.get("value", ""))).get("PublicIP", "")
                except (ValueError, AttributeError):
                    continue
                with self._lock:
                    self.events.append((stamp, public_ip, deleted))

    def when(self, public_ip: str, deleted: bool, after: float, returned: float) -> float:
        """When the lease of ``public_ip`` was written (deleted) after ``after``: the earlier of the
        watch's stamp and ``returned`` (the writer's clock when its call returned), both upper bounds
        of the commit; ``returned`` alone if the watch did not see the write within a second."""
        for _ in range(100):
            with self._lock:
                for stamp, ip_, gone in self.events:
                    if stamp >= after and ip_ == public_ip and gone == deleted:
                        return min(stamp, returned)
            time.sleep(0.01)
        return returned

    def close(self) -> None:
        import socket

        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()
        self._thread.join(timeout=5)


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Metrics:
    """One scrape of a Prometheus text page: name -> [(labels, value)]."""

    samples: dict[str, list[tuple[dict[str, str], float]]]
    at: float = field(default_factory=time.monotonic)

    @classmethod
    def parse(cls, text: str) -> "Metrics":
        samples: dict[str, list[tuple[dict[str, str], float]]] = collections.defaultdict(list)
        try:
            from prometheus_client.parser import text_string_to_metric_families
        except ImportError:  # not in the venv: a parser for the subset etcd writes
            for line in text.splitlines():
                if not line or line.startswith("#"):
                    continue
                match = _SAMPLE.match(line)
                if not match:
                    continue
                try:
                    value = float(match.group(3))
                except ValueError:
                    continue
                labels = {
                    k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(match.group(2) or "")
                }
                samples[match.group(1)].append((labels, value))
        else:
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    samples[sample.name].append((dict(sample.labels), float(sample.value)))
        return cls(dict(samples))

    def total(self, name: str, **match: str) -> float:
        return sum(
            value for labels, value in self.samples.get(name, []) if all(labels.get(k) == v for k, v in match.items())
        )

    def by_method(self, name: str) -> dict[str, float]:
        """gRPC counters of etcd's own services (not the health service), by method."""
        out: dict[str, float] = collections.defaultdict(float)
        for labels, value in self.samples.get(name, []):
            if labels.get("grpc_service", "").startswith("etcdserverpb."):
                out[labels.get("grpc_method", "?")] += value
        return dict(out)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before.get(key, 0.0) for key in after if after[key] - before.get(key, 0.0)}


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (/proc/PID/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _tcp_counters(pid: int) -> dict[str, int]:
    """Tcp: ActiveOpens, PassiveOpens, ... of the network namespace ``pid`` lives in."""
    with open(f"/proc/{pid}/net/snmp") as fh:
        rows = [line.split() for line in fh if line.startswith("Tcp:")]
    return {name: int(value) for name, value in zip(rows[0][1:], rows[1][1:])}


def _link_bytes(pid: int, link: str) -> int:
    """Bytes received + sent on ``link`` in the namespace ``pid`` lives in."""
    with open(f"/proc/{pid}/net/dev") as fh:
        for line in fh:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == link:
                fields = rest.split()
                return int(fields[0]) + int(fields[8])
    return 0


def _established(pid: int, port: int) -> collections.Counter:
    """Established TCP connections to ``port`` in the namespace of ``pid``, by remote IPv4 address."""
    found: collections.Counter = collections.Counter()
    with open(f"/proc/{pid}/net/tcp") as fh:
        next(fh)
        for line in fh:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state != "01" or int(local.split(":")[1], 16) != port:
                continue
            raw = int(remote.split(":")[0], 16)
            found[".".join(str((raw >> shift) & 0xFF) for shift in (0, 8, 16, 24))] += 1
    return found


# ---- simulated nodes: worker processes ------------------------------------------------------

SIM_BLOCK, JOIN_BLOCK, START_BLOCK, PARTITION_BLOCK = 16, 20, 24, 28  # 172.<block>.0.0/16 per kind of node


def _sim_identity(index: int, block: int = SIM_BLOCK) -> tuple[str, str, str]:
    """(public IP, VTEP MAC, node name) of simulated node ``index`` in address block 172.<block>.x.y."""
    high, low = divmod(index, 250)
    return (f"172.{block}.{high}.{low + 1}", f"0a:58:ac:{block:02x}:{high:02x}:{low + 1:02x}", f"sim-{block}-{index}")


class Worker:
    """A worker process (``python -m bench.cases.store MODE``) in a namespace; JSON lines both ways."""

    def __init__(
        self,
        ctx: Context,
        ns: str,
        mode: str,
        store_url: str,
        ttl: int,
        log: str,
        inbox: "queue.Queue[tuple[Worker, dict[str, Any]]] | None" = None,
        barrier_fd: int | None = None,
    ):
        self.ctx = ctx
        self.log = log
        self.inbox: queue.Queue = inbox if inbox is not None else queue.Queue()
        argv = [
            IP,
            "netns",
            "exec",
            ns,
            sys.executable,
            "-m",
            "bench.cases.store",
            mode,
            "--store",
            store_url,
            "--ttl",
            str(ttl),
        ]
        if barrier_fd is not None:
            argv += ["--barrier-fd", str(barrier_fd)]
        with open(log, "ab") as err:
            self.proc = ctx.cleanup.process(
                subprocess.Popen(
                    argv,
                    cwd=REPO,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    bufsize=1,
                    close_fds=True,
                    pass_fds=(barrier_fd,) if barrier_fd is not None else (),
                )
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.inbox.put((self, json.loads(line)))
            except ValueError:
                pass

    def _log_tail(self, lines: int = 10) -> str:
        try:
            with open(self.log, errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def send(self, doc: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(doc) + "\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.5) + 2):
            try:
                _worker, doc = self.inbox.get(timeout=max(0.01, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"a simulated-node worker exited ({self.proc.returncode}):\n{self._log_tail()}"
                    ) from None
                if time.monotonic() >= deadline:
                    break
                continue
            if "error" in doc and len(doc) == 1:
                raise RuntimeError(f"simulated-node worker: {doc['error']}")
            return doc
        raise RuntimeError(f"a simulated-node worker did not answer within {timeout:g} s:\n{self._log_tail()}")

    def ask(self, doc: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        self.send(doc)
        return self.receive(timeout)

    def stop(self) -> None:
        from pycni import procs

        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # EOF: the worker ends on its own
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            procs.stop(self.proc, 5.0)
        self.ctx.cleanup.stop_process(self.proc)


class Simulator:
    """The simulated nodes: ``workers`` processes holding leases and keeping them alive."""

    def __init__(self, ctx: Context, ns: str, store_url: str, ttl: int, workers: int, logdir: str) -> None:
        self.workers = [
            Worker(ctx, ns, "sim", store_url, ttl, os.path.join(logdir, f"sim{i}.log")) for i in range(workers)
        ]
        for worker in self.workers:
            worker.receive(WORKER_START_TIMEOUT)  # {"ready": ...}
        self.owner: dict[str, Worker] = {}  # public IP -> the worker holding its lease
        self.pids = [w.proc.pid for w in self.workers]

    def hold(self, nodes: list[tuple[str, str, str, str]]) -> list[str]:
        """Lease every (public IP, MAC, name, preferred subnet), spread over the workers; failures' messages."""
        shares = [nodes[i :: len(self.workers)] for i in range(len(self.workers))]
        for worker, share in zip(self.workers, shares):
            worker.send({"op": "hold", "nodes": share})
        failed: list[str] = []
        for worker, share in zip(self.workers, shares):
            answer = worker.receive(HOLD_TIMEOUT)
            failed += answer.get("failed", [])
            for node in share:
                self.owner[node[0]] = worker
        return failed

    def join(self, public_ip: str, mac: str, name: str, index: int) -> dict[str, Any]:
        worker = self.workers[index % len(self.workers)]
        answer = worker.ask({"op": "join", "node": [public_ip, mac, name]})
        self.owner[public_ip] = worker
        return answer

    def leave(self, public_ip: str) -> dict[str, Any]:
        worker = self.owner.pop(public_ip)
        return worker.ask({"op": "leave", "ip": public_ip})

    def counts(self) -> dict[str, int]:
        return self._everyone("counts")

    def pause(self) -> dict[str, int]:
        """Hold every keep-alive (none in flight once this returns) until resume(); the counts then."""
        return self._everyone("pause")

    def resume(self) -> None:
        self._everyone("resume")

    def _everyone(self, op: str) -> dict[str, int]:
        for worker in self.workers:
            worker.send({"op": op})
        total: collections.Counter = collections.Counter()
        for worker in self.workers:
            total.update({k: v for k, v in worker.receive(60.0).items() if isinstance(v, int)})
        return dict(total)

    def cpu_s(self) -> float:
        return sum(_proc_cpu_s(pid) for pid in self.pids)

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()


# ---- the worker side (runs in its own process) ------------------------------------------------


class _Out:
    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __call__(self, doc: dict[str, Any]) -> None:
        with self._lock:
            sys.stdout.write(json.dumps(doc) + "\n")
            sys.stdout.flush()


class _Keeper:
    """One keep-alive thread with a store connection of its own, renewing its nodes' leases every ttl/3.

    Several per worker, so that a slow store (hundreds of nodes starting) delays each node's renewal as
    it would delay a real node's, instead of queueing a worker's share of nodes behind one connection."""

    def __init__(
        self, url: str, ttl: int, counts: collections.Counter, counts_lock: threading.Lock, stop: threading.Event
    ) -> None:
        from ipam.cluster import open_store

        self.store = open_store(url, timeout=STORE_TIMEOUT)
        self.ttl = ttl
        self.held: dict[str, Any] = {}  # public IP -> NodeLease
        self.due: list[tuple[float, str]] = []  # (monotonic time, public IP) heap
        self.lock = threading.Lock()
        self.renewing = threading.Lock()  # held during a renewal, and by "pause" (none in flight)
        self.counts, self.counts_lock, self.stop = counts, counts_lock, stop
        threading.Thread(target=self._run, daemon=True).start()

    def add(self, lease: Any) -> None:
        with self.lock:
            self.held[lease.public_ip] = lease
            heapq.heappush(self.due, (time.monotonic() + self.ttl / 3, lease.public_ip))

    def drop(self, public_ip: str) -> bool:
        with self.lock:
            return self.held.pop(public_ip, None) is not None

    def _count(self, what: str) -> None:
        with self.counts_lock:
            self.counts[what] += 1

    def _run(self) -> None:
        from ipam.cluster import StoreError, renew_lease

        while not self.stop.is_set():
            with self.lock:
                head = self.due[0] if self.due else None
            if head is None or head[0] > time.monotonic():
                self.stop.wait(min(0.5, head[0] - time.monotonic()) if head else 0.5)
                continue
            with self.lock:
                _due, public_ip = heapq.heappop(self.due)
                lease = self.held.get(public_ip)
            if lease is None:
                continue  # left meanwhile
            try:
                with self.renewing:
                    # As the agent renews (LeaseKeeper.keep_alive): one keep-alive while the lease is there,
                    # the whole renew_lease() (a read, then a write if needed) only when it is not.
                    current = lease if self.store.refresh(lease.key) else renew_lease(self.store, lease, self.ttl)
                    self._count("renewals")
                if lease.mod_revision and current.mod_revision != lease.mod_revision:
                    self._count("rewritten")  # it had lapsed (or changed): renew_lease wrote it again
                retry = self.ttl / 3
            except StoreError as exc:  # LeaseLost is a StoreError too
                self._count("renew_errors")
                print(f"renewing {public_ip}: {exc}", file=sys.stderr, flush=True)
                current, retry = lease, 1.0
            with self.lock:
                if public_ip in self.held:
                    self.held[public_ip] = current
                    heapq.heappush(self.due, (time.monotonic() + retry, public_ip))


class _SimNodes:
    """Leases held by this worker, spread over KEEPERS keep-alive threads."""

    KEEPERS = 16

    def __init__(self, url: str, ttl: int, out: _Out) -> None:
        from ipam.cluster import open_store, read_config

        self.store = open_store(url, timeout=STORE_TIMEOUT)  # joins and leaves
        self.cfg = read_config(self.store)
        self.ttl = ttl
        self.out = out
        self.stop = threading.Event()
        self.counts: collections.Counter = collections.Counter()
        counts_lock = threading.Lock()
        self.keepers = [_Keeper(url, ttl, self.counts, counts_lock, self.stop) for _ in range(self.KEEPERS)]
        self.added = 0

    def _add(self, lease: Any) -> None:
        self.keepers[self.added % len(self.keepers)].add(lease)
        self.added += 1

    def _held(self) -> int:
        return sum(len(keeper.held) for keeper in self.keepers)

    def hold(self, nodes: list[list[str]]) -> dict[str, Any]:
        from ipam.cluster import acquire_lease

        failed = []
        began = time.monotonic()
        for public_ip, mac, name, subnet in nodes:
            try:
                self._add(
                    acquire_lease(
                        self.store, self.cfg, public_ip, mac, node_name=name, preferred_subnet=subnet, ttl=self.ttl
                    )
                )
            except Exception as exc:
                failed.append(f"{public_ip}: {type(exc).__name__}: {exc}")
        return {"held": len(nodes) - len(failed), "failed": failed[:20], "s": time.monotonic() - began}

    def join(self, public_ip: str, mac: str, name: str) -> dict[str, Any]:
        from ipam.cluster import acquire_lease

        began = time.time()
        lease = acquire_lease(self.store, self.cfg, public_ip, mac, node_name=name, ttl=self.ttl)
        returned = time.time()
        self._add(lease)
        return {"subnet": lease.subnet, "began": began, "returned": returned}

    def leave(self, public_ip: str) -> dict[str, Any]:
        from ipam.cluster import release_lease

        for keeper in self.keepers:
            keeper.drop(public_ip)
        began = time.time()
        released = release_lease(self.store, public_ip)
        returned = time.time()
        return {"released": released, "began": began, "returned": returned}

    def serve(self) -> None:
        for line in sys.stdin:
            try:
                request = json.loads(line)
                op = request.get("op")
                if op == "hold":
                    self.out(self.hold(request["nodes"]))
                elif op == "join":
                    self.out(self.join(*request["node"]))
                elif op == "leave":
                    self.out(self.leave(request["ip"]))
                elif op == "counts":
                    self.out(dict(self.counts, held=self._held()))
                elif op == "pause":  # no renewal in flight until "resume": the bench reads etcd's counters
                    for keeper in self.keepers:
                        keeper.renewing.acquire()
                    self.out(dict(self.counts, held=self._held()))
                elif op == "resume":
                    for keeper in self.keepers:
                        if keeper.renewing.locked():
                            keeper.renewing.release()
                    self.out({"resumed": True})
                else:
                    self.out({"error": f"unknown request {op!r}"})
            except Exception as exc:  # answer, never hang the bench
                self.out({"error": f"{type(exc).__name__}: {exc}"})
        self.stop.set()


def _starting_nodes(url: str, ttl: int, barrier_fd: int, out: _Out) -> None:
    """Nodes that start at one moment: a thread and a store connection each, released when the
    barrier pipe's writer closes; each keeps its lease alive until told to release it.

    A node whose acquire_lease() fails with a store error (a timeout, a store that kept changing)
    tries again a second later, as an agent restarted by its supervisor would, until the deadline."""
    from ipam.cluster import (
        LeaseExhausted,
        NodeConflict,
        StoreError,
        acquire_lease,
        open_store,
        read_config,
        renew_lease,
    )

    request = json.loads(sys.stdin.readline())
    deadline = time.monotonic() + float(request["give_up_after_s"])
    with open_store(url, timeout=STORE_TIMEOUT) as store:
        cfg = read_config(store)
    go, stop = threading.Event(), threading.Event()
    held: list[tuple[Any, Any]] = []
    held_lock = threading.Lock()

    def node(public_ip: str, mac: str, name: str) -> None:
        go.wait()
        store = open_store(url, timeout=STORE_TIMEOUT)
        errors = 0
        for _ in range(1000):
            try:
                lease = acquire_lease(store, cfg, public_ip, mac, node_name=name, ttl=ttl)
                out({"done": public_ip, "subnet": lease.subnet, "at": time.time(), "errors": errors})
                break
            except Exception as exc:
                retry = isinstance(exc, StoreError) and not isinstance(exc, (LeaseExhausted, NodeConflict))
                errors += retry
                if not retry or time.monotonic() + 1.0 >= deadline:
                    out(
                        {
                            "done": public_ip,
                            "failed": f"{type(exc).__name__}: {exc}",
                            "at": time.time(),
                            "errors": errors,
                        }
                    )
                    store.close()
                    return
                time.sleep(1.0)
        else:
            store.close()
            return
        with held_lock:
            held.append((store, lease))
        while not stop.wait(ttl / 3):
            try:
                lease = lease if store.refresh(lease.key) else renew_lease(store, lease, ttl)
            except StoreError as exc:
                print(f"renewing {public_ip}: {exc}", file=sys.stderr, flush=True)

    threads = [threading.Thread(target=node, args=tuple(n), daemon=True) for n in request["nodes"]]
    for thread in threads:
        thread.start()
    out({"ready": len(threads)})
    while os.read(barrier_fd, 1):  # the barrier: EOF when the bench closes the pipe's only writer
        pass
    go.set()
    for line in sys.stdin:
        if json.loads(line).get("op") == "release":
            stop.set()
            for thread in threads:
                thread.join(timeout=max(0.1, 30 / len(threads)))
            released = 0
            with held_lock:
                for store, lease in held:
                    try:
                        released += store.delete(lease.key)
                    except StoreError:
                        pass
                    store.close()
            out({"released": released})


def worker_main(argv: list[str]) -> None:
    """`python -m bench.cases.store sim|start --store URL --ttl S [--barrier-fd FD]` (started by the bench)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.cases.store")
    parser.add_argument("mode", choices=("sim", "start"))
    parser.add_argument("--store", required=True)
    parser.add_argument("--ttl", type=int, required=True)
    parser.add_argument("--barrier-fd", type=int)
    args = parser.parse_args(argv)
    out = _Out()
    try:
        if args.mode == "sim":
            nodes = _SimNodes(args.store, args.ttl, out)
            out({"ready": os.getpid()})
            nodes.serve()
        else:
            _starting_nodes(args.store, args.ttl, args.barrier_fd, out)
    except Exception as exc:
        out({"error": f"{type(exc).__name__}: {exc}"})
        raise


# ---- real agents --------------------------------------------------------------------------------


def _agent_status(agent: Any) -> dict[str, Any]:
    """`pycni agent status --json`, its overlay part with lists reduced to their length."""
    from .overlay import _pycni_command, _socket

    done = subprocess.run(
        [*_pycni_command(), "agent", "status", "--socket", _socket(agent), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip()[-300:]}
    doc = json.loads(done.stdout)
    view = doc.get("overlay", doc) if isinstance(doc, dict) else {}
    return {
        key: (len(value) if isinstance(value, list) else value)
        for key, value in view.items()
        if not isinstance(value, dict) or key in ("store", "watch")
    }


def _fdb_dsts(ns: str, device: str) -> set[str]:
    """The remote VTEPs (dst) the FDB of ``device`` in ``ns`` points at."""
    from .overlay import _json

    found = _json(["bridge", "-n", ns, "-j", "fdb", "show", "dev", device])
    return {entry["dst"] for entry in found if entry.get("dst")}


def _wait_converged(
    agents: list[Any], devices: dict[str, str], public_ips: set[str], timeout: float = CONVERGE_TIMEOUT
) -> float:
    """Until every agent's vxlan device points at exactly the other nodes (none missing, none stale)."""
    from .overlay import _poll

    began = time.monotonic()

    def done() -> bool:
        for agent in agents:
            if agent.proc is not None and agent.proc.poll() is not None:
                raise RuntimeError(f"the agent in {agent.ns} exited ({agent.proc.returncode})")
            if _fdb_dsts(agent.ns, devices[agent.ns]) != public_ips - {agent.public_ip}:
                return False
        return True

    _poll(done, timeout, 0.5, f"{len(agents)} agents to program {len(public_ips) - 1} remote nodes")
    return time.monotonic() - began


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def _events_figure(slowest: list[float], every: list[float]) -> dict[str, Any]:
    if not slowest:
        return {"n": 0}
    return {
        "p50, every agent programmed": summary([_percentile(slowest, 50)], "ms", 1000),
        "p99, every agent programmed": summary([_percentile(slowest, 99)], "ms", 1000),
        "every agent programmed": summary(slowest, "ms", 1000),
        "each agent": summary(every, "ms", 1000),
    }


# ---- one etcd, 1000 nodes ---------------------------------------------------------------------------


class OneEtcd:
    """The cluster of the first four figures: one etcd, real agents, simulated nodes up to plan.nodes."""

    def __init__(self, ctx: Context, plan: Plan) -> None:
        self.ctx = ctx
        self.plan = plan
        self.events = 0  # joins made so far (each gets a fresh address)
        self.figures: dict[str, Any] = {}

    def run(self) -> dict[str, Any]:
        from .overlay import FdbMonitor, Underlay, _new_agent, _start, _stop, _wait_ready

        ctx, plan = self.ctx, self.plan
        figures = self.figures
        underlay = Underlay(ctx)
        workdir = ctx.cleanup.directory("store")
        etcd_ip = underlay_ip = "192.168.100.1"  # the underlay bridge's address, in the underlay namespace
        member = _start_etcd(ctx, workdir, underlay.ns, etcd_ip)
        client = EtcdClient(member)
        _wait_healthy([member], [client])
        url = f"etcd://{etcd_ip}:{CLIENT_PORT}"
        _cluster_init(underlay.ns, url)
        sim_ns, sim_ip = underlay.host("stsim")
        start_ns, start_ip = underlay.host("ststart")
        nodes = [underlay.host("stnode") for _ in range(plan.real)]
        agents = [_new_agent(ctx, workdir, ns, ip_) for ns, ip_ in nodes]
        roles = {
            underlay_ip: "etcd's own gateway and the bench's scraper",
            sim_ip: "simulated nodes",
            start_ip: "starting nodes",
            **{a.public_ip: "real agents" for a in agents},
        }
        settings = {
            "nodes": plan.nodes,
            "real agents": plan.real,
            "simulated nodes": plan.nodes - plan.real,
            "simulator processes": plan.workers,
            "lease ttl s": plan.ttl,
            "etcd": _etcd_version(),
            "store": url,
            "network": CLUSTER_NETWORK,
        }
        figures["settings"] = settings
        print(
            f"  store: etcd {settings['etcd']} at {url}; {plan.nodes - plan.real} simulated nodes in "
            f"{plan.workers} processes, {plan.real} real agents, lease TTL {plan.ttl} s",
            flush=True,
        )

        # -- the simulated nodes lease their subnets (each its own, no races: that is figure 3)
        sims = Simulator(ctx, sim_ns, url, plan.ttl, plan.workers, workdir)
        writes: WriteWatch | None = None
        try:
            from ipam.cluster import ClusterConfig

            cfg = ClusterConfig(CLUSTER_NETWORK)
            subnets = cfg.subnets()
            for _ in range(16):  # the first subnets stay free for the real agents and joining nodes
                next(subnets)
            population = [(*_sim_identity(i), str(next(subnets))) for i in range(plan.nodes - plan.real)]
            began = time.monotonic()
            failed = sims.hold(population)
            if failed:
                raise RuntimeError(f"{len(failed)} simulated nodes could not lease a subnet: {failed[0]}")
            settings["simulated nodes leased in s"] = round(time.monotonic() - began, 1)
            print(
                f"  store: {len(population)} simulated nodes leased in {settings['simulated nodes leased in s']} s",
                flush=True,
            )

            # -- baseline: the simulated nodes alone
            print(f"  store: steady state, simulated nodes only ({plan.steady_s:g} s)", flush=True)
            baseline = self._window(client, member, sims, [], roles)

            # -- the real agents start and converge
            began = time.monotonic()
            for agent in agents:
                _start(ctx, agent, url, ("--lease-ttl", str(plan.ttl), "--node-name", f"real-{agent.public_ip}"))
            _wait_ready(agents, timeout=120.0)
            devices = {agent.ns: agent.state().vxlan_device for agent in agents}
            public_ips = {node[0] for node in population} | {agent.public_ip for agent in agents}
            _wait_converged(agents, devices, public_ips)
            settings["real agents converged in s"] = round(time.monotonic() - began, 1)
            print(
                f"  store: {plan.real} real agents programmed {plan.nodes - 1} remote nodes in "
                f"{settings['real agents converged in s']} s",
                flush=True,
            )
            time.sleep(min(5.0, plan.steady_s / 4))  # let start-up's own traffic settle

            print(f"  store: steady state, {plan.nodes} nodes ({plan.steady_s:g} s)", flush=True)
            steady = self._window(client, member, sims, agents, roles)
            figures["steady state"] = ctx.attempt("store/steady state", lambda: self._steady(baseline, steady))

            monitors = [FdbMonitor(ctx, agent.ns) for agent in agents]
            writes = WriteWatch(member)  # opened after the steady window, so that its stream is not counted there
            time.sleep(0.3)  # the monitors subscribe before the first change
            print(f"  store: {plan.events} joins and {plan.events} leaves", flush=True)
            figures["join/leave"] = ctx.attempt(
                "store/join-leave", lambda: self._join_leave(sims, writes, monitors, agents)
            )

            print(f"  store: {plan.starts} nodes starting at one moment", flush=True)
            figures[f"{plan.starts} simultaneous starts"] = ctx.attempt(
                "store/simultaneous starts", lambda: self._starts(client, sims, start_ns, url, workdir)
            )
            _wait_converged(agents, devices, public_ips | self._joined(sims))

            print("  store: compaction while the agents watch", flush=True)
            figures["compaction"] = ctx.attempt(
                "store/compaction",
                lambda: self._compaction(client, sims, writes, monitors, agents, devices, public_ips),
            )
        finally:
            if writes is not None:
                writes.close()
            for agent in agents:
                _stop(ctx, agent)
            sims.stop()
            client.close()
            _stop_etcd(ctx, member)
        return figures

    @staticmethod
    def _joined(sims: Simulator) -> set[str]:
        return {ip_ for ip_ in sims.owner if ip_.startswith(f"172.{JOIN_BLOCK}.")}

    # -- figure 1: steady state

    def _window(
        self, client: EtcdClient, member: EtcdMember, sims: Simulator, agents: list[Any], roles: dict[str, str]
    ) -> dict[str, Any]:
        """Counters at both ends of a steady-state window, gauges sampled every second inside it."""
        assert member.proc is not None
        etcd_pid = member.proc.pid
        pids = [a.proc.pid for a in agents]

        def ends() -> dict[str, Any]:
            # No simulated renewal in flight while etcd's counters are read (a pause of milliseconds), so
            # the window holds whole renewals and their requests on both sides.
            counts = sims.pause()
            try:
                metrics = client.metrics()
            finally:
                sims.resume()
            return {
                "metrics": metrics,
                "sims": counts,
                "sim_cpu": sims.cpu_s(),
                "etcd_cpu": _proc_cpu_s(etcd_pid),
                "etcd_tcp": _tcp_counters(etcd_pid),
                "agent_cpu": [_proc_cpu_s(p) for p in pids],
                "agent_tcp": [_tcp_counters(p) for p in pids],
                "agent_bytes": [_link_bytes(p, "eth0") for p in pids],
                "at": time.monotonic(),
            }

        first = ends()
        samples: dict[str, list[float]] = collections.defaultdict(list)
        deadline = first["at"] + self.plan.steady_s
        for _ in range(int(self.plan.steady_s) + 2):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(1.0, left))
            scrape = client.metrics()
            samples["watch streams"].append(scrape.total("etcd_debugging_mvcc_watch_stream_total"))
            samples["watchers"].append(scrape.total("etcd_debugging_mvcc_watcher_total"))
            by_role: collections.Counter = collections.Counter()
            for remote, count in _established(etcd_pid, CLIENT_PORT).items():
                by_role[roles.get(remote, "other")] += count
            for role in set(roles.values()) | {"other"}:
                samples[f"connections/{role}"].append(by_role.get(role, 0))
            samples["etcd rss"].append(_proc_rss_mib(etcd_pid))
            samples["agent rss"].extend(_proc_rss_mib(p) for p in pids)
        last = ends()
        statuses = [_agent_status(a) for a in agents]
        return {"first": first, "last": last, "samples": dict(samples), "statuses": statuses, "agents": len(agents)}

    def _steady(self, base: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
        plan = self.plan
        n_sims = plan.nodes - plan.real

        def span(w: dict[str, Any]) -> float:
            return w["last"]["at"] - w["first"]["at"]

        def requests(w: dict[str, Any]) -> dict[str, float]:
            return _delta(
                w["last"]["metrics"].by_method("grpc_server_msg_received_total"),
                w["first"]["metrics"].by_method("grpc_server_msg_received_total"),
            )

        def started(w: dict[str, Any]) -> dict[str, float]:
            return _delta(
                w["last"]["metrics"].by_method("grpc_server_started_total"),
                w["first"]["metrics"].by_method("grpc_server_started_total"),
            )

        def renewals(w: dict[str, Any]) -> float:
            return w["last"]["sims"].get("renewals", 0) - w["first"]["sims"].get("renewals", 0)

        def per_minute(counts: dict[str, float], nodes: int, seconds: float) -> dict[str, Any]:
            out = {
                m: summary([counts[m] * 60 / seconds / nodes], "req/node/min") for m in REQUEST_METHODS if counts.get(m)
            }
            out["all methods"] = summary([sum(counts.values()) * 60 / seconds / nodes], "req/node/min")
            return out

        s0, s1 = span(base), span(full)
        req0, req1 = requests(base), requests(full)
        # The simulated nodes' share of the second window: the baseline scaled by their own renewal counts.
        scale = renewals(full) / renewals(base) if renewals(base) else s1 / s0
        agents_only = {m: max(0.0, req1.get(m, 0) - req0.get(m, 0) * scale) for m in set(req0) | set(req1)}
        start0, start1 = started(base), started(full)
        agent_started = {m: max(0.0, start1.get(m, 0) - start0.get(m, 0) * scale) for m in set(start0) | set(start1)}
        first, last = full["first"], full["last"]
        cpu = [(b - a) / s1 * 100 for a, b in zip(first["agent_cpu"], last["agent_cpu"])]
        opened = [b["ActiveOpens"] - a["ActiveOpens"] for a, b in zip(first["agent_tcp"], last["agent_tcp"])]
        wire = [(b - a) / s1 for a, b in zip(first["agent_bytes"], last["agent_bytes"])]

        def grpc_bytes(w: dict[str, Any], name: str) -> float:
            return (w["last"]["metrics"].total(name) - w["first"]["metrics"].total(name)) / span(w)

        samples = full["samples"]
        return {
            "window": summary([s1], "s"),
            "requests per node per minute (all nodes)": per_minute(req1, plan.nodes, s1),
            "requests per real agent per minute": per_minute(agents_only, plan.real, s1),
            "requests per simulated node per minute (baseline window)": per_minute(req0, n_sims, s0),
            "streams and calls started per real agent per minute": {
                m: summary([v * 60 / s1 / plan.real], "/agent/min") for m, v in sorted(agent_started.items()) if v
            },
            "open watch streams": summary(samples.get("watch streams", []), "streams"),
            "open watchers": summary(samples.get("watchers", []), "watchers"),
            "watch streams started in the window": summary([start1.get("Watch", 0)], "streams"),
            "watch streams started in the window, simulated nodes only": summary([start0.get("Watch", 0)], "streams"),
            "TCP connections accepted by etcd in the window": summary(
                [last["etcd_tcp"]["PassiveOpens"] - first["etcd_tcp"]["PassiveOpens"]], "connections"
            ),
            "TCP connections accepted by etcd, simulated nodes only": summary(
                [base["last"]["etcd_tcp"]["PassiveOpens"] - base["first"]["etcd_tcp"]["PassiveOpens"]], "connections"
            ),
            "TCP connections opened per real agent in the window": summary(opened, "connections"),
            "established connections to etcd": {
                role[len("connections/") :]: summary(values, "connections")
                for role, values in sorted(samples.items())
                if role.startswith("connections/")
            },
            "etcd gRPC bytes in": summary(
                [grpc_bytes(full, "etcd_network_client_grpc_received_bytes_total")], "KiB/s", 1 / 1024
            ),
            "etcd gRPC bytes out": summary(
                [grpc_bytes(full, "etcd_network_client_grpc_sent_bytes_total")], "KiB/s", 1 / 1024
            ),
            "etcd gRPC bytes out, simulated nodes only": summary(
                [grpc_bytes(base, "etcd_network_client_grpc_sent_bytes_total")], "KiB/s", 1 / 1024
            ),
            "real agent bytes on its underlay link (in + out)": summary(wire, "KiB/s", 1 / 1024),
            "real agent CPU": summary(cpu, "%"),
            "real agent RSS": summary(samples.get("agent rss", []), "MiB"),
            "etcd CPU": summary([(last["etcd_cpu"] - first["etcd_cpu"]) / s1 * 100], "%"),
            "etcd CPU, simulated nodes only": summary(
                [(base["last"]["etcd_cpu"] - base["first"]["etcd_cpu"]) / s0 * 100], "%"
            ),
            "etcd RSS": summary(samples.get("etcd rss", []), "MiB"),
            "simulator CPU (all worker processes)": summary([(last["sim_cpu"] - first["sim_cpu"]) / s1 * 100], "%"),
            "simulated-node renewals": {
                "baseline window": int(renewals(base)),
                "window": int(renewals(full)),
                "errors so far": int(last["sims"].get("renew_errors", 0)),
                "lapsed and written again so far": int(last["sims"].get("rewritten", 0)),
            },
            "requests by method in the window": {m: int(v) for m, v in sorted(req1.items())},
            "requests by method in the baseline window": {m: int(v) for m, v in sorted(req0.items())},
            "agent status": full["statuses"],
        }

    # -- figure 2: join and leave

    def _join_leave(
        self, sims: Simulator, writes: "WriteWatch", monitors: list[Any], agents: list[Any]
    ) -> dict[str, Any]:
        delays: dict[str, tuple[list[float], list[float]]] = {"join": ([], []), "leave": ([], [])}
        missed = {"join": 0, "leave": 0}
        for index in range(self.plan.events):
            public_ip, mac, name = self._new_identity()
            for kind in ("join", "leave"):
                mark = time.time()
                answer = sims.join(public_ip, mac, name, index) if kind == "join" else sims.leave(public_ip)
                try:
                    written = writes.when(public_ip, kind == "leave", mark, answer["returned"])
                    each = _wait_every(monitors, public_ip, kind == "leave", mark, written)
                except Missed as exc:
                    missed[kind] += 1
                    _note_missed(self.ctx, f"store/{kind}", exc, agents)
                    continue
                delays[kind][0].append(max(each))
                delays[kind][1].extend(each)
        return {
            "events": self.plan.events,
            "agents": len(monitors),
            "from": "the lease write: etcd's event on the bench's own watch, or the writer's call "
            "returning if that was earlier",
            "join": {**_events_figure(*delays["join"]), f"not everywhere within {EVENT_TIMEOUT:g} s": missed["join"]},
            "leave": {
                **_events_figure(*delays["leave"]),
                f"not everywhere within {EVENT_TIMEOUT:g} s": missed["leave"],
            },
        }

    def _new_identity(self) -> tuple[str, str, str]:
        identity = _sim_identity(self.events, block=JOIN_BLOCK)
        self.events += 1
        return identity

    # -- figure 3: simultaneous starts

    def _starts(self, client: EtcdClient, sims: Simulator, ns: str, url: str, workdir: str) -> dict[str, Any]:
        plan = self.plan
        nodes = [_sim_identity(i, block=START_BLOCK) for i in range(plan.starts)]
        inbox: queue.Queue = queue.Queue()
        read_end, write_end = os.pipe()
        workers: list[Worker] = []
        try:
            try:
                for i in range(plan.start_workers):
                    workers.append(
                        Worker(
                            self.ctx,
                            ns,
                            "start",
                            url,
                            plan.ttl,
                            os.path.join(workdir, f"start{i}.log"),
                            inbox=inbox,
                            barrier_fd=read_end,
                        )
                    )
            finally:
                os.close(read_end)
            for i, worker in enumerate(workers):  # the nodes give up a little before the bench stops waiting
                worker.send({"nodes": nodes[i :: len(workers)], "give_up_after_s": plan.start_timeout - 10})
            for worker in workers:
                worker.receive(WORKER_START_TIMEOUT)  # {"ready": n}: threads waiting at the barrier
            lapsed = sims.counts().get("rewritten", 0)
            before = client.metrics()
            released = time.time()
            os.close(write_end)  # the barrier: every worker's read returns at once
            write_end = -1
            done: dict[str, dict[str, Any]] = {}
            deadline = time.monotonic() + plan.start_timeout
            for _ in range(plan.starts * 4 + 100):
                if len(done) == plan.starts or time.monotonic() >= deadline:
                    break
                try:
                    worker, doc = inbox.get(timeout=max(0.01, min(1.0, deadline - time.monotonic())))
                except queue.Empty:
                    dead = [w for w in workers if w.proc.poll() is not None]
                    if dead:
                        raise RuntimeError(f"a starting-node worker exited:\n{dead[0]._log_tail()}") from None
                    continue
                if "done" in doc:
                    done[doc["done"]] = doc
            after = client.metrics()
            lapsed = sims.counts().get("rewritten", 0) - lapsed
            leased = {ip_: doc for ip_, doc in done.items() if "subnet" in doc}
            failures = [doc["failed"] for doc in done.values() if "failed" in doc]
            writes = _delta(
                after.by_method("grpc_server_msg_received_total"), before.by_method("grpc_server_msg_received_total")
            )
            subnets = collections.Counter(doc["subnet"] for doc in leased.values())
            duplicates = sum(count - 1 for count in subnets.values() if count > 1)
            disagree = self._check_in_store(client, leased)
            times = [doc["at"] - released for doc in leased.values()]
            all_leased = max(times) if len(leased) == plan.starts else None
            figure = {
                "nodes": plan.starts,
                "processes": len(workers),
                "give up after s": plan.start_timeout - 10,
                "leased": len(leased),
                "failed": len(failures),
                "not done in time": plan.starts - len(done),
                "all leased": summary([all_leased] if all_leased is not None else [], "s"),
                "time to lease": summary(times, "s"),
                "store writes per node": summary(
                    [sum(writes.get(m, 0) for m in WRITE_METHODS) / plan.starts], "writes/node"
                ),
                "writes by method": {m: int(writes.get(m, 0)) for m in WRITE_METHODS},
                "requests by method": {m: int(v) for m, v in sorted(writes.items())},
                # Each successful acquire_lease() ends with one claim Txn that took a subnet; the others lost.
                "claim transactions that took nothing": summary(
                    [max(0.0, writes.get("Txn", 0) - len(leased)) / plan.starts], "txns/node"
                ),
                "attempts failed with a store error, retried 1 s later": sum(d.get("errors", 0) for d in done.values()),
                "duplicate subnets": duplicates + disagree,
                "first failures": failures[:3],
                "simulated leases that lapsed meanwhile (renewed too late, written again)": lapsed,
            }
            for worker in workers:
                worker.send({"op": "release"})
            for worker in workers:
                worker.receive(60.0)
            return figure
        finally:
            if write_end >= 0:
                os.close(write_end)
            for worker in workers:
                worker.stop()

    @staticmethod
    def _check_in_store(client: EtcdClient, leased: dict[str, dict[str, Any]]) -> int:
        """Starting nodes whose subnet the store shows leased to someone else."""
        import netns
        from ipam.cluster import list_leases, open_store

        with netns.enter(client.member.ns):
            store = open_store(f"etcd://{client.member.endpoint}", timeout=10.0)
        try:
            holders = {lease.subnet: lease.public_ip for lease in list_leases(store)[0]}
        finally:
            store.close()
        return sum(1 for ip_, doc in leased.items() if holders.get(doc["subnet"]) != ip_)

    # -- figure 4: compaction

    def _compaction(
        self,
        client: EtcdClient,
        sims: Simulator,
        writes: "WriteWatch",
        monitors: list[Any],
        agents: list[Any],
        devices: dict[str, str],
        public_ips: set[str],
    ) -> dict[str, Any]:
        delays: list[float] = []
        missed = 0
        live: list[str] = []
        compacted_at = 0
        for step in range(self.plan.compaction_changes):
            leaving = step % 2 == 1 and bool(live)
            mark = time.time()
            if leaving:
                public_ip = live.pop(0)
                answer = sims.leave(public_ip)
            else:
                public_ip, mac, name = self._new_identity()
                answer = sims.join(public_ip, mac, name, step)
                live.append(public_ip)
            if step == 0:  # compact right behind the first change, while the agents may still be on it
                compacted_at = client.revision()
                client.compact(compacted_at)
            try:
                written = writes.when(public_ip, leaving, mark, answer["returned"])
                delays += _wait_every(monitors, public_ip, leaving, mark, written)
            except Missed as exc:
                missed += 1
                _note_missed(self.ctx, "store/compaction", exc, agents)
        expected = public_ips | set(live) | self._joined(sims)
        mismatched = []
        try:
            _wait_converged(agents, devices, expected, timeout=EVENT_TIMEOUT)
        except RuntimeError:
            mismatched = [a.ns for a in agents if _fdb_dsts(a.ns, devices[a.ns]) != expected - {a.public_ip}]
        figure = {
            "changes": self.plan.compaction_changes,
            "agents": len(agents),
            "compacted at revision": compacted_at,
            "change to programmed on every agent": summary(delays, "ms", 1000),
            "lost updates": missed,
            "agents whose FDB differs from the store at the end": len(mismatched),
        }
        return figure


def _cluster_init(ns: str, url: str) -> None:
    """`pycni cluster init` from inside namespace ``ns`` (etcd listens on addresses there only)."""
    from .overlay import _pycni_command

    done = subprocess.run(
        [IP, "netns", "exec", ns, *_pycni_command(), "cluster", "init", "--store", url, "--network", CLUSTER_NETWORK],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pycni cluster init failed: {(done.stderr or done.stdout).strip()}")


def _etcd_version() -> str:
    try:
        done = subprocess.run([ETCD, "--version"], capture_output=True, text=True, timeout=10)
    except OSError:
        return "?"
    match = re.search(r"etcd Version:\s*(\S+)", done.stdout)
    return match.group(1) if match else "?"


class Missed(RuntimeError):
    """A change that did not reach every agent in time; ``namespaces`` names the agents it missed."""

    def __init__(self, message: str, namespaces: list[str]) -> None:
        super().__init__(message)
        self.namespaces = namespaces


def _wait_every(
    monitors: list[Any], public_ip: str, deleted: bool, after: float, written: float, timeout: float = EVENT_TIMEOUT
) -> list[float]:
    """Seconds from ``written`` until each monitor saw the FDB entry to ``public_ip`` added (deleted)
    after ``after``; Missed (naming the agents) after ``timeout``."""
    stamps: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.01) + 2):
        for monitor in monitors:
            if monitor.ns not in stamps:
                stamp = monitor.first(public_ip, deleted, after)
                if stamp is not None:
                    stamps[monitor.ns] = stamp
        if len(stamps) == len(monitors) or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    missing = [m.ns for m in monitors if m.ns not in stamps]
    if missing:
        raise Missed(
            f"{len(missing)} of {len(monitors)} agents did not {'delete' if deleted else 'add'} the FDB "
            f"entry to {public_ip} within {timeout:g} s",
            missing,
        )
    return [stamp - written for stamp in stamps.values()]


def _note_missed(ctx: Context, label: str, exc: Missed, agents: list[Any]) -> None:
    from .overlay import _log_tail

    tails = "".join(
        f"\n    {a.ns}: " + _log_tail(a, 4).strip().replace("\n", "\n      ") for a in agents if a.ns in exc.namespaces
    )
    ctx.note(f"{label}: {exc}; their logs end:{tails}")


# ---- the 3-member variant: one member partitioned --------------------------------------------------


def _partition(ctx: Context, plan: Plan) -> dict[str, Any]:
    from .overlay import FdbMonitor, Underlay, _new_agent, _start, _stop, _wait_ready

    underlay = Underlay(ctx)
    workdir = ctx.cleanup.directory("store3")
    hosts = [underlay.host("stetcd") for _ in range(3)]
    initial = ",".join(f"m{i}=http://{ip_}:{PEER_PORT}" for i, (_ns, ip_) in enumerate(hosts))
    members = [
        _start_etcd(ctx, workdir, ns, ip_, name=f"m{i}", initial=initial, token="pycni-bench-3")
        for i, (ns, ip_) in enumerate(hosts)
    ]
    clients = [EtcdClient(m) for m in members]
    agents: list[Any] = []
    sims: Simulator | None = None
    writes: WriteWatch | None = None
    try:
        _wait_healthy(members, clients)
        url = "etcd://" + ",".join(m.endpoint for m in members)  # the agents: all three, m0 first
        majority = "etcd://" + ",".join(m.endpoint for m in members[1:])  # the writer: m1 and m2
        _cluster_init(members[1].ns, majority)
        sim_ns, _sim_ip = underlay.host("stsim")
        sims = Simulator(ctx, sim_ns, majority, plan.ttl, 1, workdir)
        agents = [_new_agent(ctx, workdir, *underlay.host("stnode")) for _ in range(plan.real)]
        for agent in agents:
            _start(ctx, agent, url, ("--lease-ttl", str(plan.ttl), "--node-name", f"real-{agent.public_ip}"))
        _wait_ready(agents, timeout=120.0)
        devices = {agent.ns: agent.state().vxlan_device for agent in agents}
        _wait_converged(agents, devices, {a.public_ip for a in agents})
        monitors = [FdbMonitor(ctx, agent.ns) for agent in agents]
        writes = WriteWatch(members[1])  # on the majority side, where the changes are written
        time.sleep(0.3)

        cut = members[0]
        peers = [m.ip for m in members if m is not cut]
        for peer in peers:  # m0 can no longer reach m1 and m2 (nor answer them); clients still reach it
            topology.ip(cut.ns, "route", "add", "blackhole", f"{peer}/32")
        cut_at = time.monotonic()
        delays, missed, live = [], 0, []
        for step in range(plan.partition_changes):
            leaving = step % 2 == 1 and bool(live)
            mark = time.time()
            if leaving:
                public_ip = live.pop(0)
                answer = sims.leave(public_ip)
            else:
                public_ip, mac, name = _sim_identity(step, block=PARTITION_BLOCK)
                answer = sims.join(public_ip, mac, name, 0)
                live.append(public_ip)
            try:
                written = writes.when(public_ip, leaving, mark, answer["returned"])
                delays += _wait_every(monitors, public_ip, leaving, mark, written, FAILOVER_TIMEOUT)
            except Missed as exc:
                missed += 1
                _note_missed(ctx, "store/partition", exc, agents)
        partitioned_s = time.monotonic() - cut_at
        for peer in peers:
            topology.ip(cut.ns, "route", "del", "blackhole", f"{peer}/32")
        healed_delays: list[float] = []
        healed_missed = 0
        public_ip, mac, name = _sim_identity(99, block=PARTITION_BLOCK)
        mark = time.time()
        answer = sims.join(public_ip, mac, name, 0)
        try:
            written = writes.when(public_ip, False, mark, answer["returned"])
            healed_delays = _wait_every(monitors, public_ip, False, mark, written, FAILOVER_TIMEOUT)
        except Missed as exc:
            healed_missed = 1
            _note_missed(ctx, "store/partition (healed)", exc, agents)
        figure = {
            "members": 3,
            "agents": len(agents),
            "changes while partitioned": plan.partition_changes,
            "partitioned for": summary([partitioned_s], "s"),
            "change to programmed on every agent (partitioned)": summary(delays, "ms", 1000),
            "lost updates (partitioned)": missed,
            "change to programmed on every agent (healed)": summary(healed_delays, "ms", 1000),
            "lost updates (healed)": healed_missed,
            "agent status": [_agent_status(a) for a in agents],
        }
        return figure
    finally:
        if writes is not None:
            writes.close()
        for agent in agents:
            _stop(ctx, agent)
        if sims is not None:
            sims.stop()
        for client in clients:
            client.close()
        for member in members:
            _stop_etcd(ctx, member)


# ---- against the targets --------------------------------------------------------------------------


def _median(figure: Any) -> float | None:
    return figure.get("median") if isinstance(figure, dict) else None


def _print_against_targets(figures: dict[str, Any], plan: Plan) -> None:
    def fmt(value: float | None, unit: str = "") -> str:
        return "-" if value is None else f"{value:.3g}{unit}"

    lines = []
    steady = figures.get("steady state") or {}
    if "window" in steady:
        per_agent = steady["requests per real agent per minute"]
        methods = ", ".join(f"{m} {fmt(_median(v))}" for m, v in per_agent.items() if m != "all methods")
        lines.append(
            f"steady state, per real agent per minute: {methods or 'nothing'}; open watch streams "
            f"{fmt(_median(steady['open watch streams']))} for {plan.real} agents; watch streams started "
            f"{fmt(_median(steady['watch streams started in the window']))} and TCP connections opened per "
            f"agent {fmt(_median(steady['TCP connections opened per real agent in the window']))} in "
            f"{fmt(_median(steady['window']))} s"
        )
        lines.append(f"  target: {TARGETS['steady state']}")
    joins = figures.get("join/leave") or {}
    if "join" in joins:
        lines.append(
            "join / leave p99 (every agent programmed): "
            f"{fmt(_median(joins['join'].get('p99, every agent programmed')), ' ms')} / "
            f"{fmt(_median(joins['leave'].get('p99, every agent programmed')), ' ms')} at {plan.nodes} nodes"
        )
        lines.append(f"  target: {TARGETS['join/leave']}")
    starts = figures.get(f"{plan.starts} simultaneous starts") or {}
    if "leased" in starts:
        leased = (
            f"all leased in {fmt(_median(starts['all leased']), ' s')}"
            if "median" in starts["all leased"]
            else f"{starts['leased']} leased, {starts['failed']} gave up, {starts['not done in time']} not done"
        )
        lines.append(
            f"{plan.starts} simultaneous starts: {leased}, "
            f"{starts['attempts failed with a store error, retried 1 s later']} store errors retried, "
            f"{fmt(_median(starts['store writes per node']))} writes per node, "
            f"{starts['duplicate subnets']} duplicate subnets"
        )
        lines.append(f"  target: {TARGETS['simultaneous starts']}")
    compaction = figures.get("compaction") or {}
    if "lost updates" in compaction:
        lines.append(
            f"compaction: {compaction['lost updates']} lost updates, "
            f"{compaction['agents whose FDB differs from the store at the end']} agents differ from the store"
        )
        lines.append(f"  target: {TARGETS['compaction']}")
    partition = figures.get("partition") or {}
    if "lost updates (partitioned)" in partition:
        lines.append(
            f"partition: {partition['lost updates (partitioned)']} lost updates while partitioned, "
            f"{partition['lost updates (healed)']} after healing"
        )
        lines.append(f"  target: {TARGETS['partition']}")
    if lines:
        print("  store: the figures beside the issue's targets (stated, not enforced):")
        for line in lines:
            print(f"    {line}")


if __name__ == "__main__":
    worker_main(sys.argv[1:])
