"""Reading the bandwidth plugin's work: tbf rates on a pod's host veth (ingress) and on ifb devices (egress)."""

from __future__ import annotations

import re

from .host import Host


def tbf_rate(host: Host, device: str) -> str | None:
    """The tbf rate on device's root qdisc ("10Mbit"), or None when it is not shaped."""
    out = host.net("tc", "qdisc", "show", "dev", device, check=False).stdout
    match = re.search(r"qdisc tbf \S+ root .*?rate (\S+)", out)
    return match.group(1) if match else None


def ifb_devices(host: Host) -> list[str]:
    out = host.net("ip", "-o", "link", "show", "type", "ifb").stdout
    return [m.group(1) for m in re.finditer(r"^\d+: ([^:@]+)[@:]", out, re.M)]


def egress_rates(host: Host) -> dict[str, str | None]:
    """ifb device -> its tbf rate (the bandwidth plugin shapes a pod's egress there)."""
    return {dev: tbf_rate(host, dev) for dev in ifb_devices(host)}
