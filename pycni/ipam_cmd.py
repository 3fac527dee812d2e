"""`pycni ipam`: look at the host-local address store from a shell."""

from __future__ import annotations

import ipaddress
import json

import click

from ipam.config import DEFAULT_DATA_DIR


@click.group("ipam")
def ipam() -> None:
    """Inspect host-local IP address reservations (pycni's and the reference plugin's)."""


@ipam.command("list")
@click.argument("network")
@click.option(
    "--data-dir",
    default=DEFAULT_DATA_DIR,
    show_default=True,
    metavar="DIR",
    help="The host-local dataDir of the network (ipam.dataDir in its configuration).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_reservations(network: str, data_dir: str, as_json: bool) -> None:
    """List the addresses reserved in NETWORK and which container interface holds each.

    NETWORK is the network's name (the "name" of its configuration); the store
    lives in DIR/NETWORK.
    """
    from cni_plugins.spec.errors import CNIError
    from cni_plugins.spec.skel import validate_network_name
    from ipam.store import LAST_IP_PREFIX, DiskStore

    try:
        validate_network_name(network)
    except CNIError as exc:
        raise click.BadParameter(f"{exc.msg}: {network!r}", param_hint="NETWORK") from None
    store = DiskStore(network, data_dir, create=False)
    if not store.exists():
        raise click.ClickException(
            f"no host-local store for network {network!r} in {data_dir} (nothing allocated yet, or give --data-dir)"
        )
    reservations = sorted(store.reservations(), key=lambda r: _sort_key(r.ip))
    last = store.last_reserved_all()
    if as_json:
        click.echo(
            json.dumps(
                {
                    "network": network,
                    "directory": store.dir,
                    "reservations": [
                        {"ip": r.ip, "containerID": r.container_id, "ifname": r.ifname} for r in reservations
                    ],
                    "lastReserved": {f"{LAST_IP_PREFIX}{k}": v for k, v in last.items()},
                },
                indent=2,
            )
        )
        return
    if not reservations:
        click.echo(f"no addresses reserved in {store.dir}")
    else:
        width = max(len("IP"), *(len(r.ip) for r in reservations))
        click.echo(f"{'IP':<{width}}  {'IFNAME':<15}  CONTAINER")
        for r in reservations:
            ifname = r.ifname if r.ifname is not None else "-"
            click.echo(f"{r.ip:<{width}}  {ifname:<15}  {r.container_id}")
    for index, ip in last.items():
        click.echo(f"last reserved in range set {index}: {ip}")


def _sort_key(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)
