"""Unit tests of the host-local IPAM: ranges, config, allocator, store and the in-process API."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest
from click.testing import CliRunner

from cni_plugins.spec.errors import (
    ERR_INCOMPATIBLE_VERSION,
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_PLUGIN_NOT_AVAILABLE,
    ERR_UNKNOWN_CONTAINER,
    CNIError,
)
from ipam import host_local
from ipam.allocator import candidates
from ipam.config import DEFAULT_DATA_DIR, load_ipam_config
from ipam.ranges import RangeError, parse_range, parse_range_set
from ipam.resolvconf import parse_resolv_conf_text
from ipam.store import LINE_BREAK, DiskStore

ip = ipaddress.ip_address


def conf_for(data_dir, ipam=None, version="1.0.0", name="net1", **top):
    ipam_section = {"type": "host-local", "dataDir": str(data_dir), "subnet": "10.10.0.0/29"}
    ipam_section.update(ipam or {})
    conf = {"cniVersion": version, "name": name, "type": "bridge", "ipam": ipam_section}
    conf.update(top)
    return conf


def files(data_dir, name="net1"):
    path = os.path.join(str(data_dir), name)
    if not os.path.isdir(path):
        return None
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


# ---- ranges ----------------------------------------------------------------


def test_range_defaults_v4():
    rng = parse_range({"subnet": "10.1.2.0/24"})
    assert (str(rng.gateway), str(rng.range_start), str(rng.range_end)) == ("10.1.2.1", "10.1.2.1", "10.1.2.254")


def test_range_defaults_v6_ends_at_last_address():
    rng = parse_range({"subnet": "fd00:1::/120"})
    assert (str(rng.gateway), str(rng.range_start), str(rng.range_end)) == ("fd00:1::1", "fd00:1::1", "fd00:1::ff")


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"subnet": "10.0.0.0/31"}, "too small"),
        ({"subnet": "10.0.0.0/32"}, "too small"),
        ({"subnet": "fd00::/127"}, "too small"),
        ({"subnet": "fd00::/128"}, "too small"),
        ({"subnet": "10.0.0.1/24"}, "host bits"),
        ({"subnet": "10.0.0.0/24", "rangeStart": "10.0.1.1"}, "rangeStart 10.0.1.1 not in network"),
        ({"subnet": "10.0.0.0/24", "rangeEnd": "10.0.1.1"}, "rangeEnd 10.0.1.1 not in network"),
        ({"subnet": "10.0.0.0/24", "rangeStart": "10.0.0.9", "rangeEnd": "10.0.0.3"}, "after rangeEnd"),
        ({"subnet": "10.0.0.0/24", "gateway": "10.9.9.9"}, "gateway 10.9.9.9 not in network"),
        ({"subnet": "bogus"}, "invalid CIDR"),
        ({"subnet": "10.0.0.0"}, "invalid CIDR"),
        ({"subnet": "10.0.0.0/24", "rangeStart": "zz"}, "invalid IP"),
        ({}, "missing 'subnet'"),
    ],
)
def test_range_rejections(raw, words):
    with pytest.raises(RangeError, match=words):
        parse_range(raw)


def test_range_set_rejections():
    with pytest.raises(RangeError, match="empty range set"):
        parse_range_set([])
    with pytest.raises(RangeError, match="mixed address families"):
        parse_range_set([{"subnet": "10.0.0.0/24"}, {"subnet": "fd00::/64"}])
    with pytest.raises(RangeError, match="overlap"):
        parse_range_set([{"subnet": "10.0.0.0/24"}, {"subnet": "10.0.0.0/25"}])


def test_round_robin_order_skips_gateway_and_wraps_over_ranges():
    rs = parse_range_set([{"subnet": "10.0.0.0/29"}, {"subnet": "10.0.1.0/30"}])
    fresh = [str(a) for a, _ in candidates(rs, None)]
    assert fresh == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6", "10.0.1.2"]
    after = [str(a) for a, _ in candidates(rs, ip("10.0.0.5"))]
    assert after == ["10.0.0.6", "10.0.1.2", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]
    # a last-reserved address outside the set restarts from the beginning
    assert [str(a) for a, _ in candidates(rs, ip("192.168.0.1"))] == fresh


# ---- configuration -----------------------------------------------------------


def test_config_sources_of_requested_ips_and_defaults():
    conf = {
        "cniVersion": "1.0.0",
        "name": "n",
        "ipam": {"ranges": [[{"subnet": "10.0.0.0/24"}]]},
        "args": {"cni": {"ips": ["10.0.0.7"]}},
        "runtimeConfig": {"ips": ["10.0.0.8/24"]},
    }
    cfg = load_ipam_config(conf, "IgnoreUnknown=1;IP=10.0.0.5,10.0.0.6;K8S_POD_NAME=x")
    assert [str(a) for a in cfg.requested_ips] == ["10.0.0.5", "10.0.0.6", "10.0.0.7", "10.0.0.8"]
    assert cfg.data_dir == DEFAULT_DATA_DIR


def test_config_order_runtime_ranges_then_legacy_then_ranges():
    conf = {
        "cniVersion": "1.0.0",
        "name": "n",
        "ipam": {"subnet": "10.1.0.0/24", "ranges": [[{"subnet": "fd00::/64"}]]},
        "runtimeConfig": {"ipRanges": [[{"subnet": "10.2.0.0/24"}]]},
    }
    cfg = load_ipam_config(conf)
    assert [str(s.ranges[0].subnet) for s in cfg.range_sets] == ["10.2.0.0/24", "10.1.0.0/24", "fd00::/64"]


@pytest.mark.parametrize(
    "conf, code, words",
    [
        ({"cniVersion": "1.0.0", "name": "n"}, ERR_INVALID_CONFIG, "missing 'ipam'"),
        ({"cniVersion": "1.0.0", "name": "n", "ipam": {}}, ERR_INVALID_CONFIG, "no IP ranges"),
        (
            {
                "cniVersion": "1.0.0",
                "name": "n",
                "ipam": {"ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "10.0.0.0/25"}]]},
            },
            ERR_INVALID_CONFIG,
            "range set 0 overlaps with 1",
        ),
        (
            {
                "cniVersion": "0.2.0",
                "name": "n",
                "ipam": {"ranges": [[{"subnet": "10.0.0.0/24"}], [{"subnet": "10.1.0.0/24"}]]},
            },
            ERR_INVALID_CONFIG,
            "more than 1 address per family",
        ),
        (
            {"cniVersion": "1.0.0", "name": "n", "ipam": {"subnet": "10.0.0.0/24", "routes": [{"dst": "x"}]}},
            ERR_INVALID_CONFIG,
            "routes",
        ),
        (
            {"cniVersion": "1.0.0", "name": "n", "ipam": {"subnet": "10.0.0.0/24"}, "args": {"cni": {"ips": ["nope"]}}},
            ERR_INVALID_CONFIG,
            "requested ip",
        ),
    ],
)
def test_config_rejections(conf, code, words):
    with pytest.raises(CNIError) as info:
        load_ipam_config(conf)
    assert info.value.code == code and words in info.value.msg


def test_cni_args_errors_are_invalid_env():
    conf = {"cniVersion": "1.0.0", "name": "n", "ipam": {"subnet": "10.0.0.0/24"}}
    for args in ("IP=10.0.0.300", "FOO=1"):
        with pytest.raises(CNIError) as info:
            load_ipam_config(conf, args)
        assert info.value.code == ERR_INVALID_ENV


def test_resolv_conf_parsing():
    dns = parse_resolv_conf_text(
        "# c\n; c\nnameserver 1.1.1.1\nnameserver fd00::53\ndomain a.example\n"
        "search x.example y.example\noptions ndots:5 rotate\nbogus\n"
    )
    assert dns.to_dict() == {
        "nameservers": ["1.1.1.1", "fd00::53"],
        "domain": "a.example",
        "search": ["x.example", "y.example"],
        "options": ["ndots:5", "rotate"],
    }


# ---- store ------------------------------------------------------------------


def test_store_reserve_is_exclusive_and_leaves_no_temp_files(tmp_path):
    store = DiskStore("n", str(tmp_path))
    with store.locked():
        assert store.reserve("c1", "eth0", "10.0.0.2", 0)
        assert not store.reserve("c2", "eth0", "10.0.0.2", 0)
    assert sorted(os.listdir(store.dir)) == ["10.0.0.2", "last_reserved_ip.0", "lock"]
    assert open(os.path.join(store.dir, "10.0.0.2"), "rb").read() == b"c1\r\neth0"
    assert open(os.path.join(store.dir, "last_reserved_ip.0"), "rb").read() == b"10.0.0.2"


def test_store_reserve_loses_a_race_it_did_not_see_coming(tmp_path, monkeypatch):
    """Another writer (another process, no lock shared) creates the address between the look and the link:
    the link fails with EEXIST and reserve says no; the other writer's file is left as it was."""
    store = DiskStore("n", str(tmp_path))
    with store.locked():
        assert store.reserve("c1", "eth0", "10.0.0.2", 0)
    real_lstat = os.lstat

    def lstat_missing_the_other_writer(path, *args, **kwargs):
        if path == "10.0.0.2":
            raise FileNotFoundError(path)  # as if it was created right after this look
        return real_lstat(path, *args, **kwargs)

    monkeypatch.setattr("ipam.store.os.lstat", lstat_missing_the_other_writer)
    with store.locked():
        assert not store.reserve("c2", "eth0", "10.0.0.2", 0)
    assert open(os.path.join(store.dir, "10.0.0.2"), "rb").read() == b"c1\r\neth0"
    assert sorted(os.listdir(store.dir)) == ["10.0.0.2", "last_reserved_ip.0", "lock"]


def test_api_a_second_add_of_one_attachment_is_refused_and_keeps_one_address(tmp_path):
    conf = conf_for(tmp_path)
    host_local.allocate(conf, "c1", "eth0")
    before = files(tmp_path)
    with pytest.raises(CNIError, match="10.10.0.2 has been allocated to c1, duplicate allocation is not allowed"):
        host_local.allocate(conf, "c1", "eth0")
    assert files(tmp_path) == before
    host_local.allocate(conf, "c1", "eth1")  # another interface of the same container is another attachment
    assert {f for f in files(tmp_path) if f.startswith("10.")} == {"10.10.0.2", "10.10.0.3"}


def test_store_release_prefers_ifname_match_then_legacy(tmp_path):
    store = DiskStore("n", str(tmp_path))
    for name, content in (
        ("10.0.0.2", "c1" + LINE_BREAK + "eth0"),
        ("10.0.0.3", "c1" + LINE_BREAK + "eth1"),
        ("10.0.0.4", "c1\n"),
    ):
        open(os.path.join(store.dir, name), "w", newline="").write(content)
    with store.locked():
        assert store.release_by_id("c1", "eth0") == ["10.0.0.2"]
        assert store.release_by_id("c1", "eth0") == ["10.0.0.4"]  # legacy ID-only file
        assert store.release_by_id("c1", "eth0") == []
    assert sorted(os.listdir(store.dir)) == ["10.0.0.3", "lock"]


# ---- in-process API -------------------------------------------------------


def test_api_allocate_release_round_robin(tmp_path):
    conf = conf_for(tmp_path, {"routes": [{"dst": "0.0.0.0/0"}]})
    got = [host_local.allocate(conf, f"c{n}", "eth0").to_dict()["ips"][0]["address"] for n in range(5)]
    assert got == ["10.10.0.2/29", "10.10.0.3/29", "10.10.0.4/29", "10.10.0.5/29", "10.10.0.6/29"]
    with pytest.raises(CNIError) as info:
        host_local.allocate(conf, "c9", "eth0")
    assert info.value.code == ERR_INTERNAL
    assert info.value.msg == (
        "failed to allocate for range 0: no IP addresses available in range set: 10.10.0.1-10.10.0.6"
    )
    host_local.release(conf, "c0", "eth0")
    host_local.release(conf, "c0", "eth0")  # idempotent
    result = host_local.allocate(conf, "c9", "eth0").to_dict("1.0.0")
    assert result == {
        "cniVersion": "1.0.0",
        "ips": [{"address": "10.10.0.2/29", "gateway": "10.10.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


def test_api_requested_ip_conflict_and_outside(tmp_path):
    conf = conf_for(tmp_path)
    host_local.allocate(conf, "c1", "eth0", "IP=10.10.0.5")
    before = files(tmp_path)
    with pytest.raises(
        CNIError, match="requested IP address 10.10.0.5 is not available in range set 10.10.0.1-10.10.0.6"
    ):
        host_local.allocate(conf, "c2", "eth0", "IP=10.10.0.5")
    with pytest.raises(CNIError, match="failed to allocate all requested IPs: 10.99.0.5"):
        host_local.allocate(conf, "c2", "eth0", "IP=10.99.0.5")
    with pytest.raises(CNIError, match="is subnet's gateway"):
        host_local.allocate(conf, "c2", "eth0", "IP=10.10.0.1")
    assert files(tmp_path)["10.10.0.5"] == before["10.10.0.5"]
    assert {k for k in files(tmp_path)} == set(before)


def test_api_dual_stack_failure_rolls_back(tmp_path):
    conf = conf_for(tmp_path, {"subnet": None, "ranges": [[{"subnet": "10.20.0.0/24"}], [{"subnet": "fd00:20::/126"}]]})
    host_local.allocate(conf, "c1", "eth0")  # takes fd00:20::2, leaves ::3
    host_local.allocate(conf, "c2", "eth0")  # takes fd00:20::3
    before = set(files(tmp_path))
    with pytest.raises(CNIError, match="failed to allocate for range 1: no IP addresses"):
        host_local.allocate(conf, "c3", "eth0")
    assert "10.20.0.4" not in files(tmp_path)
    assert set(files(tmp_path)) == before


@pytest.mark.parametrize("api", [host_local.allocate, host_local.release, host_local.check])
@pytest.mark.parametrize(
    "change, container_id, ifname, code",
    [
        ({"name": "bad/name"}, "c1", "eth0", ERR_INVALID_CONFIG),
        ({"cniVersion": "9.9.9"}, "c1", "eth0", ERR_INCOMPATIBLE_VERSION),
        ({}, "", "eth0", ERR_UNKNOWN_CONTAINER),
        ({}, "bad id", "eth0", ERR_INVALID_ENV),
        ({}, "c1", "a/b", ERR_INVALID_ENV),
    ],
)
def test_api_validates_what_the_skeleton_would(tmp_path, api, change, container_id, ifname, code):
    """In-process callers bypass the skeleton, so the API checks name, IDs and version itself."""
    with pytest.raises(CNIError) as info:
        api(dict(conf_for(tmp_path), **change), container_id, ifname)
    assert info.value.code == code
    assert files(tmp_path) is None  # nothing was written


def test_api_check(tmp_path):
    conf = conf_for(tmp_path)
    result = host_local.allocate(conf, "c1", "eth0")
    host_local.check(conf, "c1", "eth0")
    with pytest.raises(CNIError, match="Failed to find address"):
        host_local.check(conf, "c2", "eth0")
    chained = dict(conf, prevResult=result.to_dict("1.0.0"))
    host_local.check(chained, "c1", "eth0")
    os.unlink(os.path.join(str(tmp_path), "net1", "10.10.0.2"))
    host_local.allocate(conf, "c9", "eth1", "IP=10.10.0.2")
    with pytest.raises(CNIError, match="10.10.0.2 of container c1 is not reserved for it; it is held by container c9"):
        host_local.check(chained, "c1", "eth0")


def test_api_gc_releases_exactly_the_others(tmp_path):
    conf = conf_for(tmp_path, {"subnet": "10.30.0.0/24"}, version="1.1.0")
    for n in range(6):
        host_local.allocate(conf, f"c{n}", "eth0")
    open(os.path.join(str(tmp_path), "net1", "10.30.0.200"), "w").write("c1")  # legacy file of c1
    crashed = os.path.join(str(tmp_path), "net1", ".pycni-tmp-1-dead")
    open(crashed, "w").write("crash")
    os.utime(crashed, (1, 1))  # its writer's PID (1) runs, but the file is older than any write takes
    released = host_local.gc(conf, [("c1", "eth0"), ("c4", "eth0"), ("c5", "eth9")])
    assert sorted(released) == ["10.30.0.2", "10.30.0.4", "10.30.0.5", "10.30.0.7"]
    assert sorted(files(tmp_path)) == ["10.30.0.200", "10.30.0.3", "10.30.0.6", "last_reserved_ip.0", "lock"]
    assert host_local.gc(conf_for(tmp_path, name="never-used", version="1.1.0"), []) == []
    assert not os.path.exists(os.path.join(str(tmp_path), "never-used"))


def test_api_status(tmp_path):
    host_local.status(conf_for(tmp_path / "not-yet" / "deeper", version="1.1.0"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CNIError) as info:
        host_local.status(conf_for(blocker / "sub", version="1.1.0"))
    assert info.value.code == ERR_PLUGIN_NOT_AVAILABLE


def test_api_legacy_result_version(tmp_path):
    conf = conf_for(
        tmp_path,
        {
            "subnet": None,
            "ranges": [[{"subnet": "10.40.0.0/24"}], [{"subnet": "fd00:40::/64"}]],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.40.0.1"}],
        },
        version="0.2.0",
    )
    out = host_local.allocate(conf, "c1", "eth0").to_dict()
    assert out == {
        "cniVersion": "0.2.0",
        "ip4": {"ip": "10.40.0.2/24", "gateway": "10.40.0.1", "routes": [{"dst": "0.0.0.0/0", "gw": "10.40.0.1"}]},
        "ip6": {"ip": "fd00:40::2/64", "gateway": "fd00:40::1"},
        "dns": {},
    }


# ---- pycni ipam list ---------------------------------------------------------


def test_ipam_list_command(tmp_path):
    from pycni.ipam_cmd import ipam

    conf = conf_for(tmp_path)
    host_local.allocate(conf, "c1", "eth0")
    runner = CliRunner()
    out = runner.invoke(ipam, ["list", "net1", "--data-dir", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "10.10.0.2" in out.output and "c1" in out.output
    out = runner.invoke(ipam, ["list", "net1", "--data-dir", str(tmp_path), "--json"])
    assert json.loads(out.output)["reservations"] == [{"ip": "10.10.0.2", "containerID": "c1", "ifname": "eth0"}]
    assert runner.invoke(ipam, ["list", "missing", "--data-dir", str(tmp_path)]).exit_code != 0
    assert runner.invoke(ipam, ["list", "../etc", "--data-dir", str(tmp_path)]).exit_code != 0


def test_api_threads_in_one_process_never_share_an_address(tmp_path):
    """A warm agent serves requests on threads: each takes its own flock, so no duplicates."""
    import concurrent.futures

    conf = conf_for(tmp_path, {"subnet": "10.50.0.0/24"})
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda n: host_local.allocate(conf, f"t{n}", "eth0"), range(100)))
    addresses = [r.ips[0].address for r in results]
    assert len(set(addresses)) == 100
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda n: host_local.release(conf, f"t{n}", "eth0"), range(100)))
    assert sorted(files(tmp_path)) == ["last_reserved_ip.0", "lock"]
