"""vxlan: attach a pod to the node's overlay network (the role of flannel's CNI plugin).

The node agent (``pycni agent --store ...``) leases this node's pod subnet
out of the cluster network, builds the node's bridge and VXLAN device, keeps
the routes, neighbour and FDB entries to every other node, and writes what
pods need into ``<stateDir>/overlay.json``. This plugin does no link work of
its own:

ADD reads that state, derives a ``bridge`` configuration from it (the node's
bridge as the pods' gateway, the overlay's MTU, hairpin mode, no masquerade,
``host-local`` addresses from the node's subnet with a route to the whole
cluster network; ``netconf.derive_delegate``), caches it per attachment
(``cache``) and runs the bridge plugin on it in this process. The bridge's
result is the result, so ``portmap`` and ``bandwidth`` chain after it.
Without state the node has no lease yet: ADD fails with "try again later".

DEL runs the bridge's DEL with the cached configuration, so it releases what
ADD allocated even if the lease has changed or the agent's state is gone;
with no cache it derives what it can (the state, else a fallback that still
deletes the interface and releases the addresses by container ID), then
removes the cache entry. DEL is idempotent like the bridge's.

ADD also answers "try again later" (11) while the node's lease is not valid:
lapsed (the agent has not renewed it within its TTL) or lost (another node
holds the subnet now; the message names it), so no pod is ever addressed from
a subnet another node may be using.

CHECK runs the bridge's CHECK with the cached configuration and fails when
the node's subnet is no longer the one the pod was addressed from. STATUS is
not-ready (50) until the node has a valid lease (none yet, lapsed, or lost),
limited (51) when the VXLAN device is missing, and otherwise the bridge's
(its IPAM's) status. GC removes the
cached configurations of attachments no longer valid and passes the valid
list to the bridge's GC, which releases the addresses of the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cni_plugins.shared.delegate import run_in_process
from cni_plugins.shared.overlaystate import OverlayState, OverlayStateError, lease_problem, read_state, state_path
from cni_plugins.spec.errors import (
    ERR_INTERNAL,
    ERR_IO,
    ERR_LIMITED_CONNECTIVITY,
    ERR_PLUGIN_NOT_AVAILABLE,
    ERR_TRY_AGAIN,
    CNIError,
)
from cni_plugins.spec.skel import CmdArgs, gc_attachments
from cni_plugins.vxlan import cache
from cni_plugins.vxlan.netconf import (
    DELEGATE_TYPE,
    SCHEMA,  # noqa: F401 (what the skeleton decodes the configuration with)
    VxlanConf,
    delegate_request,
    delegate_subnet,
    derive_delegate,
    fallback_delegate,
    load_conf,
)

if TYPE_CHECKING:
    from cni_plugins.spec.types import Result


def _agent_hint(n: VxlanConf) -> str:
    return (
        f"the node agent writes {state_path(n.state_dir)} once it holds a subnet lease: run "
        f"`pycni agent --store URL --public-ip IP --state-dir {n.state_dir}` on this node "
        f"(and `pycni cluster init` once per cluster)"
    )


def node_state(n: VxlanConf, unreadable_code: int = ERR_IO) -> OverlayState | None:
    """The node's overlay state, None when the agent has written none yet."""
    try:
        return read_state(n.state_dir)
    except OverlayStateError as exc:
        raise CNIError(
            unreadable_code,
            f"cannot use the node's overlay state: {exc}",
            f"the node agent writes {state_path(n.state_dir)} when it starts: fix what the message "
            f"names, then restart the agent",
        ) from None
    except OSError as exc:
        raise CNIError(
            unreadable_code, f"cannot read the node's overlay state in {n.state_dir}: {exc.strerror}"
        ) from None


def _delegate(req: CmdArgs, delegate: dict[str, Any], command: str) -> Result | None:
    conf = delegate_request(delegate, req.conf, req.cni_version)
    return run_in_process(req, DELEGATE_TYPE, conf, command)


# ---- ADD ----------------------------------------------------------------------------


def cmd_add(req: CmdArgs) -> Result:
    n = load_conf(req.conf, req.cni_version)
    state = node_state(n)
    if state is None:
        raise CNIError(ERR_TRY_AGAIN, "this node has no overlay subnet lease yet", _agent_hint(n))
    problem = lease_problem(state)
    if problem:
        raise CNIError(ERR_TRY_AGAIN, problem, "the node agent's log says more (`pycni agent status` shows the lease)")
    delegate = derive_delegate(n, state)
    # Cached before the bridge runs: a DEL after a crash part-way through ADD still finds it.
    earlier = cache.load(n.state_dir, n.name, req.container_id, req.ifname)
    cache.save(n.state_dir, n.name, req.container_id, req.ifname, delegate)
    try:
        result = _delegate(req, delegate, "ADD")
    except BaseException:
        # The bridge has undone its own work. Without the attachment its entry goes too; a
        # repeated ADD of a live attachment that failed leaves that attachment's entry as it was.
        try:
            if earlier is not None:
                cache.save(n.state_dir, n.name, req.container_id, req.ifname, earlier.delegate)
            else:
                cache.remove(n.state_dir, n.name, req.container_id, req.ifname)
        except CNIError:
            pass
        raise
    assert result is not None
    return result


# ---- DEL ----------------------------------------------------------------------------


def cmd_del(req: CmdArgs) -> None:
    n = load_conf(req.conf, req.cni_version)
    cached = cache.load(n.state_dir, n.name, req.container_id, req.ifname)
    if cached is not None:
        delegate = cached.delegate
    else:
        try:
            state = node_state(n)
        except CNIError:
            state = None  # an unreadable state must not keep a pod from going away
        delegate = derive_delegate(n, state) if state is not None else fallback_delegate(n)
    _delegate(req, delegate, "DEL")
    # Only once the bridge succeeded: a failed DEL is retried with the same configuration.
    cache.remove(n.state_dir, n.name, req.container_id, req.ifname)
    return None


# ---- CHECK --------------------------------------------------------------------------


def cmd_check(req: CmdArgs) -> None:
    n = load_conf(req.conf, req.cni_version)
    state = node_state(n, ERR_INTERNAL)
    cached = cache.load(n.state_dir, n.name, req.container_id, req.ifname)
    if cached is None and state is None:
        raise CNIError(
            ERR_INTERNAL, "this node has no overlay subnet lease and no record of this attachment", _agent_hint(n)
        )
    delegate = cached.delegate if cached is not None else derive_delegate(n, state)  # type: ignore[arg-type]
    if state is not None:
        used = delegate_subnet(delegate)
        if used is not None and used != state.subnet:
            raise CNIError(
                ERR_INTERNAL,
                f"the node's pod subnet is now {state.subnet}, but this pod was addressed from {used}",
                "the node's lease changed (a new lease after the old one expired); recreate the pod",
            )
    _delegate(req, delegate, "CHECK")
    return None


# ---- STATUS and GC ------------------------------------------------------------------


def cmd_status(req: CmdArgs) -> None:
    n = load_conf(req.conf, req.cni_version)
    state = node_state(n, ERR_PLUGIN_NOT_AVAILABLE)
    if state is None:
        raise CNIError(ERR_PLUGIN_NOT_AVAILABLE, "this node has no overlay subnet lease yet", _agent_hint(n))
    problem = lease_problem(state)
    if problem:
        raise CNIError(
            ERR_PLUGIN_NOT_AVAILABLE, problem, "the node agent's log says more (`pycni agent status` shows the lease)"
        )
    if not _link_exists(state.vxlan_device):
        raise CNIError(
            ERR_LIMITED_CONNECTIVITY,
            f"the overlay device {state.vxlan_device} is missing",
            "pods on this node reach each other but no other node; the node agent recreates "
            "the device: check that it is running",
        )
    _delegate(req, derive_delegate(n, state), "STATUS")
    return None


def _link_exists(name: str) -> bool:
    import socket

    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def cmd_gc(req: CmdArgs) -> None:
    n = load_conf(req.conf, req.cni_version)
    valid = gc_attachments(req.conf)
    try:
        state = node_state(n)
    except CNIError:
        state = None
    # The bridge's GC (its IPAM's) works per network, not per pod: any configuration
    # naming the right dataDir and network serves, the node's own when there is one.
    delegate = derive_delegate(n, state) if state is not None else fallback_delegate(n)
    _delegate(req, delegate, "GC")
    cache.remove_stale(n.state_dir, n.name, valid)
    return None
