"""What nodes publish in the cluster store, and the rows of the conformance matrix.

Keys (relative to the store prefix, next to the overlay's ``config`` and ``subnets/``)::

    conformance/<node>            a Party: the node's probe pods, addresses and datapath facts,
                                  with a heartbeat; present while `pycni conformance run` runs there
    conformance/results/<node>    NodeResults: the rows that node measured, kept for `report`

Everything is JSON. Addresses only, never names: the checks need no DNS.

Rows are named after their check; the checks that exchange packets run once
per pod family the nodes have, and their IPv6 rows carry the family in the
name (``pod-pod-other-node/ipv6``), so an IPv4-only cluster's matrix is what
it always was and a dual-stack cluster's lists each path twice.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any

PREFIX = "conformance/"
RESULTS_PREFIX = "conformance/results/"

PASS, FAIL, SKIP = "pass", "fail", "skip"
RESULTS = (PASS, FAIL, SKIP)

# The checks, in the order the matrix lists them.
SAME_NODE = "pod-pod-same-node"
OTHER_NODE = "pod-pod-other-node"
NO_SNAT = "no-snat"
NODE_POD = "node-pod"
POD_NODE = "pod-node"
HOSTPORT = "hostport"
PMTU = "pmtu"
PROBE_POD = "probe-pod"
GATEWAY_MAC = "gateway-mac"
STORE_ENTRIES = "store-entries"
RENDEZVOUS = "rendezvous"
# The checks that exchange packets run once per pod family: the IPv4 row keeps the plain name, the
# IPv6 row is the name with "/ipv6" (pod-pod-other-node/ipv6). The others are per node.
FAMILY_CHECKS = (SAME_NODE, OTHER_NODE, NO_SNAT, NODE_POD, POD_NODE, HOSTPORT, PMTU)
IPV6_SUFFIX = "/ipv6"


def family_check(check: str, version: int) -> str:
    """The row name of ``check`` in IP family ``version``: "pmtu" (4), "pmtu/ipv6" (6)."""
    return check + IPV6_SUFFIX if version == 6 else check


def split_check(name: str) -> tuple[str, int]:
    """("pmtu", 6) for "pmtu/ipv6"; (name, 4) for every other name."""
    if name.endswith(IPV6_SUFFIX):
        return name[: -len(IPV6_SUFFIX)], 6
    return name, 4


CHECKS = (
    PROBE_POD,
    GATEWAY_MAC,
    *(name for check in FAMILY_CHECKS for name in (check, family_check(check, 6))),
    STORE_ENTRIES,
    RENDEZVOUS,
)

CHECK_HELP = {
    PROBE_POD: "the node attaches its probe pods through the CNI network, with an address of every pod family "
    "its overlay state names (only listed when it cannot)",
    GATEWAY_MAC: "the pods' gateway keeps its MAC while a pod with the lowest MAC on the bridge comes and goes",
    SAME_NODE: "a pod reaches another pod on its own node (TCP)",
    OTHER_NODE: "a pod reaches a pod on another node (TCP and UDP)",
    NO_SNAT: "the receiving pod sees the sending pod's own address (no NAT between pods)",
    NODE_POD: "the node reaches a pod (its own and other nodes' pods, TCP)",
    POD_NODE: "a pod reaches a node's own address (TCP; to another node masqueraded, so strict rp_filter passes it)",
    HOSTPORT: "a pod's hostPort answers on its node's address, asked from another node",
    PMTU: "1280-byte (the IPv6 minimum MTU) and 1400-byte packets with DF set cross between pods on two nodes "
    "(ICMP echo)",
    STORE_ENTRIES: "every entry under subnets/ in the cluster store is a valid lease that the agents program",
    RENDEZVOUS: "every node holding a lease took part",
}
for _check in FAMILY_CHECKS:
    CHECK_HELP[family_check(_check, 6)] = f"IPv6: as {_check}, between the pods' IPv6 addresses" + (
        " (nodes with an IPv6 address of their own)" if _check in (POD_NODE, HOSTPORT) else ""
    )
CHECK_HELP[family_check(PMTU, 6)] = (
    "IPv6: 1280-byte (the IPv6 minimum MTU) and 1400-byte ICMPv6 echoes cross unfragmented between pods on two nodes"
)
del _check

_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")


def valid_node_id(name: str) -> bool:
    """A name usable as the last component of a store key (and not the results directory)."""
    return bool(_NODE_ID_RE.match(name)) and name != "results"


def node_key(node: str) -> str:
    return PREFIX + node


def results_key(node: str) -> str:
    return RESULTS_PREFIX + node


def _address(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be an address")
    return str(ipaddress.ip_address(value))


def _optional_address(value: Any, what: str, version: int | None = None) -> str:
    """An optional address ("" when absent), of IP ``version`` when given."""
    if value in (None, ""):
        return ""
    address = _address(value, what)
    if version is not None and ipaddress.ip_address(address).version != version:
        raise ValueError(f"{what} must be an IPv{version} address")
    return address


def _of_version(version: int, *values: str) -> str:
    """The first of ``values`` (addresses or networks) of IP ``version``; "" when none is."""
    for value in values:
        if not value:
            continue
        try:
            if ipaddress.ip_network(value, strict=False).version == version:
                return value
        except ValueError:
            continue
    return ""


class _Leased:
    """What a node and its results share: the underlay address of the node's lease (its identity among the
    leases), which is --public-ip unless the lease names another one."""

    public_ip: str
    lease_ip: str

    @property
    def lease_address(self) -> str:
        return self.lease_ip or self.public_ip


@dataclass
class Party(_Leased):
    """One node taking part in a conformance run, as it publishes itself.

    The plain fields are the node's first pod family, as in its overlay state
    (IPv4; IPv6 in an IPv6-only cluster); the ``*6``/``*ipv6`` fields its
    IPv6 pods in a dual-stack cluster ("" otherwise, and in the entries of
    older runs). ``public_ipv6`` is the node's own IPv6 address (its
    --public-ipv6) when it has one besides an IPv4 ``public_ip``;
    ``vxlan_device6``/``vtep_mac6`` its second VXLAN device on that IPv6
    underlay.
    """

    node: str  # the node's id in the matrix (its name, or its public IP)
    public_ip: str  # the node's own (underlay) address; its node echo listens there
    subnet: str  # the node's pod subnet
    vtep_mac: str
    vxlan_device: str
    mtu: int  # pod MTU
    probe_ip: str  # the probe pod: echo service, hostPort target
    client_ip: str  # a second pod on the node (the same-node check's client)
    echo_port: int
    host_port: int | None  # None: the network has no portmap plugin
    session: str  # random per run: results name the sessions they measured
    heartbeat: float = 0.0  # wall-clock time of the last refresh
    facts: dict[str, Any] = field(default_factory=dict)
    subnet6: str = ""  # the node's IPv6 pod subnet (dual-stack)
    probe_ip6: str = ""  # the probe pod's IPv6 address (dual-stack)
    client_ip6: str = ""  # the client pod's IPv6 address (dual-stack)
    public_ipv6: str = ""  # the node's own IPv6 address besides an IPv4 public_ip ("" if it has none)
    vtep_mac6: str = ""  # the VXLAN device on that IPv6 underlay
    vxlan_device6: str = ""
    # The address the node's lease holds, when the run was told to use another one for its node checks
    # (`conformance run --public-ip`); "" when they are the same. The rendezvous, the datapath facts and the
    # VXLAN lanes go by the lease's address: that is where the other agents send this node's traffic.
    lease_ip: str = ""

    # ---- per family ------------------------------------------------------------------------
    @property
    def families(self) -> list[int]:
        """The pod families this node's probe has an address of: [4], [6] or [4, 6]."""
        return [v for v in (4, 6) if self.probe(v)]

    def probe(self, version: int) -> str:
        return _of_version(version, self.probe_ip, self.probe_ip6)

    def client(self, version: int) -> str:
        return _of_version(version, self.client_ip, self.client_ip6)

    def pod_subnet(self, version: int) -> str:
        return _of_version(version, self.subnet, self.subnet6)

    def node_ip(self, version: int) -> str:
        """The node's own address of IP ``version`` ("" when it has none)."""
        return _of_version(version, self.public_ip, self.public_ipv6)

    def vtep_address_of(self, version: int) -> str:
        """The node's VXLAN device address of a pod family: that subnet's network address ("" without one)."""
        subnet = self.pod_subnet(version)
        return str(ipaddress.ip_network(subnet).network_address) if subnet else ""

    def lane_to(self, peer: "Party", version: int) -> tuple[str, str, str]:
        """(this node's VXLAN device, the peer's VTEP MAC, the peer's underlay address) that carry pod family
        ``version`` from this node to ``peer``: the second, IPv6-underlay device for IPv6 pods when both nodes
        have one (as the agents program it), else the main device."""
        if version == 6 and self.vxlan_device6 and peer.public_ipv6 and peer.vtep_mac6:
            return self.vxlan_device6, peer.vtep_mac6, peer.public_ipv6
        return self.vxlan_device, peer.vtep_mac, peer.lease_address

    @property
    def vtep_address(self) -> str:
        """The node's VXLAN device address: its subnet's network address (flannel's layout)."""
        return str(ipaddress.ip_network(self.subnet).network_address)

    @property
    def probe_label(self) -> str:
        return f"{self.node}/probe"

    @property
    def node_label(self) -> str:
        return f"{self.node}/node"

    def to_dict(self) -> dict[str, Any]:
        data = {
            "node": self.node,
            "publicIP": self.public_ip,
            "subnet": self.subnet,
            "vtepMAC": self.vtep_mac,
            "vxlanDevice": self.vxlan_device,
            "mtu": self.mtu,
            "probeIP": self.probe_ip,
            "clientIP": self.client_ip,
            "echoPort": self.echo_port,
            "hostPort": self.host_port,
            "session": self.session,
            "heartbeat": self.heartbeat,
            "facts": self.facts,
        }
        if self.lease_ip and self.lease_ip != self.public_ip:
            data["leaseIP"] = self.lease_ip
        for key, name in _SECOND_FAMILY.items():
            if getattr(self, name):
                data[key] = getattr(self, name)
        return data

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: Any) -> "Party":
        if not isinstance(data, dict):
            raise ValueError("a conformance party must be a JSON object")
        node = data.get("node")
        if not isinstance(node, str) or not valid_node_id(node):
            raise ValueError(f"invalid node id {node!r}")
        host_port = data.get("hostPort")
        if host_port is not None and (not isinstance(host_port, int) or not 0 < host_port < 65536):
            raise ValueError(f"invalid hostPort {host_port!r}")
        echo_port = data.get("echoPort")
        if not isinstance(echo_port, int) or not 0 < echo_port < 65536:
            raise ValueError(f"invalid echoPort {echo_port!r}")
        facts = data.get("facts") or {}
        if not isinstance(facts, dict):
            raise ValueError("facts must be an object")
        subnet6 = data.get("ipv6Subnet") or ""
        if subnet6:
            net6 = ipaddress.ip_network(str(subnet6), strict=True)
            if net6.version != 6:
                raise ValueError(f"ipv6Subnet {subnet6!r} is not an IPv6 network")
            subnet6 = str(net6)
        return cls(
            node=node,
            public_ip=_address(data.get("publicIP"), "publicIP"),
            subnet=str(ipaddress.ip_network(str(data.get("subnet")), strict=True)),
            vtep_mac=str(data.get("vtepMAC", "")),
            vxlan_device=str(data.get("vxlanDevice", "")),
            mtu=int(data.get("mtu", 0)),
            probe_ip=_address(data.get("probeIP"), "probeIP"),
            client_ip=_address(data.get("clientIP"), "clientIP"),
            echo_port=echo_port,
            host_port=host_port,
            session=str(data.get("session", "")),
            heartbeat=float(data.get("heartbeat", 0.0)),
            facts=facts,
            subnet6=subnet6,
            probe_ip6=_optional_address(data.get("ipv6ProbeIP"), "ipv6ProbeIP", 6),
            client_ip6=_optional_address(data.get("ipv6ClientIP"), "ipv6ClientIP", 6),
            public_ipv6=_optional_address(data.get("publicIPv6"), "publicIPv6", 6),
            vtep_mac6=str(data.get("ipv6VtepMAC") or ""),
            vxlan_device6=str(data.get("ipv6VxlanDevice") or ""),
            lease_ip=_optional_address(data.get("leaseIP"), "leaseIP", None),
        )

    @classmethod
    def from_json(cls, raw: bytes) -> "Party":
        return cls.from_dict(json.loads(raw))


# The second family's keys in a Party's JSON (absent in the entries of IPv4-only nodes and older runs).
_SECOND_FAMILY = {
    "ipv6Subnet": "subnet6",
    "ipv6ProbeIP": "probe_ip6",
    "ipv6ClientIP": "client_ip6",
    "publicIPv6": "public_ipv6",
    "ipv6VtepMAC": "vtep_mac6",
    "ipv6VxlanDevice": "vxlan_device6",
}


@dataclass
class Check:
    """One row of the matrix."""

    check: str
    source: str  # the node the check ran from
    target: str  # the node it went to
    result: str  # pass, fail or skip
    latency_ms: float | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        latency = None if self.latency_ms is None else round(self.latency_ms, 3)
        return {
            "check": self.check,
            "from": self.source,
            "to": self.target,
            "result": self.result,
            "latencyMs": latency,
            "message": self.message,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "Check":
        if not isinstance(data, dict) or data.get("result") not in RESULTS:
            raise ValueError(f"invalid conformance row {data!r}")
        latency = data.get("latencyMs")
        return cls(
            check=str(data.get("check", "")),
            source=str(data.get("from", "")),
            target=str(data.get("to", "")),
            result=data["result"],
            latency_ms=None if latency is None else float(latency),
            message=str(data.get("message", "")),
        )

    @property
    def sort_key(self) -> tuple[int, str, str]:
        order = CHECKS.index(self.check) if self.check in CHECKS else len(CHECKS)
        return order, self.source, self.target


@dataclass
class NodeResults(_Leased):
    """What one node measured in one run."""

    node: str
    public_ip: str
    session: str
    started: float
    finished: float
    checks: list[Check] = field(default_factory=list)
    peers: dict[str, str] = field(default_factory=dict)  # node -> session of every peer it measured
    lease_ip: str = ""  # the lease's address when --public-ip named another one (see Party.lease_ip)

    def to_json(self) -> bytes:
        data = {
            "node": self.node,
            "publicIP": self.public_ip,
            "session": self.session,
            "started": self.started,
            "finished": self.finished,
            "peers": self.peers,
            "checks": [c.to_dict() for c in self.checks],
        }
        if self.lease_ip and self.lease_ip != self.public_ip:
            data["leaseIP"] = self.lease_ip
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "NodeResults":
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("checks"), list):
            raise ValueError("conformance results must be an object with a list of checks")
        peers = data.get("peers") or {}
        if not isinstance(peers, dict):
            raise ValueError("peers must be an object")
        return cls(
            node=str(data.get("node", "")),
            public_ip=str(data.get("publicIP", "")),
            session=str(data.get("session", "")),
            started=float(data.get("started", 0.0)),
            finished=float(data.get("finished", 0.0)),
            checks=[Check.from_dict(row) for row in data["checks"]],
            peers={str(k): str(v) for k, v in peers.items()},
            lease_ip=str(data.get("leaseIP") or ""),
        )
