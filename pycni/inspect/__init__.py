"""`pycni inspect`: a node's network (or the whole cluster) as a person wants to see it.

readers   the iproute2 / nft / tc JSON readers (shared with `pycni conformance`)
collect   the node's picture: bridges, pods, VXLAN remotes, firewall entries, shaping
cluster   the cluster's picture from the store: settings and leases
render    text, and Graphviz (dot, SVG, PNG)
cli       the click command
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # `pycni.inspect:inspect` is the command; importing it lazily keeps `import pycni.inspect.readers` light.
    if name == "inspect":
        from .cli import inspect

        return inspect
    raise AttributeError(name)
