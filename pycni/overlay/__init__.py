"""The VXLAN overlay's node agent (flannel's VXLAN backend): subnet lease, node bridge and
VXLAN device, FDB/neighbour/route reconcile, the overlay's nftables table.

    from pycni.overlay import OverlayNode, OverlayOptions, OverlayError, leave_cluster

``pycni agent`` runs it; ``python -m pycni.overlay`` is a stand-alone runner with
the same options (for tests and hosts without the warm agent).
"""

from __future__ import annotations

from typing import Any

__all__ = ["OverlayError", "OverlayNode", "OverlayOptions", "leave_cluster"]


def __getattr__(name: str) -> Any:
    # Lazy: importing the package (e.g. for its CLI's --help) does not load netlink or the store.
    if name in __all__:
        from pycni.overlay import node

        return getattr(node, name)
    raise AttributeError(f"module 'pycni.overlay' has no attribute {name!r}")
