"""Helpers for tests that need etcd: members in test namespaces, TLS certificates.

Every etcd runs inside a network namespace the test created, listens only on
addresses inside it, keeps its data in a temporary directory and is stopped
by its PID when the context manager exits (also when the test fails).

    with etcd_in_netns() as member:                  # one member on 127.0.0.1 of a fresh namespace
        with netns.enter(member.netns):
            store = open_store(member.url)           # the client's sockets live in that namespace

    with etcd_cluster(3) as cluster:                 # three namespaces on a bridge in a fourth
        with netns.enter(cluster.client_netns):
            store = open_store(cluster.url)
        cluster.members[0].stop()

    certs = make_tls_certs(tmpdir, ["127.0.0.1"])    # CA, server and client certificates (openssl)
    with etcd_in_netns(tls=certs) as member: ...     # https, --client-cert-auth

Lower-level: start_etcd() / EtcdMember.stop() / wait_healthy() for callers
that build their own topology (a test's node namespaces, say).

Failures, all inside the test's namespaces and undone on exit:

    member.stop(); restart_etcd(member)              # the same member (data, name, address) again
    with partition_member(cluster, 0): ...           # member 0 cut from its peers, still reachable by clients
    with cut_member_link(cluster, 0): ...            # member 0 gone silent for everyone (no RST, no FIN)
    tcp_connections(netns_path, 2379, pid=os.getpid())   # `ss` lines of our connections to the port
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import netns
from pycni import procs

ETCD = "/usr/bin/etcd"
CLIENT_PORT = 2379
PEER_PORT = 2380
STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

# Fast elections keep start-up and fail-over short; fine for a few members on veths.
FAST_FLAGS = ("--heartbeat-interval", "50", "--election-timeout", "500")


def etcd_skip_reason() -> str | None:
    """Why etcd tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if not os.access(ETCD, os.X_OK):
        return f"{ETCD} is missing (apt-get install -y etcd-server)"
    if shutil.which("nsenter") is None:
        return "nsenter (util-linux) is missing"
    return None


def unique_name(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


def ip(*args: str) -> None:
    """Run `ip ARGS`; used only with -n NAME (never on the root namespace)."""
    if not args or args[0] != "-n":
        raise ValueError(f"refusing to run `ip {' '.join(args)}` outside a test namespace (use -n NAME)")
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


# -- TLS ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EtcdTLS:
    """PEM files made by make_tls_certs()."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    def client_files(self, with_client_cert: bool = True):  # -> ipam.cluster.TLSFiles
        from ipam.cluster import TLSFiles

        if with_client_cert:
            return TLSFiles(cafile=self.ca, certfile=self.client_cert, keyfile=self.client_key)
        return TLSFiles(cafile=self.ca, certfile=None, keyfile=None)


def make_tls_certs(directory: str, server_ips: Sequence[str], *, days: int = 2) -> EtcdTLS:
    """A throwaway CA, a server certificate for server_ips (IP SANs) and a client certificate.

    The server certificate is also good for client auth, so etcd members can
    use it between themselves.
    """
    os.makedirs(directory, exist_ok=True)

    def path(name: str) -> str:
        return os.path.join(directory, name)

    def openssl(*args: str) -> None:
        done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr.strip()}")

    key_args = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl(
        "req",
        "-x509",
        *key_args,
        "-keyout",
        path("ca.key"),
        "-out",
        path("ca.crt"),
        "-days",
        str(days),
        "-subj",
        "/CN=pycni test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    sans = ",".join(f"IP:{address}" for address in server_ips)
    leaves = {
        "server": ("/CN=etcd", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n"),
        "client": ("/CN=pycni-client", "extendedKeyUsage=clientAuth\n"),
    }
    for name, (subject, extensions) in leaves.items():
        with open(path(f"{name}.ext"), "w") as fh:
            fh.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n" + extensions)
        openssl("req", "-new", *key_args, "-keyout", path(f"{name}.key"), "-out", path(f"{name}.csr"), "-subj", subject)
        openssl(
            "x509",
            "-req",
            "-in",
            path(f"{name}.csr"),
            "-CA",
            path("ca.crt"),
            "-CAkey",
            path("ca.key"),
            "-CAcreateserial",
            "-out",
            path(f"{name}.crt"),
            "-days",
            str(days),
            "-extfile",
            path(f"{name}.ext"),
        )
    return EtcdTLS(
        ca=path("ca.crt"),
        server_cert=path("server.crt"),
        server_key=path("server.key"),
        client_cert=path("client.crt"),
        client_key=path("client.key"),
    )


# -- one member ---------------------------------------------------------------------------


@dataclass
class EtcdMember:
    """One etcd process in a test namespace."""

    name: str
    netns: str  # path of the namespace it runs in
    ip: str
    data_dir: str
    log_path: str
    client_port: int = CLIENT_PORT
    peer_port: int = PEER_PORT
    tls: EtcdTLS | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{self.ip}:{self.client_port}"

    @property
    def url(self) -> str:
        """The store URL for this member alone: etcd://IP:PORT."""
        return f"etcd://{self.endpoint}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.endpoint}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.ip}:{self.peer_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the process by its PID: SIGTERM, then SIGKILL after timeout. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        procs.stop(proc, timeout)
        self.proc = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return "(no log)"


def start_etcd(
    netns_path: str,
    ip: str = "127.0.0.1",
    *,
    workdir: str,
    name: str = "etcd0",
    client_port: int = CLIENT_PORT,
    peer_port: int = PEER_PORT,
    tls: EtcdTLS | None = None,
    initial_cluster: str | None = None,
    cluster_token: str = "pycni-test",
    extra_args: Sequence[str] = (),
    wait: bool = True,
    startup_timeout: float = STARTUP_TIMEOUT,
) -> EtcdMember:
    """Start etcd in the namespace at netns_path, listening on ip only.

    workdir holds its data directory and log (<workdir>/<name>.data, .log).
    initial_cluster is etcd's "name=http://ip:port,..." for a multi-member
    cluster (default: this member alone). With wait, returns once the member
    reports itself healthy (a leader is elected); a member of a cluster cannot
    be healthy alone, so start all members with wait=False, then wait_healthy().
    """
    netns.validate(netns_path)
    scheme = "https" if tls else "http"
    member = EtcdMember(
        name=name,
        netns=netns_path,
        ip=ip,
        data_dir=os.path.join(workdir, f"{name}.data"),
        log_path=os.path.join(workdir, f"{name}.log"),
        client_port=client_port,
        peer_port=peer_port,
        tls=tls,
    )
    client_url = f"{scheme}://{ip}:{client_port}"
    args = [
        ETCD,
        "--name",
        name,
        "--data-dir",
        member.data_dir,
        "--listen-client-urls",
        client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        member.peer_url,
        "--initial-advertise-peer-urls",
        member.peer_url,
        "--initial-cluster",
        initial_cluster or f"{name}={member.peer_url}",
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        cluster_token,
        *FAST_FLAGS,
        "--logger",
        "zap",
        "--log-level",
        "warn",
        "--log-outputs",
        "stderr",
    ]
    if tls is not None:
        args += [
            "--cert-file",
            tls.server_cert,
            "--key-file",
            tls.server_key,
            "--client-cert-auth",
            "--trusted-ca-file",
            tls.ca,
        ]
    args += list(extra_args)
    os.makedirs(workdir, exist_ok=True)
    with open(member.log_path, "ab") as log:
        # nsenter switches only the network namespace, then execs etcd: the PID is etcd's own.
        member.proc = subprocess.Popen(
            ["nsenter", f"--net={netns_path}", "--", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=True,
        )
    if wait:
        try:
            wait_healthy([member], timeout=startup_timeout)
        except BaseException:
            member.stop()
            raise
    return member


def health(member: EtcdMember, timeout: float = 1.0) -> bool:
    """True if the member answers GET /health with health true (asked from inside its namespace)."""
    context = None
    if member.tls is not None:
        context = ssl.create_default_context(cafile=member.tls.ca)
        context.load_cert_chain(member.tls.client_cert, member.tls.client_key)
    with netns.enter(member.netns):
        if context is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                member.ip, member.client_port, timeout=timeout, context=context
            )
        else:
            conn = http.client.HTTPConnection(member.ip, member.client_port, timeout=timeout)
        try:
            conn.request("GET", "/health")
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
    try:
        return response.status == 200 and json.loads(body).get("health") == "true"
    except ValueError:
        return False


def wait_healthy(members: Sequence[EtcdMember], timeout: float = STARTUP_TIMEOUT) -> None:
    """Wait (bounded) until every member is healthy; RuntimeError with its log if one dies or times out."""
    deadline = time.monotonic() + timeout
    pending = list(members)
    for _ in range(int(timeout / 0.05) + 1):
        for member in list(pending):
            if not member.running():
                raise RuntimeError(
                    f"etcd {member.name} exited during start-up "
                    f"(status {member.proc.returncode if member.proc else '?'}):\n"
                    f"{member.log_tail()}"
                )
            if health(member):
                pending.remove(member)
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    if pending:
        names = ", ".join(m.name for m in pending)
        raise RuntimeError(f"etcd {names} not healthy after {timeout} s:\n{pending[0].log_tail()}")


@contextmanager
def etcd_member(netns_path: str, ip: str = "127.0.0.1", **kwargs) -> Iterator[EtcdMember]:
    """start_etcd() as a context manager; stops the process and removes its temporary workdir on exit."""
    own_workdir = "workdir" not in kwargs
    workdir = kwargs.pop("workdir", None) or tempfile.mkdtemp(prefix="pycni-etcd-")
    member = None
    try:
        member = start_etcd(netns_path, ip, workdir=workdir, **kwargs)
        yield member
    finally:
        if member is not None:
            member.stop()
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def fresh_netns(prefix: str = "etcd") -> Iterator[str]:
    """A fresh namespace with lo up; yields its path, deletes it on exit."""
    name = unique_name(prefix)
    path = netns.create(name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        yield path
    finally:
        netns.delete(path)


@contextmanager
def etcd_in_netns(prefix: str = "etcd", *, tls: EtcdTLS | None = None, **kwargs) -> Iterator[EtcdMember]:
    """One etcd member on 127.0.0.1 in a namespace of its own (member.netns); all removed on exit.

    Build clients inside `netns.enter(member.netns)`.
    """
    with fresh_netns(prefix) as path, etcd_member(path, "127.0.0.1", tls=tls, **kwargs) as member:
        yield member


def restart_etcd(member: EtcdMember, *, wait: bool = True, startup_timeout: float = STARTUP_TIMEOUT) -> EtcdMember:
    """Start a stopped member again: the same name, data directory, address, ports and TLS files.

    The new process is stored in member.proc, so whoever stops member (its
    context manager) stops the new process too. A member of a cluster finds
    its peers from its data directory; wait only makes sense if they run.
    """
    if member.running():
        raise RuntimeError(f"etcd {member.name} is still running (PID {member.pid})")
    netns.validate(member.netns)
    scheme = "https" if member.tls else "http"
    client_url = f"{scheme}://{member.ip}:{member.client_port}"
    args = [
        ETCD,
        "--name",
        member.name,
        "--data-dir",
        member.data_dir,
        "--listen-client-urls",
        client_url,
        "--advertise-client-urls",
        client_url,
        "--listen-peer-urls",
        member.peer_url,
        "--initial-advertise-peer-urls",
        member.peer_url,
        *FAST_FLAGS,
        "--logger",
        "zap",
        "--log-level",
        "warn",
        "--log-outputs",
        "stderr",
    ]
    if member.tls is not None:
        args += [
            "--cert-file",
            member.tls.server_cert,
            "--key-file",
            member.tls.server_key,
            "--client-cert-auth",
            "--trusted-ca-file",
            member.tls.ca,
        ]
    with open(member.log_path, "ab") as log:
        member.proc = subprocess.Popen(
            ["nsenter", f"--net={member.netns}", "--", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            close_fds=True,
        )
    if wait:
        try:
            wait_healthy([member], timeout=startup_timeout)
        except BaseException:
            member.stop()
            raise
    return member


def tcp_connections(netns_path: str, port: int, *, pid: int | None = None) -> list[str]:
    """`ss -tnpo` lines of the established TCP connections to port in a test namespace (of pid, if given).

    With -o each line shows the socket's timer, "timer:(keepalive,...)" when
    TCP keep-alive is on.
    """
    netns.validate(netns_path)
    done = subprocess.run(
        ["nsenter", f"--net={netns_path}", "--", "ss", "-tnpoH", "state", "established", f"( dport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        raise RuntimeError(f"ss failed: {done.stderr.strip()}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if pid is not None:
        lines = [line for line in lines if f"pid={pid}," in line]
    return lines


# -- a cluster ------------------------------------------------------------------------------


@dataclass
class EtcdCluster:
    members: list[EtcdMember]
    client_netns: str  # the bridge's namespace, which has an address on the members' subnet
    client_ip: str
    namespaces: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        """etcd://IP:PORT,IP:PORT,... for all members."""
        return "etcd://" + ",".join(member.endpoint for member in self.members)


@contextmanager
def etcd_cluster(
    size: int = 3, *, prefix: str = "etcdc", subnet: str = "10.213.7", tls: EtcdTLS | None = None
) -> Iterator[EtcdCluster]:
    """size etcd members, each in its own namespace, joined by a bridge in one more namespace.

    Member i has address <subnet>.<i+1>/24 on its veth; the bridge namespace
    has <subnet>.254 on the bridge and is where clients should be built
    (cluster.client_netns). Everything is stopped and deleted on exit.
    """
    if not 1 <= size <= 9:
        raise ValueError("size must be 1..9")
    tag = os.urandom(3).hex()
    bridge_name = f"{prefix}-br-{tag}"
    names: list[str] = []
    members: list[EtcdMember] = []
    workdir = tempfile.mkdtemp(prefix="pycni-etcdc-")
    try:
        netns.create(bridge_name)
        names.append(bridge_name)
        ip("-n", bridge_name, "link", "set", "lo", "up")
        ip(
            "-n", bridge_name, "link", "add", "br0", "address", "02:70:79:00:00:02", "type", "bridge"
        )  # pinned, as a switch
        ip("-n", bridge_name, "addr", "add", f"{subnet}.254/24", "dev", "br0")
        ip("-n", bridge_name, "link", "set", "br0", "up")
        addresses = [f"{subnet}.{i + 1}" for i in range(size)]
        for i, address in enumerate(addresses):
            name = f"{prefix}-m{i}-{tag}"
            netns.create(name)
            names.append(name)
            ip("-n", name, "link", "set", "lo", "up")
            # Both ends are created in their final namespaces: nothing passes through the root namespace.
            ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", f"m{i}", "netns", bridge_name)
            ip("-n", bridge_name, "link", "set", f"m{i}", "master", "br0", "up")
            ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", name, "link", "set", "eth0", "up")
        initial = ",".join(f"m{i}=http://{address}:{PEER_PORT}" for i, address in enumerate(addresses))
        token = f"pycni-{tag}"
        for i, address in enumerate(addresses):
            members.append(
                start_etcd(
                    netns.path_of(names[i + 1]),
                    address,
                    workdir=workdir,
                    name=f"m{i}",
                    tls=tls,
                    initial_cluster=initial,
                    cluster_token=token,
                    wait=False,
                )
            )
        wait_healthy(members)
        yield EtcdCluster(
            members=members, client_netns=netns.path_of(bridge_name), client_ip=f"{subnet}.254", namespaces=list(names)
        )
    finally:
        for member in members:
            member.stop()
        for name in reversed(names):
            netns.delete(name)
        shutil.rmtree(workdir, ignore_errors=True)


def _ns_name(path: str) -> str:
    """The `ip -n` name of a namespace this module created (pinned under netns.RUN_DIR)."""
    name = os.path.basename(path)
    if netns.path_of(name) != path:
        raise ValueError(f"{path} is not a namespace pinned under {netns.RUN_DIR}")
    return name


@contextmanager
def partition_member(cluster: EtcdCluster, index: int) -> Iterator[EtcdMember]:
    """Cut member index off from its peers, both ways; clients (the bridge namespace) still reach it.

    Blackhole routes in the member's namespace to each peer and in each
    peer's namespace to the member. The member loses its leader (or, as
    leader, its quorum) within an election timeout; the others elect a
    leader among themselves. Undone on exit, also on failure.
    """
    member = cluster.members[index]
    routes = []  # (namespace name, address): a blackhole route to address in that namespace
    for i, other in enumerate(cluster.members):
        if i != index:
            routes += [(_ns_name(member.netns), other.ip), (_ns_name(other.netns), member.ip)]
    added: list[tuple[str, str]] = []
    try:
        for name, address in routes:
            ip("-n", name, "route", "add", "blackhole", f"{address}/32")
            added.append((name, address))
        yield member
    finally:
        for name, address in added:
            ip("-n", name, "route", "del", "blackhole", f"{address}/32")


@contextmanager
def cut_member_link(cluster: EtcdCluster, index: int) -> Iterator[EtcdMember]:
    """Take member index's port on the cluster bridge down: it falls silent for clients and peers alike.

    Packets to it vanish without an answer (no RST, no FIN), as with a
    powered-off host or a cut cable. Undone on exit, also on failure.
    """
    bridge = _ns_name(cluster.client_netns)
    ip("-n", bridge, "link", "set", f"m{index}", "down")
    try:
        yield cluster.members[index]
    finally:
        ip("-n", bridge, "link", "set", f"m{index}", "up")


# -- racing nodes ---------------------------------------------------------------------------


def _race_worker(
    url: str, prefix: str, netns_path: str | None, tls, cfg_json: str, public_ip: str, mac: str, barrier, results
) -> None:
    try:
        from ipam.cluster import ClusterConfig, acquire_lease, open_store

        if netns_path is not None:
            with netns.enter(netns_path):
                store = open_store(url, prefix=prefix, tls=tls)
        else:
            store = open_store(url, prefix=prefix, tls=tls)
        cfg = ClusterConfig.from_json(cfg_json)
        barrier.wait(timeout=30)
        lease = acquire_lease(store, cfg, public_ip, mac, node_name=f"node-{public_ip}")
        store.close()
        results.put((public_ip, lease.subnet))
    except BaseException as err:  # report, never hang the parent
        results.put((public_ip, f"ERROR {type(err).__name__}: {err}"))


def race_acquire_leases(
    url: str,
    cfg,
    public_ips: Sequence[str],
    *,
    prefix: str = "/pycni",
    netns_path: str | None = None,
    tls=None,
    timeout: float = 60.0,
) -> dict[str, str]:
    """acquire_lease() for each public IP, each in its own process, all released at once by a barrier.

    Returns {public_ip: subnet, or "ERROR ..."}. Each process opens its own
    store (inside netns_path if given). Processes still running at the
    timeout are killed by PID.
    """
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(len(public_ips))
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_race_worker,
            args=(url, prefix, netns_path, tls, cfg.to_json(), ip_, f"0a:58:00:00:00:{i:02x}", barrier, results),
            daemon=True,
        )
        for i, ip_ in enumerate(public_ips)
    ]
    found: dict[str, str] = {}
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        while len(found) < len(procs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                public_ip, subnet = results.get(timeout=remaining)
            except queue.Empty:
                break
            found[public_ip] = subnet
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(timeout=5)
        results.close()
    return found


# -- etcd authentication (RBAC) -------------------------------------------------------------------

ROOT_PASSWORD = "pycni-test-root"


def auth_flags(token_ttl: int = 300) -> tuple[str, ...]:
    """etcd flags for a member whose users authenticate: simple tokens expiring after token_ttl idle seconds.

    (--auth-token-ttl exists since etcd 3.4; --bcrypt-cost 4 keeps adding users fast.)
    """
    return ("--auth-token", "simple", "--auth-token-ttl", str(int(token_ttl)), "--bcrypt-cost", "4")


def etcd_gateway(
    member: EtcdMember, path: str, body: dict, *, token: str | None = None, timeout: float = 5.0
) -> tuple[int, dict]:
    """POST body to etcd's JSON gateway at path, from inside the member's namespace: (HTTP status, answer)."""
    context = None
    if member.tls is not None:
        context = ssl.create_default_context(cafile=member.tls.ca)
        context.load_cert_chain(member.tls.client_cert, member.tls.client_key)
    with netns.enter(member.netns):
        if context is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                member.ip, member.client_port, timeout=timeout, context=context
            )
        else:
            conn = http.client.HTTPConnection(member.ip, member.client_port, timeout=timeout)
        conn.connect()  # the socket is made here, inside the namespace
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = token
        conn.request("POST", path, body=json.dumps(body), headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    return response.status, (json.loads(data) if data.strip() else {})


def _prefix_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


def enable_etcd_auth(member: EtcdMember, users: dict[str, tuple[str, str]]) -> None:
    """Turn authentication on, through the gateway, the way an operator does with etcdctl.

    Adds root (password ROOT_PASSWORD, role root) and, for each name: (password,
    key prefix) of users, a user of that name with a role "<name>-rw" that may
    read and write every key starting with the prefix; then /v3/auth/enable.
    """
    import base64

    def call(path: str, body: dict) -> None:
        status, answer = etcd_gateway(member, path, body)
        if status != 200:
            raise RuntimeError(f"etcd {path} failed: HTTP {status} {answer}")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    call("/v3/auth/user/add", {"name": "root", "password": ROOT_PASSWORD})
    call("/v3/auth/role/add", {"name": "root"})
    call("/v3/auth/user/grant", {"user": "root", "role": "root"})
    for name, (password, prefix) in users.items():
        role = f"{name}-rw"
        call("/v3/auth/user/add", {"name": name, "password": password})
        call("/v3/auth/role/add", {"name": role})
        call(
            "/v3/auth/role/grant",
            {
                "name": role,
                "perm": {
                    "permType": "READWRITE",
                    "key": b64(prefix.encode()),
                    "range_end": b64(_prefix_end(prefix.encode())),
                },
            },
        )
        call("/v3/auth/user/grant", {"user": name, "role": role})
    call("/v3/auth/enable", {})
