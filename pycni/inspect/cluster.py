"""The whole cluster as the store knows it: its network settings and every node's lease."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LeaseView:
    node_name: str
    public_ip: str
    subnet: str
    vtep_mac: str


@dataclass
class ClusterView:
    store: str
    network: str = ""
    subnet_len: int | None = None
    vni: int | None = None
    port: int | None = None
    leases: list[LeaseView] = field(default_factory=list)
    this_node: str = ""            # public IP of the node this ran on, if it is one

    def describe(self) -> str:
        if not self.network:
            return f"no cluster configuration in {self.store} (run `pycni cluster init`)"
        return (f"cluster network {self.network}: /{self.subnet_len} per node, VXLAN VNI {self.vni} on UDP "
                f"{self.port}; {len(self.leases)} node(s) in {self.store}")

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "network": self.network, "subnetLen": self.subnet_len, "vni": self.vni,
                "port": self.port, "thisNode": self.this_node,
                "leases": [{"nodeName": l.node_name, "publicIP": l.public_ip, "subnet": l.subnet,
                            "vtepMAC": l.vtep_mac} for l in self.leases]}


def cluster_view(store: Any, store_url: str, this_node: str = "") -> ClusterView:
    from ipam.cluster import StoreError, list_leases, read_config

    try:
        cfg = read_config(store)
    except StoreError:
        cfg = None
    leases, _ = list_leases(store)
    view = ClusterView(store=store_url, this_node=this_node)
    if cfg is not None:
        view.network, view.subnet_len, view.vni, view.port = cfg.network, cfg.subnet_len, cfg.vni, cfg.port
    view.leases = [LeaseView(l.node_name, l.public_ip, l.subnet, l.vtep_mac) for l in leases]
    return view
