"""The cluster configuration and the nodes' subnet leases (flannel's layout).

Each node leases one subnet of the cluster network; the lease also carries
the node's VTEP (underlay IP and VXLAN device MAC) so that every other node
can program its FDB, neighbour and route entries. A subnet is taken with an
atomic create-if-absent, so two nodes racing for the same subnet never both
get it.

Anything can write to the store, so every value read from it is input:
decoded with bounded size and nesting (cni_plugins.spec.boundedjson), every
field checked, and a bad lease left out with a reason rather than letting it
reach the kernel or stop a loop:

    subnets/10.244.1.0-24   key        canonical (subnet_key(subnet_from_key(key)) == key); with a
                                       ClusterConfig: the cluster's family, inside its network, /SubnetLen
      {"PublicIP":         "192.168.1.10"  a string, an address without a zone (%), unicast (not
                                           multicast, unspecified, 255.255.255.255, loopback) and
                                           not inside the cluster network (that is a pod address)
       "BackendType":      "vxlan"         absent or "vxlan"
       "BackendData": {"VtepMAC": "0a:58:..."}   a string, a unicast MAC that is not all zeros
       "NodeName":         "node-a"        absent, or a string of at most 253 characters, no control characters
       "Subnet":           ...             if present (any spelling of "subnet"), the key's subnet
      }                                    at most 4 KiB and 8 levels of nesting

scan_leases() returns the accepted leases and the rejected keys with their
reasons; acquire_lease() still treats every key under subnets/ as taken,
readable or not.

A new node (no lease of its own, no usable previous or preferred subnet)
claims with one request that tries several subnets at once (a Claims'
create_first(), one nested txn on etcd, one lock on the file store):

    [preferred?] [the 8 lowest free subnets, in address order] [7-8 picked at random among the other free ones]
         the first of these that is still free when the request is applied is taken

Alone, a node gets the lowest free subnet, as before. When hundreds start at
once, all aim at the same lowest subnets, but each request falls through to
its own random picks, so nearly every node is done with its first claim: one
lease grant and one txn per node instead of a failed claim per node that was
faster (N*N/2 for N nodes). If every candidate was taken, the next claim tries
16 other random free subnets of the same listing; the node lists again only
when that listing is used up or after three failed claims. The etcd lease for
the TTL is granted once per acquire_lease() call, reused by every claim, and
revoked only if the call fails.

A lease also names its node (NodeName): acquire_lease() refuses (NodeConflict)
to hand one node's lease to a node of another name that claims the same
public IP, and renew_lease() reports a lease taken over by another node name
as LeaseLost. A lease without a name (older writers, flannel) is adopted.
"""
from __future__ import annotations

import bisect
import ipaddress
import json
import random
import re
import unicodedata
from dataclasses import dataclass, field, replace as dc_replace
from typing import Any, Iterator, Sequence

from cni_plugins.spec import boundedjson
from cni_plugins.spec.decode import json_type

from .errors import ConfigConflict, LeaseExhausted, LeaseLost, NodeConflict, StoreError, UnreadableEntry
from .store import MAX_CLAIM_KEYS, Claims, Entry, Store

CONFIG_KEY = "config"
SUBNETS_PREFIX = "subnets/"
BACKEND_TYPE = "vxlan"

MAX_VNI = 2**24 - 1
MAX_CONFIG_BYTES = 64 * 1024
MAX_CONFIG_DEPTH = 8
MAX_LEASE_BYTES = 4 * 1024
MAX_LEASE_DEPTH = 8
MAX_NODE_NAME = 253
_MAX_ROUNDS = 64  # list-and-claim rounds before giving up on a store that keeps changing under us
ORDERED_CANDIDATES = 8           # a new node's first claim tries the lowest free subnets in address order,
CLAIM_CANDIDATES = MAX_CLAIM_KEYS  # then fills up to this many with subnets picked at random
CLAIMS_PER_LISTING = 3           # claims made from one listing before listing again
_random = random.SystemRandom()  # no state shared with forked siblings: racing nodes pick differently
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
        if isinstance(self.network, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            self.network = str(self.network)
        if not isinstance(self.network, str):
            raise ValueError(f"invalid cluster network {self.network!r}: give a CIDR such as 10.244.0.0/16")
        try:
            net = ipaddress.ip_network(self.network, strict=True)
        except ValueError as err:
            try:
                loose = ipaddress.ip_network(self.network, strict=False)
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
        """Parse the stored form (flannel's net-conf.json keys); ValueError if it is not valid.

        At most 64 KiB and 8 levels of nesting; "Network" a string, "SubnetLen"
        and the backend's "VNI" and "Port" whole numbers (null or absent: the
        default), "Backend" an object whose "Type" is "vxlan". Other keys are
        ignored.
        """
        try:
            doc = boundedjson.loads(data, max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH)
        except ValueError as err:
            raise ValueError(f"the cluster configuration cannot be decoded: {err}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"the cluster configuration must be a JSON object, not {json_type(doc)}")
        if "Network" not in doc:
            raise ValueError("the cluster configuration has no \"Network\"")
        network = doc["Network"]
        if not isinstance(network, str):
            raise ValueError(f"the cluster configuration's \"Network\" must be a string such as "
                             f"\"10.244.0.0/16\", not {json_type(network)}")
        backend = doc.get("Backend")
        if backend is None:
            backend = {}
        if not isinstance(backend, dict):
            raise ValueError(f"the cluster configuration's \"Backend\" must be an object, not {json_type(backend)}")
        backend_type = backend.get("Type")
        if backend_type is None:
            backend_type = BACKEND_TYPE
        if backend_type != BACKEND_TYPE:
            raise ValueError(f"the cluster configuration is for backend {backend_type!r}; pycni only "
                             f"implements {BACKEND_TYPE!r}")
        return cls(network=network, subnet_len=_whole(doc, "SubnetLen", 24), vni=_whole(backend, "VNI", 1, "Backend."),
                   port=_whole(backend, "Port", 8472, "Backend."))


def _whole(doc: dict[str, Any], name: str, default: int, where: str = "") -> int:
    value = doc.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"the cluster configuration's \"{where}{name}\" must be a whole number, "
                         f"not {json_type(value)} ({_short(value)})")
    return value


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
        """Parse a lease value (the subnet comes from its key); ValueError naming the field if it is not valid.

        Only the checks that need no cluster configuration; see from_entry().
        """
        net = ipaddress.ip_network(subnet, strict=True)
        public_ip, vtep_mac, node_name = _lease_fields(net, data)
        return cls(subnet=str(net), public_ip=public_ip, vtep_mac=vtep_mac, node_name=node_name,
                   mod_revision=mod_revision)

    @classmethod
    def from_entry(cls, entry: Entry, cfg: "ClusterConfig | None" = None) -> "NodeLease":
        """The lease stored in entry; ValueError "KEY: what is wrong" if it is not acceptable.

        With cfg also the checks against the cluster: the subnet's family,
        network and length, and a public IP outside the cluster network.
        """
        return cls(*_check_entry(entry, cfg), mod_revision=entry.mod_revision)


@dataclass(frozen=True)
class RejectedLease:
    """A key under subnets/ that is not an acceptable lease, and why ("KEY: FIELD ... problem")."""

    key: str
    mod_revision: int
    reason: str


@dataclass
class LeaseScan:
    """One listing of subnets/: the accepted leases (sorted by subnet), the rejected keys, the revision."""

    leases: list[NodeLease] = field(default_factory=list)
    rejected: list[RejectedLease] = field(default_factory=list)
    revision: int = 0


def subnet_key(subnet: str | IPNetwork) -> str:
    """subnets/10.244.1.0-24 for 10.244.1.0/24 (flannel's key layout)."""
    net = ipaddress.ip_network(subnet)
    return f"{SUBNETS_PREFIX}{net.network_address}-{net.prefixlen}"


def subnet_from_key(key: str) -> str | None:
    """10.244.1.0/24 for subnets/10.244.1.0-24; None for any other key."""
    if not key.startswith(SUBNETS_PREFIX):
        return None
    address, sep, length = key[len(SUBNETS_PREFIX):].rpartition("-")
    if not sep or not (length.isascii() and length.isdigit()) or "%" in address:
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


def scan_leases(store: Store, cfg: ClusterConfig | None) -> LeaseScan:
    """List subnets/ and sort every entry into accepted leases and rejected keys (with reasons).

    Nothing read can make this raise except the store itself (StoreError):
    a value that is too large, nests too deep, is not JSON or carries a bad
    field is a RejectedLease. With cfg None only the checks that need no
    cluster configuration apply.
    """
    entries, revision = store.list(SUBNETS_PREFIX)
    return check_entries(entries, revision, cfg)


def check_entries(entries: list[Entry], revision: int, cfg: ClusterConfig | None) -> LeaseScan:
    """scan_leases() for entries already listed."""
    scan = LeaseScan(revision=revision)
    for entry in entries:
        try:
            scan.leases.append(NodeLease.from_entry(entry, cfg))
        except ValueError as err:
            scan.rejected.append(RejectedLease(entry.key, entry.mod_revision, str(err)))
    scan.leases.sort(key=lambda lease: _net_sort_key(ipaddress.ip_network(lease.subnet)))
    scan.rejected.sort(key=lambda rejected: rejected.key)
    return scan


def list_leases(store: Store, cfg: ClusterConfig | None = None) -> tuple[list[NodeLease], int]:
    """Every acceptable lease (sorted by subnet) and the store revision they were read at.

    scan_leases() without the rejected keys. Malformed entries under subnets/
    are left out here (acquire_lease still treats their subnets as taken).
    """
    scan = scan_leases(store, cfg)
    return scan.leases, scan.revision


def acquire_lease(store: Store, cfg: ClusterConfig, public_ip: str, vtep_mac: str, node_name: str = "",
                  preferred_subnet: str | None = None, ttl: int | None = None,
                  previous: NodeLease | None = None) -> NodeLease:
    """Lease a subnet for the node whose underlay address is public_ip.

    A node gets its own subnet back: an existing lease with this public_ip is
    reused (and updated with vtep_mac and node_name), unless it names another
    node (NodeConflict, see below). A node whose underlay address changed
    passes the lease it held before as previous (from its own state): if the
    store still holds exactly that lease (subnet, old address, old VTEP MAC
    and, when both are named, this node's name), it is taken over in place
    with the new address, so the old address does not keep a subnet until its
    TTL. Otherwise preferred_subnet if it is a free subnet of the cluster (it
    is ignored if it does not belong to this cluster's network and subnet
    length), else the first free subnet in address order; when other nodes
    take those at the same moment, a free subnet picked at random (see the
    module docstring: O(1) writes per node when hundreds start at once).
    Every key under subnets/ counts as taken, readable or not.

    Raises ValueError for an invalid public_ip, vtep_mac or node_name,
    NodeConflict when a lease of public_ip names another node than
    node_name (both non-empty), LeaseExhausted when every subnet is taken.
    """
    public_ip = _check_ip(public_ip)
    if _inside(ipaddress.ip_address(public_ip), cfg.ip_network):
        raise ValueError(f"invalid node public IP {public_ip}: it is inside the cluster network {cfg.network}, "
                         f"so it is a pod address; give the node's underlay address")
    vtep_mac = _check_mac(vtep_mac)
    node_name = _check_node_name(node_name)
    preferred = _fitting_subnet(cfg, preferred_subnet)
    wanted = NodeLease(subnet="", public_ip=public_ip, vtep_mac=vtep_mac, node_name=node_name)
    with _claims(store, ttl) as claims:  # on etcd: one lease for every claim of this call, revoked if none wins
        for _ in range(_MAX_ROUNDS):
            entries, _revision = store.list(SUBNETS_PREFIX)
            leases, _taken, nets = _survey(entries, cfg)
            mine = [lease for lease in leases if lease.public_ip == public_ip]
            for lease in mine:
                if not _same_node(lease.node_name, node_name):
                    raise NodeConflict(_conflict_message(lease, node_name))
            if not mine and previous is not None:
                mine = [lease for lease in leases if lease.subnet == previous.subnet
                        and lease.public_ip == previous.public_ip and lease.vtep_mac == previous.vtep_mac
                        and _same_node(lease.node_name, node_name)]
            if mine:
                mine.sort(key=lambda lease: (lease.subnet != str(preferred), _net_sort_key(
                    ipaddress.ip_network(lease.subnet))))
                updated = _update_own(store, mine[0], public_ip, vtep_mac, node_name, ttl)
                if updated is not None:
                    return updated
                continue  # it changed under us: look again
            space = _FreeSpace(cfg, nets)
            if space.remaining == 0:
                raise LeaseExhausted(
                    f"no free subnet left: all {cfg.subnet_count} /{cfg.subnet_len} subnets of {cfg.network} are "
                    f"leased. Release the leases of nodes that left (`pycni agent leave` on them, or "
                    f"release_lease), or create the cluster with a larger network or a longer subnet length "
                    f"(for example /{cfg.ip_network.prefixlen - 1} instead of /{cfg.ip_network.prefixlen}) "
                    f"in a new store")
            claimed = _claim_new(claims, space, wanted, preferred)
            if claimed is not None:
                return claimed
            # Every candidate of this listing was taken meanwhile: list again.
    raise StoreError(f"could not lease a subnet for {public_ip}: the leases kept changing during "
                     f"{_MAX_ROUNDS} attempts; try again")


def _claim_new(claims: Claims, space: "_FreeSpace", wanted: NodeLease,
               preferred: IPNetwork | None) -> NodeLease | None:
    """Up to CLAIMS_PER_LISTING claims from one listing; the lease won, or None when the listing is used up."""
    value = wanted.to_json().encode()
    for attempt in range(CLAIMS_PER_LISTING):
        if attempt == 0:
            batch = space.first_claim(preferred, ORDERED_CANDIDATES, CLAIM_CANDIDATES)
        else:
            batch = space.pick_random(CLAIM_CANDIDATES)  # contention: spread out
        if not batch:
            return None
        entry = claims.create_first([subnet_key(space.subnet(index)) for index in batch], value)
        if entry is not None:
            subnet = subnet_from_key(entry.key)
            assert subnet is not None
            return dc_replace(wanted, subnet=subnet, mod_revision=entry.mod_revision)
        space.exclude(batch)  # another node was faster on every one of them
    return None


def renew_lease(store: Store, lease: NodeLease, ttl: int | None) -> NodeLease:
    """Keep a node's lease alive; returns it as stored now.

    If the lease expired it is written again (the same subnet, if it is still
    free). Raises LeaseLost if another node holds the subnet now: another
    public IP, another node name (when both are named), or an entry that is
    not an acceptable lease.
    """
    for _ in range(_MAX_ROUNDS):
        try:
            entry = store.get(lease.key)
        except UnreadableEntry as err:
            raise LeaseLost(f"the lease of {lease.subnet} was replaced by an unreadable entry ({err})") from None
        if entry is None:
            if store.create(lease.key, lease.to_json().encode(), ttl=ttl):
                continue  # read it back for its revision
            continue  # someone took it meanwhile: find out who
        try:
            current = NodeLease.from_entry(entry)
        except ValueError as err:
            raise LeaseLost(f"the lease of {lease.subnet} was replaced by an unreadable entry ({err})") from None
        if current.public_ip != lease.public_ip:
            raise LeaseLost(f"the subnet {lease.subnet} is now leased to {current.public_ip}"
                            f"{' (' + current.node_name + ')' if current.node_name else ''}, "
                            f"not {lease.public_ip}: acquire a new lease")
        if not _same_node(current.node_name, lease.node_name):
            raise LeaseLost(f"the subnet {lease.subnet} is now leased to the node {current.node_name!r} "
                            f"(also at {current.public_ip}), not to {lease.node_name!r}: acquire a new lease")
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


# -- checking what the store holds ---------------------------------------------------------


def _check_entry(entry: Entry, cfg: ClusterConfig | None) -> tuple[str, str, str, str]:
    """(subnet, public IP, VTEP MAC, node name) of an acceptable lease; ValueError "KEY: problem" otherwise."""
    key = entry.key
    subnet = subnet_from_key(key)
    if subnet is None:
        raise ValueError(f"{key}: not a subnet lease key (subnets/ADDRESS-PREFIXLEN, such as "
                         f"subnets/10.244.1.0-24)")
    if subnet_key(subnet) != key:
        raise ValueError(f"{key}: not the canonical key of the subnet {subnet} (that is {subnet_key(subnet)})")
    net = ipaddress.ip_network(subnet)
    try:
        if cfg is not None:
            _check_fits(cfg, net)
        public_ip, vtep_mac, node_name = _lease_fields(net, entry.value)
        if cfg is not None and _inside(ipaddress.ip_address(public_ip), cfg.ip_network):
            raise ValueError(f"PublicIP {public_ip} is inside the cluster network {cfg.network} (a pod address, "
                             f"not a node's underlay address)")
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
    return subnet, public_ip, vtep_mac, node_name


def _check_fits(cfg: ClusterConfig, net: IPNetwork) -> None:
    whole = cfg.ip_network
    if net.version != whole.version:
        raise ValueError(f"the subnet {net} is IPv{net.version}, the cluster network {whole} is IPv{whole.version}")
    if not net.subnet_of(whole):  # type: ignore[arg-type]
        raise ValueError(f"the subnet {net} is outside the cluster network {whole}")
    if net.prefixlen != cfg.subnet_len:
        raise ValueError(f"the subnet {net} is a /{net.prefixlen}; this cluster leases /{cfg.subnet_len} subnets")


def _lease_fields(net: IPNetwork, data: bytes | str) -> tuple[str, str, str]:
    """(public IP, VTEP MAC, node name) of a lease value; ValueError naming the field otherwise."""
    try:
        doc = boundedjson.loads(data, max_bytes=MAX_LEASE_BYTES, max_depth=MAX_LEASE_DEPTH)
    except ValueError as err:
        raise ValueError(f"the value cannot be decoded: {err}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"the value must be a JSON object, not {json_type(doc)}")
    public_ip = _stored_public_ip(doc.get("PublicIP"))
    backend_type = doc.get("BackendType")
    if backend_type is not None and backend_type != BACKEND_TYPE:
        raise ValueError(f"BackendType {_short(backend_type)} is not {BACKEND_TYPE!r} (pycni only implements "
                         f"the vxlan backend)")
    backend = doc.get("BackendData")
    if not isinstance(backend, dict):
        raise ValueError(f"BackendData must be an object holding VtepMAC, not {json_type(backend)}")
    vtep_mac = _stored_mac(backend.get("VtepMAC"))
    node_name = doc.get("NodeName")
    if node_name is None:
        node_name = ""
    problem = _node_name_problem(node_name)
    if problem:
        raise ValueError(f"NodeName {_short(node_name)} {problem}" if isinstance(node_name, str)
                         else f"NodeName {problem}")
    for name, value in doc.items():
        if name.lower() == "subnet":
            _check_own_subnet(name, value, net)
    return public_ip, vtep_mac, node_name


def _check_own_subnet(name: str, value: object, net: IPNetwork) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string naming the key's subnet {net}, not {json_type(value)}")
    try:
        ok = "%" not in value and ipaddress.ip_network(value, strict=True) == net
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name} {_short(value)} does not match the key's subnet {net}")


def _stored_public_ip(value: object) -> str:
    if value is None:
        raise ValueError("PublicIP is missing")
    if not isinstance(value, str):
        raise ValueError(f"PublicIP must be a string holding an IP address, not {json_type(value)}")
    address, problem = _public_ip_problem(value)
    if problem:
        raise ValueError(f"PublicIP {_short(value)} {problem}")
    return str(address)


def _stored_mac(value: object) -> str:
    if value is None:
        raise ValueError("BackendData.VtepMAC is missing")
    if not isinstance(value, str):
        raise ValueError(f"BackendData.VtepMAC must be a string holding a MAC address, not {json_type(value)}")
    mac, problem = _mac_problem(value)
    if problem:
        raise ValueError(f"BackendData.VtepMAC {_short(value)} {problem}")
    return mac


def _public_ip_problem(text: str) -> tuple[IPAddress | None, str]:
    """(the address, "") or (None, what is wrong with it as a node's underlay address)."""
    if "%" in text:
        return None, f"carries a zone (%{text.partition('%')[2][:20]}), which a node's underlay address cannot have"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None, "is not an IPv4 or IPv6 address"
    for bad, what in ((address.is_unspecified, "the unspecified address"), (address.is_loopback, "a loopback address"),
                      (address.is_multicast, "a multicast address"),
                      (address == ipaddress.IPv4Address("255.255.255.255"), "the broadcast address")):
        if bad:
            return None, f"is {what}, not a node's unicast underlay address"
    return address, ""


def _mac_problem(text: str) -> tuple[str, str]:
    """(the MAC in lower-case colon form, "") or ("", what is wrong with it as a VTEP MAC)."""
    mac = text.strip().lower().replace("-", ":")
    if not _MAC_RE.match(mac):
        return "", "is not a MAC address (six hex octets such as 0a:58:0a:f4:01:01)"
    if int(mac[:2], 16) & 1:
        return "", "is a multicast MAC (the lowest bit of the first octet is set); a VTEP MAC is unicast"
    if mac == "00:00:00:00:00:00":
        return "", "is all zeros; a VTEP MAC is a real unicast MAC"
    return mac, ""


def _node_name_problem(name: object) -> str:
    if not isinstance(name, str):
        return f"must be a string, not {json_type(name)}"
    if len(name) > MAX_NODE_NAME:
        return f"is {len(name)} characters long; at most {MAX_NODE_NAME} are allowed"
    if any(unicodedata.category(char) in ("Cc", "Cs") for char in name):
        return "contains control characters (or unpaired surrogates)"
    return ""


def _inside(address: IPAddress, network: IPNetwork) -> bool:
    return address.version == network.version and address in network


def _same_node(stored: str, mine: str) -> bool:
    """A lease without a name (older writers, flannel) belongs to whoever claims it; named ones to that name."""
    return not (stored and mine and stored != mine)


def _conflict_message(lease: NodeLease, node_name: str) -> str:
    return (f"the public IP {lease.public_ip} already holds the lease of {lease.subnet} for the node "
            f"{lease.node_name!r}, and this node is {node_name!r}: two nodes cannot share one underlay address. "
            f"If {lease.node_name!r} still runs, stop its agent or give this node its own --public-ip; if "
            f"{lease.node_name!r} is gone, release its lease with `pycni agent leave --store URL --public-ip "
            f"{lease.public_ip}` and start this agent again")


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# -- helpers ---------------------------------------------------------------------------


def _survey(entries: list[Entry], cfg: ClusterConfig) -> tuple[list[NodeLease], set[str], list[IPNetwork]]:
    """(acceptable leases, taken subnets as strings, every taken subnet) from a listing.

    Every key that names a subnet counts as taken, whatever its value.
    """
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
            leases.append(NodeLease.from_entry(entry, cfg))
        except ValueError:
            pass  # unacceptable, but its subnet stays taken
    return leases, taken, nets


def _claims(store: Store, ttl: int | None) -> Claims:
    """The store's own Claims; for an object that only looks like a store (a wrapper), claims by create()."""
    if isinstance(store, Store):
        return store.claims(ttl)
    return _ClaimsByCreate(store, ttl)


class _ClaimsByCreate(Claims):
    """One create() per key, for objects that offer only the basic calls (test doubles, wrappers).

    A key that turns out to hold exactly our lease (public IP, VTEP MAC and
    node name) is ours: a create whose answer was lost did the work.
    """

    def __init__(self, store: Store, ttl: int | None) -> None:
        self._store, self._ttl = store, ttl

    def create_first(self, keys: Sequence[str], value: bytes) -> Entry | None:
        for key in keys:
            if self._store.create(key, value, ttl=self._ttl):
                entry = self._store.get(key)
                return entry if entry is not None else Entry(key, value, 0, 1)
            try:
                entry = self._store.get(key)
            except UnreadableEntry:
                continue  # a record the store cannot read (file store): taken, and not ours
            if entry is not None and _same_lease(entry, value):
                return entry
        return None

    def close(self) -> None:
        pass


def _same_lease(entry: Entry, value: bytes) -> bool:
    """True if entry holds the lease value describes (the same node: public IP, VTEP MAC, node name)."""
    subnet = subnet_from_key(entry.key)
    if subnet is None:
        return False
    try:
        current = NodeLease.from_entry(entry)
        ours = NodeLease.from_json(subnet, value)
    except ValueError:
        return False
    return (current.public_ip, current.vtep_mac, current.node_name) == (ours.public_ip, ours.vtep_mac,
                                                                        ours.node_name)


class _FreeSpace:
    """The free subnets of the cluster network, as indices in address order, without listing them all.

    A subnet is free unless a key names it or a key of another length
    overlaps it (every key under subnets/ counts, readable or not). The
    taken ones are kept as merged index intervals, so a /8 cut into /24s, or
    an IPv6 network with 2**32 subnets, costs no more than its leases.
    """

    def __init__(self, cfg: ClusterConfig, taken: list[IPNetwork]) -> None:
        whole = cfg.ip_network
        self._base = int(whole.network_address)
        self._shift = whole.max_prefixlen - cfg.subnet_len
        self._length = cfg.subnet_len
        self._count = cfg.subnet_count
        last = int(whole.broadcast_address)
        spans = []
        for net in taken:
            if net.version != whole.version or not net.overlaps(whole):  # type: ignore[arg-type]
                continue
            low = max(int(net.network_address), self._base)
            high = min(int(net.broadcast_address), last)
            spans.append(((low - self._base) >> self._shift, (high - self._base) >> self._shift))
        merged: list[list[int]] = []
        for low, high in sorted(spans):
            if merged and low <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        self._taken = merged
        self._starts = [low for low, _high in merged]
        self._free = self._count - sum(high - low + 1 for low, high in merged)
        self._tried: set[int] = set()

    @property
    def remaining(self) -> int:
        """Free subnets not tried yet."""
        return self._free - len(self._tried)

    def subnet(self, index: int) -> IPNetwork:
        return ipaddress.ip_network((self._base + (index << self._shift), self._length))

    def is_free(self, index: int) -> bool:
        if not 0 <= index < self._count or index in self._tried:
            return False
        at = bisect.bisect_right(self._starts, index) - 1
        return at < 0 or self._taken[at][1] < index

    def first_claim(self, preferred: IPNetwork | None, ordered: int, total: int) -> list[int]:
        """The preferred subnet (if free), the lowest free ones, then random ones: total indices at most."""
        batch: list[int] = []
        if preferred is not None:
            index = (int(preferred.network_address) - self._base) >> self._shift
            if self.is_free(index):
                batch.append(index)
        batch += self._lowest(ordered, set(batch))
        batch += self.pick_random(total - len(batch), set(batch))
        return batch

    def pick_random(self, k: int, skip: set[int] | None = None) -> list[int]:
        """k free indices picked uniformly at random (all that are left, in order, if that is fewer)."""
        skip = skip or set()
        left = self.remaining - len(skip)
        if k <= 0 or left <= 0:
            return []
        if left <= k:
            return self._lowest(k, skip)
        picked: list[int] = []
        for _ in range(16 * k + 64):  # rejection of tried or picked ones: few, as left > k
            index = self._nth_free(_random.randrange(self._free))
            if index not in self._tried and index not in skip and index not in picked:
                picked.append(index)
                if len(picked) == k:
                    break
        return picked

    def exclude(self, indices: list[int]) -> None:
        self._tried.update(indices)

    def _lowest(self, k: int, skip: set[int]) -> list[int]:
        """The k lowest free indices not tried and not in skip."""
        out: list[int] = []
        index, at = 0, 0
        while len(out) < k and index < self._count:
            if at < len(self._taken) and self._taken[at][0] <= index:
                index = max(index, self._taken[at][1] + 1)
                at += 1
                continue
            if index not in self._tried and index not in skip:
                out.append(index)
            index += 1
        return out

    def _nth_free(self, n: int) -> int:
        """The index of the n-th free subnet (0-based, address order, tried ones included)."""
        index = n
        for low, high in self._taken:
            if low > index:
                break
            index += high - low + 1
        return index


def _update_own(store: Store, lease: NodeLease, public_ip: str, vtep_mac: str, node_name: str,
                ttl: int | None) -> NodeLease | None:
    wanted = dc_replace(lease, public_ip=public_ip, vtep_mac=vtep_mac, node_name=node_name or lease.node_name)
    if wanted == lease and (ttl is None or (store.ttl(lease.key) == ttl and store.refresh(lease.key))):
        return lease  # unchanged and alive: no write (and no revision bump that wakes every watcher)
    # Changed, expired, or written with another TTL (the node restarted with a new --lease-ttl): write it.
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
    """A node's own public IP as given by its operator; ValueError saying what is wrong."""
    address, problem = _public_ip_problem(value) if isinstance(value, str) else (None, "is not a string")
    if problem:
        raise ValueError(f"invalid node public IP {_short(value)}: it {problem}; give the node's underlay IPv4 "
                         f"or IPv6 address")
    return str(address)


def _check_mac(value: object) -> str:
    mac, problem = _mac_problem(value) if isinstance(value, str) else ("", "is not a string")
    if problem:
        raise ValueError(f"invalid VTEP MAC {_short(value)}: it {problem}")
    return mac


def _check_node_name(value: object) -> str:
    if value is None:
        return ""
    problem = _node_name_problem(value)
    if problem:
        raise ValueError(f"invalid node name {_short(value)}: it {problem}; give the node's host name (at most "
                         f"{MAX_NODE_NAME} characters, no control characters)")
    return value  # type: ignore[return-value]


def _net_sort_key(net: IPNetwork) -> tuple[int, int, int]:
    return net.version, int(net.network_address), net.prefixlen
