"""The overlay's node agent: lease a pod subnet, build the node's bridge and VXLAN device,
and keep FDB, neighbour and route entries for every other node in step with the cluster store.

flannel's VXLAN backend, in one object::

    node = OverlayNode(OverlayOptions(store_url="etcd://10.0.0.1:2379", public_ip="10.0.0.5"))
    node.start()                 # lease, devices, state file; raises OverlayError
    stop = threading.Event()
    threading.Thread(target=node.run, args=(stop,)).start()
    ...
    stop.set(); node.close(leave=False)   # restart keeps every entry, so traffic keeps flowing

On start the node leases a subnet (the same one again after a restart: an
existing lease for its public IP, else the subnet in its state file), creates
the bridge (the subnet's first address as gateway) and the VXLAN device
(the subnet's network address as a /32, learning off, a MAC derived from the
node's identity so it never changes), turns forwarding on, writes
``<state-dir>/overlay.json`` for the vxlan CNI plugin and installs the
``inet pycni_overlay`` nftables table.

``run()`` lists the leases, programs the entries (adds missing ones, removes
stale ones, repairs ones changed by hand), then waits on the store for the
next change, bounded by the reconcile interval. A netlink monitor triggers a
reconcile as soon as one of the agent's entries or devices is deleted, so a
hand-deleted entry is back within milliseconds. While the store is unreachable
the entries stay as they are (existing traffic keeps flowing) and the loop
backs off (0.2 s doubling to 5 s), then lists again.

Everything acts in the network namespace of the thread that called start():
the netlink sockets are opened there, and other threads (run, the monitor)
switch into it before touching the kernel or running nft.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterator

import netns
from cni_plugins.kernel import ip as kip
from cni_plugins.kernel import vxlan as kvx
from cni_plugins.shared import overlaystate
from cni_plugins.spec.errors import CNIError
from ipam.cluster import (SUBNETS_PREFIX, ClusterConfig, Compacted, LeaseExhausted, LeaseLost, NodeLease,
                          StoreError, TLSFiles, acquire_lease, list_leases, open_store,
                          read_config, release_lease, renew_lease)
from pycni.overlay import firewall
from pycni.overlay.monitor import KernelMonitor
from pycni.overlay.reconcile import Remote, plan, wanted_state

DEFAULT_STATE_DIR = "/run/pycni"
DEFAULT_BRIDGE = "pycni0"
DEFAULT_LEASE_TTL = 24 * 3600
WAIT_SLICE = 1.0        # longest single store.wait(): bounds how long stop/close take
BACKOFF_MIN = 0.2
BACKOFF_MAX = 5.0
CLOSE_TIMEOUT = 15.0
STORE_DOWN_REMINDER = 60.0  # while the store stays away with the same error, warn again this often
IFNAMSIZ = 15


class OverlayError(Exception):
    """The overlay could not be set up or torn down; the message says what and why."""


@dataclass
class OverlayOptions:
    store_url: str
    public_ip: str
    state_dir: str = DEFAULT_STATE_DIR
    etcd_prefix: str = "/pycni"
    tls: TLSFiles | None = None
    bridge: str = DEFAULT_BRIDGE
    vxlan_device: str = ""            # default f"pycni.{vni}"
    underlay_device: str = ""         # default: the link holding public_ip
    node_name: str = ""               # default socket.gethostname()
    tx_checksum_offload: bool = True  # False: turn tx checksum offload off on the VXLAN device (flannel #1279)
    lease_ttl: int | None = None      # store lease TTL in seconds (None: 24 h); renewed at ttl/3
    reconcile_interval: float = 10.0
    store_timeout: float = 5.0


@dataclass
class _Status:
    last_reconcile: float | None = None     # wall-clock time of the last completed reconcile
    store_reachable: bool = False
    store_error: str = ""
    store_down_since: float = 0.0           # monotonic time the current outage began (0: none yet)
    store_warned_at: float = 0.0            # monotonic time of the last "unavailable" warning
    last_error: str = ""
    remotes: list[Remote] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reconciles: int = 0
    changes: int = 0                        # kernel entries added or removed since start
    revision: int = 0


def vtep_mac_seed(public_ip: str, vni: int, node_name: str) -> str:
    return f"pycni-vtep|{ipaddress.ip_address(public_ip)}|{vni}|{node_name}"


def leave_cluster(store_url: str, public_ip: str, prefix: str = "/pycni", tls: TLSFiles | None = None,
                  timeout: float = 5.0) -> bool:
    """Release every lease held by ``public_ip``: the other nodes drop their entries for it.

    Returns False if it held none. Touches nothing on this machine (it may run
    anywhere that reaches the store); stop the node's agent first, or it takes
    its lease again.
    """
    try:
        store = open_store(store_url, prefix=prefix, tls=tls, timeout=timeout)
    except StoreError as exc:
        raise OverlayError(f"cannot open the cluster store {store_url}: {exc}") from None
    try:
        return release_lease(store, public_ip)
    except StoreError as exc:
        raise OverlayError(f"cannot release the lease of {public_ip}: {exc}") from None
    except ValueError as exc:
        raise OverlayError(str(exc)) from None
    finally:
        store.close()


class OverlayNode:
    """One node of the VXLAN overlay; see the module docstring."""

    def __init__(self, opts: OverlayOptions, log: logging.Logger | None = None) -> None:
        self.opts = opts
        self.log = log or logging.getLogger("pycni.overlay")
        self._lock = threading.RLock()          # kernel state, netlink socket, lease
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
        self._lease: NodeLease | None = None
        self._leases: list[NodeLease] = []      # the last listing (kept while the store is down)
        self._monitor: KernelMonitor | None = None
        self._node_name = ""
        self._vtep_mac = ""
        self._mtu = 0
        self._vxlan_name = ""
        self._vxlan_index = 0
        self._bridge_index = 0
        self._underlay_index = 0
        self._ttl = DEFAULT_LEASE_TTL

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
        if self.opts.lease_ttl is not None and (not isinstance(self.opts.lease_ttl, int) or self.opts.lease_ttl < 3):
            raise OverlayError(f"invalid lease TTL {self.opts.lease_ttl!r}: give whole seconds >= 3")
        self._ttl = self.opts.lease_ttl or DEFAULT_LEASE_TTL
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
        underlay = self._find_underlay()
        self._underlay_index = underlay.index
        try:
            self._mtu = kvx.overlay_mtu(underlay.mtu, ipaddress.ip_address(opts.public_ip).version == 6)
        except ValueError as exc:
            raise OverlayError(f"underlay {underlay.name}: {exc}") from None
        self._vtep_mac = kvx.stable_vtep_mac(vtep_mac_seed(opts.public_ip, cfg.vni, self._node_name))

        previous = self._previous_lease(cfg)
        preferred = previous.subnet if previous is not None else None
        renumbered = previous if previous is not None and previous.public_ip != opts.public_ip else None
        try:
            lease = acquire_lease(self._store, cfg, opts.public_ip, self._vtep_mac, node_name=self._node_name,
                                  preferred_subnet=preferred, ttl=self._ttl, previous=renumbered)
        except LeaseExhausted as exc:
            raise OverlayError(f"no subnet left for this node: {exc}") from None
        except (StoreError, ValueError) as exc:
            raise OverlayError(f"cannot lease a subnet for {opts.public_ip}: {exc}") from None
        if preferred and lease.subnet != preferred:
            self.log.warning("the subnet %s of the previous run was taken; leased %s instead", preferred,
                             lease.subnet)
        elif renumbered is not None:
            self.log.warning("this node's underlay address changed from %s to %s: its lease of %s moved with it",
                             renumbered.public_ip, opts.public_ip, lease.subnet)
        self._lease = lease
        self.log.info("leased %s for %s (%s), VTEP MAC %s; %s", lease.subnet, opts.public_ip, self._node_name,
                      self._vtep_mac, cfg.describe())
        try:  # know the other members before the firewall is (re)built, so their VXLAN is never dropped
            self._leases, self._status.revision = list_leases(self._store)
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

    def _find_underlay(self) -> kip.Link:
        opts = self.opts
        if opts.underlay_device:
            link = kip.find_link(self._ipr, opts.underlay_device)
            if link is None:
                raise OverlayError(f"underlay device {opts.underlay_device!r} does not exist")
            holder = kvx.underlay_link_for(self._ipr, opts.public_ip)
            if holder is None or holder.index != link.index:
                self.log.warning("the public IP %s is not an address of the underlay device %s", opts.public_ip,
                                 link.name)
            return link
        link = kvx.underlay_link_for(self._ipr, opts.public_ip)
        if link is None:
            raise OverlayError(f"no interface holds the public IP {opts.public_ip}: give the node's underlay "
                               f"address (--public-ip) or name the device (--underlay-device)")
        return link

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
        def stopping() -> bool:
            return stop.is_set() or self._closed.is_set()

        backoff = BACKOFF_MIN
        need_list = self._status.last_reconcile is None or not self._status.store_reachable
        next_full = time.monotonic() + self.opts.reconcile_interval
        next_renew = time.monotonic() + self._ttl / 3
        while not stopping():
            try:
                now = time.monotonic()
                if need_list or now >= next_full:
                    self._list_and_reconcile()
                    need_list = False
                    backoff = BACKOFF_MIN
                    next_full = time.monotonic() + self.opts.reconcile_interval
                if time.monotonic() >= next_renew:
                    self._renew()
                    next_renew = time.monotonic() + self._ttl / 3
                timeout = max(0.0, min(WAIT_SLICE, next_full - time.monotonic(), next_renew - time.monotonic()))
                if self._store.wait(SUBNETS_PREFIX, self._status.revision, timeout) is not None:
                    self.log.debug("store changed")
                    need_list = True
            except Compacted as exc:
                self.log.info("the store compacted the watched revision (%s); listing again", exc)
                need_list = True
            except StoreError as exc:
                self._store_down(exc)
                need_list = True
                # The store is away: keep the kernel as the last listing says (repairing by-hand damage).
                if time.monotonic() >= next_full:
                    self._reconcile_kernel_safely()
                    next_full = time.monotonic() + self.opts.reconcile_interval
                stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as exc:  # never let the loop die: log, back off, try again
                self._status.last_error = f"{type(exc).__name__}: {exc}"
                self.log.exception("overlay reconcile failed")
                need_list = True
                stop.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def close(self, leave: bool = False) -> None:
        """Stop watching. Without ``leave`` every device and entry stays (a restart keeps traffic
        flowing); with ``leave`` the lease is released and the node's devices, entries, firewall
        table and state file are removed. Raises OverlayError if leaving failed part-way."""
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
        try:
            if release_lease(self._store, self.opts.public_ip):
                self.log.info("released the lease of %s", self._lease.subnet if self._lease else "?")
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
            overlaystate.remove_state(self.opts.state_dir)
        self._status.remotes = []
        return problems

    def _release_resources(self) -> None:
        for closer in (self._store, self._ipr):
            if closer is not None:
                try:
                    closer.close()
                except Exception:
                    pass
        self._store = self._ipr = None
        if self._home_fd >= 0:
            os.close(self._home_fd)
            self._home_fd = -1

    # ---- status ---------------------------------------------------------------------

    def ready(self) -> bool:
        """Started, the node's entries were programmed at least once, and not closed."""
        return self._started and not self._closed.is_set() and self._status.last_reconcile is not None

    def status(self) -> dict[str, Any]:
        lease, cfg, st = self._lease, self._cfg, self._status
        return {
            "ready": self.ready(),
            "nodeName": self._node_name,
            "publicIP": self.opts.public_ip,
            "network": cfg.network if cfg else None,
            "vni": cfg.vni if cfg else None,
            "port": cfg.port if cfg else None,
            "subnet": lease.subnet if lease else None,
            "vtepMAC": self._vtep_mac or None,
            "vxlanDevice": self._vxlan_name or None,
            "bridge": self.opts.bridge,
            "mtu": self._mtu or None,
            "remotes": len(st.remotes),
            "remoteNodes": [{"subnet": r.subnet, "publicIP": r.public_ip, "vtepMAC": r.vtep_mac,
                             "nodeName": r.node_name} for r in st.remotes],
            "skipped": list(st.skipped),
            "lastReconcile": st.last_reconcile,
            "reconciles": st.reconciles,
            "changes": st.changes,
            "storeRevision": st.revision,
            "storeReachable": st.store_reachable,
            "storeError": st.store_error or None,
            "lastError": st.last_error or None,
        }

    # ---- node devices ---------------------------------------------------------------------

    def _configure_node(self) -> None:
        """Bridge, VXLAN device, addresses, forwarding, state file and firewall for the current lease."""
        assert self._cfg is not None and self._lease is not None
        cfg, lease, ipr = self._cfg, self._lease, self._ipr
        subnet = ipaddress.ip_network(lease.subnet)
        gateway = subnet.network_address + 1
        network = cfg.ip_network
        host_len = subnet.max_prefixlen

        bridge = kip.ensure_bridge(ipr, self.opts.bridge, mtu=self._mtu)
        if bridge.mtu != self._mtu and not self._has_ports(bridge.index):
            ipr.link("set", index=bridge.index, mtu=self._mtu)
        self._sync_address(bridge.index, f"{gateway}/{subnet.prefixlen}", network)
        self._bridge_index = bridge.index

        device = kvx.ensure_vxlan(ipr, self._vxlan_name, cfg.vni, cfg.port, self.opts.public_ip,
                                  self._underlay_index, self._mtu, self._vtep_mac, learning=False)
        self._sync_address(device.index, f"{subnet.network_address}/{host_len}", network)
        self._vxlan_index = device.index
        if not self.opts.tx_checksum_offload:
            from cni_plugins.kernel.ethtool import set_tx_checksum

            set_tx_checksum(self._vxlan_name, False)
        kip.enable_forwarding({network.version})

        state = overlaystate.OverlayState(
            network=cfg.network, subnet=lease.subnet, gateway=str(gateway), mtu=self._mtu,
            bridge=self.opts.bridge, vxlan_device=self._vxlan_name, vni=cfg.vni, port=cfg.port,
            public_ip=self.opts.public_ip, vtep_mac=self._vtep_mac, node_name=self._node_name)
        firewall.ensure_firewall(firewall.FirewallSpec(cfg.network, cfg.port), self._members(), rebuild=True)
        overlaystate.write_state(self.opts.state_dir, state)  # last: the vxlan plugin may use the node now

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
        members = {lease.public_ip for lease in self._leases}
        members.add(self.opts.public_ip)
        return members

    # ---- reconcile ----------------------------------------------------------------------------

    def _list_and_reconcile(self) -> None:
        began = time.monotonic()
        leases, revision = list_leases(self._store)
        listed = time.monotonic()
        if not self._status.store_reachable:
            if self._status.store_error:
                self.log.info("the cluster store is reachable again (after %.1f s)",
                              time.monotonic() - self._status.store_down_since)
            self._status.store_down_since = 0.0
            self._status.store_reachable = True
            self._status.store_error = ""
        own = self._lease
        if own is not None and not any(l.public_ip == own.public_ip and l.subnet == own.subnet for l in leases):
            self.log.warning("this node's lease of %s is gone from the store; taking it again", own.subnet)
            self._renew()
            leases, revision = list_leases(self._store)
        self._leases = leases
        self._status.revision = revision
        self._reconcile_kernel()
        self.log.debug("revision %d: listed in %.1f ms, reconciled in %.1f ms", revision, (listed - began) * 1000,
                       (time.monotonic() - listed) * 1000)

    def _reconcile_kernel_safely(self, with_firewall: bool = True) -> None:
        try:
            self._reconcile_kernel(with_firewall)
        except Exception as exc:
            self._status.last_error = f"{type(exc).__name__}: {exc}"
            self.log.warning("reconciling the kernel failed: %s", exc)

    def _reconcile_kernel(self, with_firewall: bool = True) -> None:
        """Make the VXLAN device's entries (and the firewall) match the last listing."""
        with self._lock, self._at_home():
            if self._ipr is None or self._cfg is None or self._lease is None:
                return
            self._ensure_devices()
            wanted = wanted_state(self._leases, self.opts.public_ip, self._lease.subnet, self._cfg.network)
            index = self._vxlan_index
            present_fdb = kvx.fdb_entries(self._ipr, index)
            present_neigh = kvx.neigh_entries(self._ipr, index, self._cfg.ip_network.version)
            present_routes = kvx.onlink_routes(self._ipr, index, self._cfg.ip_network.version)
            todo = plan(wanted, present_fdb, present_neigh, present_routes)
            if todo:
                self.log.info("reconcile: %s (%d remote nodes)", todo.summary(), len(wanted.remotes))
                self._apply(todo)
            if wanted.skipped != self._status.skipped:
                for reason in wanted.skipped:
                    self.log.warning("ignoring lease %s", reason)
            if with_firewall:
                firewall.ensure_firewall(firewall.FirewallSpec(self._cfg.network, self._cfg.port),
                                         wanted.members | {self.opts.public_ip})
            self._status.remotes = wanted.remotes
            self._status.skipped = wanted.skipped
            self._status.reconciles += 1
            self._status.last_reconcile = time.time()

    def _apply(self, todo: Any) -> None:
        ipr, index, failures = self._ipr, self._vxlan_index, []

        def attempt(what: str, fn: Any, entry: Any) -> None:
            try:
                fn(ipr, index, entry)
                self._status.changes += 1
            except Exception as exc:
                failures.append(f"{what} {entry}: {kip.describe(exc)}")

        # Removals first (a route, then what it resolved through), then additions in the opposite order,
        # so that a route never points at an entry that is not there yet.
        for route in todo.routes.remove:
            attempt("remove route", kvx.del_onlink_route, route)
        for neigh in todo.neigh.remove:
            attempt("remove neighbour", kvx.del_neigh, neigh)
        for fdb in todo.fdb.remove:
            attempt("remove fdb", kvx.del_fdb, fdb)
        for fdb in todo.fdb.add:
            attempt("add fdb", kvx.set_fdb, fdb)
        for neigh in todo.neigh.add:
            attempt("add neighbour", kvx.set_neigh, neigh)
        for route in todo.routes.add:
            attempt("add route", kvx.set_onlink_route, route)
        if failures:
            self._status.last_error = "; ".join(failures)
            self.log.warning("reconcile left %d entries wrong: %s", len(failures), "; ".join(failures))

    def _ensure_devices(self) -> None:
        """Re-create the bridge or VXLAN device (and addresses) if someone deleted or downed them."""
        vx = kvx.vxlan_device(self._ipr, self._vxlan_name)
        bridge = kip.find_link(self._ipr, self.opts.bridge)
        healthy = (vx is not None and vx.up and vx.index == self._vxlan_index and bridge is not None
                   and bridge.is_up and bridge.index == self._bridge_index)
        if healthy:
            assert self._lease is not None
            subnet = ipaddress.ip_network(self._lease.subnet)
            wanted = ipaddress.ip_interface(f"{subnet.network_address}/{subnet.max_prefixlen}")
            healthy = any(a == wanted for a, _f in kip.addresses(self._ipr, self._vxlan_index, wanted.version))
        if not healthy:
            self.log.warning("the overlay devices changed under us; setting them up again")
            self._configure_node()

    def _kernel_changed(self) -> None:
        """From the netlink monitor: one of our devices or entries changed."""
        if self._closed.is_set():
            return
        self._reconcile_kernel_safely(with_firewall=False)

    def _watched_indexes(self) -> dict[str, set[int]]:
        devices = {self._vxlan_index, self._bridge_index}
        return {"link": devices, "addr": devices, "neigh": {self._vxlan_index}, "route": {self._vxlan_index}}

    def _renew(self) -> None:
        assert self._lease is not None and self._cfg is not None
        try:
            current = renew_lease(self._store, self._lease, self._ttl)
        except LeaseLost as exc:
            self.log.error("lost the lease: %s; leasing a subnet again", exc)
            current = acquire_lease(self._store, self._cfg, self.opts.public_ip, self._vtep_mac,
                                    node_name=self._node_name, preferred_subnet=self._lease.subnet, ttl=self._ttl)
        with self._lock:
            changed = current.subnet != self._lease.subnet
            self._lease = current
            if changed:
                self.log.warning("this node's subnet is now %s", current.subnet)
                with self._at_home():
                    self._configure_node()

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

    @contextmanager
    def _at_home(self) -> Iterator[None]:
        """Run the body in the network namespace start() was called in."""
        if self._home_fd < 0 or os.stat("/proc/thread-self/ns/net").st_ino == self._home_ino:
            with nullcontext():
                yield
            return
        with netns.enter(f"/proc/self/fd/{self._home_fd}"):
            yield


__all__ = ["OverlayError", "OverlayNode", "OverlayOptions", "leave_cluster", "vtep_mac_seed"]
