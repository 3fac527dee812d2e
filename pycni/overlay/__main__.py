"""``python -m pycni.overlay``: run the overlay node agent on its own (no CNI serving).

The options match ``pycni agent``'s; ``python -m pycni.overlay leave --store URL
--public-ip IP`` matches ``pycni agent leave``. SIGTERM or SIGINT stop it and keep
the node's devices and entries (a restart keeps traffic flowing); with --leave
it releases its lease and removes them instead.
"""
from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Any, Callable

import click

from pycni.storeopts import etcd_options, tls_files

STORE_HELP = ("The cluster store: file:///DIR (a local directory) or etcd://HOST:PORT[,HOST:PORT...]. "
              "Create the cluster first with `pycni cluster init --store URL --network CIDR`.")


def _store_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = etcd_options(fn)
    fn = click.option("--public-ip", metavar="IP", help="This node's underlay address (its VTEP).")(fn)
    return click.option("--store", "store_url", metavar="URL", help=STORE_HELP)(fn)


def _require(ctx: click.Context, **values: Any) -> None:
    missing = [f"--{name.replace('_', '-')}" for name, value in values.items() if not value]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)}", ctx)


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_store_options
@click.option("--state-dir", default="/run/pycni", show_default=True, metavar="DIR",
              help="Where the node's overlay.json (read by the vxlan plugin) is written.")
@click.option("--socket", "socket_path", metavar="PATH", help="Accepted for compatibility with `pycni agent`; "
              "this runner serves no CNI requests.")
@click.option("--bridge", default="pycni0", show_default=True, help="The node bridge pods attach to.")
@click.option("--vxlan-device", default="", metavar="NAME", help="The VXLAN device [default: pycni.<VNI>].")
@click.option("--underlay-device", default="", metavar="NAME",
              help="The underlay link [default: the one holding --public-ip].")
@click.option("--node-name", default="", metavar="NAME", help="[default: the host name]")
@click.option("--lease-ttl", type=click.IntRange(min=3), default=None, metavar="SECONDS",
              help="TTL of the subnet lease in the store, renewed at a third of it [default: 24 h].")
@click.option("--reconcile-interval", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              metavar="SECONDS", help="Full reconcile at least this often, even without store changes.")
@click.option("--disable-tx-checksum-offload", is_flag=True,
              help="Turn transmit checksum offload off on the VXLAN device (flannel #1279).")
@click.option("--leave", is_flag=True, help="On SIGTERM, release the lease and remove the node's overlay.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def main(ctx: click.Context, store_url: str | None, public_ip: str | None, etcd_prefix: str,
         etcd_cafile: str | None, etcd_certfile: str | None, etcd_keyfile: str | None, state_dir: str,
         socket_path: str | None, bridge: str, vxlan_device: str, underlay_device: str, node_name: str,
         lease_ttl: int | None, reconcile_interval: float, disable_tx_checksum_offload: bool, leave: bool,
         log_level: str) -> None:
    """Run the VXLAN overlay's node agent until SIGTERM."""
    if ctx.invoked_subcommand is not None:
        return
    _require(ctx, store=store_url, public_ip=public_ip)
    logging.basicConfig(level=getattr(logging, log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pycni.overlay.node import OverlayError, OverlayNode, OverlayOptions

    opts = OverlayOptions(store_url=store_url or "", public_ip=public_ip or "", state_dir=state_dir,
                          etcd_prefix=etcd_prefix, tls=tls_files(etcd_cafile, etcd_certfile, etcd_keyfile),
                          bridge=bridge, vxlan_device=vxlan_device, underlay_device=underlay_device,
                          node_name=node_name, tx_checksum_offload=not disable_tx_checksum_offload,
                          lease_ttl=lease_ttl, reconcile_interval=reconcile_interval)
    node = OverlayNode(opts)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        node.start()
    except OverlayError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    logging.getLogger("pycni.overlay").info("ready: %s", json.dumps(node.status(), sort_keys=True))
    worker = threading.Thread(target=node.run, args=(stop,), name="overlay-run", daemon=True)
    worker.start()
    while not stop.wait(0.5):
        if not worker.is_alive():
            break
    stop.set()
    worker.join(15)
    try:
        node.close(leave=leave)
    except OverlayError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


@main.command("leave")
@_store_options
@click.pass_context
def leave_cmd(ctx: click.Context, store_url: str | None, public_ip: str | None, etcd_prefix: str,
              etcd_cafile: str | None, etcd_certfile: str | None, etcd_keyfile: str | None) -> None:
    """Release a node's subnet lease, so every other node drops its entries for it.

    Stop that node's agent first: a running agent takes its lease again.
    """
    _require(ctx, store=store_url, public_ip=public_ip)
    from pycni.overlay.node import OverlayError, leave_cluster

    try:
        released = leave_cluster(store_url or "", public_ip or "", prefix=etcd_prefix,
                                 tls=tls_files(etcd_cafile, etcd_certfile, etcd_keyfile))
    except OverlayError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    click.echo(f"released the lease of {public_ip}" if released else f"{public_ip} held no lease")


if __name__ == "__main__":
    main(prog_name="python -m pycni.overlay")
