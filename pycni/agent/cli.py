"""`pycni agent`: the resident per-node process behind the plugin shims (and the overlay's node agent)."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import click

from pycni.overlay.options import OverlayOptions, from_flags, overlay_flags
from pycni.storeopts import etcd_options, tls_files

from .protocol import BIN_DIRS_RECORD_SUFFIX, DEFAULT_CNI_BIN_DIR, DEFAULT_SOCKET

LOG_LEVELS = ("debug", "info", "warning", "error")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _logger(log_file: str | None, level: str) -> logging.Logger:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s pycni-agent[%(process)d] %(levelname)s %(name)s: %(message)s"))
    # "pycni" is the parent of the agent's logger and of the plugins' loggers ("pycni.bridge", ...).
    root = logging.getLogger("pycni")
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    root.propagate = False
    return logging.getLogger("pycni.agent")


def _log_stream(log: logging.Logger) -> Any:
    """The stream the agent's log goes to (the --log-file's, else stderr): where SIGUSR1's stack dump belongs."""
    for logger in (log, logging.getLogger("pycni")):
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler) and handler.stream is not None:
                return handler.stream
    return sys.stderr


def _check_metrics_address(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    from .metrics import parse_address  # standard library only: prometheus_client loads when it starts

    try:
        return parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_bin_dirs(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    for directory in value:
        if not os.path.isabs(directory) or ":" in directory:
            raise click.BadParameter(f"{directory!r}: give an absolute path without ':'")
    return value


@click.group("agent", invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    help=f"Unix socket to serve on [default: {DEFAULT_SOCKET}, or STATE_DIR/agent.sock with "
    "--state-dir]. Its directory is created 0700; the socket is 0600 (root only). Install the "
    "shims with the same path: pycni install --agent-socket PATH.",
)
@click.option(
    "--max-concurrency",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests served at the same time; more wait for a free slot.",
)
@click.option(
    "--queue-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Longest wait for a free slot; then the caller gets 'try again later' (CNI code 11).",
)
@click.option(
    "--request-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    metavar="SECONDS",
    help="Longest a request may run; then the caller gets 'try again later'.",
)
@click.option(
    "--grace",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="On SIGTERM: how long requests in flight may still finish.",
)
@click.option(
    "--cni-bin-dir",
    "cni_bin_dirs",
    multiple=True,
    metavar="DIR",
    callback=_check_bin_dirs,
    help=f"A directory the agent may execute delegated plugins from (an IPAM plugin that is not "
    f"pycni's own, e.g. the reference host-local or dhcp); repeat for more [default: "
    f"{DEFAULT_CNI_BIN_DIR}]. So do the directories `pycni install` wrote this socket's plugins "
    f"into while the agent ran (listed in SOCKET{BIN_DIRS_RECORD_SUFFIX}); one that others than "
    "root may write to never does. A request that needs another executable runs in its "
    "caller's process.",
)
@click.option(
    "--max-connections",
    default=256,
    show_default=True,
    type=click.IntRange(min=1),
    help="Connections open at once (requests running, queued or still arriving); one more is "
    "refused at once and its plugin runs in the caller's process.",
)
@click.option(
    "--read-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    metavar="SECONDS",
    help="Longest a caller may take to send its whole request; then it is cut off.",
)
@click.option(
    "--metrics-address",
    metavar="HOST:PORT",
    callback=_check_metrics_address,
    envvar="PYCNI_METRICS_ADDRESS",
    show_envvar=True,
    help="Serve /metrics (Prometheus text format: requests per plugin, command and outcome with "
    "latency histograms, requests not served and why; in overlay mode the lease, reconciles, "
    "store and watch state, remote nodes) and /healthz (200, or 503 with the reason) over HTTP "
    "on this address, e.g. 127.0.0.1:9917 or [::1]:9917 [default: off]. It listens in the "
    "agent's own network namespace; give a loopback address unless the metrics may be read "
    "from the network.",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="Append the log here [default: stderr, i.e. the journal under systemd, where every line "
    "carries its level's journal priority and no timestamp of its own].",
)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
@click.option(
    "--profile-dir",
    type=click.Path(file_okay=False),
    hidden=True,
    help="Write a cProfile of every request's work to this directory (diagnosis).",
)
@overlay_flags
@click.pass_context
def agent(
    ctx: click.Context,
    socket_path: str | None,
    max_concurrency: int,
    queue_timeout: float,
    request_timeout: float,
    grace: float,
    cni_bin_dirs: tuple[str, ...],
    max_connections: int,
    read_timeout: float,
    metrics_address: tuple[str, int] | None,
    log_file: str | None,
    log_level: str,
    profile_dir: str | None,
    leave: bool,
    **flags: Any,
) -> None:
    """Serve CNI requests for the installed plugin shims (the warm path).

    Runs in the foreground until SIGTERM or Ctrl-C. The executables written by
    `pycni install` forward each request (environment, stdin, and the caller's
    network namespace) over a root-only unix socket; the agent runs the same
    plugin code, already imported, in the caller's namespace and returns the
    exact exit code and output a plugin process would have. When no agent
    answers, or it refuses a request, the shims run the plugin themselves:
    stopping the agent never stops the node's networking.

    The agent acts on what its caller passed, never on its own view of a
    path: namespaces come as descriptors (a request naming a CNI_NETNS its
    caller could not open is refused), and a delegated plugin that is not
    pycni's own runs only from a --cni-bin-dir directory.

    With --store and --public-ip the agent is also the overlay's node agent.

    With --metrics-address, GET /healthz answers 200 while the agent serves
    (in overlay mode: and the store answered the node's last request, its
    subnet lease is valid and its last reconcile is recent), else 503 with
    the reason in one line; GET /metrics is for Prometheus.

    \b
    Examples:
      pycni agent                                  # /run/pycni/agent.sock
      pycni agent --socket /run/pycni/agent.sock --log-file /var/log/pycni-agent.log
      pycni agent --store etcd://10.0.0.1:2379 --public-ip 10.0.0.11
      pycni agent --metrics-address 127.0.0.1:9917  # curl -s 127.0.0.1:9917/healthz
      pycni agent status
    """
    if ctx.invoked_subcommand is not None:
        return
    if os.geteuid() != 0:
        raise click.UsageError("the agent needs root (it enters network namespaces and serves root-only requests)")
    overlay = from_flags(ctx, **flags)
    if socket_path is None:
        socket_path = os.path.join(flags["state_dir"], "agent.sock") if flags["state_dir"] else DEFAULT_SOCKET
    log = _logger(log_file, log_level)
    code = serve(
        socket_path,
        log,
        max_concurrency=max_concurrency,
        queue_timeout=queue_timeout,
        request_timeout=request_timeout,
        grace=grace,
        overlay=overlay,
        leave=leave,
        profile_dir=profile_dir or "",
        cni_bin_dirs=cni_bin_dirs or (DEFAULT_CNI_BIN_DIR,),
        max_connections=max_connections,
        read_timeout=read_timeout,
        metrics_address=metrics_address,
    )
    sys.exit(code)


class _Overlay:
    """The overlay node (helper module ``pycni.overlay.node``) run beside the request server."""

    def __init__(self, options: OverlayOptions, log: logging.Logger) -> None:
        from pycni.overlay.node import OverlayNode

        self.node = OverlayNode(options, log.getChild("overlay"))
        self.log = log
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.failed: BaseException | None = None

    def start(self) -> None:
        """Lease the subnet and set the node up (raises on failure; StoreNotReady: the store did not answer)."""
        self.node.start()

    def run_in_background(self, on_exit: Callable[[], None], start_first: bool = False) -> None:
        """The reconcile loop on its own thread; ``on_exit()`` if it ends while the agent runs. ``start_first``:
        the store did not answer the first start, so the thread keeps starting the node until it does."""

        def run() -> None:
            try:
                if start_first and not self.node.start_retrying(self.stop_event):
                    return  # stopped while waiting for the store
                self.node.run(self.stop_event)
            except BaseException as exc:  # reported, then the agent stops: a supervisor restarts it
                self.failed = exc
                self.log.exception("overlay: the reconcile loop failed")
            if not self.stop_event.is_set():
                if self.failed is None:
                    self.failed = RuntimeError("the overlay reconcile loop ended on its own")
                    self.log.error("overlay: the reconcile loop ended on its own; stopping the agent")
                on_exit()

        self.thread = threading.Thread(target=run, name="pycni-overlay", daemon=True)
        self.thread.start()

    def status(self) -> dict[str, Any]:
        return {"overlay": self.node.status()}

    def close(self, leave: bool) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.node.close(leave=leave)


def serve(
    socket_path: str,
    log: logging.Logger,
    *,
    max_concurrency: int = 16,
    queue_timeout: float = 10.0,
    request_timeout: float = 60.0,
    grace: float = 30.0,
    overlay: OverlayOptions | None = None,
    leave: bool = False,
    profile_dir: str = "",
    cni_bin_dirs: tuple[str, ...] = (DEFAULT_CNI_BIN_DIR,),
    max_connections: int = 256,
    read_timeout: float = 10.0,
    metrics_address: tuple[str, int] | None = None,
) -> int:
    """Run the agent until SIGTERM/SIGINT; the process's exit status."""
    from .server import Agent, AgentError, AgentOptions, notify_systemd, use_journal_format

    # Under systemd, log lines carry their journal priority and leave the timestamp to journald.
    use_journal_format(logging.getLogger("pycni"))
    node: _Overlay | None = None
    options = AgentOptions(
        socket_path=socket_path,
        max_concurrency=max_concurrency,
        queue_timeout=queue_timeout,
        request_timeout=request_timeout,
        grace=grace,
        profile_dir=profile_dir,
        cni_bin_dirs=tuple(cni_bin_dirs),
        max_connections=max_connections,
        read_timeout=read_timeout,
    )
    signals = {"count": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: stopping", signal.Signals(signum).name)
        server.stop()

    if overlay is not None:
        try:
            node = _Overlay(overlay, log)
        except ImportError as exc:
            click.echo(f"Error: overlay mode is not available in this installation: {_one_line(exc)}", err=True)
            return 1
    server = Agent(options, log, extra_status=node.status if node is not None else None)
    metrics = None
    if metrics_address is not None:
        # Bound here, in the agent's own network namespace, and served from the start: /healthz says
        # "starting" while the overlay leases its subnet.
        try:
            metrics = _metrics_endpoint(metrics_address, server, node, overlay, log)
        except (OSError, ImportError) as exc:
            from .metrics import format_address

            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else _one_line(exc)
            click.echo(f"Error: cannot serve metrics on {format_address(*metrics_address)}: {why}", err=True)
            return 1
        metrics.start()
        log.info("metrics on http://%s/metrics, health on /healthz", metrics.address)
    try:
        # From here a signal stops the agent, also while it is still starting (serve_forever then returns at once).
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        # SIGUSR1 writes every thread's stack to the log (--log-file, else stderr): what a stuck agent is doing,
        # without stopping it.
        faulthandler.register(signal.SIGUSR1, file=_log_stream(log), all_threads=True)
        waiting = False  # for the store: the node starts in the background once it answers
        if node is not None:
            from pycni.overlay.node import StoreNotReady

            try:
                node.start()
            except StoreNotReady as exc:
                if overlay is not None and overlay.exit_on_store_error:
                    click.echo(f"Error: overlay: {_one_line(exc)} (--exit-on-store-error)", err=True)
                    return 1
                waiting = True
                log.warning(
                    "overlay: %s; serving CNI requests meanwhile and retrying the store with back-off "
                    "(the vxlan plugin answers STATUS 50 until the node holds a lease)",
                    _one_line(exc),
                )
            except Exception as exc:
                click.echo(f"Error: overlay: {_one_line(exc)}", err=True)
                return 1
        try:
            server.start()
        except (AgentError, OSError) as exc:
            click.echo(f"Error: {_one_line(exc)}", err=True)
            if node is not None:
                node.close(leave=False)
            return 1
        if node is not None:
            node.run_in_background(on_exit=server.stop, start_first=waiting)
        notify_systemd("READY=1")
        started = time.monotonic()
        try:
            server.serve_forever()
        finally:
            notify_systemd("STOPPING=1")
            if node is not None:
                try:
                    node.close(leave=leave)
                except Exception as exc:
                    log.error("overlay: closing failed: %s", _one_line(exc))
            server.close()
        log.debug("served for %.0f s", time.monotonic() - started)
        return 1 if node is not None and node.failed is not None else 0
    finally:
        if metrics is not None:
            metrics.close()


def _metrics_endpoint(
    address: tuple[str, int], server: Any, node: _Overlay | None, overlay: OverlayOptions | None, log: logging.Logger
) -> Any:
    from .metrics import MetricsEndpoint, Sources, reconcile_max_age

    if node is None or overlay is None:
        sources = Sources(server)
    else:
        sources = Sources(
            server,
            overlay_status=node.node.status,
            overlay_failure=lambda: _one_line(node.failed) if node.failed is not None else "",
            reconcile_max_age=reconcile_max_age(overlay.reconcile_interval),
        )
    return MetricsEndpoint(address[0], address[1], sources, log.getChild("metrics"))


@agent.command("status")
@click.option(
    "--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True, metavar="PATH", help="The agent's socket."
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole status document as JSON.")
def status_cmd(socket_path: str, as_json: bool) -> None:
    """Is the agent alive; what it served, how fast (p50/p99 per plugin and command)."""
    import json

    from .client import AgentRefused, AgentUnreachable, status

    try:
        doc = status(socket_path)
    except (AgentUnreachable, AgentRefused, OSError, EOFError) as exc:
        click.echo(f"Error: {_one_line(exc)}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    click.echo(format_status(doc))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    if days or hours or minutes:
        parts.append(f"{minutes}m")
    parts.append(f"{secs}s")
    return "".join(parts)


def format_status(doc: dict[str, Any]) -> str:
    import json

    requests = doc.get("requests", {})
    lines = [
        f"alive:    yes (pid {doc.get('pid')}, pycni {doc.get('version')})"
        + (" - stopping" if doc.get("stopping") else ""),
        f"socket:   {doc.get('socket')}",
        f"uptime:   {_duration(doc.get('uptime_s', 0))}",
        f"requests: {requests.get('served', 0)} served, {doc.get('in_flight', 0)} in flight, "
        f"{doc.get('queued', 0)} queued (max {doc.get('max_concurrency')} at once); "
        f"{requests.get('busy', 0)} busy, {requests.get('timed_out', 0)} timed out, "
        f"{requests.get('refused', 0)} refused, {requests.get('declined', 0)} declined (run cold: namespace or "
        f"executable not allowed), {requests.get('denied', 0)} denied, {requests.get('over_capacity', 0)} over "
        f"the connection cap",
    ]
    rows = [
        (plugin, command, figures)
        for plugin, by_command in sorted(doc.get("latency", {}).items())
        for command, figures in sorted(by_command.items())
    ]
    if rows:
        lines.append("")
        lines.append(f"{'plugin':<12} {'command':<8} {'count':>7} {'errors':>7} {'p50 ms':>9} {'p99 ms':>9}")
        for plugin, command, figures in rows:
            p50 = figures.get("p50_ms")
            p99 = figures.get("p99_ms")
            lines.append(
                f"{plugin:<12} {command:<8} {figures.get('count', 0):>7} {figures.get('errors', 0):>7} "
                f"{'-' if p50 is None else f'{p50:.2f}':>9} {'-' if p99 is None else f'{p99:.2f}':>9}"
            )
    if "overlay" in doc:
        store = doc["overlay"].get("store") or {}
        if store:
            requests = store.get("requests") or {}
            counts = requests.get("requests") if isinstance(requests.get("requests"), dict) else requests
            asked = (
                ", ".join(
                    f"{name} {count}" for name, count in sorted(counts.items()) if isinstance(count, int) and count
                )
                or "none"
            )
            lines.append("")
            lines.append(
                f"store:    watch {store.get('watch')} at revision {store.get('revision')}; "
                f"{store.get('relists', 0)} re-lists, {store.get('errors', 0)} errors; requests: {asked}"
            )
        lines.append("")
        lines.append("overlay: " + json.dumps(doc["overlay"], indent=2, sort_keys=True, default=str))
    return "\n".join(lines)


@agent.command("leave")
@click.option(
    "--store",
    "store_url",
    required=True,
    metavar="URL",
    envvar="PYCNI_STORE",
    show_envvar=True,
    help="The cluster store (as for the agent).",
)
@click.option(
    "--public-ip",
    required=True,
    metavar="IP",
    envvar="PYCNI_PUBLIC_IP",
    show_envvar=True,
    help="The node's underlay address (as for the agent).",
)
@etcd_options
def leave_cmd(
    store_url: str,
    public_ip: str,
    etcd_prefix: str,
    etcd_cafile: str | None,
    etcd_certfile: str | None,
    etcd_keyfile: str | None,
) -> None:
    """Remove this node from the overlay: give back its subnet lease and VTEP entry.

    For a node leaving the cluster for good, after its agent has stopped
    (`pycni agent --leave` does the same when it stops).
    """
    tls = tls_files(etcd_cafile, etcd_certfile, etcd_keyfile)
    try:
        from pycni.overlay.node import leave_cluster
    except ImportError as exc:
        click.echo(f"Error: overlay mode is not available in this installation: {_one_line(exc)}", err=True)
        sys.exit(1)
    try:
        from pycni.storeopts import store_auth

        released = leave_cluster(store_url, public_ip, etcd_prefix, tls, auth=store_auth())
    except Exception as exc:
        click.echo(f"Error: {_one_line(exc)}", err=True)
        sys.exit(1)
    click.echo(f"released the lease of {public_ip}" if released else f"{public_ip} held no lease")
