"""Result conversion between every pair of CNI spec versions."""

import itertools
import json

import pytest

from cni_plugins.spec.errors import CNIError
from cni_plugins.spec.types import DNS, Interface, IPConfig, Result, Route
from cni_plugins.spec.version import SUPPORTED_VERSIONS, is_legacy

MODERN = [v for v in SUPPORTED_VERSIONS if not is_legacy(v)]
LEGACY = [v for v in SUPPORTED_VERSIONS if is_legacy(v)]


def dual_stack() -> Result:
    return Result(
        cni_version="1.1.0",
        interfaces=[
            Interface("cni0", "aa:bb:cc:dd:ee:01"),
            Interface("eth0", "aa:bb:cc:dd:ee:02", mtu=1400, sandbox="/var/run/netns/p"),
        ],
        ips=[IPConfig("10.1.0.5/24", "10.1.0.1", 1), IPConfig("fd00::5/64", "fd00::1", 1)],
        routes=[Route("0.0.0.0/0", "10.1.0.1"), Route("::/0", "fd00::1", mtu=1300)],
        dns=DNS(["10.1.0.53"], "cluster.local", ["svc.cluster.local"], ["ndots:5"]),
    )


@pytest.mark.parametrize("source,target", list(itertools.product(SUPPORTED_VERSIONS, SUPPORTED_VERSIONS)))
def test_every_pair_of_versions_round_trips(source, target):
    original = dual_stack()
    written = original.to_dict(source)
    assert written["cniVersion"] == source
    read = Result.from_dict(json.loads(json.dumps(written)), source)
    converted = read.to_dict(target)
    assert converted["cniVersion"] == target
    back = Result.from_dict(converted, target)
    addresses = [ip.address for ip in back.ips]
    assert addresses == ["10.1.0.5/24", "fd00::5/64"]
    assert [ip.gateway for ip in back.ips] == ["10.1.0.1", "fd00::1"]
    assert {r.dst for r in back.routes} == {"0.0.0.0/0", "::/0"}
    assert back.dns.nameservers == ["10.1.0.53"]
    if is_legacy(source) or is_legacy(target):
        assert back.interfaces == []
    else:
        assert [i.name for i in back.interfaces] == ["cni0", "eth0"]
        assert [ip.interface for ip in back.ips] == [1, 1]


@pytest.mark.parametrize("version", LEGACY)
def test_legacy_shape(version):
    d = dual_stack().to_dict(version)
    assert set(d) == {"cniVersion", "ip4", "ip6", "dns"}
    assert d["ip4"] == {"ip": "10.1.0.5/24", "gateway": "10.1.0.1", "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}]}
    assert d["ip6"]["routes"] == [{"dst": "::/0", "gw": "fd00::1"}]


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_03x_04_shape_carries_ip_version(version):
    d = dual_stack().to_dict(version)
    assert [ip["version"] for ip in d["ips"]] == ["4", "6"]
    assert "mtu" not in d["interfaces"][1]
    assert d["routes"][1] == {"dst": "::/0", "gw": "fd00::1"}


def test_100_has_no_ip_version_and_no_11_fields():
    d = dual_stack().to_dict("1.0.0")
    assert all("version" not in ip for ip in d["ips"])
    assert "mtu" not in d["interfaces"][1]
    assert "mtu" not in d["routes"][1]


def test_110_fields():
    d = dual_stack().to_dict("1.1.0")
    assert d["interfaces"][1]["mtu"] == 1400
    assert d["routes"][1]["mtu"] == 1300


def test_legacy_keeps_first_address_per_family():
    r = Result(ips=[IPConfig("10.0.0.2/24"), IPConfig("10.0.0.3/24")])
    assert r.to_dict("0.2.0")["ip4"] == {"ip": "10.0.0.2/24"}


def test_legacy_without_addresses_is_an_error():
    with pytest.raises(CNIError) as exc:
        Result(interfaces=[Interface("lo")]).to_dict("0.2.0")
    assert exc.value.code == 1


def test_empty_dns_is_written_as_empty_object():
    assert Result(ips=[IPConfig("10.0.0.2/24")]).to_dict("1.0.0")["dns"] == {}


@pytest.mark.parametrize(
    "bad,version",
    [
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/24"}]}, "1.0.0"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.3"}]}, "1.0.0"),
        ({"cniVersion": "1.0.0", "ips": "nope"}, "1.0.0"),
        ({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.3/24", "interface": 2}]}, "1.0.0"),
        ({"cniVersion": "0.2.0", "ip4": {"ip": "bogus"}}, "0.2.0"),
        ({"cniVersion": "1.0.0", "routes": [{"dst": "10.0.0.0/8", "gw": "x"}]}, "1.0.0"),
        ([], "1.0.0"),
    ],
)
def test_malformed_results_are_decode_errors(bad, version):
    with pytest.raises(CNIError) as exc:
        Result.from_dict(bad, version)
    assert exc.value.code == 6


def test_unknown_version_is_incompatible():
    with pytest.raises(CNIError) as exc:
        Result.from_dict({"cniVersion": "9.9.9"})
    assert exc.value.code == 1
