"""`pycni agent --metrics-address HOST:PORT`: /metrics (Prometheus text format) and /healthz.

The endpoint listens on a socket opened when the agent starts, so in the
agent's own network namespace, and is served by a thread of its own (one
more per connection, at most ``MAX_CONNECTIONS`` at once: one more is closed
unanswered). Each connection must send its request and take its answer
within ``CONNECTION_DEADLINE`` seconds in all, however slowly it trickles:
a slow or stuck client holds one slot for that long and never the others.
One request per connection (HTTP/1.0); GET and HEAD only.

- ``/metrics``: what the agent served (per plugin, command and outcome, with
  latency histograms), what it did not serve and why, what it is doing now;
  with overlay mode the node's lease, reconciles, store and watch state and
  programmed remote nodes, read from ``OverlayNode.status()``; and the
  process's own figures (CPU, memory, descriptors). Rendered by
  ``prometheus_client`` (OpenMetrics when the scraper asks for it).
- ``/healthz``: ``200 ok`` or ``503`` with a one-line reason. Without overlay
  mode: 200 while the agent serves. With it also: the store answered the last
  time the node asked it, the node holds a valid lease, and the last completed
  reconcile is fresh (``reconcile_max_age``).

The overlay node's status is read on a helper thread, one call at a time, and
waited for at most ``STATUS_WAIT`` seconds: a node stuck behind its lock makes
/healthz say so instead of hanging.

Standard library only at import time: ``prometheus_client`` is imported when
the endpoint starts, so neither `pycni agent --help` nor a plugin pays for it.
"""

from __future__ import annotations

import io
import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

MAX_CONNECTIONS = 8  # connections served at once; one more is closed unanswered
CONNECTION_DEADLINE = 5.0  # seconds a client has to send its request and take the answer, in all
STATUS_WAIT = 2.0  # longest wait for the overlay node's status
RECONCILE_SLACK = 15.0  # a reconcile is stale after max(3 intervals, 1 interval + this)
INF = float("inf")
WATCH_STATES = ("not started", "streaming", "reconnecting", "re-listing")
LEASE_STATES = ("valid", "lapsed", "lost")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv4) or ``[ADDR]:PORT`` (IPv6) as (host, port); ValueError saying what is wrong."""
    bracketed = text.startswith("[")
    if bracketed:
        host, sep, port_text = text[1:].partition("]:")
    else:
        host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r}: give HOST:PORT, e.g. 127.0.0.1:9917 or [::1]:9917")
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        raise ValueError(f"{text!r}: HOST must be an IP address (an IPv6 one in brackets: [::1]:9917)") from None
    if address.version == 6 and not bracketed:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets: [{host}]:{port_text}")
    if address.version == 4 and bracketed:
        raise ValueError(f"{text!r}: brackets are for IPv6 addresses only")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: PORT must be a number from 1 to 65535")
    return host, int(port_text)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# ---- what the endpoint reads ------------------------------------------------------------------


class _Call:
    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class _OneAtATime:
    """``fn()`` on a helper thread, one call at a time; callers arriving meanwhile share the call in
    flight and wait for it at most ``wait`` seconds (TimeoutError after that: the call goes on)."""

    def __init__(self, fn: Callable[[], Any], wait: float) -> None:
        self._fn = fn
        self._wait = wait
        self._lock = threading.Lock()
        self._pending: _Call | None = None

    def __call__(self) -> Any:
        with self._lock:
            call = self._pending
            if call is None:
                call = _Call()
                # Raises (no thread to be had: resource limits) with nothing pending left behind.
                threading.Thread(target=self._run, args=(call,), daemon=True, name="pycni-metrics-status").start()
                self._pending = call
        if not call.done.wait(self._wait):
            raise TimeoutError(f"no answer within {self._wait:g} s")
        if call.error is not None:
            raise call.error
        return call.value

    def _run(self, call: _Call) -> None:
        try:
            call.value = self._fn()
        except BaseException as exc:  # handed to the callers
            call.error = exc
        finally:
            with self._lock:
                self._pending = None
            call.done.set()


@dataclass
class Snapshot:
    """The overlay node's status as one scrape or health check sees it."""

    status: dict[str, Any] | None  # None: no overlay mode, or the status could not be had
    problem: str = ""  # why not (overlay mode), or why the node's loop stopped


class Sources:
    """The agent and (overlay mode) the node, as the endpoint reads them.

    ``overlay_status``: ``OverlayNode.status``; ``overlay_failure``: why the
    node's reconcile loop ended ("" while it runs); ``reconcile_max_age``:
    seconds after which the last completed reconcile is stale.
    """

    def __init__(
        self,
        agent: Any,
        overlay_status: Callable[[], dict[str, Any]] | None = None,
        overlay_failure: Callable[[], str] | None = None,
        reconcile_max_age: float = 45.0,
        status_wait: float = STATUS_WAIT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.agent = agent
        self.overlay = overlay_status is not None
        self._status = _OneAtATime(overlay_status, status_wait) if overlay_status is not None else None
        self._failure = overlay_failure or (lambda: "")
        self.reconcile_max_age = reconcile_max_age
        self.clock = clock

    def snapshot(self) -> Snapshot:
        if self._status is None:
            return Snapshot(None)
        failure = self._failure()
        try:
            status = self._status()
        except TimeoutError as exc:
            return Snapshot(None, f"the overlay node did not report its status ({exc})")
        except Exception as exc:
            return Snapshot(None, f"the overlay node cannot report its status: {_one_line(exc)}")
        if not isinstance(status, dict):
            return Snapshot(None, "the overlay node reported no status")
        return Snapshot(status, f"the overlay reconcile loop stopped: {failure}" if failure else "")

    def health(self, snap: Snapshot | None = None) -> tuple[bool, str]:
        """(healthy, "ok" or every reason it is not, in one line)."""
        agent = self.agent
        reasons = []
        if not agent.serving:
            reasons.append("the agent is stopping" if agent.stopping else "the agent is starting")
        if self.overlay:
            snap = snap or self.snapshot()
            if snap.problem:
                reasons.append(snap.problem)
            if snap.status is not None:
                reasons += overlay_problems(snap.status, self.clock(), self.reconcile_max_age)
        return (not reasons, "; ".join(reasons) or "ok")


def overlay_problems(status: dict[str, Any], now: float, reconcile_max_age: float) -> list[str]:
    """What keeps an overlay node from being healthy, from its ``status()`` ([]: nothing)."""
    out = []
    if not status.get("storeReachable"):
        error = _one_line(status.get("storeError") or "")
        out.append(f"the cluster store did not answer: {error}" if error else "the cluster store has not answered yet")
    lease = status.get("lease")
    if lease is None:
        out.append("no subnet lease yet")
    elif lease != "valid":
        problem = _one_line(status.get("leaseProblem") or "")
        out.append(f"the subnet lease of {status.get('subnet')} is {lease}" + (f": {problem}" if problem else ""))
    last = status.get("lastReconcile")
    if not isinstance(last, (int, float)):
        out.append("no reconcile has completed yet")
    elif now - last > reconcile_max_age:
        out.append(f"the last reconcile completed {now - last:.0f} s ago (stale after {reconcile_max_age:g} s)")
    return out


def reconcile_max_age(reconcile_interval: float) -> float:
    """When a node that reconciles every ``reconcile_interval`` seconds is overdue: three intervals, and at
    least one interval plus the time a store outage may hold the loop up (back-off, one request timeout)."""
    return max(3 * reconcile_interval, reconcile_interval + RECONCILE_SLACK)


def _one_line(value: Any) -> str:
    text = value if isinstance(value, str) else (str(value) or type(value).__name__)
    return " ".join(text.split())


# ---- /metrics ------------------------------------------------------------------------------------


class AgentCollector:
    """A prometheus_client collector: every figure is read when scraped."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def describe(self) -> list[Any]:
        return []  # nothing fixed to register: the families depend on the mode and on what was served

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        agent = self.sources.agent
        yield InfoMetricFamily("pycni_agent", "The agent's pycni version.", value={"version": str(agent.version)})
        yield GaugeMetricFamily(
            "pycni_agent_start_time_seconds", "When the agent started (Unix time).", value=agent.started_at
        )
        yield GaugeMetricFamily(
            "pycni_agent_serving", "1 while the agent accepts requests on its socket.", value=1 if agent.serving else 0
        )

        requests = CounterMetricFamily(
            "pycni_agent_requests",
            "CNI requests the agent ran warm, by plugin type, command and outcome "
            "(error: the plugin answered a CNI error).",
            labels=["plugin", "command", "outcome"],
        )
        latency = HistogramMetricFamily(
            "pycni_agent_request_duration_seconds",
            "Time from a request's arrival to its result, warm requests.",
            labels=["plugin", "command"],
        )
        for (plugin, command), figures in sorted(agent.stats.histograms().items()):
            requests.add_metric([plugin, command, "success"], figures["count"] - figures["errors"])
            requests.add_metric([plugin, command, "error"], figures["errors"])
            latency.add_metric(
                [plugin, command], [(_le(bound), count) for bound, count in figures["buckets"]], figures["sum"]
            )
        yield requests
        yield latency

        counts = agent.stats.counts()
        yield CounterMetricFamily(
            "pycni_agent_requests_served", "Requests the agent ran warm (all plugins).", value=counts.get("served", 0)
        )
        not_served = CounterMetricFamily(
            "pycni_agent_requests_not_served",
            "Requests the agent did not run warm, by reason. refused (another "
            "pycni version, unknown plugin, oversized), declined (a namespace or executable the agent may not "
            "use) and over_capacity (--max-connections): the caller ran the plugin itself (cold). busy (no free "
            "slot within --queue-timeout) and timed_out (over --request-timeout; the work went on): the caller "
            "was told to try again later. denied (not root) and bad_request: nothing ran.",
            labels=["reason"],
        )
        for reason, key in (
            ("refused", "refused"),
            ("declined", "declined"),
            ("over_capacity", "over_capacity"),
            ("busy", "busy"),
            ("timed_out", "timed_out"),
            ("denied", "denied"),
            ("bad_request", "bad_requests"),
        ):
            not_served.add_metric([reason], counts.get(key, 0))
        yield not_served

        load = agent.load()
        yield GaugeMetricFamily("pycni_agent_requests_in_flight", "Requests running now.", value=load["in_flight"])
        yield GaugeMetricFamily(
            "pycni_agent_requests_queued", "Requests waiting for a free slot now.", value=load["queued"]
        )
        yield GaugeMetricFamily("pycni_agent_connections", "Socket connections open now.", value=load["connections"])
        yield GaugeMetricFamily(
            "pycni_agent_max_concurrency",
            "Requests served at once (--max-concurrency).",
            value=agent.options.max_concurrency,
        )

        snap = self.sources.snapshot()
        healthy, _reason = self.sources.health(snap)
        yield GaugeMetricFamily("pycni_agent_healthy", "1 when /healthz answers 200.", value=1 if healthy else 0)
        if self.sources.overlay:
            yield GaugeMetricFamily(
                "pycni_overlay_status_available",
                "1 when the overlay node reported its status for this scrape.",
                value=0 if snap.status is None else 1,
            )
            if snap.status is not None:
                yield from overlay_families(snap.status)


def overlay_families(status: dict[str, Any]) -> Iterator[Any]:
    """The overlay node's figures as metric families (from ``OverlayNode.status()``)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

    def number(key: str, default: float = 0) -> float:
        value = status.get(key)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default

    yield InfoMetricFamily(
        "pycni_overlay",
        "This node in the overlay.",
        value={
            "node": str(status.get("nodeName") or ""),
            "public_ip": str(status.get("publicIP") or ""),
            "network": str(status.get("network") or ""),
            "vni": str(status.get("vni") or ""),
            "vxlan_device": str(status.get("vxlanDevice") or ""),
        },
    )
    yield GaugeMetricFamily(
        "pycni_overlay_ready",
        "1 once the node has programmed its entries (and until it stops).",
        value=1 if status.get("ready") else 0,
    )

    lease = status.get("lease")
    states = GaugeMetricFamily(
        "pycni_overlay_lease_state", "1 for the state the node's subnet lease is in.", labels=["state"]
    )
    for state in LEASE_STATES + ((lease,) if isinstance(lease, str) and lease not in LEASE_STATES else ()):
        states.add_metric([state], 1 if state == lease else 0)
    yield states
    subnets = [s for s in status.get("subnets") or [] if isinstance(s, str)]
    yield GaugeMetricFamily(
        "pycni_overlay_leases_held",
        "Pod subnets this node holds a valid lease of (one per address family).",
        value=len(subnets) if lease == "valid" else 0,
    )
    leased = GaugeMetricFamily(
        "pycni_overlay_lease_subnet",
        "The pod subnets this node uses (1 while the lease is valid, 0 while it is lapsed or lost).",
        labels=["subnet"],
    )
    for subnet in subnets:
        leased.add_metric([subnet], 1 if lease == "valid" else 0)
    yield leased
    if isinstance(status.get("leaseExpires"), (int, float)) and status["leaseExpires"]:
        yield GaugeMetricFamily(
            "pycni_overlay_lease_expiry_timestamp_seconds",
            "When the store drops the lease unless it is renewed (Unix time).",
            value=status["leaseExpires"],
        )

    yield CounterMetricFamily(
        "pycni_overlay_reconciles",
        "Full reconciles completed (start, re-lists, periodic kernel checks, lost notifications).",
        value=number("reconciles"),
    )
    if isinstance(status.get("lastReconcile"), (int, float)):
        yield GaugeMetricFamily(
            "pycni_overlay_last_reconcile_timestamp_seconds",
            "When the last full reconcile completed (Unix time).",
            value=status["lastReconcile"],
        )
    durations = status.get("reconcileDuration")
    if isinstance(durations, dict) and isinstance(durations.get("buckets"), list):
        # {"count": n, "sum": seconds, "buckets": [[upper bound, cumulative count], ...]}, +Inf implied by count
        buckets = [(float(bound), int(count)) for bound, count in durations["buckets"] if float(bound) != INF]
        histogram = HistogramMetricFamily("pycni_overlay_reconcile_duration_seconds", "How long full reconciles took.")
        histogram.add_metric(
            [],
            [(_le(bound), count) for bound, count in buckets]
            + [("+Inf", int(durations.get("count", buckets[-1][1] if buckets else 0)))],
            float(durations.get("sum", 0.0)),
        )
        yield histogram
    yield CounterMetricFamily(
        "pycni_overlay_store_events", "Store events applied one lease at a time.", value=number("events")
    )
    yield CounterMetricFamily(
        "pycni_overlay_kernel_changes", "FDB, neighbour and route entries written.", value=number("changes")
    )
    yield CounterMetricFamily(
        "pycni_overlay_device_repairs",
        "Times a device attribute had drifted and was set again.",
        value=number("repairs"),
    )
    yield CounterMetricFamily(
        "pycni_overlay_entry_repairs",
        "Entries set right after a netlink notification showed them changed.",
        value=number("entryRepairs"),
    )

    store = status.get("store") if isinstance(status.get("store"), dict) else {}
    yield GaugeMetricFamily(
        "pycni_overlay_store_reachable",
        "1 when the last request to the cluster store succeeded.",
        value=1 if status.get("storeReachable") else 0,
    )
    yield CounterMetricFamily(
        "pycni_overlay_store_errors",
        "Failed store requests and watch interruptions.",
        value=store.get("errors", 0) if isinstance(store.get("errors"), int) else 0,
    )
    yield CounterMetricFamily(
        "pycni_overlay_store_relists",
        "Full re-lists of the leases (after start).",
        value=store.get("relists", 0) if isinstance(store.get("relists"), int) else 0,
    )
    yield GaugeMetricFamily(
        "pycni_overlay_store_revision", "The store revision the node's view is at.", value=number("storeRevision")
    )
    watch = store.get("watch")
    watch_state = GaugeMetricFamily(
        "pycni_overlay_store_watch", "1 for the state the node's store watch is in.", labels=["state"]
    )
    for state in WATCH_STATES + ((watch,) if isinstance(watch, str) and watch not in WATCH_STATES else ()):
        watch_state.add_metric([state.replace(" ", "_").replace("-", "_")], 1 if state == watch else 0)
    yield watch_state
    client = store.get("requests") if isinstance(store.get("requests"), dict) else {}
    operations = client.get("requests") if isinstance(client.get("requests"), dict) else {}
    asked = CounterMetricFamily(
        "pycni_overlay_store_requests", "Requests the node's store client sent, by operation.", labels=["operation"]
    )
    for operation, count in sorted(operations.items()):
        if isinstance(count, int):
            asked.add_metric([str(operation)], count)
    yield asked

    yield GaugeMetricFamily(
        "pycni_overlay_remote_nodes", "Other nodes whose entries this node has programmed.", value=number("remotes")
    )
    remotes = status.get("remoteNodes")
    yield GaugeMetricFamily(
        "pycni_overlay_remote_subnets",
        "Remote pod subnets programmed (a node per address family).",
        value=len(remotes) if isinstance(remotes, list) else 0,
    )
    skipped, rejected = status.get("skipped"), status.get("rejectedEntries")
    yield GaugeMetricFamily(
        "pycni_overlay_skipped_leases",
        "Leases read but not programmed (conflicts, foreign backends).",
        value=len(skipped) if isinstance(skipped, list) else 0,
    )
    yield GaugeMetricFamily(
        "pycni_overlay_rejected_store_entries",
        "Store entries that are no acceptable lease.",
        value=len(rejected) if isinstance(rejected, list) else 0,
    )


def _le(bound: float) -> str:
    return "+Inf" if bound == INF else repr(float(bound))


def registry_for(sources: Sources) -> Any:
    """A registry of its own (never the process-global one) with the agent's and the process's figures."""
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(sources))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


# ---- the HTTP side -----------------------------------------------------------------------------


class _DeadlineReader(io.RawIOBase):
    """Reads from the socket until the connection's deadline, however the bytes trickle in."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _DeadlineWriter:
    """Writes to the socket until the connection's deadline (a client that does not read is cut off)."""

    closed = False

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def write(self, data: bytes) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the client did not take the answer in time")
        self._sock.settimeout(left)
        self._sock.sendall(data)  # the timeout bounds the whole call
        return len(data)

    def flush(self) -> None:
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "pycni-agent"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection

    def setup(self) -> None:
        self.connection = self.request
        deadline = time.monotonic() + self.server.endpoint.deadline
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline), 8192)
        self.wfile = _DeadlineWriter(self.connection, deadline)  # type: ignore[assignment]

    def finish(self) -> None:
        self.rfile.close()

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        self._answer(body_wanted=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body_wanted=False)

    def _answer(self, body_wanted: bool) -> None:
        path = self.path.partition("?")[0]
        endpoint = self.server.endpoint
        if path == "/metrics":
            code, content_type, body = endpoint.metrics(self.headers.get("Accept"))
        elif path == "/healthz":
            healthy, reason = endpoint.sources.health()
            code, content_type, body = (200 if healthy else 503), "text/plain; charset=utf-8", reason + "\n"
        else:
            code, content_type, body = 404, "text/plain; charset=utf-8", "not found: ask for /metrics or /healthz\n"
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body_wanted:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        self.server.endpoint.log.debug("metrics endpoint: %s %s", self.address_string(), format % args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 32

    def __init__(self, sockaddr: tuple[Any, ...], family: int, endpoint: MetricsEndpoint) -> None:
        self.address_family = family
        self.endpoint = endpoint
        self._slots = threading.BoundedSemaphore(endpoint.max_connections)
        super().__init__(sockaddr, _Handler)

    def server_bind(self) -> None:
        # Not HTTPServer's: it resolves the address's name (a DNS query, maybe a hang, at boot).
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.endpoint.turned_away()
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        self.endpoint.log.debug(
            "metrics endpoint: a connection from %s ended: %s", client_address[0], _one_line(exc) if exc else "?"
        )


class MetricsEndpoint:
    """/metrics and /healthz on ``host:port``: the socket is bound when this is made (in the namespace of
    the calling thread), ``start()`` serves it on a thread of its own, ``close()`` stops it."""

    def __init__(
        self,
        host: str,
        port: int,
        sources: Sources,
        log: logging.Logger | None = None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        deadline: float = CONNECTION_DEADLINE,
    ) -> None:
        self.sources = sources
        self.log = log or logging.getLogger("pycni.agent.metrics")
        self.max_connections = max_connections
        self.deadline = deadline
        self.registry = registry_for(sources)
        self._turned_away_logged = 0.0
        family, _type, _proto, _name, sockaddr = socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST | socket.AI_PASSIVE
        )[0]
        self._server = _HTTPServer(sockaddr, family, self)
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self._server.server_address[:2]
        return format_address(str(host), int(port))

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.5}, daemon=True, name="pycni-metrics"
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
            self._thread = None
        self._server.server_close()

    def metrics(self, accept: str | None) -> tuple[int, str, bytes]:
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        try:
            return 200, content_type, encoder(self.registry)
        except Exception as exc:  # a figure that cannot be read must not take the endpoint down
            self.log.warning("metrics endpoint: cannot render the metrics: %s", _one_line(exc))
            return 500, "text/plain; charset=utf-8", f"cannot render the metrics: {_one_line(exc)}\n".encode()

    def turned_away(self) -> None:
        now = time.monotonic()
        if now - self._turned_away_logged > 60:
            self._turned_away_logged = now
            self.log.warning("metrics endpoint: %d connections open; closing more unanswered", self.max_connections)
