"""Probe pods: network namespaces attached to a CNI network the way a container runtime attaches pods.

A probe pod is a namespace pinned under /run/netns (``pycni-conf-<tag>-<role>``)
attached with the runtime code behind `pycni add` (the network's whole plugin
chain, the result cached for DEL), optionally with a hostPort mapping. What a
run created is recorded in ``<state-dir>/conformance.json`` before it is
created, so `pycni conformance clean` finds it after a crash; the echo
services' PIDs are recorded too.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from cni_plugins.kernel.files import write_atomically
from pycni import procs

RECORD_FILE = "conformance.json"
NETNS_PREFIX = "pycni-conf-"
CONTAINER_PREFIX = "pycni-conformance-"
ROLES = ("probe", "client", "churn")
ECHO_READY_TIMEOUT = 10.0
ECHO_STOP_TIMEOUT = 5.0


def node_tag(node_id: str, state_dir: str) -> str:
    """A short tag for the probes' names on this machine: one per node and state directory, so that
    network-namespace nodes sharing a machine (tests, demos) never share a probe name."""
    return hashlib.sha256(f"{node_id}\0{os.path.abspath(state_dir)}".encode()).hexdigest()[:8]


def probe_netns_names(node_id: str, state_dir: str) -> list[str]:
    """The namespace names a run of this node uses for its probe pods."""
    tag = node_tag(node_id, state_dir)
    return [f"{NETNS_PREFIX}{tag}-{role}" for role in ROLES]


@dataclass
class ProbeRecord:
    role: str  # one of ROLES
    netns: str  # pinned path
    container_id: str
    ifname: str = "eth0"
    address: str = ""
    host_ifname: str = ""  # the host end of its veth, when the result names one
    addresses: list[str] = field(default_factory=list)  # every address the result gave it (one per family)

    def address_of(self, version: int) -> str:
        """The pod's address of IP ``version`` ("" when it has none)."""
        return next((a for a in self.addresses or [self.address] if a and (":" in a) == (version == 6)), "")


@dataclass
class Record:
    """What this node's run created; kept in the state directory until it is removed."""

    network: str
    netconf_path: str
    cni_path: str
    cache_dir: str
    probes: list[ProbeRecord] = field(default_factory=list)
    echo_pids: list[int] = field(default_factory=list)

    def save(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o755, exist_ok=True)
        write_atomically(os.path.join(state_dir, RECORD_FILE), json.dumps(asdict(self), indent=2).encode(), 0o644)

    @classmethod
    def load(cls, state_dir: str) -> "Record | None":
        try:
            with open(os.path.join(state_dir, RECORD_FILE)) as fh:
                data = json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None
        known = set(ProbeRecord.__dataclass_fields__)
        probes = [
            ProbeRecord(**{k: v for k, v in p.items() if k in known})
            for p in data.get("probes", [])
            if isinstance(p, dict)
        ]
        return cls(
            network=data.get("network", ""),
            netconf_path=data.get("netconf_path", ""),
            cni_path=data.get("cni_path", ""),
            cache_dir=data.get("cache_dir", ""),
            probes=probes,
            echo_pids=[int(p) for p in data.get("echo_pids", [])],
        )

    @staticmethod
    def remove(state_dir: str) -> None:
        try:
            os.unlink(os.path.join(state_dir, RECORD_FILE))
        except FileNotFoundError:
            pass


def visible_to_init(path: str) -> bool:
    """True if the process manager (PID 1) sees the namespace pinned at ``path``, i.e. the pin was not
    made inside a private mount namespace that nobody else sees."""
    import netns

    try:
        if os.stat("/proc/self/ns/mnt").st_ino == os.stat("/proc/1/ns/mnt").st_ino:
            return True
        return netns.is_netns("/proc/1/root" + path)
    except OSError:
        return True  # cannot tell (no access to PID 1): assume the usual case


def has_port_mappings(netlist: Any) -> bool:
    """True if a plugin of the network takes the portMappings capability (portmap)."""
    return any((plugin.get("capabilities") or {}).get("portMappings") for plugin in netlist.plugins)


class ProbePods:
    """Creates and removes this node's probe pods through the CNI runtime."""

    def __init__(self, record: Record, state_dir: str, tag: str) -> None:
        from conf import load_conflist
        from pycni.runtime import CNIRuntime

        self.record = record
        self.state_dir = state_dir
        self.tag = tag
        self.netlist = load_conflist(record.network, record.netconf_path or None)
        self.runtime = CNIRuntime(record.cni_path or None, record.cache_dir or None)

    def add(self, role: str, port_mappings: list[dict[str, Any]] | None = None) -> ProbeRecord:
        """A fresh namespace attached to the network; returns its record with the pod's address."""
        import netns
        from pycni.runtime import RuntimeConf

        name = f"{NETNS_PREFIX}{self.tag}-{role}"
        probe = ProbeRecord(role=role, netns=netns.path_of(name), container_id=f"{CONTAINER_PREFIX}{self.tag}-{role}")
        self.record.probes = [p for p in self.record.probes if p.role != role] + [probe]
        self.record.save(self.state_dir)
        if netns.exists(name):  # left over from a run that did not finish
            self._delete(probe)
        netns.create(name)
        if not visible_to_init(probe.netns):
            netns.delete(name)
            raise RuntimeError(
                f"this process runs in a private mount namespace (`ip netns exec`?): the probe pod's pin "
                f"{probe.netns} is invisible to the node agent and other processes; switch only the network "
                f"namespace instead (nsenter --net=/run/netns/NODE pycni conformance run ...)"
            )
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], capture_output=True, timeout=10, check=False)
        caps = {"portMappings": port_mappings} if port_mappings else {}
        rt = RuntimeConf(container_id=probe.container_id, netns=probe.netns, ifname=probe.ifname, capability_args=caps)
        try:
            result = self.runtime.add(self.netlist, rt)
        except BaseException:
            self._delete(probe)
            raise
        ips = result.get("ips") or []
        probe.addresses = [ip["address"].split("/")[0] for ip in ips if isinstance(ip, dict) and ip.get("address")]
        if not probe.addresses:
            self._delete(probe)
            raise RuntimeError(f"network {self.netlist.name!r} gave the probe pod no address")
        probe.address = probe.addresses[0]
        hosts = [
            i.get("name", "") for i in result.get("interfaces") or [] if isinstance(i, dict) and not i.get("sandbox")
        ]
        probe.host_ifname = hosts[-1] if hosts else ""  # bridge results list the bridge, then the host veth
        self.record.save(self.state_dir)
        return probe

    def _delete(self, probe: ProbeRecord) -> list[str]:
        return delete_probe(self.runtime, self.netlist, probe)

    def remove(self, role: str) -> list[str]:
        """DEL one probe pod and forget it; returns what could not be removed."""
        problems = []
        for probe in [p for p in self.record.probes if p.role == role]:
            problems += self._delete(probe)
        self.record.probes = [p for p in self.record.probes if p.role != role]
        self.record.save(self.state_dir)
        return problems

    def remove_all(self) -> list[str]:
        problems = []
        for probe in list(self.record.probes):
            problems += self._delete(probe)
        self.record.probes = []
        return problems


def delete_probe(runtime: Any, netlist: Any, probe: ProbeRecord) -> list[str]:
    """DEL the attachment (idempotent), then delete the namespace; returns what could not be removed."""
    import netns
    from pycni.runtime import RuntimeConf

    problems = []
    rt = RuntimeConf(container_id=probe.container_id, netns=probe.netns, ifname=probe.ifname)
    if netlist is not None:
        try:
            runtime.delete(netlist, rt)
        except Exception as exc:  # the namespace goes anyway; say what stayed
            problems.append(f"DEL {probe.container_id}: {exc}")
    try:
        if netns.exists(probe.netns):
            netns.delete(probe.netns)
    except Exception as exc:
        problems.append(f"delete namespace {probe.netns}: {exc}")
    return problems


# ---- echo services ----------------------------------------------------------------------


@dataclass
class EchoProcess:
    proc: subprocess.Popen
    label: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM by PID, a bounded wait, then SIGKILL."""
        procs.stop(self.proc, ECHO_STOP_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_echo(netns_path: str | None, address: str, port: int, label: str, lifetime: float) -> EchoProcess:
    """The echo service as a child process, once it is listening."""
    import select

    args = [
        sys.executable,
        "-m",
        "pycni.conformance.echo",
        "--address",
        address,
        "--port",
        str(port),
        "--label",
        label,
        "--lifetime",
        f"{lifetime:.0f}",
    ]
    if netns_path:
        args += ["--netns", netns_path]
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True
    )
    echo = EchoProcess(proc, label)
    deadline = time.monotonic() + ECHO_READY_TIMEOUT
    line = b""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            break
    if line.strip() != b"ready":
        echo.stop()
        err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
        raise RuntimeError(
            f"the echo service for {label} on {address}:{port} did not start: "
            f"{err.splitlines()[-1] if err else 'no answer within %gs' % ECHO_READY_TIMEOUT}"
        )
    proc.stderr.close()
    return echo


def is_echo_process(pid: int) -> bool:
    """True if ``pid`` still runs our echo service (a recorded PID may have been reused since)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"pycni.conformance.echo" in fh.read()
    except OSError:
        return False
