"""The overlay node's options: one typed object, and the one set of command-line flags that fills it.

``pycni agent`` is the only front door: ``overlay_flags`` adds the overlay's
flags to it and ``from_flags`` turns what click parsed into ``OverlayOptions``
(None when no ``--store`` was given: the agent then only serves CNI requests).
Defaults live here and nowhere else; ``OverlayNode`` takes the object as it is.

Standard library and click only: ``pycni agent --help`` must not load netlink
or the store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import click

from pycni.storeopts import STORE_ENVVAR, etcd_options, store_auth, tls_files

DEFAULT_STATE_DIR = "/run/pycni"
DEFAULT_BRIDGE = "pycni0"
DEFAULT_LEASE_TTL = 24 * 3600
DEFAULT_RECONCILE_INTERVAL = 10.0
DEFAULT_RELIST_INTERVAL = 300.0
DEFAULT_STORE_TIMEOUT = 5.0
MIN_LEASE_TTL = 3


@dataclass
class OverlayOptions:
    """Everything an overlay node is told; see ``pycni agent --help`` for each flag."""

    store_url: str
    public_ip: str
    public_ipv6: str = ""  # a second, IPv6 underlay: the IPv6 pods' VXLAN device runs over it
    state_dir: str = DEFAULT_STATE_DIR
    etcd_prefix: str = "/pycni"
    tls: Any = None  # ipam.cluster.TLSFiles, or None for plain http and file://
    auth: Any = None  # ipam.cluster.StoreAuth (etcd user and password), or None
    bridge: str = DEFAULT_BRIDGE
    vxlan_device: str = ""  # "": pycni.<VNI>
    underlay_device: str = ""  # "": the link holding public_ip, looked up afresh whenever needed
    node_name: str = ""  # "": the host name
    tx_checksum_offload: bool = True  # False: turn tx checksum offload off on the VXLAN device (flannel #1279)
    ip_masq: bool = True  # masquerade pod traffic that leaves the cluster network
    lease_ttl: int = DEFAULT_LEASE_TTL
    reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL  # local kernel check, no store traffic
    relist_interval: float = DEFAULT_RELIST_INTERVAL  # safety re-list of the store (+- 20 %)
    store_timeout: float = DEFAULT_STORE_TIMEOUT
    subnet_file: str = ""  # flannel's subnet.env; "": <state_dir>/subnet.env
    exit_on_store_error: bool = False  # a store that does not answer at start ends the agent instead of a retry


def overlay_flags(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The overlay's flags (overlay mode starts with --store)."""
    options = [
        click.option(
            "--store",
            "store_url",
            metavar="URL",
            envvar=STORE_ENVVAR,
            show_envvar=True,
            help="Overlay mode: the cluster store (file:///DIR, etcd://HOST:PORT[,...], or flannel's "
            "--etcd-endpoints form http(s)://HOST:PORT[,http(s)://HOST:PORT...]); the agent then "
            "also leases this node's pod subnet and keeps the vxlan device, FDB, neighbours and "
            "routes in step with the other nodes. Create the cluster first with "
            "`pycni cluster init --store URL --network CIDR [--ipv6-network CIDR]`.",
        ),
        click.option(
            "--public-ip",
            metavar="IP",
            envvar="PYCNI_PUBLIC_IP",
            show_envvar=True,
            help="Overlay mode: this node's underlay address (its VTEP).",
        ),
        click.option(
            "--public-ipv6",
            default="",
            metavar="IP",
            envvar="PYCNI_PUBLIC_IPV6",
            show_envvar=True,
            help="Overlay mode, dual-stack: this node's IPv6 underlay address. The IPv6 pods' traffic to "
            "nodes that have one too runs over it, on a second VXLAN device [default: every pod "
            "family over --public-ip].",
        ),
        click.option(
            "--state-dir",
            metavar="DIR",
            help=f"Where the node's lease is written for the vxlan plugin (overlay mode); the default "
            f"socket lives there too [default: {DEFAULT_STATE_DIR}].",
        ),
        click.option(
            "--bridge",
            "bridge_name",
            default=DEFAULT_BRIDGE,
            show_default=True,
            metavar="NAME",
            help="Overlay mode: the node's pod bridge (the pods' gateway).",
        ),
        click.option(
            "--vxlan-device",
            default="",
            metavar="NAME",
            help="Overlay mode: the node's vxlan device [default: pycni.<VNI>].",
        ),
        click.option(
            "--underlay-device",
            default="",
            metavar="NAME",
            help="Overlay mode: the underlay link [default: the one holding --public-ip].",
        ),
        click.option(
            "--node-name",
            default="",
            metavar="NAME",
            envvar="PYCNI_NODE_NAME",
            show_envvar=True,
            help="Overlay mode: this node's name, written into its lease [default: the host name]. "
            "An agent refuses to start on a public IP that another node name holds.",
        ),
        click.option(
            "--lease-ttl",
            type=click.IntRange(min=MIN_LEASE_TTL),
            default=DEFAULT_LEASE_TTL,
            metavar="SECONDS",
            help="Overlay mode: TTL of the subnet lease in the store, renewed at a third of it [default: 86400, 24 h].",
        ),
        click.option(
            "--reconcile-interval",
            type=click.FloatRange(min=0.1),
            default=DEFAULT_RECONCILE_INTERVAL,
            show_default=True,
            metavar="SECONDS",
            help="Overlay mode: check the kernel's entries against the node's view this often (local "
            "only; changes made by hand are repaired at once anyway).",
        ),
        click.option(
            "--relist-interval",
            type=click.FloatRange(min=1.0),
            default=DEFAULT_RELIST_INTERVAL,
            show_default=True,
            metavar="SECONDS",
            help="Overlay mode: read every lease from the store again this often (+-20 %), a safety net "
            "beside the watch; in between the store sees only the watch and the lease keep-alive.",
        ),
        click.option(
            "--disable-tx-checksum-offload",
            is_flag=True,
            help="Overlay mode: turn transmit checksum offload off on the vxlan device (flannel #1279).",
        ),
        click.option(
            "--no-ip-masq",
            is_flag=True,
            help="Overlay mode: do not masquerade pod traffic that leaves the cluster network (for "
            "underlays that route the pod network themselves). Without masquerading, hosts with "
            "rp_filter=1 drop pod traffic to other nodes' own addresses.",
        ),
        click.option(
            "--subnet-file",
            default="",
            metavar="PATH",
            envvar="PYCNI_SUBNET_FILE",
            show_envvar=True,
            help="Overlay mode: where to write flannel's subnet.env (FLANNEL_NETWORK, FLANNEL_SUBNET, "
            "FLANNEL_MTU, FLANNEL_IPMASQ, and the FLANNEL_IPV6_* keys in an IPv6 cluster) for tools "
            "written for flannel, e.g. /run/flannel/subnet.env [default: subnet.env in the state "
            "directory].",
        ),
        click.option(
            "--exit-on-store-error",
            is_flag=True,
            envvar="PYCNI_EXIT_ON_STORE_ERROR",
            show_envvar=True,
            help="Overlay mode: exit when the cluster store does not answer at start (or holds no "
            "cluster configuration yet). Default: serve CNI requests at once and keep retrying "
            "the store with back-off (1 s doubling to 60 s, each retry logged), as flanneld does.",
        ),
        etcd_options,
        click.option(
            "--leave",
            is_flag=True,
            help="Overlay mode: on SIGTERM give the subnet lease back and remove this node from the "
            "store (default: keep it, so a restart finds the same subnet).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _flag_label(ctx: click.Context, flag: str, name: str = "") -> str:
    """flag, or "flag (from $VAR)" when its value (parameter name) came from an environment variable."""
    name = name or flag.lstrip("-").replace("-", "_")
    try:
        source = ctx.get_parameter_source(name)
    except (AttributeError, KeyError):
        return flag
    if source is not click.core.ParameterSource.ENVIRONMENT:
        return flag
    param = next((p for p in ctx.command.params if p.name == name), None)
    envvar = param.envvar if param is not None else None
    if not isinstance(envvar, str) and ctx.auto_envvar_prefix:
        envvar = f"{ctx.auto_envvar_prefix}_{name.upper()}"
    return f"{flag} (from ${envvar})" if isinstance(envvar, str) else f"{flag} (from the environment)"


def from_flags(
    ctx: click.Context,
    store_url: str | None,
    public_ip: str | None,
    public_ipv6: str,
    state_dir: str | None,
    bridge_name: str,
    vxlan_device: str,
    underlay_device: str,
    node_name: str,
    lease_ttl: int,
    reconcile_interval: float,
    relist_interval: float,
    disable_tx_checksum_offload: bool,
    no_ip_masq: bool,
    etcd_prefix: str,
    subnet_file: str,
    exit_on_store_error: bool,
    etcd_cafile: str | None,
    etcd_certfile: str | None,
    etcd_keyfile: str | None,
    **_other: Any,
) -> OverlayOptions | None:
    """The options the flags name; None without --store. A flag that needs --store without it is a usage error."""
    if not store_url:
        given = [
            _flag_label(ctx, flag)
            for flag, value in (
                ("--public-ip", public_ip),
                ("--public-ipv6", public_ipv6),
                ("--no-ip-masq", no_ip_masq),
                ("--node-name", node_name),
                ("--underlay-device", underlay_device),
                ("--vxlan-device", vxlan_device),
                ("--subnet-file", subnet_file),
                ("--exit-on-store-error", exit_on_store_error),
            )
            if value
        ]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for overlay mode: give --store too", ctx
            )
        return None
    if not public_ip:
        raise click.UsageError(
            f"{_flag_label(ctx, '--store', 'store_url')} needs --public-ip (this node's underlay "
            f"address; or PYCNI_PUBLIC_IP)",
            ctx,
        )
    return OverlayOptions(
        store_url=store_url,
        public_ip=public_ip,
        public_ipv6=public_ipv6,
        state_dir=state_dir or DEFAULT_STATE_DIR,
        etcd_prefix=etcd_prefix,
        tls=tls_files(etcd_cafile, etcd_certfile, etcd_keyfile),
        auth=store_auth(ctx),
        bridge=bridge_name,
        vxlan_device=vxlan_device,
        underlay_device=underlay_device,
        node_name=node_name,
        tx_checksum_offload=not disable_tx_checksum_offload,
        ip_masq=not no_ip_masq,
        lease_ttl=lease_ttl,
        reconcile_interval=reconcile_interval,
        relist_interval=relist_interval,
        subnet_file=subnet_file,
        exit_on_store_error=exit_on_store_error,
    )
