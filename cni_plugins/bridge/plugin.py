"""bridge: attach a container to a Linux bridge on the node through a veth pair.

ADD makes sure the bridge exists, creates a veth pair with one end in the
container, gets addresses from the IPAM plugin the configuration names and
configures them in the container, optionally makes the bridge the pods'
gateway (its address, IP forwarding, default routes) and masquerades pod
traffic leaving the pod network. A bridge it creates gets a MAC derived from
the node and the bridge name, so the pods' gateway MAC never follows the
bridge's ports; an existing bridge is adopted as it is. DEL undoes it and is
idempotent; CHECK compares prevResult with the live state; GC and STATUS
pass on to IPAM.

Same options, defaults and results as the reference bridge plugin
(containernetworking/plugins); the netlink work lives in ``ip``, the
delegation to IPAM in ``shared.ipam``, the container side in ``shared.container``
and the masquerading in ``shared.masq``; options are read in ``config``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import netns
from cni_plugins.bridge import config
from cni_plugins.bridge.config import MASQ_BACKENDS, BridgeConf, load_conf, validate_for_add
from cni_plugins.kernel import ip, names
from cni_plugins.kernel.nsutil import check_netns, netns_gone
from cni_plugins.shared import container, masq, spoofchk
from cni_plugins.shared import ipam as ipam_exec
from cni_plugins.shared.undo import Undo
from cni_plugins.spec.errors import ERR_INTERNAL, ERR_INVALID_CONFIG, CNIError
from cni_plugins.spec.skel import CmdArgs, gc_attachments, prev_result
from cni_plugins.spec.types import Interface, Result, Route

SCHEMA = config.SCHEMA  # what the skeleton decodes the configuration with (PluginFuncs.options)

BRIDGE_INDEX, HOST_INDEX, CONTAINER_INDEX = 0, 1, 2

# ---- ADD --------------------------------------------------------------------------


@dataclass
class Gateways:
    """Gateway addresses (CIDR with the pod prefix) the bridge takes, per family."""

    v4: list[str] = field(default_factory=list)
    v6: list[str] = field(default_factory=list)


def gateway_ip(address: str) -> str:
    """The first address of the pod's subnet: the gateway when IPAM named none."""
    net = ipaddress.ip_interface(address).network
    return str(net.network_address + 1)


def plan_gateways(result: Result, n: BridgeConf) -> Gateways:
    """Point every IP at the container interface, fill in gateways and default routes (calcGateways)."""
    gws = Gateways()
    default_found = {4: False, 6: False}
    for ipc in result.ips:
        family = ipc.family
        ipc.interface = CONTAINER_INDEX
        if ipc.gateway is None and n.is_gateway:
            ipc.gateway = gateway_ip(ipc.address)
        if n.is_default_gateway:
            default_dst = "0.0.0.0/0" if family == 4 else "::/0"
            if not default_found[family]:
                default_found[family] = any(r.gw and _same_net(r.dst, default_dst) for r in result.routes)
            if not default_found[family]:
                result.routes.append(Route(dst=default_dst, gw=ipc.gateway))
                default_found[family] = True
        if n.is_gateway:
            prefix = ipaddress.ip_interface(ipc.address).network.prefixlen
            (gws.v4 if family == 4 else gws.v6).append(f"{ipc.gateway}/{prefix}")
    return gws


def _same_net(a: str, b: str) -> bool:
    return ipaddress.ip_network(a, strict=False) == ipaddress.ip_network(b, strict=False)


def cmd_add(req: CmdArgs) -> Result:
    n = load_conf(req.conf, req.args)
    validate_for_add(n)
    check_netns(req.netns)
    undo = Undo(req.warn)
    try:
        result = _add(req, n, undo)
        result.to_dict(req.cni_version)  # a result the runtime cannot read is a failed ADD: undo it too
    except BaseException:
        undo.run()
        raise
    return result


def _add(req: CmdArgs, n: BridgeConf, undo: Undo) -> Result:
    with _open_netlink(n) as ipr:
        bridge = ip.ensure_bridge(
            ipr, n.bridge, n.mtu, n.promisc_mode, n.vlan_filtering, mac=names.stable_bridge_mac(n.bridge)
        )
        host_name, pod_end = container.create_veth(req, n.mtu, n.mac)
        undo.push(f"delete veth {host_name}", lambda: container.delete_host_link(host_name))
        host = _attach_host_veth(ipr, n, host_name, bridge.index, pod_end.peer_index)
        # MTUs show only in 1.1.0 results (the first spec version with interface MTUs).
        result = Result(
            cni_version=req.cni_version,
            interfaces=[
                Interface(name=bridge.name, mac=bridge.mac, mtu=bridge.mtu),
                Interface(name=host.name, mac=host.mac, mtu=host.mtu),
                Interface(name=pod_end.name, mac=pod_end.mac, mtu=pod_end.mtu, sandbox=req.netns),
            ],
        )

        if n.mac_spoof_check:
            spoofchk.setup(req.network_name, req.container_id, req.ifname, host.name, pod_end.mac)
            undo.push(
                "remove mac spoof check", lambda: spoofchk.teardown(req.network_name, req.container_id, req.ifname)
            )

        if n.is_layer3:
            _add_layer3(req, n, ipr, bridge, result, undo, pod_end.index)
        elif not n.disable_container_interface:
            netns.run_in(req.netns, container.set_container_up, req.ifname)

        # The host end's MAC and the bridge's MAC can change as ports come and go.
        if not n.disable_container_interface:
            host = ip.wait_oper_up(ipr, host.name)
        else:
            host = ip.get_link(ipr, host.name, "host veth")
        result.interfaces[HOST_INDEX].mac = host.mac
        final_bridge = ip.get_link(ipr, n.bridge, "bridge")
        result.interfaces[BRIDGE_INDEX].mac, result.interfaces[BRIDGE_INDEX].mtu = final_bridge.mac, final_bridge.mtu

    if not n.dns.is_empty():
        result.dns = n.dns
    return result


def _open_netlink(n: BridgeConf) -> Any:
    """The node-side netlink socket: a plain rtnetlink one (kernel.rtnl), or pyroute2's where VLANs need its API."""
    return ip.open_netlink() if n.vlan_filtering else ip.open_rtnl()


def _add_layer3(
    req: CmdArgs, n: BridgeConf, ipr: Any, bridge: Any, result: Result, undo: Undo, pod_index: int = 0
) -> None:
    """Addresses from IPAM into the container, the gateway onto the bridge, masquerading."""
    ipam_result = ipam_exec.exec_add(req)
    undo.push("release IPAM lease", lambda: ipam_exec.exec_del(req))
    result.ips, result.routes, result.dns = ipam_result.ips, ipam_result.routes, ipam_result.dns
    if not result.ips:
        raise CNIError(
            ERR_INTERNAL, "IPAM plugin returned missing IP config", f"{n.ipam_type} answered ADD without an address"
        )
    gateways = plan_gateways(result, n)
    netns.run_in(req.netns, container.configure_container, req.ifname, result, n.enable_dad, pod_index)
    if n.is_gateway:
        vlan_iface = _configure_gateways(ipr, n, bridge, gateways)
        if vlan_iface is not None:
            result.interfaces.append(vlan_iface)
    if n.ip_masq:
        undo.push(
            "remove masquerading",
            lambda: masq.teardown_masq(req.network_name, req.container_id, req.ifname, backend=n.ip_masq_backend),
        )
        masq.setup_masq(
            req.network_name,
            req.container_id,
            req.ifname,
            [ipc.address for ipc in result.ips],
            backend=n.ip_masq_backend,
        )


def _attach_host_veth(ipr: Any, n: BridgeConf, host_name: str, bridge_index: int, host_index: int = 0) -> Any:
    """Up, on the bridge, hairpin and isolation as configured (and its VLANs); the host veth afterwards.

    ``host_index``: the host end's ifindex (the container end's peer); with it and no VLANs
    to set, all of that is one round trip.
    """
    if host_index and not n.vlan_filtering:
        ip.write_sysctl(f"net/ipv6/conf/{host_name}/accept_ra", "0", ignore_errors=True)
        try:
            host = ip.bring_up_port(ipr, host_index, bridge_index, n.hairpin_mode, n.port_isolation)
        except ip.AttachError as exc:
            raise CNIError(
                ERR_INTERNAL, f"failed to connect {host_name!r} to bridge {n.bridge!r}: {ip.describe(exc.cause)}"
            ) from None
        if host.name != host_name:
            raise CNIError(ERR_INTERNAL, f"host veth {host_name!r} not found", f"ifindex {host_index} is {host.name!r}")
        return host
    host = ip.get_link(ipr, host_name, "host veth")
    ip.set_up(ipr, host.index)
    ip.write_sysctl(f"net/ipv6/conf/{host_name}/accept_ra", "0", ignore_errors=True)
    try:
        ip.attach_port(ipr, host.index, bridge_index, n.hairpin_mode, n.port_isolation)
    except Exception as exc:
        raise CNIError(
            ERR_INTERNAL, f"failed to connect {host_name!r} to bridge {n.bridge!r}: {ip.describe(exc)}"
        ) from None
    _setup_port_vlans(ipr, n, host.index, host_name)
    return ip.get_link(ipr, host_name, "host veth")


def _setup_port_vlans(ipr: Any, n: BridgeConf, port: int, port_name: str) -> None:
    """Access port (vlan: PVID, untagged) or trunk (vlanTrunk: tagged), as the reference does."""
    if not (n.vlan or n.vlans):
        return
    try:
        if not n.preserve_default_vlan:
            ip.remove_port_vlans(ipr, port)
        if n.vlan:
            ip.bridge_vlan_add(ipr, port, n.vlan, pvid=True, untagged=True)
        for vid in n.vlans:
            ip.bridge_vlan_add(ipr, port, vid)
        if not n.vlan and n.vlans:
            ip.bridge_vlan_add(ipr, port, 1, pvid=True, untagged=True)  # the trunk's native VLAN
    except CNIError:
        raise
    except Exception as exc:
        raise CNIError(
            ERR_INTERNAL, f"failed to setup vlan tag on interface {port_name!r}: {ip.describe(exc)}"
        ) from None


def _configure_gateways(ipr: Any, n: BridgeConf, bridge: Any, gws: Gateways) -> Interface | None:
    """Gateway addresses on the bridge (or its VLAN gateway port) and forwarding on the node."""
    vlan_iface: Interface | None = None
    target = bridge
    for family, cidrs in ((4, gws.v4), (6, gws.v6)):
        for cidr in cidrs:
            if n.vlan:
                target = _ensure_vlan_gateway(ipr, n, bridge)
                if vlan_iface is None:
                    vlan_iface = Interface(name=target.name, mac=target.mac)
            ensure_gateway_address(ipr, target, family, cidr, n.force_address)
        if cidrs:
            try:
                ip.enable_forwarding([family])
            except OSError as exc:
                raise CNIError(ERR_INTERNAL, f"failed to enable forwarding: {exc.strerror}") from None
    return vlan_iface


def ensure_gateway_address(ipr: Any, link: Any, family: int, cidr: str, force: bool) -> None:
    """Put ``cidr`` on the bridge. Another IPv4 address (or an overlapping IPv6 one)
    is replaced when ``force`` is set, an error otherwise (ensureAddr)."""

    wanted = ipaddress.ip_interface(cidr)
    for existing, _flags in ip.addresses(ipr, link.index, family):
        if existing == wanted:
            return
        if family == 4 or wanted.ip in existing.network or existing.ip in wanted.network:
            if not force:
                raise CNIError(
                    ERR_INTERNAL,
                    f"failed to set bridge addr: {link.name!r} already has an IP address different from {cidr}",
                    f"it has {existing}; set forceAddress to replace it",
                )
            ip.del_address(ipr, link.index, str(existing))
    try:
        ip.add_address(ipr, link.index, cidr)
    except Exception as exc:
        if ip.netlink_errno(exc) != ip.EEXIST:
            raise CNIError(
                ERR_INTERNAL, f"could not add IP address {cidr} to {link.name!r}: {ip.describe(exc)}"
            ) from None
    # Pin the bridge's MAC to the one it had before this ADD attached a port, as the reference
    # does: a bridge this plugin created has it pinned already, an adopted one may not.
    ip.set_mac(ipr, link.index, link.mac)


def _ensure_vlan_gateway(ipr: Any, n: BridgeConf, bridge: Any) -> Any:
    """A veth port "<bridge>.<vlan>" on the VLAN that carries the gateway address."""
    name = f"{n.bridge}.{n.vlan}"
    existing = ip.find_link(ipr, name)
    if existing is not None:
        return existing
    host_fd = os.open(netns.current_path(), os.O_RDONLY | os.O_CLOEXEC)
    try:
        peer, _own = ip.create_veth_in_container(ipr, name, host_fd, bridge.mtu)
    finally:
        os.close(host_fd)
    peer_link = ip.get_link(ipr, peer)
    ip.set_up(ipr, peer_link.index)
    ip.attach_port(ipr, peer_link.index, bridge.index)
    vlan_conf = BridgeConf(name=n.name, vlan=n.vlan, preserve_default_vlan=n.preserve_default_vlan)
    _setup_port_vlans(ipr, vlan_conf, peer_link.index, peer)
    gw = ip.get_link(ipr, name)
    ip.set_up(ipr, gw.index)
    return ip.get_link(ipr, name)


# ---- DEL --------------------------------------------------------------------------


def cmd_del(req: CmdArgs) -> None:
    """Remove the container's interface, its lease, spoof check and masquerading.

    Every step runs even when an earlier one failed (DEL must leave as little
    behind as it can); the first failure is reported afterwards.
    """
    n = load_conf(req.conf, req.args)
    if req.netns and not netns_gone(req.netns):
        container.delete_container_link(req)
    failures: list[CNIError] = []

    def attempt(step: Callable[[], Any]) -> None:
        try:
            step()
        except CNIError as err:
            failures.append(err)

    if n.is_layer3:
        attempt(lambda: ipam_exec.exec_del(req))
    if n.mac_spoof_check:
        attempt(lambda: spoofchk.teardown(req.network_name, req.container_id, req.ifname))
    if n.is_layer3 and n.ip_masq:
        # Found by network and container ID: the namespace may be gone already.
        for backend in _masq_backends_to_clean(n):
            attempt(
                lambda backend=backend: masq.teardown_masq(
                    req.network_name, req.container_id, req.ifname, backend=backend
                )
            )
    if failures:
        raise failures[0]
    return None


# ---- CHECK ------------------------------------------------------------------------


def cmd_check(req: CmdArgs) -> None:
    n = load_conf(req.conf, req.args)
    check_netns(req.netns)
    if n.is_layer3:
        ipam_exec.exec_check(req)
    if req.conf.get("prevResult") is None:
        raise CNIError(ERR_INVALID_CONFIG, "Required prevResult missing", "CHECK needs the result of ADD")
    result = prev_result(req)
    assert result is not None

    bridge_entry = next((i for i in result.interfaces if i.name == n.bridge), Interface(name=""))
    container_entry = next(
        (i for i in result.interfaces if i.name == req.ifname and i.sandbox == req.netns), Interface(name="")
    )
    with ip.open_netlink() as ipr:
        bridge = _check_bridge(ipr, bridge_entry, n)
        if req.netns != container_entry.sandbox:
            raise CNIError(
                ERR_INTERNAL,
                f"Sandbox in prevResult {container_entry.sandbox} doesn't match configured netns: {req.netns}",
            )
        container = netns.run_in(req.netns, _check_container_interface, container_entry)
        veth_found = False
        for entry in result.interfaces:
            if entry.name in (bridge_entry.name, container_entry.name):
                continue
            if _check_host_veth(ipr, entry, bridge, container):
                veth_found = True
                break
    if not veth_found:
        raise CNIError(ERR_INTERNAL, f"CNI veth created for bridge {n.bridge} was not found")
    netns.run_in(req.netns, _check_container_state, req.ifname, result)
    if n.is_layer3 and n.ip_masq:
        masq.check_masq(
            req.network_name,
            req.container_id,
            req.ifname,
            [ipc.address for ipc in result.ips],
            backend=n.ip_masq_backend,
        )
    return None


def _check_bridge(ipr: Any, entry: Interface, n: BridgeConf) -> Any:
    if not entry.name:
        raise CNIError(
            ERR_INTERNAL,
            f"CNI created bridge {n.bridge} in host namespace was not found",
            "prevResult lists no interface named after the configured bridge",
        )
    if entry.sandbox:
        raise CNIError(ERR_INTERNAL, f"Interface {entry.name} should not be in sandbox")
    link = ip.find_link(ipr, entry.name)
    if link is None:
        raise CNIError(ERR_INTERNAL, f"Interface name {entry.name} not found")
    if link.kind != "bridge":
        raise CNIError(ERR_INTERNAL, f"Interface {entry.name} does not have link type of bridge")
    if entry.mac and entry.mac.lower() != link.mac.lower():
        raise CNIError(ERR_INTERNAL, f"Bridge interface {entry.name} Mac doesn't match: {entry.mac}")
    promisc = link.promisc
    if promisc != n.promisc_mode:
        raise CNIError(
            ERR_INTERNAL,
            f"Bridge interface {entry.name} configured Promisc Mode {n.promisc_mode} "
            f"doesn't match current state: {promisc}",
        )
    return link


def _check_container_interface(entry: Interface) -> Any:
    if not entry.name:
        raise CNIError(ERR_INTERNAL, "Interface name missing", "prevResult lists no container interface")
    with ip.open_netlink() as ipr:
        link = ip.find_link(ipr, entry.name)
    if link is None:
        raise CNIError(ERR_INTERNAL, f"Interface name {entry.name} not found")
    if link.kind != "veth":
        raise CNIError(ERR_INTERNAL, f"Error: Container interface {entry.name} not of type veth")
    if entry.mac and entry.mac.lower() != link.mac.lower():
        raise CNIError(ERR_INTERNAL, f"Interface {entry.name} Mac {entry.mac} doesn't match container Mac: {link.mac}")
    return link


def _check_host_veth(ipr: Any, entry: Interface, bridge: Any, container: Any) -> bool:
    """True when ``entry`` is the container's peer, enslaved to the bridge."""
    if not entry.name:
        raise CNIError(ERR_INTERNAL, "Interface name missing")
    if entry.sandbox:
        raise CNIError(ERR_INTERNAL, f"Interface {entry.name} should not be in sandbox")
    link = ip.find_link(ipr, entry.name)
    if link is None:
        raise CNIError(ERR_INTERNAL, f"Interface name {entry.name} not found")
    if link.kind != "veth":
        return False  # not something this plugin created
    if link.index != container.peer_index or container.index != link.peer_index or link.master != bridge.index:
        return False
    if entry.mac and entry.mac.lower() != link.mac.lower():
        raise CNIError(ERR_INTERNAL, f"Interface {entry.name} Mac doesn't match: {entry.mac} not found")
    return True


def _check_container_state(ifname: str, result: Result) -> None:
    """Every prevResult address on the interface (with a route to its subnet), every route present."""
    with ip.open_netlink() as ipr:
        link = ip.find_link(ipr, ifname)
        if link is None:
            raise CNIError(ERR_INTERNAL, f"Cannot find container link {ifname}")
        present = {a for a, _flags in ip.addresses(ipr, link.index)}
        tables = {4: ip.routes(ipr, 4), 6: ip.routes(ipr, 6)}
        for ipc in result.ips:
            address = ipaddress.ip_interface(ipc.address)
            if address not in present:
                raise CNIError(ERR_INTERNAL, f"Failed to match addr {ipc.address} on interface {ifname}")
            if not any(r.dst == address.network for r in tables[address.version]):
                raise CNIError(ERR_INTERNAL, f"Failed to find Gateway {ipc.gateway} for interface {ifname}")
        for route in result.routes:
            dst = ipaddress.ip_network(route.dst, strict=False)
            wanted_gw = ipaddress.ip_address(route.gw) if route.gw else None
            if not any(
                r.dst == dst and (wanted_gw is None or (r.gw and ipaddress.ip_address(r.gw) == wanted_gw))
                for r in tables[dst.version]
            ):
                raise CNIError(ERR_INTERNAL, f"Expected Route {route.to_dict('1.1.0')} not found in routing table")


# ---- GC and STATUS ----------------------------------------------------------------


def cmd_gc(req: CmdArgs) -> None:
    n = load_conf(req.conf, "")
    valid = gc_attachments(req.conf)
    if n.mac_spoof_check:
        spoofchk.gc(req.network_name, valid)
    if n.ip_masq:
        for backend in _masq_backends_to_clean(n):
            masq.gc_masq(req.network_name, valid, backend=backend)
    if n.is_layer3:
        ipam_exec.exec_gc(req)
    return None


def cmd_status(req: CmdArgs) -> None:
    if ipam_exec.ipam_type(req.conf):
        ipam_exec.exec_status(req)
    return None


# ---- helpers ----------------------------------------------------------------------


def _masq_backends_to_clean(n: BridgeConf) -> list[str]:
    """The backends whose masquerade state DEL and GC remove.

    Without ipMasqBackend in the config, both: the reference bridge defaults to
    iptables, so a node moving from it to pycni (nftables by default) with the
    same config would otherwise keep the reference's rules for ever.
    """
    if n.ip_masq_backend_chosen:
        return [n.ip_masq_backend]
    return [n.ip_masq_backend] + [b for b in MASQ_BACKENDS if b != n.ip_masq_backend]
