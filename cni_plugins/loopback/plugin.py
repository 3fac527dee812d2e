"""loopback: bring `lo` up in the container's network namespace.

ADD brings it up and reports it (or passes a chained prevResult through),
DEL brings it down (a namespace that is gone is success), CHECK verifies
that it is up. The configured interface name is ignored: this plugin only
ever works on `lo`. It flips flags with an ioctl (kernel.ifioctl), never netlink:
no pyroute2 on this path.
"""

from __future__ import annotations

from cni_plugins.kernel import ifioctl
from cni_plugins.kernel.nsutil import in_netns, netns_gone
from cni_plugins.spec.decode import COMMON
from cni_plugins.spec.errors import ERR_INTERNAL, CNIError
from cni_plugins.spec.skel import CmdArgs, prev_result
from cni_plugins.spec.types import Interface, IPConfig, Result

LOOPBACK = "lo"
# loopback has no options of its own; the common keys are decoded like every plugin's (a wrong type is 7).
SCHEMA = COMMON


def _bring_up() -> tuple[str | None, str | None]:
    ifioctl.set_up(LOOPBACK)
    v4 = ifioctl.ipv4_address(LOOPBACK)
    v6 = ifioctl.ipv6_addresses(LOOPBACK)
    for addr in ([v4] if v4 else []) + v6:
        if not addr.ip.is_loopback:
            raise CNIError(
                ERR_INTERNAL,
                f"loopback interface found with non-loopback address {addr.ip}",
                "remove the address from lo in the container",
            )
    return (str(v4) if v4 else None), (str(v6[0]) if v6 else None)


def cmd_add(req: CmdArgs) -> Result:
    previous = prev_result(req)
    v4, v6 = in_netns(req.netns, _bring_up)
    if previous is not None:
        return previous
    result = Result(
        cni_version=req.cni_version, interfaces=[Interface(name=LOOPBACK, mac="00:00:00:00:00:00", sandbox=req.netns)]
    )
    for address in (v4, v6):
        if address:
            result.ips.append(IPConfig(address=address, interface=0))
    return result


def _bring_down() -> None:
    ifioctl.set_up(LOOPBACK, up=False)


def cmd_del(req: CmdArgs) -> None:
    if not req.netns or netns_gone(req.netns):
        return None
    in_netns(req.netns, _bring_down)
    return None


def _check_up() -> None:
    if not ifioctl.is_up(LOOPBACK):
        raise CNIError(ERR_INTERNAL, "loopback interface is down", "run ADD again or bring lo up in the container")


def cmd_check(req: CmdArgs) -> None:
    in_netns(req.netns, _check_up)
    return None
