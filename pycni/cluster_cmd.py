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
    (like flannel; in a dual-stack cluster one IPv4 and one IPv6 subnet). Run `pycni cluster init` once per cluster, before the first
    node agent starts; `pycni cluster leases` shows which node holds which subnet.
    """


@cluster.command("init")
@_store_options
@click.option(
    "--network",
    metavar="CIDR",
    help="The cluster's IPv4 pod network, for example 10.244.0.0/16; every node gets a subnet of it. "
    "Leave it out for an IPv6-only cluster (give --ipv6-network).",
)
@click.option(
    "--subnet-len",
    default=24,
    show_default=True,
    type=int,
    metavar="N",
    help="Prefix length of each node's IPv4 subnet; must be longer than the network's "
    "(a /16 network with /24 subnets has room for 256 nodes of up to 254 pods).",
)
@click.option(
    "--ipv6-network",
    metavar="CIDR",
    help="The cluster's IPv6 pod network, for example fd00:10:244::/56: with --network a dual-stack "
    "cluster (every node gets one subnet of each), alone an IPv6-only one.",
)
@click.option(
    "--ipv6-subnet-len",
    default=64,
    show_default=True,
    type=int,
    metavar="N",
    help="Prefix length of each node's IPv6 subnet; longer than the IPv6 network's and at most 126 "
    "(a /56 network with /64 subnets has room for 256 nodes). A dual-stack cluster has room for "
    "as many nodes as the smaller of its two networks.",
)
@click.option(
    "--vni",
    default=1,
    show_default=True,
    type=click.IntRange(1, MAX_VNI),
    metavar="N",
    help=f"VXLAN network identifier shared by all nodes (1..{MAX_VNI}).",
)
@click.option(
    "--port",
    default=8472,
    show_default=True,
    type=click.IntRange(1, 65535),
    metavar="N",
    help="VXLAN UDP port shared by all nodes (8472: Linux's and flannel's default; 4789: IANA's).",
)
@click.option(
    "--direct-routing",
    is_flag=True,
    help="Nodes whose underlay addresses share a subnet route each other's pod subnets directly "
    "(a plain route via the other node: no VXLAN encapsulation, no per-packet overhead); nodes "
    "on other subnets still go through the VXLAN device. flannel's Backend.DirectRouting. The "
    "underlay must carry packets with pod addresses between those nodes (clouds with "
    "source/destination checks drop them unless the check is off).",
)
@_store_errors
@click.pass_context
def init(
    ctx: click.Context,
    store_url: str,
    etcd_prefix: str,
    etcd_cafile: str | None,
    etcd_certfile: str | None,
    etcd_keyfile: str | None,
    timeout: float,
    network: str | None,
    subnet_len: int,
    ipv6_network: str | None,
    ipv6_subnet_len: int,
    vni: int,
    port: int,
    direct_routing: bool,
) -> None:
    """Write the cluster configuration to the store.

    Safe to repeat: with the same settings it changes nothing. It refuses to
    replace a different configuration, because nodes already hold leases from it.

    \b
    Examples:
      pycni cluster init --store file:///var/lib/pycni/cluster --network 10.244.0.0/16
      pycni cluster init --store etcd://10.0.0.1:2379,10.0.0.2:2379 --network 10.244.0.0/16 \\
          --subnet-len 24 --vni 1 --port 8472
      pycni cluster init --store etcd://10.0.0.1:2379 --network 10.244.0.0/16 \\
          --ipv6-network fd00:10:244::/56 --ipv6-subnet-len 64       # dual-stack
      pycni cluster init --store etcd://10.0.0.1:2379 --ipv6-network fd00:10:244::/56   # IPv6-only
      pycni cluster init --store etcd://10.0.0.1:2379 --network 10.244.0.0/16 --direct-routing
      PYCNI_STORE=https://10.0.0.1:2379,https://10.0.0.2:2379 pycni cluster init \\
          --etcd-username pycni --etcd-password-file /etc/pycni/etcd-password --network 10.244.0.0/16
    """
    from ipam.cluster import ClusterConfig, init_cluster

    if network is None and ipv6_network is None:
        raise click.UsageError(
            "give the pod network: --network CIDR (IPv4), --ipv6-network CIDR (IPv6), or both for a dual-stack cluster"
        )
    given = {
        name
        for name in ("subnet_len", "ipv6_subnet_len")
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    }
    if network is None and "subnet_len" in given:
        raise click.BadParameter(
            "it sets the length of the IPv4 subnets, and there is no --network; the IPv6 "
            "subnets' length is --ipv6-subnet-len",
            param_hint="--subnet-len",
        )
    if ipv6_network is None and "ipv6_subnet_len" in given:
        raise click.BadParameter(
            "it sets the length of the IPv6 subnets, and there is no --ipv6-network", param_hint="--ipv6-subnet-len"
        )
    net = _cidr(network, 4, "--network", "10.244.0.0/16", "--ipv6-network") if network is not None else None
    net6 = (
        _cidr(ipv6_network, 6, "--ipv6-network", "fd00:10:244::/56", "--network") if ipv6_network is not None else None
    )
    if net is not None:
        _check_subnet_len(net, subnet_len, "--subnet-len")
    if net6 is not None:
        _check_subnet_len(net6, ipv6_subnet_len, "--ipv6-subnet-len")
    cfg = ClusterConfig(
        network=str(net) if net else "",
        subnet_len=subnet_len if net else 24,
        vni=vni,
        port=port,
        ipv6_network=str(net6) if net6 else "",
        ipv6_subnet_len=ipv6_subnet_len if net6 else 64,
        direct_routing=direct_routing,
    )
    store = _open(store_url, etcd_prefix, etcd_cafile, etcd_certfile, etcd_keyfile, timeout)
    try:
        written = init_cluster(store, cfg)
    finally:
        store.close()
    if written:
        click.echo(f"cluster initialised in {store_url}: {cfg.describe()} (room for {cfg.lease_count} nodes)")
    else:
        click.echo(f"cluster already initialised in {store_url} with the same settings: {cfg.describe()}")


def _cidr(
    text: str, version: int, flag: str, example: str, other_flag: str
) -> "ipaddress.IPv4Network | ipaddress.IPv6Network":
    """text as a network of the family flag takes; a usage error naming flag (and other_flag) otherwise."""
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as err:
        hint = ""
        try:
            hint = f"; did you mean {ipaddress.ip_network(text, strict=False)}?"
        except ValueError:
            pass
        raise click.BadParameter(
            f"{text!r} is not a network in CIDR form such as {example} ({err}){hint}", param_hint=flag
        ) from None
    if net.version != version:
        raise click.BadParameter(
            f"{net} is an IPv{net.version} network; {flag} is the IPv{version} pod network, "
            f"give the IPv{net.version} one as {other_flag}",
            param_hint=flag,
        )
    return net


def _check_subnet_len(net: "ipaddress.IPv4Network | ipaddress.IPv6Network", length: int, flag: str) -> None:
    longest = net.max_prefixlen - 2
    if not net.prefixlen < length <= longest:
        raise click.BadParameter(
            f"/{length} does not fit {net}: node subnets must be longer than the "
            f"network's /{net.prefixlen} and at most /{longest}",
            param_hint=flag,
        )


@cluster.command("leases")
@_store_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_store_errors
def leases(
    store_url: str,
    etcd_prefix: str,
    etcd_cafile: str | None,
    etcd_certfile: str | None,
    etcd_keyfile: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """List the nodes' leases: subnet(s), node underlay IP(s), VTEP MAC(s), node name.

    In a dual-stack cluster each node holds one IPv4 and one IPv6 subnet;
    PUBLIC-IPV6 and VTEP-MAC6 are a node's second, IPv6 underlay (if it has one).
    """
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
        click.echo(
            json.dumps(
                {
                    "config": json.loads(cfg.to_json()) if cfg else None,
                    "revision": revision,
                    "leases": [
                        {
                            "subnet": lease.subnet,
                            "publicIP": lease.public_ip,
                            "vtepMAC": lease.vtep_mac,
                            "nodeName": lease.node_name,
                            "modRevision": lease.mod_revision,
                            "ipv6Subnet": lease.ipv6_subnet,
                            "publicIPv6": lease.public_ipv6,
                            "vtepMAC6": lease.vtep_mac6,
                        }
                        for lease in node_leases
                    ],
                },
                indent=2,
            )
        )
        return
    if cfg is None:
        click.echo("no cluster configuration in this store (run `pycni cluster init` first)")
    else:
        what = "subnet pairs" if cfg.dual_stack else "subnets"
        click.echo(f"{cfg.describe()}; {len(node_leases)} of {cfg.lease_count} {what} leased")
    if not node_leases:
        click.echo("no leases")
        return
    # Columns for the IPv4-only case are today's; the IPv6 ones appear when the cluster or a lease has them.
    show6 = (cfg is not None and cfg.pool(6) is not None) or any(lease.ipv6_subnet for lease in node_leases)
    show4 = (cfg.pool(4) is not None if cfg is not None else not show6) or any(lease.subnet for lease in node_leases)
    show_ip6 = any(lease.public_ipv6 for lease in node_leases)
    show_mac6 = any(lease.vtep_mac6 for lease in node_leases)
    columns = [
        (show4, "SUBNET", lambda lease: lease.subnet),
        (show6, "IPV6-SUBNET", lambda lease: lease.ipv6_subnet),
        (True, "PUBLIC-IP", lambda lease: lease.public_ip),
        (show_ip6, "PUBLIC-IPV6", lambda lease: lease.public_ipv6),
        (True, "VTEP-MAC", lambda lease: lease.vtep_mac),
        (show_mac6, "VTEP-MAC6", lambda lease: lease.vtep_mac6),
        (True, "NODE", lambda lease: lease.node_name),
    ]
    shown = [(title, cell) for show, title, cell in columns if show]
    rows = [tuple(title for title, _cell in shown)]
    rows += [tuple(cell(lease) or "-" for _title, cell in shown) for lease in node_leases]
    widths = [max(len(row[i]) for row in rows) for i in range(len(shown) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths)) + "  " + row[-1])
