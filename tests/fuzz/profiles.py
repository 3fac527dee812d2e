"""Each plugin's valid request and the option values it must refuse (see requests.py for the kinds)."""

from __future__ import annotations

import copy
import importlib
from typing import Any

from cni_plugins.spec.decode import COMMON

from .harness import BRIDGE, NETWORK, VERSION, FuzzNode
from .requests import ERR_CONFIG, ERR_DECODE, ERR_ENV, ERR_UNSUPPORTED, Bad, Profile

HUGE = [2**31, 2**32, 2**63, 2**64, 10**30]
NEGATIVE = [-1, -(2**31), -(2**63), -(10**30)]
BAD_CIDRS = [
    "garbage",
    "10.0.0.0/33",
    "10.0.0.300/24",
    "fd00::/129",
    "10.0.0.0/8; flush ruleset",
    "1.2.3.4/-1",
    " 10.0.0.0/8",
    "10.0.0.0/8\n",
    "::ffff:10.0.0.0/200",
    "10.0.0.0/8/8",
]
ENV_OR_CONFIG = frozenset({ERR_ENV, ERR_CONFIG})
BAD_IPS = ["garbage", "10.0.0.256", "1.2.3.4 }", "fe80::1%eth0", "10.0.0.1/24/1", "::g", "1.2.3.4;", "-1.0.0.0"]
BAD_MACS = [
    "zz:zz:zz:zz:zz:zz",
    "00:11:22:33:44",
    "01:00:5e:00:00:01",
    "ff:ff:ff:ff:ff:ff",
    "00-11-22-33-44-55-66",
    "00:11:22:33:44:55; reboot",
    "0:1:2:3:4:5:6",
]
# Interface names the kernel refuses, which pycni catches up front.
BAD_NAMES = ["a" * 16, "bad/name", "bad name", "br\n0", "x" * 300, "br\t0", "/", ".", "..", "br:0", "\u00e9" * 8]


def schema_of(module: str):
    return importlib.import_module(module).SCHEMA


def _conf(plugin: str, **options: Any) -> dict[str, Any]:
    return {"cniVersion": VERSION, "name": NETWORK, "type": plugin, **options}


def loopback_base(fn: FuzzNode) -> dict[str, Any]:
    return _conf("loopback")


def host_local_base(fn: FuzzNode) -> dict[str, Any]:
    return _conf("bridge", ipam=copy.deepcopy(fn.ipam))


def bridge_base(fn: FuzzNode) -> dict[str, Any]:
    return _conf("bridge", bridge=BRIDGE, isGateway=True, ipMasq=True, hairpinMode=True, ipam=copy.deepcopy(fn.ipam))


def portmap_base(fn: FuzzNode) -> dict[str, Any]:
    return _conf(
        "portmap",
        snat=True,
        prevResult=copy.deepcopy(fn.base_result),
        runtimeConfig={"portMappings": [{"hostPort": 18081, "containerPort": 80, "protocol": "tcp"}]},
    )


def bandwidth_base(fn: FuzzNode) -> dict[str, Any]:
    return _conf(
        "bandwidth",
        prevResult=copy.deepcopy(fn.base_result),
        ingressRate=8_000_000,
        ingressBurst=80_000,
        egressRate=8_000_000,
        egressBurst=80_000,
    )


def vxlan_base(fn: FuzzNode) -> dict[str, Any]:
    return _conf("vxlan", stateDir=str(fn.state_dir), dataDir=str(fn.node.ipam_dir))


def _ipam_bad(prefix: tuple) -> list[Bad]:
    return [
        Bad(prefix + ("ranges", 0, 0, "subnet"), BAD_CIDRS),
        Bad(prefix + ("ranges", 0, 0, "rangeStart"), BAD_IPS + ["10.98.0.5", "fd99::1"]),  # outside / other family
        Bad(prefix + ("ranges", 0, 0, "rangeEnd"), BAD_IPS + ["10.100.0.5"]),
        Bad(prefix + ("ranges", 0, 0, "gateway"), BAD_IPS),
        Bad(prefix + ("ranges",), [[], [[]], [[{}]], [[{"subnet": "10.99.0.0/24"}, {"subnet": "10.99.0.0/25"}]]]),
        Bad(prefix + ("routes", 0, "dst"), BAD_CIDRS),
        Bad(prefix + ("routes", 0, "gw"), BAD_IPS, frozenset({ERR_DECODE, ERR_CONFIG})),
    ]


PROFILES: dict[str, Profile] = {
    "loopback": Profile("loopback", COMMON, loopback_base),
    "host-local": Profile(
        "host-local",
        schema_of("ipam.schema"),
        host_local_base,
        uses_netns=False,
        bad=_ipam_bad(("ipam",))
        + [
            Bad(("runtimeConfig", "ips"), [[ip] for ip in BAD_IPS]),
            Bad(("args", "cni", "ips"), [[ip] for ip in BAD_IPS]),
            Bad(("ipam", "subnet"), BAD_CIDRS),
        ],
        bad_args=[
            "IP=garbage",
            "IP=10.99.0.300",
            "IP=1.2.3.4 }",
            "NOEQUALS",
            "IP",
            "=x",
            "IP=;reboot",
            "Unknown=1",
            "IgnoreUnknown=maybe",
        ],
    ),
    "bridge": Profile(
        "bridge",
        schema_of("cni_plugins.bridge.config"),
        bridge_base,
        bad=[
            Bad(("bridge",), BAD_NAMES),
            Bad(("mtu",), NEGATIVE + HUGE + [67]),
            Bad(("vlan",), NEGATIVE + HUGE + [4095, 4096]),
            Bad(
                ("vlanTrunk",),
                [
                    [{"minID": 10, "maxID": 5}],
                    [{"id": 0}],
                    [{"id": 5000}],
                    [{"minID": -1, "maxID": 3}],
                    [{"minID": 1, "maxID": 2**40}],
                ],
            ),
            Bad(("runtimeConfig", "mac"), BAD_MACS),
            Bad(("args", "cni", "mac"), BAD_MACS),
            Bad(("ipMasqBackend",), ["pf", "nftables; flush ruleset", "NFTABLES ", "ipfw", "both"]),
            Bad(
                ("ipam", "type"),
                ["../host-local", "/usr/lib/cni/host-local", "host-local; reboot", "no-such-ipam"],
                codes=frozenset({ERR_CONFIG}),
            ),
        ]
        + _ipam_bad(("ipam",)),
        bad_args=[
            ("MAC=zz:zz", ENV_OR_CONFIG),
            ("MAC=01:00:5e:00:00:01", ENV_OR_CONFIG),
            "NOEQUALS",
            "MAC",
            "Unknown=1",
            "IgnoreUnknown=maybe",
        ],
    ),
    "portmap": Profile(
        "portmap",
        schema_of("cni_plugins.portmap.config"),
        portmap_base,
        uses_netns=False,
        ifname="eth1",
        bad=[
            Bad(("runtimeConfig", "portMappings", 0, "hostPort"), [0] + NEGATIVE + HUGE + [65536]),
            Bad(("runtimeConfig", "portMappings", 0, "containerPort"), [0] + NEGATIVE + HUGE + [65536]),
            Bad(
                ("runtimeConfig", "portMappings", 0, "protocol"),
                ["icmp", "tcp; flush ruleset", "TCP }", "all", "6"],
                codes=frozenset({ERR_UNSUPPORTED}),
            ),
            Bad(("runtimeConfig", "portMappings", 0, "hostIP"), BAD_IPS),
            Bad(("markMasqBit",), [32, 64] + NEGATIVE + HUGE),
            Bad(("externalSetMarkChain",), ["A B", "X -j ACCEPT", "x" * 29, "", "$(id)", "KUBE;MARK"]),
            Bad(("backend",), ["pf", "nft", "iptables; reboot", "NFTABLES", ""]),
            Bad(
                ("conditionsV4",),
                [
                    ["meta mark set 0x1"],
                    ["counter"],
                    ["log prefix x"],
                    ["ip saddr 1.2.3.4 accept"],
                    ["limit rate 1/second"],
                    ["ip saddr 1.2.3.4; flush ruleset"],
                    ["jump x"],
                    ["ip saddr { 1.2.3.4"],
                    ["meta mark", "set 1"],
                    ["queue"],
                    ["reject"],
                ],
            ),
            Bad(("conditionsV6",), [["meta mark set 0x1"], ["drop"], ["ct mark set 1"], ["dnat to ::1"]]),
        ],
    ),
    "bandwidth": Profile(
        "bandwidth",
        schema_of("cni_plugins.bandwidth.config"),
        bandwidth_base,
        ifname="eth1",
        bad=[
            Bad(("ingressRate",), NEGATIVE + [2**64, 10**30, 2**40, 0]),
            Bad(("ingressBurst",), NEGATIVE + [2**64, 8 * 2**32, 0]),
            Bad(("egressRate",), NEGATIVE + [2**64, 10**30, 2**40, 0, 7]),
            Bad(("egressBurst",), NEGATIVE + [2**64, 8 * 2**32, 0, 7]),
            Bad(("latencyMs",), [0, -1, -0.5, 60_001, 1e12, 1e300]),
            Bad(("shapedSubnets",), [[c] for c in BAD_CIDRS] + [["10.0.0.1"]]),
            Bad(("unshapedSubnets",), [[c] for c in BAD_CIDRS] + [["fd00::1"]]),
        ],
    ),
    "vxlan": Profile(
        "vxlan",
        None,
        vxlan_base,  # schema set below, from the plugin's own netconf
        bad=[
            Bad(("mtu",), NEGATIVE + HUGE + [67]),
            Bad(("bridge",), BAD_NAMES),
        ],
    ),
}


def _finish() -> None:
    # The vxlan plugin is ours and shipped: an import error of it is a failure of the fuzz run, never a
    # reason to drop its profile (its requests would silently go unfuzzed).
    PROFILES["vxlan"].schema = schema_of("cni_plugins.vxlan.netconf")


_finish()
