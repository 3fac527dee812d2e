"""Who a port mapping belongs to: the key that DEL and GC match on."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cni_plugins.kernel.names import short_hash


@dataclass(frozen=True)
class Owner:
    """One attachment (network, container, interface); its mappings carry its key."""

    network: str
    container_id: str
    ifname: str

    @property
    def key(self) -> str:
        return short_hash(f"{self.network}\0{self.container_id}\0{self.ifname}", 16)

    @property
    def comment(self) -> str:
        """The key first (what we match on), then a readable, ruleset-safe label."""
        label = f"{self.network}/{self.container_id}/{self.ifname}"
        return f"{self.key} {_safe_text(label)}"[:120]


def _safe_text(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:/\-]", "_", text)
