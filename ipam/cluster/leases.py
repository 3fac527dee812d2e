"""The cluster configuration and the nodes' subnet leases (flannel's layout).

A cluster has a pod network per address family it uses: an IPv4 one, an
IPv6 one, or both (dual-stack). Each is a Pool cut into node subnets of one
length. Each node leases one subnet of every pool, all under one key, so
they are taken, renewed and released together; the lease also carries the
node's VTEP (underlay IP and VXLAN device MAC, plus the address and MAC of a
second, IPv6 underlay when the node has one) so that every other node can
program its FDB, neighbour and route entries. A lease is taken with an
atomic create-if-absent, so two nodes racing for the same subnets never both
get them.

    subnets/10.244.1.0-24                       an IPv4-only cluster's lease
    subnets/10.244.1.0-24&fd00:10:244:1::-64    a dual-stack lease: "&" joins the IPv4 and the IPv6 subnet
                                                (the IPv6 address compressed), as flannel writes them
    subnets/fd00:10:244:1::-64                  an IPv6-only cluster's lease

Anything can write to the store, so every value read from it is input:
decoded with bounded size and nesting (cni_plugins.spec.boundedjson), every
field checked, and a bad lease left out with a reason rather than letting it
reach the kernel or stop a loop:

    subnets/10.244.1.0-24   key        canonical (lease_key(*subnets_from_key(key)) == key); with a
                                       ClusterConfig: the cluster's families (a dual-stack cluster accepts only
                                       dual keys, a single-family cluster only keys of its family), each
                                       subnet inside its pool's network with the pool's length
      {"PublicIP":         "192.168.1.10"  a string, an address without a zone (%), unicast (not
                                           multicast, unspecified, 255.255.255.255, loopback) and
                                           not inside a cluster network (that is a pod address)
       "PublicIPv6":       "fd00:1::10"    absent (or null, ""), or like PublicIP and an IPv6 address
                                           other than PublicIP: a second, IPv6 underlay address
       "BackendType":      "vxlan"         absent or "vxlan"
       "BackendData": {"VtepMAC": "0a:58:..."}   a string, a unicast MAC that is not all zeros
       "BackendV6Data": {"VtepMAC": ...}   absent (or null), or like BackendData: the VXLAN device on
                                           PublicIPv6; PublicIPv6 and BackendV6Data come together
       "NodeName":         "node-a"        absent, or a string of at most 253 characters, no control characters
       "Subnet":           ...             if present (any spelling of "subnet"), the key's first subnet;
       "IPv6Subnet":       ...             likewise (any spelling), the key's IPv6 subnet
      }                                    at most 4 KiB and 8 levels of nesting

scan_leases() returns the accepted leases and the rejected keys with their
reasons; acquire_lease() still treats every subnet a key under subnets/
names as taken, readable or not.

A dual-stack lease pairs subnet i of the IPv4 pool with subnet i of the
IPv6 pool (the same index in both), so a cluster has as many leases as its
smaller pool has subnets, and an index is free only when neither of its
subnets is named (or overlapped) by any key. Since every pycni node claims
aligned pairs, two of them racing for a subnet race for the same key, and
the store's create-if-absent picks one. Keys written by others with
unaligned pairs (flannel allocates each family on its own) are accepted;
they take both indices they touch. pycni writes an unaligned key only to
give such a lease back to its node (an unaligned preferred pair, or
renew_lease() after it lapsed), once a listing shows both subnets free; a
node that claims the aligned pair of one of them between that listing and
the write is not seen (no create compares other keys), a window of one
request that only such take-backs open.

A new node (no lease of its own, no usable previous or preferred subnets)
claims with one request that tries several leases at once (a Claims'
create_first(), one nested txn on etcd, one lock on the file store):

    [preferred?] [the 8 lowest free indices, in address order] [7-8 picked at random among the other free ones]
         the first of these that is still free when the request is applied is taken

Alone, a node gets the lowest free subnet(s), as before. When hundreds start
at once, all aim at the same lowest ones, but each request falls through to
its own random picks, so nearly every node is done with its first claim: one
lease grant and one txn per node instead of a failed claim per node that was
faster (N*N/2 for N nodes). If every candidate was taken, the next claim tries
16 other random free ones of the same listing; the node lists again only
when that listing is used up or after three failed claims. The etcd lease for
the TTL is granted once per acquire_lease() call, reused by every claim, and
revoked only if the call fails.

A lease also names its node (NodeName): acquire_lease() refuses (NodeConflict)
to hand one node's lease to a node of another name, or to take a lease for a
node whose public IP or public IPv6 is an underlay address (PublicIP or
PublicIPv6) of a lease named for another node; renew_lease() reports a lease
taken over by another public IP or another node name as LeaseLost. A lease
without a name (older writers, flannel) is adopted. The public IPv6 and the
VTEP MACs are attributes the node rewrites, not its identity: a lease is the
node's when it holds the node's public IP (and, when both are named, its name).
"""

from __future__ import annotations

import bisect
import functools
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
KEY_JOIN = "&"  # between the IPv4 and the IPv6 subnet of a dual-stack key (flannel's layout)

MAX_VNI = 2**24 - 1
MAX_CONFIG_BYTES = 64 * 1024
MAX_CONFIG_DEPTH = 8
MAX_LEASE_BYTES = 4 * 1024
MAX_LEASE_DEPTH = 8
MAX_NODE_NAME = 253
DEFAULT_SUBNET_LEN = 24
DEFAULT_IPV6_SUBNET_LEN = 64
_MAX_ROUNDS = 64  # list-and-claim rounds before giving up on a store that keeps changing under us
ORDERED_CANDIDATES = 8  # a new node's first claim tries the lowest free subnets in address order,
CLAIM_CANDIDATES = MAX_CLAIM_KEYS  # then fills up to this many with subnets picked at random
CLAIMS_PER_LISTING = 3  # claims made from one listing before listing again
_random = random.SystemRandom()  # no state shared with forked siblings: racing nodes pick differently
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Pool:
    """One family's pod network: node subnets of /subnet_len cut out of network, in address order.

    Subnet i of a pool is the i-th /subnet_len of network; a dual-stack lease
    holds subnet i of the IPv4 pool and subnet i of the IPv6 pool.
    """

    version: int  # 4 or 6
    network: str  # CIDR
    subnet_len: int

    @functools.cached_property
    def ip_network(self) -> IPNetwork:
        return ipaddress.ip_network(self.network)

    @property
    def subnet_count(self) -> int:
        return 2 ** (self.subnet_len - self.ip_network.prefixlen)

    def subnets(self) -> Iterator[IPNetwork]:
        """Every node subnet of the network, in address order."""
        return self.ip_network.subnets(new_prefix=self.subnet_len)

    def subnet_at(self, index: int) -> IPNetwork:
        """Subnet index (0-based, address order); IndexError outside 0..subnet_count-1."""
        if not 0 <= index < self.subnet_count:
            raise IndexError(f"{self.network} has {self.subnet_count} /{self.subnet_len} subnets, not {index + 1}")
        whole = self.ip_network
        shift = whole.max_prefixlen - self.subnet_len
        return ipaddress.ip_network((int(whole.network_address) + (index << shift), self.subnet_len))

    def fits(self, subnet: str | IPNetwork) -> bool:
        """True if subnet is one of this pool's node subnets (its family, inside the network, its length)."""
        net = ipaddress.ip_network(subnet)
        whole = self.ip_network
        return net.version == whole.version and net.prefixlen == self.subnet_len and net.subnet_of(whole)  # type: ignore[arg-type]

    def index_of(self, subnet: str | IPNetwork) -> int | None:
        """The index of one of this pool's node subnets; None if subnet does not fit the pool."""
        net = ipaddress.ip_network(subnet)
        if not self.fits(net):
            return None
        whole = self.ip_network
        return (int(net.network_address) - int(whole.network_address)) >> (whole.max_prefixlen - self.subnet_len)

    def describe(self) -> str:
        return f"{'network' if self.version == 4 else 'IPv6 network'} {self.network}, /{self.subnet_len} per node"


@dataclass
class ClusterConfig:
    """The overlay's cluster-wide settings, stored once under the key `config`.

    network: the IPv4 cluster (pod) CIDR, "" when the cluster has no IPv4;
    each node leases one /subnet_len of it. ipv6_network: the IPv6 pod CIDR,
    "" when the cluster has no IPv6; each node leases one /ipv6_subnet_len of
    it. At least one of them; both make a dual-stack cluster. vni and port:
    the VXLAN network identifier and UDP port every node uses (8472 is the
    Linux kernel's and flannel's default, 4789 the IANA port). Invalid values
    raise ValueError with a message saying what is accepted.

    ip_network, subnets() and subnet_count are the IPv4 pool's (the names of
    an IPv4-only past); on an IPv6-only cluster they raise ValueError. Code
    that handles every family uses pools / pool(version) and lease_count.
    """

    network: str = ""
    subnet_len: int = DEFAULT_SUBNET_LEN
    vni: int = 1
    port: int = 8472
    ipv6_network: str = ""
    ipv6_subnet_len: int = DEFAULT_IPV6_SUBNET_LEN
    direct_routing: bool = False  # flannel's Backend.DirectRouting: same-subnet nodes route without VXLAN

    def __post_init__(self) -> None:
        if not isinstance(self.direct_routing, bool):
            raise ValueError(f"invalid direct_routing {self.direct_routing!r}: it is true or false")
        for name in ("subnet_len", "vni", "port", "ipv6_subnet_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"invalid {name} {value!r}: it must be a whole number")
        self.network = _config_network(self.network, 4)
        self.ipv6_network = _config_network(self.ipv6_network, 6)
        if not self.network and not self.ipv6_network:
            raise ValueError(
                "a cluster needs a pod network: give an IPv4 network (network, --network), an IPv6 "
                "network (ipv6_network, --ipv6-network), or both for a dual-stack cluster"
            )
        pools: list[Pool] = []
        if self.network:
            net = ipaddress.ip_network(self.network)
            longest = net.max_prefixlen - 2  # a node subnet needs room for a gateway and pods
            if not net.prefixlen < self.subnet_len <= longest:
                raise ValueError(
                    f"invalid subnet length /{self.subnet_len} for the network {net}: node subnets "
                    f"must be longer than /{net.prefixlen} (so the network holds several) and at "
                    f"most /{longest}"
                )
            pools.append(Pool(4, self.network, self.subnet_len))
        elif self.subnet_len != DEFAULT_SUBNET_LEN:
            raise ValueError(
                f"invalid subnet length /{self.subnet_len}: subnet_len (--subnet-len) is the length of "
                f"the IPv4 subnets, and this cluster has no IPv4 network; the IPv6 subnets' length is "
                f"ipv6_subnet_len (--ipv6-subnet-len)"
            )
        if self.ipv6_network:
            net6 = ipaddress.ip_network(self.ipv6_network)
            longest6 = net6.max_prefixlen - 2
            if not net6.prefixlen < self.ipv6_subnet_len <= longest6:
                raise ValueError(
                    f"invalid IPv6 subnet length /{self.ipv6_subnet_len} for the IPv6 network {net6}: "
                    f"node subnets must be longer than /{net6.prefixlen} (so the network holds "
                    f"several) and at most /{longest6}"
                )
            pools.append(Pool(6, self.ipv6_network, self.ipv6_subnet_len))
        elif self.ipv6_subnet_len != DEFAULT_IPV6_SUBNET_LEN:
            raise ValueError(
                f"invalid IPv6 subnet length /{self.ipv6_subnet_len}: ipv6_subnet_len "
                f"(--ipv6-subnet-len) is the length of the IPv6 subnets, and this cluster has no IPv6 "
                f"network (give ipv6_network, --ipv6-network)"
            )
        if not 1 <= self.vni <= MAX_VNI:
            raise ValueError(f"invalid VNI {self.vni}: it must be 1..{MAX_VNI}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"invalid VXLAN UDP port {self.port}: it must be 1..65535")
        self._pools = pools
        self._pools_of = (self.network, self.subnet_len, self.ipv6_network, self.ipv6_subnet_len)

    # -- every family ---------------------------------------------------------------

    @property
    def pools(self) -> list[Pool]:
        """The cluster's pools, IPv4 first."""
        return list(self._current_pools())

    def pool(self, version: int) -> Pool | None:
        """The pool of IP version 4 or 6; None if the cluster has no network of that family."""
        for pool in self._current_pools():
            if pool.version == version:
                return pool
        return None

    @property
    def versions(self) -> list[int]:
        """The IP versions the cluster leases subnets of: [4], [6] or [4, 6]."""
        return [pool.version for pool in self._current_pools()]

    @property
    def dual_stack(self) -> bool:
        return len(self._current_pools()) == 2

    @property
    def lease_count(self) -> int:
        """How many nodes can hold a lease: the subnet count of the smaller pool (a lease takes subnet i of each)."""
        return min(pool.subnet_count for pool in self._current_pools())

    def _current_pools(self) -> list[Pool]:
        """The pools of the fields as they are now (built once, again only if a field was assigned since)."""
        fields = (self.network, self.subnet_len, self.ipv6_network, self.ipv6_subnet_len)
        if fields != self._pools_of:
            pools = [Pool(4, self.network, self.subnet_len)] if self.network else []
            if self.ipv6_network:
                pools.append(Pool(6, self.ipv6_network, self.ipv6_subnet_len))
            self._pools, self._pools_of = pools, fields
        return self._pools

    # -- the IPv4 pool, by its old names ------------------------------------------------

    @property
    def ip_network(self) -> IPNetwork:
        """The IPv4 network; ValueError on an IPv6-only cluster."""
        return self._ipv4_pool("ip_network").ip_network

    @property
    def subnet_count(self) -> int:
        """The number of IPv4 node subnets; ValueError on an IPv6-only cluster (see lease_count)."""
        return self._ipv4_pool("subnet_count").subnet_count

    def subnets(self) -> Iterator[IPNetwork]:
        """Every IPv4 node subnet, in address order; ValueError on an IPv6-only cluster."""
        return self._ipv4_pool("subnets()").subnets()

    def _ipv4_pool(self, what: str) -> Pool:
        pool = self.pool(4)
        if pool is None:
            raise ValueError(
                f"this cluster is IPv6-only ({self.ipv6_network}): it has no IPv4 network, so "
                f"ClusterConfig.{what} means nothing; use pools or pool(6) (code that handles "
                f"every family)"
            )
        return pool

    def describe(self) -> str:
        return ", ".join(
            [pool.describe() for pool in self._current_pools()]
            + [f"VNI {self.vni}", f"UDP port {self.port}"]
            + (["direct routing between nodes on one underlay subnet"] if self.direct_routing else [])
        )

    def to_json(self) -> str:
        """flannel's net-conf.json layout ("EnableIPv4": false only for an IPv6-only cluster)."""
        doc: dict[str, Any] = {"Backend": {"Type": BACKEND_TYPE, "VNI": self.vni, "Port": self.port}}
        if self.direct_routing:
            doc["Backend"]["DirectRouting"] = True
        if self.network:
            doc.update({"Network": self.network, "SubnetLen": self.subnet_len})
        else:
            doc["EnableIPv4"] = False
        if self.ipv6_network:
            doc.update({"EnableIPv6": True, "IPv6Network": self.ipv6_network, "IPv6SubnetLen": self.ipv6_subnet_len})
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, data: str | bytes) -> "ClusterConfig":
        """Parse the stored form (flannel's net-conf.json keys); ValueError if it is not valid.

        At most 64 KiB and 8 levels of nesting; "Network" and "IPv6Network"
        strings, "SubnetLen", "IPv6SubnetLen" and the backend's "VNI" and
        "Port" whole numbers, "EnableIPv4" and "EnableIPv6" true or false
        (null or absent: the default), "Backend" an object whose "Type" is
        "vxlan". A family is on when its network is there, unless its Enable
        flag is false (then its network is ignored, as flannel does); a true
        flag without the network is an error. An IPv6 "Network" without
        "IPv6Network" (pycni before dual-stack kept an IPv6-only cluster's
        network there) is read as the IPv6 network, with "SubnetLen" as its
        subnet length. Other keys are ignored.
        """
        try:
            doc = boundedjson.loads(data, max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH)
        except ValueError as err:
            raise ValueError(f"the cluster configuration cannot be decoded: {err}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"the cluster configuration must be a JSON object, not {json_type(doc)}")
        network = _network_field(doc, "Network", "10.244.0.0/16")
        network6 = _network_field(doc, "IPv6Network", "fd00:10:244::/56")
        enable4, enable6 = _flag(doc, "EnableIPv4"), _flag(doc, "EnableIPv6")
        subnet_len = _whole(doc, "SubnetLen", DEFAULT_SUBNET_LEN)
        subnet_len6 = _whole(doc, "IPv6SubnetLen", DEFAULT_IPV6_SUBNET_LEN)
        if network and not network6 and enable4 is None and enable6 is not False and _is_ipv6_cidr(network):
            network, network6 = "", network  # an IPv6-only cluster of pycni before dual-stack
            subnet_len6 = _whole(doc, "SubnetLen", DEFAULT_IPV6_SUBNET_LEN)
            subnet_len = DEFAULT_SUBNET_LEN
        if enable4 is False:
            network, subnet_len = "", DEFAULT_SUBNET_LEN
        elif enable4 is True and not network:
            raise ValueError('the cluster configuration has "EnableIPv4": true but no "Network"')
        if enable6 is False:
            network6, subnet_len6 = "", DEFAULT_IPV6_SUBNET_LEN
        elif enable6 is True and not network6:
            raise ValueError('the cluster configuration has "EnableIPv6": true but no "IPv6Network"')
        if not network and not network6:
            raise ValueError(
                'the cluster configuration has no "Network"'
                if enable4 is not False
                else 'the cluster configuration has "EnableIPv4": false and no "IPv6Network": it has no pod network'
            )
        if not network:
            subnet_len = DEFAULT_SUBNET_LEN
        if not network6:
            subnet_len6 = DEFAULT_IPV6_SUBNET_LEN
        backend = doc.get("Backend")
        if backend is None:
            backend = {}
        if not isinstance(backend, dict):
            raise ValueError(f'the cluster configuration\'s "Backend" must be an object, not {json_type(backend)}')
        backend_type = backend.get("Type")
        if backend_type is None:
            backend_type = BACKEND_TYPE
        if backend_type != BACKEND_TYPE:
            raise ValueError(
                f"the cluster configuration is for backend {backend_type!r}; pycni only implements {BACKEND_TYPE!r}"
            )
        direct = backend.get("DirectRouting")
        if direct is not None and not isinstance(direct, bool):
            raise ValueError(
                f'the cluster configuration\'s "Backend.DirectRouting" must be true or false, not {json_type(direct)}'
            )
        return cls(
            network=network,
            subnet_len=subnet_len,
            vni=_whole(backend, "VNI", 1, "Backend."),
            port=_whole(backend, "Port", 8472, "Backend."),
            ipv6_network=network6,
            ipv6_subnet_len=subnet_len6,
            direct_routing=bool(direct),
        )


def _config_network(value: object, version: int) -> str:
    """A pool's network as a canonical CIDR string ("" for none); ValueError saying what is wrong."""
    name, flag, example = (
        ("network", "--network", "10.244.0.0/16")
        if version == 4
        else ("ipv6_network", "--ipv6-network", "fd00:10:244::/56")
    )
    what = "cluster network" if version == 4 else "cluster IPv6 network"
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        value = str(value)
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError(f"invalid {what} {value!r}: give a CIDR such as {example}")
    try:
        net = ipaddress.ip_network(value, strict=True)
    except ValueError as err:
        try:
            loose = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"invalid {what} {value!r}: give a CIDR such as {example} ({err})") from None
        raise ValueError(f"invalid {what} {value!r}: it has host bits set; did you mean {loose}?") from None
    if net.version != version:
        if version == 4:
            raise ValueError(
                f"invalid cluster network {value!r}: it is an IPv6 network; the IPv6 pod network is "
                f"given as ipv6_network (--ipv6-network), network (--network) is the IPv4 one"
            )
        raise ValueError(
            f"invalid cluster IPv6 network {value!r}: it is an IPv4 network; the IPv4 pod network is "
            f"given as network (--network), ipv6_network (--ipv6-network) is the IPv6 one"
        )
    return str(net)


def _is_ipv6_cidr(text: str) -> bool:
    try:
        return ipaddress.ip_network(text, strict=False).version == 6
    except ValueError:
        return False


def _network_field(doc: dict[str, Any], name: str, example: str) -> str:
    value = doc.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f'the cluster configuration\'s "{name}" must be a string such as "{example}", not {json_type(value)}'
        )
    return value


def _flag(doc: dict[str, Any], name: str) -> bool | None:
    value = doc.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(
        f'the cluster configuration\'s "{name}" must be true or false, not {json_type(value)} ({_short(value)})'
    )


def _whole(doc: dict[str, Any], name: str, default: int, where: str = "") -> int:
    value = doc.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f'the cluster configuration\'s "{where}{name}" must be a whole number, '
            f"not {json_type(value)} ({_short(value)})"
        )
    return value


@dataclass
class NodeLease:
    """One node's subnets and VTEP, stored under subnets/<key> (see lease_key()).

    subnet is the IPv4 subnet ("" in an IPv6-only cluster), ipv6_subnet the
    IPv6 one ("" when the cluster has no IPv6 pool). public_ip and vtep_mac
    are the node's main underlay address (IPv4 or IPv6) and the MAC of its
    VXLAN device there; public_ipv6 and vtep_mac6 a second, IPv6 underlay
    address and the MAC of the VXLAN device on it ("" when the node has
    none). mod_revision is the store revision the lease was read or written
    at (0 for a lease not read from a store).
    """

    subnet: str
    public_ip: str
    vtep_mac: str
    node_name: str = ""
    mod_revision: int = field(default=0, compare=False)
    ipv6_subnet: str = ""
    public_ipv6: str = ""
    vtep_mac6: str = ""
    vni: int = field(default=0, compare=False)  # BackendData.VNI, as newer flannel writes it (0: not written)

    @property
    def key(self) -> str:
        """subnets/10.244.1.0-24, subnets/10.244.1.0-24&fd00:10:244:1::-64 or subnets/fd00:10:244:1::-64."""
        return lease_key(self.subnet, self.ipv6_subnet)

    @property
    def subnets(self) -> list[str]:
        """The subnets the lease holds, IPv4 first."""
        return [subnet for subnet in (self.subnet, self.ipv6_subnet) if subnet]

    def subnet_of(self, version: int) -> str:
        """The subnet of IP version 4 or 6 ("" if the lease holds none of that family)."""
        if version == 4:
            return self.subnet
        if version == 6:
            return self.ipv6_subnet
        raise ValueError(f"IP version {version!r}: it is 4 or 6")

    def to_json(self) -> str:
        """flannel's lease value, plus the node's name."""
        vni = {"VNI": self.vni} if self.vni else {}
        doc: dict[str, Any] = {
            "PublicIP": self.public_ip,
            "BackendType": BACKEND_TYPE,
            "BackendData": {"VtepMAC": self.vtep_mac, **vni},
        }
        if self.public_ipv6:
            doc["PublicIPv6"] = self.public_ipv6
        if self.vtep_mac6:
            doc["BackendV6Data"] = {"VtepMAC": self.vtep_mac6, **vni}
        if self.node_name:
            doc["NodeName"] = self.node_name
        return json.dumps(doc, sort_keys=True)

    @classmethod
    def from_json(cls, subnet: str, data: str | bytes, mod_revision: int = 0, ipv6_subnet: str = "") -> "NodeLease":
        """Parse a lease value (the subnets come from its key); ValueError naming the field if it is not valid.

        subnet is the IPv4 subnet (an IPv6 one given here, with no
        ipv6_subnet, is taken as the IPv6 subnet). Only the checks that need
        no cluster configuration; see from_entry().
        """
        nets = [ipaddress.ip_network(text, strict=True) for text in (subnet, ipv6_subnet) if text]
        if not nets:
            raise ValueError("a lease needs a subnet")
        if len(nets) == 2 and (nets[0].version, nets[1].version) != (4, 6):
            raise ValueError(f"a dual-stack lease holds an IPv4 subnet and an IPv6 subnet, not {nets[0]} and {nets[1]}")
        fields = _lease_fields(nets, data)
        return cls(subnet=_family(nets, 4), ipv6_subnet=_family(nets, 6), mod_revision=mod_revision, **fields)

    @classmethod
    def from_entry(cls, entry: Entry, cfg: "ClusterConfig | None" = None) -> "NodeLease":
        """The lease stored in entry; ValueError "KEY: what is wrong" if it is not acceptable.

        With cfg also the checks against the cluster: the key's families,
        each subnet's network and length, and public addresses outside the
        cluster networks.
        """
        return cls(**_check_entry(entry, cfg), mod_revision=entry.mod_revision)


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
    """subnets/10.244.1.0-24 for 10.244.1.0/24 (flannel's key layout); one subnet, see lease_key()."""
    net = ipaddress.ip_network(subnet)
    return f"{SUBNETS_PREFIX}{net.network_address}-{net.prefixlen}"


def subnet_from_key(key: str) -> str | None:
    """10.244.1.0/24 for subnets/10.244.1.0-24; None for any other key (a dual-stack key too: subnets_from_key)."""
    if not isinstance(key, str) or not key.startswith(SUBNETS_PREFIX):
        return None
    net = _key_part(key[len(SUBNETS_PREFIX) :])
    return str(net) if net is not None else None


def lease_key(subnet: str | IPNetwork | None = "", ipv6_subnet: str | IPNetwork | None = "") -> str:
    """The key of a lease of subnet (IPv4) and ipv6_subnet (IPv6); either may be "" but not both.

    subnets/10.244.1.0-24, subnets/10.244.1.0-24&fd00:10:244:1::-64 (flannel's
    dual-stack key, the IPv6 address compressed), subnets/fd00:10:244:1::-64.
    ValueError for a subnet of the wrong family or none at all.
    """
    parts = []
    for text, version in ((subnet, 4), (ipv6_subnet, 6)):
        if not text:
            continue
        net = ipaddress.ip_network(text)
        if net.version != version:
            raise ValueError(
                f"{net} is not an IPv{version} subnet: a lease key takes the IPv4 subnet first, the IPv6 subnet second"
            )
        parts.append(f"{net.network_address}-{net.prefixlen}")
    if not parts:
        raise ValueError("a lease key needs a subnet: give the IPv4 subnet, the IPv6 subnet, or both")
    return SUBNETS_PREFIX + KEY_JOIN.join(parts)


def subnets_from_key(key: str) -> tuple[str, str] | None:
    """(IPv4 subnet or "", IPv6 subnet or "") of a lease key; None for any other key.

    ("10.244.1.0/24", "") for subnets/10.244.1.0-24, ("10.244.1.0/24",
    "fd00:10:244:1::/64") for subnets/10.244.1.0-24&fd00:10:244:1::-64, ("",
    "fd00:10:244:1::/64") for subnets/fd00:10:244:1::-64. A key that is not
    canonical (subnets/10.244.1.0-024) still parses; compare with lease_key().
    """
    if not isinstance(key, str) or not key.startswith(SUBNETS_PREFIX):
        return None
    parts = key[len(SUBNETS_PREFIX) :].split(KEY_JOIN)
    if len(parts) > 2:
        return None
    nets = [_key_part(part) for part in parts]
    if any(net is None for net in nets):
        return None
    if len(nets) == 2 and (nets[0].version, nets[1].version) != (4, 6):  # type: ignore[union-attr]
        return None
    return _family(nets, 4), _family(nets, 6)  # type: ignore[arg-type]


def _key_part(text: str) -> IPNetwork | None:
    """10.244.1.0/24 for 10.244.1.0-24 (one subnet of a key); None if it is not one."""
    address, sep, length = text.rpartition("-")
    if not sep or not (length.isascii() and length.isdigit()) or "%" in address or "/" in address:
        return None
    try:
        return ipaddress.ip_network(f"{address}/{length}", strict=True)
    except ValueError:
        return None


def _key_networks(key: str) -> list[IPNetwork]:
    """Every subnet a key under subnets/ names, read leniently: what the key takes, whatever else is wrong with it."""
    if not key.startswith(SUBNETS_PREFIX):
        return []
    nets = (_key_part(part) for part in key[len(SUBNETS_PREFIX) :].split(KEY_JOIN))
    return [net for net in nets if net is not None]


def _family(nets: Sequence[IPNetwork], version: int) -> str:
    for net in nets:
        if net.version == version:
            return str(net)
    return ""


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
            raise ConfigConflict(
                f"the store already holds a cluster configuration that pycni cannot read "
                f"({err}); refusing to overwrite it with {cfg.describe()}"
            ) from None
        if existing == cfg:
            return False
        raise ConfigConflict(
            f"the store already holds a different cluster configuration ({existing.describe()}); "
            f"refusing to replace it with ({cfg.describe()}): nodes hold leases from the "
            f"existing one. Use the existing settings, or a new store (another directory, "
            f"or another --etcd-prefix)"
        )
    raise StoreError("the cluster configuration keeps disappearing while it is being written; try again")


def read_config(store: Store) -> ClusterConfig:
    """The stored cluster configuration; StoreError if there is none or it is invalid."""
    entry = store.get(CONFIG_KEY)
    if entry is None:
        raise StoreError(
            "the store holds no cluster configuration: run `pycni cluster init --store URL "
            "--network CIDR` (and/or --ipv6-network CIDR) first"
        )
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
    scan.leases.sort(key=_lease_sort_key)
    scan.rejected.sort(key=lambda rejected: rejected.key)
    return scan


def list_leases(store: Store, cfg: ClusterConfig | None = None) -> tuple[list[NodeLease], int]:
    """Every acceptable lease (sorted by subnet) and the store revision they were read at.

    scan_leases() without the rejected keys. Malformed entries under subnets/
    are left out here (acquire_lease still treats their subnets as taken).
    """
    scan = scan_leases(store, cfg)
    return scan.leases, scan.revision


def acquire_lease(
    store: Store,
    cfg: ClusterConfig,
    public_ip: str,
    vtep_mac: str,
    node_name: str = "",
    preferred_subnet: str | None = None,
    ttl: int | None = None,
    previous: NodeLease | None = None,
    *,
    public_ipv6: str = "",
    vtep_mac6: str = "",
    preferred_ipv6_subnet: str | None = None,
) -> NodeLease:
    """Lease a subnet of each of the cluster's pools for the node whose underlay address is public_ip.

    The subnets come as one lease under one key (subnet i of the IPv4 pool
    with subnet i of the IPv6 pool in a dual-stack cluster): taken, renewed
    and released together, and no subnet of either family is ever held by
    two keys that acquire_lease() wrote.

    A node gets its own lease back: an existing lease with this public_ip is
    reused (and updated with vtep_mac, node_name, public_ipv6 and vtep_mac6:
    what is passed is what is stored, so pass public_ipv6/vtep_mac6 every
    time the node has them), unless it names another node (NodeConflict, see
    below). A node whose underlay address changed passes the lease it held
    before as previous (from its own state, with every field it held): if the
    store still holds exactly that lease (its subnets, old addresses, old VTEP
    MACs and, when both are named, this node's name), it is taken over in
    place with the new addresses, so the old address does not keep the
    subnets until its TTL. Otherwise the preferred subnets if they are free:
    preferred_subnet names a subnet of either family (the previous lease's
    IPv4 one, or in an IPv6-only cluster its IPv6 one), preferred_ipv6_subnet
    the IPv6 one; one of them is enough (its partner is the same index of
    the other pool); either is ignored if it does not belong to this
    cluster's pools. Else the first free index in address order; when other
    nodes take those at the same moment, a free index picked at random (see
    the module docstring: O(1) writes per node when hundreds start at once).
    Every subnet a key under subnets/ names counts as taken, readable or not.

    public_ipv6 and vtep_mac6 are a second, IPv6 underlay address and the
    MAC of the VXLAN device on it: both or neither, only in a cluster with
    an IPv6 pool, an IPv6 unicast address other than public_ip.

    Raises ValueError for an invalid public_ip, vtep_mac, node_name,
    public_ipv6, vtep_mac6 or preferred subnet, NodeConflict when a lease
    whose PublicIP or PublicIPv6 is public_ip or public_ipv6 names another
    node than node_name (both non-empty), LeaseExhausted when every index is
    taken.
    """
    public_ip = _check_ip(public_ip)
    address = ipaddress.ip_address(public_ip)
    for pool in cfg.pools:
        if _inside(address, pool.ip_network):
            raise ValueError(
                f"invalid node public IP {public_ip}: it is inside the cluster network {pool.network}, "
                f"so it is a pod address; give the node's underlay address"
            )
    vtep_mac = _check_mac(vtep_mac)
    node_name = _check_node_name(node_name)
    public_ipv6, vtep_mac6 = _check_second_underlay(cfg, public_ip, public_ipv6, vtep_mac6)
    preferred = _preferred_subnets(cfg, preferred_subnet, preferred_ipv6_subnet)
    wanted = NodeLease(
        subnet="",
        public_ip=public_ip,
        vtep_mac=vtep_mac,
        node_name=node_name,
        public_ipv6=public_ipv6,
        vtep_mac6=vtep_mac6,
        vni=cfg.vni,
    )
    addresses = {public_ip: "--public-ip", **({public_ipv6: "--public-ipv6"} if public_ipv6 else {})}
    with _claims(store, ttl) as claims:  # on etcd: one lease for every claim of this call, revoked if none wins
        for _ in range(_MAX_ROUNDS):
            entries, _revision = store.list(SUBNETS_PREFIX)
            leases, nets = _survey(entries, cfg)
            for lease in leases:
                for held in (lease.public_ip, lease.public_ipv6):
                    if held in addresses and not _same_node(lease.node_name, node_name):
                        raise NodeConflict(_conflict_message(lease, node_name, held, addresses[held]))
            mine = [lease for lease in leases if lease.public_ip == public_ip]
            if not mine and previous is not None:
                mine = [
                    lease
                    for lease in leases
                    if _is_previous(lease, previous) and _same_node(lease.node_name, node_name)
                ]
            if mine:
                mine.sort(key=lambda lease: (not _is_preferred(lease, preferred), _lease_sort_key(lease)))
                updated = _update_own(store, mine[0], wanted, ttl)
                if updated is not None:
                    return updated
                continue  # it changed under us: look again
            space = _FreeSpace(cfg, nets)
            if space.remaining == 0:
                raise LeaseExhausted(_exhausted_message(cfg))
            claimed = _claim_new(claims, space, wanted, preferred)
            if claimed is not None:
                return claimed
            # Every candidate of this listing was taken meanwhile: list again.
    raise StoreError(
        f"could not lease a subnet for {public_ip}: the leases kept changing during {_MAX_ROUNDS} attempts; try again"
    )


def _claim_new(
    claims: Claims, space: "_FreeSpace", wanted: NodeLease, preferred: dict[int, IPNetwork]
) -> NodeLease | None:
    """Up to CLAIMS_PER_LISTING claims from one listing; the lease won, or None when the listing is used up."""
    value = wanted.to_json().encode()
    index, pair_key, pair_indices = space.preferred(preferred)
    for attempt in range(CLAIMS_PER_LISTING):
        head: list[str] = []
        if attempt == 0:
            if pair_key is not None:
                head = [pair_key]
            batch = space.first_claim(index, ORDERED_CANDIDATES, CLAIM_CANDIDATES - len(head))
        else:
            batch = space.pick_random(CLAIM_CANDIDATES)  # contention: spread out
        keys = head + [space.key(i) for i in batch]
        if not keys:
            return None
        entry = claims.create_first(keys, value)
        if entry is not None:
            subnets = subnets_from_key(entry.key)
            assert subnets is not None
            return dc_replace(wanted, subnet=subnets[0], ipv6_subnet=subnets[1], mod_revision=entry.mod_revision)
        space.exclude(batch + (pair_indices if head else []))  # another node was faster on every one of them
    return None


def renew_lease(store: Store, lease: NodeLease, ttl: int | None) -> NodeLease:
    """Keep a node's lease (all its subnets) alive; returns it as stored now.

    If the lease expired it is written again (the same subnets, if they are
    still free). Raises LeaseLost if another node holds it now: another
    public IP, another node name (when both are named), or an entry that is
    not an acceptable lease; for a dual-stack lease also another key that
    holds one of its subnets when it is written again. The public IPv6 and
    the VTEP MACs do not decide whose lease it is (acquire_lease() rewrites
    them).
    """
    key = lease.key
    what = _subnets_text(lease.subnets)
    for _ in range(_MAX_ROUNDS):
        try:
            entry = store.get(key)
        except UnreadableEntry as err:
            raise LeaseLost(f"the lease of {what} was replaced by an unreadable entry ({err})") from None
        if entry is None:
            if len(lease.subnets) > 1:
                _check_no_other_holder(store, lease)
            if store.create(key, lease.to_json().encode(), ttl=ttl):
                continue  # read it back for its revision
            continue  # someone took it meanwhile: find out who
        try:
            current = NodeLease.from_entry(entry)
        except ValueError as err:
            raise LeaseLost(f"the lease of {what} was replaced by an unreadable entry ({err})") from None
        if current.public_ip != lease.public_ip:
            raise LeaseLost(
                f"the {_subnet_word(lease)} {what} {_is_are(lease)} now leased to {current.public_ip}"
                f"{' (' + current.node_name + ')' if current.node_name else ''}, "
                f"not {lease.public_ip}: acquire a new lease"
            )
        if not _same_node(current.node_name, lease.node_name):
            raise LeaseLost(
                f"the {_subnet_word(lease)} {what} {_is_are(lease)} now leased to the node "
                f"{current.node_name!r} (also at {current.public_ip}), not to {lease.node_name!r}: "
                f"acquire a new lease"
            )
        if ttl is None or store.refresh(key):
            return current
        # expired between get and refresh: go round and write it again
    raise StoreError(f"could not renew the lease of {what}: it kept changing; try again")


def _check_no_other_holder(store: Store, lease: NodeLease) -> None:
    """LeaseLost if a key other than the lease's own names one of its subnets (before writing it again)."""
    own = [ipaddress.ip_network(subnet) for subnet in lease.subnets]
    entries, _revision = store.list(SUBNETS_PREFIX)
    for entry in entries:
        if entry.key == lease.key:
            continue
        for net in _key_networks(entry.key):
            if any(net.version == mine.version and net.overlaps(mine) for mine in own):  # type: ignore[arg-type]
                holder = ""
                try:
                    other = NodeLease.from_entry(entry)
                    holder = f" (the node at {other.public_ip}{', ' + other.node_name if other.node_name else ''})"
                except ValueError:
                    pass
                raise LeaseLost(
                    f"the lease of {_subnets_text(lease.subnets)} expired and {net} is now held under "
                    f"{entry.key}{holder}: acquire a new lease"
                )


def release_lease(store: Store, public_ip: str) -> bool:
    """Remove every lease held by public_ip (every subnet of it); False if it held none."""
    public_ip = _check_ip(public_ip)
    leases, _revision = list_leases(store)
    released = False
    for lease in leases:
        if lease.public_ip == public_ip:
            released = store.delete(lease.key) or released
    return released


# -- checking what the store holds ---------------------------------------------------------


def _check_entry(entry: Entry, cfg: ClusterConfig | None) -> dict[str, str]:
    """The NodeLease fields of an acceptable lease; ValueError "KEY: problem" otherwise."""
    key = entry.key
    subnets = subnets_from_key(key)
    if subnets is None:
        raise ValueError(
            f"{key}: not a subnet lease key (subnets/ADDRESS-PREFIXLEN, such as "
            f"subnets/10.244.1.0-24, or for a dual-stack lease subnets/IPV4-LEN&IPV6-LEN, such as "
            f"subnets/10.244.1.0-24&fd00:10:244:1::-64)"
        )
    canonical = lease_key(*subnets)
    if canonical != key:
        held = [subnet for subnet in subnets if subnet]
        raise ValueError(
            f"{key}: not the canonical key of the {'subnet' if len(held) == 1 else 'subnets'} "
            f"{_subnets_text(held)} (that is {canonical})"
        )
    nets = [ipaddress.ip_network(subnet) for subnet in subnets if subnet]
    try:
        if cfg is not None:
            _check_fits(cfg, nets)
        fields = _lease_fields(nets, entry.value)
        if cfg is not None:
            for name in ("public_ip", "public_ipv6"):
                if not fields[name]:
                    continue
                address = ipaddress.ip_address(fields[name])
                for pool in cfg.pools:
                    if _inside(address, pool.ip_network):
                        raise ValueError(
                            f"{'PublicIP' if name == 'public_ip' else 'PublicIPv6'} {address} is inside "
                            f"the cluster network {pool.network} (a pod address, not a node's underlay "
                            f"address)"
                        )
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None
    return {"subnet": subnets[0], "ipv6_subnet": subnets[1], **fields}


def _check_fits(cfg: ClusterConfig, nets: list[IPNetwork]) -> None:
    """The key's subnets against the cluster: its families, then each pool's network and length."""
    pools = cfg.pools
    if len(nets) == 1 and cfg.pool(nets[0].version) is None:
        only = pools[0]
        raise ValueError(
            f"the subnet {nets[0]} is IPv{nets[0].version}, the cluster network {only.network} is IPv{only.version}"
        )
    if len(nets) == 1 and len(pools) == 2:
        net = nets[0]
        raise ValueError(
            f"the key holds only the IPv{net.version} subnet {net}; this dual-stack cluster leases "
            f"an IPv4 and an IPv6 subnet together under one key (subnets/IPV4-LEN&IPV6-LEN)"
        )
    if len(nets) == 2 and len(pools) == 1:
        only = pools[0]
        other = nets[0] if only.version == 6 else nets[1]
        raise ValueError(
            f"the key holds the IPv{other.version} subnet {other} too, and this cluster is "
            f"IPv{only.version}-only (its network is {only.network})"
        )
    for net in nets:
        pool = cfg.pool(net.version)
        assert pool is not None
        whole = pool.ip_network
        if not net.subnet_of(whole):  # type: ignore[arg-type]
            raise ValueError(f"the subnet {net} is outside the cluster network {whole}")
        if net.prefixlen != pool.subnet_len:
            raise ValueError(
                f"the subnet {net} is a /{net.prefixlen}; this cluster leases /{pool.subnet_len} "
                f"subnets{' of ' + pool.network if len(pools) == 2 else ''}"
            )


def _lease_fields(nets: list[IPNetwork], data: bytes | str) -> dict[str, Any]:
    """public_ip, vtep_mac, node_name, public_ipv6, vtep_mac6 of a lease value; ValueError naming the field."""
    try:
        doc = boundedjson.loads(data, max_bytes=MAX_LEASE_BYTES, max_depth=MAX_LEASE_DEPTH)
    except ValueError as err:
        raise ValueError(f"the value cannot be decoded: {err}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"the value must be a JSON object, not {json_type(doc)}")
    public_ip = _stored_public_ip(doc.get("PublicIP"))
    backend_type = doc.get("BackendType")
    if backend_type is not None and backend_type != BACKEND_TYPE:
        raise ValueError(
            f"BackendType {_short(backend_type)} is not {BACKEND_TYPE!r} (pycni only implements the vxlan backend)"
        )
    backend = doc.get("BackendData")
    if not isinstance(backend, dict):
        raise ValueError(f"BackendData must be an object holding VtepMAC, not {json_type(backend)}")
    vtep_mac = _stored_mac(backend.get("VtepMAC"))
    vni = backend.get("VNI")
    if vni is None:
        vni = 0
    elif isinstance(vni, bool) or not isinstance(vni, int) or not 1 <= vni <= MAX_VNI:
        raise ValueError(f"BackendData.VNI {_short(vni)} is not a VNI (a whole number 1..{MAX_VNI})")
    public_ipv6 = _stored_public_ipv6(doc.get("PublicIPv6"), public_ip)
    backend6 = doc.get("BackendV6Data")
    vtep_mac6 = ""
    if backend6 is not None:
        if not isinstance(backend6, dict):
            raise ValueError(f"BackendV6Data must be an object holding VtepMAC, not {json_type(backend6)}")
        vtep_mac6 = _stored_mac(backend6.get("VtepMAC"), "BackendV6Data.VtepMAC")
    if public_ipv6 and not vtep_mac6:
        raise ValueError(
            f"PublicIPv6 {public_ipv6} comes without BackendV6Data.VtepMAC (the MAC of the VXLAN "
            f"device on that underlay): a second underlay needs both"
        )
    if vtep_mac6 and not public_ipv6:
        raise ValueError(
            f"BackendV6Data.VtepMAC {vtep_mac6} comes without PublicIPv6 (the underlay address of "
            f"that VXLAN device): a second underlay needs both"
        )
    node_name = doc.get("NodeName")
    if node_name is None:
        node_name = ""
    problem = _node_name_problem(node_name)
    if problem:
        raise ValueError(
            f"NodeName {_short(node_name)} {problem}" if isinstance(node_name, str) else f"NodeName {problem}"
        )
    net6 = next((net for net in nets if net.version == 6), None)
    for name, value in doc.items():
        if name.lower() == "subnet":
            _check_own_subnet(name, value, nets[0])
        elif name.lower() == "ipv6subnet":
            if net6 is None:
                raise ValueError(f"{name} {_short(value)} names an IPv6 subnet, and the key holds none")
            _check_own_subnet(name, value, net6)
    return {
        "public_ip": public_ip,
        "vtep_mac": vtep_mac,
        "node_name": node_name,
        "public_ipv6": public_ipv6,
        "vtep_mac6": vtep_mac6,
        "vni": vni,
    }


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


def _stored_public_ipv6(value: object, public_ip: str) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError(f"PublicIPv6 must be a string holding an IPv6 address, not {json_type(value)}")
    address, problem = _public_ip_problem(value)
    if problem:
        raise ValueError(f"PublicIPv6 {_short(value)} {problem}")
    assert address is not None
    if address.version != 6:
        raise ValueError(f"PublicIPv6 {_short(value)} is an IPv4 address; PublicIPv6 is a node's IPv6 underlay address")
    if str(address) == public_ip:
        raise ValueError(f"PublicIPv6 {address} is PublicIP itself; PublicIPv6 is a second underlay address")
    return str(address)


def _stored_mac(value: object, name: str = "BackendData.VtepMAC") -> str:
    if value is None:
        raise ValueError(f"{name} is missing")
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string holding a MAC address, not {json_type(value)}")
    mac, problem = _mac_problem(value)
    if problem:
        raise ValueError(f"{name} {_short(value)} {problem}")
    return mac


def _public_ip_problem(text: str) -> tuple[IPAddress | None, str]:
    """(the address, "") or (None, what is wrong with it as a node's underlay address)."""
    if "%" in text:
        return None, f"carries a zone (%{text.partition('%')[2][:20]}), which a node's underlay address cannot have"
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None, "is not an IPv4 or IPv6 address"
    for bad, what in (
        (address.is_unspecified, "the unspecified address"),
        (address.is_loopback, "a loopback address"),
        (address.is_multicast, "a multicast address"),
        (address == ipaddress.IPv4Address("255.255.255.255"), "the broadcast address"),
    ):
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


def _conflict_message(lease: NodeLease, node_name: str, address: str, flag: str) -> str:
    return (
        f"the public IP {address} already holds the lease of {_subnets_text(lease.subnets)} for the node "
        f"{lease.node_name!r}, and this node is {node_name!r}: two nodes cannot share one underlay address. "
        f"If {lease.node_name!r} still runs, stop its agent or give this node its own {flag}; if "
        f"{lease.node_name!r} is gone, release its lease with `pycni agent leave --store URL --public-ip "
        f"{lease.public_ip}` and start this agent again"
    )


def _exhausted_message(cfg: ClusterConfig) -> str:
    pools = cfg.pools
    release = (
        "Release the leases of nodes that left (`pycni agent leave` on them, or release_lease), or create "
        "the cluster with"
    )
    if len(pools) == 1:
        pool = pools[0]
        prefix = pool.ip_network.prefixlen
        return (
            f"no free subnet left: all {pool.subnet_count} /{pool.subnet_len} subnets of {pool.network} are "
            f"leased. {release} a larger network or a longer subnet length (for example /{prefix - 1} "
            f"instead of /{prefix}) in a new store"
        )
    smaller = min(pools, key=lambda pool: pool.subnet_count)
    prefix = smaller.ip_network.prefixlen
    return (
        f"no free subnet pair left: this dual-stack cluster has room for {cfg.lease_count} leases, each subnet "
        f"i of {pools[0].network} (/{pools[0].subnet_len}) with subnet i of {pools[1].network} "
        f"(/{pools[1].subnet_len}), and every index is taken; the smaller pool, {smaller.subnet_count} "
        f"/{smaller.subnet_len} subnets of {smaller.network}, sets the count. {release} a larger network or "
        f"a longer subnet length for {smaller.network} (for example /{prefix - 1} instead of /{prefix}) in "
        f"a new store"
    )


def _subnets_text(subnets: Sequence[str]) -> str:
    return " and ".join(subnets)


def _subnet_word(lease: NodeLease) -> str:
    return "subnet" if len(lease.subnets) == 1 else "subnets"


def _is_are(lease: NodeLease) -> str:
    return "is" if len(lease.subnets) == 1 else "are"


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# -- helpers ---------------------------------------------------------------------------


def _survey(entries: list[Entry], cfg: ClusterConfig) -> tuple[list[NodeLease], list[IPNetwork]]:
    """(acceptable leases, every subnet a key names) from a listing.

    Every subnet a key names counts as taken, whatever its value and
    whatever else is wrong with the key.
    """
    leases: list[NodeLease] = []
    nets: list[IPNetwork] = []
    for entry in entries:
        named = _key_networks(entry.key)
        if not named:
            continue
        nets += named
        try:
            leases.append(NodeLease.from_entry(entry, cfg))
        except ValueError:
            pass  # unacceptable, but its subnets stay taken
    return leases, nets


def _claims(store: Store, ttl: int | None) -> Claims:
    """The store's own Claims; for an object that only looks like a store (a wrapper), claims by create()."""
    if isinstance(store, Store):
        return store.claims(ttl)
    return _ClaimsByCreate(store, ttl)


class _ClaimsByCreate(Claims):
    """One create() per key, for objects that offer only the basic calls (test doubles, wrappers).

    A key that turns out to hold exactly our lease (public IP, VTEP MAC,
    node name, public IPv6, IPv6 VTEP MAC) is ours: a create whose answer
    was lost did the work.
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
    """True if entry holds the lease value describes (the same node: addresses, VTEP MACs, node name)."""
    subnets = subnets_from_key(entry.key)
    if subnets is None:
        return False
    try:
        current = NodeLease.from_entry(entry)
        ours = NodeLease.from_json(subnets[0], value, ipv6_subnet=subnets[1])
    except ValueError:
        return False
    return _identity(current) == _identity(ours)


def _identity(lease: NodeLease) -> tuple[str, str, str, str, str]:
    """What a node writes about itself: addresses, VTEP MACs, name."""
    return lease.public_ip, lease.vtep_mac, lease.node_name, lease.public_ipv6, lease.vtep_mac6


def _is_previous(lease: NodeLease, previous: NodeLease) -> bool:
    """lease is exactly the one previous describes: its subnets, addresses and VTEP MACs (names are checked apart)."""
    return (lease.subnet, lease.ipv6_subnet, lease.public_ip, lease.vtep_mac, lease.public_ipv6, lease.vtep_mac6) == (
        previous.subnet,
        previous.ipv6_subnet,
        previous.public_ip,
        previous.vtep_mac,
        previous.public_ipv6,
        previous.vtep_mac6,
    )


class _Spans:
    """A set of indices kept as merged, sorted closed intervals."""

    def __init__(self, spans: list[tuple[int, int]]) -> None:
        merged: list[list[int]] = []
        for low, high in sorted(spans):
            if merged and low <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], high)
            else:
                merged.append([low, high])
        self.intervals = merged
        self.starts = [low for low, _high in merged]
        self.size = sum(high - low + 1 for low, high in merged)

    def __contains__(self, index: int) -> bool:
        at = bisect.bisect_right(self.starts, index) - 1
        return at >= 0 and self.intervals[at][1] >= index


def _taken_indices(pool: Pool, taken: list[IPNetwork]) -> list[tuple[int, int]]:
    """The index intervals of pool's subnets that the networks in taken name or overlap."""
    whole = pool.ip_network
    base, last = int(whole.network_address), int(whole.broadcast_address)
    shift = whole.max_prefixlen - pool.subnet_len
    spans = []
    for net in taken:
        if net.version != whole.version or not net.overlaps(whole):  # type: ignore[arg-type]
            continue
        low = max(int(net.network_address), base)
        high = min(int(net.broadcast_address), last)
        spans.append(((low - base) >> shift, (high - base) >> shift))
    return spans


class _FreeSpace:
    """The free indices of the cluster's pools, in address order, without listing them all.

    Index i stands for subnet i of every pool (one lease); the cluster has
    as many as its smaller pool has subnets. An index is free unless a key
    names or overlaps its subnet in any pool (every key under subnets/
    counts, readable or not). The taken ones are kept as merged index
    intervals, so a /8 cut into /24s, or an IPv6 network with 2**32
    subnets, costs no more than its leases.
    """

    def __init__(self, cfg: ClusterConfig, taken: list[IPNetwork]) -> None:
        self._pools = cfg.pools
        self._count = cfg.lease_count
        self._by_pool: dict[int, _Spans] = {}
        union: list[tuple[int, int]] = []
        for pool in self._pools:
            spans = _taken_indices(pool, taken)
            self._by_pool[pool.version] = _Spans(spans)
            union += [(low, min(high, self._count - 1)) for low, high in spans if low < self._count]
        merged = _Spans(union)
        self._taken = merged.intervals
        self._starts = merged.starts
        self._free = self._count - merged.size
        self._tried: set[int] = set()

    @property
    def remaining(self) -> int:
        """Free indices not tried yet."""
        return self._free - len(self._tried)

    def key(self, index: int) -> str:
        """The lease key of index: subnet index of every pool."""
        subnets = {pool.version: pool.subnet_at(index) for pool in self._pools}
        return lease_key(subnets.get(4, ""), subnets.get(6, ""))

    def is_free(self, index: int) -> bool:
        if not 0 <= index < self._count or index in self._tried:
            return False
        at = bisect.bisect_right(self._starts, index) - 1
        return at < 0 or self._taken[at][1] < index

    def preferred(self, wanted: dict[int, IPNetwork]) -> tuple[int | None, str | None, list[int]]:
        """(an index, None, []) for preferred subnets of one index; (None, key, their indices) for an unaligned
        pair whose subnets are both free (a lease written by another tool, taken back); (None, None, []) else."""
        indices = {pool.version: pool.index_of(wanted[pool.version]) for pool in self._pools if pool.version in wanted}
        if not indices:
            return None, None, []
        values = sorted({index for index in indices.values() if index is not None})
        if len(values) == 1:
            return values[0], None, []
        if len(values) != 2 or len(indices) != len(self._pools):
            return None, None, []
        for pool in self._pools:
            index = indices[pool.version]
            assert index is not None
            if index in self._by_pool[pool.version] or index in self._tried:
                return None, None, []
        return None, lease_key(wanted.get(4, ""), wanted.get(6, "")), values

    def first_claim(self, preferred: int | None, ordered: int, total: int) -> list[int]:
        """The preferred index (if free), the lowest free ones, then random ones: total indices at most."""
        batch: list[int] = []
        if preferred is not None and self.is_free(preferred):
            batch.append(preferred)
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
        self._tried.update([index for index in indices if self.is_free(index)])

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
        """The index of the n-th free index (0-based, address order, tried ones included)."""
        index = n
        for low, high in self._taken:
            if low > index:
                break
            index += high - low + 1
        return index


def _update_own(store: Store, lease: NodeLease, wanted: NodeLease, ttl: int | None) -> NodeLease | None:
    mine = dc_replace(
        lease,
        public_ip=wanted.public_ip,
        vtep_mac=wanted.vtep_mac,
        node_name=wanted.node_name or lease.node_name,
        public_ipv6=wanted.public_ipv6,
        vtep_mac6=wanted.vtep_mac6,
    )
    if mine == lease and (ttl is None or (store.ttl(lease.key) == ttl and store.refresh(lease.key))):
        return lease  # unchanged and alive: no write (and no revision bump that wakes every watcher)
    # Changed, expired, or written with another TTL (the node restarted with a new --lease-ttl): write it.
    if store.replace(lease.key, mine.to_json().encode(), lease.mod_revision, ttl=ttl):
        entry = store.get(lease.key)
        return dc_replace(mine, mod_revision=entry.mod_revision if entry else 0)
    return None


def _preferred_subnets(
    cfg: ClusterConfig, preferred_subnet: str | None, preferred_ipv6_subnet: str | None
) -> dict[int, IPNetwork]:
    """{version: subnet} of the preferred subnets that fit the cluster's pools; ValueError for unparsable ones."""
    found: dict[int, IPNetwork] = {}
    for name, text, version in (
        ("preferred IPv6 subnet", preferred_ipv6_subnet, 6),
        ("preferred subnet", preferred_subnet, None),
    ):
        if not text:
            continue
        try:
            net = ipaddress.ip_network(text, strict=True)
        except (ValueError, TypeError) as err:
            raise ValueError(f"invalid {name} {text!r}: {err}") from None
        if version is not None and net.version != version:
            raise ValueError(f"invalid {name} {text!r}: it is IPv{net.version}; give the IPv4 one as preferred_subnet")
        pool = cfg.pool(net.version)
        if pool is not None and pool.fits(net):
            found.setdefault(net.version, net)
    return found


def _is_preferred(lease: NodeLease, preferred: dict[int, IPNetwork]) -> bool:
    return bool(preferred) and all(lease.subnet_of(version) == str(net) for version, net in preferred.items())


def _check_second_underlay(
    cfg: ClusterConfig, public_ip: str, public_ipv6: object, vtep_mac6: object
) -> tuple[str, str]:
    """(public IPv6, IPv6 VTEP MAC) of a node's second underlay, ("", "") for none; ValueError saying what is wrong."""
    if public_ipv6 is None:
        public_ipv6 = ""
    if vtep_mac6 is None:
        vtep_mac6 = ""
    if not public_ipv6 and not vtep_mac6:
        return "", ""
    if cfg.pool(6) is None:
        raise ValueError(
            f"invalid node public IPv6 {_short(public_ipv6 or vtep_mac6)}: this cluster has no IPv6 pod "
            f"network ({cfg.describe()}), so a second, IPv6 underlay would carry nothing; leave "
            f"--public-ipv6 out"
        )
    if not public_ipv6:
        raise ValueError(
            f"the IPv6-underlay VTEP MAC {_short(vtep_mac6)} needs its underlay address: give "
            f"public_ipv6 (--public-ipv6) too"
        )
    if not vtep_mac6:
        raise ValueError(
            f"the public IPv6 {_short(public_ipv6)} needs the MAC of the VXLAN device on it: give vtep_mac6 too"
        )
    address, problem = _public_ip_problem(public_ipv6) if isinstance(public_ipv6, str) else (None, "is not a string")
    if problem:
        raise ValueError(
            f"invalid node public IPv6 {_short(public_ipv6)}: it {problem}; give the node's IPv6 underlay address"
        )
    assert address is not None
    if address.version != 6:
        raise ValueError(
            f"invalid node public IPv6 {address}: it is an IPv4 address; --public-ipv6 is the node's "
            f"IPv6 underlay address (its main address, IPv4 or IPv6, is --public-ip)"
        )
    if str(address) == public_ip:
        raise ValueError(
            f"invalid node public IPv6 {address}: it is the node's public IP already; --public-ipv6 "
            f"is a second, IPv6 underlay address (leave it out when the node has one underlay)"
        )
    pool6 = cfg.pool(6)
    assert pool6 is not None
    if _inside(address, pool6.ip_network):
        raise ValueError(
            f"invalid node public IPv6 {address}: it is inside the cluster network {pool6.network}, so "
            f"it is a pod address; give the node's IPv6 underlay address"
        )
    mac, mac_problem = _mac_problem(vtep_mac6) if isinstance(vtep_mac6, str) else ("", "is not a string")
    if mac_problem:
        raise ValueError(f"invalid IPv6-underlay VTEP MAC {_short(vtep_mac6)}: it {mac_problem}")
    return str(address), mac


def _check_ip(value: object) -> str:
    """A node's own public IP as given by its operator; ValueError saying what is wrong."""
    address, problem = _public_ip_problem(value) if isinstance(value, str) else (None, "is not a string")
    if problem:
        raise ValueError(
            f"invalid node public IP {_short(value)}: it {problem}; give the node's underlay IPv4 or IPv6 address"
        )
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
        raise ValueError(
            f"invalid node name {_short(value)}: it {problem}; give the node's host name (at most "
            f"{MAX_NODE_NAME} characters, no control characters)"
        )
    return value  # type: ignore[return-value]


def _lease_sort_key(lease: NodeLease) -> tuple[tuple[int, int, int], ...]:
    return tuple(_net_sort_key(ipaddress.ip_network(subnet)) for subnet in lease.subnets)


def _net_sort_key(net: IPNetwork) -> tuple[int, int, int]:
    return net.version, int(net.network_address), net.prefixlen
