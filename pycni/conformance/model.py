"""What nodes publish in the cluster store, and the rows of the conformance matrix.

Keys (relative to the store prefix, next to the overlay's ``config`` and ``subnets/``)::

    conformance/<node>            a Party: the node's probe pods, addresses and datapath facts,
                                  with a heartbeat; present while `pycni conformance run` runs there
    conformance/results/<node>    NodeResults: the rows that node measured, kept for `report`

Everything is JSON. Addresses only, never names: the checks need no DNS.
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
CHECKS = (PROBE_POD, GATEWAY_MAC, SAME_NODE, OTHER_NODE, NO_SNAT, NODE_POD, POD_NODE, HOSTPORT, PMTU,
          STORE_ENTRIES, RENDEZVOUS)

CHECK_HELP = {
    PROBE_POD: "the node attaches its probe pods through the CNI network (only listed when it cannot)",
    GATEWAY_MAC: "the pods' gateway keeps its MAC while a pod with the lowest MAC on the bridge comes and goes",
    SAME_NODE: "a pod reaches another pod on its own node (TCP)",
    OTHER_NODE: "a pod reaches a pod on another node (TCP and UDP)",
    NO_SNAT: "the receiving pod sees the sending pod's own address (no NAT between pods)",
    NODE_POD: "the node reaches a pod (its own and other nodes' pods, TCP)",
    POD_NODE: "a pod reaches a node's own address (TCP; to another node masqueraded, so strict rp_filter passes it)",
    HOSTPORT: "a pod's hostPort answers on its node's address, asked from another node",
    PMTU: "1400-byte packets with DF set cross between pods on two nodes (ICMP echo)",
    STORE_ENTRIES: "every entry under subnets/ in the cluster store is a valid lease that the agents program",
    RENDEZVOUS: "every node holding a lease took part",
}

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


@dataclass
class Party:
    """One node taking part in a conformance run, as it publishes itself."""

    node: str               # the node's id in the matrix (its name, or its public IP)
    public_ip: str          # the node's own (underlay) address; its node echo listens there
    subnet: str             # the node's pod subnet
    vtep_mac: str
    vxlan_device: str
    mtu: int                # pod MTU
    probe_ip: str           # the probe pod: echo service, hostPort target
    client_ip: str          # a second pod on the node (the same-node check's client)
    echo_port: int
    host_port: int | None   # None: the network has no portmap plugin
    session: str            # random per run: results name the sessions they measured
    heartbeat: float = 0.0  # wall-clock time of the last refresh
    facts: dict[str, Any] = field(default_factory=dict)

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
        return {"node": self.node, "publicIP": self.public_ip, "subnet": self.subnet, "vtepMAC": self.vtep_mac,
                "vxlanDevice": self.vxlan_device, "mtu": self.mtu, "probeIP": self.probe_ip,
                "clientIP": self.client_ip, "echoPort": self.echo_port, "hostPort": self.host_port,
                "session": self.session, "heartbeat": self.heartbeat, "facts": self.facts}

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
        return cls(node=node, public_ip=_address(data.get("publicIP"), "publicIP"),
                   subnet=str(ipaddress.ip_network(str(data.get("subnet")), strict=True)),
                   vtep_mac=str(data.get("vtepMAC", "")), vxlan_device=str(data.get("vxlanDevice", "")),
                   mtu=int(data.get("mtu", 0)), probe_ip=_address(data.get("probeIP"), "probeIP"),
                   client_ip=_address(data.get("clientIP"), "clientIP"), echo_port=echo_port,
                   host_port=host_port, session=str(data.get("session", "")),
                   heartbeat=float(data.get("heartbeat", 0.0)), facts=facts)

    @classmethod
    def from_json(cls, raw: bytes) -> "Party":
        return cls.from_dict(json.loads(raw))


@dataclass
class Check:
    """One row of the matrix."""

    check: str
    source: str       # the node the check ran from
    target: str       # the node it went to
    result: str       # pass, fail or skip
    latency_ms: float | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        latency = None if self.latency_ms is None else round(self.latency_ms, 3)
        return {"check": self.check, "from": self.source, "to": self.target, "result": self.result,
                "latencyMs": latency, "message": self.message}

    @classmethod
    def from_dict(cls, data: Any) -> "Check":
        if not isinstance(data, dict) or data.get("result") not in RESULTS:
            raise ValueError(f"invalid conformance row {data!r}")
        latency = data.get("latencyMs")
        return cls(check=str(data.get("check", "")), source=str(data.get("from", "")),
                   target=str(data.get("to", "")), result=data["result"],
                   latency_ms=None if latency is None else float(latency), message=str(data.get("message", "")))

    @property
    def sort_key(self) -> tuple[int, str, str]:
        order = CHECKS.index(self.check) if self.check in CHECKS else len(CHECKS)
        return order, self.source, self.target


@dataclass
class NodeResults:
    """What one node measured in one run."""

    node: str
    public_ip: str
    session: str
    started: float
    finished: float
    checks: list[Check] = field(default_factory=list)
    peers: dict[str, str] = field(default_factory=dict)   # node -> session of every peer it measured

    def to_json(self) -> bytes:
        return json.dumps({"node": self.node, "publicIP": self.public_ip, "session": self.session,
                           "started": self.started, "finished": self.finished, "peers": self.peers,
                           "checks": [c.to_dict() for c in self.checks]}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "NodeResults":
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("checks"), list):
            raise ValueError("conformance results must be an object with a list of checks")
        peers = data.get("peers") or {}
        if not isinstance(peers, dict):
            raise ValueError("peers must be an object")
        return cls(node=str(data.get("node", "")), public_ip=str(data.get("publicIP", "")),
                   session=str(data.get("session", "")), started=float(data.get("started", 0.0)),
                   finished=float(data.get("finished", 0.0)),
                   checks=[Check.from_dict(row) for row in data["checks"]],
                   peers={str(k): str(v) for k, v in peers.items()})
