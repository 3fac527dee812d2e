"""A multi-node cluster whose nodes attach pods through their own CNI directories (conformance, inspect).

Built on tests/multinode.py: node namespaces on an underlay bridge, one agent
each against a cluster store (a file store, or etcd in the underlay
namespace), converged; every node with its own CNI bin dirs (`pycni install`
with the agent, and a cold one), network configuration (the example vxlan
conflist: vxlan + portmap + bandwidth) and result cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import pytest

from pycni.procs import stop as stop_process

from multinode import (
    UNDERLAY_BRIDGE,
    UNDERLAY_GATEWAY,
    AgentHandle,
    Node,
    Topology,
    cluster_topology,
    converged,
    wait_for,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYCNI = os.path.join(os.path.dirname(sys.executable), "pycni")
CLUSTER_NETWORK = "10.244.0.0/16"
NET_NAME = "pycni-vxlan"
EXAMPLE = os.path.join(REPO, "conf", "examples", "10-pycni-vxlan.conflist")
CONVERGE_TIMEOUT = 20.0
RUN_TIMEOUT = 120
CHECK_TIMEOUT = "2"
PASSING = {"pass", "skip"}


# ---- a cluster whose nodes attach pods through their own CNI directories -------------------


@dataclass
class PodCluster:
    topo: Topology
    store_url: str
    store_dir: str = ""  # the file store's directory ("" for etcd)
    agents: dict[str, AgentHandle] = field(default_factory=dict)

    @property
    def nodes(self) -> list[Node]:
        return self.topo.nodes

    def name(self, node: Node) -> str:
        return f"n{node.index}"

    def dir(self, node: Node, what: str) -> str:
        return self.topo.path(f"n{node.index}-{what}")

    def env(self, node: Node, cni_path: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_") and k != "NETCONFPATH"}
        env.update(
            NETCONFPATH=self.dir(node, "netd"),
            CNI_PATH=cni_path or self.dir(node, "bin"),
            CNI_CACHE_DIR=self.dir(node, "cache"),
        )
        return env

    def pycni(
        self, node: Node, *args: str, timeout: float = 120, cni_path: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", node.name, PYCNI, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(node, cni_path),
            stdin=subprocess.DEVNULL,
        )

    def subnet(self, node: Node) -> str:
        state = node.read_state()
        assert state, f"{node.name} has no overlay state"
        return state["subnet"]

    def conformance_command(self, node: Node, *extra: str) -> list[str]:
        """`pycni conformance run` for ``node`` against this cluster, ``extra`` after the network and state
        directory. nsenter switches only the network namespace: `ip netns exec` would also give the run a
        private mount namespace, where the probe pods' pins under /run/netns are invisible to the node agent."""
        return [
            "nsenter",
            f"--net={node.path}",
            PYCNI,
            "conformance",
            "run",
            "--store",
            self.store_url,
            "--network",
            NET_NAME,
            "--state-dir",
            node.state_dir,
            *extra,
        ]

    def conformance_runs(
        self,
        nodes: Sequence[Node] | None = None,
        args: Callable[[Node], Sequence[str]] = lambda _node: (),
        cni_paths: dict[str, str] | None = None,
        timeout: float = 90,
    ) -> dict[str, tuple[int, str, str]]:
        """`pycni conformance run` on every node (or ``nodes``) at once, each with ``args(node)`` after the
        network and state directory; {node name: (exit status, stdout, stderr)}. Each run is stopped by PID
        if it outlives ``timeout``."""
        procs = []
        for node in self.nodes if nodes is None else nodes:
            command = self.conformance_command(node, *args(node))
            env = self.env(node, (cni_paths or {}).get(node.name))
            procs.append(
                (
                    node,
                    subprocess.Popen(
                        command,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        env=env,
                        stdin=subprocess.DEVNULL,
                    ),
                )
            )
        outputs: dict[str, tuple[int, str, str]] = {}
        try:
            for node, proc in procs:
                out, err = proc.communicate(timeout=timeout)
                outputs[node.name] = (proc.returncode, out, err)
        finally:
            for _node, proc in procs:
                # SIGTERM first: the run then removes its probe pods; SIGKILL if it has not ended 20 s later.
                stop_process(proc, 20)
        return outputs


def example_conflist(node: Node, ipam_dir: str) -> dict:
    with open(EXAMPLE) as fh:
        conflist = json.load(fh)
    for plugin in conflist["plugins"]:
        if plugin["type"] == "vxlan":
            plugin["stateDir"] = node.state_dir
            plugin["dataDir"] = ipam_dir
    return conflist


UNDERLAY6_PREFIX = "fd70:7963::"  # the test underlay's IPv6 addresses ("py"): the bridge ::1, node i ::(10+i)


def give_ipv6_underlay(topo: Topology, node: Node) -> str:
    """An IPv6 address on the node's underlay link (the bridge gets ::1 once); returns it."""
    if not getattr(topo, "underlay6", False):
        subprocess.run(
            ["ip", "-n", topo.underlay, "addr", "add", f"{UNDERLAY6_PREFIX}1/64", "dev", UNDERLAY_BRIDGE, "nodad"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        topo.underlay6 = True  # type: ignore[attr-defined]
    address = f"{UNDERLAY6_PREFIX}{10 + node.index:x}"
    node.ip("addr", "add", f"{address}/64", "dev", "eth0", "nodad")
    return address


def agent_underlay(topo: Topology, node: Node, underlay: str) -> tuple[str, ...]:
    """Prepare a node's underlay for ``underlay`` ("ipv4", "ipv6": its --public-ip is IPv6, or "dual": an IPv4
    --public-ip and an IPv6 --public-ipv6); returns the extra agent flags."""
    if underlay == "ipv4":
        return ()
    address = give_ipv6_underlay(topo, node)
    if underlay == "ipv6":
        node.public_ip = address
        return ()
    return ("--public-ipv6", address)


@contextlib.contextmanager
def pod_cluster(
    n_nodes: int,
    store: str,
    prefix: str,
    *,
    network: str = CLUSTER_NETWORK,
    ipv6_network: str = "",
    underlay: str = "ipv4",
    init_args: Sequence[str] = (),
    prepare: Callable[[Topology], None] | None = None,
) -> Iterator[PodCluster]:
    """``n_nodes`` nodes with agents (named n0, n1, ...), converged, each with bin dirs and a conflist.

    ``ipv6_network`` makes the cluster dual-stack (with ``network=""``: IPv6 only); ``underlay`` is
    "ipv4", "ipv6" or "dual" (see ``agent_underlay``); ``init_args`` go to `pycni cluster init`;
    ``prepare`` changes the topology (say, the underlay's addressing) before the agents start.
    """
    with contextlib.ExitStack() as stack:
        topo = stack.enter_context(cluster_topology(n_nodes, prefix))
        store_dir = ""
        if store == "file":
            store_dir = topo.path("store")
            store_url = "file://" + store_dir
        else:
            from cluster_helpers import etcd_skip_reason, start_etcd

            reason = etcd_skip_reason()
            if reason:
                pytest.skip(reason)
            member = start_etcd(topo.underlay_path, UNDERLAY_GATEWAY, workdir=topo.path("etcd"))
            stack.callback(member.stop)
            store_url = member.url
        cluster = PodCluster(topo, store_url, store_dir)
        # Before the nodes go: probe pods that a conformance run left (one that was killed, or failed) are
        # namespaces of their own, pinned beside the nodes, so the topology's teardown would not take them.
        stack.callback(remove_leftover_probes, cluster)
        init = (["--network", network] if network else []) + (["--ipv6-network", ipv6_network] if ipv6_network else [])
        done = cluster.pycni(topo.nodes[0], "cluster", "init", "--store", store_url, *init, *init_args)
        assert done.returncode == 0, done.stdout + done.stderr
        cluster.underlay = underlay  # type: ignore[attr-defined]
        if prepare is not None:
            prepare(topo)
        for node in topo.nodes:
            extra = ("--node-name", f"n{node.index}", *agent_underlay(topo, node, underlay))
            cluster.agents[node.name] = topo.start_agent(node, store_url, extra_args=extra)
        wait_for(lambda: converged(topo.nodes), CONVERGE_TIMEOUT, what="every node routing every other subnet")
        for node in topo.nodes:
            for args in (
                ("--cni-bin-dir", cluster.dir(node, "bin"), "--agent-socket", node.socket),
                ("--cni-bin-dir", cluster.dir(node, "coldbin"), "--no-agent"),
            ):
                done = subprocess.run([PYCNI, "install", *args], capture_output=True, text=True, timeout=60)
                assert done.returncode == 0, done.stderr
            os.makedirs(cluster.dir(node, "netd"))
            os.makedirs(cluster.dir(node, "ipam"))
            with open(os.path.join(cluster.dir(node, "netd"), f"10-{NET_NAME}.conflist"), "w") as fh:
                json.dump(example_conflist(node, cluster.dir(node, "ipam")), fh)
        yield cluster


def remove_leftover_probes(cluster: "PodCluster") -> None:
    """`pycni conformance clean` on every node whose conformance record still names probe pods: a run
    removes its own on exit and on SIGTERM, this covers one that was killed or cut short. clean runs in
    the node's network namespace (nsenter: the probe pins must stay visible), DELs each probe through
    the CNI runtime (its address, veth and port mappings go), deletes its namespace, and stops the echo
    services. Whatever it could not remove fails the teardown, naming it."""
    from pycni.conformance.probe import Record

    problems = []
    for node in cluster.nodes:
        record = Record.load(node.state_dir)
        if record is None or not (record.probes or record.echo_pids):
            continue
        done = subprocess.run(
            ["nsenter", f"--net={node.path}", PYCNI, "conformance", "clean", "--store", cluster.store_url,
             "--state-dir", node.state_dir],
            capture_output=True,
            text=True,
            timeout=120,
            env=cluster.env(node),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        if done.returncode != 0:
            problems.append(f"{node.name}: {done.stdout}{done.stderr}")
    assert not problems, "conformance probes left behind:\n" + "\n".join(problems)


def _lock_free(lock_path: str) -> bool:
    fd = os.open(lock_path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] in ("T", "t")


@contextlib.contextmanager
def agent_paused(handle: AgentHandle, store_dir: str) -> Iterator[None]:
    """SIGSTOP the agent (by PID) at a moment it holds no file-store lock; SIGCONT it on the way out."""
    lock = os.path.join(store_dir, ".lock")
    try:
        for _ in range(50):
            os.kill(handle.pid, signal.SIGSTOP)
            wait_for(lambda: _stopped(handle.pid), 5, what="the agent to stop")
            if _lock_free(lock):
                break
            os.kill(handle.pid, signal.SIGCONT)
            time.sleep(0.02)
        else:
            raise AssertionError("the agent kept holding the store lock")
        yield
    finally:
        os.kill(handle.pid, signal.SIGCONT)
