"""One node's conformance run, from probe pods to published results, and the clean-up.

    probes    two pods through the CNI network (the probe with a hostPort mapping, a client)
    own       the gateway-mac check (a third pod comes and goes) and the store-entries check
    echo      the echo service in the probe pod and on the node's own address (child processes)
    publish   conformance/<node> with addresses and datapath facts; heartbeat while running
    meet      wait (bounded) for every leased node's entry
    check     checks.run_checks against this node and every peer
    results   conformance/results/<node>
    barrier   wait (bounded) for the peers' results, so their checks never hit a removed probe
    tear down echo services stopped by PID, probes DEL'd and their namespaces deleted, entry removed

Everything created is undone on the way out, also on errors and SIGTERM,
unless ``keep_probes`` (then `pycni conformance clean` removes them).
"""
from __future__ import annotations

import ipaddress
import secrets
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

from .model import FAIL, PROBE_POD, RENDEZVOUS, Check, NodeResults, Party, results_key, valid_node_id

DEFAULT_ECHO_PORT = 7080
DEFAULT_HOST_PORT = 17080
DEFAULT_WAIT = 300.0
DEFAULT_CHECK_TIMEOUT = 2.0


class ConformanceError(Exception):
    """The run could not start or finish; the message says why and what to do."""


@dataclass
class RunOptions:
    network: str
    state_dir: str
    netconf_path: str = ""
    cni_path: str = ""
    cache_dir: str = "/var/lib/cni"
    node_name: str = ""
    public_ip: str = ""
    echo_port: int = DEFAULT_ECHO_PORT
    host_port: int = DEFAULT_HOST_PORT
    wait: float = DEFAULT_WAIT
    check_timeout: float = DEFAULT_CHECK_TIMEOUT
    keep_probes: bool = False


def choose_node_id(requested: str, state_name: str, public_ip: str, leases: list) -> str:
    """The node's id in the matrix: --node-name, else its lease's node name when no other node shares it,
    else its public IP (always unique in a cluster)."""
    if requested:
        if not valid_node_id(requested):
            raise ConformanceError(f"invalid --node-name {requested!r}: use letters, digits and . _ : - "
                                   f"(at most 63 characters, not 'results')")
        return requested
    names = [lease.node_name for lease in leases if lease.public_ip != public_ip]
    if state_name and valid_node_id(state_name) and state_name not in names:
        return state_name
    return public_ip


def run_node(store, opts: RunOptions, log: Callable[[str], None]) -> tuple[NodeResults, list[Check]]:
    """One node's whole run; returns its results (also written to the store)."""
    from cni_plugins.shared.overlaystate import OverlayStateError, read_state
    from ipam.cluster import list_leases, read_config

    from .checks import Local, run_checks
    from .facts import datapath_facts, firewall_facts, masquerade_facts
    from .nodechecks import gateway_mac_check, store_entries_check
    from .probe import ProbePods, Record, has_port_mappings, node_tag, start_echo
    from .rendezvous import Rendezvous

    started = time.time()
    try:
        state = read_state(opts.state_dir)
    except OverlayStateError as exc:
        raise ConformanceError(str(exc)) from None
    if state is None:
        raise ConformanceError(f"no overlay state in {opts.state_dir}: is `pycni agent --store ... --state-dir "
                               f"{opts.state_dir}` running on this node? (give --state-dir where it writes)")
    public_ip = opts.public_ip or state.public_ip
    ipaddress.ip_address(public_ip)
    cfg = read_config(store)
    leases, _ = list_leases(store)
    node_id = choose_node_id(opts.node_name, state.node_name, public_ip, leases)
    tag = node_tag(node_id, opts.state_dir)
    lifetime = 2 * opts.wait + 300

    with ExitStack() as undo:
        record = Record(network=opts.network, netconf_path=opts.netconf_path, cni_path=opts.cni_path,
                        cache_dir=opts.cache_dir)
        try:
            pods = ProbePods(record, opts.state_dir, tag)
            mappings = None
            if has_port_mappings(pods.netlist):
                mappings = [{"hostPort": opts.host_port, "containerPort": opts.echo_port, "protocol": "tcp"}]
            if not opts.keep_probes:
                undo.callback(_remove_probes, pods, opts.state_dir, log)
            probe = pods.add("probe", mappings)
            peer_pod = pods.add("client")
        except Exception as exc:
            # The report shows why this node has no rows (the run itself ends with the error).
            _publish_failure(store, node_id, public_ip, started,
                             f"cannot attach a probe pod to network {opts.network!r}: {exc}")
            raise
        log(f"node {node_id} ({public_ip}): probe pod {probe.address} (hostPort "
            f"{opts.host_port if mappings else 'n/a'}), client pod {peer_pod.address} on network {opts.network}")
        own_rows = [gateway_mac_check(node_id, state.bridge, pods),
                    store_entries_check(node_id, store, cfg, public_ip, state.subnet, state.vtep_mac)]

        bind_any = "0.0.0.0" if ipaddress.ip_address(probe.address).version == 4 else "::"
        echoes: list = []
        undo.callback(lambda: [echo.stop() for echo in echoes])   # registered first: a signal may come any time
        for netns_path, address, label in ((probe.netns, bind_any, f"{node_id}/probe"),
                                           (None, public_ip, f"{node_id}/node")):
            echoes.append(start_echo(netns_path, address, opts.echo_port, label, lifetime))
            record.echo_pids.append(echoes[-1].pid)
            record.save(opts.state_dir)

        facts = {"datapath": datapath_facts(state.vxlan_device, leases, public_ip),
                 "firewall": firewall_facts(), "vxlanPort": cfg.port if cfg else state.port,
                 **masquerade_facts(public_ip)}
        me = Party(node=node_id, public_ip=public_ip, subnet=state.subnet, vtep_mac=state.vtep_mac,
                   vxlan_device=state.vxlan_device, mtu=state.mtu, probe_ip=probe.address,
                   client_ip=peer_pod.address, echo_port=opts.echo_port,
                   host_port=opts.host_port if mappings else None, session=secrets.token_hex(6), facts=facts)
        meeting = Rendezvous(store, me, log)
        undo.callback(meeting.withdraw)
        meeting.clear_previous()
        meeting.publish()
        meeting.start_heartbeat()

        peers = meeting.wait_for_peers(opts.wait)
        log(f"checking against {len(peers.found)} other node(s): "
            + (", ".join(f"{p.node} ({p.public_ip})" for p in peers.found) or "none"))
        local = Local(me=me, probe_netns=probe.netns, client_netns=peer_pod.netns, timeout=opts.check_timeout)
        rows = sorted(run_checks(local, peers.found) + own_rows, key=lambda r: r.sort_key)
        for public in peers.missing:
            rows.append(Check(RENDEZVOUS, node_id, public, FAIL, None,
                              f"node {public} holds a subnet lease but published no probe within "
                              f"{opts.wait:g}s: run `pycni conformance run` there"))
        results = NodeResults(node=node_id, public_ip=public_ip, session=me.session, started=started,
                              finished=time.time(), checks=rows, peers={p.node: p.session for p in peers.found})
        meeting.publish_results(results)
        late = meeting.wait_for_results(peers.found, opts.wait)
        if late:
            log(f"warning: no results from {', '.join(late)} within {opts.wait:g}s; removing the probes anyway")
        if opts.keep_probes:
            log("probes kept (--keep-probes): remove them with `pycni conformance clean`")
        return results, rows


def _publish_failure(store, node_id: str, public_ip: str, started: float, message: str) -> None:
    from ipam.cluster import StoreError

    results = NodeResults(node=node_id, public_ip=public_ip, session="failed", started=started,
                          finished=time.time(), checks=[Check(PROBE_POD, node_id, node_id, FAIL, None, message)])
    try:
        store.put(results_key(node_id), results.to_json())
    except StoreError:
        pass


def _remove_probes(pods, state_dir: str, log: Callable[[str], None]) -> None:
    from .probe import Record

    problems = pods.remove_all()
    for problem in problems:
        log(f"warning: {problem}")
    if not problems:
        Record.remove(state_dir)


def clean_node(state_dir: str, log: Callable[[str], None]) -> int:
    """Remove what a run on this node left: echo services (by recorded PID), probe pods, the record."""
    import os
    import signal

    from .probe import Record, delete_probe, is_echo_process

    record = Record.load(state_dir)
    if record is None:
        return 0
    for pid in record.echo_pids:
        if is_echo_process(pid):
            try:
                os.kill(pid, signal.SIGTERM)
                log(f"stopped echo service (pid {pid})")
            except ProcessLookupError:
                pass
    removed = 0
    runtime = netlist = None
    try:
        from conf import NetworkNotFoundError, load_conflist
        from pycni.runtime import CNIRuntime

        runtime = CNIRuntime(record.cni_path or None, record.cache_dir or None)
        try:
            netlist = load_conflist(record.network, record.netconf_path or None)
        except NetworkNotFoundError:
            netlist = None
    except Exception as exc:  # the namespaces still go
        log(f"warning: cannot load network {record.network!r} to DEL the probes: {exc}")
    problems = []
    for probe in record.probes:
        from pycni.runtime import RuntimeConf

        current = netlist
        if current is None and runtime is not None:
            try:
                current = runtime.cached_netlist(record.network, RuntimeConf(probe.container_id, probe.netns,
                                                                             probe.ifname))
            except Exception:
                current = None
        problems += delete_probe(runtime, current, probe)
        removed += 1
        log(f"removed probe {probe.container_id} ({probe.netns})")
    for problem in problems:
        log(f"warning: {problem}")
    Record.remove(state_dir)
    return removed
