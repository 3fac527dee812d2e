"""Naming the likely fault behind a failed check, from what both nodes published.

Pure functions of parties (``model.Party``, with the datapath and firewall
facts each node read from its own kernel) and of what an exchange observed,
so that every message can be tested without a network.

A path between two nodes has legs: the packet's way there and the reply's
way back. A leg that crosses the overlay from node X to node Y needs, on X,
the onlink route to Y's pod subnet, the neighbour entry for Y's VTEP address
and the FDB entry sending Y's VTEP MAC to Y's public IP. Missing entries are
named first (they explain a loss for certain), then firewall rules that drop
packets, then the underlay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .facts import describe_firewall
from .model import Party


@dataclass(frozen=True)
class Leg:
    """One direction of a path that crosses the overlay: from node ``src`` to node ``dst``."""

    src: Party
    dst: Party
    returning: bool = False  # the replies' leg
    version: int = 4  # the pod family whose packets take it


def missing_entries(leg: Leg) -> list[str]:
    """What ``leg.src`` lacks to send to ``leg.dst`` over the overlay, one phrase per entry."""
    src, dst, version = leg.src, leg.dst, leg.version
    entry = (src.facts.get("datapath") or {}).get(dst.lease_address)
    facts = entry.get("ipv6") if version == 6 and isinstance(entry, dict) else entry
    where = f"node {src.node}"
    family = "IPv6 " if version == 6 else ""
    if not isinstance(facts, dict):
        return [
            f"{where} has no {family}overlay entries at all for node {dst.node} ({dst.public_ip}): "
            f"missing FDB entry (its agent does not know the node's lease"
            + (" or its IPv6 subnet)" if version == 6 else ")")
        ]
    out = []
    device, mac, public = src.lane_to(dst, version)
    device = str(facts.get("device") or device or "the VXLAN device")
    vtep, subnet = dst.vtep_address_of(version), dst.pod_subnet(version)
    if not facts.get("route", True):
        out.append(f"{where} has no route to {subnet} via {vtep} on {device}: missing route")
    if not facts.get("neigh", True):
        table = "NDP/neighbour" if version == 6 else "ARP/neighbour"
        out.append(f"{where} has no {table} entry for remote VTEP {vtep} ({mac}) on {device}: missing neighbour entry")
    if not facts.get("fdb", True):
        out.append(f"{where} has no ARP/FDB for remote VTEP {mac} -> {public} on {device}: missing FDB entry")
    return out


def _drops(party: Party, version: int | None) -> str:
    return describe_firewall(party.facts.get("firewall") or [], "drops", version)


def _underlay_address(party: Party, other: Party, version: int) -> str:
    """The underlay address of ``party`` that ``other`` sends ``version`` pod traffic to."""
    return other.lane_to(party, version)[2] or party.public_ip


def explain_no_reply(
    what: str,
    legs: Iterable[Leg],
    timeout: float,
    error: str = "timeout",
    underlay: tuple[Party, Party] | None = None,
    version: int | None = None,
) -> str:
    """Why ``what`` (e.g. "TCP 10.244.1.5 -> 10.244.2.7:7080") got no answer.

    ``legs``: the overlay legs the packets and replies take; ``underlay``: the
    two nodes whose underlay addresses the traffic crosses directly (hostPort).
    ``version``: the IP family of the packets (default: the legs'; a firewall
    rule that drops only the other family is not blamed).
    """
    legs = list(legs)
    if version is None:
        version = legs[0].version if legs else None
    heard = "no reply within %gs" % timeout if error == "timeout" else error
    causes = []
    for leg in legs:
        for phrase in missing_entries(leg):
            causes.append(phrase + (" (the replies' way back)" if leg.returning else ""))
    if causes:
        return f"{what}: {heard}; " + "; ".join(causes)
    nodes: list[Party] = []
    for party in [p for leg in legs for p in (leg.src, leg.dst)] + list(underlay or ()):
        if all(party.node != seen.node for seen in nodes):
            nodes.append(party)
    firewalls = [f"node {party.node}: {text}" for party in nodes if (text := _drops(party, version))]
    if firewalls:
        return f"{what}: {heard}; packets dropped: firewall ({'; '.join(firewalls)})"
    if error.startswith("rejected"):
        return f"{what}: {heard}: packets dropped: firewall (a host answered administratively prohibited)"
    if legs:
        leg = legs[0]
        ends = " and ".join(_underlay_address(a, b, leg.version) for a, b in ((leg.src, leg.dst), (leg.dst, leg.src)))
        port = leg.src.facts.get("vxlanPort") or 8472
        return (
            f"{what}: {heard}, though the FDB, neighbour and route entries are in place on both nodes and "
            f"no firewall drop rule was found: packets lost on the underlay between {ends} "
            f"(is UDP {port}, VXLAN, blocked on the way?)"
        )
    addresses = [(p.node_ip(version) if version else "") or p.public_ip for p in nodes]
    ends = " and ".join(addresses) or "the nodes"
    return f"{what}: {heard}; nothing on the nodes explains it: packets lost on the underlay between {ends}"


def explain_strict_peer(sender: Party, receiver: Party, version: int = 4) -> str:
    """Why a pod's packets to another node's own address die on a strict host ("" if that is not it).

    rp_filter is IPv4's; an IPv6 host that filters by reverse path does it with a firewall rule, which
    the firewall facts name.
    """
    if version == 4 and receiver.facts.get("rpFilter") == 1 and not sender.facts.get("masquerades", True):
        return (
            f"; node {receiver.node} drops pod sources arriving on its underlay (rp_filter=1), and node "
            f"{sender.node} does not masquerade traffic leaving the cluster network (its agent runs with "
            f"--no-ip-masq?)"
        )
    return ""


def explain_refused(what: str, port: int, hostport: bool = False, node: str = "") -> str:
    if hostport:
        return (
            f"{what}: connection refused: no hostPort DNAT for port {port} on node {node} "
            f"(is portmap in the network's plugin chain, and the probe's mapping in table pycni_portmap?)"
        )
    return f"{what}: connection refused: nothing listens on port {port} there (the echo service stopped?)"


def classify_address(address: str, parties: Iterable[Party]) -> str:
    """What ``address`` is in this cluster: "node X's address", "node X's VXLAN device", "a pod on X"..."""
    import ipaddress

    try:
        seen = ipaddress.ip_address(address)
    except ValueError:
        return "not an address"
    parties = list(parties)
    for party in parties:
        if address in (party.public_ip, party.public_ipv6):
            return f"node {party.node}'s own address"
        if address in (party.vtep_address_of(4), party.vtep_address_of(6)):
            return f"node {party.node}'s VXLAN device address"
        if address in (party.probe_ip, party.client_ip, party.probe_ip6, party.client_ip6):
            return f"a pod on node {party.node}"
    for party in parties:
        for subnet in (party.subnet, party.subnet6):
            if subnet and seen in ipaddress.ip_network(subnet):
                return f"an address in node {party.node}'s pod subnet"
    return "an address outside the cluster"


def explain_seen(
    seen: str, sender_pod: str, sender: Party, parties: Iterable[Party], between_nodes: bool = True
) -> str:
    """The receiver saw ``seen`` instead of ``sender_pod``: SNAT on the way, and whose rule it may be."""
    parties = list(parties)
    kind = classify_address(seen, parties)
    where = "between nodes" if between_nodes else "on the node"
    message = (
        f"reply came from {seen} ({kind}), not the pod {sender_pod}: the receiver saw a translated "
        f"source address: SNAT {where}"
    )
    nat_rules = describe_firewall(sender.facts.get("firewall") or [], "nats")
    if nat_rules:
        message += f" (node {sender.node}: {nat_rules})"
    return message


IPV6_MIN_MTU = 1280
VXLAN_OVERHEAD = {4: 50, 6: 70}  # outer IP + UDP + VXLAN + inner Ethernet, by the underlay's family


def explain_pmtu(
    what: str,
    error: str,
    size: int,
    sender: Party,
    receiver: Party,
    timeout: float,
    version: int = 4,
    passed: int | None = None,
) -> str:
    """``size``-byte DF packets (IPv6: packets, which routers never fragment) fail while smaller ones pass
    (``passed``: the largest size that crossed; small ones by default)."""
    import ipaddress

    dont_fragment = "with DF" if version == 4 else "unfragmented"
    if error.startswith("emsgsize"):
        return (
            f"{what}: the pod refuses to send {size}-byte packets {dont_fragment} ({error}): the pod's MTU "
            f"({sender.mtu}) is below {size}: MTU mismatch"
        )
    minimum = ""
    if version == 6 and size <= IPV6_MIN_MTU:
        minimum = (
            f"; {IPV6_MIN_MTU} bytes is the least every IPv6 link must carry, so IPv6 breaks on this path "
            f"for packets of ordinary size"
        )
    if error.startswith("frag-needed") or error.startswith("packet-too-big"):
        return (
            f"{what}: a hop answered '{'fragmentation needed' if version == 4 else 'packet too big'}' "
            f"({error}): a link on the path carries less than {size} bytes: MTU mismatch{minimum}"
        )
    underlay = sender.lane_to(receiver, version)[2] or receiver.public_ip
    try:
        overhead = VXLAN_OVERHEAD[ipaddress.ip_address(underlay).version]
    except ValueError:
        overhead = VXLAN_OVERHEAD[4]
    smaller = "small packets pass" + (f" ({passed}-byte ones too)" if passed else "")
    return (
        f"{what}: no reply to {size}-byte {'DF ' if version == 4 else ''}packets while {smaller} "
        f"(no reply within {timeout:g}s): MTU mismatch (the pods' MTU is {sender.mtu} on {sender.node} and "
        f"{receiver.mtu} on {receiver.node}; with VXLAN's {overhead} bytes the underlay between "
        f"{_underlay_address(sender, receiver, version)} and {underlay} must carry {size + overhead}-byte "
        f"packets){minimum}"
    )
