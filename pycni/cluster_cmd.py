"""`pycni cluster`: set up and inspect the overlay's cluster store."""
from __future__ import annotations

import functools
import ipaddress
import json
from typing import Any, Callable

import click

MAX_VNI = 2**24 - 1

STORE_HELP = ("Where the cluster state lives: file:///DIR for a local directory (one machine, or nodes "
              "sharing a filesystem), or etcd://HOST:PORT[,HOST:PORT...] for an etcd v3 cluster (list several "
              "members; they are tried in order).")


def _store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--store", "store_url", required=True, metavar="URL", help=STORE_HELP),
        click.option("--etcd-prefix", default="/pycni", show_default=True, metavar="PREFIX",
                     help="Key prefix in etcd, so several clusters can share one etcd (ignored for file://)."),
        click.option("--etcd-cafile", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                     help="CA certificate that signed etcd's server certificate; turns on TLS (https)."),
        click.option("--etcd-certfile", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                     help="Client certificate, for etcd started with --client-cert-auth; turns on TLS."),
        click.option("--etcd-keyfile", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
                     help="Private key of --etcd-certfile."),
        click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.1), metavar="SECONDS",
                     help="How long to wait for each store request."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _open(store_url: str, etcd_prefix: str, etcd_cafile: str | None, etcd_certfile: str | None,
          etcd_keyfile: str | None, timeout: float):
    from ipam.cluster import StoreError, TLSFiles, open_store

    tls = None
    if etcd_cafile or etcd_certfile or etcd_keyfile:
        if etcd_keyfile and not etcd_certfile:
            raise click.BadParameter("a client key needs its certificate: give --etcd-certfile too",
                                     param_hint="--etcd-keyfile")
        tls = TLSFiles(cafile=etcd_cafile, certfile=etcd_certfile, keyfile=etcd_keyfile)
    try:
        return open_store(store_url, prefix=etcd_prefix, tls=tls, timeout=timeout)
    except StoreError as exc:
        raise click.BadParameter(str(exc), param_hint="--store") from None


def _store_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A store failure ends the command with exit status 1 and its one-line message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ipam.cluster import StoreError

        try:
            return fn(*args, **kwargs)
        except StoreError as exc:
            raise click.ClickException(" ".join(str(exc).split())) from None

    return wrapper


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
