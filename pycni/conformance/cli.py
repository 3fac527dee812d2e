"""`pycni conformance`: prove the Kubernetes network model on a running cluster."""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from pycni.storeopts import open_from_options as _open
from pycni.storeopts import store_errors as _store_errors
from pycni.storeopts import store_options as _store_options

from .runner import DEFAULT_CHECK_TIMEOUT, DEFAULT_ECHO_PORT, DEFAULT_HOST_PORT, DEFAULT_WAIT

DEFAULT_STATE_DIR = "/run/pycni"
EXPECT_NODES_ENVVAR = "PYCNI_EXPECT_NODES"  # shared by `run` and `report`: one setting for the cluster's size


def _log(message: str) -> None:
    click.echo(message, err=True)


def _terminate_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so everything the run created is removed."""

    def stop(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)


@click.group("conformance")
def conformance() -> None:
    """Check the Kubernetes network model on a live cluster, node by node.

    \b
    Run `pycni conformance run` on every node at about the same time (they
    meet in the cluster store, no ssh needed), then `pycni conformance report`
    anywhere that reaches the store. Nodes that come up one after another
    (Vagrant's VMs) give every run --expect-nodes N: each waits, with its
    probe published, until all N are there. `pycni conformance peers` shows
    who is waiting. Each run attaches two probe pods through the CNI network,
    and checks, against its own node and every other node:
      pod-pod-same-node   a pod reaches another pod on its node
      pod-pod-other-node  a pod reaches pods on other nodes (TCP, UDP)
      no-snat             the receiver sees the sending pod's own address
      node-pod            a node reaches its pods and other nodes' pods
      pod-node            a pod reaches every node's own address
      hostport            a pod's hostPort answers from another node
      pmtu                1280- and 1400-byte packets with DF cross between nodes
    Each runs in every pod family the nodes have: on a dual-stack cluster
    the IPv6 rows are named <check>/ipv6 (pod-pod-other-node/ipv6, ...);
    pod-node and hostport run in a family where the nodes have an address
    of their own of it. All checks use addresses, never names (no DNS
    needed). A failed check's message names the likely fault (SNAT between
    nodes, a missing FDB or neighbour entry, an MTU mismatch, a firewall
    dropping packets...) and, outside IPv4-only clusters, its family.
    """


@conformance.command("run")
@_store_options
@click.option("--network", required=True, metavar="NAME", help="The CNI network the probe pods join (its name).")
@click.option(
    "--state-dir",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    metavar="DIR",
    help="The node agent's --state-dir (overlay.json); the run's own record goes there too.",
)
@click.option(
    "--netconf-path",
    envvar="NETCONFPATH",
    default="",
    metavar="DIRS",
    help="Directories with network configurations (env NETCONFPATH) [default: /etc/cni/net.d].",
)
@click.option(
    "--cni-path",
    envvar="CNI_PATH",
    default="",
    metavar="DIRS",
    help="Directories with plugin executables (env CNI_PATH) [default: /opt/cni/bin].",
)
@click.option(
    "--cache-dir",
    envvar="CNI_CACHE_DIR",
    default="/var/lib/cni",
    show_default=True,
    metavar="DIR",
    help="Result cache directory (env CNI_CACHE_DIR).",
)
@click.option(
    "--node-name",
    default="",
    metavar="NAME",
    help="This node's name in the matrix [default: its lease's node name when unique, else its public IP].",
)
@click.option("--public-ip", default="", metavar="IP", help="This node's address [default: the agent's --public-ip].")
@click.option(
    "--port",
    "echo_port",
    default=DEFAULT_ECHO_PORT,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port of the echo service (in the probe pod and on the node's address).",
)
@click.option(
    "--host-port",
    default=DEFAULT_HOST_PORT,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="hostPort mapped to the probe pod's echo service.",
)
@click.option(
    "--expect-nodes",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    metavar="N",
    envvar=EXPECT_NODES_ENVVAR,
    show_envvar=True,
    help="The cluster has N nodes, this one included: wait until N nodes hold a subnet lease and have "
    "published their probes, also nodes that are not up yet, then check all of them. For nodes "
    "that come up one after another, like Vagrant's VMs. Bounded by --wait: with fewer than N by "
    "then, the run checks the nodes that came and fails, naming them and how many are missing. "
    "0: the nodes holding a lease are the cluster.",
)
@click.option(
    "--wait",
    default=DEFAULT_WAIT,
    show_default=True,
    type=click.FloatRange(min=1),
    metavar="SECONDS",
    help="How long to wait for the other nodes (those holding a lease, and --expect-nodes) to publish "
    "their probes, and again for their results.",
)
@click.option(
    "--check-timeout",
    default=DEFAULT_CHECK_TIMEOUT,
    show_default=True,
    type=click.FloatRange(min=0.2, max=60),
    metavar="SECONDS",
    help="How long each check waits for a reply.",
)
@click.option(
    "--keep-probes",
    is_flag=True,
    help="Leave the probe pods up afterwards (their echo services stop); `clean` removes them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print this node's rows as JSON instead of a table.")
@_store_errors
def run_cmd(
    store_url: str,
    etcd_prefix: str,
    etcd_cafile: str | None,
    etcd_certfile: str | None,
    etcd_keyfile: str | None,
    timeout: float,
    network: str,
    state_dir: str,
    netconf_path: str,
    cni_path: str,
    cache_dir: str,
    node_name: str,
    public_ip: str,
    echo_port: int,
    host_port: int,
    expect_nodes: int,
    wait: float,
    check_timeout: float,
    keep_probes: bool,
    as_json: bool,
) -> None:
    """Check this node against every node of the cluster; exit 1 if a check fails.

    Run it on every node (as root, where the node agent runs). It waits up to
    --wait seconds for the nodes holding a subnet lease to show up (with
    --expect-nodes N, until N nodes are there), writes its rows to the store
    (conformance/results/<node>) and removes its probe pods once the other
    nodes have finished with them.
    """
    from cni_plugins.spec.errors import CNIError
    from netns.errors import NetnsError

    from . import report
    from .runner import ConformanceError, RunOptions, run_node

    if echo_port == host_port:
        raise click.BadParameter("the hostPort must differ from the echo port", param_hint="--host-port")
    opts = RunOptions(
        network=network,
        state_dir=state_dir,
        netconf_path=netconf_path,
        cni_path=cni_path,
        cache_dir=cache_dir,
        node_name=node_name,
        public_ip=public_ip,
        echo_port=echo_port,
        host_port=host_port,
        wait=wait,
        check_timeout=check_timeout,
        keep_probes=keep_probes,
        expect_nodes=expect_nodes,
    )
    _terminate_on_sigterm()
    store = _open(store_url, etcd_prefix, etcd_cafile, etcd_certfile, etcd_keyfile, timeout)
    try:
        results, rows = run_node(store, opts, _log)
    except (ConformanceError, CNIError, NetnsError, OSError, RuntimeError, ValueError) as exc:
        raise click.ClickException(f"conformance run failed: {exc} (its probe pods were removed)") from None
    except KeyboardInterrupt:
        _log("interrupted: the probe pods and this node's entry were removed")
        sys.exit(130)
    finally:
        store.close()
    click.echo(report.as_json(rows, [results]) if as_json else report.table(rows))
    sys.exit(0 if report.passed(rows) else 1)


@conformance.command("report")
@_store_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (checks, summary, nodes) instead of a table.")
@click.option(
    "--wait",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Wait up to this long for every node holding a lease (and --expect-nodes) to write results.",
)
@click.option(
    "--expect-nodes",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    metavar="N",
    envvar=EXPECT_NODES_ENVVAR,
    show_envvar=True,
    help="The newest run must have results from at least N nodes: wait (up to --wait) for them, and "
    "fail with a rendezvous row naming the nodes that wrote results when fewer did. 0: every "
    "node holding a lease.",
)
@_store_errors
def report_cmd(
    store_url: str,
    etcd_prefix: str,
    etcd_cafile: str | None,
    etcd_certfile: str | None,
    etcd_keyfile: str | None,
    timeout: float,
    as_json: bool,
    wait: float,
    expect_nodes: int,
) -> None:
    """Print the matrix every node wrote: check, from, to, result, latency, message.

    Exits 1 when a check failed, a node holding a lease wrote no results,
    fewer than --expect-nodes nodes did, or there are no results at all.
    """
    import time

    from ipam.cluster import list_leases

    from . import report
    from .model import FAIL, RENDEZVOUS, Check
    from .rendezvous import read_results

    store = _open(store_url, etcd_prefix, etcd_cafile, etcd_certfile, etcd_keyfile, timeout)
    try:
        deadline = time.monotonic() + wait
        for _ in range(int(wait / 0.5) + 1):
            results = read_results(store)
            leased = {lease.public_ip for lease in list_leases(store)[0]}
            newest = report.current_round(results)[0]
            complete = leased <= {r.lease_address for r in newest} and len(newest) >= expect_nodes
            if complete or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    finally:
        store.close()
    if not results:
        raise click.ClickException(
            "no conformance results in this store: run `pycni conformance run` on every node first"
        )
    results, ignored = report.current_round(results)
    rows = report.collect(results, leased)
    if len(results) < expect_nodes:
        names = ", ".join(f"{r.node} ({r.public_ip})" for r in sorted(results, key=lambda r: r.node))
        rows.append(
            Check(
                RENDEZVOUS,
                "-",
                "-",
                FAIL,
                None,
                f"expected results from {expect_nodes} nodes (--expect-nodes {expect_nodes}), but the "
                f"newest run has results from {len(results)}"
                + (f" within {wait:g}s" if wait else "")
                + f": {names}; {expect_nodes - len(results)} "
                f"missing: run `pycni conformance run --expect-nodes {expect_nodes}` on every node, "
                f"each started within the others' --wait",
            )
        )
    if as_json:
        click.echo(report.as_json(rows, results, ignored))
    else:
        click.echo(report.table(rows))
        if ignored:
            click.echo(report.ignored_note(ignored))
    sys.exit(0 if report.passed(rows) else 1)


@conformance.command("peers")
@_store_options
@click.option(
    "--node",
    "node",
    default="",
    metavar="NAME",
    help="Wait (up to --wait) until node NAME (the run's --node-name, or its public IP) takes part: "
    "its probe is published; exit 1 if it has not by then.",
)
@click.option(
    "--since",
    type=float,
    default=None,
    metavar="EPOCH",
    help="With --node: a run of that node that started at or after this time (seconds since the "
    "epoch, as `date +%s` prints it) and has finished already counts as having taken part, and "
    "one that could not attach its probe ends the wait at once with its error.",
)
@click.option(
    "--wait",
    default=0.0,
    show_default=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="How long --node waits.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_store_errors
def peers_cmd(
    store_url: str,
    etcd_prefix: str,
    etcd_cafile: str | None,
    etcd_certfile: str | None,
    etcd_keyfile: str | None,
    timeout: float,
    node: str,
    since: float | None,
    wait: float,
    as_json: bool,
) -> None:
    """List the nodes taking part in a conformance run now, and the leased nodes that are not.

    A run publishes its probe (conformance/<node> in the store) once its probe
    pods are up, keeps it fresh while it waits for the other nodes and checks,
    and removes it at the end. Nodes that hold a subnet lease without one are
    listed as not taking part. With --node, wait until that node takes part:
    how a provisioning script knows that the run it started in the background
    has joined (vagrant/steps/50-conformance.sh, with --since: the last node's
    run may meet everyone, check and finish within a second or two).
    """
    import json
    import time

    from ipam.cluster import list_leases

    from .rendezvous import read_parties, read_results

    def named(entry: Any) -> bool:
        return node in (entry.node, entry.public_ip)

    store = _open(store_url, etcd_prefix, etcd_cafile, etcd_certfile, etcd_keyfile, timeout)
    try:
        deadline = time.monotonic() + wait
        results: list = []
        finished: list = []
        for _ in range(int(wait / 0.5) + 1):
            parties = read_parties(store)
            leases = list_leases(store)[0]
            if not node or any(named(p) for p in parties):
                break
            results = [r for r in read_results(store) if named(r)]
            finished = [r for r in results if since is not None and r.started >= since]
            if finished or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    finally:
        store.close()
    now = time.time()
    published = {p.lease_address for p in parties}
    rows = [
        {
            "node": p.node,
            "publicIP": p.public_ip,
            "subnet": p.subnet,
            "probeIP": p.probe_ip,
            "heartbeatAge": round(max(0.0, now - p.heartbeat), 1),
            "published": True,
        }
        for p in sorted(parties, key=lambda p: p.node)
    ]
    rows += [
        {
            "node": lease.node_name or "-",
            "publicIP": lease.public_ip,
            "subnet": lease.subnet or lease.ipv6_subnet,
            "probeIP": "",
            "heartbeatAge": None,
            "published": False,
        }
        for lease in leases
        if lease.public_ip not in published
    ]
    click.echo(json.dumps({"nodes": rows}, indent=2) if as_json else _peers_table(rows))
    if not node or any(named(p) for p in parties):
        return
    if finished:
        last = max(finished, key=lambda r: r.finished)
        if last.session == "failed":
            raise click.ClickException(
                f"the conformance run of node {node} failed: "
                + (last.checks[0].message if last.checks else "no message")
            )
        _log(f"node {node} took part: its run has finished already ({len(last.peers)} other node(s) checked)")
        return
    hint = ""
    failed = [r for r in results if r.session == "failed"]
    if failed:
        hint = f"; its latest run failed: {failed[0].checks[0].message if failed[0].checks else 'no message'}"
    raise click.ClickException(
        f"node {node} has not published a conformance probe"
        + (f" within {wait:g}s" if wait else "")
        + hint
        + f": is `pycni conformance run --node-name {node}` running there? Its output says why not (on the "
        "Vagrant VMs: journalctl -u 'pycni-conformance-*')"
    )


def _peers_table(rows: list[dict[str, Any]]) -> str:
    cells = [("NODE", "PUBLIC IP", "POD SUBNET", "TAKING PART")]
    for row in rows:
        state = (
            f"yes: probe {row['probeIP']}, heartbeat {row['heartbeatAge']:g}s ago"
            if row["published"]
            else "no: holds a lease but published no probe"
        )
        cells.append((row["node"], row["publicIP"], row["subnet"], state))
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = ["  ".join(value.ljust(widths[i]) for i, value in enumerate(cell[:3])) + "  " + cell[3] for cell in cells]
    taking_part = sum(1 for row in rows if row["published"])
    lines.append(f"\n{taking_part} node(s) taking part, {len(rows) - taking_part} holding a lease without a probe")
    return "\n".join(lines)


@conformance.command("clean")
@_store_options
@click.option(
    "--state-dir",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    metavar="DIR",
    help="Where this node's runs keep their record (the agent's --state-dir).",
)
@click.option("--keep-results", is_flag=True, help="Remove probes and entries but keep the results.")
@_store_errors
def clean_cmd(
    store_url: str,
    etcd_prefix: str,
    etcd_cafile: str | None,
    etcd_certfile: str | None,
    etcd_keyfile: str | None,
    timeout: float,
    state_dir: str,
    keep_results: bool,
) -> None:
    """Remove this node's probe pods and the conformance keys from the store.

    Stops the echo services a run left (by their recorded PIDs), DELs the
    probe pods and deletes their namespaces, then deletes conformance/* in the
    store (conformance/results/* too, unless --keep-results).
    """
    from .model import PREFIX, RESULTS_PREFIX
    from .runner import clean_node

    removed = clean_node(state_dir, _log)
    store = _open(store_url, etcd_prefix, etcd_cafile, etcd_certfile, etcd_keyfile, timeout)
    deleted = 0
    try:
        entries, _ = store.list(PREFIX)
        for entry in entries:
            if keep_results and entry.key.startswith(RESULTS_PREFIX):
                continue
            deleted += int(store.delete(entry.key))
    finally:
        store.close()
    click.echo(f"removed {removed} probe pod(s) on this node and {deleted} key(s) under {PREFIX} in the store")
