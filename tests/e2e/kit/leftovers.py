"""What a pod can leave behind on a host, found by looking (not by trusting the plugins).

``find()`` lists, for one host and network: host-local leases still held,
links in the host namespace other than the ones the test made and the bridge
(a pod's host veth, a bandwidth ifb), shaping qdiscs, firewall rules that still
name a pod address or container ID (nftables and iptables-nft alike), result
cache entries of the network, and pod namespaces a runtime still pins. An empty
list is a clean host.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable

from . import conflist
from .host import OUTSIDE_LINK, Host


def leases(data_dir: Path, network: str = conflist.NETWORK) -> list[str]:
    path = Path(data_dir) / network
    if not path.is_dir():
        return []
    return sorted(f for f in os.listdir(path) if f != "lock" and not f.startswith("last_reserved_ip"))


def links(host: Host) -> list[str]:
    """Links in the host namespace beyond lo, the outside link and the network's bridge ("name kind")."""
    out = host.net("ip", "-o", "-d", "link", "show").stdout
    found = []
    for line in out.splitlines():
        match = re.match(r"\d+: ([^:@]+)[@:]", line)
        if not match or match.group(1) in ("lo", OUTSIDE_LINK, conflist.BRIDGE):
            continue
        kind = next((k for k in ("veth", "ifb", "bridge", "vxlan") if f" {k} " in f" {line} "), "link")
        found.append(f"{match.group(1)} ({kind})")
    return found


def shaping(host: Host) -> list[str]:
    """qdiscs that shape (tbf, ingress/clsact) anywhere in the host namespace."""
    out = host.net("tc", "qdisc", "show").stdout
    return [line.strip() for line in out.splitlines() if re.search(r"qdisc (tbf|ingress|clsact|htb)", line)]


def ruleset(host: Host) -> str:
    """The host namespace's firewall: nftables (where iptables-nft rules live too) and iptables-save."""
    parts = [host.net("nft", "-s", "list", "ruleset", check=False).stdout]
    for tool in ("iptables-save", "ip6tables-save"):
        text = host.net(tool, check=False).stdout
        parts.append("\n".join(l for l in text.splitlines() if not l.startswith("#")))
    return re.sub(r"\[\d+:\d+\]", "[0:0]", "\n".join(parts))


def rules_naming(host: Host, ids: Iterable[str] = (), ips: Iterable[str] = ()) -> list[str]:
    """Firewall lines that mention a container ID (or its 12-character prefix) or a pod address."""
    patterns = [re.escape(i[:12]) for i in ids if i]
    patterns += [r"(?<![\d.])" + re.escape(ip) + r"(?![\d])" for ip in ips if ip]
    if not patterns:
        return []
    combined = re.compile("|".join(patterns))
    return [line.strip() for line in ruleset(host).splitlines() if combined.search(line)]


def cache_entries(cache_dir: Path, network: str = conflist.NETWORK) -> list[str]:
    results = Path(cache_dir) / "results"
    if not results.is_dir():
        return []
    return sorted(f for f in os.listdir(results) if f.startswith(f"{network}-"))


def pinned_netns(netns_dir: Path) -> list[str]:
    try:
        return sorted(os.listdir(netns_dir))
    except OSError:
        return []


def find(
    host: Host,
    *,
    data_dir: Path,
    cache_dir: Path | None = None,
    netns_dir: Path | None = None,
    ids: Iterable[str] = (),
    ips: Iterable[str] = (),
    tolerated_rule=None,
) -> list[str]:
    """Everything left; tolerated_rule(line) -> True leaves a firewall line out (a documented reference gap)."""
    problems = []
    if held := leases(data_dir):
        problems.append(f"host-local leases still held: {held}")
    if extra := links(host):
        problems.append(f"links left in the host namespace: {extra}")
    if qdiscs := shaping(host):
        problems.append(f"shaping qdiscs left: {qdiscs}")
    rules = [line for line in rules_naming(host, ids, ips) if not (tolerated_rule and tolerated_rule(line))]
    if rules:
        problems.append(f"firewall rules naming a removed pod: {rules[:10]}")
    if cache_dir is not None and (entries := cache_entries(cache_dir)):
        problems.append(f"result cache entries left in {cache_dir}: {entries}")
    if netns_dir is not None and (pins := pinned_netns(netns_dir)):
        problems.append(f"pod namespaces still pinned in {netns_dir}: {pins}")
    return problems
