"""The checks one node runs: against its own probe, and against every other node's probe and address.

Each check is one or two exchanges (client.py) and becomes a row: pass, fail
with a message naming the likely fault (diagnose.py), or skip when it could not
be measured because something more basic failed (the row says which).

    pod-pod-same-node   client pod -> probe pod on this node               TCP echo
    pod-pod-other-node  probe pod -> the other node's probe pod            TCP and UDP echo
    no-snat             the echo saw the sending pod's own address         (from the exchanges above)
    node-pod            this node -> its own probe, the other nodes' probes TCP echo
    pod-node            probe pod -> this node's and the other nodes' addresses (their node echo; to another
                        node it leaves masqueraded, or a strict rp_filter there drops it: the row says so)
    hostport            this node -> other node's address:hostPort          TCP echo, DNAT to its probe
    pmtu                probe pod -> other node's probe: small ICMP, then 1280- and 1400-byte packets with DF

Every check runs once per pod family both ends have (``Party.families``): the
IPv4 rows keep the names above, the IPv6 rows are named ``<check>/ipv6``
(model.family_check). pod-node and hostport run in a family only where the
nodes have an address of their own of that family (a dual-stack cluster on an
IPv4 underlay has no IPv6 node addresses). Outside an IPv4-only cluster every
failure message starts with the family ("IPv6 TCP ...").
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from . import client
from .diagnose import Leg, explain_no_reply, explain_pmtu, explain_refused, explain_seen, explain_strict_peer
from .model import (
    FAIL,
    HOSTPORT,
    NO_SNAT,
    NODE_POD,
    OTHER_NODE,
    PASS,
    PMTU,
    POD_NODE,
    SAME_NODE,
    SKIP,
    Check,
    Party,
    family_check,
    split_check,
)

PMTU_PACKET = 1400  # bytes of IP packet
PMTU_SIZES = (1280, PMTU_PACKET)  # the IPv6 minimum MTU, then what the pods' MTU of 1450 must carry
ICMP_OVERHEAD = client.HEADER_BYTES[4]
SMALL_PAYLOAD = 56


@dataclass
class Local:
    """This node's side: its published party and its probe pods' namespaces."""

    me: Party
    probe_netns: str
    client_netns: str
    timeout: float


def _failed(check: str, src: Party, dst: Party, message: str) -> Check:
    return Check(check, src.node, dst.node, FAIL, None, message)


def _family(me: Party, version: int) -> str:
    """The prefix of a message's exchange: "" in an IPv4-only matrix (as it always was), else "IPv4 "/"IPv6 "."""
    return "" if version == 4 and me.families == [4] else f"IPv{version} "


def _at(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def _row_for(
    exchange: client.Exchange,
    check: str,
    src: Party,
    dst: Party,
    what: str,
    legs: list[Leg],
    timeout: float,
    expect_label: str,
    port: int,
    hostport: bool = False,
    underlay: tuple[Party, Party] | None = None,
    version: int = 4,
) -> Check:
    if exchange.ok:
        if exchange.label != expect_label:
            return _failed(
                check, src, dst, f"{what}: answered by {exchange.label or 'something else'}, not {expect_label}"
            )
        return Check(check, src.node, dst.node, PASS, exchange.latency_ms, f"seen from {exchange.peer}")
    if exchange.error == "refused":
        return _failed(check, src, dst, explain_refused(what, port, hostport, dst.node))
    return _failed(check, src, dst, explain_no_reply(what, legs, timeout, exchange.error, underlay, version))


def _no_snat(
    exchange: client.Exchange,
    check: str,
    src: Party,
    dst: Party,
    sender_pod: str,
    receiver_pod: str,
    parties: list[Party],
    between_nodes: bool,
    via: str,
    family: str = "",
) -> Check:
    if not exchange.ok:
        return Check(check, src.node, dst.node, SKIP, None, f"not measured: no reply (see {via})")
    if exchange.peer == sender_pod:
        return Check(
            check,
            src.node,
            dst.node,
            PASS,
            exchange.latency_ms,
            f"the pod {receiver_pod} saw {exchange.peer}, the sender's own address",
        )
    return Check(
        check,
        src.node,
        dst.node,
        FAIL,
        exchange.latency_ms,
        family + explain_seen(exchange.peer, sender_pod, src, parties, between_nodes),
    )


def own_checks(local: Local, parties: list[Party]) -> list[Check]:
    """The checks that stay on this node, in each pod family it has."""
    rows: list[Check] = []
    for version in local.me.families:
        rows += _own_family(local, parties, version)
    return contrast_families(rows)


def _own_family(local: Local, parties: list[Party], version: int) -> list[Check]:
    me, t, port = local.me, local.timeout, local.me.echo_port
    name, tag = (lambda check: family_check(check, version)), _family(me, version)
    probe, pod = me.probe(version), me.client(version)
    node_ip = me.node_ip(version)
    rows = []
    what = f"{tag}TCP {pod} -> {_at(probe, port)}"
    ex = client.tcp_exchange(local.client_netns, probe, port, t)
    rows.append(_row_for(ex, name(SAME_NODE), me, me, what, [], t, me.probe_label, port, version=version))
    rows.append(_no_snat(ex, name(NO_SNAT), me, me, pod, probe, parties, False, name(SAME_NODE), tag))
    what = f"{tag}TCP node {node_ip or me.node} -> pod {_at(probe, port)}"
    ex = client.tcp_exchange(None, probe, port, t)
    rows.append(_row_for(ex, name(NODE_POD), me, me, what, [], t, me.probe_label, port, version=version))
    if node_ip:
        what = f"{tag}TCP pod {probe} -> node {_at(node_ip, port)}"
        ex = client.tcp_exchange(local.probe_netns, node_ip, port, t)
        rows.append(_row_for(ex, name(POD_NODE), me, me, what, [], t, me.node_label, port, version=version))
    return rows


def peer_checks(local: Local, peer: Party, parties: list[Party]) -> list[Check]:
    """The checks from this node to ``peer``, in each pod family both have."""
    rows: list[Check] = []
    for version in [v for v in local.me.families if v in peer.families]:
        rows += _peer_family(local, peer, parties, version)
    return contrast_families(rows)


def _peer_family(local: Local, peer: Party, parties: list[Party], version: int) -> list[Check]:
    me, t, port = local.me, local.timeout, peer.echo_port
    name, tag = (lambda check: family_check(check, version)), _family(me, version)
    there, back = Leg(me, peer, version=version), Leg(peer, me, returning=True, version=version)
    probe, target = me.probe(version), peer.probe(version)
    rows = []

    # pod -> pod across nodes, TCP and UDP; the TCP exchange also tells what source the receiver saw.
    what = f"{tag}TCP {probe} -> {_at(target, port)}"
    tcp = client.tcp_exchange(local.probe_netns, target, port, t)
    row = _row_for(tcp, name(OTHER_NODE), me, peer, what, [there, back], t, peer.probe_label, port, version=version)
    udp = client.udp_exchange(local.probe_netns, target, port, t)
    if row.result == PASS and not udp.ok:
        what = f"{tag}UDP {probe} -> {_at(target, port)}"
        row = _failed(
            name(OTHER_NODE), me, peer, f"TCP passes but {explain_no_reply(what, [there, back], t, udp.error)}"
        )
    elif row.result == PASS:
        row.message = f"TCP and UDP; seen from {tcp.peer}"
    rows.append(row)
    rows.append(
        _no_snat(tcp if tcp.ok else udp, name(NO_SNAT), me, peer, probe, target, parties, True, name(OTHER_NODE), tag)
    )

    # the node itself -> the other node's pod (from its VXLAN address, through the overlay)
    what = f"{tag}TCP node {me.node} -> pod {_at(target, port)}"
    ex = client.tcp_exchange(None, target, port, t)
    rows.append(_row_for(ex, name(NODE_POD), me, peer, what, [there, back], t, peer.probe_label, port, version=version))

    mine, theirs = me.node_ip(version), peer.node_ip(version)
    if mine and theirs:
        # a pod -> the other node's own address: out over the underlay, the reply back through the overlay
        what = f"{tag}TCP pod {probe} -> node {_at(theirs, port)}"
        ex = client.tcp_exchange(local.probe_netns, theirs, port, t)
        row = _row_for(
            ex, name(POD_NODE), me, peer, what, [back], t, peer.node_label, port, underlay=(me, peer), version=version
        )
        if row.result == FAIL:
            row.message += explain_strict_peer(me, peer, version)
        rows.append(row)

        # hostPort on the other node, asked from this node over the underlay
        if peer.host_port is None:
            rows.append(
                Check(
                    name(HOSTPORT),
                    me.node,
                    peer.node,
                    SKIP,
                    None,
                    "not measured: the network has no portmap plugin (no portMappings capability)",
                )
            )
        else:
            what = f"{tag}TCP node {mine} -> {_at(theirs, peer.host_port)} (hostPort of {target})"
            ex = client.tcp_exchange(None, theirs, peer.host_port, t)
            rows.append(
                _row_for(
                    ex,
                    name(HOSTPORT),
                    me,
                    peer,
                    what,
                    [],
                    t,
                    peer.probe_label,
                    peer.host_port,
                    hostport=True,
                    underlay=(me, peer),
                    version=version,
                )
            )

    rows.append(pmtu_check(local, peer, version))
    return rows


def pmtu_check(local: Local, peer: Party, version: int | None = None) -> Check:
    """Small ICMP echoes, then 1280-byte and 1400-byte packets that nothing may fragment (IPv4: DF set)."""
    me, t = local.me, local.timeout
    version = version or (me.families or [4])[0]
    check, tag = family_check(PMTU, version), _family(me, version)
    source, target = me.probe(version), peer.probe(version)
    small = client.icmp_echo(local.probe_netns, target, SMALL_PAYLOAD, False, t)
    if not small.ok:
        return Check(
            check,
            me.node,
            peer.node,
            SKIP,
            None,
            f"not measured: small ICMP echoes get no answer either ({small.error}; see "
            f"{family_check(OTHER_NODE, version)})",
        )
    crossed: int | None = None
    big = small
    for size in PMTU_SIZES:
        big = client.icmp_echo(local.probe_netns, target, size - client.HEADER_BYTES[version], True, t, tries=3)
        if not big.ok:
            what = f"{tag}ICMP{'v6' if version == 6 else ''} {source} -> {target}"
            return Check(
                check,
                me.node,
                peer.node,
                FAIL,
                None,
                explain_pmtu(what, big.error, size, me, peer, t, version, crossed),
            )
        crossed = size
    sizes = " and ".join(f"{size}-byte" for size in PMTU_SIZES)
    how = "with DF cross" if version == 4 else "cross unfragmented"
    return Check(
        check,
        me.node,
        peer.node,
        PASS,
        big.latency_ms,
        f"{sizes} packets {how} (small ones in {small.latency_ms:.2f} ms)",
    )


def contrast_families(rows: list[Check]) -> list[Check]:
    """A failed row whose other family's row (same check, same nodes) passed says so: the fault is one
    family's alone (a firewall rule, route or entry for that family only)."""
    passed = {(r.check, r.source, r.target) for r in rows if r.result == PASS}
    for row in rows:
        if row.result != FAIL:
            continue
        check, version = split_check(row.check)
        other = 4 if version == 6 else 6
        if (family_check(check, other), row.source, row.target) in passed:
            row.message += (
                f"; the same check passes in IPv{other} between these nodes, so the fault is IPv{version}'s alone"
            )
    return rows


def run_checks(
    local: Local, peers: list[Party], workers: int = 8, progress: Callable[[str], None] = lambda _m: None
) -> list[Check]:
    """All checks, the peers' in parallel (each worker opens its sockets in the probe's namespace itself)."""
    parties = [local.me, *peers]
    rows: list[Check] = []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(peers) + 1))) as pool:
        futures = [pool.submit(own_checks, local, parties)]
        futures += [pool.submit(peer_checks, local, peer, parties) for peer in peers]
        for future in futures:
            rows.extend(future.result())
    progress(f"{len(rows)} checks run")
    return sorted(rows, key=lambda r: r.sort_key)
