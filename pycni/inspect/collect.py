"""Building the picture of a node's network from what its kernel, the runtime cache and the leases hold.

Sources, each optional (what is missing is said in ``notes``):

- links, addresses and routes (iproute2): bridges and their ports, veth peers
  with the namespace they lead into (``ip netns list-id``), the VXLAN device;
- the libcni result cache ``pycni`` (and cnitool, containerd, CRI-O) write:
  container ID, network, namespace, interface and addresses of every pod, its
  host-side veth, its ifb, its capability arguments (port mappings, bandwidth);
- host-local's leases (``<dataDir>/<network>/<ip>``: container ID and interface),
  for pods attached by a runtime whose cache this command does not read;
- each pod's namespace: its interface's addresses, MAC and MTU as they are now;
- the VXLAN devices' FDB, neighbour and onlink route entries (IPv4 and IPv6),
  joined with the cluster store's leases (``--store``): every remote node's
  public IP, subnet of each pod family and VTEP MAC, and whether this node's
  kernel has each entry it needs (on a node with a second, IPv6-underlay
  device, on the device the agent sends that family through);
- the nftables tables pycni_masq, pycni_portmap and pycni_overlay, and tc
  (tbf on the host veth, the ifb an ingress filter redirects to) per pod.

Everything is read in the calling thread's network namespace (the node's),
except each pod's interface, read inside the pod's namespace.
"""
from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from . import readers

DEFAULT_CACHE_DIR = "/var/lib/cni"
DEFAULT_STATE_DIR = "/run/pycni"
DEFAULT_IPAM_DIR = "/var/lib/cni/networks"
MASQ_TABLE = "pycni_masq"
PORTMAP_TABLE = "pycni_portmap"
OVERLAY_TABLE = "pycni_overlay"


@dataclass
class PortMapping:
    protocol: str
    host_port: int
    pod_ip: str
    container_port: int
    host_ip: str = ""

    def describe(self) -> str:
        host = f"{_bracket(self.host_ip)}:" if self.host_ip else ""
        return f"{self.protocol} {host}{self.host_port} -> {_bracket(self.pod_ip)}:{self.container_port}"


def _bracket(address: str) -> str:
    """An IPv6 address before a port goes in brackets ([fd00::2]:80)."""
    return f"[{address}]" if ":" in address else address


@dataclass
class Shaping:
    ingress_bits: int | None = None     # rate toward the pod (tbf on the host veth), bits/s
    ingress_burst: int | None = None    # bytes
    egress_bits: int | None = None      # rate from the pod (tbf on its ifb), bits/s
    egress_burst: int | None = None
    ifb: str = ""

    def describe(self) -> str:
        parts = []
        if self.ingress_bits is not None:
            parts.append(f"to pod {rate(self.ingress_bits)} (burst {self.ingress_burst} B)")
        if self.egress_bits is not None:
            parts.append(f"from pod {rate(self.egress_bits)} (burst {self.egress_burst} B, ifb {self.ifb})")
        return ", ".join(parts)


@dataclass
class Pod:
    container_id: str
    network: str = ""
    ifname: str = "eth0"
    netns: str = ""                 # path
    netns_name: str = ""
    addresses: list[str] = field(default_factory=list)
    mac: str = ""
    mtu: int | None = None
    host_veth: str = ""
    bridge: str = ""
    gateway: str = ""
    masquerade: str = ""            # how its traffic leaving the cluster is masqueraded, "" if not
    port_mappings: list[PortMapping] = field(default_factory=list)
    shaping: Shaping | None = None
    source: str = "cache"           # cache, lease or veth: where this pod was found
    gateway6: str = ""              # a dual-stack pod's IPv6 gateway (gateway is then the IPv4 one)

    @property
    def label(self) -> str:
        return self.container_id or self.host_veth or "?"

    @property
    def ip(self) -> str:
        return self.addresses[0].split("/")[0] if self.addresses else ""

    @property
    def ips(self) -> list[str]:
        """Every address of the pod (one per family on a dual-stack network), without prefix lengths."""
        return [a.split("/")[0] for a in self.addresses]


@dataclass
class Bridge:
    name: str
    mac: str = ""
    mtu: int | None = None
    state: str = ""
    addresses: list[str] = field(default_factory=list)
    ports: list[str] = field(default_factory=list)


@dataclass
class Remote:
    """Another node as this node's VXLAN device sees it (and the store, with --store).

    subnet, vtep_address, neigh and route are the first pod family the device
    carries to that node (IPv4; IPv6 on an IPv6-only overlay or on the second,
    IPv6-underlay device); subnet6, vtep_address6, neigh6 and route6 its IPv6
    pods when the same device carries both families ("" / False otherwise).
    Both families share the one FDB entry (VTEP MAC -> public IP).
    """

    public_ip: str = ""
    subnet: str = ""
    vtep_mac: str = ""
    vtep_address: str = ""
    node_name: str = ""
    fdb: bool = False
    neigh: bool = False
    route: bool = False
    in_store: bool = False
    subnet6: str = ""
    vtep_address6: str = ""
    neigh6: bool = False
    route6: bool = False

    @property
    def dual(self) -> bool:
        return bool(self.subnet6 or self.vtep_address6)

    @property
    def complete(self) -> bool:
        return self.fdb and self.neigh and self.route and (not self.dual or (self.neigh6 and self.route6))

    def missing(self) -> list[str]:
        checks = [("FDB", self.fdb), ("neighbour", self.neigh), ("route", self.route)]
        if self.dual:
            checks += [("IPv6 neighbour", self.neigh6), ("IPv6 route", self.route6)]
        return [what for what, ok in checks if not ok]


@dataclass
class Vxlan:
    name: str
    vni: int | None = None
    port: int | None = None
    local: str = ""
    underlay: str = ""
    mac: str = ""
    mtu: int | None = None
    addresses: list[str] = field(default_factory=list)
    learning: bool | None = None
    remotes: list[Remote] = field(default_factory=list)


@dataclass
class NodeView:
    name: str = ""
    public_ip: str = ""
    network: str = ""
    subnet: str = ""
    gateway: str = ""
    mtu: int | None = None
    underlay: str = ""              # the interface holding the public IP
    # A dual-stack node's IPv6 pods (network/subnet/gateway above are then the IPv4 ones), and its own
    # IPv6 address (--public-ipv6) with the interface holding it, as its overlay state names them.
    network6: str = ""
    subnet6: str = ""
    gateway6: str = ""
    public_ipv6: str = ""
    underlay6: str = ""
    bridges: list[Bridge] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    vxlans: list[Vxlan] = field(default_factory=list)
    overlay_members: list[str] = field(default_factory=list)
    overlay_masquerade: bool = False
    portmap_entries: list[PortMapping] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def networks(self) -> list[str]:
        """The cluster's pod networks, one per family."""
        return [net for net in (self.network, self.network6) if net]


def rate(bits: int) -> str:
    for unit, size in (("Gbit/s", 10**9), ("Mbit/s", 10**6), ("kbit/s", 10**3)):
        if bits >= size:
            value = bits / size
            return f"{value:.3g} {unit}"
    return f"{bits} bit/s"


# ---- the runtime cache and the leases ---------------------------------------------------------

def _data_dirs(config: bytes) -> list[str]:
    """host-local dataDirs a cached network configuration names (the vxlan plugin's dataDir too)."""
    try:
        conf = json.loads(config)
    except ValueError:
        return []
    plugins = conf.get("plugins") if isinstance(conf, dict) and "plugins" in conf else [conf]
    found = []
    for plugin in plugins if isinstance(plugins, list) else []:
        if not isinstance(plugin, dict):
            continue
        ipam = plugin.get("ipam") if isinstance(plugin.get("ipam"), dict) else {}
        for value in (plugin.get("dataDir"), ipam.get("dataDir")):
            if isinstance(value, str) and value.startswith("/"):
                found.append(value)
    return found


def cached_pods(cache_dir: str, notes: list[str]) -> tuple[list[Pod], list[str], dict[int, list[str]]]:
    """Pods from the runtime's result cache, the host-local data dirs their configurations use, and
    per pod (by id()) the names of the host-side interfaces its result lists (veth, ifb)."""
    from pycni.cache import ResultCache

    try:
        entries = ResultCache(cache_dir).list()
    except Exception as exc:  # an unreadable cache leaves the other sources
        notes.append(f"cannot read the result cache in {cache_dir}: {exc}")
        return [], [], {}
    pods: list[Pod] = []
    data_dirs: list[str] = []
    host_names: dict[int, list[str]] = {}
    for entry in entries:
        pod = Pod(container_id=entry.container_id, network=entry.network_name, ifname=entry.ifname,
                  netns=entry.netns, source="cache")
        result = entry.result or {}
        interfaces = result.get("interfaces") or []
        for ip in result.get("ips") or []:
            if isinstance(ip, dict) and ip.get("address"):
                pod.addresses.append(ip["address"])
                if not pod.gateway:
                    pod.gateway = ip.get("gateway", "")
                elif ":" in ip["address"] and ":" not in pod.gateway:
                    pod.gateway6 = pod.gateway6 or ip.get("gateway", "")
        for iface in interfaces:
            if isinstance(iface, dict) and iface.get("sandbox") and iface.get("name") == entry.ifname:
                pod.mac = iface.get("mac", "")
                pod.mtu = iface.get("mtu")
        host_names[id(pod)] = [i.get("name", "") for i in interfaces if isinstance(i, dict) and not i.get("sandbox")]
        pods.append(pod)
        data_dirs += [d for d in _data_dirs(entry.config) if d not in data_dirs]
    return pods, data_dirs, host_names


def leased_pods(ipam_dirs: list[str], known: list[Pod]) -> list[Pod]:
    """Pods host-local holds an address for that the cache does not know (another runtime's cache)."""
    have = {(p.container_id, p.ifname) for p in known} | {a.split("/")[0] for p in known for a in p.addresses}
    found: dict[tuple[str, str], Pod] = {}
    for data_dir in ipam_dirs:
        try:
            networks = sorted(os.listdir(data_dir))
        except OSError:
            continue
        for network in networks:
            net_dir = os.path.join(data_dir, network)
            if not os.path.isdir(net_dir):
                continue
            for name in sorted(os.listdir(net_dir)):
                try:
                    address = str(ipaddress.ip_address(name))
                except ValueError:
                    continue
                try:
                    with open(os.path.join(net_dir, name)) as fh:
                        lines = fh.read().split("\n")
                except OSError:
                    continue
                container_id = lines[0].strip() if lines else ""
                ifname = lines[1].strip() if len(lines) > 1 and lines[1].strip() else "eth0"
                if (container_id, ifname) in have or address in have:
                    continue
                pod = found.setdefault((container_id, ifname), Pod(container_id=container_id, network=network,
                                                                    ifname=ifname, source="lease"))
                pod.addresses.append(address)
    return list(found.values())


# ---- kernel ------------------------------------------------------------------------------

def _kind(link: dict[str, Any]) -> str:
    return (link.get("linkinfo") or {}).get("info_kind", "")


def _read_pod_interface(pod: Pod, notes: list[str]) -> None:
    """Addresses, MAC and MTU of the pod's interface, read in its namespace."""
    import netns

    if not pod.netns:
        return
    try:
        if not netns.is_netns(pod.netns):
            notes.append(f"pod {pod.label}: its namespace {pod.netns} is gone")
            return
        with netns.enter(pod.netns):
            entries = readers.ip_json("addr", "show", "dev", pod.ifname)
    except Exception as exc:
        notes.append(f"pod {pod.label}: cannot read {pod.ifname} in {pod.netns}: {exc}")
        return
    if not entries:
        return
    entry = entries[0]
    pod.mac = entry.get("address", pod.mac)
    pod.mtu = entry.get("mtu", pod.mtu)
    live = [f"{a['local']}/{a['prefixlen']}" for a in entry.get("addr_info", [])
            if not (a.get("scope") == "link" and a.get("family") == "inet6")]
    if live:
        pod.addresses = live


def _masquerade(ruleset: list[dict[str, Any]]) -> dict[str, str]:
    """pod address -> chain of table pycni_masq that masquerades it."""
    out = {}
    for obj in ruleset:
        entry = obj.get("map")
        if not entry or entry.get("table") != MASQ_TABLE:
            continue
        for elem in entry.get("elem", []):
            if not isinstance(elem, list) or len(elem) != 2:
                continue
            key, value = elem
            if isinstance(key, dict):
                key = (key.get("elem") or {}).get("val", "")
            target = (value or {}).get("jump", {}).get("target", "") if isinstance(value, dict) else ""
            if isinstance(key, str):
                out[key] = f"{MASQ_TABLE} {target}".strip()
    return out


def _portmaps(ruleset: list[dict[str, Any]]) -> list[PortMapping]:
    out = []
    for obj in ruleset:
        entry = obj.get("map")
        if not entry or entry.get("table") != PORTMAP_TABLE:
            continue
        for elem in entry.get("elem", []):
            if not isinstance(elem, list) or len(elem) != 2:
                continue
            key, value = elem
            if isinstance(key, dict) and "elem" in key:
                key = key["elem"].get("val")
            key_parts = (key or {}).get("concat", []) if isinstance(key, dict) else []
            value_parts = (value or {}).get("concat", []) if isinstance(value, dict) else []
            if len(value_parts) != 2 or len(key_parts) not in (2, 3):
                continue
            host_ip = str(key_parts[0]) if len(key_parts) == 3 else ""
            proto, port = key_parts[-2], key_parts[-1]
            try:
                out.append(PortMapping(str(proto), int(port), str(value_parts[0]), int(value_parts[1]), host_ip))
            except (TypeError, ValueError):
                continue
    return out


def _overlay_table(ruleset: list[dict[str, Any]]) -> tuple[list[str], bool]:
    members: list[str] = []
    masquerade = False
    for obj in ruleset:
        if "set" in obj and obj["set"].get("table") == OVERLAY_TABLE:
            members += [str(e) for e in obj["set"].get("elem", []) if isinstance(e, str)]
        rule = obj.get("rule")
        if rule and rule.get("table") == OVERLAY_TABLE:
            if any(isinstance(e, dict) and "masquerade" in e for e in rule.get("expr", [])):
                masquerade = True
    return sorted(members, key=_address_key), masquerade


def _address_key(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def _shaping(qdiscs: list[dict[str, Any]], host_veth: str, ifb: str) -> Shaping | None:
    shaping = Shaping(ifb=ifb)
    for q in qdiscs:
        if q.get("kind") != "tbf" or not q.get("root"):
            continue
        options = q.get("options") or {}
        if q.get("dev") == host_veth:
            shaping.ingress_bits, shaping.ingress_burst = int(options.get("rate", 0)) * 8, options.get("burst")
        elif ifb and q.get("dev") == ifb:
            shaping.egress_bits, shaping.egress_burst = int(options.get("rate", 0)) * 8, options.get("burst")
    if shaping.ingress_bits is None and shaping.egress_bits is None:
        return None
    return shaping


@dataclass(frozen=True)
class Lanes:
    """What this node's overlay state says about its VXLAN devices: which remote pods each one carries."""

    public_ips: tuple[str, ...]        # this node's own underlay addresses
    device: str                        # the main device (on --public-ip)
    device6: str = ""                  # the second device, on --public-ipv6's underlay ("" without one)
    families: tuple[int, ...] = (4,)   # the cluster's pod families

    def carries(self, device: str, lease: Any) -> tuple[str, str, list[int]] | None:
        """(the remote's underlay address, its VTEP MAC, the pod families) that ``device`` carries to the node of
        ``lease``; None when the device carries nothing of it (another device does, or it is not the overlay's)."""
        public6, mac6 = getattr(lease, "public_ipv6", "") or "", getattr(lease, "vtep_mac6", "") or ""
        held = [v for v in self.families if _lease_subnet(lease, v)]
        if self.device6 and device == self.device6:
            return (public6, mac6, [6]) if public6 and mac6 and 6 in held else None
        if device != self.device:
            return None
        if self.device6 and public6 and mac6:
            held = [v for v in held if v != 6]   # its IPv6 pods go through the second device
        return (lease.public_ip, lease.vtep_mac, held) if held else None


def _lease_subnet(lease: Any, version: int) -> str:
    for text in (getattr(lease, "subnet", "") or "", getattr(lease, "ipv6_subnet", "") or ""):
        if text and (":" in text) == (version == 6):
            return text
    return ""


def _norm(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


def _remotes(vx: Vxlan, leases: list[Any] | None, own_public_ip: str, notes: list[str],
             lanes: Lanes | None = None) -> list[Remote]:
    """The remote nodes of one VXLAN device: its FDB, neighbour and onlink route entries (each pod family),
    joined with the store's leases when there are any (``lanes``: which leases' pods the device carries;
    without an overlay state every lease's pods are expected on every device)."""
    fdb = [e for e in readers.fdb(vx.name) if e.get("dst") and e.get("mac") != "00:00:00:00:00:00"]
    neigh = readers.neighbours(vx.name)
    routes = readers.routes(None, "dev", vx.name) + readers.routes(None, "dev", vx.name, version=6)
    by_mac: dict[str, Remote] = {}
    families: dict[str, dict[int, dict[str, Any]]] = {}   # VTEP MAC -> family -> subnet, vtep, neigh, route
    for entry in fdb:
        mac = entry["mac"].lower()
        by_mac.setdefault(mac, Remote(public_ip=entry["dst"], vtep_mac=mac)).fdb = True
    vtep_to_mac = {}
    for entry in neigh:
        mac = (entry.get("lladdr") or "").lower()
        address = _norm(entry.get("dst", ""))
        if not mac or address.startswith("fe80:"):
            continue
        by_mac.setdefault(mac, Remote(vtep_mac=mac))
        version = 6 if ":" in address else 4
        families.setdefault(mac, {})[version] = {"subnet": "", "vtep": address, "neigh": True, "route": False}
        vtep_to_mac[address] = mac
    unmatched = []
    for route in routes:
        gateway = _norm(route.get("gateway", ""))
        if not gateway:          # the kernel's own routes (its addresses, link-local)
            continue
        mac = vtep_to_mac.get(gateway)
        if mac is None:
            unmatched.append((route.get("dst", ""), gateway))   # no neighbour entry names its VTEP
            continue
        family = families[mac][6 if ":" in gateway else 4]
        family["route"], family["subnet"] = True, route.get("dst", "")
    remotes = list(by_mac.values())
    if leases is not None:
        for lease in leases:
            if lease.public_ip == own_public_ip or (lanes and lease.public_ip in lanes.public_ips):
                continue
            if lanes is not None:
                carried = lanes.carries(vx.name, lease)
                if carried is None:
                    continue
                public_ip, mac, versions = carried
            else:
                public_ip, mac = lease.public_ip, lease.vtep_mac
                versions = [v for v in (4, 6) if _lease_subnet(lease, v)]
            mac = mac.lower()
            remote = by_mac.get(mac)
            if remote is None:
                remote = by_mac[mac] = Remote(vtep_mac=mac)
                remotes.append(remote)
            remote.in_store = True
            remote.public_ip = remote.public_ip or public_ip
            remote.node_name = lease.node_name
            for version in versions:
                subnet = _lease_subnet(lease, version)
                family = families.setdefault(mac, {}).setdefault(
                    version, {"subnet": "", "vtep": "", "neigh": False, "route": False})
                family["subnet"] = family["subnet"] or subnet
                family["vtep"] = family["vtep"] or str(ipaddress.ip_network(subnet).network_address)
            if remote.public_ip != public_ip:
                notes.append(f"{vx.name}: the FDB sends VTEP {mac} to {remote.public_ip}, but the store says node "
                             f"{lease.node_name or lease.public_ip} is at {public_ip}")
    for dst, gateway in unmatched:
        # A route to a node whose neighbour entry is missing: the store's lease names that VTEP address.
        owner = next(((mac, version) for mac, found in families.items() for version, family in found.items()
                      if family["vtep"] == gateway), None)
        if owner is None:
            remotes.append(Remote(subnet=dst, vtep_address=gateway, route=True))
        else:
            family = families[owner[0]][owner[1]]
            family["route"], family["subnet"] = True, family["subnet"] or dst
    for mac, remote in by_mac.items():
        found = families.get(mac, {})
        versions = sorted(found)
        if versions:
            first = found[versions[0]]
            remote.subnet, remote.vtep_address = first["subnet"], first["vtep"]
            remote.neigh, remote.route = first["neigh"], first["route"]
        if versions == [4, 6]:
            second = found[6]
            remote.subnet6, remote.vtep_address6 = second["subnet"], second["vtep"]
            remote.neigh6, remote.route6 = second["neigh"], second["route"]
    return sorted(remotes, key=lambda r: (r.subnet or "~", r.public_ip))


def collect(cache_dir: str = DEFAULT_CACHE_DIR, state_dir: str = DEFAULT_STATE_DIR,
            ipam_dirs: list[str] | None = None, leases: list[Any] | None = None) -> NodeView:
    """The node's network, read now (see the module docstring)."""
    from cni_plugins.shared.overlaystate import OverlayStateError, read_state

    errors = readers.ReadErrors()
    view = NodeView()
    try:
        state = read_state(state_dir)
    except (OverlayStateError, OSError) as exc:
        state = None
        view.notes.append(f"overlay state in {state_dir} unreadable: {exc}")
    lanes = None
    if state is not None:
        view.name, view.public_ip = state.node_name, state.public_ip
        view.network, view.subnet, view.gateway, view.mtu = state.network, state.subnet, state.gateway, state.mtu
        view.network6, view.subnet6, view.gateway6 = state.network6, state.subnet6, state.gateway6
        view.public_ipv6 = state.public_ipv6
        lanes = Lanes(tuple(a for a in (state.public_ip, state.public_ipv6) if a), state.vxlan_device,
                      state.vxlan_device6,
                      tuple(ipaddress.ip_network(subnet).version for _net, subnet, _gw in state.pools()))

    links = readers.links(errors)
    addrs = readers.addresses(errors)
    nsids = readers.netns_ids(errors)
    by_name = {link["ifname"]: link for link in links}
    if view.public_ip:
        view.underlay = next((name for name, cidrs in addrs.items()
                              if any(c.split("/")[0] == view.public_ip for c in cidrs)), "")
    if view.public_ipv6:
        view.underlay6 = next((name for name, cidrs in addrs.items()
                               if any(_norm(c.split("/")[0]) == _norm(view.public_ipv6) for c in cidrs)), "")

    for link in links:
        if _kind(link) == "bridge":
            view.bridges.append(Bridge(name=link["ifname"], mac=link.get("address", ""), mtu=link.get("mtu"),
                                       state=link.get("operstate", ""), addresses=addrs.get(link["ifname"], []),
                                       ports=sorted(l["ifname"] for l in links if l.get("master") == link["ifname"])))
        elif _kind(link) == "vxlan":
            data = (link.get("linkinfo") or {}).get("info_data") or {}
            view.vxlans.append(Vxlan(name=link["ifname"], vni=data.get("id"), port=data.get("port"),
                                     local=data.get("local") or data.get("local6", ""), underlay=data.get("link", ""),
                                     mac=link.get("address", ""), mtu=link.get("mtu"),
                                     addresses=addrs.get(link["ifname"], []), learning=data.get("learning")))

    pods, data_dirs, host_names = cached_pods(cache_dir, view.notes)
    dirs = list(ipam_dirs if ipam_dirs is not None else [DEFAULT_IPAM_DIR])
    pods += leased_pods(dirs + [d for d in data_dirs if d not in dirs], pods)

    # Host-side veths: from the cached result, else the bridge port whose peer leads into the pod's namespace.
    port_owner: dict[str, Pod] = {}
    ifbs: dict[int, str] = {}
    for pod in pods:
        for name in host_names.get(id(pod), []):
            link = by_name.get(name)
            if link is not None and _kind(link) == "veth" and link.get("master"):
                pod.host_veth, pod.bridge = name, link["master"]
                port_owner[name] = pod
            elif link is not None and _kind(link) == "ifb":
                ifbs[id(pod)] = name
    name_to_pod = {os.path.basename(p.netns): p for p in pods if p.netns}
    for bridge in view.bridges:
        for port in bridge.ports:
            link = by_name.get(port, {})
            if port in port_owner or _kind(link) != "veth":
                continue
            ns_name = nsids.get(link.get("link_netnsid", -1), "")
            pod = name_to_pod.get(ns_name)
            if pod is None:
                pod = Pod(container_id="", netns=f"/run/netns/{ns_name}" if ns_name else "", source="veth")
                pods.append(pod)
            pod.host_veth, pod.bridge = port, bridge.name
            port_owner[port] = pod
    for pod in pods:
        if pod.netns:
            pod.netns_name = os.path.basename(pod.netns)
        _read_pod_interface(pod, view.notes)
        if pod.source == "veth" and pod.ip:
            lease = next((p for p in pods if p.source == "lease" and set(p.ips) & set(pod.ips)), None)
            if lease is not None:  # the namespace listing names the pod a lease belongs to
                pod.container_id, pod.network, pod.source = lease.container_id, lease.network, "lease"
                pods.remove(lease)
    view.pods = sorted(pods, key=lambda p: (p.bridge or "~", p.ip or "~", p.container_id))

    ruleset = readers.nft_ruleset(errors)
    masq = _masquerade(ruleset)
    view.portmap_entries = _portmaps(ruleset)
    view.overlay_members, view.overlay_masquerade = _overlay_table(ruleset)
    qdiscs = readers.qdiscs(errors)
    for pod in view.pods:
        for cidr in pod.addresses:
            address = cidr.split("/")[0]
            if address in masq:
                pod.masquerade = masq[address]
        if not pod.masquerade and view.overlay_masquerade and _in_networks(pod.ips, view.networks):
            pod.masquerade = f"{OVERLAY_TABLE} (leaving the cluster network)"
        pod.port_mappings = [m for m in view.portmap_entries if _norm(m.pod_ip) in {_norm(a) for a in pod.ips}]
        if pod.host_veth:
            ifb = ifbs.get(id(pod)) or next(iter(readers.ingress_redirects(pod.host_veth)), "")
            pod.shaping = _shaping(qdiscs, pod.host_veth, ifb)

    for vx in view.vxlans:
        vx.remotes = _remotes(vx, leases, view.public_ip, view.notes, lanes)
    view.notes += errors.notes
    return view


def _in_networks(addresses: list[str], networks: list[str]) -> bool:
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if any(ip.version == ipaddress.ip_network(net).version and ip in ipaddress.ip_network(net)
               for net in networks):
            return True
    return False
