"""The cluster configuration and the nodes' subnet leases (flannel's layout).

Each node leases one subnet of the cluster network; the lease also carries
the node's VTEP (underlay IP and VXLAN device MAC) so that every other node
can program its FDB, neighbour and route entries. A subnet is taken with an
atomic create-if-absent, so two nodes racing for the same subnet never both
get it.
"""
from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field, replace as dc_replace
from typing import Any, Iterator

from .errors import ConfigConflict, LeaseExhausted, LeaseLost, StoreError
from .store import Entry, Store

CONFIG_KEY = "config"
SUBNETS_PREFIX = "subnets/"
BACKEND_TYPE = "vxlan"

MAX_VNI = 2**24 - 1
_MAX_ROUNDS = 64  # list-and-claim rounds before giving up on a store that keeps changing under us
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class ClusterConfig:
    """The overlay's cluster-wide settings, stored once under the key `config`.

    network: the cluster (pod) CIDR; each node leases one /subnet_len of it.
    vni and port: the VXLAN network identifier and UDP port every node uses
    (8472 is the Linux kernel's and flannel's default, 4789 the IANA port).
    Invalid values raise ValueError with a message saying what is accepted.
    """

    network: str
    subnet_len: int = 24
    vni: int = 1
    port: int = 8472

    def __post_init__(self) -> None:
        try:
            net = ipaddress.ip_network(str(self.network), strict=True)
        except ValueError as err:
            try:
                loose = ipaddress.ip_network(str(self.network), strict=False)
            except ValueError:
                raise ValueError(f"invalid cluster network {self.network!r}: give a CIDR such as "
                                 f"10.244.0.0/16 ({err})") from None
            raise ValueError(f"invalid cluster network {self.network!r}: it has host bits set; "
                             f"did you mean {loose}?") from None
        self.network = str(net)
        for name in ("subnet_len", "vni", "port"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"invalid {name} {value!r}: it must be a whole number")
        longest = net.max_prefixlen - 2  # a node subnet needs room for a gateway and pods
        if not net.prefixlen < self.subnet_len <= longest:
            raise ValueError(f"invalid subnet length /{self.subnet_len} for the network {net}: node subnets "
                             f"must be longer than /{net.prefixlen} (so the network holds several) and at "
                             f"most /{longest}")
        if not 1 <= self.vni <= MAX_VNI:
            raise ValueError(f"invalid VNI {self.vni}: it must be 1..{MAX_VNI}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"invalid VXLAN UDP port {self.port}: it must be 1..65535")

    @property
    def ip_network(self) -> IPNetwork:
        return ipaddress.ip_network(self.network)

    @property
    def subnet_count(self) -> int:
        return 2 ** (self.subnet_len - self.ip_network.prefixlen)

    def subnets(self) -> Iterator[IPNetwork]:
        """Every node subnet of the network, in address order."""
        return self.ip_network.subnets(new_prefix=self.subnet_len)

    def describe(self) -> str:
        return f"network {self.network}, /{self.subnet_len} per node, VNI {self.vni}, UDP port {self.port}"

    def to_json(self) -> str:
        """flannel's net-conf.json layout."""
        return json.dumps({"Network": self.network, "SubnetLen": self.subnet_len,
                           "Backend": {"Type": BACKEND_TYPE, "VNI": self.vni, "Port": self.port}}, sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes) -> "ClusterConfig":
        """Parse the stored form (flannel's net-conf.json keys); ValueError if it is not valid."""
        try:
            doc = json.loads(data)
        except ValueError as err:
            raise ValueError(f"the cluster configuration is not JSON: {err}") from None
        if not isinstance(doc, dict) or "Network" not in doc:
            raise ValueError("the cluster configuration has no \"Network\"")
        backend = doc.get("Backend") or {}
        if not isinstance(backend, dict):
            raise ValueError("the cluster configuration's \"Backend\" is not an object")
        backend_type = backend.get("Type", BACKEND_TYPE)
        if backend_type != BACKEND_TYPE:
            raise ValueError(f"the cluster configuration is for backend {backend_type!r}; pycni only "
                             f"implements {BACKEND_TYPE!r}")
        return cls(network=doc["Network"], subnet_len=doc.get("SubnetLen", 24), vni=backend.get("VNI", 1),
                   port=backend.get("Port", 8472))


@dataclass
class NodeLease:
    """One node's subnet and VTEP, stored under subnets/<a.b.c.d-len>.

    mod_revision is the store revision the lease was read or written at
    (0 for a lease not read from a store).
    """

    subnet: str
    public_ip: str
    vtep_mac: str
    node_name: str = ""
    mod_revision: int = field(default=0, compare=False)

    @property
    def key(self) -> str:
        return subnet_key(self.subnet)

    def to_json(self) -> str:
        """flannel's lease value, plus the node's name."""
        doc: dict[str, Any] = {"PublicIP": self.public_ip, "BackendType": BACKEND_TYPE,
                               "BackendData": {"VtepMAC": self.vtep_mac}}
        if self.node_name:
            doc["NodeName"] = self.node_name
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, subnet: str, data: str | bytes, mod_revision: int = 0) -> "NodeLease":
        """Parse a lease value (the subnet comes from its key); ValueError if it is not valid."""
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("a lease must be a JSON object")
        backend = doc.get("BackendData") or {}
        if not isinstance(backend, dict):
            raise ValueError("BackendData must be an object")
        return cls(subnet=subnet, public_ip=_check_ip(doc.get("PublicIP")),
                   vtep_mac=_check_mac(backend.get("VtepMAC")), node_name=str(doc.get("NodeName") or ""),
                   mod_revision=mod_revision)

    @classmethod
    def from_entry(cls, entry: Entry) -> "NodeLease":
        subnet = subnet_from_key(entry.key)
        if subnet is None:
            raise ValueError(f"{entry.key} is not a subnet lease key")
        return cls.from_json(subnet, entry.value, entry.mod_revision)


def subnet_key(subnet: str | IPNetwork) -> str:
    """subnets/10.244.1.0-24 for 10.244.1.0/24 (flannel's key layout)."""
    net = ipaddress.ip_network(subnet)
    return f"{SUBNETS_PREFIX}{net.network_address}-{net.prefixlen}"


def subnet_from_key(key: str) -> str | None:
    """10.244.1.0/24 for subnets/10.244.1.0-24; None for any other key."""
    if not key.startswith(SUBNETS_PREFIX):
        return None
    address, sep, length = key[len(SUBNETS_PREFIX):].rpartition("-")
    if not sep or not length.isdigit():
        return None
    try:
        return str(ipaddress.ip_network(f"{address}/{length}", strict=True))
    except ValueError:
        return None


# -- the cluster configuration ------------------------------------------------------


def init_cluster(store: Store, cfg: ClusterConfig) -> bool:
    """Write the cluster configuration: True if written, False if the same one is there already.

    Raises ConfigConflict, naming both, if a different configuration is stored.
    """
    for _ in range(2):
        if store.create(CONFIG_KEY, cfg.to_json().encode()):
            return True
        entry = store.get(CONFIG_KEY)
        if entry is None:
            continue  # deleted between create and get: try once more
        try:
            existing = ClusterConfig.from_json(entry.value)
        except ValueError as err:
            raise ConfigConflict(f"the store already holds a cluster configuration that pycni cannot read "
                                 f"({err}); refusing to overwrite it with {cfg.describe()}") from None
        if existing == cfg:
            return False
        raise ConfigConflict(f"the store already holds a different cluster configuration ({existing.describe()}); "
                             f"refusing to replace it with ({cfg.describe()}): nodes hold leases from the "
                             f"existing one. Use the existing settings, or a new store (another directory, "
                             f"or another --etcd-prefix)")
    raise StoreError("the cluster configuration keeps disappearing while it is being written; try again")


def read_config(store: Store) -> ClusterConfig:
    """The stored cluster configuration; StoreError if there is none or it is invalid."""
    entry = store.get(CONFIG_KEY)
    if entry is None:
        raise StoreError("the store holds no cluster configuration: run `pycni cluster init --store URL "
                         "--network CIDR` first")
    try:
        return ClusterConfig.from_json(entry.value)
    except ValueError as err:
        raise StoreError(f"the stored cluster configuration is invalid: {err}") from None


# -- leases ---------------------------------------------------------------------------


def list_leases(store: Store) -> tuple[list[NodeLease], int]:
    """Every valid lease (sorted by subnet) and the store revision they were read at.

    Malformed entries under subnets/ are left out here (acquire_lease still
    treats their subnets as taken).
    """
    entries, revision = store.list(SUBNETS_PREFIX)
    leases = []
    for entry in entries:
        try:
            leases.append(NodeLease.from_entry(entry))
        except (ValueError, TypeError):
            continue
    leases.sort(key=lambda lease: _net_sort_key(ipaddress.ip_network(lease.subnet)))
    return leases, revision


def acquire_lease(store: Store, cfg: ClusterConfig, public_ip: str, vtep_mac: str, node_name: str = "",
                  preferred_subnet: str | None = None, ttl: int | None = None,
                  previous: NodeLease | None = None) -> NodeLease:
    """Lease a subnet for the node whose underlay address is public_ip.

    A node gets its own subnet back: an existing lease with this public_ip is
    reused (and updated with vtep_mac and node_name). A node whose underlay
    address changed passes the lease it held before as previous (from its own
    state): if the store still holds exactly that lease (subnet, old address
    and old VTEP MAC), it is taken over in place with the new address, so the
    old address does not keep a subnet until its TTL. Otherwise
    preferred_subnet if it is a free subnet of the cluster (it is ignored if
    it does not belong to this cluster's network and subnet length), else the
    first free subnet in address order. Raises LeaseExhausted when every
    subnet is taken.
    """
    public_ip = _check_ip(public_ip)
    vtep_mac = _check_mac(vtep_mac)
    preferred = _fitting_subnet(cfg, preferred_subnet)
    for _ in range(_MAX_ROUNDS):
        entries, _revision = store.list(SUBNETS_PREFIX)
        leases, taken, odd = _survey(entries)
        mine = [lease for lease in leases if lease.public_ip == public_ip and _fits(cfg, lease.subnet)]
        if not mine and previous is not None:
            mine = [lease for lease in leases if _fits(cfg, lease.subnet) and lease.subnet == previous.subnet
                    and lease.public_ip == previous.public_ip and lease.vtep_mac == previous.vtep_mac]
        if mine:
            mine.sort(key=lambda lease: (lease.subnet != str(preferred), _net_sort_key(
                ipaddress.ip_network(lease.subnet))))
            updated = _update_own(store, mine[0], public_ip, vtep_mac, node_name, ttl)
            if updated is not None:
                return updated
            continue  # it changed under us: look again
        wanted = NodeLease(subnet="", public_ip=public_ip, vtep_mac=vtep_mac, node_name=node_name)
        candidates = _free_subnets(cfg, taken, odd, preferred)
        for subnet in candidates:
            claimed = _claim(store, dc_replace(wanted, subnet=str(subnet)), ttl)
            if claimed is not None:
                return claimed
            taken.add(str(subnet))  # another node was faster; take the next one
        else:
            raise LeaseExhausted(
                f"no free subnet left: all {cfg.subnet_count} /{cfg.subnet_len} subnets of {cfg.network} are "
                f"leased. Release the leases of nodes that left (`pycni agent leave` on them, or "
                f"release_lease), or create the cluster with a larger network or a longer subnet length "
                f"(for example /{cfg.ip_network.prefixlen - 1} instead of /{cfg.ip_network.prefixlen}) "
                f"in a new store")
    raise StoreError(f"could not lease a subnet for {public_ip}: the leases kept changing during "
                     f"{_MAX_ROUNDS} attempts; try again")


def renew_lease(store: Store, lease: NodeLease, ttl: int | None) -> NodeLease:
    """Keep a node's lease alive; returns it as stored now.

    If the lease expired it is written again (the same subnet, if it is still
    free). Raises LeaseLost if another node holds the subnet now.
    """
    for _ in range(_MAX_ROUNDS):
        entry = store.get(lease.key)
        if entry is None:
            if store.create(lease.key, lease.to_json().encode(), ttl=ttl):
                continue  # read it back for its revision
            continue  # someone took it meanwhile: find out who
        try:
            current = NodeLease.from_entry(entry)
        except (ValueError, TypeError) as err:
            raise LeaseLost(f"the lease of {lease.subnet} was replaced by an unreadable entry ({err})") from None
        if current.public_ip != lease.public_ip:
            raise LeaseLost(f"the subnet {lease.subnet} is now leased to {current.public_ip}"
                            f"{' (' + current.node_name + ')' if current.node_name else ''}, "
                            f"not {lease.public_ip}: acquire a new lease")
        if ttl is None or store.refresh(lease.key):
            return current
        # expired between get and refresh: go round and write it again
    raise StoreError(f"could not renew the lease of {lease.subnet}: it kept changing; try again")


def release_lease(store: Store, public_ip: str) -> bool:
    """Remove every lease held by public_ip; False if it held none."""
    public_ip = _check_ip(public_ip)
    leases, _revision = list_leases(store)
    released = False
    for lease in leases:
        if lease.public_ip == public_ip:
            released = store.delete(lease.key) or released
    return released


# -- helpers ---------------------------------------------------------------------------


def _survey(entries: list[Entry]) -> tuple[list[NodeLease], set[str], list[IPNetwork]]:
    """(readable leases, taken subnets as strings, taken subnets of any other length) from a listing."""
    leases: list[NodeLease] = []
    taken: set[str] = set()
    nets: list[IPNetwork] = []
    for entry in entries:
        subnet = subnet_from_key(entry.key)
        if subnet is None:
            continue
        taken.add(subnet)
        nets.append(ipaddress.ip_network(subnet))
        try:
            leases.append(NodeLease.from_entry(entry))
        except (ValueError, TypeError):
            pass  # unreadable, but its subnet stays taken
    return leases, taken, nets


def _free_subnets(cfg: ClusterConfig, taken: set[str], nets: list[IPNetwork],
                  preferred: IPNetwork | None) -> Iterator[IPNetwork]:
    odd = [net for net in nets if net.prefixlen != cfg.subnet_len and net.version == cfg.ip_network.version]

    def free(subnet: IPNetwork) -> bool:
        return str(subnet) not in taken and not any(subnet.overlaps(other) for other in odd)

    if preferred is not None and free(preferred):
        yield preferred
    for subnet in cfg.subnets():
        if subnet != preferred and free(subnet):
            yield subnet


def _claim(store: Store, lease: NodeLease, ttl: int | None) -> NodeLease | None:
    """Create the lease if its subnet is free; None if another node holds it."""
    if store.create(lease.key, lease.to_json().encode(), ttl=ttl):
        entry = store.get(lease.key)
        return dc_replace(lease, mod_revision=entry.mod_revision if entry else 0)
    # Taken. If a retried request created it for us after all, it is ours.
    entry = store.get(lease.key)
    if entry is not None:
        try:
            current = NodeLease.from_entry(entry)
        except (ValueError, TypeError):
            return None
        if current.public_ip == lease.public_ip and current.vtep_mac == lease.vtep_mac:
            return current
    return None


def _update_own(store: Store, lease: NodeLease, public_ip: str, vtep_mac: str, node_name: str,
                ttl: int | None) -> NodeLease | None:
    wanted = dc_replace(lease, public_ip=public_ip, vtep_mac=vtep_mac, node_name=node_name or lease.node_name)
    if wanted == lease and (ttl is None or store.refresh(lease.key)):
        return lease  # unchanged and alive: no write (and no revision bump that wakes every watcher)
    if store.replace(lease.key, wanted.to_json().encode(), lease.mod_revision, ttl=ttl):
        entry = store.get(lease.key)
        return dc_replace(wanted, mod_revision=entry.mod_revision if entry else 0)
    return None


def _fitting_subnet(cfg: ClusterConfig, subnet: str | None) -> IPNetwork | None:
    if not subnet:
        return None
    try:
        net = ipaddress.ip_network(subnet, strict=True)
    except ValueError as err:
        raise ValueError(f"invalid preferred subnet {subnet!r}: {err}") from None
    return net if _fits(cfg, str(net)) else None


def _fits(cfg: ClusterConfig, subnet: str) -> bool:
    net = ipaddress.ip_network(subnet)
    whole = cfg.ip_network
    if net.version != whole.version or net.prefixlen != cfg.subnet_len:
        return False
    return net.subnet_of(whole)  # type: ignore[arg-type]


def _check_ip(value: object) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValueError(f"invalid node public IP {value!r}: give the node's underlay IPv4 or IPv6 address") \
            from None


def _check_mac(value: object) -> str:
    text = str(value).strip().lower().replace("-", ":")
    if not _MAC_RE.match(text):
        raise ValueError(f"invalid VTEP MAC {value!r}: give six hex octets such as 0a:58:0a:f4:01:01")
    return text


def _net_sort_key(net: IPNetwork) -> tuple[int, int, int]:
    return net.version, int(net.network_address), net.prefixlen
