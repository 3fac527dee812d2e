"""Building the picture of a node's network from what its kernel, the runtime cache and the leases hold.

Sources, each optional (what is missing is said in ``notes``):

- links, addresses and routes (iproute2): bridges and their ports, veth peers
  with the namespace they lead into (``ip netns list-id``), the VXLAN device;
- the libcni result cache ``pycni`` (and cnitool, containerd, CRI-O, podman)
  write: container ID, network, namespace, interface and addresses of every
  pod, its host-side veth, its ifb, and the CNI_ARGS the runtime passed
  (``cniArgs``), whose ``K8S_POD_NAMESPACE``/``K8S_POD_NAME`` name the pod;
- host-local's leases (``<dataDir>/<network>/<ip>``: container ID and interface),
  for pods attached by a runtime whose cache this command does not read;
- each pod's namespace: its interface's addresses, MAC and MTU as they are now;
- the VXLAN devices' FDB, neighbour and onlink route entries (IPv4 and IPv6),
  joined with the cluster store's leases (``--store``): every remote node's
  public IP, subnet of each pod family and VTEP MAC, and whether this node's
  kernel has each entry it needs (on a node with a second, IPv6-underlay
  device, on the device the agent sends that family through);
- with direct routing (the cluster's ``Backend.DirectRouting``), the routes
  that reach a remote node's pods without VXLAN: ``SUBNET via PUBLIC-IP`` on
  the underlay link, for each remote whose underlay address is on one of
  this node's underlay subnets;
- the nftables tables pycni_masq, pycni_portmap and pycni_overlay, and tc
  (tbf on the host veth, the ifb an ingress filter redirects to) per pod.

Everything is read in the calling thread's network namespace (the node's),
except each pod's interface, read inside the pod's namespace.

Health is judged here, once, for every renderer: a remote node is healthy
when every entry its pods need is there (per pod family: a neighbour and an
onlink route on the VXLAN device, plus the device's FDB entry; or, routed
directly, the route on the underlay link) and, with ``--store``, the store
still holds its lease. This node is healthy when its lease is valid, its
bridge and VXLAN devices exist and every remote node is healthy. What is
there decides the mode: a family whose route on the underlay link is found is
"direct", one whose onlink route on the VXLAN device is found is "vxlan";
only when neither is there does the cluster's DirectRouting setting say
which entries are missing.
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
    ingress_bits: int | None = None  # rate toward the pod (tbf on the host veth), bits/s
    ingress_burst: int | None = None  # bytes
    egress_bits: int | None = None  # rate from the pod (tbf on its ifb), bits/s
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
    netns: str = ""  # path
    netns_name: str = ""
    addresses: list[str] = field(default_factory=list)
    mac: str = ""
    mtu: int | None = None
    host_veth: str = ""
    bridge: str = ""
    gateway: str = ""
    masquerade: str = ""  # how its traffic leaving the cluster is masqueraded, "" if not
    port_mappings: list[PortMapping] = field(default_factory=list)
    shaping: Shaping | None = None
    source: str = "cache"  # cache, lease or veth: where this pod was found
    gateway6: str = ""  # a dual-stack pod's IPv6 gateway (gateway is then the IPv4 one)
    pod_namespace: str = ""  # K8S_POD_NAMESPACE and K8S_POD_NAME of the CNI_ARGS the runtime passed
    pod_name: str = ""  # (kept in the result cache's cniArgs), "" when it passed none

    @property
    def label(self) -> str:
        return self.container_id or self.host_veth or "?"

    @property
    def title(self) -> str:
        """What a person calls the pod: NAMESPACE/NAME when the runtime named it, else its short container ID."""
        if self.pod_name:
            return f"{self.pod_namespace}/{self.pod_name}" if self.pod_namespace else self.pod_name
        if self.container_id:
            return short_id(self.container_id)
        return f"(unknown, on {self.host_veth})" if self.host_veth else "(unknown)"

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

    A family routed directly (direct routing, the remote on this node's
    underlay subnet) has ``direct`` / ``direct6`` set to the next hop (the
    remote's underlay address) and ``route`` / ``route6`` saying whether the
    route ``SUBNET via direct dev direct_dev`` is there; it needs neither a
    neighbour entry nor, when no family goes through VXLAN, the FDB entry.
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
    direct: str = ""  # the first family's next hop on the underlay when routed directly
    direct6: str = ""  # the IPv6 family's, likewise
    direct_dev: str = ""  # the link the direct routes are (or belong) on
    store_checked: bool = False  # the store's leases were read: a remote it does not hold is stale

    @property
    def dual(self) -> bool:
        return bool(self.subnet6 or self.vtep_address6 or self.direct6)

    @property
    def needs_fdb(self) -> bool:
        """Whether some pod family reaches the node through VXLAN (and so needs the FDB entry)."""
        return not self.direct or (self.dual and not self.direct6)

    @property
    def mode(self) -> str:
        """ "vxlan", "direct", or "direct + vxlan" when one family is routed directly and the other is not."""
        if not self.direct and not self.direct6:
            return "vxlan"
        return "direct" if not self.needs_fdb else "direct + vxlan"

    @property
    def complete(self) -> bool:
        return not self.missing()

    def missing(self) -> list[str]:
        checks = [("FDB", self.fdb)] if self.needs_fdb else []
        if self.direct:
            checks.append(("direct route", self.route))
        else:
            checks += [("neighbour", self.neigh), ("route", self.route)]
        if self.dual:
            if self.direct6:
                checks.append(("IPv6 direct route", self.route6))
            else:
                checks += [("IPv6 neighbour", self.neigh6), ("IPv6 route", self.route6)]
        return [what for what, ok in checks if not ok]

    def problems(self) -> list[str]:
        """Why this remote node is unhealthy as seen from here (empty: healthy)."""
        out = []
        missing = self.missing()
        if missing:
            out.append("missing: " + ", ".join(missing))
        if self.store_checked and not self.in_store:
            out.append("not in the store (stale entries)")
        return out

    @property
    def healthy(self) -> bool:
        return not self.problems()


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
    underlay: str = ""  # the interface holding the public IP
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
    direct_routing: bool = False  # the cluster's Backend.DirectRouting (read from the store)
    own_problems: list[str] = field(default_factory=list)  # its lease, state and devices (empty: all well)

    def problems(self) -> list[str]:
        """Why this node is unhealthy: its own problems, then how many remote nodes it cannot reach."""
        bad = list(
            dict.fromkeys(
                r.node_name or r.public_ip or r.subnet or "?" for vx in self.vxlans for r in vx.remotes if not r.healthy
            )
        )
        if not bad:
            return list(self.own_problems)
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        return self.own_problems + [f"{len(bad)} remote node{'s' if len(bad) > 1 else ''} unhealthy: {shown}"]

    @property
    def healthy(self) -> bool:
        return not self.problems()

    def to_dict(self) -> dict[str, Any]:
        """Plain data for --format json: the fields, plus health, each pod's title and each remote's health."""
        doc = asdict(self)
        doc["healthy"], doc["problems"] = self.healthy, self.problems()
        for pod, out in zip(self.pods, doc["pods"]):
            out["title"] = pod.title
        for vx, out_vx in zip(self.vxlans, doc["vxlans"]):
            for remote, out in zip(vx.remotes, out_vx["remotes"]):
                out.update(healthy=remote.healthy, problems=remote.problems(), mode=remote.mode)
        return doc

    @property
    def networks(self) -> list[str]:
        """The cluster's pod networks, one per family."""
        return [net for net in (self.network, self.network6) if net]


def short_id(container_id: str, keep: int = 12) -> str:
    """A container ID as runtimes print it: a 64-hex-digit ID (containerd, CRI-O, podman) cut to its first 12
    digits (`crictl ps`, `docker ps`); any other ID whole up to 28 characters, longer ones cut with an ellipsis."""
    if len(container_id) >= 32 and all(c in "0123456789abcdef" for c in container_id.lower()):
        return container_id[:keep]
    return container_id if len(container_id) <= 28 else container_id[:27] + "…"


def pod_identity(cni_args: list[tuple[str, str]]) -> tuple[str, str]:
    """(K8S_POD_NAMESPACE, K8S_POD_NAME) among CNI_ARGS pairs; "" for each one missing (or not printable)."""
    found = {key: value for key, value in cni_args if key in ("K8S_POD_NAMESPACE", "K8S_POD_NAME")}

    def clean(value: str) -> str:
        # Kubernetes names are DNS labels/subdomains; anything else (control characters, a novel) is not shown.
        return value if value.isprintable() and 0 < len(value) <= 253 else ""

    return clean(found.get("K8S_POD_NAMESPACE", "")), clean(found.get("K8S_POD_NAME", ""))


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
        pod = Pod(
            container_id=entry.container_id,
            network=entry.network_name,
            ifname=entry.ifname,
            netns=entry.netns,
            source="cache",
        )
        pod.pod_namespace, pod.pod_name = pod_identity(entry.cni_args)
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
                pod = found.setdefault(
                    (container_id, ifname),
                    Pod(container_id=container_id, network=network, ifname=ifname, source="lease"),
                )
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
    live = [
        f"{a['local']}/{a['prefixlen']}"
        for a in entry.get("addr_info", [])
        if not (a.get("scope") == "link" and a.get("family") == "inet6")
    ]
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

    public_ips: tuple[str, ...]  # this node's own underlay addresses
    device: str  # the main device (on --public-ip)
    device6: str = ""  # the second device, on --public-ipv6's underlay ("" without one)
    families: tuple[int, ...] = (4,)  # the cluster's pod families

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
            held = [v for v in held if v != 6]  # its IPv6 pods go through the second device
        return (lease.public_ip, lease.vtep_mac, held) if held else None


@dataclass
class DirectRoutes:
    """Direct routing as this node's kernel has it: the underlay subnets and the routes into the pod networks.

    ``enabled`` is the cluster's Backend.DirectRouting; ``subnets`` pairs each
    subnet of this node's own underlay addresses with the link holding it (a
    remote whose underlay address is inside one is routed directly when
    enabled); ``routes`` maps every pod subnet routed via a gateway on a link
    other than the VXLAN devices to (gateway, link). ``claimed`` collects the
    routes a lease accounted for, so the rest can be shown as well.
    """

    enabled: bool = False
    subnets: list[tuple[Any, str]] = field(default_factory=list)
    own: frozenset = frozenset()
    routes: dict[str, tuple[str, str]] = field(default_factory=dict)
    claimed: set[str] = field(default_factory=set)

    def expected_hop(self, lease: Any, version: int) -> tuple[str, str]:
        """(next hop, link) a route to the ``version`` pods of ``lease`` takes when routed directly (the
        remote's underlay address of that family on one of this node's underlay subnets); ("", "") when
        direct routing is off or the remote is on another subnet."""
        if not self.enabled:
            return "", ""
        for text in (getattr(lease, "public_ip", "") or "", getattr(lease, "public_ipv6", "") or ""):
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                continue
            if address.version != version or str(address) in self.own:
                continue
            for net, link in self.subnets:
                if net.version == version and address in net:
                    return str(address), link
        return "", ""

    def found(self, subnet: str, lease: Any, device: str) -> tuple[str, str] | None:
        """(gateway, link) of the route to ``subnet`` when it goes via one of the lease's underlay addresses on
        a link other than ``device``; None otherwise."""
        try:
            key = str(ipaddress.ip_network(subnet))
        except ValueError:
            return None
        route = self.routes.get(key)
        if route is None or route[1] == device:
            return None
        addresses = {_norm(getattr(lease, name, "") or "") for name in ("public_ip", "public_ipv6")} - {""}
        return route if route[0] in addresses else None


def direct_routes(
    enabled: bool,
    underlays: list[str],
    addrs: dict[str, list[str]],
    own: list[str],
    pod_networks: list[str],
    vxlan_devices: list[str],
    errors: readers.ReadErrors | None = None,
    lease_subnets: list[str] = (),
) -> DirectRoutes:
    """Read what DirectRoutes holds: the subnets on the ``underlays`` links, and the main table's routes with
    a gateway, off the VXLAN devices, into a pod network (or to a lease's subnet)."""
    out = DirectRoutes(enabled=enabled, own=frozenset(_norm(a) for a in own if a))
    for link in dict.fromkeys(u for u in underlays if u):
        for cidr in addrs.get(link, []):
            try:
                net = ipaddress.ip_interface(cidr).network
            except ValueError:
                continue
            if net.num_addresses > 1:
                out.subnets.append((net, link))
    networks = []
    for text in pod_networks:
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError:
            continue
    exact = set()
    for text in lease_subnets:
        try:
            exact.add(ipaddress.ip_network(text))
        except ValueError:
            continue
    if not networks and not exact:
        return out
    for version in (4, 6):
        for route in readers.routes(errors, version=version):
            gateway, link, dst = route.get("gateway"), route.get("dev", ""), route.get("dst", "")
            if not gateway or link in vxlan_devices or route.get("table", "main") != "main":
                continue
            try:
                net = ipaddress.ip_network(dst)
            except ValueError:
                continue
            if net in exact or any(net.version == n.version and net.subnet_of(n) for n in networks):
                out.routes[str(net)] = (_norm(gateway), link)
    return out


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


def _remotes(
    vx: Vxlan,
    leases: list[Any] | None,
    own_public_ip: str,
    notes: list[str],
    lanes: Lanes | None = None,
    direct: DirectRoutes | None = None,
) -> list[Remote]:
    """The remote nodes of one VXLAN device: its FDB, neighbour and onlink route entries (each pod family),
    joined with the store's leases when there are any (``lanes``: which leases' pods the device carries;
    without an overlay state every lease's pods are expected on every device). With ``direct``, a lease's
    family whose subnet is routed via the remote's underlay address on another link is "direct"; one with no
    route anywhere is expected direct when direct routing is on and the remote shares an underlay subnet."""
    fdb = [e for e in readers.fdb(vx.name) if e.get("dst") and e.get("mac") != "00:00:00:00:00:00"]
    neigh = readers.neighbours(vx.name)
    routes = readers.routes(None, "dev", vx.name) + readers.routes(None, "dev", vx.name, version=6)
    by_mac: dict[str, Remote] = {}
    families: dict[str, dict[int, dict[str, Any]]] = {}  # VTEP MAC -> family -> subnet, vtep, neigh, route
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
        if not gateway:  # the kernel's own routes (its addresses, link-local)
            continue
        mac = vtep_to_mac.get(gateway)
        if mac is None:
            unmatched.append((route.get("dst", ""), gateway))  # no neighbour entry names its VTEP
            continue
        family = families[mac][6 if ":" in gateway else 4]
        family["route"], family["subnet"] = True, route.get("dst", "")
    remotes = list(by_mac.values())
    candidates: list[tuple[Any, str, int]] = []  # (lease, VTEP MAC, family): where a direct route may stand
    if leases is not None:
        for remote in remotes:
            remote.store_checked = True
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
                remote = by_mac[mac] = Remote(vtep_mac=mac, store_checked=True)
                remotes.append(remote)
            remote.in_store = True
            remote.public_ip = remote.public_ip or public_ip
            remote.node_name = lease.node_name
            for version in versions:
                subnet = _lease_subnet(lease, version)
                family = families.setdefault(mac, {}).setdefault(
                    version, {"subnet": "", "vtep": "", "neigh": False, "route": False}
                )
                family["subnet"] = family["subnet"] or subnet
                family["vtep"] = family["vtep"] or str(ipaddress.ip_network(subnet).network_address)
                candidates.append((lease, mac, version))
            if remote.public_ip != public_ip:
                notes.append(
                    f"{vx.name}: the FDB sends VTEP {mac} to {remote.public_ip}, but the store says node "
                    f"{lease.node_name or lease.public_ip} is at {public_ip}"
                )
    for dst, gateway in unmatched:
        # A route to a node whose neighbour entry is missing: the store's lease names that VTEP address.
        owner = next(
            (
                (mac, version)
                for mac, found in families.items()
                for version, family in found.items()
                if family["vtep"] == gateway
            ),
            None,
        )
        if owner is None:
            remotes.append(Remote(subnet=dst, vtep_address=gateway, route=True, store_checked=leases is not None))
        else:
            family = families[owner[0]][owner[1]]
            family["route"], family["subnet"] = True, family["subnet"] or dst
    if direct is not None:
        for lease, mac, version in candidates:
            _judge_direct(families[mac][version], lease, version, vx.name, direct, notes)
    for mac, remote in by_mac.items():
        found = families.get(mac, {})
        versions = sorted(found)
        if versions:
            first = found[versions[0]]
            remote.subnet, remote.vtep_address = first["subnet"], first["vtep"]
            remote.neigh, remote.route = first["neigh"], first["route"]
            remote.direct = first.get("direct", "")
            remote.direct_dev = first.get("dev", "")
        if versions == [4, 6]:
            second = found[6]
            remote.subnet6, remote.vtep_address6 = second["subnet"], second["vtep"]
            remote.neigh6, remote.route6 = second["neigh"], second["route"]
            remote.direct6 = second.get("direct", "")
            remote.direct_dev = remote.direct_dev or second.get("dev", "")
    return sorted(remotes, key=lambda r: (r.subnet or "~", r.public_ip))


def _judge_direct(
    family: dict[str, Any], lease: Any, version: int, device: str, direct: DirectRoutes, notes: list[str]
) -> None:
    """Decide whether one pod family of a remote is routed directly (see the module docstring): a route via
    the remote's underlay address on another link makes it so; an onlink route on the VXLAN device makes it
    VXLAN; with neither, the cluster's setting says which entries are missing."""
    subnet = family["subnet"]
    found = direct.found(subnet, lease, device)
    if found is not None:
        direct.claimed.add(str(ipaddress.ip_network(subnet)))
        family.update(direct=found[0], dev=found[1], route=True, vtep="")
        return
    if family["route"]:
        return
    hop, link = direct.expected_hop(lease, version)
    if not hop:
        return
    family.update(direct=hop, dev=link, route=False, vtep="")
    other = direct.routes.get(str(ipaddress.ip_network(subnet)))
    if other is not None and other[1] != device:
        direct.claimed.add(str(ipaddress.ip_network(subnet)))
        notes.append(
            f"{subnet} (node {lease.node_name or lease.public_ip}) is routed via {other[0]} on "
            f"{other[1]}, but the node is at {hop}"
        )


def _stray_direct_routes(direct: DirectRoutes, store_checked: bool) -> list[Remote]:
    """Remotes for the direct routes into a pod network that no lease accounted for: with --store a stale
    route (a subnet no node holds), without it the only sign of a directly routed node."""
    out = []
    for dst, (gateway, link) in sorted(direct.routes.items()):
        if dst in direct.claimed:
            continue
        out.append(
            Remote(
                public_ip=gateway, subnet=dst, direct=gateway, direct_dev=link, route=True, store_checked=store_checked
            )
        )
    return out


def collect(
    cache_dir: str = DEFAULT_CACHE_DIR,
    state_dir: str = DEFAULT_STATE_DIR,
    ipam_dirs: list[str] | None = None,
    leases: list[Any] | None = None,
    direct_routing: bool = False,
) -> NodeView:
    """The node's network, read now (see the module docstring).

    ``leases`` are the cluster store's (None: not read), ``direct_routing`` its
    configuration's Backend.DirectRouting.
    """
    from cni_plugins.shared.overlaystate import OverlayStateError, read_state

    errors = readers.ReadErrors()
    view = NodeView(direct_routing=direct_routing)
    state_error = ""
    try:
        state = read_state(state_dir)
    except (OverlayStateError, OSError) as exc:
        state = None
        state_error = f"overlay state in {state_dir} unreadable: {exc}"
        view.notes.append(state_error)
    lanes = None
    if state is not None:
        view.name, view.public_ip = state.node_name, state.public_ip
        view.network, view.subnet, view.gateway, view.mtu = state.network, state.subnet, state.gateway, state.mtu
        view.network6, view.subnet6, view.gateway6 = state.network6, state.subnet6, state.gateway6
        view.public_ipv6 = state.public_ipv6
        lanes = Lanes(
            tuple(a for a in (state.public_ip, state.public_ipv6) if a),
            state.vxlan_device,
            state.vxlan_device6,
            tuple(ipaddress.ip_network(subnet).version for _net, subnet, _gw in state.pools()),
        )

    links = readers.links(errors)
    addrs = readers.addresses(errors)
    nsids = readers.netns_ids(errors)
    by_name = {link["ifname"]: link for link in links}
    if view.public_ip:
        view.underlay = next(
            (name for name, cidrs in addrs.items() if any(c.split("/")[0] == view.public_ip for c in cidrs)), ""
        )
    if view.public_ipv6:
        view.underlay6 = next(
            (
                name
                for name, cidrs in addrs.items()
                if any(_norm(c.split("/")[0]) == _norm(view.public_ipv6) for c in cidrs)
            ),
            "",
        )

    for link in links:
        if _kind(link) == "bridge":
            view.bridges.append(
                Bridge(
                    name=link["ifname"],
                    mac=link.get("address", ""),
                    mtu=link.get("mtu"),
                    state=link.get("operstate", ""),
                    addresses=addrs.get(link["ifname"], []),
                    ports=sorted(l["ifname"] for l in links if l.get("master") == link["ifname"]),
                )
            )
        elif _kind(link) == "vxlan":
            data = (link.get("linkinfo") or {}).get("info_data") or {}
            view.vxlans.append(
                Vxlan(
                    name=link["ifname"],
                    vni=data.get("id"),
                    port=data.get("port"),
                    local=data.get("local") or data.get("local6", ""),
                    underlay=data.get("link", ""),
                    mac=link.get("address", ""),
                    mtu=link.get("mtu"),
                    addresses=addrs.get(link["ifname"], []),
                    learning=data.get("learning"),
                )
            )

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

    direct = None
    if view.vxlans:
        lease_subnets = [
            subnet for lease in leases or [] for subnet in (_lease_subnet(lease, 4), _lease_subnet(lease, 6)) if subnet
        ]
        direct = direct_routes(
            direct_routing,
            [view.underlay, view.underlay6],
            addrs,
            [view.public_ip, view.public_ipv6],
            view.networks,
            [vx.name for vx in view.vxlans],
            errors,
            lease_subnets,
        )
    for vx in view.vxlans:
        vx.remotes = _remotes(vx, leases, view.public_ip, view.notes, lanes, direct)
    if direct is not None:
        for remote in _stray_direct_routes(direct, leases is not None):
            _device_for(view, lanes, remote.subnet).remotes.append(remote)
    view.notes += errors.notes
    view.own_problems = _node_problems(view, state, state_error)
    return view


def _device_for(view: NodeView, lanes: Lanes | None, subnet: str) -> Vxlan:
    """The VXLAN device that would carry ``subnet``'s pods (the second device for IPv6 pods when there is one)."""
    names = {vx.name: vx for vx in view.vxlans}
    if lanes is not None:
        if ":" in subnet and lanes.device6 in names:
            return names[lanes.device6]
        if lanes.device in names:
            return names[lanes.device]
    return view.vxlans[0]


def _node_problems(view: NodeView, state: Any, state_error: str) -> list[str]:
    """What is wrong with this node itself: its overlay state, its lease, its devices."""
    from cni_plugins.shared.overlaystate import lease_problem

    out = [state_error] if state_error else []
    if state is not None:
        problem = lease_problem(state)
        if problem:
            out.append(problem)
        if state.bridge not in {b.name for b in view.bridges}:
            out.append(f"bridge {state.bridge} is missing")
        devices = {vx.name for vx in view.vxlans}
        out += [
            f"VXLAN device {name} is missing"
            for name in (state.vxlan_device, state.vxlan_device6)
            if name and name not in devices
        ]
    return out


def _in_networks(addresses: list[str], networks: list[str]) -> bool:
    for address in addresses:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            continue
        if any(ip.version == ipaddress.ip_network(net).version and ip in ipaddress.ip_network(net) for net in networks):
            return True
    return False
