"""portmap as a real process in a node namespace, side by side with the reference.

Test topology: a node namespace with the reference bridge, pods, an outside host.

    outside (192.168.77.2, fd77::2) --veth-- node (vo0: 192.168.77.1, fd77::1)
                                             node cni0 (10.88.0.1, fd88::1) -- pods

Pods are attached with the REFERENCE bridge + host-local from /usr/lib/cni, so
these tests do not depend on pycni's own bridge. Echo servers run in the pods
as processes (`ip netns exec`), started and stopped by PID; clients run in this
process inside the namespaces with bounded timeouts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

import netns

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

REF_DIR = "/usr/lib/cni"
NODE_V4, NODE_V6 = "192.168.77.1", "fd77::1"
OUT_V4, OUT_V6 = "192.168.77.2", "fd77::2"
NODE_V4_EXTRA = "192.168.77.3"  # a second node address, to tell hostIPs apart
BRIDGE_V4, BRIDGE_V6 = "10.88.0.1", "fd88::1"
NETWORK = "pmnet"

OURS = [sys.executable, "-c", "from cni_plugins.portmap import main; main()"]
REFERENCE = [os.path.join(REF_DIR, "portmap")]

SERVER = r"""
import os, socket, sys, selectors
tag, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
sel = selectors.DefaultSelector()
for port in ports:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET6, kind)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("::", port))
        if kind == socket.SOCK_STREAM:
            s.listen(16)
        sel.register(s, selectors.EVENT_READ, kind)
print("ready", flush=True)
def peer(addr):
    host = addr[0]
    return host[7:] if host.startswith("::ffff:") else host
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if key.data == socket.SOCK_STREAM:
            conn, addr = s.accept()
            conn.settimeout(2)
            try:
                conn.sendall(f"{tag} {peer(addr)} {s.getsockname()[1]}".encode())
            finally:
                conn.close()
        else:
            data, addr = s.recvfrom(2048)
            s.sendto(f"{tag} {peer(addr)} {s.getsockname()[1]}".encode(), addr)
"""


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Pod:
    ns: netns.Namespace
    container_id: str
    prev_result: dict
    server: subprocess.Popen | None = None

    @property
    def v4(self) -> str:
        return next(ip["address"].split("/")[0] for ip in self.prev_result["ips"] if "." in ip["address"])

    @property
    def v6(self) -> str:
        return next(ip["address"].split("/")[0] for ip in self.prev_result["ips"] if ":" in ip["address"])


@dataclass
class Node:
    node: netns.Namespace
    outside: netns.Namespace
    workdir: str
    pods: list[Pod] = field(default_factory=list)

    # ---- running plugins ----------------------------------------------------------
    def run_plugin(
        self,
        cmd: list[str],
        command: str,
        conf: dict,
        container_id: str = "ctr",
        netns_path: str = "",
        ifname: str = "eth0",
    ) -> tuple[int, dict | None]:
        env = {
            "PATH": os.environ["PATH"],
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns_path,
            "CNI_IFNAME": ifname,
            "CNI_PATH": REF_DIR,
        }
        proc = subprocess.run(
            ["ip", "netns", "exec", self.node.name, *cmd],
            input=json.dumps(conf).encode(),
            env=env,
            capture_output=True,
            timeout=30,
        )
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, out

    def bridge_conf(self) -> dict:
        return {
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": True,
            "hairpinMode": True,
            "ipam": {
                "type": "host-local",
                "dataDir": os.path.join(self.workdir, "ipam"),
                "ranges": [[{"subnet": "10.88.0.0/24"}], [{"subnet": "fd88::/64"}]],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            },
        }

    def add_pod(self, pod_ns: netns.Namespace, container_id: str, ports: list[int]) -> Pod:
        rc, result = self.run_plugin(
            [os.path.join(REF_DIR, "bridge")], "ADD", self.bridge_conf(), container_id, pod_ns.path
        )
        assert rc == 0, result
        pod = Pod(pod_ns, container_id, result)
        pod.server = start_server(pod_ns.name, container_id, ports, self.workdir)
        self.pods.append(pod)
        return pod

    def portmap_conf(self, pod: Pod, mappings: list[dict], **extra) -> dict:
        conf = {
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "portmap",
            "runtimeConfig": {"portMappings": mappings},
            "prevResult": pod.prev_result,
        }
        conf.update(extra)
        return conf

    # ---- looking at the node --------------------------------------------------------
    def nft_ruleset(self) -> str:
        return sh("ip", "netns", "exec", self.node.name, "nft", "list", "ruleset").stdout

    def iptables_save(self, family: int = 4) -> str:
        tool = "iptables-save" if family == 4 else "ip6tables-save"
        out = sh("ip", "netns", "exec", self.node.name, tool, "-t", "nat").stdout
        return "".join(line for line in out.splitlines(keepends=True) if not line.startswith("#"))

    def close(self) -> None:
        for pod in self.pods:
            stop_server(pod.server)


def start_server(ns_name: str, tag: str, ports: list[int], workdir: str) -> subprocess.Popen:
    script = os.path.join(workdir, "echo_server.py")
    if not os.path.exists(script):
        with open(script, "w") as fh:
            fh.write(SERVER)
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns_name, sys.executable, script, tag, *map(str, ports)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    if not ready or proc.stdout.readline().strip() != "ready":
        stop_server(proc)
        raise RuntimeError(f"echo server in {ns_name} did not start: {proc.stderr.read() if proc.poll() else ''}")
    return proc


def stop_server(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.kill()  # by PID: `ip netns exec` execs the interpreter in the same process
    proc.wait(timeout=5)


def build_node(workdir: str, node: netns.Namespace, outside: netns.Namespace) -> Node:
    n, o = node.name, outside.name
    for name in (n, o):
        sh("ip", "-n", name, "link", "set", "lo", "up")
    sh("ip", "-n", n, "link", "add", "vo0", "type", "veth", "peer", "name", "eth0", "netns", o)
    sh("ip", "-n", n, "addr", "add", f"{NODE_V4}/24", "dev", "vo0")
    sh("ip", "-n", n, "addr", "add", f"{NODE_V4_EXTRA}/24", "dev", "vo0")
    sh("ip", "-n", n, "addr", "add", f"{NODE_V6}/64", "dev", "vo0", "nodad")
    sh("ip", "-n", n, "link", "set", "vo0", "up")
    sh("ip", "-n", o, "addr", "add", f"{OUT_V4}/24", "dev", "eth0")
    sh("ip", "-n", o, "addr", "add", f"{OUT_V6}/64", "dev", "eth0", "nodad")
    sh("ip", "-n", o, "link", "set", "eth0", "up")
    sh("ip", "-n", o, "route", "add", "default", "via", NODE_V4)
    sh("ip", "-n", o, "-6", "route", "add", "default", "via", NODE_V6)
    sh(
        "ip",
        "netns",
        "exec",
        n,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv6.conf.default.accept_dad=0",
    )  # no DAD wait for the bridge's IPv6 address
    return Node(node, outside, workdir)


# ---- clients ------------------------------------------------------------------------


def ask(ns: netns.Namespace, host: str, port: int, proto: str = "tcp", timeout: float = 1.0) -> str | None:
    """Connect (TCP) or send a datagram (UDP) from inside ``ns``; the echo reply or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with netns.enter(ns.path):
        sock = socket.socket(family, kind)
    try:
        sock.settimeout(timeout)
        if proto == "tcp":
            sock.connect((host, port))
            return sock.recv(256).decode() or None
        sock.connect((host, port))  # connected: an ICMP unreachable ends the wait at once
        sock.send(b"hello")
        return sock.recv(256).decode()
    except OSError:
        return None
    finally:
        sock.close()


def ask_until(ns: netns.Namespace, host: str, port: int, proto: str = "tcp", tries: int = 20) -> str | None:
    """Like ask, retried a bounded number of times (IPv6 addresses may still be settling)."""
    for _ in range(tries):
        reply = ask(ns, host, port, proto, timeout=0.25)
        if reply:
            return reply
    return None


# ---- fixtures ---------------------------------------------------------------------------


class Topology:
    """A node with two pods (A, B) whose echo servers listen on ports 80 and 81."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Node:
        try:
            node, outside, pa, pb = (self._stack.enter_context(netns.temporary("pt")) for _ in range(4))
            self.env = build_node(self.workdir, node, outside)
            self._stack.callback(self.env.close)
            self.env.add_pod(pa, "ctrA", [80, 81])
            self.env.add_pod(pb, "ctrB", [80, 81])
        except BaseException:
            self._stack.close()
            raise
        return self.env

    def __exit__(self, *exc) -> None:
        self._stack.close()


def reset_firewall(env: Node) -> None:
    n = env.node.name
    sh("ip", "netns", "exec", n, "nft", "delete", "table", "inet", "pycni_portmap", check=False)
    for tool in ("iptables", "ip6tables"):
        sh("ip", "netns", "exec", n, tool, "-w", "5", "-t", "nat", "-F", check=False)
        sh("ip", "netns", "exec", n, tool, "-w", "5", "-t", "nat", "-X", check=False)
    sh("ip", "netns", "exec", n, "conntrack", "-F", check=False)


def ready_topology(tmp_path_factory, name: str):
    """A Topology whose pods answer; for a module-scoped fixture to ``yield from``."""
    with Topology(str(tmp_path_factory.mktemp(name))) as env:
        # IPv6 addresses on the bridge may still be settling: wait (bounded) for the pods.
        for pod in env.pods:
            assert ask_until(env.node, pod.v6, 80), f"pod {pod.container_id} not reachable over IPv6"
        yield env


def clean_firewall(env: Node):
    """The node's firewall emptied before and after a test; for a fixture to ``yield from``."""
    reset_firewall(env)
    yield env
    reset_firewall(env)


@pytest.fixture(scope="module")
def topo(tmp_path_factory):
    yield from ready_topology(tmp_path_factory, "portmap")


@pytest.fixture
def env(topo):
    yield from clean_firewall(topo)


def pm_add(env: Node, pod: Pod, mappings: list[dict], cmd=OURS, **extra):
    return env.run_plugin(cmd, "ADD", env.portmap_conf(pod, mappings, **extra), pod.container_id, pod.ns.path)


def pm_del(env: Node, pod: Pod, mappings: list[dict], cmd=OURS, **extra):
    return env.run_plugin(cmd, "DEL", env.portmap_conf(pod, mappings, **extra), pod.container_id, pod.ns.path)


def tag(reply: str | None) -> str | None:
    return reply.split()[0] if reply else None


def peer(reply: str | None) -> str | None:
    return reply.split()[1] if reply else None


def owner_comment_present(env: Node, container_id: str) -> bool:
    return f"/{container_id}/" in env.nft_ruleset()


TCP_UDP = [
    {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
    {"hostPort": 8081, "containerPort": 81, "protocol": "udp"},
]


# ---- nftables backend (the default) ------------------------------------------------------


def test_add_forwards_tcp_udp_v4_v6_and_del_removes(env):
    a = env.pods[0]
    rc, out = pm_add(env, a, TCP_UDP)
    assert rc == 0, out
    assert out == a.prev_result  # a chained plugin passes prevResult through unchanged
    outside = env.outside
    assert ask(outside, NODE_V4, 8080) == f"ctrA {OUT_V4} 80"  # no SNAT for outside clients
    assert ask(outside, NODE_V4, 8081, "udp") == f"ctrA {OUT_V4} 81"
    assert ask(outside, NODE_V6, 8080) == f"ctrA {OUT_V6} 80"
    assert ask(outside, NODE_V6, 8081, "udp") == f"ctrA {OUT_V6} 81"
    assert tag(ask(env.node, NODE_V4, 8080)) == "ctrA"  # from the node itself
    assert tag(ask(env.node, NODE_V6, 8081, "udp")) == "ctrA"
    assert owner_comment_present(env, "ctrA")

    rc, out = pm_del(env, a, TCP_UDP)
    assert rc == 0 and out is None
    assert ask(outside, NODE_V4, 8080) is None
    assert ask(outside, NODE_V6, 8081, "udp", timeout=0.3) is None
    assert "pycni_portmap" not in env.nft_ruleset()  # the last mapping gone: the table goes too
    assert pm_del(env, a, TCP_UDP)[0] == 0  # DEL is idempotent


def test_hairpin_and_localhost_are_masqueraded(env):
    a, b = env.pods
    assert pm_add(env, a, TCP_UDP)[0] == 0
    # A pod reaching its own host port through the node's address (hairpin).
    assert ask(a.ns, NODE_V4, 8080) == f"ctrA {BRIDGE_V4} 80"
    assert ask(a.ns, NODE_V4, 8081, "udp") == f"ctrA {BRIDGE_V4} 81"
    assert ask(a.ns, NODE_V6, 8080) == f"ctrA {BRIDGE_V6} 80"
    # Another pod on the same bridge: masqueraded too, or A's reply would bypass the node.
    assert ask(b.ns, NODE_V4, 8080) == f"ctrA {BRIDGE_V4} 80"
    # 127.0.0.1 in the node: route_localnet on the bridge and masquerade.
    assert ask(env.node, "127.0.0.1", 8080) == f"ctrA {BRIDGE_V4} 80"
    route_localnet = sh(
        "ip", "netns", "exec", env.node.name, "sysctl", "-n", "net.ipv4.conf.cni0.route_localnet"
    ).stdout.strip()
    assert route_localnet == "1"
    assert pm_del(env, a, TCP_UDP)[0] == 0


def test_snat_false_leaves_hairpin_unmasqueraded(env):
    a = env.pods[0]
    assert pm_add(env, a, TCP_UDP, snat=False)[0] == 0
    assert ask(env.outside, NODE_V4, 8080) == f"ctrA {OUT_V4} 80"
    assert ask(a.ns, NODE_V4, 8080, timeout=0.5) is None  # the reply bypasses the NAT: no connection
    assert "masquerade" not in env.nft_ruleset()


def test_masq_all_and_mark_bit(env):
    a = env.pods[0]
    assert pm_add(env, a, TCP_UDP, masqAll=True, markMasqBit=5)[0] == 0
    assert ask(env.outside, NODE_V4, 8080) == f"ctrA {BRIDGE_V4} 80"  # everything masqueraded
    assert ask(env.outside, NODE_V6, 8080) == f"ctrA {BRIDGE_V6} 80"
    ruleset = env.nft_ruleset()
    assert "0x00000020" in ruleset and "0x00002000" not in ruleset


def test_host_ip_restricts_the_address(env):
    a = env.pods[0]
    mappings = [
        {"hostPort": 9090, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_V4},
        {"hostPort": 9091, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_V6},
        {"hostPort": 9092, "containerPort": 80, "protocol": "tcp", "hostIP": "0.0.0.0"},
    ]
    assert pm_add(env, a, mappings)[0] == 0
    assert tag(ask(env.outside, NODE_V4, 9090)) == "ctrA"
    assert ask(env.outside, NODE_V4_EXTRA, 9090) is None
    assert ask(env.outside, NODE_V6, 9090) is None  # an IPv4 hostIP maps only IPv4
    assert tag(ask(env.outside, NODE_V6, 9091)) == "ctrA"
    assert ask(env.outside, NODE_V4, 9091) is None
    # 0.0.0.0 means every IPv4 address, and no IPv6 one.
    assert tag(ask(env.outside, NODE_V4_EXTRA, 9092)) == "ctrA"
    assert ask(env.outside, NODE_V6, 9092) is None


def test_two_pods_share_a_host_port_by_host_ip_or_protocol(env):
    a, b = env.pods
    map_a = [
        {"hostPort": 7000, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_V4},
        {"hostPort": 7001, "containerPort": 80, "protocol": "tcp"},
    ]
    map_b = [
        {"hostPort": 7000, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_V4_EXTRA},
        {"hostPort": 7001, "containerPort": 81, "protocol": "udp"},
    ]
    assert pm_add(env, a, map_a)[0] == 0
    assert pm_add(env, b, map_b)[0] == 0
    assert tag(ask(env.outside, NODE_V4, 7000)) == "ctrA"
    assert tag(ask(env.outside, NODE_V4_EXTRA, 7000)) == "ctrB"
    assert tag(ask(env.outside, NODE_V4, 7001)) == "ctrA"
    assert tag(ask(env.outside, NODE_V4, 7001, "udp")) == "ctrB"
    assert pm_del(env, a, map_a)[0] == 0
    assert not owner_comment_present(env, "ctrA") and owner_comment_present(env, "ctrB")
    assert ask(env.outside, NODE_V4, 7000) is None
    assert tag(ask(env.outside, NODE_V4_EXTRA, 7000)) == "ctrB"
    assert tag(ask(env.outside, NODE_V4, 7001, "udp")) == "ctrB"


def test_last_add_wins_and_del_of_the_loser_keeps_the_winner(env):
    a, b = env.pods
    mapping = [{"hostPort": 7100, "containerPort": 80, "protocol": "tcp"}]
    assert pm_add(env, a, mapping)[0] == 0
    assert pm_add(env, b, mapping)[0] == 0
    assert tag(ask(env.outside, NODE_V4, 7100)) == "ctrB"
    assert pm_del(env, a, mapping)[0] == 0
    assert tag(ask(env.outside, NODE_V4, 7100)) == "ctrB"


def test_del_without_prev_result_or_netns(env):
    a = env.pods[0]
    assert pm_add(env, a, TCP_UDP)[0] == 0
    conf = env.portmap_conf(a, TCP_UDP)
    del conf["prevResult"]
    rc, out = env.run_plugin(OURS, "DEL", conf, a.container_id, "")
    assert rc == 0, out
    assert not owner_comment_present(env, "ctrA")
    assert ask(env.outside, NODE_V4, 8080) is None


def test_del_without_mappings_still_removes_the_containers_elements(env):
    a, b = env.pods[0], env.pods[1]
    assert pm_add(env, a, TCP_UDP)[0] == 0
    assert pm_add(env, b, [{"hostPort": 9090, "containerPort": 9000, "protocol": "tcp"}])[0] == 0
    conf = env.portmap_conf(a, [])  # a runtime that forgot the mappings on DEL
    del conf["prevResult"]
    rc, out = env.run_plugin(OURS, "DEL", conf, a.container_id, "")
    assert rc == 0, out
    assert not owner_comment_present(env, "ctrA")
    assert ask(env.outside, NODE_V4, 8080) is None
    assert owner_comment_present(env, "ctrB")  # the other pod keeps its mapping
    assert pm_del(env, b, [{"hostPort": 9090, "containerPort": 9000, "protocol": "tcp"}])[0] == 0


def test_no_mappings_passes_through_and_installs_nothing(env):
    a = env.pods[0]
    rc, out = pm_add(env, a, [])
    assert rc == 0 and out == a.prev_result
    assert "pycni_portmap" not in env.nft_ruleset()
    assert pm_del(env, a, [])[0] == 0
    conf = env.portmap_conf(a, TCP_UDP)
    del conf["prevResult"]
    rc, out = env.run_plugin(OURS, "ADD", conf, a.container_id, a.ns.path)
    assert rc == 1 and "chained" in out["msg"]


def test_check(env):
    a = env.pods[0]
    conf = env.portmap_conf(a, TCP_UDP)
    assert env.run_plugin(OURS, "CHECK", conf, a.container_id, a.ns.path)[0] != 0  # nothing there yet
    assert pm_add(env, a, TCP_UDP)[0] == 0
    rc, out = env.run_plugin(OURS, "CHECK", conf, a.container_id, a.ns.path)
    assert rc == 0, out
    net = [line for line in env.nft_ruleset().splitlines() if "map n" in line][0].split()[1][:13]
    sh(
        "ip",
        "netns",
        "exec",
        env.node.name,
        "nft",
        "delete",
        "element",
        "inet",
        "pycni_portmap",
        f"{net}_any4",
        "{ udp . 8081 }",
    )
    rc, out = env.run_plugin(OURS, "CHECK", conf, a.container_id, a.ns.path)
    assert rc == 1 and "8081" in out["msg"]
    no_prev = dict(conf)
    del no_prev["prevResult"]
    rc, out = env.run_plugin(OURS, "CHECK", no_prev, a.container_id, a.ns.path)
    assert rc == 1 and "prevResult" in out["msg"]


def test_gc_removes_mappings_of_invalid_attachments(env):
    a, b = env.pods
    map_a = [{"hostPort": 7200, "containerPort": 80, "protocol": "tcp"}]
    map_b = [{"hostPort": 7201, "containerPort": 80, "protocol": "tcp"}]
    assert pm_add(env, a, map_a)[0] == 0
    assert pm_add(env, b, map_b)[0] == 0
    gc_conf = {
        "cniVersion": "1.1.0",
        "name": NETWORK,
        "type": "portmap",
        "cni.dev/valid-attachments": [{"containerID": "ctrB", "ifname": "eth0"}],
    }
    rc, out = env.run_plugin(OURS, "GC", gc_conf)
    assert rc == 0, out
    assert not owner_comment_present(env, "ctrA") and owner_comment_present(env, "ctrB")
    assert ask(env.outside, NODE_V4, 7200) is None
    assert tag(ask(env.outside, NODE_V4, 7201)) == "ctrB"
    gc_conf["cni.dev/valid-attachments"] = []
    assert env.run_plugin(OURS, "GC", gc_conf)[0] == 0
    assert "pycni_portmap" not in env.nft_ruleset()


def test_conditions_v4_limit_forwarding(env):
    a = env.pods[0]
    mapping = [{"hostPort": 7300, "containerPort": 80, "protocol": "tcp"}]
    assert pm_add(env, a, mapping, conditionsV4=[f"ip saddr != {OUT_V4}"])[0] == 0
    assert ask(env.outside, NODE_V4, 7300) is None
    assert tag(ask(env.outside, NODE_V6, 7300)) == "ctrA"  # conditionsV4 leave IPv6 alone
    assert tag(ask(env.node, NODE_V4, 7300)) == "ctrA"


@pytest.mark.parametrize(
    "extra, mappings, code",
    [
        ({"conditionsV4": ["ip saddr 1.2.3.4; flush ruleset"]}, TCP_UDP, 7),
        ({"conditionsV4": ["ip saddr 1.2.3.4\nflush ruleset"]}, TCP_UDP, 7),
        ({"conditionsV6": ["ip6 saddr ::1 accept"]}, TCP_UDP, 7),
        ({}, [{"hostPort": 1, "containerPort": 80, "protocol": "tcp", "hostIP": "1.2.3.4 } ; flush ruleset"}], 7),
        ({}, [{"hostPort": 1, "containerPort": 80, "protocol": "tcp; flush ruleset"}], 2),
        ({}, [{"hostPort": 70000, "containerPort": 80, "protocol": "tcp"}], 7),
        ({}, [{"hostPort": "80", "containerPort": 80, "protocol": "tcp"}], 7),
        ({"markMasqBit": 32}, TCP_UDP, 7),
        ({"markMasqBit": 3, "externalSetMarkChain": "X"}, TCP_UDP, 7),
        ({"backend": "iptables", "externalSetMarkChain": "X -j ACCEPT"}, TCP_UDP, 7),
        ({"backend": "iptables", "conditionsV4": ["-s", "1.2.3.4", "-j", "ACCEPT"]}, TCP_UDP, 7),
        ({"backend": "nftables", "conditionsV4": ["-s", "1.2.3.4"]}, TCP_UDP, 7),
        ({"backend": "pf"}, TCP_UDP, 7),
        ({"name": 'pm"; flush ruleset'}, TCP_UDP, 7),
        # conditions hold match expressions only: statements are refused before any rule is written
        ({"conditionsV4": ["meta mark set 0x1"]}, TCP_UDP, 7),
        ({"conditionsV4": ["ip saddr 10.0.0.0/8", "log prefix pwned", "counter"]}, TCP_UDP, 7),
        ({"conditionsV6": ["ip6 saddr ::1 limit rate 1/second"]}, TCP_UDP, 7),
        ({"backend": "iptables", "conditionsV4": ["-s", "1.2.3.4", "--jump=ACCEPT"]}, TCP_UDP, 7),
        ({"backend": "iptables", "conditionsV4": ["-m", "limit", "--limit", "1/s"]}, TCP_UDP, 7),
        ({"backend": "iptables", "conditionsV6": ["-s", "::1", "-g", "KUBE-X"]}, TCP_UDP, 7),
    ],
)
def test_bad_input_is_rejected_and_changes_nothing(env, extra, mappings, code):
    a = env.pods[0]
    assert pm_add(env, a, [{"hostPort": 7400, "containerPort": 80, "protocol": "tcp"}])[0] == 0
    before = env.nft_ruleset(), env.iptables_save()
    rc, out = pm_add(env, a, mappings, **extra)
    assert rc == 1 and out["code"] == code, out
    assert (env.nft_ruleset(), env.iptables_save()) == before


def test_odd_interface_name_is_data_not_syntax(env):
    a = env.pods[0]
    mapping = [{"hostPort": 7500, "containerPort": 80, "protocol": "tcp"}]
    prev = json.loads(json.dumps(a.prev_result))
    prev["interfaces"][2]["name"] = 'e"t}h;0'
    conf = env.portmap_conf(a, mapping)
    conf["prevResult"] = prev
    rc, out = env.run_plugin(OURS, "ADD", conf, a.container_id, a.ns.path, ifname='e"t}h;0')
    assert rc == 0, out
    assert tag(ask(env.outside, NODE_V4, 7500)) == "ctrA"
    assert "e_t_h_0" in env.nft_ruleset()
    rc, out = env.run_plugin(OURS, "DEL", conf, a.container_id, "", ifname='e"t}h;0')
    assert rc == 0, out
    assert "pycni_portmap" not in env.nft_ruleset()


# ---- iptables backend ----------------------------------------------------------------------


def test_iptables_backend_layout_and_traffic(env):
    a = env.pods[0]
    rc, out = pm_add(env, a, TCP_UDP, backend="iptables")
    assert rc == 0 and out == a.prev_result
    assert ask(env.outside, NODE_V4, 8080) == f"ctrA {OUT_V4} 80"
    assert ask(env.outside, NODE_V6, 8081, "udp") == f"ctrA {OUT_V6} 81"
    assert ask(a.ns, NODE_V4, 8080) == f"ctrA {BRIDGE_V4} 80"
    assert ask(env.node, "127.0.0.1", 8080) == f"ctrA {BRIDGE_V4} 80"
    saved = env.iptables_save()
    for line in (
        "-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
        "-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT",
        '-A POSTROUTING -m comment --comment "CNI portfwd requiring masquerade" -j CNI-HOSTPORT-MASQ',
        "-A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE",
    ):
        assert line in saved
    assert "CNI-DN-" in saved and "pycni_portmap" not in env.nft_ruleset()
    conf = env.portmap_conf(a, TCP_UDP, backend="iptables")
    assert env.run_plugin(OURS, "CHECK", conf, a.container_id, a.ns.path)[0] == 0
    assert pm_del(env, a, TCP_UDP, backend="iptables")[0] == 0
    assert "CNI-DN-" not in env.iptables_save() + env.iptables_save(6)
    assert ask(env.outside, NODE_V4, 8080) is None
    assert pm_del(env, a, TCP_UDP, backend="iptables")[0] == 0


def test_iptables_check_fails_on_broken_state(env):
    """CHECK of the iptables backend is run on broken state, not only on intact state: each
    rule ADD wrote, removed behind the plugin's back, makes CHECK fail; ADD repairs it."""
    import shlex

    a = env.pods[0]
    conf = env.portmap_conf(a, TCP_UDP, backend="iptables")
    assert pm_add(env, a, TCP_UDP, backend="iptables")[0] == 0
    assert env.run_plugin(OURS, "CHECK", conf, a.container_id, a.ns.path)[0] == 0

    def rules(family: int, *needles: str) -> list[str]:
        return [
            line
            for line in env.iptables_save(family).splitlines()
            if line.startswith("-A ") and all(n in line for n in needles)
        ]

    breakages = [
        (4, ("-A CNI-DN-", "DNAT", "--dport 8080")),  # the v4 DNAT of one mapping
        (6, ("-A CNI-DN-", "DNAT", "--dport 8081")),  # the v6 DNAT of another
        (4, ("-A CNI-DN-", "CNI-HOSTPORT-SETMARK")),  # the mark for hairpin masquerade
        (4, ("-A CNI-HOSTPORT-DNAT", "-j CNI-DN-")),  # the jump into the container's chain
    ]
    for family, needles in breakages:
        found = rules(family, *needles)
        assert found, (needles, env.iptables_save(family))
        tool = "iptables" if family == 4 else "ip6tables"
        sh("ip", "netns", "exec", env.node.name, tool, "-w", "-t", "nat", "-D", *shlex.split(found[0])[1:])
        rc, out = env.run_plugin(OURS, "CHECK", conf, a.container_id, a.ns.path)
        assert rc == 1 and out["code"] == 999 and "not found" in out["msg"], (needles, out)
        assert pm_add(env, a, TCP_UDP, backend="iptables")[0] == 0  # ADD puts it back
        assert env.run_plugin(OURS, "CHECK", conf, a.container_id, a.ns.path)[0] == 0
    assert pm_del(env, a, TCP_UDP, backend="iptables")[0] == 0
    rc, out = env.run_plugin(OURS, "CHECK", conf, a.container_id, a.ns.path)
    assert rc == 1 and "not found" in out["msg"], out


def test_iptables_backend_gc(env):
    a, b = env.pods
    map_a = [{"hostPort": 7200, "containerPort": 80, "protocol": "tcp"}]
    map_b = [{"hostPort": 7201, "containerPort": 80, "protocol": "tcp"}]
    assert pm_add(env, a, map_a, backend="iptables")[0] == 0
    assert pm_add(env, b, map_b, backend="iptables")[0] == 0
    gc_conf = {
        "cniVersion": "1.1.0",
        "name": NETWORK,
        "type": "portmap",
        "backend": "iptables",
        "cni.dev/valid-attachments": [{"containerID": "ctrB", "ifname": "eth0"}],
    }
    rc, out = env.run_plugin(OURS, "GC", gc_conf)
    assert rc == 0, out
    saved = env.iptables_save()
    assert 'id: \\"ctrA\\"' not in saved and 'id: \\"ctrB\\"' in saved
    assert ask(env.outside, NODE_V4, 7200) is None
    assert tag(ask(env.outside, NODE_V4, 7201)) == "ctrB"


# ---- side by side with the reference (v1.1.1: iptables) ------------------------------------


@pytest.fixture(scope="module")
def ref_topo(tmp_path_factory):
    yield from ready_topology(tmp_path_factory, "portmap-ref")


@pytest.fixture
def ref_env(ref_topo):
    yield from clean_firewall(ref_topo)


MIXED = TCP_UDP + [
    {"hostPort": 9090, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_V4},
    {"hostPort": 9091, "containerPort": 81, "protocol": "udp", "hostIP": NODE_V6},
]


def reachability(env: Node) -> dict[str, str | None]:
    """Who answers, and from which address the server saw the client, for every path."""
    a = env.pods[0]
    probes = {
        "outside-v4-tcp": (env.outside, NODE_V4, 8080, "tcp"),
        "outside-v4-udp": (env.outside, NODE_V4, 8081, "udp"),
        "outside-v6-tcp": (env.outside, NODE_V6, 8080, "tcp"),
        "outside-v6-udp": (env.outside, NODE_V6, 8081, "udp"),
        "outside-hostip-v4": (env.outside, NODE_V4, 9090, "tcp"),
        "outside-hostip-v4-other-address": (env.outside, NODE_V4_EXTRA, 9090, "tcp"),
        "outside-hostip-v6": (env.outside, NODE_V6, 9091, "udp"),
        "node-v4": (env.node, NODE_V4, 8080, "tcp"),
        "node-localhost": (env.node, "127.0.0.1", 8080, "tcp"),
        "hairpin-v4": (a.ns, NODE_V4, 8080, "tcp"),
        "hairpin-v6": (a.ns, NODE_V6, 8080, "tcp"),
        "other-pod-v4": (env.pods[1].ns, NODE_V4, 8080, "tcp"),
    }
    return {name: ask(ns, host, port, proto, timeout=0.5) for name, (ns, host, port, proto) in probes.items()}


@pytest.mark.parametrize("backend", [None, "iptables"])
def test_results_and_reachability_match_reference(env, ref_env, backend):
    extra = {"backend": backend} if backend else {}
    results = {}
    for label, node, cmd, kw in (("ours", env, OURS, extra), ("ref", ref_env, REFERENCE, {})):
        a = node.pods[0]
        rc, out = pm_add(node, a, MIXED, cmd, **kw)
        assert rc == 0, (label, out)
        assert out == a.prev_result, label
        before = reachability(node)
        assert pm_del(node, a, MIXED, cmd, **kw)[0] == 0, label
        after = reachability(node)
        results[label] = before, after
    assert results["ours"] == results["ref"]
    before, after = results["ours"]
    assert before["outside-v4-tcp"] == f"ctrA {OUT_V4} 80" and before["hairpin-v4"] == f"ctrA {BRIDGE_V4} 80"
    assert before["outside-hostip-v4-other-address"] is None
    assert set(after.values()) == {None}


def _rules(text: str) -> list[str]:
    return sorted(line for line in text.splitlines() if line.startswith(("-A", ":CNI")))


def test_iptables_backend_writes_the_reference_rules(env, ref_env):
    extra = {"conditionsV4": ["-s", "192.168.77.0/24"], "backend": "iptables"}
    for node, cmd, kw in ((env, OURS, extra), (ref_env, REFERENCE, {"conditionsV4": extra["conditionsV4"]})):
        assert pm_add(node, node.pods[0], MIXED, cmd, **kw)[0] == 0
    for family in (4, 6):
        assert _rules(env.iptables_save(family)) == _rules(ref_env.iptables_save(family))
    assert "-A CNI-HOSTPORT-DNAT" in env.iptables_save()


@pytest.mark.parametrize(
    "extra, mappings",
    [
        ({"markMasqBit": 32}, TCP_UDP),
        ({"markMasqBit": -1}, TCP_UDP),
        ({"markMasqBit": 3, "externalSetMarkChain": "X"}, TCP_UDP),
        ({}, [{"hostPort": 0, "containerPort": 80, "protocol": "tcp"}]),
        ({}, [{"hostPort": 80, "containerPort": -1, "protocol": "tcp"}]),
    ],
)
def test_bad_config_fails_like_the_reference(env, ref_env, extra, mappings):
    for node, cmd in ((env, OURS), (ref_env, REFERENCE)):
        rc, out = pm_add(node, node.pods[0], mappings, cmd, **extra)
        assert rc == 1 and out["code"] in (7, 999), out  # the reference reports plain errors (999)
    assert pm_add(env, env.pods[0], mappings, **extra)[1]["code"] == 7


def test_check_where_the_reference_fails(env, ref_env):
    """v1.1.1's CHECK looks for the IPv4 rules in ip6tables too, so it fails on IPv4-only
    and on dual-stack networks alike. The spec wants CHECK to succeed when what ADD
    installed is there, which is what pycni does."""
    outcomes = {}
    for label, node, cmd in (("ours", env, OURS), ("ref", ref_env, REFERENCE)):
        a = node.pods[0]
        v4_only = node.portmap_conf(a, TCP_UDP)
        v4_only["prevResult"] = dict(a.prev_result, ips=[ip for ip in a.prev_result["ips"] if "." in ip["address"]])
        dual = node.portmap_conf(a, TCP_UDP)
        for name, conf in (("v4", v4_only), ("dual", dual)):
            assert node.run_plugin(cmd, "ADD", conf, a.container_id, a.ns.path)[0] == 0
            outcomes[label, name] = node.run_plugin(cmd, "CHECK", conf, a.container_id, a.ns.path)[0]
    assert outcomes == {("ours", "v4"): 0, ("ours", "dual"): 0, ("ref", "v4"): 1, ("ref", "dual"): 1}


def test_stale_udp_conntrack_entries_are_flushed_on_add(env):
    """A UDP flow seen before the mapping existed must not keep bypassing the DNAT."""
    # Another mapping first, so that conntrack is active in the node namespace.
    assert pm_add(env, env.pods[1], [{"hostPort": 7700, "containerPort": 80, "protocol": "tcp"}])[0] == 0
    with netns.enter(env.outside.path):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((OUT_V4, 40000))
        sock.settimeout(0.5)
        sock.sendto(b"early", (NODE_V4, 8082))  # no mapping yet: conntrack remembers a plain flow
        listing = sh(
            "ip", "netns", "exec", env.node.name, "conntrack", "-L", "-p", "udp", "--orig-port-dst", "8082"
        ).stdout
        assert "dport=8082" in listing
        mapping = [{"hostPort": 8082, "containerPort": 81, "protocol": "udp"}]
        assert pm_add(env, env.pods[0], mapping)[0] == 0
        sock.sendto(b"again", (NODE_V4, 8082))
        assert sock.recvfrom(256)[0].decode() == f"ctrA {OUT_V4} 81"
    finally:
        sock.close()


def test_concurrent_adds_and_dels_of_many_containers(env):
    a = env.pods[0]
    count = 8

    def run(command: str, n: int):
        mapping = [{"hostPort": 7600 + n, "containerPort": 80, "protocol": "tcp"}]
        conf = env.portmap_conf(a, mapping)
        return env.run_plugin(OURS, command, conf, f"ctr{n}", a.ns.path)[0]

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        assert list(pool.map(lambda n: run("ADD", n), range(count))) == [0] * count
        ruleset = env.nft_ruleset()
        assert all(f"/ctr{n}/eth0" in ruleset for n in range(count))
        assert all(tag(ask(env.outside, NODE_V4, 7600 + n)) == "ctrA" for n in range(count))
        assert list(pool.map(lambda n: run("DEL", n), range(count))) == [0] * count
    assert "pycni_portmap" not in env.nft_ruleset()


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0"])
def test_older_versions_pass_prev_result_like_the_reference(env, ref_env, version):
    outputs = {}
    for label, node, cmd in (("ours", env, OURS), ("ref", ref_env, REFERENCE)):
        a = node.pods[0]
        prev = {
            "cniVersion": version,
            "interfaces": [{"name": "eth0", "sandbox": a.ns.path}],
            "ips": [{"version": "4", "address": f"{a.v4}/24", "gateway": BRIDGE_V4, "interface": 0}],
            "dns": {},
        }
        conf = dict(node.portmap_conf(a, TCP_UDP), cniVersion=version, prevResult=prev)
        rc, out = node.run_plugin(cmd, "ADD", conf, a.container_id, a.ns.path)
        assert rc == 0, (label, out)
        out["interfaces"][0]["sandbox"] = "<netns>"
        outputs[label] = out
        assert tag(ask(node.outside, NODE_V4, 8080)) == "ctrA"
    assert outputs["ours"] == outputs["ref"]


def test_iptables_backend_appends_to_the_kernel_hooks(env):
    """CVE-2019-9946: the host's own nat rules must stay ahead of the port mappings."""
    n = env.node.name
    for chain in ("PREROUTING", "OUTPUT", "POSTROUTING"):
        sh(
            "ip",
            "netns",
            "exec",
            n,
            "iptables",
            "-w",
            "5",
            "-t",
            "nat",
            "-A",
            chain,
            "-p",
            "tcp",
            "--dport",
            "1",
            "-j",
            "RETURN",
        )
    assert pm_add(env, env.pods[0], TCP_UDP, backend="iptables")[0] == 0
    for chain in ("PREROUTING", "OUTPUT", "POSTROUTING"):
        rules = sh("ip", "netns", "exec", n, "iptables", "-t", "nat", "-S", chain).stdout.splitlines()[1:]
        assert len(rules) == 2 and "--dport 1 -j RETURN" in rules[0] and "CNI-HOSTPORT" in rules[1]
