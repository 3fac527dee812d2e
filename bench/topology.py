"""Small `ip` helpers for links inside benchmark namespaces (never the root one)."""

from __future__ import annotations

import json
import subprocess

from .spawn import IP


def ip(ns: str, *args: str) -> str:
    """Run `ip -n NS ARGS...`; always scoped to a namespace."""
    proc = subprocess.run([IP, "-n", ns, *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip -n {ns} {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def set_up(ns: str, link: str) -> None:
    ip(ns, "link", "set", link, "up")


def addresses(ns: str, link: str) -> list[str]:
    out = json.loads(ip(ns, "-j", "addr", "show", "dev", link) or "[]")
    return [f"{a['local']}/{a['prefixlen']}" for entry in out for a in entry.get("addr_info", [])]


def veth_between(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """A veth pair with one end in each namespace (created in ns_a, peer moved to ns_b)."""
    ip(ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
    set_up(ns_a, if_a)
    set_up(ns_b, if_b)


def add_address(ns: str, link: str, cidr: str) -> None:
    ip(ns, "addr", "add", cidr, "dev", link)


def bridge(ns: str, name: str, mac: str = "") -> None:
    """A bridge, up; give ``mac`` where others talk to the bridge's address (without one it follows its
    lowest port MAC, so hosts joining change it under their peers' ARP entries)."""
    ip(ns, "link", "add", name, *(("address", mac) if mac else ()), "type", "bridge")
    set_up(ns, name)


def enslave(ns: str, link: str, master: str) -> None:
    ip(ns, "link", "set", link, "master", master)
