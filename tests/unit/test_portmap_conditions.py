"""portmap's conditionsV4/V6 hold match expressions only: every statement is refused (code 7) up front."""

from __future__ import annotations

import pytest

from cni_plugins.portmap.config import parse_config
from cni_plugins.spec.errors import ERR_INVALID_CONFIG, CNIError


def parse(backend: str, conditions: list[str], key: str = "conditionsV4"):
    return parse_config({"cniVersion": "1.0.0", "name": "net", "type": "portmap", "backend": backend, key: conditions})


@pytest.mark.parametrize(
    "conditions",
    [
        ["ip saddr 10.0.0.0/8"],
        ["ip saddr != { 10.0.0.0/8, 192.168.0.0/16 }"],
        ["ip daddr != 127.0.0.0/8", "tcp dport 22"],
        ['iifname "counter"'],  # a statement word, quoted: a name, not syntax
        ["ct state new", "meta l4proto tcp"],
        ["fib daddr type local"],
        ["meta mark 0x10"],  # matching a mark is fine; setting one is not
    ],
)
def test_nft_match_expressions_are_accepted(conditions):
    assert parse("nftables", conditions).conditions_v4 == conditions


@pytest.mark.parametrize(
    "conditions",
    [
        ["meta mark set 0x1"],
        ["ct mark set 1"],
        ["meta mark", "set 1"],  # split over two items
        ["log"],
        ["log prefix pwned"],
        ["counter"],
        ["ip saddr 1.2.3.4 counter"],
        ["accept"],
        ["ip saddr 1.2.3.4 drop"],
        ["jump other"],
        ["goto other"],
        ["return"],
        ["queue num 1"],
        ["reject with tcp reset"],
        ["limit rate 1/second"],
        ["quota 10 mbytes"],
        ["notrack"],
        ["dnat to 1.2.3.4"],
        ["masquerade"],
        ["redirect to :22"],
        ["dup to 1.2.3.4"],
        ["ip saddr vmap { 1.2.3.4 : accept }"],
        ["add @s { ip saddr }"],
        ["update @s { ip saddr }"],
        ["ct count over 3"],
        ["MeTa MaRk SeT 1"],
        ["ip saddr 1.2.3.4 }"],
        ["ip saddr { 1.2.3.4"],
        ["ip saddr 1.2.3.4 \\"],
    ],
)
def test_nft_statements_are_refused(conditions):
    with pytest.raises(CNIError) as info:
        parse("nftables", conditions)
    assert info.value.code == ERR_INVALID_CONFIG
    with pytest.raises(CNIError):
        parse("nftables", conditions, key="conditionsV6")


@pytest.mark.parametrize(
    "conditions",
    [
        ["-s", "10.0.0.0/8"],
        ["-d", "1.2.3.4", "-i", "veth0"],
        ["-iveth0"],
        ["-m", "conntrack", "--ctstate", "NEW"],
        ["-m", "comment", "--comment", "# a note"],
        ["-p", "tcp", "--dport", "22"],
        ["-s", "1.2.3.4", "!", "-d", "5.6.7.8"],
    ],
)
def test_ipt_matches_are_accepted(conditions):
    assert parse("iptables", conditions).conditions_v4 == conditions


@pytest.mark.parametrize(
    "conditions",
    [
        ["-j", "ACCEPT"],
        ["--jump", "ACCEPT"],
        ["--jump=ACCEPT"],
        ["-jACCEPT"],
        ["--ju", "ACCEPT"],
        ["-g", "KUBE-X"],
        ["--goto", "KUBE-X"],
        ["--go=KUBE-X"],
        ["-t", "filter"],
        ["--table=raw"],
        ["-A", "INPUT"],
        ["-I", "INPUT"],
        ["-D", "INPUT", "1"],
        ["-F"],
        ["-X"],
        ["-N", "X"],
        ["-P", "INPUT", "DROP"],
        ["-c", "0", "0"],
        ["-w"],
        ["-m", "limit", "--limit", "1/s"],
        ["-mlimit"],
        ["--match=hashlimit"],
        ["-m", "recent", "--set"],
        ["-m", "quota", "--quota", "100"],
        ["-m", "statistic", "--mode", "nth"],
        ["-m", "connlimit"],
        ["-fjACCEPT"],
        ["-s", "1.2.3.4", "--set"],
    ],
)
def test_ipt_non_matches_are_refused(conditions):
    with pytest.raises(CNIError) as info:
        parse("iptables", conditions)
    assert info.value.code == ERR_INVALID_CONFIG


def test_del_tolerates_what_add_refuses():
    """DEL must clean up whatever the config says: bad conditions are only a warning there."""
    warnings: list[str] = []
    cfg = parse_config({"name": "net", "backend": "nftables", "conditionsV4": ["counter"]}, warn=warnings.append)
    assert cfg.backend == "nftables" and warnings and "counter" in warnings[0]
