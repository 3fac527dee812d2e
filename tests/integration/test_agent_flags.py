"""`pycni agent` flags, signals and supervision, each asserted on real state. Root only.

Two node namespaces on the test underlay (tests/multinode.py) and a file store. Node n1's agent runs
with defaults; node n0's agent runs with every flag under test::

    --log-file FILE  --bridge afbr0  --vxlan-device afvx.1  --underlay-device eth1
    --lease-ttl 6  --reconcile-interval 0.25  --disable-tx-checksum-offload

and NOTIFY_SOCKET pointing at a unix datagram socket of the test (systemd's Type=notify protocol). n0
has a second underlay port, eth1, so --underlay-device names a link other than the one holding
--public-ip (the default). The tests share the cluster and run in file order:

    flags        the bridge, the VXLAN device and its underlay link carry the names given; pods attach
                 through the installed shims and reach the other node; tx-checksumming is off on the VXLAN
                 device (`ethtool -k` in n0), and stays off when set on by hand or the device is re-created
    lease TTL    the lease record in the store has TTL 6 and its expiry moves on within 3 s (renewed at a third)
    reconcile    n0 reconciles every 0.25 s, n1 (default 10 s) not in the same window
    log file     the log goes to FILE, not stderr; SIGUSR1 writes every thread's stack there, and the agent lives on
    notify       READY=1 once serving
    SIGKILL      entries stay in the kernel and traffic flows while the agent is dead; the restarted agent
                 (stale socket in place) keeps subnet and VTEP MAC, sends READY=1, serves requests again
    SIGTERM      STOPPING=1, exit status 0

Every agent is stopped by PID (the topology's teardown), also on failure; every namespace is the test's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Iterator

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from multinode import UNDERLAY_BRIDGE, cluster_topology, converged, wait_agent_ready, wait_for  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

PYCNI = os.path.join(os.path.dirname(sys.executable), "pycni")
NETWORK = "10.244.0.0/16"
BRIDGE, VXLAN, UNDERLAY = "afbr0", "afvx.1", "eth1"
SECOND_ADDRESS = "192.168.100.40/24"  # n0's eth1
LEASE_TTL = 6
RECONCILE = 0.25


# ---- helpers ---------------------------------------------------------------------------------


class NotifySocket:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.received: list[str] = []

    def wait_for(self, line: str, timeout: float = 20.0) -> list[str]:
        """Read messages (bounded) until one carries ``line``; every message read."""
        deadline = time.monotonic() + timeout
        while line not in "\n".join(self.received).splitlines():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {line!r} on the notify socket within {timeout} s: {self.received}")
            self.sock.settimeout(left)
            try:
                self.received.append(self.sock.recv(4096).decode())
            except socket.timeout:
                continue
        return self.received

    def drain(self) -> None:
        self.received.clear()
        self.sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(100):
                self.sock.recv(4096)
        self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


def tx_checksumming(node) -> str:
    """`ethtool -k DEV` in the node: "on" or "off" for tx-checksumming (pyroute2 without the ethtool binary)."""
    if shutil.which("ethtool"):
        out = node.run("ethtool", "-k", VXLAN).stdout
        line = next(line for line in out.splitlines() if line.startswith("tx-checksumming:"))
        return line.split(":", 1)[1].split()[0]
    from pyroute2.ethtool import Ethtool  # an implementation independent of pycni's ioctl

    with node.enter():
        tool = Ethtool()
        try:
            features = tool.get_features(VXLAN).features
        finally:
            tool.close()
    return "on" if any(f.enable for name, f in features.items() if name.startswith("tx-checksum")) else "off"


def agent_status(node) -> dict:
    from pycni.agent.client import status

    return status(node.socket, timeout=5.0)


def lease_record(store_dir: str, subnet: str) -> dict:
    with open(os.path.join(store_dir, "subnets", subnet.replace("/", "-"))) as fh:
        return json.load(fh)


def entries(node, dev: str) -> tuple[set, set, set]:
    fdb = {
        (e["mac"], e["dst"])
        for e in json.loads(node.run("bridge", "-j", "fdb", "show", "dev", dev).stdout or "[]")
        if e.get("dst") and e.get("state") == "permanent"
    }
    neigh = {
        (e["dst"], e["lladdr"]) for e in node.ip_json("neigh", "show", "dev", dev) if "PERMANENT" in e.get("state", [])
    }
    routes = {
        (e["dst"], e.get("gateway"))
        for e in node.ip_json("route", "show", "dev", dev)
        if "onlink" in e.get("flags", [])
    }
    return fdb, neigh, routes


@contextlib.contextmanager
def notify_env(path: str) -> Iterator[None]:
    """NOTIFY_SOCKET in this process's environment while an agent starts (start_agent copies os.environ)."""
    old = os.environ.get("NOTIFY_SOCKET")
    os.environ["NOTIFY_SOCKET"] = path
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("NOTIFY_SOCKET", None)
        else:
            os.environ["NOTIFY_SOCKET"] = old


class Flagged:
    def __init__(self, topo, store_dir: str, notify: NotifySocket) -> None:
        self.topo, self.store_dir, self.notify = topo, store_dir, notify
        self.store_url = "file://" + store_dir
        self.n0, self.n1 = topo.nodes
        self.log_file = topo.path("n0-agent-file.log")
        self.bin_dir = topo.path("n0-bin")
        self.ipam_dir = topo.path("n0-ipam")
        self.agent = None
        self.args = (
            "--log-file",
            self.log_file,
            "--log-level",
            "debug",
            "--bridge",
            BRIDGE,
            "--vxlan-device",
            VXLAN,
            "--underlay-device",
            UNDERLAY,
            "--lease-ttl",
            str(LEASE_TTL),
            "--reconcile-interval",
            str(RECONCILE),
            "--disable-tx-checksum-offload",
        )

    def start_n0(self):
        with notify_env(self.notify.path):
            self.agent = self.topo.start_agent(self.n0, self.store_url, extra_args=self.args)
        return self.agent

    def state(self, node) -> dict:
        state = node.read_state()
        assert state, f"{node.name} has no overlay state"
        return state

    def attach_pod(self, tag: str):
        """A pod on n0 through the installed vxlan shim (served by n0's agent); its namespace and address."""
        name, path = self.topo.add_namespace(tag)
        conf = {
            "cniVersion": "1.0.0",
            "name": "afnet",
            "type": "vxlan",
            "stateDir": self.n0.state_dir,
            "dataDir": self.ipam_dir,
        }
        env = {
            "PATH": os.environ["PATH"],
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": tag,
            "CNI_NETNS": path,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": self.bin_dir,
            "CNI_ARGS": "",
        }
        done = subprocess.run(
            ["ip", "netns", "exec", self.n0.name, os.path.join(self.bin_dir, "vxlan")],
            input=json.dumps(conf),
            text=True,
            capture_output=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "running the plugin in this process" not in done.stderr, done.stderr  # the shim's cold note
        result = json.loads(done.stdout)
        return name, result["ips"][0]["address"].split("/")[0]


@pytest.fixture(scope="module")
def flagged() -> Iterator[Flagged]:
    with cluster_topology(2, "af") as topo:
        n0, n1 = topo.nodes
        # n0's second underlay port: --underlay-device names it, while --public-ip stays on eth0.
        n0.ip("link", "add", UNDERLAY, "type", "veth", "peer", "name", "n0b", "netns", topo.underlay)
        topo_ip = ("ip", "-n", topo.underlay)
        subprocess.run([*topo_ip, "link", "set", "n0b", "master", UNDERLAY_BRIDGE, "up"], check=True, timeout=30)
        n0.ip("addr", "add", SECOND_ADDRESS, "dev", UNDERLAY)
        n0.ip("link", "set", UNDERLAY, "up")
        store_dir = topo.path("store")
        init = n0.run(PYCNI, "cluster", "init", "--store", "file://" + store_dir, "--network", NETWORK, check=False)
        assert init.returncode == 0, init.stderr
        notify = NotifySocket(topo.path("notify.sock"))
        try:
            f = Flagged(topo, store_dir, notify)
            f.start_n0()
            topo.start_agent(n1, f.store_url)
            wait_for(lambda: converged(topo.nodes), 20, what="both nodes routing each other's subnet")
            subprocess.run(
                [PYCNI, "install", "--cni-bin-dir", f.bin_dir, "--agent-socket", n0.socket],
                check=True,
                capture_output=True,
                timeout=120,
            )
            yield f
        finally:
            notify.close()


# ---- tests ---------------------------------------------------------------------------------------


def test_bridge_vxlan_device_and_underlay_device_carry_the_names_given(flagged):
    f = flagged
    state = f.state(f.n0)
    assert (state["bridge"], state["vxlanDevice"]) == (BRIDGE, VXLAN)
    link = f.n0.ip_json("-d", "link", "show", VXLAN)[0]
    assert link["linkinfo"]["info_kind"] == "vxlan"
    assert link["linkinfo"]["info_data"]["local"] == f.n0.public_ip
    assert link["linkinfo"]["info_data"]["link"] == UNDERLAY, link  # eth1, not eth0 (which holds --public-ip)
    bridge = f.n0.ip_json("-d", "link", "show", BRIDGE)[0]
    assert bridge["linkinfo"]["info_kind"] == "bridge"
    assert [a["local"] for a in f.n0.ip_json("addr", "show", BRIDGE)[0]["addr_info"] if a["family"] == "inet"] == [
        state["gateway"]
    ]
    names = {l["ifname"] for l in f.n0.ip_json("link", "show")}
    assert "pycni0" not in names and "pycni.1" not in names
    assert {"pycni0", "pycni.1"} <= {l["ifname"] for l in f.n1.ip_json("link", "show")}  # n1: the defaults
    status = agent_status(f.n0)["overlay"]
    assert status["underlay"] == UNDERLAY and status["bridge"] == BRIDGE
    # n1 knows n0 by its --public-ip, and a pod on n0 (attached by the warm shim) reaches n1 across the overlay.
    n1_state = f.state(f.n1)
    pod, address = f.attach_pod("p0")
    assert (
        subprocess.run(
            ["ip", "netns", "exec", pod, "ping", "-c", "1", "-W", "2", n1_state["gateway"]],
            capture_output=True,
            timeout=30,
        ).returncode
        == 0
    )
    assert f.n1.ping(address)


def test_tx_checksum_offload_is_off_on_the_vxlan_device_and_kept_off(flagged):
    f = flagged
    assert tx_checksumming(f.n0) == "off"
    # n1 runs without the flag: the kernel's default (on) stays.
    if shutil.which("ethtool"):
        assert "tx-checksumming: on" in f.n1.run("ethtool", "-k", "pycni.1").stdout
        # Turned on by hand (other software, an operator): the agent owns the attribute and sets it back.
        f.n0.run("ethtool", "-K", VXLAN, "tx", "on")
        wait_for(
            lambda: tx_checksumming(f.n0) == "off",
            3,
            interval=0.05,
            what="tx-checksumming turned off again after `ethtool -K tx on`",
        )
    # The device deleted: re-created with the offload off again.
    mac = f.state(f.n0)["vtepMAC"]
    f.n0.ip("link", "del", VXLAN)
    wait_for(lambda: bool(f.n0.ip("link", "show", VXLAN, check=False).returncode == 0), 5, what=f"{VXLAN} re-created")
    wait_for(lambda: f.n0.ip_json("link", "show", VXLAN)[0]["address"] == mac, 5, what="the VTEP MAC back")
    assert tx_checksumming(f.n0) == "off"


def test_lease_ttl_is_the_lease_records_ttl_and_it_is_renewed_at_a_third(flagged):
    f = flagged
    subnet = f.state(f.n0)["subnet"]
    first = lease_record(f.store_dir, subnet)
    assert first["ttl"] == LEASE_TTL
    assert 0 < first["expires"] - time.time() <= LEASE_TTL + 0.5
    # Renewal every 2 s: within 3 s the expiry has moved on (a keep-alive at the TTL or later would not).
    wait_for(
        lambda: lease_record(f.store_dir, subnet)["expires"] > first["expires"] + 0.5,
        3,
        interval=0.1,
        what="the lease's expiry to move on",
    )
    assert lease_record(f.store_dir, subnet)["ttl"] == LEASE_TTL
    assert lease_record(f.store_dir, f.state(f.n1)["subnet"])["ttl"] == 86400  # n1: the default
    assert agent_status(f.n0)["overlay"]["lease"] == "valid"


def test_reconcile_interval_sets_how_often_the_kernel_is_checked(flagged):
    f = flagged
    before = (agent_status(f.n0)["overlay"]["reconciles"], agent_status(f.n1)["overlay"]["reconciles"])
    time.sleep(2.0)
    after = (agent_status(f.n0)["overlay"]["reconciles"], agent_status(f.n1)["overlay"]["reconciles"])
    n0_runs, n1_runs = after[0] - before[0], after[1] - before[1]
    assert n0_runs >= 4, f"n0 reconciled {n0_runs} times in 2 s at a {RECONCILE} s interval"
    assert n0_runs <= 2.0 / RECONCILE + 3
    assert n1_runs <= 1, f"n1 (10 s interval) reconciled {n1_runs} times in 2 s"


def test_the_log_goes_to_the_log_file_and_sigusr1_dumps_every_threads_stack_there(flagged):
    f = flagged
    with open(f.log_file, errors="replace") as fh:
        text = fh.read()
    assert "leased" in text and f"pycni-agent[{f.agent.pid}]" in text
    with open(f.n0.log_path, errors="replace") as fh:
        stderr = fh.read()
    assert "leased" not in stderr and "pycni-agent[" not in stderr, stderr[-2000:]
    threads = len(os.listdir(f"/proc/{f.agent.pid}/task"))
    size = os.path.getsize(f.log_file)
    os.kill(f.agent.pid, signal.SIGUSR1)

    def dumped() -> str:
        with open(f.log_file, errors="replace") as fh:
            fh.seek(size)
            return fh.read()

    wait_for(
        lambda: dumped().count("File ") > 0 and "most recent call first" in dumped(),
        5,
        what="the stack dump in the log file",
    )
    time.sleep(0.2)  # the dump is written in one go from the signal handler; let it finish
    dump = dumped()
    stacks = dump.count("most recent call first")
    assert stacks >= min(threads, 3), dump  # one per thread: the main thread, the overlay loop, servers...
    assert "Current thread" in dump and "serve_forever" in dump and "pycni/overlay/node.py" in dump, dump
    assert f.agent.running()
    assert agent_status(f.n0)["pid"] == f.agent.pid


def test_systemd_notify_says_ready_once_serving(flagged):
    received = flagged.notify.wait_for("READY=1", timeout=5)
    assert "STOPPING=1" not in "\n".join(received)


def test_sigkill_keeps_the_datapath_and_a_restart_keeps_subnet_mac_and_serves_again(flagged):
    f = flagged
    before = f.state(f.n0)
    n0_entries, n1_entries = entries(f.n0, VXLAN), entries(f.n1, "pycni.1")
    assert all(n0_entries) and all(n1_entries)
    f.notify.drain()
    f.agent.stop(sigterm=False)  # SIGKILL: no clean-up at all
    assert f.agent.proc.returncode == -signal.SIGKILL
    assert os.path.exists(f.n0.socket)  # a stale socket left behind
    # Dead agent: the kernel keeps every entry, traffic keeps flowing, a pod attached before still reaches n1.
    assert entries(f.n0, VXLAN) == n0_entries and entries(f.n1, "pycni.1") == n1_entries
    assert f.n1.ping(before["gateway"])
    handle = f.start_n0()
    wait_agent_ready(handle)
    f.notify.wait_for("READY=1", timeout=10)
    after = f.state(f.n0)
    assert (after["subnet"], after["vtepMAC"]) == (before["subnet"], before["vtepMAC"])
    assert f.n0.ip_json("link", "show", VXLAN)[0]["address"] == before["vtepMAC"]
    wait_for(lambda: entries(f.n0, VXLAN) == n0_entries, 5, what="n0's entries as before")
    assert entries(f.n1, "pycni.1") == n1_entries
    served = agent_status(f.n0)["requests"]["served"]
    pod, address = f.attach_pod("p1")
    assert agent_status(f.n0)["requests"]["served"] > served  # the restarted agent served the ADD
    assert f.n1.ping(address)
    assert (
        subprocess.run(
            ["ip", "netns", "exec", pod, "ping", "-c", "1", "-W", "2", f.state(f.n1)["gateway"]],
            capture_output=True,
            timeout=30,
        ).returncode
        == 0
    )


def test_sigterm_says_stopping_and_exits_cleanly(flagged):
    f = flagged
    f.notify.drain()
    assert f.agent.stop() == 0
    f.notify.wait_for("STOPPING=1", timeout=5)
    assert not os.path.exists(f.n0.socket)
