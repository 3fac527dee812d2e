"""What a node's kernel holds for the overlay, published so that every node can explain a failure.

A node cannot look into another node's kernel, but it can read what that node
published about itself. Each node publishes, per other node (keyed by public IP),
whether its VXLAN device has the FDB entry (VTEP MAC -> public IP), the
neighbour entry (VTEP address -> VTEP MAC) and the onlink route to that node's
pod subnet, and a summary of firewall chains that are not pycni's own but
drop, reject or rewrite addresses on the paths pod traffic takes.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Iterable

from pycni.inspect import readers

OWN_TABLE_PREFIX = "pycni_"
_HOOKS = ("prerouting", "input", "forward", "output", "postrouting")
_DROP_VERDICTS = ("drop", "reject")
_NAT_VERDICTS = ("masquerade", "snat")


def datapath_facts(vxlan_device: str, leases: Iterable[Any], own_public_ip: str) -> dict[str, dict[str, bool]]:
    """public IP of every other leased node -> {"fdb": bool, "neigh": bool, "route": bool}."""
    fdb = {(e.get("mac", "").lower(), e.get("dst", "")) for e in readers.fdb(vxlan_device)}
    neigh = {(e.get("dst", ""), (e.get("lladdr") or "").lower()) for e in readers.neighbours(vxlan_device)}
    routes = {(r.get("dst", ""), r.get("gateway", "")) for r in readers.routes(None, "dev", vxlan_device)}
    out: dict[str, dict[str, bool]] = {}
    for lease in leases:
        if lease.public_ip == own_public_ip:
            continue
        mac = lease.vtep_mac.lower()
        vtep = str(ipaddress.ip_network(lease.subnet).network_address)
        out[lease.public_ip] = {"fdb": (mac, lease.public_ip) in fdb, "neigh": (vtep, mac) in neigh,
                                "route": (lease.subnet, vtep) in routes}
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
        for obj in objects)
    return {"rpFilter": max(values) if values else 0, "masquerades": masquerades}


def firewall_facts(ruleset: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Base chains of tables that are not pycni's that drop/reject (or NAT) traffic: one entry per chain.

    {"table": "inet filter", "chain": "forward", "hook": "forward", "policy": "accept", "drops": 1, "nats": 0}
    """
    objects = readers.nft_ruleset() if ruleset is None else ruleset
    chains: dict[tuple[str, str, str], dict[str, Any]] = {}
    for obj in objects:
        chain = obj.get("chain")
        if chain and chain.get("hook") in _HOOKS and not chain.get("table", "").startswith(OWN_TABLE_PREFIX):
            key = (chain.get("family", ""), chain.get("table", ""), chain.get("name", ""))
            chains[key] = {"table": f"{key[0]} {key[1]}", "chain": key[2], "hook": chain["hook"],
                           "policy": chain.get("policy", "accept"), "drops": 0, "nats": 0}
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
        verdicts = {name for expr in rule.get("expr", []) if isinstance(expr, dict) for name in expr}
        drops = bool(verdicts & set(_DROP_VERDICTS))
        nats = bool(verdicts & set(_NAT_VERDICTS))
        if not (drops or nats):
            continue
        targets = [chains[key]] if key in chains else by_table.get(key[:2], [])
        for target in targets[:1]:
            target["drops"] += int(drops)
            target["nats"] += int(nats)
    return [c for c in chains.values() if c["drops"] or c["nats"] or c["policy"] == "drop"]


def describe_firewall(entries: list[dict[str, Any]], kind: str = "drops") -> str:
    """"table inet fw chain forward: 1 drop rule" for the entries that have ``kind`` (drops or nats)."""
    parts = []
    for entry in entries:
        if kind == "drops":
            bits = []
            if entry.get("drops"):
                bits.append(f"{entry['drops']} drop/reject rule{'s' if entry['drops'] != 1 else ''}")
            if entry.get("policy") == "drop":
                bits.append("policy drop")
            if bits:
                parts.append(f"table {entry['table']} chain {entry['chain']} ({entry['hook']}): {', '.join(bits)}")
        elif entry.get("nats"):
            parts.append(f"table {entry['table']} chain {entry['chain']} ({entry['hook']}): "
                         f"{entry['nats']} masquerade/snat rule{'s' if entry['nats'] != 1 else ''}")
    return "; ".join(parts)
