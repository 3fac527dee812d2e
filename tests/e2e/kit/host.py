"""A test "host": the network namespace a runtime runs in, with a private mount namespace.

``Host`` makes three things and removes them again, also when a test fails:

- a network namespace (``pt-e2eh-<hex>``) standing in for the node;
- a *holder* process inside it that owns a new mount namespace in which
  ``/sys`` shows the host namespace's devices (cgroups kept), and ``/run`` and
  ``/var/lib`` are private tmpfs mounts. Everything a runtime keeps at fixed
  paths (``/run/netns/cni-*`` pod namespaces, ``/run/containerd/s`` shim
  sockets, ``/run/libpod``, libcni's ``/var/lib/cni`` result cache, iptables'
  lock) lands there and dies with the holder. ``run()``/``popen()`` execute a
  command in both of the host's namespaces (``nsenter -t HOLDER -m -n``);
  ``path()`` reads a host-private file from outside (``/proc/HOLDER/root/...``);
- an "outside" network namespace (``pt-e2eo-<hex>``) linked to the host by a
  veth pair (``HOST_IP`` on the host, ``OUTSIDE_IP`` outside, which routes
  everything through the host): the place a hostPort is reached from.

Nothing here touches the machine's root network namespace: links are created
with ``ip -n HOST``, and the only link crosses from the host to the outside
namespace.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import netns

from . import procs

HOST_IP = "10.250.0.1"
OUTSIDE_IP = "10.250.0.2"
OUTSIDE_LINK = "e2e-out"  # the host's end of the link to the outside namespace

# Run by the holder, already in the host's network namespace and in a new mount namespace.
_HOLDER_SCRIPT = r"""
set -eu
work="$1"
mkdir -p "$work/cgroup"
mount --rbind /sys/fs/cgroup "$work/cgroup"
mount -t sysfs sysfs /sys
mount --move "$work/cgroup" /sys/fs/cgroup
mount -t tmpfs -o mode=0755 e2e-run /run
mkdir -p /run/netns /run/lock /run/user
mount -t tmpfs -o mode=0755 e2e-varlib /var/lib
mkdir -p /var/lib/cni
echo ready
exec sleep 3600
"""


# A client that needs no name service (busybox-static's wget can crash on the host's NSS modules).
_HTTP_GET = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as reply:
    sys.stdout.write(reply.read().decode())
"""


class Host:
    """A host namespace pair and its outside namespace; ``close()`` removes all of it."""

    def __init__(self, workdir: str | os.PathLike[str]):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        self.holder: subprocess.Popen | None = None
        # PIDs of processes that belong to the host rather than to one runtime (a node's `pycni agent`):
        # a runtime's clean-up leaves them running; close() stops them too.
        self.resident: set[int] = set()
        try:
            self.ns = self._stack.enter_context(netns.temporary("pt-e2eh"))
            self.outside_ns = self._stack.enter_context(netns.temporary("pt-e2eo"))
            self._start_holder()
            self._link_outside()
        except BaseException:
            self.close()
            raise

    # ---- names and paths ------------------------------------------------------------
    @property
    def name(self) -> str:
        """The host's `ip netns` name."""
        return self.ns.name

    @property
    def outside(self) -> str:
        """The outside namespace's `ip netns` name."""
        return self.outside_ns.name

    def path(self, inside: str) -> Path:
        """A path as the host's mount namespace sees it, readable from here."""
        assert self.holder is not None
        return Path(f"/proc/{self.holder.pid}/root") / inside.lstrip("/")

    # ---- running things --------------------------------------------------------------
    def argv(self, *argv: str) -> list[str]:
        assert self.holder is not None
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *argv]

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the host (its network and mount namespaces)."""
        return procs.run(self.argv(*argv), check=check, timeout=timeout, input=input, env=env)

    def popen(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> subprocess.Popen:
        """Start a long-lived command in the host; its output goes to log (or nowhere)."""
        out = open(log, "ab") if log is not None else subprocess.DEVNULL
        try:
            return subprocess.Popen(
                self.argv(*argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=None if env is None else dict(env),
                start_new_session=True,
            )
        finally:
            if log is not None:
                out.close()

    def net(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command in the host's network namespace only (`ip netns exec`)."""
        return procs.run(["ip", "netns", "exec", self.name, *argv], check=check, timeout=timeout)

    def from_outside(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return procs.run(["ip", "netns", "exec", self.outside, *argv], check=check, timeout=timeout)

    def http_get(self, url: str, *, where: str = "host", timeout: float = 3) -> str | None:
        """GET url from the host ("host") or the outside namespace ("outside"): the body, or None."""
        return http_get(url, ns={"host": self.name, "outside": self.outside}[where], timeout=timeout)

    def processes(self, with_resident: bool = False) -> list[int]:
        """Every process in the host's mount namespace except the holder (the runtime's own and children)
        and, unless with_resident, the host's resident ones."""
        pids = [] if self.holder is None else procs.pids_in_mount_ns(self.holder.pid)
        return pids if with_resident else [pid for pid in pids if pid not in self.resident]

    # ---- set-up and tear-down -----------------------------------------------------
    def _start_holder(self) -> None:
        argv = [
            "nsenter",
            f"--net={self.ns.path}",
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            _HOLDER_SCRIPT,
            "holder",
            str(self.workdir),
        ]
        self.holder = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        line = self.holder.stdout.readline() if self.holder.stdout else ""
        if line.strip() != "ready":
            procs.stop_popen(self.holder)
            err = self.holder.stderr.read() if self.holder.stderr else ""
            self.holder = None
            raise RuntimeError(f"could not set up the host's mount namespace: {line!r} {err.strip()}")

    def _link_outside(self) -> None:
        ip = ["ip", "-n", self.name]
        procs.run([*ip, "link", "set", "lo", "up"])
        procs.run([*ip, "link", "add", OUTSIDE_LINK, "type", "veth", "peer", "name", "eth0", "netns", self.outside])
        procs.run([*ip, "addr", "add", f"{HOST_IP}/24", "dev", OUTSIDE_LINK])
        procs.run([*ip, "link", "set", OUTSIDE_LINK, "up"])
        out = ["ip", "-n", self.outside]
        procs.run([*out, "link", "set", "lo", "up"])
        procs.run([*out, "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0"])
        procs.run([*out, "link", "set", "eth0", "up"])
        procs.run([*out, "route", "add", "default", "via", HOST_IP])
        self.net("sysctl", "-qw", "net.ipv4.ip_forward=1")

    def stop_processes(self, with_resident: bool = False) -> None:
        """Stop, by PID, whatever still runs in the host's mount namespace (shims, conmon, servers; the
        resident processes too with with_resident)."""
        for _ in range(3):
            pids = self.processes(with_resident)
            if not pids:
                return
            procs.kill_all(pids)

    def close(self) -> None:
        try:
            self.stop_processes(with_resident=True)
        finally:
            procs.stop_popen(self.holder, timeout=5)
            if self.holder is not None:
                for stream in (self.holder.stdout, self.holder.stderr):
                    if stream:
                        stream.close()
            self.holder = None
            self._stack.close()

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def http_get(url: str, *, ns: str, timeout: float = 3) -> str | None:
    """GET url from inside the test namespace ns (an `ip netns` name): the body, or None."""
    proc = procs.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _HTTP_GET, url, str(timeout)],
        check=False,
        timeout=timeout + 15,
    )
    return proc.stdout if proc.returncode == 0 else None


def wait_for(predicate, *, timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    """Poll predicate (bounded) until it is true; AssertionError naming what after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
