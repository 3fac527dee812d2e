"""A multi-node test harness: node namespaces on an underlay bridge, overlay agents inside them.

    with cluster_topology(3, "ov") as topo:
        store = "file://" + topo.path("store")
        ...  # pycni cluster init --store URL --network 10.244.0.0/16
        agents = [topo.start_agent(node, store) for node in topo.nodes]
        topo.nodes[0].ping(topo.nodes[1].public_ip)
        agents[1].stop()                         # SIGTERM by PID, bounded wait, then SIGKILL

Layout (every name carries a per-run tag, e.g. ``ov-3fa9c2``)::

    ov-3fa9c2-u    the underlay: bridge ``ul`` (192.168.100.1/24), one veth ``n<i>`` per node
    ov-3fa9c2-n0   node 0: ``eth0`` 192.168.100.10/24 (peer of ``n0`` in the underlay), lo up, forwarding on
    ov-3fa9c2-n1   node 1: ``eth0`` 192.168.100.11/24
    ...

Both ends of every veth are created in their final namespaces: nothing is
created in, or linked to, the machine's root namespace. ``topo.add_node()``
adds another node later (a node joining); ``topo.add_host()`` a plain
underlay host with no agent (192.168.100.200, .201, ...: no lease, an
outsider); ``topo.add_pod(node, cidr, gateway, mtu)`` a pod namespace wired
to a node's bridge by hand; ``topo.add_namespace(suffix)`` a bare one.
Teardown stops every agent this topology started (by PID) and deletes
every namespace, also when the test fails.

Agents run as real processes through ``ip netns exec NODE <agent command>``
(``ip netns exec`` execs the command, so the PID is the agent's own), each
with its own state directory, socket path, log file and node name (``n<i>``:
namespaces share the machine's host name, real nodes do not). The command is
``agent_command()``: the venv's ``pycni agent``; ``PYCNI_AGENT_CMD`` in the
environment overrides it.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import netns

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNDERLAY_NET = ipaddress.ip_network("192.168.100.0/24")
UNDERLAY_GATEWAY = "192.168.100.1"  # the underlay bridge's own address (etcd can listen there)
FIRST_NODE_HOST = 10  # node i gets 192.168.100.(10 + i)
FIRST_EXTRA_HOST = 200  # add_host() addresses: 192.168.100.200, .201, ...
UNDERLAY_BRIDGE = "ul"
# A fixed MAC for the underlay bridge: a Linux bridge without one takes the lowest MAC of its ports, so a
# node joining would change it and every node's ARP entry for 192.168.100.1 (etcd) would point nowhere
# until it expires (up to ~45 s): etcd "times out" for some nodes only. A real switch does not do that.
UNDERLAY_BRIDGE_MAC = "02:70:79:00:00:01"
AGENT_START_TIMEOUT = 20.0
AGENT_STOP_TIMEOUT = 10.0
CMD_TIMEOUT = 30


def sh(*args: str, check: bool = True, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


def ip_in(ns_name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip -n NS ARGS`: never the root namespace."""
    if not ns_name:
        raise ValueError("refusing to run ip without a namespace")
    return sh("ip", "-n", ns_name, *args, check=check)


@functools.lru_cache(maxsize=1)
def agent_command() -> tuple[str, ...]:
    """The command that runs one node agent (options follow)."""
    override = os.environ.get("PYCNI_AGENT_CMD")
    if override:
        return tuple(shlex.split(override))
    return (os.path.join(os.path.dirname(sys.executable), "pycni"), "agent")


def leave_command() -> tuple[str, ...]:
    """The command that makes a node leave the cluster (options follow)."""
    return (*agent_command(), "leave")


# -- namespaces -------------------------------------------------------------------------


@dataclass
class Host:
    """A namespace on the underlay: a node (``Node``) or a plain host."""

    name: str  # namespace name (for `ip -n`, `ip netns exec`)
    path: str  # /run/netns/NAME
    public_ip: str  # its address on the underlay
    port: str  # its veth's name inside the underlay namespace

    def run(self, *args: str, check: bool = True, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run a command inside this namespace (`ip netns exec`)."""
        return sh("ip", "netns", "exec", self.name, *args, check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return ip_in(self.name, *args, check=check)

    def ip_json(self, *args: str) -> list[dict]:
        out = ip_in(self.name, "-j", *args).stdout.strip()
        return json.loads(out) if out else []

    def ping(
        self,
        dst: str,
        count: int = 1,
        size: int | None = None,
        dont_fragment: bool = False,
        timeout: float = 2.0,
        src: str | None = None,
    ) -> bool:
        """True if ``count`` echo requests to ``dst`` are all answered within ``timeout`` seconds each."""
        args = ["ping", "-n", "-q", "-c", str(count), "-W", str(timeout), "-i", "0.2"]
        if size is not None:
            args += ["-s", str(size)]
        if dont_fragment:
            args += ["-M", "do"]
        if src:
            args += ["-I", src]
        done = self.run(*args, dst, check=False, timeout=count * (timeout + 0.5) + 5)
        return done.returncode == 0

    def enter(self) -> netns.enter:
        return netns.enter(self.path)


@dataclass
class Node(Host):
    index: int = 0
    state_dir: str = ""  # the agent's --state-dir (a temp dir)
    socket: str = ""  # the agent's --socket path
    log_path: str = ""  # the agent's log file (appended to across restarts)

    @property
    def state_file(self) -> str:
        return os.path.join(self.state_dir, "overlay.json")

    def read_state(self) -> dict | None:
        try:
            with open(self.state_file) as fh:
                return json.load(fh)
        except (FileNotFoundError, ValueError):
            return None


@dataclass
class AgentHandle:
    """One agent process; stop() it by PID."""

    node: Node
    proc: subprocess.Popen
    args: tuple[str, ...]
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sigterm: bool = True, timeout: float = AGENT_STOP_TIMEOUT) -> int | None:
        """SIGTERM (or SIGKILL at once when not sigterm), wait up to timeout, then SIGKILL. Returns the exit status."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM if sigterm else signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.kill(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def dump_threads(self, settle: float = 0.5) -> None:
        """Ask a running agent to write every thread's stack into its log (SIGUSR1), for a failure report."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                return
            time.sleep(settle)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.node.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Topology:
    tag: str  # the per-run prefix every namespace name starts with
    workdir: str
    underlay: str  # the underlay namespace's name
    nodes: list[Node] = field(default_factory=list)
    hosts: list[Host] = field(default_factory=list)
    pods: list[Host] = field(default_factory=list)
    agents: list[AgentHandle] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)

    def path(self, name: str) -> str:
        """A path inside this run's temporary work directory."""
        return os.path.join(self.workdir, name)

    @property
    def underlay_path(self) -> str:
        return netns.path_of(self.underlay)

    def add_namespace(self, suffix: str) -> tuple[str, str]:
        """A bare namespace ``<tag>-<suffix>`` (lo up), deleted with the topology; returns (name, path)."""
        return self._new_namespace(suffix)

    def add_pod(self, node: Node, address: str, gateway: str, mtu: int, bridge: str = "pycni0") -> Host:
        """A pod namespace on ``node``'s bridge by hand: ``eth0`` ADDRESS/LEN, default route via ``gateway``.

        Both veth ends are created in their final namespaces (the node's end is ``p<k>`` there).
        """
        k = len(self.pods)
        name, path = self._new_namespace(f"p{k}")
        port = f"p{k}"
        ip_in(
            node.name,
            "link",
            "add",
            port,
            "mtu",
            str(mtu),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            str(mtu),
            "netns",
            name,
        )
        ip_in(node.name, "link", "set", port, "master", bridge, "up")
        ip_in(name, "addr", "add", address, "dev", "eth0")
        ip_in(name, "link", "set", "eth0", "up")
        ip_in(name, "route", "add", "default", "via", gateway)
        pod = Host(name=name, path=path, public_ip=address.split("/")[0], port=port)
        self.pods.append(pod)
        return pod

    def _new_namespace(self, suffix: str) -> tuple[str, str]:
        name = f"{self.tag}-{suffix}"
        path = netns.create(name)
        self._namespaces.append(name)
        ip_in(name, "link", "set", "lo", "up")
        return name, path

    def _attach(self, name: str, port: str, address: str) -> None:
        # Created from the host's side with its peer placed straight into the underlay namespace.
        ip_in(name, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.underlay)
        ip_in(self.underlay, "link", "set", port, "master", UNDERLAY_BRIDGE, "up")
        ip_in(name, "addr", "add", f"{address}/{UNDERLAY_NET.prefixlen}", "dev", "eth0")
        ip_in(name, "link", "set", "eth0", "up")

    def add_node(self) -> Node:
        """Another node namespace on the underlay (no agent yet)."""
        index = len(self.nodes)
        address = str(UNDERLAY_NET.network_address + FIRST_NODE_HOST + index)
        name, path = self._new_namespace(f"n{index}")
        port = f"n{index}"
        self._attach(name, port, address)
        sh("ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        state_dir = self.path(f"n{index}-state")
        os.makedirs(state_dir, mode=0o755, exist_ok=True)
        node = Node(
            name=name,
            path=path,
            public_ip=address,
            port=port,
            index=index,
            state_dir=state_dir,
            socket=self.path(f"n{index}.sock"),
            log_path=self.path(f"n{index}-agent.log"),
        )
        self.nodes.append(node)
        return node

    def add_host(self) -> Host:
        """A plain underlay host (no agent, no lease): an outsider on the node network."""
        index = len(self.hosts)
        address = str(UNDERLAY_NET.network_address + FIRST_EXTRA_HOST + index)
        name, path = self._new_namespace(f"h{index}")
        port = f"h{index}"
        self._attach(name, port, address)
        host = Host(name=name, path=path, public_ip=address, port=port)
        self.hosts.append(host)
        return host

    def start_agent(
        self,
        node: Node,
        store_url: str,
        extra_args: Sequence[str] = (),
        wait: bool = True,
        timeout: float = AGENT_START_TIMEOUT,
    ) -> AgentHandle:
        """Run the agent for ``node`` (inside its namespace); with wait, until it has written its state file."""
        identity = () if "--node-name" in extra_args else ("--node-name", f"n{node.index}")
        args = (
            *agent_command(),
            "--store",
            store_url,
            "--public-ip",
            node.public_ip,
            "--state-dir",
            node.state_dir,
            "--socket",
            node.socket,
            *identity,
            *extra_args,
        )
        started = time.time()
        with open(node.log_path, "ab") as log:
            log.write(f"---- {time.strftime('%H:%M:%S')} {shlex.join(args)}\n".encode())
            log.flush()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            proc = subprocess.Popen(
                ["ip", "netns", "exec", node.name, *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                close_fds=True,
                cwd=REPO,
                env=env,
            )
        handle = AgentHandle(node=node, proc=proc, args=tuple(args), started=started)
        self.agents.append(handle)
        if wait:
            wait_agent_ready(handle, timeout)
        return handle

    def leave(self, node: Node, store_url: str, extra_args: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
        """`<agent> leave --store URL --public-ip IP` run inside the node's namespace."""
        return node.run(
            *leave_command(), "--store", store_url, "--public-ip", node.public_ip, *extra_args, check=False, timeout=60
        )

    def stop_all(self) -> None:
        for handle in self.agents:
            try:
                handle.stop()
            except Exception:  # keep going: every other agent must be stopped too
                pass


def wait_agent_ready(handle: AgentHandle, timeout: float = AGENT_START_TIMEOUT) -> None:
    """Wait (bounded) until the agent has (re)written its state file and listens on its socket, both since it
    started; raise if it exits. (It programs the other nodes' entries while it starts, and listens once that is
    done: the state file alone can come a moment before the socket.)"""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        try:
            state = os.stat(handle.node.state_file)
            sock = os.stat(handle.node.socket)
            if (
                state.st_mtime >= handle.started - 0.01
                and stat.S_ISSOCK(sock.st_mode)
                and sock.st_ctime >= handle.started - 0.01
            ):
                return
        except FileNotFoundError:
            pass
        if not handle.running():
            raise RuntimeError(
                f"agent on {handle.node.name} exited with status {handle.proc.returncode} "
                f"during start-up:\n{handle.log_tail()}"
            )
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    raise RuntimeError(
        f"agent on {handle.node.name} wrote no state file or did not listen on {handle.node.socket} within "
        f"{timeout} s:\n{handle.log_tail()}"
    )


def state_subnets(state: dict) -> list[str]:
    """Every pod subnet a node's overlay state names (a dual-stack node: one per family)."""
    return [subnet for subnet in (state.get("subnet"), state.get("ipv6Subnet")) if subnet]


def route_dsts(node: "Host") -> set[str]:
    """The destinations of the node's IPv4 and IPv6 routes (main table)."""
    return {r["dst"] for family in ("-4", "-6") for r in node.ip_json(family, "route", "show")}


def converged(nodes: Sequence["Node"]) -> bool:
    """Every node holds a lease and routes every other node's subnets (each family)."""
    subnets = {}
    for node in nodes:
        state = node.read_state()
        if not state:
            return False
        subnets[node.index] = state_subnets(state)
    for node in nodes:
        routes = route_dsts(node)
        if any(subnet not in routes for other in nodes if other is not node for subnet in subnets[other.index]):
            return False
    return True


def wait_for(predicate, timeout: float, interval: float = 0.02, what: str = "condition") -> float:
    """Poll ``predicate`` (bounded) until it is true; return the seconds it took, raise AssertionError on timeout."""
    start = time.monotonic()
    for _ in range(int(timeout / interval) + 2):
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start >= timeout:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextmanager
def cluster_topology(n_nodes: int, prefix: str = "mn") -> Iterator[Topology]:
    """An underlay namespace with a bridge and ``n_nodes`` node namespaces on it; all removed on exit."""
    if not 1 <= n_nodes <= 100:
        raise ValueError("n_nodes must be 1..100")
    tag = f"{prefix}-{os.urandom(3).hex()}"
    netns.validate_name(f"{tag}-n99")
    workdir = tempfile.mkdtemp(prefix=f"pycni-{tag}-")
    os.chmod(workdir, 0o755)
    topo = Topology(tag=tag, workdir=workdir, underlay=f"{tag}-u")
    failed = True
    try:
        name, _path = topo._new_namespace("u")
        ip_in(name, "link", "add", UNDERLAY_BRIDGE, "address", UNDERLAY_BRIDGE_MAC, "type", "bridge")
        ip_in(name, "addr", "add", f"{UNDERLAY_GATEWAY}/{UNDERLAY_NET.prefixlen}", "dev", UNDERLAY_BRIDGE)
        ip_in(name, "link", "set", UNDERLAY_BRIDGE, "up")
        for _ in range(n_nodes):
            topo.add_node()
        yield topo
        failed = False
    finally:
        topo.stop_all()
        errors = []
        for name in reversed(topo._namespaces):
            try:
                netns.delete(name)
            except Exception as exc:
                errors.append(f"{name}: {exc}")
        shutil.rmtree(workdir, ignore_errors=True)
        if errors and not failed:  # never mask the test's own failure
            raise RuntimeError("could not delete namespaces: " + "; ".join(errors))


def seen_source(
    server_ns: str, client_ns: str, dst: str, proto: str = "tcp", port: int = 7000, timeout: float = 3.0
) -> str | None:
    """The source address an echo server in ``server_ns`` sees for a client in ``client_ns``; None: no answer.

    The server replies with the peer address it saw, and the client checks that it got exactly that
    reply, so both directions of the path are proven.
    """
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with netns.enter(server_ns):
        server = socket.socket(socket.AF_INET, kind)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.settimeout(timeout)
    if proto == "tcp":
        server.listen(1)
    seen: list[str] = []

    def serve() -> None:
        try:
            if proto == "tcp":
                conn, peer = server.accept()
                with conn:
                    conn.settimeout(timeout)
                    conn.recv(64)
                    seen.append(peer[0])
                    conn.sendall(peer[0].encode())
            else:
                _data, peer = server.recvfrom(64)
                seen.append(peer[0])
                server.sendto(peer[0].encode(), peer)
        except OSError:
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    reply = b""
    try:
        with netns.enter(client_ns):
            client = socket.socket(socket.AF_INET, kind)
        with client:
            client.settimeout(timeout)
            if proto == "tcp":
                client.connect((dst, port))
                client.sendall(b"who am i")
                reply = client.recv(64)
            else:
                client.sendto(b"who am i", (dst, port))
                reply, _ = client.recvfrom(64)
    except OSError:
        return None
    finally:
        thread.join(timeout + 1)
        server.close()
    if not seen or reply.decode() != seen[0]:
        return None
    return seen[0]
