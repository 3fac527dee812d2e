"""Errors of the cluster store and the subnet leases.

Every error is a StoreError, so a caller that only needs "the store failed"
catches that one class; the subclasses say what the caller can do about it.
"""

from __future__ import annotations


class StoreError(Exception):
    """A cluster-store operation failed; the message says what and why."""


class StoreUnavailable(StoreError):
    """No store endpoint could be reached, or reading/writing the store failed (I/O)."""


class Compacted(StoreError):
    """The revision a watch started from has been compacted away: re-list, then watch again."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


class LeaseExhausted(StoreError):
    """Every subnet of the cluster network is leased."""


class ConfigConflict(StoreError):
    """The store already holds a different cluster configuration."""


class LeaseLost(StoreError):
    """A node's lease expired or was taken over, so it cannot be renewed as it was."""


class NodeConflict(StoreError):
    """Another node (by NodeName) holds the lease of this node's public IP: two nodes claim one underlay address."""


class UnreadableEntry(StoreError):
    """A key exists but the store cannot read its record (a damaged file in the file store): it is taken."""


class ResponseTooLarge(StoreError):
    """An answer of the store (or one batch of watch events) is larger than the client reads at once."""
