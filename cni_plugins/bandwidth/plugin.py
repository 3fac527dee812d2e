"""bandwidth: shape a pod's traffic with token buckets on the host side of its veth.

A chained plugin (after `bridge` or `ptp`), option for option the reference
plugin's:

* ``ingressRate`` / ``ingressBurst`` (bit/s, bits): traffic toward the pod,
  a tbf qdisc (handle 1:) at the root of the host-side veth;
* ``egressRate`` / ``egressBurst``: traffic from the pod. The host veth gets an
  ingress qdisc whose u32 match-all filter redirects every packet to an ifb
  device (``bwp`` + 12 hex digits of sha512(network name + container ID), as
  the reference names it), and a tbf at the ifb's root shapes it. ADD reports
  the ifb as an extra interface in the result.
* The values come from the top level of the configuration or, when none of
  them is there, from ``runtimeConfig.bandwidth`` (capability ``bandwidth``,
  same units). Rate and burst go together; a burst must stay under 4 GB.
* tbf parameters follow the reference: rate/8 bytes per second, buffer = the
  time to send burst/8 bytes at that rate, limit = rate x latency + burst.

Beyond the reference:

* ``latencyMs`` (top level, a positive number, default 25): the tbf latency
  that sizes its queue limit.
* ``unshapedSubnets`` / ``shapedSubnets`` (mutually exclusive CIDR lists, at
  the top level or in ``runtimeConfig.bandwidth`` with the rates): upstream
  added them with an htb layout and later reverted it. When one is given, the
  root qdisc is htb with class 1:30 (tc's hex: minor 48) at the configured
  rate (ceil = rate) and class 1:1 at 100 Gbit/s; u32 filters send the listed subnets to 1:1
  (unshaped) or to 1:30 (shaped), everything else goes to the default class.
  Traffic toward the pod is matched on its source address, traffic from the
  pod on its destination address: the remote end of the conversation.
* CHECK also reports shaping that is present but not configured.
* DEL also removes the qdiscs from the host veth while it still exists, and
  needs only the network name and container ID (a configuration whose rates
  do not validate can still be deleted).
* GC (cniVersion 1.1.0): every ifb this plugin creates carries the alias
  ``<network>/<containerID>/<ifname>``; GC deletes those of its network whose
  container is not among the valid attachments, after removing the qdiscs of
  any host veth still redirecting to them. Ingress-only shaping has no ifb and
  lives on the host veth, which disappears with the pod's namespace.
* Validation errors are the spec's code 7 (the reference reports 999).
"""

from __future__ import annotations

from types import ModuleType

from cni_plugins.bandwidth import config
from cni_plugins.bandwidth.config import parse_bandwidth, validate_subnets
from cni_plugins.spec.errors import ERR_INTERNAL, ERR_INVALID_CONFIG, CNIError
from cni_plugins.spec.skel import GC_ATTACHMENT_KEYS, CmdArgs, gc_attachments, prev_result
from cni_plugins.spec.types import Interface, Result

SCHEMA = config.SCHEMA  # what the skeleton decodes the configuration with (PluginFuncs.options)


def _shaping() -> ModuleType:
    """The host-side machinery (``bandwidth.shaping``), loaded once there is something to shape or undo.

    This is the plugin's one import that is not at the top, on purpose: netlink,
    tc and the hashed ifb name cost about 10 ms of imports (pyroute2 itself only
    loads when a socket opens), which the most common call, an ADD for a pod
    without limits, never needs.
    """
    from cni_plugins.bandwidth import shaping

    return shaping


def cmd_add(req: CmdArgs) -> Result:
    bw = parse_bandwidth(req.conf)
    previous = prev_result(req)
    if bw is None or bw.is_zero():
        return previous if previous is not None else Result(cni_version=req.cni_version)
    validate_subnets(bw)
    if previous is None:
        raise CNIError(
            ERR_INVALID_CONFIG,
            "must be called as chained plugin",
            "list bandwidth after bridge (or ptp) in a .conflist so it receives prevResult",
        )
    shaping = _shaping()
    ingress, egress = shaping.token_buckets(bw, req.warn)
    name = shaping.ifb_name(req.network_name, req.container_id)
    with shaping.open_rtnl() as ipr:
        found = shaping.survey(ipr, req.netns, req.ifname, name, previous)
        host = found.host
        if found.shaped:
            shaping.clear(ipr, found)  # a repeated ADD starts from a clean slate
        try:
            ifb = shaping.build(
                ipr, host, name, shaping.ifb_alias(req.network_name, req.container_id, req.ifname), ingress, egress, bw
            )
            if ifb is not None:
                previous.interfaces.append(Interface(name=ifb.name, mac=ifb.mac))
        except shaping.TcError as exc:
            shaping.teardown(ipr, name, host)
            raise CNIError(
                ERR_INTERNAL,
                f"shaping {host.name} failed: {exc}",
                f"the ifb device is {name}; everything this ADD created was removed",
            ) from None
        except BaseException:
            shaping.teardown(ipr, name, host)
            raise
    return previous


def cmd_del(req: CmdArgs) -> None:
    shaping = _shaping()
    with shaping.open_rtnl() as ipr:
        shaping.remove(ipr, req.netns, req.ifname, shaping.ifb_name(req.network_name, req.container_id))
    return None


def cmd_check(req: CmdArgs) -> None:
    bw = parse_bandwidth(req.conf)
    previous = prev_result(req)
    if previous is None:
        raise CNIError(
            ERR_INVALID_CONFIG, "must be called as a chained plugin", "CHECK needs the prevResult of the ADD it checks"
        )
    if bw is not None:
        validate_subnets(bw)
    shaping = _shaping()
    ingress, egress = shaping.token_buckets(bw) if bw is not None else (None, None)
    name = shaping.ifb_name(req.network_name, req.container_id)
    with shaping.open_rtnl() as ipr:
        host = shaping.host_interface(ipr, req.netns, req.ifname, previous)
        shaping.check_root(ipr, host, ingress, bw, "ingress")
        ifb = shaping.find_link(ipr, name)
        if egress is None:
            if ifb is not None:
                raise CNIError(
                    ERR_INTERNAL,
                    f"ifb device {name} exists but no egress shaping is configured",
                    "run DEL and ADD again",
                )
            return None
        if ifb is None:
            raise CNIError(ERR_INTERNAL, f"get ifb device: {name} not found", "run DEL and ADD again")
        if not shaping.our_redirects(ipr, host.index, ifb.index):
            raise CNIError(
                ERR_INTERNAL, f"no filter on {host.name} redirects its traffic to {name}", "run DEL and ADD again"
            )
        shaping.check_root(ipr, ifb, egress, bw, "egress")
    return None


def cmd_gc(req: CmdArgs) -> None:
    if not any(key in req.conf for key in GC_ATTACHMENT_KEYS):
        return None  # no list of valid attachments: nothing can be judged stale
    shaping = _shaping()
    network = req.network_name
    keep = {shaping.ifb_name(network, container_id) for container_id, _ifname in gc_attachments(req.conf)}
    with shaping.open_rtnl() as ipr:
        stale = shaping.stale_ifbs(ipr, network, keep)
        if stale:
            shaping.remove_ifbs(ipr, stale)
    return None
