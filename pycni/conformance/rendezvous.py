"""Meeting in the cluster store: publish this node's probe, find the others', wait for their results.

No node needs ssh to another: each publishes ``conformance/<node>`` (a Party)
and refreshes its heartbeat while its run lasts, waits (bounded) until every
node that holds a subnet lease has published a fresh entry, runs its checks,
writes ``conformance/results/<node>``, and waits (bounded) until every peer it
measured has written results for the same session before it removes its probe,
so that nobody's checks run against a probe that is already gone.

Entries whose heartbeat is older than STALE_AFTER seconds are ignored: they
were left by a run that died. The comparison uses wall-clock time across
nodes, so the nodes' clocks must agree within a few seconds (NTP).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ipam.cluster import Store, StoreError, list_leases

from .model import PREFIX, RESULTS_PREFIX, NodeResults, Party, node_key, results_key

HEARTBEAT_EVERY = 3.0
STALE_AFTER = 30.0
WAIT_SLICE = 1.0


@dataclass
class Peers:
    found: list[Party] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # public IPs of leased nodes that never published


def read_parties(store: Store, now: float | None = None) -> list[Party]:
    """Every fresh Party in the store (unreadable and stale entries skipped)."""
    now = time.time() if now is None else now
    entries, _ = store.list(PREFIX)
    parties = []
    for entry in entries:
        if entry.key.startswith(RESULTS_PREFIX):
            continue
        try:
            party = Party.from_json(entry.value)
        except (ValueError, TypeError, KeyError):
            continue
        if now - party.heartbeat <= STALE_AFTER:
            parties.append(party)
    return parties


def read_results(store: Store) -> list[NodeResults]:
    entries, _ = store.list(RESULTS_PREFIX)
    out = []
    for entry in entries:
        try:
            out.append(NodeResults.from_json(entry.value))
        except (ValueError, TypeError, KeyError):
            continue
    return out


def _wait(store: Store, timeout: float, sleep: Callable[[float], None]) -> None:
    """Block until something under conformance/ changes or WAIT_SLICE passes (never longer than timeout)."""
    try:
        _, revision = store.list(PREFIX)
        store.wait(PREFIX, revision, min(WAIT_SLICE, max(timeout, 0.05)))
    except StoreError:
        sleep(min(WAIT_SLICE, max(timeout, 0.05)))


class Rendezvous:
    def __init__(self, store: Store, me: Party, log: Callable[[str], None] = lambda _m: None) -> None:
        self.store = store
        self.me = me
        self.log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- this node's entry ----------------------------------------------------------------
    def publish(self) -> None:
        with self._lock:
            self.me.heartbeat = time.time()
            self.store.put(node_key(self.me.node), self.me.to_json())

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_EVERY):
                try:
                    self.publish()
                except StoreError as exc:
                    self.log(f"warning: cannot refresh this node's conformance entry: {exc}")

        self._thread = threading.Thread(target=beat, name="conformance-heartbeat", daemon=True)
        self._thread.start()

    def withdraw(self) -> None:
        """Stop the heartbeat and remove this node's entry (its results stay)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_EVERY + 5)
        with self._lock:
            try:
                self.store.delete(node_key(self.me.node))
            except StoreError as exc:
                self.log(f"warning: cannot remove this node's conformance entry: {exc}")

    def clear_previous(self) -> None:
        """Forget what an earlier run of this node left (its entry and results)."""
        for key in (node_key(self.me.node), results_key(self.me.node)):
            self.store.delete(key)

    # ---- the others -----------------------------------------------------------------------
    def expected(self) -> list[str]:
        """Public IPs of every node holding a lease (this one too)."""
        leases, _ = list_leases(self.store)
        return sorted({lease.public_ip for lease in leases} | {self.me.public_ip})

    def wait_for_peers(self, timeout: float, sleep: Callable[[float], None] = time.sleep) -> Peers:
        """Every other leased node's fresh entry, waiting up to ``timeout`` seconds for the missing ones."""
        deadline = time.monotonic() + timeout
        announced: set[str] = set()
        for _ in range(int(timeout / 0.05) + 2):
            expected = self.expected()
            parties = {p.public_ip: p for p in read_parties(self.store) if p.public_ip != self.me.public_ip}
            missing = [ip for ip in expected if ip != self.me.public_ip and ip not in parties]
            if not missing:
                return Peers(found=sorted(parties.values(), key=lambda p: p.node))
            waiting = ", ".join(missing)
            if waiting not in announced:
                announced.add(waiting)
                self.log(f"waiting for {len(missing)} node(s) to publish their probes: {waiting}")
            left = deadline - time.monotonic()
            if left <= 0:
                found = [p for ip, p in parties.items() if ip in expected]
                return Peers(found=sorted(found, key=lambda p: p.node), missing=missing)
            _wait(self.store, left, sleep)
        return Peers(found=[], missing=[ip for ip in self.expected() if ip != self.me.public_ip])

    def publish_results(self, results: NodeResults) -> None:
        self.store.put(results_key(self.me.node), results.to_json())

    def wait_for_results(
        self, peers: list[Party], timeout: float, sleep: Callable[[float], None] = time.sleep
    ) -> list[str]:
        """Wait until every peer has written results for the session we measured; returns the late ones."""
        deadline = time.monotonic() + timeout
        pending = list(peers)
        for _ in range(int(timeout / 0.05) + 2):
            done = {(r.node, r.session) for r in read_results(self.store)}
            pending = [p for p in pending if (p.node, p.session) not in done]
            if not pending:
                return []
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _wait(self.store, left, sleep)
        return [p.node for p in pending]
