"""`pycni cluster`: set up and inspect the overlay's cluster store."""
from __future__ import annotations

import ipaddress
import json

import click

from pycni.storeopts import open_from_options as _open
from pycni.storeopts import store_errors as _store_errors
from pycni.storeopts import store_options as _store_options

MAX_VNI = 2**24 - 1

@click.group("cluster")
def cluster() -> None:
    """Set up and inspect the overlay's cluster store.

    The vxlan overlay gives every node one pod subnet out of a cluster network
    (like flannel). Run `pycni cluster init` once per cluster, before the first
    node agent starts; `pycni cluster leases` shows which node holds which subnet.
    """


@cluster.command("init")
@_store_options
@click.option("--network", required=True, metavar="CIDR",
              help="The cluster (pod) network, for example 10.244.0.0/16; every node gets a subnet of it.")
@click.option("--subnet-len", default=24, show_default=True, type=int, metavar="N",
              help="Prefix length of each node's subnet; must be longer than the network's "
                   "(a /16 network with /24 subnets has room for 256 nodes of up to 254 pods).")
@click.option("--vni", default=1, show_default=True, type=click.IntRange(1, MAX_VNI), metavar="N",
              help=f"VXLAN network identifier shared by all nodes (1..{MAX_VNI}).")
@click.option("--port", default=8472, show_default=True, type=click.IntRange(1, 65535), metavar="N",
              help="VXLAN UDP port shared by all nodes (8472: Linux's and flannel's default; 4789: IANA's).")
@_store_errors
def init(store_url: str, etcd_prefix: str, etcd_cafile: str | None, etcd_certfile: str | None,
         etcd_keyfile: str | None, timeout: float, network: str, subnet_len: int, vni: int, port: int) -> None:
    """Write the cluster configuration to the store.

    Safe to repeat: with the same settings it changes nothing. It refuses to
    replace a different configuration, because nodes already hold leases from it.

    \b
    Examples:
      pycni cluster init --store file:///var/lib/pycni/cluster --network 10.244.0.0/16
      pycni cluster init --store etcd://10.0.0.1:2379,10.0.0.2:2379 --network 10.244.0.0/16 \\
          --subnet-len 24 --vni 1 --port 8472
    """
    from ipam.cluster import ClusterConfig, init_cluster

    try:
        net = ipaddress.ip_network(network, strict=True)
    except ValueError as err:
        hint = ""
        try:
            hint = f"; did you mean {ipaddress.ip_network(network, strict=False)}?"
        except ValueError:
            pass
        raise click.BadParameter(f"{network!r} is not a network in CIDR form such as 10.244.0.0/16 "
                                 f"({err}){hint}", param_hint="--network") from None
    longest = net.max_prefixlen - 2
    if not net.prefixlen < subnet_len <= longest:
        raise click.BadParameter(f"/{subnet_len} does not fit {net}: node subnets must be longer than the "
                                 f"network's /{net.prefixlen} and at most /{longest}",
                                 param_hint="--subnet-len")
    cfg = ClusterConfig(network=str(net), subnet_len=subnet_len, vni=vni, port=port)
    store = _open(store_url, etcd_prefix, etcd_cafile, etcd_certfile, etcd_keyfile, timeout)
    try:
        written = init_cluster(store, cfg)
    finally:
        store.close()
    if written:
        click.echo(f"cluster initialised in {store_url}: {cfg.describe()} "
                   f"(room for {cfg.subnet_count} nodes)")
    else:
        click.echo(f"cluster already initialised in {store_url} with the same settings: {cfg.describe()}")


@cluster.command("leases")
@_store_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_store_errors
def leases(store_url: str, etcd_prefix: str, etcd_cafile: str | None, etcd_certfile: str | None,
           etcd_keyfile: str | None, timeout: float, as_json: bool) -> None:
    """List the nodes' subnet leases: subnet, node underlay IP, VTEP MAC, node name."""
    from ipam.cluster import CONFIG_KEY, ClusterConfig, list_leases

    store = _open(store_url, etcd_prefix, etcd_cafile, etcd_certfile, etcd_keyfile, timeout)
    try:
        entry = store.get(CONFIG_KEY)
        node_leases, revision = list_leases(store)
    finally:
        store.close()
    cfg = None
    if entry is not None:
        try:
            cfg = ClusterConfig.from_json(entry.value)
        except ValueError:
            cfg = None
    if as_json:
        click.echo(json.dumps({
            "config": json.loads(cfg.to_json()) if cfg else None,
            "revision": revision,
            "leases": [{"subnet": lease.subnet, "publicIP": lease.public_ip, "vtepMAC": lease.vtep_mac,
                        "nodeName": lease.node_name, "modRevision": lease.mod_revision}
                       for lease in node_leases],
        }, indent=2))
        return
    if cfg is None:
        click.echo("no cluster configuration in this store (run `pycni cluster init` first)")
    else:
        click.echo(f"{cfg.describe()}; {len(node_leases)} of {cfg.subnet_count} subnets leased")
    if not node_leases:
        click.echo("no leases")
        return
    rows = [("SUBNET", "PUBLIC-IP", "VTEP-MAC", "NODE")]
    rows += [(lease.subnet, lease.public_ip, lease.vtep_mac, lease.node_name or "-") for lease in node_leases]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3])
