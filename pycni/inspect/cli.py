"""`pycni inspect`: print or draw this node's network, or the whole cluster.

With a store (``--store``, or ``PYCNI_STORE`` like every command that reaches
the store) the store's leases are the reference for the remote nodes, and its
configuration's DirectRouting says which of them are routed without VXLAN.
``--cluster`` on a node of the cluster also reads this node's view, so every
node of the cluster gets a health mark from what this node's kernel holds.
"""

from __future__ import annotations

import json
import os
import sys

import click

from pycni.storeopts import STORE_ENVVAR, etcd_options

from .collect import DEFAULT_CACHE_DIR, DEFAULT_IPAM_DIR, DEFAULT_STATE_DIR

FORMATS = ("text", "json", "dot", "svg", "png")


def _open_store(store_url: str, etcd_prefix: str, cafile: str | None, certfile: str | None, keyfile: str | None):
    from pycni.storeopts import open_from_options

    return open_from_options(store_url, etcd_prefix, cafile, certfile, keyfile, 5.0)


def _emit(data: bytes, output: str | None, fmt: str) -> None:
    if output:
        directory = os.path.dirname(os.path.abspath(output))
        os.makedirs(directory, exist_ok=True)
        with open(output, "wb") as fh:
            fh.write(data)
        click.echo(f"wrote {output} ({fmt}, {len(data)} bytes)", err=True)
        return
    if fmt == "png" and sys.stdout.isatty():
        raise click.ClickException("not writing a PNG to a terminal: give --output FILE (or redirect stdout)")
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@click.command("inspect")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="text",
    show_default=True,
    help="text and json need nothing else; dot is Graphviz source; svg and png run Graphviz's `dot`.",
)
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False), metavar="FILE", help="Write to FILE instead of stdout."
)
@click.option(
    "--state-dir",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    metavar="DIR",
    help="The node agent's --state-dir (overlay.json: node name, subnet, gateway, MTU).",
)
@click.option(
    "--cache-dir",
    envvar="CNI_CACHE_DIR",
    default=DEFAULT_CACHE_DIR,
    show_default=True,
    metavar="DIR",
    help="The runtime's result cache (env CNI_CACHE_DIR; containerd, CRI-O, podman and pycni share "
    "libcni's layout): pods, their namespaces, container IDs and the pod names the runtime passed.",
)
@click.option(
    "--ipam-dir",
    "ipam_dirs",
    multiple=True,
    metavar="DIR",
    help="host-local data directories to read leases from (repeatable) [default: "
    f"{DEFAULT_IPAM_DIR}, plus every dataDir the cached configurations name].",
)
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    envvar=STORE_ENVVAR,
    show_envvar=True,
    help="The cluster store (file:///DIR, etcd://HOST:PORT[,...] or http(s)://HOST:PORT[,...]): its "
    "leases name the remote nodes and are the reference for the entries this node needs, so a "
    "missing one shows up; its DirectRouting setting says which nodes are routed without VXLAN.",
)
@click.option(
    "--cluster",
    "whole_cluster",
    is_flag=True,
    help="Show every node and lease of the cluster (needs --store) instead of this node; run on a "
    "node, each other node's health mark says whether this node can reach its pods.",
)
@etcd_options
def inspect(
    fmt: str,
    output: str | None,
    state_dir: str,
    cache_dir: str,
    ipam_dirs: tuple[str, ...],
    store_url: str | None,
    whole_cluster: bool,
    etcd_prefix: str,
    etcd_cafile: str | None,
    etcd_certfile: str | None,
    etcd_keyfile: str | None,
) -> None:
    """Show this node's container network: what is connected to what, and whether it is healthy.

    \b
    For each bridge: every pod's host veth and the namespace it leads into,
    the pod (NAMESPACE/NAME when the runtime passed K8S_POD_NAMESPACE and
    K8S_POD_NAME in CNI_ARGS, else its container ID), network, addresses, MAC
    and MTU, its hostPort mappings (pycni_portmap), how its traffic is
    masqueraded (pycni_masq, pycni_overlay) and its shaping (tbf, ifb). For
    each VXLAN device: every remote node with public IP, pod subnets (IPv4
    and IPv6 on a dual-stack cluster) and VTEP MAC, and whether the FDB,
    neighbour and route entries it needs are there (or, with direct routing,
    the route via its underlay address). Every node gets a health mark: ok,
    or what is wrong. With --store, the store's leases are the reference.
    Reads only; run it where the agent runs (as root, in the node's network
    namespace).

    \b
    The pictures (svg, png) grow downwards: pods in rows above their bridge,
    the other nodes (and with --cluster every node) as a grid of cards, so
    they stay readable at the width of a README.

    \b
    Examples:
      pycni inspect
      pycni inspect --store etcd://10.0.0.1:2379 --format png -o node.png
      PYCNI_STORE=etcd://10.0.0.1:2379 pycni inspect --cluster --format svg -o cluster.svg
    """
    from ipam.cluster import StoreError

    from .render import RenderError, cluster_dot, cluster_text, graphviz, node_dot, node_text

    if whole_cluster and not store_url:
        raise click.BadParameter("--cluster needs --store URL (or PYCNI_STORE)", param_hint="--cluster")
    leases = None
    direct_routing = False
    cluster_view = None
    if store_url:
        from ipam.cluster import list_leases, read_config

        from .cluster import cluster_view as read_cluster

        store = _open_store(store_url, etcd_prefix, etcd_cafile, etcd_certfile, etcd_keyfile)
        try:
            leases, _ = list_leases(store)
            try:
                direct_routing = read_config(store).direct_routing
            except StoreError:
                pass  # no (valid) configuration: leases alone still name the remote nodes
            if whole_cluster:
                cluster_view = read_cluster(store, store_url, _this_node(state_dir))
        except StoreError as exc:
            raise click.ClickException(f"cannot read the cluster store {store_url}: {exc}") from None
        finally:
            store.close()
    from .collect import collect

    if cluster_view is not None:
        if cluster_view.this_node:
            # Run on a node of the cluster: its kernel says whether each other node is reachable.
            from .cluster import judge

            judge(
                cluster_view,
                collect(
                    cache_dir=cache_dir,
                    state_dir=state_dir,
                    ipam_dirs=list(ipam_dirs) or None,
                    leases=leases,
                    direct_routing=direct_routing,
                ),
            )
        text, doc, dot = (lambda: cluster_text(cluster_view)), cluster_view.to_dict, (lambda: cluster_dot(cluster_view))
    else:
        view = collect(
            cache_dir=cache_dir,
            state_dir=state_dir,
            ipam_dirs=list(ipam_dirs) or None,
            leases=leases,
            direct_routing=direct_routing,
        )
        text, doc, dot = (lambda: node_text(view)), view.to_dict, (lambda: node_dot(view))
    try:
        if fmt == "text":
            data = (text() + "\n").encode()
        elif fmt == "json":
            data = (json.dumps(doc(), indent=2) + "\n").encode()
        elif fmt == "dot":
            data = dot().encode()
        else:
            data = graphviz(dot(), fmt)
    except RenderError as exc:
        raise click.ClickException(str(exc)) from None
    _emit(data, output, fmt)


def _this_node(state_dir: str) -> str:
    """The public IP of the node this runs on, from its overlay state ("" when it has none)."""
    try:
        from cni_plugins.shared.overlaystate import read_state

        state = read_state(state_dir)
    except Exception:  # no node here (or not readable): the cluster is then shown from the store alone
        return ""
    return state.public_ip if state else ""
