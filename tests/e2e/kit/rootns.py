"""The machine's root network namespace, read-only: did a test (or a plugin it ran) change it?

The e2e suites must never touch the root namespace, but they share it with
everything else on the machine: loading ``ifb`` makes ``ifb0``/``ifb1`` appear
there, a container engine adds its veths, another copy of the suite runs at the
same time. So a snapshot keeps only what could be *ours* (an ``Ownership``), and
two snapshots differ only where the test or pycni could be the cause:

- links named like what the plugins and the kit create (``veth*``, ``bwp*``
  ifbs, ``cni*``, ``pycni*``, ``e2e*``, ``flannel*``; an alias naming pycni),
  and any link enslaved to one of them;
- addresses, routes, rules and qdiscs on those links, and any that name an
  address of the suites' subnets (the e2e network, podman's and the examples'
  defaults, the host/outside link);
- nftables tables and chains named by pycni or CNI (``pycni_*``, ``cni*``,
  ``CNI-*``; iptables-nft's too) and any rule line naming those or the subnets;
- the links that carry the namespace's default routes (``lo`` too), and those
  default routes: their existence, MTU, master, up/down, qdiscs and addresses;
- forwarding sysctls a plugin sets (a key that only appears, when a module
  loads, is not a change).

Everything else (other links, other tables, other processes' routes) is left out.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from . import conflist
from .host import HOST_IP

# What pycni's plugins and this kit name things (links, nftables tables and chains).
OWNED_NAME_PREFIXES = ("veth", "bwp", "cni", "pycni", "e2e", "flannel")
OWNED_SUBNETS = (
    conflist.SUBNET,
    "10.88.0.0/16",  # podman's default network and the bridge docs' examples
    "10.244.0.0/16",  # the shipped examples' cluster network (conf/examples, test_examples)
    str(ipaddress.ip_interface(f"{HOST_IP}/24").network),  # the host <-> outside link
)
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv6.conf.all.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
)
_ROUTE_FIELDS = ("type", "dst", "gateway", "dev", "table", "protocol", "scope", "prefsrc", "metric")
_ADDRESS_RE = re.compile(r"(?<![\w.:])(\d{1,3}(?:\.\d{1,3}){3})(?:/\d{1,2})?(?![\w.])")


@dataclass(frozen=True)
class Ownership:
    """What counts as ours: name prefixes (case-insensitive) and subnets."""

    prefixes: tuple[str, ...] = OWNED_NAME_PREFIXES
    subnets: tuple[str, ...] = OWNED_SUBNETS

    def name(self, name: str | None) -> bool:
        return bool(name) and name.lower().startswith(tuple(p.lower() for p in self.prefixes))

    def address(self, text: str | None) -> bool:
        """An address or prefix (``10.88.7.5``, ``10.88.7.0/24``) inside one of the subnets."""
        if not text or text == "default":
            return False
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            return False
        return any(net.version == own.version and net.subnet_of(own) for own in self._networks)

    def text(self, line: str) -> bool:
        """A line that names one of our names (as a word) or an address of our subnets."""
        words = re.findall(r"[A-Za-z][\w.\-]*", line)
        return any(self.name(w) for w in words) or any(self.address(m) for m in _ADDRESS_RE.findall(line))

    @property
    def _networks(self) -> list[Any]:
        return [ipaddress.ip_network(s) for s in self.subnets]


DEFAULT = Ownership()


@dataclass
class Snapshot:
    """The attributable part of the root namespace: category -> sorted record lines."""

    watch: tuple[str, ...]  # the links carrying the default routes, and lo
    parts: dict[str, list[str]] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)


# ---- reading ------------------------------------------------------------------


def _run(argv: Sequence[str]) -> tuple[int, str]:
    if shutil.which(argv[0]) is None:
        return 0, ""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=30)
    return proc.returncode, proc.stdout


def _json(argv: Sequence[str]) -> list[dict[str, Any]]:
    code, out = _run(argv)
    if code != 0 or not out.strip():
        return []
    return json.loads(out)


def read() -> dict[str, Any]:
    """Everything the attribution looks at, as the tools print it (JSON where they can)."""
    raw: dict[str, Any] = {
        "links": _json(["ip", "-j", "-d", "link", "show"]),
        "addresses": _json(["ip", "-j", "addr", "show"]),
        "routes": _json(["ip", "-4", "-j", "route", "show", "table", "all"])
        + _json(["ip", "-6", "-j", "route", "show", "table", "all"]),
        "rules": _json(["ip", "-4", "-j", "rule", "show"]) + _json(["ip", "-6", "-j", "rule", "show"]),
        "qdiscs": _json(["tc", "-j", "qdisc", "show"]),
        "nftables": _run(["nft", "-s", "list", "ruleset"])[1],
        "sysctl": {},
    }
    for key in SYSCTLS:
        code, out = _run(["sysctl", "-n", key])
        if code == 0 and out.strip():
            raw["sysctl"][key] = out.strip()  # a key missing (no br_netfilter loaded) is left out
    return raw


# ---- attribution ---------------------------------------------------------------


def default_devices(raw: dict[str, Any]) -> tuple[str, ...]:
    devs = {r.get("dev") for r in raw["routes"] if r.get("dst") == "default" and r.get("dev")}
    return tuple(sorted(devs | {"lo"}))


def attribute(raw: dict[str, Any], watch: Iterable[str] | None = None, own: Ownership = DEFAULT) -> Snapshot:
    """Keep what could be ours (or is watched) out of a ``read()``."""
    watch = tuple(sorted(watch)) if watch is not None else default_devices(raw)
    links: dict[str, dict[str, Any]] = {l["ifname"]: l for l in raw["links"] if "ifname" in l}
    ours = {
        name
        for name, link in links.items()
        if own.name(name) or own.name(link.get("master")) or "pycni" in (link.get("ifalias") or "").lower()
    }
    seen = ours | set(watch)
    snap = Snapshot(watch)

    rows = []
    for name in sorted(seen & set(links)):
        link = links[name]
        rows.append(
            json.dumps(
                {
                    "ifname": name,
                    "kind": link.get("linkinfo", {}).get("info_kind", ""),
                    "master": link.get("master", ""),
                    "mtu": link.get("mtu"),
                    "up": "UP" in link.get("flags", []),
                    "alias": link.get("ifalias", ""),
                },
                sort_keys=True,
            )
        )
    rows += [json.dumps({"ifname": name, "missing": True}) for name in sorted(set(watch) - set(links))]
    snap.parts["links"] = rows

    rows = []
    for link in raw["addresses"]:
        for addr in link.get("addr_info", []):
            local = addr.get("local")
            # A watched link's SLAAC privacy or DHCP addresses come and go by themselves: not ours.
            churn = link.get("ifname") not in ours and (addr.get("temporary") or addr.get("dynamic"))
            if (link.get("ifname") in seen and not churn) or own.address(local):
                rows.append(f"{link.get('ifname')} {local}/{addr.get('prefixlen')}")
    snap.parts["addresses"] = sorted(rows)

    rows = []
    for route in raw["routes"]:
        main_default = route.get("dst") == "default" and route.get("table", "main") == "main"
        if (
            route.get("dev") in ours
            or main_default
            or any(own.address(route.get(k)) for k in ("dst", "gateway", "prefsrc"))
        ):
            rows.append(json.dumps({k: route.get(k) for k in _ROUTE_FIELDS}, sort_keys=True))
    snap.parts["routes"] = sorted(rows)

    rows = []
    for rule in raw["rules"]:
        if any(own.address(rule.get(k)) for k in ("src", "dst")) or any(
            own.name(rule.get(k)) for k in ("iif", "oif", "table")
        ):
            rows.append(json.dumps(rule, sort_keys=True))
    snap.parts["rules"] = sorted(rows)

    rows = []
    for qdisc in raw["qdiscs"]:
        if qdisc.get("dev") in seen:
            rows.append(json.dumps({k: v for k, v in qdisc.items() if k != "refcnt"}, sort_keys=True))
    snap.parts["qdiscs"] = sorted(rows)

    snap.parts["nftables"] = sorted(nft_lines(raw["nftables"], own))
    snap.sysctls = dict(raw["sysctl"])
    return snap


def nft_lines(ruleset: str, own: Ownership = DEFAULT) -> list[str]:
    """The ruleset's lines that are ours, each as "table / chain: line".

    Ours: every line of a table or chain named by pycni/CNI, and any other line
    that names one of our names or subnet addresses (a jump to a CNI- chain in
    iptables-nft's POSTROUTING, say).
    """
    out = []
    table = chain = ""
    depth = 0
    for raw_line in ruleset.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        if depth == 0 and line.startswith("table "):
            table, chain = line.rstrip("{ ").strip(), ""
        elif depth == 1 and re.match(r"(chain|set|map|flowtable) ", line):
            chain = line.rstrip("{ ").strip()
        table_ours = own.name(table.split()[-1]) if table else False
        chain_ours = own.name(chain.split()[1]) if len(chain.split()) > 1 else False
        if table_ours or chain_ours or own.text(line):
            out.append(f"{table} / {chain}: {line}")
        depth += line.count("{") - line.count("}")
        if depth <= 1:
            chain = ""
        if depth <= 0:
            depth, table = 0, ""
    return out


def snapshot(watch: Iterable[str] | None = None, own: Ownership = DEFAULT) -> Snapshot:
    """Read the root namespace now; ``watch`` defaults to its default-route links (and lo)."""
    return attribute(read(), watch, own)


def differences(before: Snapshot, after: Snapshot) -> list[str]:
    """What changed between two snapshots (take ``after`` with ``watch=before.watch``)."""
    out = []
    for name in sorted(set(before.parts) | set(after.parts)):
        old, new = set(before.parts.get(name, [])), set(after.parts.get(name, []))
        if old != new:
            out.append(f"{name}: gone {sorted(old - new)} new {sorted(new - old)}")
    changed = {
        k: (before.sysctls[k], after.sysctls[k])
        for k in before.sysctls
        if k in after.sysctls and before.sysctls[k] != after.sysctls[k]
    }
    gone = sorted(set(before.sysctls) - set(after.sysctls))
    if changed or gone:
        out.append(f"sysctl: changed {changed} gone {gone}")
    return out
