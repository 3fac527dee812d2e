"""The overlay's nftables table: VXLAN only from cluster members, masquerade for traffic leaving the cluster.

One table, ``inet pycni_overlay``, owned by the node agent (it is deleted and
rebuilt whole when it drifts)::

    table inet pycni_overlay {
        set members  { type ipv4_addr; }      # underlay addresses of every accepted lease (this node too)
        set members6 { type ipv6_addr; }
        chain input {                         # VXLAN from anyone else is dropped (Calico-like)
            type filter hook input priority filter; policy accept;
            udp dport 8472 ip saddr @members counter accept
            udp dport 8472 ip6 saddr @members6 counter accept
            udp dport 8472 counter drop
        }
        chain postrouting {                   # not there with --no-ip-masq
            type nat hook postrouting priority srcnat; policy accept;
            ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return      # pod <-> pod keeps its address
            ip saddr 10.244.0.0/16 ip daddr 224.0.0.0/4 return        # multicast
            ip saddr 10.244.0.0/16 counter masquerade fully-random    # pod -> other nodes' own addresses,
        }                                                             #        and the outside world
    }

Why pod -> another node's address is masqueraded (flannel does the same): such a
packet leaves unencapsulated on the underlay. With the pod's source the
receiving node's reverse-path filter (rp_filter=1, RHEL's default) drops it, as
the route back to a pod address goes through the VXLAN device, and cloud
underlays drop sources they do not know. Node -> pod traffic is never touched:
its source is the node's VXLAN address, inside the cluster network.

A node joining or leaving adds or deletes its one element (``update_members``);
a full check replaces the sets' contents in one transaction (flush + add).
Everything put into a ruleset is parsed first (addresses with ``ipaddress``,
the port as an int). Runs ``nft`` in the calling thread's network namespace.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable

from cni_plugins.kernel import nft

TABLE = "pycni_overlay"
MEMBERS = {4: "members", 6: "members6"}
_ADDR_TYPE = {4: "ipv4_addr", 6: "ipv6_addr"}
_FAMILY_WORD = {4: "ip", 6: "ip6"}
_MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}
INPUT_RULES = 3
POSTROUTING_RULES = 3


@dataclass(frozen=True)
class FirewallSpec:
    network: str  # the cluster pod CIDR ("" in an IPv6-only cluster)
    port: int  # the VXLAN UDP port
    masquerade: bool = True  # masquerade pod traffic that leaves the cluster network
    network6: str = ""  # a dual-stack (or IPv6-only) cluster's IPv6 pod CIDR

    @property
    def networks(self) -> list[str]:
        return [net for net in (self.network, self.network6) if net]

    @property
    def expected_rules(self) -> dict[str, int]:
        """Rules per chain of an intact table."""
        if not self.masquerade:
            return {"input": INPUT_RULES}
        return {"input": INPUT_RULES, "postrouting": POSTROUTING_RULES * len(self.networks)}

    def __post_init__(self) -> None:
        if not self.network and not self.network6:
            raise ValueError("a firewall spec needs a cluster network")
        for name in ("network", "network6"):
            if getattr(self, name):
                object.__setattr__(self, name, str(ipaddress.ip_network(getattr(self, name), strict=True)))
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ValueError(f"invalid VXLAN port {self.port!r}")


def split_members(members: Iterable[str]) -> dict[int, list[str]]:
    """Member addresses by family, parsed and sorted (ValueError on anything that is not an address)."""
    out: dict[int, list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = {4: [], 6: []}
    for member in members:
        address = ipaddress.ip_address(member)
        out[address.version].append(address)
    return {v: [str(a) for a in sorted(set(addrs))] for v, addrs in out.items()}  # type: ignore[type-var]


def _element_lines(members: Iterable[str]) -> list[str]:
    lines = []
    for version, addresses in split_members(members).items():
        if addresses:
            lines.append(f"add element inet {TABLE} {MEMBERS[version]} {{ {', '.join(addresses)} }}")
    return lines


def render_table(spec: FirewallSpec, members: Iterable[str]) -> str:
    """The whole table (replacing any previous one) with its members, as one nft script."""
    port = int(spec.port)
    lines = [
        f"table inet {TABLE} {{}}",
        f"delete table inet {TABLE}",
        f"table inet {TABLE} {{",
        f"    set {MEMBERS[4]} {{ type {_ADDR_TYPE[4]}; }}",
        f"    set {MEMBERS[6]} {{ type {_ADDR_TYPE[6]}; }}",
        "    chain input {",
        "        type filter hook input priority filter; policy accept;",
        f"        udp dport {port} ip saddr @{MEMBERS[4]} counter accept comment {nft.comment('vxlan from ipv4 members')}",
        f"        udp dport {port} ip6 saddr @{MEMBERS[6]} counter accept comment {nft.comment('vxlan from ipv6 members')}",
        f"        udp dport {port} counter drop comment {nft.comment('vxlan from non-members')}",
        "    }",
    ]
    if spec.masquerade:
        lines += ["    chain postrouting {", "        type nat hook postrouting priority srcnat; policy accept;"]
        for text in spec.networks:
            net = ipaddress.ip_network(text)
            fam = _FAMILY_WORD[net.version]
            lines += [
                f"        {fam} saddr {net} {fam} daddr {net} return comment {nft.comment('pod to pod')}",
                f"        {fam} saddr {net} {fam} daddr {_MULTICAST[net.version]} return",
                f"        {fam} saddr {net} counter masquerade fully-random "
                f"comment {nft.comment('pod leaving the cluster network')}",
            ]
        lines.append("    }")
    lines.append("}")
    return "\n".join(lines + _element_lines(members)) + "\n"


def render_member_changes(add: Iterable[str], remove: Iterable[str]) -> str:
    """Add and delete single members (one transaction): a node joining costs one element, not a rewrite."""
    lines = []
    for verb, members in (("delete", remove), ("add", add)):
        for version, addresses in split_members(members).items():
            if addresses:
                lines.append(f"{verb} element inet {TABLE} {MEMBERS[version]} {{ {', '.join(addresses)} }}")
    return "\n".join(lines) + "\n" if lines else ""


def update_members(add: Iterable[str], remove: Iterable[str]) -> None:
    """Apply render_member_changes(); NftError if the table or an element to delete is not there."""
    script = render_member_changes(add, remove)
    if script:
        nft.apply(script)


def render_members(members: Iterable[str]) -> str:
    """Replace the member sets' contents (one transaction)."""
    lines = [f"flush set inet {TABLE} {MEMBERS[4]}", f"flush set inet {TABLE} {MEMBERS[6]}"]
    return "\n".join(lines + _element_lines(members)) + "\n"


@dataclass
class TableState:
    members: set[str]
    sets: set[str]
    rules: dict[str, int]  # chain -> number of rules

    def intact(self, spec: FirewallSpec) -> bool:
        """The sets and exactly the chains of ``spec``, each with its number of rules."""
        return set(MEMBERS.values()) <= self.sets and self.rules == spec.expected_rules


def read_table() -> TableState | None:
    """What the table holds now; None if it does not exist."""
    objects = nft.list_json("table", "inet", TABLE)
    if objects is None:
        return None
    sets: dict[str, set[str]] = {}
    rules: dict[str, int] = {}
    chains: set[str] = set()
    for obj in objects:
        if "set" in obj:
            sets[obj["set"]["name"]] = {_element_text(e.key) for e in nft.elements(obj["set"])}
        elif "chain" in obj:
            chains.add(obj["chain"]["name"])
        elif "rule" in obj:
            rules[obj["rule"]["chain"]] = rules.get(obj["rule"]["chain"], 0) + 1
    for chain in chains:
        rules.setdefault(chain, 0)
    members = set().union(*sets.values()) if sets else set()
    return TableState(members=members, sets=set(sets), rules=rules)


def _element_text(key: Any) -> str:
    if isinstance(key, str):
        return str(ipaddress.ip_address(key))
    return str(key)


def ensure_firewall(spec: FirewallSpec, members: Iterable[str], rebuild: bool = False) -> str:
    """Bring the table in line; returns what was done ("created", "members", "unchanged")."""
    wanted = {a for addrs in split_members(members).values() for a in addrs}
    current = None if rebuild else read_table()
    if current is None or not current.intact(spec):
        nft.apply(render_table(spec, wanted))
        return "created"
    if current.members != wanted:
        nft.apply(render_members(wanted))
        return "members"
    return "unchanged"


def remove_firewall() -> bool:
    """Delete the table; False if it was not there."""
    if nft.list_json("table", "inet", TABLE) is None:
        return False
    nft.apply(f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n")
    return True


def counters() -> dict[str, int]:
    """Packet counters of the table's rules, keyed by rule comment (for status and tests)."""
    out: dict[str, int] = {}
    for obj in nft.list_json("table", "inet", TABLE) or []:
        rule = obj.get("rule")
        if not rule:
            continue
        packets = None
        for expr in rule.get("expr", []):
            if isinstance(expr, dict) and "counter" in expr:
                packets = expr["counter"].get("packets")
        if packets is not None:
            key = rule.get("comment") or f"{rule['chain']}#{rule.get('handle')}"
            out[key] = out.get(key, 0) + int(packets)
    return out
