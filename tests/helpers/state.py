"""Reading what a namespace looks like, for assertions on real state.

Every reader takes the namespace first (a Node, Pod, netns.Namespace or name).
None reads the caller's own namespace; readers only read, so that is safe for
"the machine's own links did not change" checks.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from .netenv import ns_name, sh


def _run(ns: Any, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if ns is None:
        return sh(*argv, check=check)
    return sh("ip", "netns", "exec", ns_name(ns), *argv, check=check)


def ip_json(ns: Any, *args: str) -> Any:
    """`ip -j <args>` in ns, parsed (an empty answer is [])."""
    prefix = ["ip"] if ns is None else ["ip", "-n", ns_name(ns)]
    return json.loads(sh(*prefix, "-j", *args).stdout or "[]")


# ---- links, addresses, routes, neighbours ----------------------------------------------


def links(ns: Any, *, details: bool = False) -> list[dict]:
    """Every link (`ip -j [-d] link show`)."""
    return ip_json(ns, *(["-d"] if details else []), "link", "show")


def link(ns: Any, name: str, *, details: bool = False) -> dict:
    """One link by name (raises if it does not exist); details adds linkinfo (kind, port data)."""
    return ip_json(ns, *(["-d"] if details else []), "link", "show", name)[0]


def link_names(ns: Any) -> list[str]:
    return [entry["ifname"] for entry in links(ns)]


def has_link(ns: Any, name: str) -> bool:
    return name in link_names(ns)


def addresses(ns: Any, dev: str | None = None, *, family: int | None = None) -> list[dict]:
    """addr_info entries (local, prefixlen, family, scope, flags...) of dev or of every link,
    each with the link's name added as "ifname"."""
    args = (["-4"] if family == 4 else ["-6"] if family == 6 else []) + ["addr", "show"]
    entries = ip_json(ns, *args, *(["dev", dev] if dev else []))
    return [dict(addr, ifname=entry["ifname"]) for entry in entries for addr in entry.get("addr_info", [])]


def routes(ns: Any, family: int = 4, *, table: str | None = None) -> list[dict]:
    """`ip -j -4|-6 route show [table T]`."""
    return ip_json(ns, f"-{family}", "route", "show", *(["table", table] if table else []))


def neighbours(ns: Any, family: int = 4) -> list[dict]:
    return ip_json(ns, f"-{family}", "neigh", "show")


def sysctl(ns: Any, key: str) -> str:
    """A sysctl's value read from /proc/sys inside ns; key as a path (net/ipv4/ip_forward) or
    dotted (net.ipv4.ip_forward, only when no part has a dot of its own)."""
    path = key if "/" in key else key.replace(".", "/")
    return _run(ns, "cat", f"/proc/sys/{path}").stdout.strip()


# ---- firewall ---------------------------------------------------------------------------


def nft_ruleset(ns: Any) -> list[dict]:
    """`nft -j list ruleset`: its objects (tables, chains, rules, sets, maps), metainfo left out."""
    out = _run(ns, "nft", "-j", "list", "ruleset").stdout
    return [obj for obj in json.loads(out)["nftables"] if "metainfo" not in obj]


def nft_text(ns: Any, *what: str, check: bool = True) -> str:
    """`nft list <what>` as text; by default the whole ruleset."""
    return _run(ns, "nft", "list", *(what or ("ruleset",)), check=check).stdout


def iptables_save(ns: Any, table: str | None = "nat", family: int = 4) -> str:
    """`iptables-save [-t table]` (ip6tables-save for family 6) as text."""
    tool = "iptables-save" if family == 4 else "ip6tables-save"
    return _run(ns, tool, *(["-t", table] if table else [])).stdout


def iptables_rules(ns: Any, table: str = "nat", family: int = 4) -> list[str]:
    """A table's chains and rules as `iptables -S` lines, policies (-P) left out."""
    tool = "iptables" if family == 4 else "ip6tables"
    out = _run(ns, tool, "-w", "-t", table, "-S").stdout
    return [line for line in out.splitlines() if not line.startswith("-P ")]


# ---- traffic control --------------------------------------------------------------------


def tc_qdiscs(ns: Any, dev: str | None = None) -> list[dict]:
    """`tc -j qdisc show [dev D]`."""
    out = _run(ns, "tc", "-j", "qdisc", "show", *(["dev", dev] if dev else [])).stdout
    return json.loads(out or "[]")
