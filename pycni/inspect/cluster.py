"""The whole cluster as the store knows it: its settings, every node's lease (each pod family), and its health.

The store alone says which leases are valid (a key it cannot accept is shown
with the reason, as the agents skip it) and which leases clash (two nodes
claiming one underlay address or one VTEP MAC). Run on a node of the cluster,
``judge`` adds what that node's kernel says: each other node is healthy when
this node holds every entry its pods need (FDB, neighbour and route through
VXLAN, or the direct route on the underlay link), and this node is healthy
when its lease is valid, matches its overlay state and its devices exist.
Every lease gets a mark either way: "ok" with what was checked, or the
problems.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LeaseView:
    node_name: str
    public_ip: str
    subnet: str  # the IPv4 subnet ("" in an IPv6-only cluster)
    vtep_mac: str
    ipv6_subnet: str = ""  # the IPv6 subnet ("" without an IPv6 pod network)
    public_ipv6: str = ""  # a second, IPv6 underlay address, and the VTEP MAC there
    vtep_mac6: str = ""
    mode: str = ""  # as judged from a node: "this node", "vxlan", "direct" or "direct + vxlan"
    problems: list[str] = field(default_factory=list)  # empty: healthy

    @property
    def subnets(self) -> list[str]:
        return [subnet for subnet in (self.subnet, self.ipv6_subnet) if subnet]

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def addresses(self) -> list[str]:
        return [a for a in (self.public_ip, self.public_ipv6) if a]


@dataclass
class RejectedView:
    """A key under subnets/ the store holds but no agent accepts, and why."""

    key: str
    reason: str


@dataclass
class ClusterView:
    store: str
    network: str = ""
    subnet_len: int | None = None
    vni: int | None = None
    port: int | None = None
    leases: list[LeaseView] = field(default_factory=list)
    this_node: str = ""  # public IP of the node this ran on, if it is one
    ipv6_network: str = ""
    ipv6_subnet_len: int | None = None
    direct_routing: bool = False  # Backend.DirectRouting: nodes on one underlay subnet route without VXLAN
    rejected: list[RejectedView] = field(default_factory=list)
    seen_from: str = ""  # the node whose kernel judged the other nodes ("" when run off the cluster)

    @property
    def networks(self) -> list[str]:
        return [net for net in (self.network, self.ipv6_network) if net]

    def is_this_node(self, lease: LeaseView) -> bool:
        return bool(self.this_node) and self.this_node in lease.addresses

    @property
    def healthy(self) -> bool:
        return not self.rejected and all(lease.healthy for lease in self.leases)

    def pools(self) -> list[str]:
        """ "cluster network 10.244.0.0/16: /24 per node" for each pod family."""
        pools = []
        if self.network:
            pools.append(f"cluster network {self.network}: /{self.subnet_len} per node")
        if self.ipv6_network:
            pools.append(
                f"{'IPv6 network' if self.network else 'cluster IPv6 network'} {self.ipv6_network}: "
                f"/{self.ipv6_subnet_len} per node"
            )
        return pools

    def describe(self) -> str:
        if not self.networks:
            return f"no cluster configuration in {self.store} (run `pycni cluster init`)"
        direct = ", direct routing on one underlay subnet" if self.direct_routing else ""
        return (
            f"{', '.join(self.pools())}, VXLAN VNI {self.vni} on UDP {self.port}{direct}; {len(self.leases)} "
            f"node(s) in {self.store}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "network": self.network,
            "subnetLen": self.subnet_len,
            "vni": self.vni,
            "port": self.port,
            "thisNode": self.this_node,
            "ipv6Network": self.ipv6_network,
            "ipv6SubnetLen": self.ipv6_subnet_len,
            "directRouting": self.direct_routing,
            "seenFrom": self.seen_from,
            "healthy": self.healthy,
            "leases": [
                {
                    "nodeName": l.node_name,
                    "publicIP": l.public_ip,
                    "subnet": l.subnet,
                    "vtepMAC": l.vtep_mac,
                    "ipv6Subnet": l.ipv6_subnet,
                    "publicIPv6": l.public_ipv6,
                    "ipv6VtepMAC": l.vtep_mac6,
                    "healthy": l.healthy,
                    "mode": l.mode,
                    "problems": l.problems,
                }
                for l in self.leases
            ],
            "rejected": [{"key": r.key, "reason": r.reason} for r in self.rejected],
        }


def cluster_view(store: Any, store_url: str, this_node: str = "") -> ClusterView:
    """The store's configuration, accepted leases and rejected keys, with the store-only checks applied."""
    from ipam.cluster import StoreError, read_config, scan_leases

    try:
        cfg = read_config(store)
    except StoreError:
        cfg = None
    scan = scan_leases(store, cfg)
    view = ClusterView(store=store_url, this_node=this_node)
    if cfg is not None:
        view.network, view.vni, view.port = cfg.network, cfg.vni, cfg.port
        view.subnet_len = cfg.subnet_len if cfg.network else None
        view.direct_routing = bool(getattr(cfg, "direct_routing", False))
        if cfg.ipv6_network:
            view.ipv6_network, view.ipv6_subnet_len = cfg.ipv6_network, cfg.ipv6_subnet_len
    view.leases = [
        LeaseView(l.node_name, l.public_ip, l.subnet, l.vtep_mac, l.ipv6_subnet, l.public_ipv6, l.vtep_mac6)
        for l in scan.leases
    ]
    # A reason reads "KEY: what is wrong"; the key is shown beside it already.
    view.rejected = [RejectedView(r.key, r.reason.removeprefix(f"{r.key}: ")) for r in scan.rejected]
    judge(view)
    return view


def judge(view: ClusterView, node: Any = None) -> None:
    """Give every lease its problems: the store's clashes, and (``node``, the NodeView of the node this ran on)
    what that node's kernel holds for it."""
    for lease in view.leases:
        lease.problems, lease.mode = [], ""
    _clashes(view)
    if node is None:
        return
    view.seen_from = node.name or node.public_ip
    for lease in view.leases:
        if view.is_this_node(lease):
            lease.mode = "this node"
            lease.problems += list(node.own_problems) + _state_mismatch(lease, node)
            continue
        remotes = [r for vx in node.vxlans for r in vx.remotes if r.in_store and _same_node(r, lease)]
        if not remotes:
            lease.problems.append(f"{view.seen_from} has no entries for it")
            continue
        modes = sorted({r.mode for r in remotes})
        lease.mode = modes[0] if len(modes) == 1 else "direct + vxlan"
        for remote in remotes:
            lease.problems += [p for p in remote.problems() if p not in lease.problems]


def _same_node(remote: Any, lease: LeaseView) -> bool:
    if remote.node_name and lease.node_name:
        return remote.node_name == lease.node_name
    return bool(remote.public_ip) and remote.public_ip in lease.addresses


def _state_mismatch(lease: LeaseView, node: Any) -> list[str]:
    out = []
    for mine, stored, what in ((node.subnet, lease.subnet, "subnet"), (node.subnet6, lease.ipv6_subnet, "IPv6 subnet")):
        if mine and stored and mine != stored:
            out.append(f"its overlay state has {what} {mine}, the store {stored}")
    return out


def _clashes(view: ClusterView) -> None:
    """Two leases naming one underlay address or one VTEP MAC: both nodes' pods are unreachable."""
    owners: dict[tuple[str, str], list[LeaseView]] = {}
    for lease in view.leases:
        for what, value in (
            ("underlay address", lease.public_ip),
            ("underlay address", lease.public_ipv6),
            ("VTEP MAC", lease.vtep_mac),
            ("VTEP MAC", lease.vtep_mac6),
        ):
            holders = owners.setdefault((what, value.lower()), []) if value else []
            if value and not any(h is lease for h in holders):
                holders.append(lease)
    for (what, value), leases in owners.items():
        if len(leases) < 2:
            continue
        for lease in leases:
            others = ", ".join(o.node_name or o.public_ip for o in leases if o is not lease)
            lease.problems.append(f"{what} {value} also in the lease of {others}")
