"""The whole cluster as the store knows it: its network settings and every node's lease (each pod family)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LeaseView:
    node_name: str
    public_ip: str
    subnet: str                 # the IPv4 subnet ("" in an IPv6-only cluster)
    vtep_mac: str
    ipv6_subnet: str = ""       # the IPv6 subnet ("" without an IPv6 pod network)
    public_ipv6: str = ""       # a second, IPv6 underlay address, and the VTEP MAC there
    vtep_mac6: str = ""

    @property
    def subnets(self) -> list[str]:
        return [subnet for subnet in (self.subnet, self.ipv6_subnet) if subnet]


@dataclass
class ClusterView:
    store: str
    network: str = ""
    subnet_len: int | None = None
    vni: int | None = None
    port: int | None = None
    leases: list[LeaseView] = field(default_factory=list)
    this_node: str = ""            # public IP of the node this ran on, if it is one
    ipv6_network: str = ""
    ipv6_subnet_len: int | None = None

    @property
    def networks(self) -> list[str]:
        return [net for net in (self.network, self.ipv6_network) if net]

    def describe(self) -> str:
        if not self.networks:
            return f"no cluster configuration in {self.store} (run `pycni cluster init`)"
        pools = []
        if self.network:
            pools.append(f"cluster network {self.network}: /{self.subnet_len} per node")
        if self.ipv6_network:
            pools.append(f"{'IPv6 network' if self.network else 'cluster IPv6 network'} {self.ipv6_network}: "
                         f"/{self.ipv6_subnet_len} per node")
        return (f"{', '.join(pools)}, VXLAN VNI {self.vni} on UDP {self.port}; {len(self.leases)} node(s) in "
                f"{self.store}")

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "network": self.network, "subnetLen": self.subnet_len, "vni": self.vni,
                "port": self.port, "thisNode": self.this_node, "ipv6Network": self.ipv6_network,
                "ipv6SubnetLen": self.ipv6_subnet_len,
                "leases": [{"nodeName": l.node_name, "publicIP": l.public_ip, "subnet": l.subnet,
                            "vtepMAC": l.vtep_mac, "ipv6Subnet": l.ipv6_subnet, "publicIPv6": l.public_ipv6,
                            "ipv6VtepMAC": l.vtep_mac6} for l in self.leases]}


def cluster_view(store: Any, store_url: str, this_node: str = "") -> ClusterView:
    from ipam.cluster import StoreError, list_leases, read_config

    try:
        cfg = read_config(store)
    except StoreError:
        cfg = None
    leases, _ = list_leases(store)
    view = ClusterView(store=store_url, this_node=this_node)
    if cfg is not None:
        view.network, view.vni, view.port = cfg.network, cfg.vni, cfg.port
        view.subnet_len = cfg.subnet_len if cfg.network else None
        if cfg.ipv6_network:
            view.ipv6_network, view.ipv6_subnet_len = cfg.ipv6_network, cfg.ipv6_subnet_len
    view.leases = [LeaseView(l.node_name, l.public_ip, l.subnet, l.vtep_mac, l.ipv6_subnet, l.public_ipv6,
                             l.vtep_mac6) for l in leases]
    return view
