"""The cluster store and the nodes' subnet leases for the vxlan overlay.

The overlay gives each node one pod subnet leased out of a cluster CIDR, the
way flannel does. Everything the nodes share lives in a small key-value
store: a local directory (file:///DIR, the embedded default for one machine
or nodes sharing a filesystem) or etcd v3 (etcd://HOST:PORT[,...], or flannel's
--etcd-endpoints form http(s)://HOST:PORT[,http(s)://HOST:PORT...], for real
clusters; an etcd with authentication takes a StoreAuth: user and password).

Key layout (etcd keys under the prefix, default /pycni; in a file store the
directory DIR takes the prefix's place):

    /pycni/
    ├── config                     {"Network": "10.244.0.0/16", "SubnetLen": 24,
    │                               "Backend": {"Type": "vxlan", "VNI": 1, "Port": 8472}}
    └── subnets/
        ├── 10.244.0.0-24          {"PublicIP": "192.168.1.10", "BackendType": "vxlan",
        │                           "BackendData": {"VtepMAC": "0a:58:..."}, "NodeName": "node-a"}
        ├── 10.244.1.0-24          one key per node: the node's subnet, its underlay
        └── ...                    (public) IP and the MAC of its VXLAN device

A dual-stack cluster (flannel's field names and key layout) stores both pod
networks, and each node's key holds one subnet of each, the same index in both:

    ├── config                     {"Network": "10.244.0.0/16", "SubnetLen": 24, "EnableIPv6": true,
    │                               "IPv6Network": "fd00:10:244::/56", "IPv6SubnetLen": 64, "Backend": {...}}
    └── subnets/
        └── 10.244.1.0-24&fd00:10:244:1::-64
                                   {"PublicIP": "192.168.1.11", "PublicIPv6": "fd00:1::11",
                                    "BackendType": "vxlan", "BackendData": {"VtepMAC": "0a:58:..."},
                                    "BackendV6Data": {"VtepMAC": "0a:58:..."}, "NodeName": "node-b"}

(PublicIPv6 and BackendV6Data only for a node with a second, IPv6 underlay.)
An IPv6-only cluster has "EnableIPv4": false and no "Network"; its keys are
subnets/fd00:10:244:1::-64.

Keys are named relative to the prefix in this API ("config",
"subnets/10.244.1.0-24"). `pycni cluster init` writes config; each node's
agent calls acquire_lease() for its subnet, lists subnets/ once and then
follows it with one Watch (store.watch(prefix, revision): a long-lived stream
of put/delete Events; idle, it costs no request) to program routes to the
other nodes, and renews its lease with refresh() (one request on etcd).

    store = open_store("etcd://10.0.0.1:2379,10.0.0.2:2379")
    cfg = read_config(store)
    lease = acquire_lease(store, cfg, public_ip="10.0.0.5", vtep_mac="0a:58:0a:00:00:05", node_name="node-a")
    lease.subnets                       # ["10.244.3.0/24"], dual-stack ["10.244.3.0/24", "fd00:10:244:3::/64"]
    cfg.pools                           # [Pool(4, "10.244.0.0/16", 24), Pool(6, "fd00:10:244::/56", 64)]
    scan = scan_leases(store, cfg)      # scan.leases accepted, scan.rejected [(key, mod_revision, reason)]
    with store.watch("subnets/", scan.revision) as watch:
        events = watch.next(timeout=30)  # [Event(kind, key, value, mod_revision, version)], [] when quiet
    store.stats()                       # {"requests": {"range": 3, "txn": 1, ...}, "watch_reconnects": 0, ...}

Every value read from the store is input: bounded decoding, every field
checked, a bad lease rejected with a reason (see leases.py).
"""

from .errors import (
    Compacted,
    ConfigConflict,
    LeaseExhausted,
    LeaseLost,
    NodeConflict,
    StoreError,
    StoreUnavailable,
    UnreadableEntry,
)
from .leases import (
    CONFIG_KEY,
    SUBNETS_PREFIX,
    ClusterConfig,
    LeaseScan,
    NodeLease,
    Pool,
    RejectedLease,
    acquire_lease,
    check_entries,
    init_cluster,
    lease_key,
    list_leases,
    read_config,
    release_lease,
    renew_lease,
    scan_leases,
    subnet_from_key,
    subnet_key,
    subnets_from_key,
)
from .store import Claims, Entry, Event, Store, StoreAuth, TLSFiles, Watch
from .url import open_store

__all__ = [
    "CONFIG_KEY",
    "SUBNETS_PREFIX",
    "Claims",
    "ClusterConfig",
    "Compacted",
    "ConfigConflict",
    "Entry",
    "Event",
    "LeaseExhausted",
    "LeaseLost",
    "LeaseScan",
    "NodeConflict",
    "NodeLease",
    "Pool",
    "RejectedLease",
    "Store",
    "StoreAuth",
    "StoreError",
    "StoreUnavailable",
    "TLSFiles",
    "UnreadableEntry",
    "Watch",
    "acquire_lease",
    "check_entries",
    "init_cluster",
    "lease_key",
    "list_leases",
    "open_store",
    "read_config",
    "release_lease",
    "renew_lease",
    "scan_leases",
    "subnet_from_key",
    "subnet_key",
    "subnets_from_key",
]
