"""Names derived by hashing, in the reference plugins' format.

The reference plugins name per-container objects ``PREFIX + hex(sha512(text))``
cut to a length (iptables chains ``CNI-…`` and ``CNI-DN-…``, the bandwidth
ifb device ``bwp…``); cnitool derives container IDs the same way. Using the
same function keeps pycni's objects interchangeable with theirs. pycni's own
tags (nftables comments and set names) use the same helper with sha256.
"""
from __future__ import annotations

import hashlib


def hashed_name(prefix: str, text: str, length: int, algorithm: str = "sha512") -> str:
    """``(prefix + hexdigest(text))[:length]``, e.g. hashed_name("CNI-", net + cid, 28)."""
    digest = hashlib.new(algorithm, text.encode()).hexdigest()
    return (prefix + digest)[:length]


def short_hash(text: str, length: int = 16) -> str:
    """A short sha256 tag for pycni's own nftables names and comments."""
    return hashed_name("", text, length, "sha256")
