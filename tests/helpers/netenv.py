"""Throwaway network namespaces: a Node stands in for a host, a Pod for a container.

Every namespace is made with the project's ``netns`` library under a tagged,
unique name (``pt-<role>-<8 hex>``) and deleted when its context closes, also
when the test fails. Deleting a node's namespace removes everything built in
it (bridges, veth host ends, firewall tables); a node deletes its pods first.
Nothing here creates or changes anything in the machine's own namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import netns

from .plugins import REFERENCE_DIR, Outcome, run_plugin, run_pycni

T = TypeVar("T")

TAG = "pt"  # every test namespace's name starts with this


def sh(
    *args: str, check: bool = True, timeout: float = 30, input: str | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command (text in and out, output captured); raise on failure unless check=False."""
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
        input=input,
        env=None if env is None else dict(env),
    )


def ns_name(ns: Any) -> str:
    """The `ip netns` name of a Node, Pod, netns.Namespace, pinned path or name."""
    if isinstance(ns, (Netns, netns.Namespace)):
        return ns.name
    text = os.fspath(ns)
    if os.path.dirname(text) == netns.RUN_DIR.rstrip("/"):
        return os.path.basename(text)
    if "/" in text:
        raise ValueError(f"{text!r} is not a namespace pinned under {netns.RUN_DIR}")
    return text


def in_ns(ns: Any, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command inside a test namespace (`ip netns exec`)."""
    return sh("ip", "netns", "exec", ns_name(ns), *args, check=check, timeout=timeout)


def netns_list() -> list[str]:
    """The names `ip netns list` shows."""
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in sh("ip", "netns", "list").stdout.splitlines() if line.strip()]


def ping(ns: Any, target: str, *, wait: float = 2, count: int = 1) -> bool:
    """One ping (IPv6 for an address with ':') from inside ns; True if answered."""
    flag = ["-6"] if ":" in target else []
    return in_ns(ns, "ping", *flag, "-c", str(count), "-W", str(wait), target, check=False).returncode == 0


def wait_until(predicate: Callable[[], bool], *, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll predicate until it holds or timeout seconds pass (bounded); its last answer."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(interval)
    return True


@dataclass(eq=False)
class Netns:
    """A test namespace."""

    ns: netns.Namespace

    @property
    def name(self) -> str:
        return self.ns.name

    @property
    def path(self) -> str:
        return self.ns.path

    def __fspath__(self) -> str:
        return self.ns.path

    def exec(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command in this namespace (`ip netns exec`)."""
        return in_ns(self, *args, check=check, timeout=timeout)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`ip -n <this> <args>`."""
        return sh("ip", "-n", self.name, *args, check=check)

    def run_in(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call fn in this namespace, in this process (netns.run_in)."""
        return netns.run_in(self.path, fn, *args, **kwargs)


class Pod(Netns):
    """A namespace standing in for a container."""


@dataclass(eq=False)
class Node(Netns):
    """A namespace standing in for a host, with its own directories under root.

    ipam_dir (host-local's dataDir; created), cache_dir (the runtime's cache;
    not created, the runtime makes it), conf_dir (network configs for `pycni`;
    created). cni_path is where this node's runtime finds plugins by type.
    """

    root: Path
    cni_path: str = REFERENCE_DIR
    pods: list[Pod] = field(default_factory=list)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    @property
    def ipam_dir(self) -> Path:
        return self.root / "ipam"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def conf_dir(self) -> Path:
        return self.root / "net.d"

    def pod(self, tag: str = "pod") -> Pod:
        """A new pod namespace, deleted with this node (before the node's own namespace)."""
        pod = self._stack.enter_context(temporary_pod(tag))
        self.pods.append(pod)
        return pod

    def close(self) -> None:
        """Delete this node's pods (the node's namespace is deleted by whoever made it)."""
        self._stack.close()

    # ---- host-local and configs ---------------------------------------------------
    def host_local(self, **fields: Any) -> dict:
        """An ipam section for host-local keeping its leases in this node's ipam_dir."""
        return {"type": "host-local", "dataDir": str(self.ipam_dir), **fields}

    def leases(self, network: str) -> list[str]:
        """Addresses host-local holds for network in ipam_dir (lock and round-robin files left out)."""
        path = self.ipam_dir / network
        if not path.is_dir():
            return []
        return sorted(f for f in os.listdir(path) if f != "lock" and not f.startswith("last_reserved_ip"))

    def write_network(self, raw: dict) -> Path:
        """Write a network config list to conf_dir as 10-<name>.conflist."""
        path = self.conf_dir / f"10-{raw['name']}.conflist"
        path.write_text(json.dumps(raw))
        return path

    # ---- running plugins and the runtime --------------------------------------------
    def run(
        self, plugin_type: str, command: str, conf: Mapping[str, Any] | None, pod: Pod | None = None, **kwargs: Any
    ) -> Outcome:
        """Run <cni_path>/<plugin_type> in this node with CNI_PATH=cni_path and CNI_NETNS=pod's path.

        Other keywords go to run_plugin (container_id, ifname, args, netns when pod is None, env).
        """
        if pod is not None:
            kwargs["netns"] = pod.path
        return run_plugin(
            os.path.join(self.cni_path, plugin_type), command, conf, node=self, path=self.cni_path, **kwargs
        )

    def pycni(self, *args: str, cap_args: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`pycni <args>` in this node with conf_dir, cni_path and cache_dir."""
        return run_pycni(
            *args,
            node=self,
            conf_dir=self.conf_dir,
            cni_path=self.cni_path,
            cache_dir=self.cache_dir,
            cap_args=cap_args,
            timeout=timeout,
        )


@contextlib.contextmanager
def temporary_pod(tag: str = "pod") -> Iterator[Pod]:
    """A pod namespace named pt-<tag>-<8 hex>, deleted on exit."""
    with netns.temporary(f"{TAG}-{tag}") as ns:
        yield Pod(ns)


@contextlib.contextmanager
def temporary_node(
    tag: str = "node", *, root: str | os.PathLike[str] | None = None, cni_path: str = REFERENCE_DIR
) -> Iterator[Node]:
    """A node namespace named pt-<tag>-<8 hex> with its directories, deleted on exit with its pods.

    root: where its directories go (a subdirectory named after the namespace
    is made there); None: a temporary directory removed on exit.
    """
    with contextlib.ExitStack() as stack:
        ns = stack.enter_context(netns.temporary(f"{TAG}-{tag}"))
        if root is None:
            base = tempfile.mkdtemp(prefix=f"{ns.name}-")
            stack.callback(shutil.rmtree, base, ignore_errors=True)
            node_root = Path(base)
        else:
            node_root = Path(root) / ns.name
            node_root.mkdir(parents=True)
        node = Node(ns, root=node_root, cni_path=cni_path)
        node.ipam_dir.mkdir()
        node.conf_dir.mkdir()
        stack.callback(node.close)  # pods go before the node's namespace
        yield node
