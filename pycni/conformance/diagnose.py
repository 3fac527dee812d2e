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
    returning: bool = False   # the replies' leg


def missing_entries(leg: Leg) -> list[str]:
    """What ``leg.src`` lacks to send to ``leg.dst`` over the overlay, one phrase per entry."""
    src, dst = leg.src, leg.dst
    facts = (src.facts.get("datapath") or {}).get(dst.public_ip)
    where = f"node {src.node}"
    if facts is None:
        return [f"{where} has no overlay entries at all for node {dst.node} ({dst.public_ip}): "
                f"missing FDB entry (its agent does not know the node's lease)"]
    out = []
    device = src.vxlan_device or "the VXLAN device"
    if not facts.get("route", True):
        out.append(f"{where} has no route to {dst.subnet} via {dst.vtep_address} on {device}: missing route")
    if not facts.get("neigh", True):
        out.append(f"{where} has no ARP/neighbour entry for remote VTEP {dst.vtep_address} ({dst.vtep_mac}) "
                   f"on {device}: missing neighbour entry")
    if not facts.get("fdb", True):
        out.append(f"{where} has no ARP/FDB for remote VTEP {dst.vtep_mac} -> {dst.public_ip} on {device}: "
                   f"missing FDB entry")
    return out


def _drops(party: Party) -> str:
    return describe_firewall(party.facts.get("firewall") or [], "drops")


def explain_no_reply(what: str, legs: Iterable[Leg], timeout: float, error: str = "timeout",
                     underlay: tuple[Party, Party] | None = None) -> str:
    """Why ``what`` (e.g. "TCP 10.244.1.5 -> 10.244.2.7:7080") got no answer.

    ``legs``: the overlay legs the packets and replies take; ``underlay``: the
    two nodes whose underlay addresses the traffic crosses directly (hostPort).
    """
    legs = list(legs)
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
    firewalls = [f"node {party.node}: {text}" for party in nodes if (text := _drops(party))]
    if firewalls:
        return f"{what}: {heard}; packets dropped: firewall ({'; '.join(firewalls)})"
    if error.startswith("rejected"):
        return f"{what}: {heard}: packets dropped: firewall (a host answered administratively prohibited)"
    ends = " and ".join(p.public_ip for p in nodes) or "the nodes"
    if legs:
        port = legs[0].src.facts.get("vxlanPort") or 8472
        return (f"{what}: {heard}, though the FDB, neighbour and route entries are in place on both nodes and "
                f"no firewall drop rule was found: packets lost on the underlay between {ends} "
                f"(is UDP {port}, VXLAN, blocked on the way?)")
    return f"{what}: {heard}; nothing on the nodes explains it: packets lost on the underlay between {ends}"


def explain_strict_peer(sender: Party, receiver: Party) -> str:
    """Why a pod's packets to another node's own address die on a strict host ("" if that is not it)."""
    if receiver.facts.get("rpFilter") == 1 and not sender.facts.get("masquerades", True):
        return (f"; node {receiver.node} drops pod sources arriving on its underlay (rp_filter=1), and node "
                f"{sender.node} does not masquerade traffic leaving the cluster network (its agent runs with "
                f"--no-ip-masq?)")
    return ""


def explain_refused(what: str, port: int, hostport: bool = False, node: str = "") -> str:
    if hostport:
        return (f"{what}: connection refused: no hostPort DNAT for port {port} on node {node} "
                f"(is portmap in the network's plugin chain, and the probe's mapping in table pycni_portmap?)")
    return f"{what}: connection refused: nothing listens on port {port} there (the echo service stopped?)"


def classify_address(address: str, parties: Iterable[Party]) -> str:
    """What ``address`` is in this cluster: "node X's address", "node X's VXLAN device", "a pod on X"..."""
    import ipaddress

    for party in parties:
        if address == party.public_ip:
            return f"node {party.node}'s own address"
        if address == party.vtep_address:
            return f"node {party.node}'s VXLAN device address"
        if address in (party.probe_ip, party.client_ip):
            return f"a pod on node {party.node}"
        if ipaddress.ip_address(address) in ipaddress.ip_network(party.subnet):
            return f"an address in node {party.node}'s pod subnet"
    return "an address outside the cluster"


def explain_seen(seen: str, sender_pod: str, sender: Party, parties: Iterable[Party],
                 between_nodes: bool = True) -> str:
    """The receiver saw ``seen`` instead of ``sender_pod``: SNAT on the way, and whose rule it may be."""
    parties = list(parties)
    kind = classify_address(seen, parties)
    where = "between nodes" if between_nodes else "on the node"
    message = (f"reply came from {seen} ({kind}), not the pod {sender_pod}: the receiver saw a translated "
               f"source address: SNAT {where}")
    nat_rules = describe_firewall(sender.facts.get("firewall") or [], "nats")
    if nat_rules:
        message += f" (node {sender.node}: {nat_rules})"
    return message


def explain_pmtu(what: str, error: str, size: int, sender: Party, receiver: Party, timeout: float) -> str:
    """1400-byte DF packets fail while small ones pass."""
    if error.startswith("emsgsize"):
        return (f"{what}: the pod refuses to send {size}-byte packets with DF ({error}): the pod's MTU "
                f"({sender.mtu}) is below {size}: MTU mismatch")
    if error.startswith("frag-needed"):
        return (f"{what}: a hop answered 'fragmentation needed' ({error}): a link on the path carries less than "
                f"{size} bytes: MTU mismatch")
    return (f"{what}: no reply to {size}-byte DF packets while small packets pass (no reply within {timeout:g}s): "
            f"MTU mismatch (the pods' MTU is {sender.mtu} on {sender.node} and {receiver.mtu} on "
            f"{receiver.node}; with VXLAN's 50 bytes the underlay between {sender.public_ip} and "
            f"{receiver.public_ip} must carry {size + 50}-byte packets)")
