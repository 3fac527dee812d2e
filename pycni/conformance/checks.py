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
    pmtu                probe pod -> other node's probe: small ICMP, then 1400-byte packets with DF
"""
from __future__ import annotations

import ipaddress
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from . import client
from .diagnose import Leg, explain_no_reply, explain_pmtu, explain_refused, explain_seen, explain_strict_peer
from .model import (FAIL, HOSTPORT, NO_SNAT, NODE_POD, OTHER_NODE, PASS, PMTU, POD_NODE, SAME_NODE, SKIP, Check,
                    Party)

PMTU_PACKET = 1400            # bytes of IP packet
ICMP_OVERHEAD = 28            # IPv4 header + ICMP header
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


def _row_for(exchange: client.Exchange, check: str, src: Party, dst: Party, what: str, legs: list[Leg],
             timeout: float, expect_label: str, port: int, hostport: bool = False,
             underlay: tuple[Party, Party] | None = None) -> Check:
    if exchange.ok:
        if exchange.label != expect_label:
            return _failed(check, src, dst, f"{what}: answered by {exchange.label or 'something else'}, "
                                            f"not {expect_label}")
        return Check(check, src.node, dst.node, PASS, exchange.latency_ms, f"seen from {exchange.peer}")
    if exchange.error == "refused":
        return _failed(check, src, dst, explain_refused(what, port, hostport, dst.node))
    return _failed(check, src, dst, explain_no_reply(what, legs, timeout, exchange.error, underlay))


def _no_snat(exchange: client.Exchange, src: Party, dst: Party, sender_pod: str, parties: list[Party],
             between_nodes: bool, via: str) -> Check:
    if not exchange.ok:
        return Check(NO_SNAT, src.node, dst.node, SKIP, None, f"not measured: no reply (see {via})")
    if exchange.peer == sender_pod:
        return Check(NO_SNAT, src.node, dst.node, PASS, exchange.latency_ms,
                     f"the pod {dst.probe_ip} saw {exchange.peer}, the sender's own address")
    return Check(NO_SNAT, src.node, dst.node, FAIL, exchange.latency_ms,
                 explain_seen(exchange.peer, sender_pod, src, parties, between_nodes))


def own_checks(local: Local, parties: list[Party]) -> list[Check]:
    """The checks that stay on this node."""
    me, t = local.me, local.timeout
    rows = []
    what = f"TCP {me.client_ip} -> {me.probe_ip}:{me.echo_port}"
    ex = client.tcp_exchange(local.client_netns, me.probe_ip, me.echo_port, t)
    rows.append(_row_for(ex, SAME_NODE, me, me, what, [], t, me.probe_label, me.echo_port))
    rows.append(_no_snat(ex, me, me, me.client_ip, parties, False, SAME_NODE))
    what = f"TCP node {me.public_ip} -> pod {me.probe_ip}:{me.echo_port}"
    ex = client.tcp_exchange(None, me.probe_ip, me.echo_port, t)
    rows.append(_row_for(ex, NODE_POD, me, me, what, [], t, me.probe_label, me.echo_port))
    what = f"TCP pod {me.probe_ip} -> node {me.public_ip}:{me.echo_port}"
    ex = client.tcp_exchange(local.probe_netns, me.public_ip, me.echo_port, t)
    rows.append(_row_for(ex, POD_NODE, me, me, what, [], t, me.node_label, me.echo_port))
    return rows


def peer_checks(local: Local, peer: Party, parties: list[Party]) -> list[Check]:
    """The checks from this node to ``peer``."""
    me, t = local.me, local.timeout
    there, back = Leg(me, peer), Leg(peer, me, returning=True)
    rows = []

    # pod -> pod across nodes, TCP and UDP; the TCP exchange also tells what source the receiver saw.
    what = f"TCP {me.probe_ip} -> {peer.probe_ip}:{peer.echo_port}"
    tcp = client.tcp_exchange(local.probe_netns, peer.probe_ip, peer.echo_port, t)
    row = _row_for(tcp, OTHER_NODE, me, peer, what, [there, back], t, peer.probe_label, peer.echo_port)
    udp = client.udp_exchange(local.probe_netns, peer.probe_ip, peer.echo_port, t)
    if row.result == PASS and not udp.ok:
        what = f"UDP {me.probe_ip} -> {peer.probe_ip}:{peer.echo_port}"
        row = _failed(OTHER_NODE, me, peer, f"TCP passes but {explain_no_reply(what, [there, back], t, udp.error)}")
    elif row.result == PASS:
        row.message = f"TCP and UDP; seen from {tcp.peer}"
    rows.append(row)
    rows.append(_no_snat(tcp if tcp.ok else udp, me, peer, me.probe_ip, parties, True, OTHER_NODE))

    # the node itself -> the other node's pod (from its VXLAN address, through the overlay)
    what = f"TCP node {me.node} -> pod {peer.probe_ip}:{peer.echo_port}"
    ex = client.tcp_exchange(None, peer.probe_ip, peer.echo_port, t)
    rows.append(_row_for(ex, NODE_POD, me, peer, what, [there, back], t, peer.probe_label, peer.echo_port))

    # a pod -> the other node's own address: out over the underlay, the reply back through the overlay
    what = f"TCP pod {me.probe_ip} -> node {peer.public_ip}:{peer.echo_port}"
    ex = client.tcp_exchange(local.probe_netns, peer.public_ip, peer.echo_port, t)
    row = _row_for(ex, POD_NODE, me, peer, what, [back], t, peer.node_label, peer.echo_port, underlay=(me, peer))
    if row.result == FAIL:
        row.message += explain_strict_peer(me, peer)
    rows.append(row)

    # hostPort on the other node, asked from this node over the underlay
    if peer.host_port is None:
        rows.append(Check(HOSTPORT, me.node, peer.node, SKIP, None,
                          "not measured: the network has no portmap plugin (no portMappings capability)"))
    else:
        what = f"TCP node {me.public_ip} -> {peer.public_ip}:{peer.host_port} (hostPort of {peer.probe_ip})"
        ex = client.tcp_exchange(None, peer.public_ip, peer.host_port, t)
        rows.append(_row_for(ex, HOSTPORT, me, peer, what, [], t, peer.probe_label, peer.host_port,
                             hostport=True, underlay=(me, peer)))

    rows.append(pmtu_check(local, peer))
    return rows


def pmtu_check(local: Local, peer: Party) -> Check:
    me, t = local.me, local.timeout
    if ipaddress.ip_address(peer.probe_ip).version != 4:
        return Check(PMTU, me.node, peer.node, SKIP, None, "not measured: the PMTU check is IPv4-only")
    small = client.icmp_echo(local.probe_netns, peer.probe_ip, SMALL_PAYLOAD, False, t)
    if not small.ok:
        return Check(PMTU, me.node, peer.node, SKIP, None,
                     f"not measured: small ICMP echoes get no answer either ({small.error}; see {OTHER_NODE})")
    size = PMTU_PACKET - ICMP_OVERHEAD
    big = client.icmp_echo(local.probe_netns, peer.probe_ip, size, True, t, tries=3)
    if big.ok:
        return Check(PMTU, me.node, peer.node, PASS, big.latency_ms,
                     f"{PMTU_PACKET}-byte packets with DF cross (small ones in {small.latency_ms:.2f} ms)")
    what = f"ICMP {me.probe_ip} -> {peer.probe_ip}"
    return Check(PMTU, me.node, peer.node, FAIL, None, explain_pmtu(what, big.error, PMTU_PACKET, me, peer, t))


def run_checks(local: Local, peers: list[Party], workers: int = 8,
               progress: Callable[[str], None] = lambda _m: None) -> list[Check]:
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
