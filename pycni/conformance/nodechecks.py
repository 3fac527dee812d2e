"""Checks of one node's own set-up that need no peer: the pods' gateway MAC, the cluster store's entries.

gateway-mac     a third probe pod joins the node's bridge, its host veth gets the lowest MAC there
                is (00:00:00:00:00:01) and it leaves again: the bridge's MAC must not move. A bridge
                without an address of its own takes the lowest MAC of its ports, and every pod that
                resolved the gateway meanwhile loses it for seconds (flannel #1381). On a node with
                that fault the check moves the gateway once, as any pod coming or going would.
store-entries   every key under subnets/ is a valid lease the agents program: bad values, and
                leases the agents skip (one VTEP MAC claimed twice...), are listed by key.
"""

from __future__ import annotations

from typing import Any

from .model import FAIL, GATEWAY_MAC, PASS, SKIP, STORE_ENTRIES, Check

LOWEST_MAC = "00:00:00:00:00:01"
LISTED = 5  # entries named in a row's message; the rest are counted


def gateway_mac_check(node: str, bridge: str, pods: Any) -> Check:
    """``pods``: the run's ProbePods (adds and removes the third probe pod)."""
    from cni_plugins.kernel import ip as kip

    with kip.open_netlink() as ipr:
        before = kip.find_link(ipr, bridge)
        if before is None:
            return Check(GATEWAY_MAC, node, node, FAIL, None, f"the node has no bridge {bridge} (the pods' gateway)")
        try:
            churn = pods.add("churn")
        except Exception as exc:
            return Check(GATEWAY_MAC, node, node, SKIP, None, f"not measured: cannot attach a third probe pod: {exc}")
        seen = [before.mac]
        problems: list[str] = []
        try:
            port = kip.find_link(ipr, churn.host_ifname) if churn.host_ifname else None
            if port is None or port.master != before.index:
                return Check(
                    GATEWAY_MAC,
                    node,
                    node,
                    SKIP,
                    None,
                    f"not measured: the probe pod's host veth is no port of {bridge}",
                )
            kip.set_mac(ipr, port.index, LOWEST_MAC)
            seen.append(_mac(ipr, bridge))
        finally:
            problems = pods.remove("churn")
        seen.append(_mac(ipr, bridge))
    moved = [mac for mac in seen if mac != before.mac]
    if not moved:
        return Check(
            GATEWAY_MAC,
            node,
            node,
            PASS,
            None,
            f"{bridge} kept {before.mac} while a pod with MAC {LOWEST_MAC} came and went",
        )
    note = f" (and removing the probe left: {'; '.join(problems)})" if problems else ""
    return Check(
        GATEWAY_MAC,
        node,
        node,
        FAIL,
        None,
        f"the gateway's MAC moved ({' -> '.join(dict.fromkeys(seen))}) while a pod with MAC {LOWEST_MAC} "
        f"came and went: the bridge {bridge} takes its MAC from its ports, so every pod loses its gateway "
        f"for seconds whenever a pod comes or goes. pycni's agent creates its bridge with a MAC of its "
        f"own; pin a bridge made elsewhere once: ip link set {bridge} address {before.mac}{note}",
    )


def _mac(ipr: Any, bridge: str) -> str:
    from cni_plugins.kernel import ip as kip

    link = kip.find_link(ipr, bridge)
    return link.mac if link is not None else "(gone)"


def store_entries_check(
    node: str,
    store: Any,
    cfg: Any,
    public_ip: str,
    subnet: str,
    vtep_mac: str,
    *,
    ipv6_subnet: str = "",
    public_ipv6: str = "",
    vtep_mac6: str = "",
) -> Check:
    """The cluster store's subnets/ as every agent reads it.

    ``subnet`` and ``ipv6_subnet`` are this node's pod subnets (as its overlay state names them),
    ``public_ipv6``/``vtep_mac6`` its second, IPv6 underlay when it has one: leases are judged on
    each of the node's VXLAN devices, as its agent judges them.
    """
    from ipam.cluster import scan_leases

    scan = scan_leases(store, cfg)
    skipped = _skipped(
        scan.leases, cfg, public_ip, [s for s in (subnet, ipv6_subnet) if s], vtep_mac, public_ipv6, vtep_mac6
    )
    problems = [f"{r.key}: {r.reason}" for r in scan.rejected] + [f"skipped {reason}" for reason in skipped]
    if not problems:
        return Check(
            STORE_ENTRIES, node, node, PASS, None, f"{len(scan.leases)} leases, every one valid and programmed"
        )
    more = f"; and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
    return Check(
        STORE_ENTRIES,
        node,
        node,
        FAIL,
        None,
        f"{len(problems)} entries under subnets/ are no lease the agents program (each agent skips them "
        f"with one warning): {'; '.join(problems[:LISTED])}{more}. Remove them from the store (etcdctl del "
        f"KEY, or the file in a file store), or release the node that wrote them",
    )


def _skipped(
    leases: list[Any], cfg: Any, public_ip: str, subnets: list[str], vtep_mac: str, public_ipv6: str, vtep_mac6: str
) -> list[str]:
    """Why leases are not programmed, on the node's main VXLAN device and on its IPv6-underlay one."""
    import ipaddress

    from pycni.overlay.reconcile import MAIN, V6, Own, RemoteTable

    v6_lane = bool(public_ipv6 and vtep_mac6) and ipaddress.ip_address(public_ip).version == 4
    node_ips = frozenset(ipaddress.ip_address(a) for a in (public_ip, public_ipv6 if v6_lane else "") if a)
    own_subnets = tuple(ipaddress.ip_network(s) for s in subnets)
    networks = tuple(pool.ip_network for pool in cfg.pools)
    lanes = [
        Own(
            ipaddress.ip_address(public_ip),
            own_subnets,
            networks,
            vtep_mac.strip().lower(),
            MAIN,
            v6_lane=v6_lane,
            node_ips=node_ips,
        )
    ]
    if v6_lane:
        lanes.append(
            Own(
                ipaddress.ip_address(public_ipv6),
                own_subnets,
                networks,
                vtep_mac6.strip().lower(),
                V6,
                node_ips=node_ips,
            )
        )
    reasons: set[str] = set()
    for own in lanes:
        table = RemoteTable(own)
        for index, lease in enumerate(leases):
            table.update(f"#{index}", lease)
        reasons.update(table.wanted().skipped)
    return sorted(reasons)
