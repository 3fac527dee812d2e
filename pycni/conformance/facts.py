"""What a node's kernel holds for the overlay, published so that every node can explain a failure.

A node cannot look into another node's kernel, but it can read what that node
published about itself. Each node publishes, per other node (keyed by public IP),
whether its VXLAN device has the FDB entry (VTEP MAC -> public IP), the
neighbour entry (VTEP address -> VTEP MAC) and the onlink route to that node's
pod subnet (for a dual-stack node: for each pod family, on the VXLAN device
that carries it), and a summary of firewall chains that are not pycni's own
but drop, reject or rewrite addresses on the paths pod traffic takes (with the
IP families their drop rules can match).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable

from pycni.inspect import readers

OWN_TABLE_PREFIX = "pycni_"
_HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
_DROP_VERDICTS = ("drop", "reject")
_NAT_VERDICTS = ("masquerade", "snat")


def _lease_subnet(lease: Any, version: int) -> str:
    """A lease's subnet of one pod family ("" when it holds none); IPv6-only leases hold theirs in either field."""
    for text in (getattr(lease, "subnet", "") or "", getattr(lease, "ipv6_subnet", "") or ""):
        if text and (":" in text) == (version == 6):
            return text
    return ""


def _entry_facts(subnet: str, mac: str, public_ip: str, fdb: set, neigh: set, routes: set) -> dict[str, bool]:
    net = ipaddress.ip_network(subnet)
    vtep = str(net.network_address)
    return {"fdb": (mac, public_ip) in fdb, "neigh": (vtep, mac) in neigh, "route": (str(net), vtep) in routes}


def _device_entries(device: str) -> tuple[set, set, set]:
    """(FDB (mac, dst), neighbours (address, mac), onlink routes (dst, gateway)) of one VXLAN device."""
    fdb = {(e.get("mac", "").lower(), e.get("dst", "")) for e in readers.fdb(device)}
    neigh = {(_norm(e.get("dst", "")), (e.get("lladdr") or "").lower()) for e in readers.neighbours(device)}
    routes = {
        (_norm_net(r.get("dst", "")), _norm(r.get("gateway", "")))
        for version in (4, 6)
        for r in readers.routes(None, "dev", device, version=version)
    }
    return fdb, neigh, routes


def _norm(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def _norm_net(dst: str) -> str:
    try:
        return str(ipaddress.ip_network(dst, strict=False))
    except ValueError:
        return dst


def datapath_facts(
    vxlan_device: str, leases: Iterable[Any], own_public_ip: str, vxlan_device6: str = ""
) -> dict[str, dict[str, Any]]:
    """public IP of every other leased node -> {"fdb": bool, "neigh": bool, "route": bool} for its IPv4 pods,
    plus "ipv6": {"fdb", "neigh", "route", "device"} for its IPv6 pods when it has an IPv6 subnet.

    A remote's IPv6 pods go through ``vxlan_device6`` (this node's second device, on its IPv6 underlay)
    when this node has one and the remote has an IPv6 underlay too, as the agents program them; through
    ``vxlan_device`` otherwise.
    """
    devices: dict[str, tuple[set, set, set]] = {}

    def entries(device: str) -> tuple[set, set, set]:
        if device not in devices:
            devices[device] = _device_entries(device)
        return devices[device]

    out: dict[str, dict[str, Any]] = {}
    for lease in leases:
        if lease.public_ip == own_public_ip:
            continue
        item: dict[str, Any] = {}
        subnet4 = _lease_subnet(lease, 4)
        if subnet4:
            item.update(_entry_facts(subnet4, lease.vtep_mac.lower(), lease.public_ip, *entries(vxlan_device)))
        subnet6 = _lease_subnet(lease, 6)
        if subnet6:
            public6 = getattr(lease, "public_ipv6", "") or ""
            mac6 = (getattr(lease, "vtep_mac6", "") or "").lower()
            if vxlan_device6 and public6 and mac6:
                device, mac, public = vxlan_device6, mac6, public6
            else:
                device, mac, public = vxlan_device, lease.vtep_mac.lower(), lease.public_ip
            item["ipv6"] = {**_entry_facts(subnet6, mac, public, *entries(device)), "device": device}
        out[lease.public_ip] = item
    return out


def masquerade_facts(public_ip: str, ruleset: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """{"rpFilter": the strictest reverse-path filter on the underlay (0, 1 strict, 2 loose),
    "masquerades": whether the overlay masquerades pod traffic leaving the cluster network}."""
    from cni_plugins.kernel import ip as kip
    from cni_plugins.kernel import vxlan as kvx

    values = []
    try:
        with kip.open_netlink() as ipr:
            underlay = kvx.underlay_link_for(ipr, public_ip)
        for name in ("all", underlay.name if underlay else ""):
            if name:
                values.append(int(kip.read_sysctl(f"net/ipv4/conf/{name}/rp_filter")))
    except (OSError, ValueError):
        pass
    objects = readers.nft_ruleset() if ruleset is None else ruleset
    masquerades = any(
        (obj.get("rule") or {}).get("table") == f"{OWN_TABLE_PREFIX}overlay"
        and any(isinstance(e, dict) and "masquerade" in e for e in obj["rule"].get("expr", []))
        for obj in objects
    )
    return {"rpFilter": max(values) if values else 0, "masquerades": masquerades}


_FAMILY_OF_TABLE = {"ip": {4}, "ip6": {6}}
_FAMILY_WORDS = {"ip": 4, "ipv4": 4, "icmp": 4, "ip6": 6, "ipv6": 6, "icmpv6": 6, "ipv6-icmp": 6}


def rule_families(family: str, expr: list[Any]) -> set[int]:
    """The IP families a rule of a table of ``family`` can match: {4}, {6} or {4, 6}.

    An ``ip``/``ip6`` table holds one family; in an inet (bridge, netdev) table a rule is narrowed to one by
    a match on ``meta nfproto``/``meta protocol``/``ether type``/``meta l4proto`` or on an IPv4/IPv6 header
    field (``ip saddr``, ``ip6 daddr``, ``icmpv6 type``...).
    """
    if family in _FAMILY_OF_TABLE:
        return set(_FAMILY_OF_TABLE[family])
    found: set[int] = set()
    for item in expr:
        match = item.get("match") if isinstance(item, dict) else None
        if not isinstance(match, dict) or match.get("op", "==") not in ("==", "in"):
            continue
        left = match.get("left")
        if not isinstance(left, dict):
            continue
        word = None
        meta = left.get("meta")
        payload = left.get("payload")
        if isinstance(meta, dict) and meta.get("key") in ("nfproto", "protocol", "l4proto"):
            word = match.get("right")
        elif isinstance(payload, dict) and payload.get("protocol") == "ether" and payload.get("field") == "type":
            word = match.get("right")
        elif isinstance(payload, dict):
            word = payload.get("protocol")
        if isinstance(word, str) and word in _FAMILY_WORDS:
            found.add(_FAMILY_WORDS[word])
    return found if len(found) == 1 else {4, 6}


def firewall_facts(ruleset: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Base chains of tables that are not pycni's that drop/reject (or NAT) traffic: one entry per chain.

    {"table": "inet filter", "chain": "forward", "hook": "forward", "policy": "accept", "drops": 1, "nats": 0,
     "drops4": 1, "drops6": 1}: drops4/drops6 count the drop rules that can match IPv4/IPv6 packets
    (``rule_families``); entries of older runs lack them.
    """
    objects = readers.nft_ruleset() if ruleset is None else ruleset
    chains: dict[tuple[str, str, str], dict[str, Any]] = {}
    for obj in objects:
        chain = obj.get("chain")
        if chain and chain.get("hook") in _HOOKS and not chain.get("table", "").startswith(OWN_TABLE_PREFIX):
            key = (chain.get("family", ""), chain.get("table", ""), chain.get("name", ""))
            chains[key] = {
                "table": f"{key[0]} {key[1]}",
                "chain": key[2],
                "hook": chain["hook"],
                "policy": chain.get("policy", "accept"),
                "drops": 0,
                "nats": 0,
                "drops4": 0,
                "drops6": 0,
            }
    # Rules in regular chains jumped to from a base chain count for that base chain's table as a whole.
    by_table: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in chains.values():
        family, table = entry["table"].split(" ", 1)
        by_table.setdefault((family, table), []).append(entry)
    for obj in objects:
        rule = obj.get("rule")
        if not rule:
            continue
        key = (rule.get("family", ""), rule.get("table", ""), rule.get("chain", ""))
        exprs = [e for e in rule.get("expr", []) if isinstance(e, dict)]
        verdicts = {name for expr in exprs for name in expr}
        drops = bool(verdicts & set(_DROP_VERDICTS))
        nats = bool(verdicts & set(_NAT_VERDICTS))
        if not (drops or nats):
            continue
        families = rule_families(key[0], exprs) if drops else set()
        targets = [chains[key]] if key in chains else by_table.get(key[:2], [])
        for target in targets[:1]:
            target["drops"] += int(drops)
            target["nats"] += int(nats)
            for version in families:
                target[f"drops{version}"] += 1
    return [c for c in chains.values() if c["drops"] or c["nats"] or c["policy"] == "drop"]


def drops_for(entry: dict[str, Any], version: int | None) -> tuple[int, bool]:
    """(the drop rules of a firewall entry that can match IP ``version`` (None: any), whether its drop
    policy applies to that family)."""
    family = entry.get("table", "").split(" ", 1)[0]
    policy = entry.get("policy") == "drop" and (version is None or version in _FAMILY_OF_TABLE.get(family, {4, 6}))
    if version is None:
        return int(entry.get("drops") or 0), policy
    count = entry.get(f"drops{version}")
    return int(entry.get("drops") or 0) if count is None else int(count), policy


def describe_firewall(entries: list[dict[str, Any]], kind: str = "drops", version: int | None = None) -> str:
    """ "table inet fw chain forward: 1 drop rule" for the entries that have ``kind`` (drops or nats).

    With ``version`` only the drop rules and policies that can drop packets of that IP family count;
    rules that drop that family only are said to ("1 drop/reject rule, IPv6 only").
    """
    parts = []
    for entry in entries:
        if kind == "drops":
            bits = []
            count, policy = drops_for(entry, version)
            if count:
                other = {4: 6, 6: 4}.get(version or 0)
                only = f", IPv{version} only" if other and entry.get(f"drops{other}") == 0 else ""
                bits.append(f"{count} drop/reject rule{'s' if count != 1 else ''}{only}")
            if policy:
                bits.append("policy drop")
            if bits:
                parts.append(f"table {entry['table']} chain {entry['chain']} ({entry['hook']}): {', '.join(bits)}")
        elif entry.get("nats"):
            parts.append(
                f"table {entry['table']} chain {entry['chain']} ({entry['hook']}): "
                f"{entry['nats']} masquerade/snat rule{'s' if entry['nats'] != 1 else ''}"
            )
    return "; ".join(parts)
