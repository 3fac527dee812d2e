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
from ipam.cluster import (SUBNETS_PREFIX, ClusterConfig, Compacted, Entry, LeaseExhausted, NodeConflict, NodeLease,
                          RejectedLease, StoreError, StoreUnavailable, TLSFiles, check_entries, open_store,
                          read_config, release_lease, scan_leases)
from pycni.overlay import firewall, forward
from pycni.overlay.entries import Entries
from pycni.overlay.lease import LOST, VALID, Identity, LeaseKeeper
from pycni.overlay.monitor import Change, KernelMonitor
from pycni.overlay.options import OverlayOptions
from pycni.overlay.reconcile import Delta, Own

WAIT_SLICE = 1.0        # longest single watch.next(): bounds how long stop/close take
RELIST_JITTER = 0.2     # the safety re-list comes every relist_interval +- 20 %
BACKOFF_MIN = 0.2
BACKOFF_MAX = 5.0
CLOSE_TIMEOUT = 15.0
STORE_DOWN_REMINDER = 60.0  # while the store stays away with the same error, warn again this often
IFNAMSIZ = 15


class OverlayError(Exception):
    """The overlay could not be set up or torn down; the message says what and why."""


@dataclass
class _Status:
    last_reconcile: float | None = None     # wall-clock time of the last completed reconcile
    store_reachable: bool = False
    store_error: str = ""
    store_down_since: float = 0.0           # monotonic time the current outage began (0: none yet)
    store_warned_at: float = 0.0            # monotonic time of the last "unavailable" warning
    last_error: str = ""
    reconciles: int = 0                     # full reconciles (start, re-lists, periodic checks, lost notifications)
    events: int = 0                         # store events applied one lease at a time
    changes: int = 0                        # kernel entries written since start
    repairs: int = 0                        # times a device attribute had drifted and was set again
    entry_repairs: int = 0                  # entries set right after a netlink notification showed them changed
    revision: int = 0
    watch: str = "not started"              # streaming, reconnecting, re-listing
    relists: int = 0
    store_errors: int = 0


def vtep_mac_seed(public_ip: str, vni: int, node_name: str) -> str:
    return f"pycni-vtep|{ipaddress.ip_address(public_ip)}|{vni}|{node_name}"


def leave_cluster(store_url: str, public_ip: str, prefix: str = "/pycni", tls: TLSFiles | None = None,
                  timeout: float = 5.0) -> bool:
    """Release every lease held by ``public_ip``: the other nodes drop their entries for it.

    Returns False if it held none. It may run anywhere that reaches the store;
    run on the node itself (``public_ip`` is one of this machine's addresses) it
    also removes the node's FORWARD accept rules for the cluster network. Stop
    the node's agent first, or it takes its lease (and its rules) again.
    """
    try:
        store = open_store(store_url, prefix=prefix, tls=tls, timeout=timeout)
    except StoreError as exc:
        raise OverlayError(f"cannot open the cluster store {store_url}: {exc}") from None
    try:
        released = release_lease(store, public_ip)
        network = read_config(store).network
    except StoreError as exc:
        raise OverlayError(f"cannot release the lease of {public_ip}: {exc}") from None
    except ValueError as exc:
        raise OverlayError(str(exc)) from None
    finally:
        store.close()
    if _is_local_address(public_ip):
        try:
            forward.remove_forward_accept([network])
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
        self._lock = threading.RLock()          # kernel state, netlink socket
        self._status = _Status()
        self._closed = threading.Event()
        self._run_done = threading.Event()
        self._run_done.set()
        self._started = False
        self._store: Any = None
        self._ipr: Any = None
        self._home_fd = -1
        self._home_ino = 0
        self._cfg: ClusterConfig | None = None
        self._keeper: LeaseKeeper | None = None
        self._view: dict[str, NodeLease] = {}   # accepted leases by key, kept in step by the watch (and while the
        self._rejected: dict[str, RejectedLease] = {}   # store is down); keys that are no acceptable lease
        self._entries: Entries | None = None
        self._batch: nlbatch.BatchSocket | None = None
        self._firewall_members: set[str] = set()   # what the nft member sets hold, as last written
        self._monitor: KernelMonitor | None = None
        self._node_name = ""
        self._vtep_mac = ""
        self._bridge_mac = ""                   # what the bridge keeps: set at creation, or adopted once
        self._mtu = 0
        self._vxlan_name = ""
        self._vxlan_index = 0
        self._bridge_index = 0
        self._underlay: kip.Link | None = None
        self._underlay_missing = False
        self._warned_skips: set[str] = set()

    # ---- life cycle ----------------------------------------------------------------

    def start(self) -> None:
        """Lease a subnet and build the node's side of the overlay; OverlayError on failure."""
        if self._started:
            raise OverlayError("this overlay node was started already")
        try:
            public = ipaddress.ip_address(self.opts.public_ip)
        except ValueError:
            raise OverlayError(f"invalid public IP {self.opts.public_ip!r}: give the node's underlay address") \
                from None
        self.opts.public_ip = str(public)
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

    def _start(self) -> None:
        opts = self.opts
        try:
            self._store = open_store(opts.store_url, prefix=opts.etcd_prefix, tls=opts.tls,
                                     timeout=opts.store_timeout)
            cfg = read_config(self._store)
        except StoreError as exc:
            raise OverlayError(f"cannot read the cluster configuration from {opts.store_url}: {exc}") from None
        self._cfg = cfg
        self._vxlan_name = opts.vxlan_device or f"pycni.{cfg.vni}"
        for what, name in (("VXLAN device", self._vxlan_name), ("bridge", opts.bridge)):
            if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
                raise OverlayError(f"invalid {what} name {name!r}: at most {IFNAMSIZ} characters, no '/' or spaces")
        self._node_name = opts.node_name or socket.gethostname()
        self._ipr = kip.open_netlink()
        self._batch = nlbatch.BatchSocket()
        underlay = self._find_underlay()
        if underlay is None:
            if opts.underlay_device:
                raise OverlayError(f"underlay device {opts.underlay_device!r} does not exist")
            raise OverlayError(f"no interface holds the public IP {opts.public_ip}: give the node's underlay "
                               f"address (--public-ip) or name the device (--underlay-device)")
        self._underlay = underlay
        self._mtu = self._overlay_mtu(underlay)
        self._vtep_mac = kvx.stable_vtep_mac(vtep_mac_seed(opts.public_ip, cfg.vni, self._node_name))

        keeper = LeaseKeeper(self._store, cfg, Identity(opts.public_ip, self._vtep_mac, self._node_name),
                             opts.lease_ttl, self.log)
        try:
            keeper.take(self._previous_lease(cfg), has_pods=self._bridge_has_pods())
        except NodeConflict as exc:
            raise OverlayError(f"refusing to start: {exc}") from None
        except LeaseExhausted as exc:
            raise OverlayError(f"no subnet left for this node: {exc}") from None
        except (StoreError, ValueError) as exc:
            raise OverlayError(f"cannot lease a subnet for {opts.public_ip}: {exc}") from None
        self._keeper = keeper
        if keeper.state == VALID:
            self.log.info("leased %s for %s (%s), VTEP MAC %s; %s", keeper.subnet, opts.public_ip, self._node_name,
                          self._vtep_mac, cfg.describe())
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
        self._monitor = KernelMonitor(self._watched_indexes, self._kernel_changed,
                                      lambda msg: self.log.warning("%s", msg))
        self._monitor.start()

    def _find_underlay(self) -> kip.Link | None:
        """The underlay link as it is now (by --underlay-device, else the holder of the public IP)."""
        if self.opts.underlay_device:
            link = kip.find_link(self._ipr, self.opts.underlay_device)
            if link is not None and not self._started:
                holder = kvx.underlay_link_for(self._ipr, self.opts.public_ip)
                if holder is None or holder.index != link.index:
                    self.log.warning("the public IP %s is not an address of the underlay device %s",
                                     self.opts.public_ip, link.name)
            return link
        return kvx.underlay_link_for(self._ipr, self.opts.public_ip)

    def _overlay_mtu(self, underlay: kip.Link) -> int:
        try:
            return kvx.overlay_mtu(underlay.mtu, ipaddress.ip_address(self.opts.public_ip).version == 6)
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
        if previous.network != cfg.network:
            self.log.info("the previous overlay state is for the network %s; not reusing its subnet",
                          previous.network)
            return None
        return NodeLease(subnet=previous.subnet, public_ip=previous.public_ip, vtep_mac=previous.vtep_mac,
                         node_name=previous.node_name)

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
                    if time.monotonic() >= next_check:   # keep the kernel as the last view says meanwhile
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
            for name in (self._vxlan_name, self.opts.bridge):
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
                    forward.remove_forward_accept([self._cfg.network])
                except CNIError as exc:
                    problems.append(f"cannot remove the FORWARD accept rules: {exc}")
            overlaystate.remove_state(self.opts.state_dir)
        self._entries = None
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
            wanted = self._entries.table.wanted() if self._entries is not None else None
        remotes = wanted.remotes if wanted is not None else []
        return {
            "ready": self.ready(),
            "nodeName": self._node_name,
            "publicIP": self.opts.public_ip,
            "network": cfg.network if cfg else None,
            "vni": cfg.vni if cfg else None,
            "port": cfg.port if cfg else None,
            "subnet": keeper.subnet if keeper else None,
            "lease": keeper.state if keeper else None,
            "leaseExpires": keeper.valid_until if keeper else None,
            "leaseProblem": (keeper.problem or None) if keeper else None,
            "vtepMAC": self._vtep_mac or None,
            "vxlanDevice": self._vxlan_name or None,
            "bridge": self.opts.bridge,
            "bridgeMAC": self._bridge_mac or None,
            "underlay": None if self._underlay_missing or self._underlay is None else self._underlay.name,
            "ipMasq": self.opts.ip_masq,
            "mtu": self._mtu or None,
            "remotes": len(remotes),
            "remoteNodes": [{"subnet": r.subnet, "publicIP": r.public_ip, "vtepMAC": r.vtep_mac,
                             "nodeName": r.node_name} for r in remotes],
            "skipped": wanted.skipped if wanted is not None else [],
            "rejectedEntries": [{"key": r.key, "revision": r.mod_revision, "reason": r.reason}
                                for r in sorted(self._rejected.values(), key=lambda r: r.key)],
            "lastReconcile": st.last_reconcile,
            "reconciles": st.reconciles,
            "events": st.events,
            "changes": st.changes,
            "repairs": st.repairs,
            "entryRepairs": st.entry_repairs,
            "storeRevision": st.revision,
            "storeReachable": st.store_reachable,
            "storeError": st.store_error or None,
            "store": {"watch": st.watch, "revision": st.revision, "relists": st.relists, "errors": st.store_errors,
                      "requests": self._store_stats()},
            "lastError": st.last_error or None,
        }

    def _store_stats(self) -> dict[str, Any]:
        store = self._store
        try:
            return store.stats() if store is not None else {}
        except Exception as exc:   # status must answer whatever the store does
            return {"error": str(exc)}

    # ---- node devices ---------------------------------------------------------------------

    def _configure_node(self) -> None:
        """Bridge, VXLAN device, addresses, forwarding, state file and firewall for the current lease."""
        assert self._cfg is not None and self._keeper is not None
        cfg, ipr = self._cfg, self._ipr
        subnet = ipaddress.ip_network(self._keeper.subnet)
        gateway = subnet.network_address + 1
        network = cfg.ip_network
        underlay = self._find_underlay()
        if underlay is None:
            raise OverlayError(f"the underlay link (holding {self.opts.public_ip}) is gone")
        self._underlay = underlay
        mtu = self._overlay_mtu(underlay)
        if self._mtu and mtu != self._mtu:
            self.log.warning("the underlay %s now has MTU %d: the overlay's MTU is %d (was %d); pods that exist keep "
                             "their MTU until they are re-created", underlay.name, underlay.mtu, mtu, self._mtu)
        self._mtu = mtu

        bridge = self._ensure_bridge()
        self._sync_address(bridge.index, f"{gateway}/{subnet.prefixlen}", network)
        self._bridge_index = bridge.index

        device = kvx.ensure_vxlan(ipr, self._vxlan_name, cfg.vni, cfg.port, self.opts.public_ip,
                                  underlay.index, self._mtu, self._vtep_mac, learning=False)
        self._sync_address(device.index, f"{subnet.network_address}/{subnet.max_prefixlen}", network)
        self._vxlan_index = device.index
        if not self.opts.tx_checksum_offload:
            from cni_plugins.kernel.ethtool import set_tx_checksum

            set_tx_checksum(self._vxlan_name, False)
        kip.enable_forwarding({network.version})
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
        bridge = kip.ensure_bridge(ipr, name, mtu=self._mtu, mac=self._bridge_mac or derived)
        if bridge.mtu != self._mtu and not self._has_ports(bridge.index):
            ipr.link("set", index=bridge.index, mtu=self._mtu)
        adopting = existed and not self._bridge_mac
        if adopting:
            if bridge.mac == derived or not self._has_ports(bridge.index):
                self._bridge_mac = derived
            else:
                # Pods resolved the gateway to its current MAC: keep that one.
                self._bridge_mac = bridge.mac
                self.log.info("adopted the existing bridge %s with its MAC %s (pods are attached to it)", name,
                              bridge.mac)
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

    def _sync_address(self, index: int, wanted: str, network: ipaddress._BaseNetwork) -> None:
        """Give the link ``wanted``; drop its other addresses inside the cluster network (an old lease's)."""
        target = ipaddress.ip_interface(wanted)
        present = [address for address, _flags in kip.addresses(self._ipr, index, target.version)]
        for address in present:
            if address != target and address.ip in network:
                kip.del_address(self._ipr, index, str(address))
        if target not in present:
            kip.add_address(self._ipr, index, wanted)

    def _members(self) -> set[str]:
        """This node and every remote the view makes programmable (for a table built before the entries)."""
        entries = Entries(self._own())
        entries.rebuild(self._own(), self._view)
        return entries.table.members | {self.opts.public_ip}

    def _firewall_spec(self) -> firewall.FirewallSpec:
        assert self._cfg is not None
        return firewall.FirewallSpec(self._cfg.network, self._cfg.port, masquerade=self.opts.ip_masq)

    def _ensure_forward(self) -> None:
        assert self._cfg is not None
        for action in forward.ensure_forward_accept([self._cfg.network]):
            self.log.info("forwarding: %s", action)

    def _write_state(self) -> None:
        assert self._cfg is not None and self._keeper is not None
        cfg, keeper = self._cfg, self._keeper
        subnet = ipaddress.ip_network(keeper.subnet)
        state = overlaystate.OverlayState(
            network=cfg.network, subnet=keeper.subnet, gateway=str(subnet.network_address + 1), mtu=self._mtu,
            bridge=self.opts.bridge, vxlan_device=self._vxlan_name, vni=cfg.vni, port=cfg.port,
            public_ip=self.opts.public_ip, vtep_mac=self._vtep_mac, node_name=self._node_name,
            lease_expires=round(keeper.valid_until, 3), lease_lost=keeper.problem if keeper.state == LOST else "")
        overlaystate.write_state(self.opts.state_dir, state)

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
            for key, entry in rejected.items():
                self._warn_rejected(entry)
            self._rejected = rejected
            self._status.revision = scan.revision

    def _warn_rejected(self, entry: RejectedLease) -> None:
        known = self._rejected.get(entry.key)
        if known is None or known.mod_revision != entry.mod_revision:
            self.log.warning("ignoring the store entry %s (revision %d): %s", entry.key, entry.mod_revision,
                             entry.reason)

    def _store_up(self) -> None:
        st = self._status
        if not st.store_reachable:
            if st.store_error:
                self.log.info("the cluster store is reachable again (after %.1f s)",
                              time.monotonic() - st.store_down_since)
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
                self.log.warning("this node's lease of %s is gone from the store; taking it again",
                                 self._keeper.subnet)
            self._renew()
            self._scan()
        self._reconcile_kernel()
        self.log.debug("revision %d: listed in %.1f ms, reconciled in %.1f ms", self._status.revision,
                       (listed - began) * 1000, (time.monotonic() - listed) * 1000)

    def _apply_events(self, events: list[Any]) -> None:
        """Store events, one lease at a time: O(1) kernel work per changed node (the incremental reconcile)."""
        assert self._cfg is not None and self._keeper is not None
        own_touched = False
        with self._lock, self._at_home():
            if self._entries is None:
                return
            own_key = self._keeper.lease.key if self._keeper.lease is not None else ""
            merged = Delta()
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
                delta = self._entries.update(event.key, lease)
                merged.remove += delta.remove
                merged.add += delta.add
                self._status.events += 1
            self._write_delta(merged)
        if own_touched and self._own_lease_gone():
            if self._keeper.state != LOST:
                self.log.warning("this node's lease of %s changed in the store; taking it again", self._keeper.subnet)
            self._renew()

    def _write_delta(self, delta: Delta) -> None:
        """Kernel entries and firewall members for one batch of changed leases."""
        if not delta or self._batch is None or self._entries is None:
            return
        outcome = self._entries.apply(self._batch, self._vxlan_index, delta)
        self._status.changes += outcome.done
        if delta.add or delta.remove:
            self.log.info("store change: +%d -%d remote nodes (%s)", len(delta.add), len(delta.remove),
                          ", ".join(sorted({r.subnet for r in delta.add + delta.remove}))[:200])
        if outcome.failures:
            self._status.last_error = "; ".join(outcome.failures)
            self.log.warning("%d entries could not be written: %s", len(outcome.failures),
                             "; ".join(outcome.failures))
        self._sync_members()
        self._warn_skips()

    def _warn_skips(self, skipped: list[str] | None = None) -> None:
        """One warning per lease that is read but not programmed, when it starts being skipped."""
        assert self._entries is not None
        reasons = self._entries.table.skipped() if skipped is None else skipped
        for reason in reasons:
            if reason not in self._warned_skips:
                self.log.warning("ignoring lease %s", reason)
        self._warned_skips = set(reasons)

    def _sync_members(self) -> None:
        """The nft member sets follow the programmed remotes: only the difference is written."""
        assert self._entries is not None
        wanted = self._entries.table.members | {self.opts.public_ip}
        if wanted == self._firewall_members:
            return
        try:
            firewall.update_members(add=wanted - self._firewall_members, remove=self._firewall_members - wanted)
        except CNIError:   # the table changed under us: rebuild it whole
            firewall.ensure_firewall(self._firewall_spec(), wanted)
        self._firewall_members = wanted

    def _reconcile_kernel_safely(self, with_firewall: bool = True) -> None:
        try:
            self._reconcile_kernel(with_firewall)
        except Exception as exc:
            self._status.last_error = f"{type(exc).__name__}: {exc}"
            self.log.warning("reconciling the kernel failed: %s", exc)

    def _own(self) -> Own:
        assert self._cfg is not None and self._keeper is not None
        return Own.of(self.opts.public_ip, self._keeper.subnet, self._cfg.network, self._vtep_mac)

    def _reconcile_kernel(self, with_firewall: bool = True) -> None:
        """The full, level-based reconcile: devices, every remote's entries (and the firewall) as the view says."""
        with self._lock, self._at_home():
            if self._ipr is None or self._cfg is None or self._keeper is None or self._batch is None:
                return
            if not self._ensure_devices():
                return
            if self._entries is None:
                self._entries = Entries(self._own())
            self._entries.rebuild(self._own(), self._view)
            todo, outcome = self._entries.reconcile(self._ipr, self._batch, self._vxlan_index,
                                                    self._cfg.ip_network.version)
            self._status.changes += outcome.done
            wanted = self._entries.table.wanted()
            if todo:
                self.log.info("reconcile: %s (%d remote nodes)", todo.summary(), len(wanted.remotes))
            if outcome.failures:
                self._status.last_error = "; ".join(outcome.failures)
                self.log.warning("reconcile left %d entries wrong: %s", len(outcome.failures),
                                 "; ".join(outcome.failures))
            self._warn_skips(wanted.skipped)
            if with_firewall:
                members = wanted.members | {self.opts.public_ip}
                firewall.ensure_firewall(self._firewall_spec(), members)
                self._firewall_members = members
                self._ensure_forward()
            self._status.reconciles += 1
            self._status.last_reconcile = time.time()

    def _ensure_devices(self) -> bool:
        """Repair every attribute of the node's devices that drifted; False while the underlay link is gone."""
        underlay = self._find_underlay()
        if underlay is None:
            if not self._underlay_missing:
                self.log.warning("the underlay link holding %s is gone: the overlay is down on this node until it "
                                 "is back", self.opts.underlay_device or self.opts.public_ip)
                self._underlay_missing = True
            return False
        if self._underlay_missing:
            self.log.info("the underlay link %s is back", underlay.name)
            self._underlay_missing = False
        drift = self._drift(underlay)
        if drift:
            self.log.warning("the overlay devices changed under us (%s); setting them up again", "; ".join(drift))
            self._status.repairs += 1
            self._configure_node()
        return True

    def _drift(self, underlay: kip.Link) -> list[str]:
        """What differs between the node's devices and what it owns (empty: nothing)."""
        assert self._cfg is not None and self._keeper is not None
        cfg, ipr, name = self._cfg, self._ipr, self._vxlan_name
        subnet = ipaddress.ip_network(self._keeper.subnet)
        out = []
        vx = kvx.vxlan_device(ipr, name)
        if vx is None:
            out.append(f"{name} is missing")
        else:
            local = ipaddress.ip_address(vx.local) if vx.local else None
            wanted_mtu = self._overlay_mtu(underlay)
            for what, have, want in (("VNI", vx.vni, cfg.vni), ("port", vx.port, cfg.port),
                                     ("local address", local, ipaddress.ip_address(self.opts.public_ip)),
                                     ("underlay link", vx.underlay_index, underlay.index),
                                     ("learning", vx.learning, False), ("MAC", vx.mac, self._vtep_mac),
                                     ("MTU", vx.mtu, wanted_mtu), ("up", vx.up, True)):
                if have != want:
                    out.append(f"{name} {what} is {have}, not {want}")
            address = ipaddress.ip_interface(f"{subnet.network_address}/{subnet.max_prefixlen}")
            if not any(a == address for a, _f in kip.addresses(ipr, vx.index, address.version)):
                out.append(f"{name} lacks its address {address}")
        bridge = kip.find_link(ipr, self.opts.bridge)
        if bridge is None:
            out.append(f"{self.opts.bridge} is missing")
        else:
            if not bridge.is_up:
                out.append(f"{self.opts.bridge} is down")
            if bridge.mac != self._bridge_mac:
                out.append(f"{self.opts.bridge} MAC is {bridge.mac}, not {self._bridge_mac}")
            gateway = ipaddress.ip_interface(f"{subnet.network_address + 1}/{subnet.prefixlen}")
            if not any(a == gateway for a, _f in kip.addresses(ipr, bridge.index, gateway.version)):
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
                    repairs, was_missing = self._status.repairs, self._underlay_missing
                    if not self._ensure_devices():
                        return
                    if self._status.repairs != repairs or was_missing:
                        self._reconcile_kernel(with_firewall=False)
                        return
                if self._entries is None or self._batch is None:
                    return
                outcome = self._entries.repair(self._batch, self._vxlan_index, changes)
                if outcome.done:
                    self._status.entry_repairs += outcome.done
                    self._status.changes += outcome.done
                    self.log.info("set %d entries right that were changed under us", outcome.done)
                if outcome.failures:
                    self._status.last_error = "; ".join(outcome.failures)
                    self.log.warning("could not set entries right: %s", "; ".join(outcome.failures))
        except Exception as exc:
            self._status.last_error = f"{type(exc).__name__}: {exc}"
            self.log.warning("repairing entries failed: %s", exc)

    def _watched_indexes(self) -> dict[str, set[int]] | None:
        """What the monitor reacts to; None (everything) while the underlay link is gone."""
        if self._underlay_missing:
            return None
        devices = {self._vxlan_index, self._bridge_index}
        links = devices | ({self._underlay.index} if self._underlay is not None else set())
        return {"link": links, "addr": links, "neigh": {self._vxlan_index}, "route": {self._vxlan_index}}

    def _store_down(self, exc: BaseException) -> None:
        message, now = str(exc), time.monotonic()
        st = self._status
        if st.store_reachable or not st.store_down_since:
            st.store_down_since = now
        if st.store_reachable or st.store_error != message:
            self.log.warning("the cluster store is unavailable (%s); keeping the current entries", message)
            st.store_warned_at = now
        elif now - st.store_warned_at >= STORE_DOWN_REMINDER:
            self.log.warning("the cluster store is still unavailable after %.0f s (%s); keeping the current "
                             "entries", now - st.store_down_since, message)
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


def _closed(watch: Any) -> None:
    """Close a watch (if any); None, to assign in one line."""
    if watch is not None:
        try:
            watch.close()
        except Exception:
            pass
    return None


__all__ = ["OverlayError", "OverlayNode", "OverlayOptions", "leave_cluster", "vtep_mac_seed"]
