"""The overlay's node agent: lease a pod subnet, build the node's bridge and VXLAN device,
and keep FDB, neighbour and route entries for every other node in step with the cluster store.

flannel's VXLAN backend, in one object::

    node = OverlayNode(OverlayOptions(store_url="etcd://10.0.0.1:2379", public_ip="10.0.0.5"))
    node.start()                 # lease, devices, state file; raises OverlayError
    stop = threading.Event()
    threading.Thread(target=node.run, args=(stop,)).start()
    ...
    stop.set(); node.close(leave=False)   # restart keeps every entry, so traffic keeps flowing

On start the node leases a subnet (``lease.LeaseKeeper``: the same one again
after a restart; never another one while pods run on the old one), creates
the bridge (the subnet's first address as gateway, and a MAC of its own, set
at creation, so the pods' gateway never changes when pods come and go) and
the VXLAN device (the subnet's network address as a /32, learning off, a MAC
derived from the node's identity so it never changes), turns forwarding on,
writes ``<state-dir>/overlay.json`` for the vxlan CNI plugin, installs the
``inet pycni_overlay`` nftables table and, on hosts whose FORWARD policy
drops, accept rules for the cluster network (``forward``).

``run()`` lists the leases (every entry validated; a bad one is skipped with
one warning), programs the entries (adds missing ones, removes stale ones,
repairs ones changed by hand), then waits on the store for the next change,
bounded by the reconcile interval. Every reconcile also checks each attribute
the node owns (the VXLAN device's VNI, port, local address, underlay link,
learning flag, MAC and MTU; the bridge's MAC and address) and repairs drift.
The underlay link is looked up afresh each time: when it is deleted the
VXLAN device goes with it, and both come back as soon as the link (with the
public IP) reappears. A netlink monitor triggers a reconcile as soon as one of
the agent's entries or devices changes, so repairs take milliseconds. While
the store is unreachable the entries stay as they are (existing traffic keeps
flowing) and the loop backs off (0.2 s doubling to 5 s), then lists again.

Everything acts in the network namespace of the thread that called start():
the netlink sockets are opened there, and other threads (run, the monitor)
switch into it before touching the kernel or running nft.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import socket
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator

import netns
from cni_plugins.kernel import ip as kip
from cni_plugins.kernel import nlbatch
from cni_plugins.kernel import vxlan as kvx
from cni_plugins.kernel.names import stable_bridge_mac
from cni_plugins.shared import overlaystate
from cni_plugins.spec.errors import CNIError
from ipam.cluster import (
    CONFIG_KEY,
    SUBNETS_PREFIX,
    ClusterConfig,
    Compacted,
    Entry,
    LeaseExhausted,
    NodeConflict,
    NodeLease,
    RejectedLease,
    StoreError,
    StoreUnavailable,
    TLSFiles,
    check_entries,
    open_store,
    read_config,
    release_lease,
    scan_leases,
)
from pycni.overlay import firewall, forward, subnetenv
from pycni.overlay import lanes as lanes_mod
from pycni.overlay.entries import Entries
from pycni.overlay.lanes import MAIN, V6, Lane
from pycni.overlay.lease import LOST, VALID, Identity, LeaseKeeper
from pycni.overlay.monitor import Change, KernelMonitor
from pycni.overlay.options import OverlayOptions
from pycni.overlay.reconcile import Delta, Own

WAIT_SLICE = 1.0  # longest single watch.next(): bounds how long stop/close take
RELIST_JITTER = 0.2  # the safety re-list comes every relist_interval +- 20 %
BACKOFF_MIN = 0.2
BACKOFF_MAX = 5.0
CLOSE_TIMEOUT = 15.0
START_RETRY_MIN = 1.0  # start-up without a store: the first retry after 1 s, doubling ...
START_RETRY_MAX = 60.0  # ... up to a minute between attempts (each one logged)
STORE_DOWN_REMINDER = 60.0  # while the store stays away with the same error, warn again this often
IFNAMSIZ = 15


class OverlayError(Exception):
    """The overlay could not be set up or torn down; the message says what and why."""


class StoreNotReady(OverlayError):
    """The cluster store did not answer at start, or holds no cluster configuration yet: worth retrying."""


@dataclass
class _Status:
    last_reconcile: float | None = None  # wall-clock time of the last completed reconcile
    store_reachable: bool = False
    store_error: str = ""
    store_down_since: float = 0.0  # monotonic time the current outage began (0: none yet)
    store_warned_at: float = 0.0  # monotonic time of the last "unavailable" warning
    last_error: str = ""
    reconciles: int = 0  # full reconciles (start, re-lists, periodic checks, lost notifications)
    events: int = 0  # store events applied one lease at a time
    changes: int = 0  # kernel entries written since start
    repairs: int = 0  # times a device attribute had drifted and was set again
    entry_repairs: int = 0  # entries set right after a netlink notification showed them changed
    revision: int = 0
    watch: str = "not started"  # streaming, reconnecting, re-listing
    relists: int = 0
    store_errors: int = 0


def vtep_mac_seed(public_ip: str, vni: int, node_name: str) -> str:
    return f"pycni-vtep|{ipaddress.ip_address(public_ip)}|{vni}|{node_name}"


def leave_cluster(
    store_url: str,
    public_ip: str,
    prefix: str = "/pycni",
    tls: TLSFiles | None = None,
    timeout: float = 5.0,
    auth: Any = None,
) -> bool:
    """Release every lease held by ``public_ip``: the other nodes drop their entries for it.

    Returns False if it held none. It may run anywhere that reaches the store;
    run on the node itself (``public_ip`` is one of this machine's addresses) it
    also removes the node's FORWARD accept rules for the cluster network. Stop
    the node's agent first, or it takes its lease (and its rules) again.
    """
    try:
        store = open_store(store_url, prefix=prefix, tls=tls, auth=auth, timeout=timeout)
    except StoreError as exc:
        raise OverlayError(f"cannot open the cluster store {store_url}: {exc}") from None
    try:
        released = release_lease(store, public_ip)
        networks = [pool.network for pool in read_config(store).pools]
    except StoreError as exc:
        raise OverlayError(f"cannot release the lease of {public_ip}: {exc}") from None
    except ValueError as exc:
        raise OverlayError(str(exc)) from None
    finally:
        store.close()
    if _is_local_address(public_ip):
        try:
            forward.remove_forward_accept(networks)
        except CNIError as exc:
            raise OverlayError(f"released the lease, but cannot remove the FORWARD accept rules: {exc}") from None
    return released


def _is_local_address(address: str) -> bool:
    with kip.open_netlink() as ipr:
        return kvx.underlay_link_for(ipr, address) is not None


class OverlayNode:
    """One node of the VXLAN overlay; see the module docstring."""

    def __init__(self, opts: OverlayOptions, log: logging.Logger | None = None) -> None:
        self.opts = opts
        self.log = log or logging.getLogger("pycni.overlay")
        self._lock = threading.RLock()  # kernel state, netlink socket
        self._status = _Status()
        self._closed = threading.Event()
        self._run_done = threading.Event()
        self._run_done.set()
        self._started = False
        self._start_retries = 0  # start_retrying's attempts so far that found the store not ready
        self._store: Any = None
        self._ipr: Any = None
        self._home_fd = -1
        self._home_ino = 0
        self._cfg: ClusterConfig | None = None
        self._keeper: LeaseKeeper | None = None
        self._view: dict[str, NodeLease] = {}  # accepted leases by key, kept in step by the watch (and while the
        self._rejected: dict[str, RejectedLease] = {}  # store is down); keys that are no acceptable lease
        self._direct_changed = False  # an underlay's subnets changed: re-judge the remotes in full
        self._lanes: list[Lane] = []  # the VXLAN devices: MAIN (and V6 on a dual underlay)
        self._batch: nlbatch.BatchSocket | None = None
        self._firewall_members: set[str] = set()  # what the nft member sets hold, as last written
        self._monitor: KernelMonitor | None = None
        self._node_name = ""
        self._bridge_mac = ""  # what the bridge keeps: set at creation, or adopted once
        self._mtu = 0  # pod MTU: the smallest of the lanes'
        self._bridge_index = 0
        self._warned_skips: set[str] = set()
        self._subnet_env = ""  # the subnet.env text last written

    # ---- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Lease a subnet and build the node's side of the overlay; OverlayError on failure."""
        if self._started:
            raise OverlayError("this overlay node was started already")
        try:
            public = ipaddress.ip_address(self.opts.public_ip)
        except ValueError:
            raise OverlayError(f"invalid public IP {self.opts.public_ip!r}: give the node's underlay address") from None
        self.opts.public_ip = str(public)
        if self.opts.public_ipv6:
            try:
                public6 = ipaddress.ip_address(self.opts.public_ipv6)
            except ValueError:
                public6 = None
            if public6 is None or public6.version != 6:
                raise OverlayError(
                    f"invalid --public-ipv6 {self.opts.public_ipv6!r}: give the node's IPv6 underlay address"
                )
            self.opts.public_ipv6 = str(public6)
        ttl = self.opts.lease_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 3:
            raise OverlayError(f"invalid lease TTL {ttl!r}: give whole seconds >= 3")
        self._home_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._home_ino = os.fstat(self._home_fd).st_ino
        try:
            self._start()
        except OverlayError:
            self._release_resources()
            raise
        except Exception as exc:
            self._release_resources()
            detail = kip.describe(exc) if kip.netlink_errno(exc) is not None else f"{type(exc).__name__}: {exc}"
            raise OverlayError(f"cannot start the overlay node: {detail}") from exc
        except BaseException:
            self._release_resources()
            raise
        self._started = True

    def start_retrying(self, stop: threading.Event) -> bool:
        """start(), again and again while the store is not ready (back-off from 1 s doubling to 60 s, each retry
        logged with the reason), until it starts (True) or ``stop`` is set (False). Other errors raise."""
        delay, attempt = START_RETRY_MIN, 0
        while not stop.is_set():
            try:
                self._start_retries = attempt
                self.start()
                return True
            except StoreNotReady as exc:
                attempt += 1
                st = self._status
                if not st.store_down_since:
                    st.store_down_since = time.monotonic()
                st.store_reachable, st.store_error = False, str(exc)
                wait = delay * random.uniform(0.9, 1.1)
                self.log.warning("%s; retry %d in %.0f s", exc, attempt, wait)
                stop.wait(wait)
                delay = min(delay * 2, START_RETRY_MAX)
        return False

    def _start(self) -> None:
        opts = self.opts
        try:
            self._store = open_store(
                opts.store_url, prefix=opts.etcd_prefix, tls=opts.tls, auth=opts.auth, timeout=opts.store_timeout
            )
            if self._store.get(CONFIG_KEY) is None:
                raise StoreNotReady(
                    f"the cluster store {opts.store_url} holds no cluster configuration yet: run "
                    f"`pycni cluster init --store URL --network CIDR` once for the cluster"
                )
            cfg = read_config(self._store)
        except StoreUnavailable as exc:
            raise StoreNotReady(f"the cluster store {opts.store_url} does not answer: {exc}") from None
        except StoreError as exc:
            raise OverlayError(f"cannot read the cluster configuration from {opts.store_url}: {exc}") from None
        if self._start_retries:
            # Said here, before any thread can report the node healthy: the log tells the story in order.
            waited = time.monotonic() - self._status.store_down_since
            self.log.info(
                "the cluster store answered after %d retries (%.1f s): the overlay is starting",
                self._start_retries,
                waited,
            )
        self._store_up(quiet=True)
        self._cfg = cfg
        self._node_name = opts.node_name or socket.gethostname()
        self._lanes = self._plan_lanes(cfg)
        for what, name in [("VXLAN device", lane.name) for lane in self._lanes] + [("bridge", opts.bridge)]:
            if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
                raise OverlayError(f"invalid {what} name {name!r}: at most {IFNAMSIZ} characters, no '/' or spaces")
        self._ipr = kip.open_netlink()
        self._batch = nlbatch.BatchSocket()
        for lane in self._lanes:
            underlay = lanes_mod.find_underlay(self._ipr, lane)
            if underlay is None:
                if lane.underlay_device:
                    raise OverlayError(f"underlay device {lane.underlay_device!r} does not exist")
                flag = "--public-ip" if lane.kind == MAIN else "--public-ipv6"
                raise OverlayError(
                    f"no interface holds the public IP {lane.public_ip}: give the node's underlay "
                    f"address ({flag}) or name the device (--underlay-device)"
                )
            if lane.underlay_device:
                holder = kvx.underlay_link_for(self._ipr, lane.public_ip)
                if holder is None or holder.index != underlay.index:
                    self.log.warning(
                        "the public IP %s is not an address of the underlay device %s", lane.public_ip, underlay.name
                    )
            lane.underlay = underlay
            lane.mtu = self._lane_mtu(lane, underlay)
        self._mtu = min(lane.mtu for lane in self._lanes)

        main = self._lanes[0]
        v6 = self._lane(V6)
        me = Identity(
            opts.public_ip,
            main.vtep_mac,
            self._node_name,
            public_ipv6=v6.public_ip if v6 else "",
            vtep_mac6=v6.vtep_mac if v6 else "",
        )
        keeper = LeaseKeeper(self._store, cfg, me, opts.lease_ttl, self.log)
        try:
            keeper.take(self._previous_lease(cfg), has_pods=self._bridge_has_pods())
        except NodeConflict as exc:
            raise OverlayError(f"refusing to start: {exc}") from None
        except LeaseExhausted as exc:
            raise OverlayError(f"no subnet left for this node: {exc}") from None
        except StoreUnavailable as exc:
            raise StoreNotReady(
                f"the cluster store {opts.store_url} stopped answering while leasing a subnet "
                f"for {opts.public_ip}: {exc}"
            ) from None
        except (StoreError, ValueError) as exc:
            raise OverlayError(f"cannot lease a subnet for {opts.public_ip}: {exc}") from None
        self._keeper = keeper
        if keeper.state == VALID:
            self.log.info(
                "leased %s for %s (%s), VTEP MAC %s; %s",
                keeper.subnet,
                opts.public_ip,
                self._node_name,
                ", ".join(f"{lane.name} {lane.vtep_mac}" for lane in self._lanes),
                cfg.describe(),
            )
        try:  # know the other members before the firewall is (re)built, so their VXLAN is never dropped
            self._scan()
        except StoreError as exc:
            self._store_down(exc)
        try:
            with self._lock:
                self._configure_node()
        except (CNIError, OSError, ValueError, overlaystate.OverlayStateError) as exc:
            raise OverlayError(f"cannot set up the overlay devices: {exc}") from None
        except Exception as exc:
            if kip.netlink_errno(exc) is None:
                raise
            raise OverlayError(f"cannot set up the overlay devices: {kip.describe(exc)}") from None
        # A first reconcile, so a started node already reaches the others; a failure is left to run().
        try:
            self._list_and_reconcile()
        except StoreError as exc:
            self._store_down(exc)
        except Exception as exc:
            self._status.last_error = f"{type(exc).__name__}: {exc}"
            self.log.warning("the first reconcile failed (run() retries): %s", exc)
        self._monitor = KernelMonitor(
            self._watched_indexes, self._kernel_changed, lambda msg: self.log.warning("%s", msg)
        )
        self._monitor.start()

    def _plan_lanes(self, cfg: ClusterConfig) -> list[Lane]:
        """MAIN on --public-ip; V6 on --public-ipv6 when the cluster has IPv6 pods and MAIN's underlay is IPv4."""
        opts = self.opts
        families = [pool.version for pool in cfg.pools]
        main_ip = ipaddress.ip_address(opts.public_ip)
        v6_lane = bool(opts.public_ipv6) and 6 in families and main_ip.version == 4
        if opts.public_ipv6 and not v6_lane:
            self.log.warning(
                "--public-ipv6 %s is not used: %s",
                opts.public_ipv6,
                "the cluster has no IPv6 pod network"
                if 6 not in families
                else "--public-ip is IPv6 already, so every pod family runs over it",
            )
        main = Lane(
            MAIN,
            opts.vxlan_device or f"pycni.{cfg.vni}",
            opts.public_ip,
            kvx.stable_vtep_mac(vtep_mac_seed(opts.public_ip, cfg.vni, self._node_name)),
            underlay_device=opts.underlay_device,
            families=[v for v in families if not (v == 6 and v6_lane)],
        )
        lanes = [main]
        if v6_lane:
            lanes.append(
                Lane(
                    V6,
                    f"pycni6.{cfg.vni}",
                    opts.public_ipv6,
                    kvx.stable_vtep_mac(vtep_mac_seed(opts.public_ipv6, cfg.vni, self._node_name)),
                    families=[6],
                )
            )
        return lanes

    def _lane(self, kind: str) -> Lane | None:
        return next((lane for lane in self._lanes if lane.kind == kind), None)

    def _lane_mtu(self, lane: Lane, underlay: kip.Link) -> int:
        try:
            return lanes_mod.lane_mtu(lane, underlay)
        except ValueError as exc:
            raise OverlayError(f"underlay {underlay.name}: {exc}") from None

    def _previous_lease(self, cfg: ClusterConfig) -> NodeLease | None:
        """The lease this node held in its previous run (from its state file), if it was in this cluster."""
        try:
            previous = overlaystate.read_state(self.opts.state_dir)
        except overlaystate.OverlayStateError as exc:
            self.log.warning("ignoring the previous overlay state: %s", exc)
            return None
        if previous is None:
            return None
        pools = {net: subnet for net, subnet, _gw in previous.pools()}
        if set(pools) != {pool.network for pool in cfg.pools}:
            self.log.info(
                "the previous overlay state is for the network %s; not reusing its subnet", " and ".join(pools)
            )
            return None
        by_version = {ipaddress.ip_network(subnet).version: subnet for subnet in pools.values()}
        return NodeLease(
            subnet=by_version.get(4, ""),
            public_ip=previous.public_ip,
            vtep_mac=previous.vtep_mac,
            node_name=previous.node_name,
            ipv6_subnet=by_version.get(6, ""),
            public_ipv6=previous.public_ipv6,
            vtep_mac6=previous.vtep_mac6,
        )

    def run(self, stop: threading.Event) -> None:
        """Watch the store and reconcile until ``stop`` is set (or close() is called)."""
        if not self._started:
            raise OverlayError("start() the overlay node before run()")
        self._run_done.clear()
        try:
            with self._at_home():
                self._run(stop)
        finally:
            self._run_done.set()

    def _run(self, stop: threading.Event) -> None:
        """One long-lived watch on the store; a full re-list only at start, after a compaction or when the watch
        cannot be resumed, and every relist_interval (jittered) as a safety net. In steady state the store sees
        the lease keep-alive and nothing else; the kernel is checked locally every reconcile_interval."""

        def stopping() -> bool:
            return stop.is_set() or self._closed.is_set()

        assert self._keeper is not None
        backoff = BACKOFF_MIN
        watch = None
        now = time.monotonic()
        next_check = now + self.opts.reconcile_interval
        next_renew = now + self.opts.lease_ttl / 3
        next_relist = now + self._relist_delay()
        listed = self._status.last_reconcile is not None and self._status.store_reachable
        try:
            while not stopping():
                try:
                    self._check_lapsed()
                    if watch is None:
                        if not listed:
                            self._status.watch = "re-listing"
                            self._list_and_reconcile()
                            self._status.relists += 1
                            next_relist = time.monotonic() + self._relist_delay()
                            next_check = time.monotonic() + self.opts.reconcile_interval
                        watch = self._store.watch(SUBNETS_PREFIX, self._status.revision)
                        listed = False
                        self._status.watch = "streaming"
                        backoff = BACKOFF_MIN
                    now = time.monotonic()
                    if now >= next_relist:
                        watch.close()
                        watch = None
                        continue
                    if now >= next_renew:
                        self._renew(quick=True)
                        next_renew = time.monotonic() + self.opts.lease_ttl / 3
                    if now >= next_check:
                        self._reconcile_kernel_safely()
                        next_check = time.monotonic() + self.opts.reconcile_interval
                    timeout = max(0.0, min(WAIT_SLICE, next_relist - now, next_renew - now, next_check - now))
                    events = watch.next(timeout)
                    self._store_up()
                    self._status.watch = "streaming"
                    if events:
                        self._apply_events(events)
                    self._status.revision = max(self._status.revision, watch.revision)
                except Compacted as exc:
                    self.log.info("the store compacted the watched revision (%s); listing again", exc)
                    watch = _closed(watch)
                except StoreUnavailable as exc:
                    # The watch resumes by itself from its revision (bounded, jittered back-off): keep it.
                    self._store_down(exc)
                    self._status.watch = "reconnecting" if watch is not None else "re-listing"
                    if time.monotonic() >= next_check:  # keep the kernel as the last view says meanwhile
                        self._reconcile_kernel_safely()
                        next_check = time.monotonic() + self.opts.reconcile_interval
                    stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                except StoreError as exc:
                    self._store_down(exc)
                    watch = _closed(watch)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                except Exception as exc:  # never let the loop die: log, back off, list again
                    self._status.last_error = f"{type(exc).__name__}: {exc}"
                    self.log.exception("overlay reconcile failed")
                    watch = _closed(watch)
                    stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            _closed(watch)

    def _relist_delay(self) -> float:
        return self.opts.relist_interval * random.uniform(1 - RELIST_JITTER, 1 + RELIST_JITTER)

    def close(self, leave: bool = False) -> None:
        """Stop watching. Without ``leave`` every device and entry stays (a restart keeps traffic
        flowing); with ``leave`` the lease is released and the node's devices, entries, firewall
        rules and state file are removed. Raises OverlayError if leaving failed part-way."""
        self._closed.set()
        if not self._run_done.wait(CLOSE_TIMEOUT):
            self.log.warning("the reconcile loop did not stop within %s s", CLOSE_TIMEOUT)
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        problems: list[str] = []
        if leave and self._started:
            with self._at_home():
                problems = self._leave()
        self._release_resources()
        self._started = False
        if problems:
            raise OverlayError("leaving the cluster was incomplete: " + "; ".join(problems))

    def _leave(self) -> list[str]:
        problems = []
        keeper = self._keeper
        try:
            if keeper is not None and keeper.state != LOST and release_lease(self._store, self.opts.public_ip):
                self.log.info("released the lease of %s", keeper.subnet)
        except StoreError as exc:
            problems.append(f"cannot release the lease: {exc}")
        with self._lock:
            for lane in self._lanes:
                if lane.entries is not None and self._batch is not None:
                    failures = lane.entries.withdraw_direct(self._batch, _underlay_index(lane)).failures
                    problems += [f"cannot delete a direct route: {failure}" for failure in failures]
            for name in [lane.name for lane in self._lanes] + [self.opts.bridge]:
                try:
                    kip.delete_link_by_name(self._ipr, name)
                except Exception as exc:
                    problems.append(f"cannot delete {name}: {exc}")
            try:
                firewall.remove_firewall()
            except CNIError as exc:
                problems.append(f"cannot delete the nftables table: {exc}")
            if self._cfg is not None:
                try:
                    forward.remove_forward_accept(self._networks())
                except CNIError as exc:
                    problems.append(f"cannot remove the FORWARD accept rules: {exc}")
            overlaystate.remove_state(self.opts.state_dir)
            try:
                subnetenv.remove(self._subnet_file)
            except OSError as exc:
                problems.append(f"cannot remove {self._subnet_file}: {exc}")
            self._subnet_env = ""
        for lane in self._lanes:
            lane.entries = None
        return problems

    def _release_resources(self) -> None:
        for closer in (self._store, self._ipr, self._batch):
            if closer is not None:
                try:
                    closer.close()
                except Exception:
                    pass
        self._store = self._ipr = self._batch = None
        if self._home_fd >= 0:
            os.close(self._home_fd)
            self._home_fd = -1

    # ---- status ---------------------------------------------------------------------

    def ready(self) -> bool:
        """Started, the node's entries were programmed at least once, and not closed."""
        return self._started and not self._closed.is_set() and self._status.last_reconcile is not None

    def status(self) -> dict[str, Any]:
        keeper, cfg, st = self._keeper, self._cfg, self._status
        with self._lock:
            wanted = {lane.name: lane.entries.table.wanted() for lane in self._lanes if lane.entries is not None}
        remotes = [r for w in wanted.values() for r in w.remotes]
        skipped = sorted({reason for w in wanted.values() for reason in w.skipped})
        main = self._lanes[0] if self._lanes else None
        return {
            "ready": self.ready(),
            "nodeName": self._node_name,
            "publicIP": self.opts.public_ip,
            "network": cfg.network if cfg else None,
            "ipv6Network": (cfg.ipv6_network or None) if cfg else None,
            "publicIPv6": self.opts.public_ipv6 or None,
            "vni": cfg.vni if cfg else None,
            "port": cfg.port if cfg else None,
            "subnet": keeper.subnet if keeper else None,
            "subnets": keeper.subnets if keeper else [],
            "lease": keeper.state if keeper else None,
            "leaseExpires": keeper.valid_until if keeper else None,
            "leaseProblem": (keeper.problem or None) if keeper else None,
            "vtepMAC": main.vtep_mac if main else None,
            "vxlanDevice": main.name if main else None,
            "lanes": [
                {
                    "kind": lane.kind,
                    "device": lane.name,
                    "publicIP": lane.public_ip,
                    "vtepMAC": lane.vtep_mac,
                    "mtu": lane.mtu,
                    "families": lane.families,
                    "underlay": None if lane.missing or lane.underlay is None else lane.underlay.name,
                }
                for lane in self._lanes
            ],
            "bridge": self.opts.bridge,
            "bridgeMAC": self._bridge_mac or None,
            "underlay": None if main is None or main.missing or main.underlay is None else main.underlay.name,
            "ipMasq": self.opts.ip_masq,
            "mtu": self._mtu or None,
            "remotes": len({r.node_name or r.public_ip for r in remotes}),  # nodes (a remote per family and lane)
            "directRouting": cfg.direct_routing if cfg else None,
            "remoteNodes": [
                {
                    "subnet": r.subnet,
                    "publicIP": r.public_ip,
                    "vtepMAC": r.vtep_mac,
                    "nodeName": r.node_name,
                    "via": r.direct or "vxlan",
                }
                for r in remotes
            ],
            "skipped": skipped,
            "rejectedEntries": [
                {"key": r.key, "revision": r.mod_revision, "reason": r.reason}
                for r in sorted(self._rejected.values(), key=lambda r: r.key)
            ],
            "lastReconcile": st.last_reconcile,
            "reconciles": st.reconciles,
            "events": st.events,
            "changes": st.changes,
            "repairs": st.repairs,
            "entryRepairs": st.entry_repairs,
            "storeRevision": st.revision,
            "storeReachable": st.store_reachable,
            "storeError": st.store_error or None,
            "store": {
                "watch": st.watch,
                "revision": st.revision,
                "relists": st.relists,
                "errors": st.store_errors,
                "requests": self._store_stats(),
            },
            "lastError": st.last_error or None,
        }

    def _store_stats(self) -> dict[str, Any]:
        store = self._store
        try:
            return store.stats() if store is not None else {}
        except Exception as exc:  # status must answer whatever the store does
            return {"error": str(exc)}

    # ---- node devices ---------------------------------------------------------------------

    def _configure_node(self) -> None:
        """Bridge, VXLAN devices, addresses, forwarding, state file and firewall for the current lease."""
        assert self._cfg is not None and self._keeper is not None
        cfg, ipr = self._cfg, self._ipr
        subnets = self._keeper.subnets
        for lane in self._lanes:
            underlay = lanes_mod.find_underlay(ipr, lane)
            if underlay is None:
                raise OverlayError(f"the underlay link of {lane.name} (holding {lane.public_ip}) is gone")
            mtu = self._lane_mtu(lane, underlay)
            if lane.mtu and mtu != lane.mtu:
                self.log.warning(
                    "the underlay %s now has MTU %d: %s's MTU is %d (was %d); pods that exist keep "
                    "their MTU until they are re-created",
                    underlay.name,
                    underlay.mtu,
                    lane.name,
                    mtu,
                    lane.mtu,
                )
            lane.underlay, lane.mtu = underlay, mtu
            lane.direct_nets = self._direct_nets(underlay)
        self._mtu = min(lane.mtu for lane in self._lanes)

        bridge = self._ensure_bridge()
        for subnet in subnets:
            net = ipaddress.ip_network(subnet)
            self._sync_address(bridge.index, f"{net.network_address + 1}/{net.prefixlen}")
        self._bridge_index = bridge.index

        for lane in self._lanes:
            assert lane.underlay is not None
            device = lanes_mod.ensure(ipr, lane, cfg.vni, cfg.port, lane.underlay, lane.mtu)
            for address in lanes_mod.vtep_addresses(lane, subnets):
                self._sync_address(device.index, address)
            if not self.opts.tx_checksum_offload:
                from cni_plugins.kernel.ethtool import set_tx_checksum

                set_tx_checksum(lane.name, False)
        kip.enable_forwarding({pool.version for pool in cfg.pools})
        members = self._members()
        firewall.ensure_firewall(self._firewall_spec(), members, rebuild=True)
        self._firewall_members = members
        self._ensure_forward()
        self._write_state()  # last: the vxlan plugin may use the node now

    def _ensure_bridge(self) -> kip.Link:
        """The node bridge with its own MAC: set at creation, or (an existing bridge) adopted once and pinned."""
        ipr, name = self._ipr, self.opts.bridge
        # The pods' gateway MAC: per node name and bridge, the same across restarts and reboots.
        derived = stable_bridge_mac(name, node_id=self._node_name)
        existed = kip.find_link(ipr, name) is not None
        bridge = kip.ensure_bridge(ipr, name, mtu=self._mtu, mac=self._bridge_mac or derived, dad=False)
        if bridge.mtu != self._mtu and not self._has_ports(bridge.index):
            ipr.link("set", index=bridge.index, mtu=self._mtu)
        adopting = existed and not self._bridge_mac
        if adopting:
            if bridge.mac == derived or not self._has_ports(bridge.index):
                self._bridge_mac = derived
            else:
                # Pods resolved the gateway to its current MAC: keep that one.
                self._bridge_mac = bridge.mac
                self.log.info(
                    "adopted the existing bridge %s with its MAC %s (pods are attached to it)", name, bridge.mac
                )
        elif not self._bridge_mac:
            self._bridge_mac = derived
        if adopting or bridge.mac != self._bridge_mac:
            # Setting a bridge's address, even to the value it has, pins it: it stops following its ports.
            kip.set_mac(ipr, bridge.index, self._bridge_mac)
            bridge = kip.get_link(ipr, name, "bridge")
        return bridge

    def _bridge_has_pods(self) -> bool:
        bridge = kip.find_link(self._ipr, self.opts.bridge)
        return bridge is not None and self._has_ports(bridge.index)

    def _has_ports(self, bridge_index: int) -> bool:
        return any(msg.get_attr("IFLA_MASTER") == bridge_index for msg in self._ipr.get_links())

    def _sync_address(self, index: int, wanted: str) -> None:
        """Give the link ``wanted``; drop its other addresses inside that family's cluster network (an old
        lease's). IPv6 addresses skip duplicate address detection: they are this node's by lease."""
        assert self._cfg is not None
        target = ipaddress.ip_interface(wanted)
        pool = self._cfg.pool(target.version)
        network = pool.ip_network if pool is not None else target.network
        present = [address for address, _flags in kip.addresses(self._ipr, index, target.version)]
        for address in present:
            if address != target and address.ip in network:
                kip.del_address(self._ipr, index, str(address))
        if target not in present:
            kip.add_address(self._ipr, index, wanted, nodad=True)

    def _members(self) -> set[str]:
        """This node's underlay addresses and every remote's the view makes programmable, on every lane."""
        members = {lane.public_ip for lane in self._lanes}
        for lane in self._lanes:
            entries = Entries(self._own(lane))
            entries.rebuild(self._own(lane), self._view)
            members |= entries.table.members
        return members

    def _networks(self) -> list[str]:
        assert self._cfg is not None
        return [pool.network for pool in self._cfg.pools]

    def _firewall_spec(self) -> firewall.FirewallSpec:
        assert self._cfg is not None
        return firewall.FirewallSpec(
            self._cfg.network, self._cfg.port, masquerade=self.opts.ip_masq, network6=self._cfg.ipv6_network
        )

    def _ensure_forward(self) -> None:
        for action in forward.ensure_forward_accept(self._networks()):
            self.log.info("forwarding: %s", action)

    def _write_state(self) -> None:
        assert self._cfg is not None and self._keeper is not None
        cfg, keeper = self._cfg, self._keeper
        pools = []  # (network, subnet, gateway), IPv4 first
        for subnet in keeper.subnets:
            net = ipaddress.ip_network(subnet)
            pool = cfg.pool(net.version)
            assert pool is not None
            pools.append((pool.network, subnet, str(net.network_address + 1)))
        network, subnet, gateway = pools[0]
        network6, subnet6, gateway6 = pools[1] if len(pools) > 1 else ("", "", "")
        main, v6 = self._lanes[0], self._lane(V6)
        state = overlaystate.OverlayState(
            network=network,
            subnet=subnet,
            gateway=gateway,
            mtu=self._mtu,
            bridge=self.opts.bridge,
            vxlan_device=main.name,
            vni=cfg.vni,
            port=cfg.port,
            public_ip=self.opts.public_ip,
            vtep_mac=main.vtep_mac,
            node_name=self._node_name,
            lease_expires=round(keeper.valid_until, 3),
            lease_lost=keeper.problem if keeper.state == LOST else "",
            network6=network6,
            subnet6=subnet6,
            gateway6=gateway6,
            vxlan_device6=v6.name if v6 else "",
            public_ipv6=v6.public_ip if v6 else "",
            vtep_mac6=v6.vtep_mac if v6 else "",
        )
        overlaystate.write_state(self.opts.state_dir, state)
        text = subnetenv.render([(net, sub) for net, sub, _gw in pools], self._mtu, self.opts.ip_masq)
        if text != self._subnet_env:
            try:
                subnetenv.write(self._subnet_file, text)
                self._subnet_env = text
            except OSError as exc:  # the overlay works without it: say so, try again at the next write
                self._status.last_error = f"cannot write {self._subnet_file}: {exc.strerror or exc}"
                self.log.warning(
                    "cannot write flannel's subnet file %s: %s (check --subnet-file)",
                    self._subnet_file,
                    exc.strerror or exc,
                )

    @property
    def _subnet_file(self) -> str:
        return self.opts.subnet_file or subnetenv.default_path(self.opts.state_dir)

    # ---- the lease ----------------------------------------------------------------------------

    def _renew(self, quick: bool = False) -> None:
        """Renew (or, lapsed or lost, win back) the lease; reconfigure when the subnet changed.

        ``quick``: the periodic keep-alive, one store request while the watch shows the lease unchanged.
        """
        assert self._keeper is not None
        if quick and self._keeper.keep_alive():
            with self._lock, self._at_home():
                self._write_state()
            return
        with self._at_home():
            has_pods = self._bridge_has_pods()
        changed = self._keeper.renew(has_pods)
        with self._lock, self._at_home():
            if changed:
                self._configure_node()
                self._reconcile_kernel()
            else:
                self._write_state()

    def _check_lapsed(self) -> None:
        assert self._keeper is not None
        if self._keeper.check_lapsed():
            with self._lock, self._at_home():
                self._write_state()

    # ---- reconcile ----------------------------------------------------------------------------

    def _scan(self) -> None:
        """List the leases: the view (accepted, by key) and the keys that are no acceptable lease."""
        assert self._cfg is not None
        scan = scan_leases(self._store, self._cfg)
        with self._lock:
            self._view = {lease.key: lease for lease in scan.leases}
            rejected = {r.key: r for r in scan.rejected}
            for entry in rejected.values():
                self._warn_rejected(entry)
            self._rejected = rejected
            self._status.revision = scan.revision

    def _warn_rejected(self, entry: RejectedLease) -> None:
        known = self._rejected.get(entry.key)
        if known is None or known.mod_revision != entry.mod_revision:
            self.log.warning(
                "ignoring the store entry %s (revision %d): %s", entry.key, entry.mod_revision, entry.reason
            )

    def _store_up(self, quiet: bool = False) -> None:
        st = self._status
        if not st.store_reachable:
            if st.store_error and not quiet:
                self.log.info(
                    "the cluster store is reachable again (after %.1f s)", time.monotonic() - st.store_down_since
                )
            st.store_down_since = 0.0
            st.store_reachable = True
            st.store_error = ""

    def _own_lease_gone(self) -> bool:
        keeper = self._keeper
        assert keeper is not None
        own = keeper.lease
        if keeper.state == LOST:
            return True
        if own is None:
            return False
        held = self._view.get(own.key)
        return held is None or held.public_ip != own.public_ip

    def _list_and_reconcile(self) -> None:
        began = time.monotonic()
        self._scan()
        listed = time.monotonic()
        self._store_up()
        if self._own_lease_gone():
            if self._keeper is not None and self._keeper.state != LOST:
                self.log.warning("this node's lease of %s is gone from the store; taking it again", self._keeper.subnet)
            self._renew()
            self._scan()
        self._reconcile_kernel()
        self.log.debug(
            "revision %d: listed in %.1f ms, reconciled in %.1f ms",
            self._status.revision,
            (listed - began) * 1000,
            (time.monotonic() - listed) * 1000,
        )

    def _apply_events(self, events: list[Any]) -> None:
        """Store events, one lease at a time: O(1) kernel work per changed node (the incremental reconcile)."""
        assert self._cfg is not None and self._keeper is not None
        own_touched = False
        with self._lock, self._at_home():
            if any(lane.entries is None for lane in self._lanes):
                return
            own_key = self._keeper.lease.key if self._keeper.lease is not None else ""
            merged = {lane.name: Delta() for lane in self._lanes}
            for event in events:
                if not event.key.startswith(SUBNETS_PREFIX):
                    continue
                lease = None
                if event.kind == "put":
                    entry = Entry(event.key, event.value, event.mod_revision, event.version)
                    scan = check_entries([entry], event.mod_revision, self._cfg)
                    if scan.rejected:
                        self._warn_rejected(scan.rejected[0])
                        self._rejected[event.key] = scan.rejected[0]
                    else:
                        lease = scan.leases[0]
                        self._rejected.pop(event.key, None)
                else:
                    self._rejected.pop(event.key, None)
                if lease is None:
                    self._view.pop(event.key, None)
                else:
                    self._view[event.key] = lease
                if event.key == own_key:
                    own_touched = True
                for lane in self._lanes:
                    assert lane.entries is not None
                    delta = lane.entries.update(event.key, lease)
                    merged[lane.name].remove += delta.remove
                    merged[lane.name].add += delta.add
                self._status.events += 1
            self._write_deltas(merged)
        if own_touched and self._own_lease_gone():
            if self._keeper.state != LOST:
                self.log.warning("this node's lease of %s changed in the store; taking it again", self._keeper.subnet)
            self._renew()

    def _write_deltas(self, deltas: dict[str, Delta]) -> None:
        """Kernel entries (per lane) and firewall members for one batch of changed leases."""
        if not any(deltas.values()) or self._batch is None:
            return
        for lane in self._lanes:
            delta = deltas.get(lane.name)
            if not delta or lane.entries is None:
                continue
            outcome = lane.entries.apply(self._batch, lane.index, delta, _underlay_index(lane))
            self._status.changes += outcome.done
            self.log.info(
                "store change on %s: +%d -%d remote subnets (%s)",
                lane.name,
                len(delta.add),
                len(delta.remove),
                ", ".join(sorted({r.subnet for r in delta.add + delta.remove}))[:200],
            )
            if outcome.failures:
                self._status.last_error = "; ".join(outcome.failures)
                self.log.warning(
                    "%d entries could not be written: %s", len(outcome.failures), "; ".join(outcome.failures)
                )
        self._sync_members()
        self._warn_skips()

    def _warn_skips(self, skipped: list[str] | None = None) -> None:
        """One warning per lease that is read but not programmed, when it starts being skipped."""
        if skipped is None:
            skipped = sorted(
                {r for lane in self._lanes if lane.entries is not None for r in lane.entries.table.skipped()}
            )
        for reason in skipped:
            if reason not in self._warned_skips:
                self.log.warning("ignoring lease %s", reason)
        self._warned_skips = set(skipped)

    def _programmed_members(self) -> set[str]:
        members = {lane.public_ip for lane in self._lanes}
        for lane in self._lanes:
            if lane.entries is not None:
                members |= lane.entries.table.members
        return members

    def _sync_members(self) -> None:
        """The nft member sets follow the programmed remotes: only the difference is written."""
        wanted = self._programmed_members()
        if wanted == self._firewall_members:
            return
        try:
            firewall.update_members(add=wanted - self._firewall_members, remove=self._firewall_members - wanted)
        except CNIError:  # the table changed under us: rebuild it whole
            firewall.ensure_firewall(self._firewall_spec(), wanted)
        self._firewall_members = wanted

    def _reconcile_kernel_safely(self, with_firewall: bool = True) -> None:
        try:
            self._reconcile_kernel(with_firewall)
        except Exception as exc:
            self._status.last_error = f"{type(exc).__name__}: {exc}"
            self.log.warning("reconciling the kernel failed: %s", exc)

    def _own(self, lane: Lane) -> Own:
        """This node as ``lane`` judges other leases."""
        assert self._cfg is not None and self._keeper is not None
        return Own(
            ipaddress.ip_address(lane.public_ip),
            tuple(ipaddress.ip_network(s) for s in self._keeper.subnets),
            tuple(pool.ip_network for pool in self._cfg.pools),
            lane.vtep_mac,
            lane.kind,
            v6_lane=self._lane(V6) is not None,
            node_ips=frozenset(ipaddress.ip_address(other.public_ip) for other in self._lanes),
            direct_nets=lane.direct_nets,
        )

    def _direct_nets(self, underlay: kip.Link) -> tuple:
        """With DirectRouting: the underlay link's subnets; their nodes get plain routes instead of VXLAN."""
        assert self._cfg is not None
        return lanes_mod.connected_networks(self._ipr, underlay) if self._cfg.direct_routing else ()

    def _reconcile_kernel(self, with_firewall: bool = True) -> None:
        """The full, level-based reconcile: devices, every remote's entries (and the firewall) as the view says."""
        with self._lock, self._at_home():
            if self._ipr is None or self._cfg is None or self._keeper is None or self._batch is None:
                return
            if not self._ensure_devices():
                return
            skipped: set[str] = set()
            self._direct_changed = False
            for lane in self._lanes:
                if lane.entries is None:
                    lane.entries = Entries(self._own(lane))
                lane.entries.rebuild(self._own(lane), self._view)
                # The underlay link too, whether or not direct routing is on: routes it left there go.
                todo, outcome = lane.entries.reconcile(self._ipr, self._batch, lane.index, _underlay_index(lane))
                self._status.changes += outcome.done
                wanted = lane.entries.table.wanted()
                skipped |= set(wanted.skipped)
                if todo:
                    self.log.info(
                        "reconcile %s: %s (%d remote subnets)", lane.name, todo.summary(), len(wanted.remotes)
                    )
                if outcome.failures:
                    self._status.last_error = "; ".join(outcome.failures)
                    self.log.warning(
                        "reconcile left %d entries wrong: %s", len(outcome.failures), "; ".join(outcome.failures)
                    )
            self._warn_skips(sorted(skipped))
            if with_firewall:
                members = self._programmed_members()
                firewall.ensure_firewall(self._firewall_spec(), members)
                self._firewall_members = members
                self._ensure_forward()
            self._status.reconciles += 1
            self._status.last_reconcile = time.time()

    def _ensure_devices(self) -> bool:
        """Repair every attribute of the node's devices that drifted; False while an underlay link is gone."""
        assert self._cfg is not None and self._keeper is not None
        ready = True
        underlays: dict[str, kip.Link] = {}
        for lane in self._lanes:
            underlay = lanes_mod.find_underlay(self._ipr, lane)
            if underlay is None:
                if not lane.missing:
                    self.log.warning(
                        "the underlay link holding %s is gone: %s is down on this node until it is back",
                        lane.underlay_device or lane.public_ip,
                        lane.name,
                    )
                    lane.missing = True
                ready = False
                continue
            if lane.missing:
                self.log.info("the underlay link %s of %s is back", underlay.name, lane.name)
                lane.missing = False
            underlays[lane.name] = underlay
        if not ready:
            return False
        for lane in self._lanes:
            nets = self._direct_nets(underlays[lane.name])
            if nets != lane.direct_nets:
                # The underlay's subnets changed: which nodes are neighbours on the wire changed with them.
                self.log.info(
                    "the underlay %s is on %s now: re-judging which nodes are routed directly",
                    underlays[lane.name].name,
                    ", ".join(map(str, nets)) or "no subnet",
                )
                lane.direct_nets = nets
                self._direct_changed = True
        drift = []
        subnets = self._keeper.subnets
        for lane in self._lanes:
            underlay = underlays[lane.name]
            drift += lanes_mod.drift(
                self._ipr,
                lane,
                self._cfg.vni,
                self._cfg.port,
                underlay,
                self._lane_mtu(lane, underlay),
                lanes_mod.vtep_addresses(lane, subnets),
            )
        drift += self._bridge_drift(subnets)
        if not self.opts.tx_checksum_offload:
            drift += self._tx_checksum_drift()
        if drift:
            self.log.warning("the overlay devices changed under us (%s); setting them up again", "; ".join(drift))
            self._status.repairs += 1
            self._configure_node()
        return True

    def _tx_checksum_drift(self) -> list[str]:
        """The VXLAN devices whose transmit checksum offload is on again (--disable-tx-checksum-offload)."""
        from cni_plugins.kernel.ethtool import EthtoolError, get_tx_checksum

        out = []
        for lane in self._lanes:
            try:
                if get_tx_checksum(lane.name):
                    out.append(f"{lane.name} has transmit checksum offload on")
            except EthtoolError:
                pass  # a missing device is drift of its own (lanes_mod.drift)
        return out

    def _bridge_drift(self, subnets: list[str]) -> list[str]:
        """What differs between the bridge and what the node owns (empty: nothing)."""
        bridge = kip.find_link(self._ipr, self.opts.bridge)
        if bridge is None:
            return [f"{self.opts.bridge} is missing"]
        out = []
        if not bridge.is_up:
            out.append(f"{self.opts.bridge} is down")
        if bridge.mac != self._bridge_mac:
            out.append(f"{self.opts.bridge} MAC is {bridge.mac}, not {self._bridge_mac}")
        for subnet in subnets:
            net = ipaddress.ip_network(subnet)
            gateway = ipaddress.ip_interface(f"{net.network_address + 1}/{net.prefixlen}")
            if not any(a == gateway for a, _f in kip.addresses(self._ipr, bridge.index, gateway.version)):
                out.append(f"{self.opts.bridge} lacks its address {gateway}")
        return out

    def _kernel_changed(self, changes: list[Change] | None) -> None:
        """From the netlink monitor: the changes to our devices and entries (None: some were lost)."""
        if self._closed.is_set():
            return
        if changes is None:
            self.log.debug("kernel notifications were lost: checking everything")
            self._reconcile_kernel_safely(with_firewall=False)
            return
        try:
            with self._lock, self._at_home():
                if any(c.kind in ("link", "addr") for c in changes):
                    # A device changed: check the devices (cheap); the entries only if a device was set up again.
                    repairs, was_missing = self._status.repairs, any(lane.missing for lane in self._lanes)
                    if not self._ensure_devices():
                        return
                    if self._status.repairs != repairs or was_missing or self._direct_changed:
                        self._reconcile_kernel(with_firewall=False)
                        return
                if self._batch is None:
                    return
                for lane in self._lanes:
                    if lane.entries is None:
                        continue
                    outcome = lane.entries.repair(self._batch, lane.index, changes, _underlay_index(lane))
                    if outcome.done:
                        self._status.entry_repairs += outcome.done
                        self._status.changes += outcome.done
                        self.log.info("set %d entries on %s right that were changed under us", outcome.done, lane.name)
                    if outcome.failures:
                        self._status.last_error = "; ".join(outcome.failures)
                        self.log.warning("could not set entries right: %s", "; ".join(outcome.failures))
        except Exception as exc:
            self._status.last_error = f"{type(exc).__name__}: {exc}"
            self.log.warning("repairing entries failed: %s", exc)

    def _watched_indexes(self) -> dict[str, set[int]] | None:
        """What the monitor reacts to; None (everything) while an underlay link is gone."""
        if any(lane.missing for lane in self._lanes):
            return None
        devices = {lane.index for lane in self._lanes}
        underlays = {lane.underlay.index for lane in self._lanes if lane.underlay is not None}
        links = devices | {self._bridge_index} | underlays
        routes = devices | underlays if self._cfg is not None and self._cfg.direct_routing else devices
        return {"link": links, "addr": links, "neigh": devices, "route": routes}

    def _store_down(self, exc: BaseException) -> None:
        message, now = str(exc), time.monotonic()
        st = self._status
        if st.store_reachable or not st.store_down_since:
            st.store_down_since = now
        if st.store_reachable or st.store_error != message:
            self.log.warning("the cluster store is unavailable (%s); keeping the current entries", message)
            st.store_warned_at = now
        elif now - st.store_warned_at >= STORE_DOWN_REMINDER:
            self.log.warning(
                "the cluster store is still unavailable after %.0f s (%s); keeping the current entries",
                now - st.store_down_since,
                message,
            )
            st.store_warned_at = now
        st.store_reachable = False
        st.store_error = message
        st.store_errors += 1

    @contextmanager
    def _at_home(self) -> Iterator[None]:
        """Run the body in the network namespace start() was called in."""
        if self._home_fd < 0 or os.stat("/proc/thread-self/ns/net").st_ino == self._home_ino:
            with nullcontext():
                yield
            return
        with netns.enter(f"/proc/self/fd/{self._home_fd}"):
            yield


def _underlay_index(lane: Lane) -> int:
    """Where the lane's direct routes live (0 while its underlay link is gone)."""
    return lane.underlay.index if lane.underlay is not None and not lane.missing else 0


def _closed(watch: Any) -> None:
    """Close a watch (if any); None, to assign in one line."""
    if watch is not None:
        try:
            watch.close()
        except Exception:
            pass
    return None


__all__ = ["OverlayError", "OverlayNode", "OverlayOptions", "leave_cluster", "vtep_mac_seed"]
