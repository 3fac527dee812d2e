"""portmap: forward host ports to a container (a chained plugin).

ADD reads the container's addresses from prevResult and installs DNAT for
every runtimeConfig ``portMappings`` entry, plus the masquerade that hairpin
(pod to its own host port through the node) and localhost traffic need; it
then passes prevResult through unchanged. DEL removes what ADD installed for
this (network, container, interface); it needs neither prevResult nor the
namespace. CHECK verifies the rules are present; GC removes the mappings of
attachments that are no longer valid.

Two backends with the reference's options and meanings: ``nftables`` (the
default here: one table, per-network maps, one element per mapping) and
``iptables`` (the reference's chain layout). Where the configuration holds
iptables-only options (``externalSetMarkChain``, iptables-style conditions)
and names no backend, the iptables backend is chosen, so configurations
written for the reference keep working.
"""

from __future__ import annotations

from dataclasses import replace
from types import ModuleType
from typing import TYPE_CHECKING

from cni_plugins.portmap import config
from cni_plugins.portmap.config import IPTABLES, PortMapConfig, Targets, container_targets, invalid_config, parse_config
from cni_plugins.spec.errors import CNIError
from cni_plugins.spec.skel import CmdArgs, gc_attachments, prev_result

SCHEMA = config.SCHEMA  # what the skeleton decodes the configuration with (PluginFuncs.options)

if TYPE_CHECKING:
    from cni_plugins.portmap.owner import Owner
    from cni_plugins.spec.types import Result


def _node_side() -> ModuleType:
    """The backends and host tools (``portmap.hostside``), loaded once there is something to do.

    Deliberately not imported at the top (with ``hostside.backend``, which loads
    only the configured backend, these are portmap's only lazy imports): the
    backends and the nft/iptables runners, locks, hashing and subprocess under
    them cost about 14 ms of imports, which portmap's most common call, an ADD
    for a pod without host ports, never needs.
    """
    from cni_plugins.portmap import hostside

    return hostside


# ---- commands -----------------------------------------------------------------


def cmd_add(req: CmdArgs) -> Result:
    cfg, previous, targets = _chained_request(
        req, invalid_config("must be called as chained plugin", "portmap needs prevResult from a plugin such as bridge")
    )
    if not targets.items():
        return previous  # no host port to map: prevResult passes through
    node = _node_side()
    backend, owner = node.backend(cfg), _owner(node, req)
    backend.add(cfg, owner, targets)
    try:
        for family, _addr in targets.items():
            node.flush_udp_conntrack(cfg, family, req.warn)
        if cfg.snat and targets.v4 is not None and cfg.mappings_for(4):
            node.enable_route_localnet(targets.v4.ip)
    except Exception:
        backend.delete(cfg, owner)  # a failed ADD leaves no mappings behind
        raise
    return previous


def cmd_del(req: CmdArgs) -> None:
    # Best effort: what only ADD needs (a malformed mapping, an unknown backend) is no
    # reason to fail; this container's state is found by network, container and interface.
    cfg = parse_config(req.conf, warn=req.warn)
    if not cfg.mappings_given and cfg.backend == IPTABLES:
        # The reference skips DEL without mappings: every iptables call is costly.
        return None
    # nftables: one table listing finds this container's elements even when the
    # runtime sends DEL without the port mappings it sent on ADD, so none leak.
    node = _node_side()
    node.backend(cfg).delete(cfg, _owner(node, req))
    if cfg.backend_unknown:
        other = replace(cfg, backend=IPTABLES)
        node.backend(other).delete(other, _owner(node, req))
    return None


def cmd_check(req: CmdArgs) -> None:
    cfg, _previous, targets = _chained_request(
        req, invalid_config("Required prevResult missing", "CHECK needs the prevResult that ADD returned")
    )
    if targets.items():
        node = _node_side()
        node.backend(cfg).check(cfg, _owner(node, req), targets)
    return None


def cmd_gc(req: CmdArgs) -> None:
    cfg = parse_config(req.conf)
    node = _node_side()
    valid = [node.Owner(cfg.network, cid, ifname) for cid, ifname in gc_attachments(req.conf)]
    node.backend(cfg).gc(cfg, valid)
    return None


def _chained_request(req: CmdArgs, missing_previous: CNIError) -> tuple[PortMapConfig, Result, Targets]:
    """Configuration, prevResult (raise ``missing_previous`` without it) and the container
    addresses to map to (none when there is no mapping)."""
    cfg = parse_config(req.conf)
    previous = prev_result(req)
    if previous is None:
        raise missing_previous
    targets = container_targets(previous, req.ifname) if cfg.mappings else Targets()
    return cfg, previous, targets


def _owner(node: ModuleType, req: CmdArgs) -> Owner:
    return node.Owner(req.network_name, req.container_id, req.ifname)
