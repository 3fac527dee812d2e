"""One node's conformance run, from probe pods to published results, and the clean-up.

    probes    two pods through the CNI network (the probe with a hostPort mapping, a client)
    own       the gateway-mac check (a third pod comes and goes); the store-entries check after the meeting
    echo      the echo service in the probe pod and on the node's own addresses (child processes)
    publish   conformance/<node> with addresses (each pod family the overlay state names) and datapath
              facts; heartbeat while running
    meet      wait (bounded by ``wait``) for every leased node's entry and, with ``expect_nodes`` N,
              until N nodes (this one included) hold a lease and have published; the datapath facts are
              read again whenever the leases change, so nodes that came up later are in them
    check     checks.run_checks against this node and every peer
    results   conformance/results/<node>
    barrier   wait (bounded) for the peers' results, so their checks never hit a removed probe
    tear down echo services stopped by PID, probes DEL'd and their namespaces deleted, entry removed

Everything created is undone on the way out, also on errors and SIGTERM,
unless ``keep_probes`` (then `pycni conformance clean` removes them).

Why ``expect_nodes``: without it a node waits for the nodes that hold a
subnet lease, which is right when every node starts its run at about the same
time. Nodes that come up one after another (Vagrant provisions one VM, then
the next) break that: the first node, alone with its lease, checks itself
and removes its probe before the second node exists, and the second then
waits for a probe that is gone. With ``expect_nodes`` the first node keeps its
probe published and waits (bounded by ``wait``) until the cluster is complete;
if it never is, the run checks the nodes it met and fails with a rendezvous row
that names them and says how many are missing.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable

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
    expect_nodes: int = 0  # wait for at least this many nodes (this one included); 0: the leased ones


def choose_node_id(requested: str, state_name: str, public_ip: str, leases: list) -> str:
    """The node's id in the matrix: --node-name, else its lease's node name when no other node shares it,
    else its public IP (always unique in a cluster)."""
    if requested:
        if not valid_node_id(requested):
            raise ConformanceError(
                f"invalid --node-name {requested!r}: use letters, digits and . _ : - "
                f"(at most 63 characters, not 'results')"
            )
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
        raise ConformanceError(
            f"no overlay state in {opts.state_dir}: is `pycni agent --store ... --state-dir "
            f"{opts.state_dir}` running on this node? (give --state-dir where it writes)"
        )
    # public_ip: where the node checks reach this node (--public-ip); lease_ip: the address its lease holds,
    # by which the other nodes know it (the rendezvous, the datapath facts, the VXLAN lanes).
    public_ip = opts.public_ip or state.public_ip
    ipaddress.ip_address(public_ip)
    lease_ip = state.public_ip
    cfg = read_config(store)
    leases, _ = list_leases(store)
    node_id = choose_node_id(opts.node_name, state.node_name, lease_ip, leases)
    tag = node_tag(node_id, opts.state_dir)
    lifetime = 2 * opts.wait + 300

    with ExitStack() as undo:
        record = Record(
            network=opts.network, netconf_path=opts.netconf_path, cni_path=opts.cni_path, cache_dir=opts.cache_dir
        )
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
            _publish_failure(
                store, node_id, public_ip, started, f"cannot attach a probe pod to network {opts.network!r}: {exc}"
            )
            raise
        families = [ipaddress.ip_network(subnet).version for _net, subnet, _gw in state.pools()]
        addresses = {v: (probe.address_of(v), peer_pod.address_of(v)) for v in families}
        log(
            f"node {node_id} ({public_ip}): probe pod {', '.join(a for a, _ in addresses.values() if a)} (hostPort "
            f"{opts.host_port if mappings else 'n/a'}), client pod {', '.join(c for _, c in addresses.values() if c)} "
            f"on network {opts.network}"
        )
        own_rows = [gateway_mac_check(node_id, state.bridge, pods)]
        own_rows += _missing_families(node_id, opts.network, state, addresses)
        pods_of = _published_pods(state, addresses) or {
            "subnet": state.subnet,
            "probe_ip": probe.address,
            "client_ip": peer_pod.address,
        }
        usable = [v for v in families if all(addresses[v])]
        public_ipv6 = state.public_ipv6 if ipaddress.ip_address(public_ip).version == 4 else ""

        if 6 in usable:
            waited = _settle_ipv6(state.bridge)
            if waited >= 0.1:
                log(
                    f"waited {waited:.1f}s for the IPv6 link-local address of {state.bridge} to finish duplicate "
                    f"address detection (the node resolves no IPv6 neighbour there before)"
                )
        bind_any = "::" if 6 in usable else "0.0.0.0"  # "::" serves both families (echo.bind_sockets)
        echoes: list = []
        undo.callback(lambda: [echo.stop() for echo in echoes])  # registered first: a signal may come any time
        services = [(probe.netns, bind_any, f"{node_id}/probe"), (None, public_ip, f"{node_id}/node")]
        if public_ipv6:
            services.append((None, public_ipv6, f"{node_id}/node"))
        for netns_path, address, label in services:
            echoes.append(start_echo(netns_path, address, opts.echo_port, label, lifetime))
            record.echo_pids.append(echoes[-1].pid)
            record.save(opts.state_dir)

        facts = {
            "datapath": datapath_facts(state.vxlan_device, leases, lease_ip, state.vxlan_device6),
            "firewall": firewall_facts(),
            "vxlanPort": cfg.port if cfg else state.port,
            **masquerade_facts(public_ip),
        }
        me = Party(
            node=node_id,
            public_ip=public_ip,
            vtep_mac=state.vtep_mac,
            vxlan_device=state.vxlan_device,
            mtu=state.mtu,
            echo_port=opts.echo_port,
            host_port=opts.host_port if mappings else None,
            session=secrets.token_hex(6),
            facts=facts,
            public_ipv6=public_ipv6,
            vtep_mac6=state.vtep_mac6 if public_ipv6 else "",
            vxlan_device6=state.vxlan_device6 if public_ipv6 else "",
            lease_ip=lease_ip if lease_ip != public_ip else "",
            **pods_of,
        )
        meeting = Rendezvous(store, me, log)
        undo.callback(meeting.withdraw)
        meeting.clear_previous()
        meeting.publish()
        meeting.start_heartbeat()

        refresh = DatapathRefresh(
            me,
            meeting,
            leases,
            log,
            lambda current: datapath_facts(state.vxlan_device, current, lease_ip, state.vxlan_device6),
        )
        peers = meet(store, me, opts.expect_nodes, opts.wait, log, on_leases=refresh)
        log(
            f"checking against {len(peers.found)} other node(s): "
            + (", ".join(f"{p.node} ({p.public_ip})" for p in peers.found) or "none")
        )
        # Judged after the meeting: the leases of nodes that came up while this one waited are in the store now.
        own_rows.append(
            store_entries_check(
                node_id,
                store,
                cfg,
                lease_ip,
                state.subnet,
                state.vtep_mac,
                ipv6_subnet=state.subnet6,
                public_ipv6=state.public_ipv6,
                vtep_mac6=state.vtep_mac6,
            )
        )
        local = Local(me=me, probe_netns=probe.netns, client_netns=peer_pod.netns, timeout=opts.check_timeout)
        rows = sorted(run_checks(local, peers.found) + own_rows, key=lambda r: r.sort_key)
        for public in peers.missing:
            rows.append(
                Check(
                    RENDEZVOUS,
                    node_id,
                    public,
                    FAIL,
                    None,
                    f"node {public} holds a subnet lease but published no probe within "
                    f"{opts.wait:g}s: run `pycni conformance run` there",
                )
            )
        if peers.shortfall:
            rows.append(Check(RENDEZVOUS, node_id, "-", FAIL, None, peers.shortfall_message(opts.wait)))
            log(f"error: {peers.shortfall_message(opts.wait)}")
        results = NodeResults(
            node=node_id,
            public_ip=public_ip,
            session=me.session,
            started=started,
            finished=time.time(),
            checks=rows,
            peers={p.node: p.session for p in peers.found},
            lease_ip=me.lease_ip,
        )
        meeting.publish_results(results)
        late = meeting.wait_for_results(peers.found, opts.wait)
        if late:
            log(f"warning: no results from {', '.join(late)} within {opts.wait:g}s; removing the probes anyway")
        if opts.keep_probes:
            log("probes kept (--keep-probes): remove them with `pycni conformance clean`")
        return results, rows


MEET_SLICE = 1.0  # the longest the meeting sleeps between two looks at the store
FACTS_RECHECK = 5.0  # how often incomplete datapath facts are read again while waiting


@dataclass
class Met:
    """Who came to the meeting: the peers to check against, and who did not come."""

    me: Party
    found: list[Party] = field(default_factory=list)  # the other nodes' published probes
    missing: list[str] = field(default_factory=list)  # public IPs of leased nodes that published no probe
    expect_nodes: int = 0  # --expect-nodes (0: the leased nodes are the cluster)
    leased: set[str] = field(default_factory=set)  # public IPs holding a lease, this node's included

    @property
    def present(self) -> list[str]:
        """ "node (public IP)" of every node that holds a lease and published its probe, this one first."""
        others = [p for p in self.found if p.lease_address in self.leased]
        return [f"{self.me.node} ({self.me.public_ip})"] + [f"{p.node} ({p.public_ip})" for p in others]

    @property
    def shortfall(self) -> int:
        """How many of the expected nodes did not come (0 without --expect-nodes, or when they all did)."""
        return max(0, self.expect_nodes - len(self.present))

    def shortfall_message(self, waited: float) -> str:
        present = self.present
        unleased = self.shortfall - len(self.missing)
        why = []
        if self.missing:
            why.append(
                f"{len(self.missing)} of them hold a subnet lease but published no probe ({', '.join(self.missing)})"
            )
        if unleased > 0:
            why.append(f"{unleased} hold no subnet lease (is their agent running against this store?)")
        return (
            f"expected {self.expect_nodes} nodes (--expect-nodes {self.expect_nodes}), but within "
            f"{waited:g}s only {len(present)} held a subnet lease and published a probe: "
            f"{', '.join(present)}; {self.shortfall} missing"
            + (f": {'; '.join(why)}" if why else "")
            + ". Start `pycni conformance run` with the same --expect-nodes on the missing nodes within "
            "--wait of this one, or give --expect-nodes the number of nodes the cluster really has"
        )


def meet(
    store,
    me: Party,
    expect_nodes: int,
    wait: float,
    log: Callable[[str], None],
    on_leases: Callable[[list], None] | None = None,
) -> Met:
    """Wait (at most ``wait`` seconds) until every node holding a lease has published its probe and, with
    ``expect_nodes``, until at least that many nodes (this one included) hold a lease and have published.

    Returns early when both hold; on time-out, the peers that came, the leased nodes that did not, and the
    shortfall. ``on_leases`` gets the current leases on every look (the datapath facts' refresh). Says what
    it waits for whenever that changes.
    """
    from ipam.cluster import StoreError, list_leases

    from .model import PREFIX
    from .rendezvous import read_parties

    deadline = time.monotonic() + wait
    said = ""
    met = Met(me=me, expect_nodes=expect_nodes)
    for _ in range(int(wait / 0.05) + 2):
        leases, _ = list_leases(store)
        if on_leases is not None:
            on_leases(leases)
        met.leased = {lease.public_ip for lease in leases} | {me.lease_address}
        parties = {p.lease_address: p for p in read_parties(store) if p.lease_address != me.lease_address}
        met.missing = sorted(ip for ip in met.leased if ip != me.lease_address and ip not in parties)
        met.found = sorted((p for ip, p in parties.items() if ip in met.leased), key=lambda p: p.node)
        if not met.missing and not met.shortfall:
            met.found = sorted(parties.values(), key=lambda p: p.node)  # as ever: every fresh probe
            return met
        left = deadline - time.monotonic()
        if left <= 0:
            return met
        status = _waiting_for(met)
        if status != said:
            said = status
            log(
                f"{status} (waiting up to {left:.0f}s more)"
                if left >= 10
                else f"{status} (waiting up to {left:.1f}s more)"
            )
        try:
            _, revision = store.list(PREFIX)
            store.wait(PREFIX, revision, min(MEET_SLICE, left))
        except StoreError:
            time.sleep(min(MEET_SLICE, max(left, 0.05)))
    return met


def _waiting_for(met: Met) -> str:
    parts = []
    if met.missing:
        parts.append(f"{len(met.missing)} node(s) holding a lease to publish their probes: {', '.join(met.missing)}")
    unleased = met.shortfall - len(met.missing)
    if unleased > 0:
        parts.append(
            f"{unleased} more node(s) to come up (--expect-nodes {met.expect_nodes}; here so far: "
            f"{', '.join(met.present)})"
        )
    return "waiting for " + "; and for ".join(parts)


class DatapathRefresh:
    """Keeps this node's published datapath facts in step with the leases while it waits for the others.

    The facts are read when the run starts; a node that joins later (its lease comes after) would be
    missing from them, and a failed check's message would then blame a missing FDB entry that is there.
    They are read again when the leases change, and every FACTS_RECHECK seconds while an entry is still
    missing (the agent programs a new node's entries a moment after its lease appears).
    """

    def __init__(
        self, me: Party, meeting, leases: list, log: Callable[[str], None], read: Callable[[list], dict[str, Any]]
    ) -> None:
        self.me, self.meeting, self.log, self.read = me, meeting, log, read
        self.leases_seen = _lease_key(leases)
        self.read_at = time.monotonic()

    def __call__(self, leases: list) -> None:
        key = _lease_key(leases)
        if key == self.leases_seen and (
            _complete(self.me.facts.get("datapath")) or time.monotonic() - self.read_at < FACTS_RECHECK
        ):
            return
        self.leases_seen, self.read_at = key, time.monotonic()
        try:
            datapath = self.read(leases)
        except (OSError, ValueError) as exc:
            self.log(f"warning: cannot read this node's overlay entries again: {exc}")
            return
        if datapath != self.me.facts.get("datapath"):
            self.me.facts = {**self.me.facts, "datapath": datapath}  # the heartbeat publishes self.me too
            self.meeting.publish()


def _lease_key(leases: list) -> tuple:
    return tuple(
        sorted(
            (
                lease.public_ip,
                lease.subnet,
                lease.vtep_mac,
                getattr(lease, "ipv6_subnet", ""),
                getattr(lease, "public_ipv6", ""),
                getattr(lease, "vtep_mac6", ""),
            )
            for lease in leases
        )
    )


def _complete(datapath: Any) -> bool:
    """True when the facts name no missing FDB, neighbour or route entry."""
    if isinstance(datapath, dict):
        return all(_complete(value) for value in datapath.values())
    return datapath is not False


IPV6_SETTLE_LIMIT = 3.0


def _settle_ipv6(bridge: str, limit: float = IPV6_SETTLE_LIMIT) -> float:
    """Wait (bounded) until the bridge holds no tentative IPv6 address; returns the seconds waited.

    A bridge's link-local address goes through duplicate address detection when its first port comes up
    (the first pod of a node: here, perhaps, the probe); until it is done the node sends no neighbour
    solicitation on it, so IPv6 packets to its pods wait a second or two. Checks measure the steady state.
    """
    from pycni.inspect import readers

    start = time.monotonic()
    for _ in range(int(limit / 0.1) + 1):
        entries = readers.ip_json("-6", "addr", "show", "dev", bridge, "tentative")
        if not any(a.get("local") for e in entries for a in e.get("addr_info", [])):
            break
        if time.monotonic() - start >= limit:
            break
        time.sleep(0.1)
    return time.monotonic() - start


def _published_pods(state, addresses: dict[int, tuple[str, str]]) -> dict[str, str]:
    """The Party's pod fields: the subnet and probe/client addresses of the first family both probe pods have
    an address of (IPv4; IPv6 in an IPv6-only cluster), and the IPv6 ones as the second family of a dual-stack
    node; {} when no family is complete."""
    subnets = {ipaddress.ip_network(subnet).version: subnet for _net, subnet, _gw in state.pools()}
    usable = [v for v in sorted(addresses) if all(addresses[v])]
    if not usable:
        return {}
    first = usable[0]
    out = {"subnet": subnets[first], "probe_ip": addresses[first][0], "client_ip": addresses[first][1]}
    if first == 4 and 6 in usable:
        out.update(subnet6=subnets[6], probe_ip6=addresses[6][0], client_ip6=addresses[6][1])
    return out


def _missing_families(node_id: str, network: str, state, addresses: dict[int, tuple[str, str]]) -> list[Check]:
    """A failing probe-pod row for every pod family the node's overlay state names that a probe pod has no
    address of (the network's IPAM does not hand out that family): nothing is checked in it from here."""
    subnets = {ipaddress.ip_network(subnet).version: subnet for _net, subnet, _gw in state.pools()}
    rows = []
    for version, (probe_ip, client_ip) in addresses.items():
        if probe_ip and client_ip:
            continue
        subnet = subnets[version]
        rows.append(
            Check(
                PROBE_POD,
                node_id,
                node_id,
                FAIL,
                None,
                f"the probe pods attached to network {network!r} got no IPv{version} address, though "
                f"this node leases the IPv{version} pod subnet {subnet} (does the network's IPAM give "
                f"out every family the overlay state names?); no IPv{version} checks from or to this "
                f"node",
            )
        )
    return rows


def _publish_failure(store, node_id: str, public_ip: str, started: float, message: str) -> None:
    from ipam.cluster import StoreError

    results = NodeResults(
        node=node_id,
        public_ip=public_ip,
        session="failed",
        started=started,
        finished=time.time(),
        checks=[Check(PROBE_POD, node_id, node_id, FAIL, None, message)],
    )
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
    from pycni import procs

    from .probe import Record, delete_probe, is_echo_process

    record = Record.load(state_dir)
    if record is None:
        return 0
    for pid in record.echo_pids:
        if is_echo_process(pid):
            procs.stop_pid(pid, is_echo_process)
            log(f"stopped echo service (pid {pid})")
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
                current = runtime.cached_netlist(
                    record.network, RuntimeConf(probe.container_id, probe.netns, probe.ifname)
                )
            except Exception:
                current = None
        problems += delete_probe(runtime, current, probe)
        removed += 1
        log(f"removed probe {probe.container_id} ({probe.netns})")
    for problem in problems:
        log(f"warning: {problem}")
    Record.remove(state_dir)
    return removed
