"""bandwidth plugin: configuration, naming and tc arithmetic (no kernel changes)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cni_plugins import bandwidth as bandwidth_pkg
from cni_plugins.bandwidth import config as bw
from cni_plugins.bandwidth import shaping
from cni_plugins.kernel import ip, tc
from cni_plugins.spec.errors import CNIError
from cni_plugins.spec.skel import dispatch

LIMITS = {"ingressRate": 8_000_000, "ingressBurst": 80_000, "egressRate": 50_000_000, "egressBurst": 500_000}
PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:dd:ee:ff"},
        {"name": "veth1", "mac": "aa:bb:cc:dd:ee:01"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/x"},
    ],
    "ips": [{"interface": 2, "address": "10.1.0.5/24", "gateway": "10.1.0.1"}],
    "dns": {},
}


def conf(**options) -> dict:
    return {"cniVersion": "1.0.0", "name": "net", "type": "bandwidth", **options}


# ---- configuration ------------------------------------------------------------------


def test_top_level_entry():
    got = bw.parse_bandwidth(conf(**LIMITS))
    assert (got.ingress_rate, got.ingress_burst, got.egress_rate, got.egress_burst) == (
        8_000_000,
        80_000,
        50_000_000,
        500_000,
    )
    assert got.shapes_ingress and got.shapes_egress and got.latency_ms == 25.0


def test_runtime_config_entry():
    got = bw.parse_bandwidth(conf(runtimeConfig={"bandwidth": {"egressRate": 1000, "egressBurst": 80}}))
    assert got.egress_rate == 1000 and not got.shapes_ingress and got.shapes_egress


def test_top_level_wins_whole():
    """As in the reference, the top-level entry replaces runtimeConfig's, it is not merged."""
    got = bw.parse_bandwidth(conf(ingressRate=0, runtimeConfig={"bandwidth": LIMITS}))
    assert got.is_zero()


def test_nothing_configured():
    assert bw.parse_bandwidth(conf()) is None
    assert bw.parse_bandwidth(conf(runtimeConfig={"bandwidth": None})) is None
    assert bw.parse_bandwidth(conf(runtimeConfig={"portMappings": []})) is None


@pytest.mark.parametrize(
    "options,message",
    [
        ({"ingressRate": 10}, "if rate is set, burst must also be set"),
        ({"egressBurst": 10}, "if burst is set, rate must also be set"),
        ({"ingressRate": 10, "ingressBurst": 8 * 0xFFFFFFFF}, "burst cannot be more than 4GB"),
        ({"runtimeConfig": {"bandwidth": {"egressRate": 5}}}, "if rate is set, burst must also be set"),
        ({"ingressRate": -5, "ingressBurst": 8}, "non-negative integer"),
        ({"ingressRate": 1.5, "ingressBurst": 8}, "non-negative integer"),
        ({"ingressRate": True, "ingressBurst": 8}, "non-negative integer"),
        ({"shapedSubnets": "10.0.0.0/8"}, "list of CIDR strings"),
        ({"runtimeConfig": {"bandwidth": []}}, "must be an object"),
        ({"latencyMs": -1}, "latencyMs"),
        ({"latencyMs": "25ms"}, "latencyMs"),
    ],
)
def test_invalid_entries_are_code_7(options, message):
    with pytest.raises(CNIError) as info:
        bw.parse_bandwidth(conf(**options))
    assert info.value.code == 7 and message in info.value.msg


def test_burst_just_under_4gb_is_fine():
    bw.parse_bandwidth(conf(ingressRate=10, ingressBurst=8 * 0xFFFFFFFF - 9))


def test_latency_option():
    assert bw.parse_bandwidth(conf(latencyMs=100, **LIMITS)).latency_ms == 100.0
    assert bw.parse_bandwidth(conf(latencyMs=2.5, **LIMITS)).latency_ms == 2.5


@pytest.mark.parametrize(
    "options",
    [
        {"shapedSubnets": ["10.0.0.0/8"], "unshapedSubnets": ["10.1.0.0/16"]},
        {"unshapedSubnets": ["10.0.0.300/8"]},
        {"unshapedSubnets": ["10.0.0.1"]},
    ],
)
def test_invalid_subnets(options):
    entry = bw.parse_bandwidth(conf(**options, **LIMITS))
    with pytest.raises(CNIError) as info:
        bw.validate_subnets(entry)
    assert info.value.code == 7


def test_subnets_pick_the_mode():
    shaped = bw.parse_bandwidth(conf(shapedSubnets=["10.0.0.0/8"], **LIMITS))
    unshaped = bw.parse_bandwidth(conf(unshapedSubnets=["fd00::/8"], **LIMITS))
    bw.validate_subnets(shaped)
    bw.validate_subnets(unshaped)
    assert shaped.subnets_are_shaped and shaped.subnets == ["10.0.0.0/8"]
    assert not unshaped.subnets_are_shaped and unshaped.subnets == ["fd00::/8"]


# ---- naming --------------------------------------------------------------------------


def test_ifb_name_matches_reference():
    # produced by /usr/lib/cni/bandwidth for network "bwnet", container "ctra"
    assert shaping.ifb_name("bwnet", "ctra") == "bwpd4c1d42945a1"
    assert len(shaping.ifb_name("n" * 100, "c" * 64)) == 15


def test_ifb_alias_round_trip():
    alias = shaping.ifb_alias("net-1", "abc.123", "eth0")
    assert alias == "net-1/abc.123/eth0"
    assert shaping.parse_ifb_alias(alias) == ("net-1", "abc.123", "eth0")
    for junk in ("", "something else", "a/b", "a//c", "a/b/c/d"):
        assert shaping.parse_ifb_alias(junk) is None


# ---- token bucket arithmetic ------------------------------------------------------------


def test_token_bucket_matches_reference_numbers():
    bucket = tc.TokenBucket.from_bits(8_000_000, 80_000, 25)
    assert bucket.rate == 1_000_000
    assert bucket.limit == 25_000 + 10_000
    assert bucket.buffer == int(10_000 * tc.tick_in_usec())  # 10 ms worth of ticks
    assert bucket.burst_bytes == 10_000


def test_token_bucket_truncates_like_go():
    bucket = tc.TokenBucket.from_bits(123_456_789, 9_999_999, 25)
    rate, burst = 123_456_789 // 8, 9_999_999 // 8
    assert bucket.rate == rate
    assert bucket.buffer == int(int(burst * 1_000_000 / rate) * tc.tick_in_usec())
    assert bucket.limit == int(rate * 25_000 / 1_000_000) + burst


def test_token_bucket_latency():
    assert tc.TokenBucket.from_bits(8_000_000, 80_000, 100).limit == 100_000 + 10_000


@pytest.mark.parametrize(
    "rate,burst,latency",
    [
        (7, 800, 25),  # below one byte per second
        (8, 7, 25),
        (8 * 0xFFFFFFFF + 8, 80_000, 25),  # above what the tbf rate field carries
        (8 * 0xFFFFFFFF, 8 * 0xFFFF0000, 25),  # limit over 4 GB
    ],
)
def test_token_bucket_rejects_what_the_kernel_cannot_take(rate, burst, latency):
    with pytest.raises(ValueError):
        tc.TokenBucket.from_bits(rate, burst, latency)


def test_a_burst_that_takes_days_to_send_is_clamped_to_the_buffer_field():
    # Runtimes send "no limit" as a huge burst; it is clamped, not refused (tests/unit/test_tbf_clamp.py).
    bucket = tc.TokenBucket.from_bits(8, 8 * 0xFFFFFF, 25)
    assert bucket.clamped and bucket.buffer <= 0xFFFFFFFF


def test_token_bucket_errors_become_code_7():
    entry = bw.parse_bandwidth(conf(ingressRate=7, ingressBurst=100))
    with pytest.raises(CNIError) as info:
        shaping.token_buckets(entry)
    assert info.value.code == 7


# ---- u32 keys ----------------------------------------------------------------------------


def test_subnet_keys_ipv4():
    assert tc.subnet_keys("10.99.0.0/16", match_source=True) == (tc.ETH_P_IP, ["0x0a630000/0xffff0000+12"])
    assert tc.subnet_keys("10.99.1.1/16", match_source=False) == (tc.ETH_P_IP, ["0x0a630000/0xffff0000+16"])
    assert tc.subnet_keys("0.0.0.0/0", match_source=True) == (tc.ETH_P_IP, ["0x0/0x0+12"])


def test_subnet_keys_ipv6():
    proto, keys = tc.subnet_keys("fd00:99::/64", match_source=True)
    assert proto == tc.ETH_P_IPV6
    assert keys == ["0xfd000099/0xffffffff+8", "0x00000000/0xffffffff+12"]
    assert tc.subnet_keys("2001:db8::/33", match_source=False)[1] == [
        "0x20010db8/0xffffffff+24",
        "0x00000000/0x80000000+28",
    ]


# ---- through the skeleton (no kernel state touched) ---------------------------------------------


def _env(command: str) -> dict:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/var/run/netns/nowhere",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
    }


def test_add_without_limits_passes_prev_result_through():
    out = dispatch(bandwidth_pkg.FUNCS, _env("ADD"), json.dumps(conf(prevResult=PREV)).encode())
    assert out.exit_code == 0, out.stdout
    assert json.loads(out.stdout) == PREV


def test_add_invalid_config_is_code_7():
    out = dispatch(bandwidth_pkg.FUNCS, _env("ADD"), json.dumps(conf(prevResult=PREV, ingressRate=5)).encode())
    assert out.exit_code == 1 and json.loads(out.stdout)["code"] == 7


def test_add_not_chained_is_code_7():
    out = dispatch(bandwidth_pkg.FUNCS, _env("ADD"), json.dumps(conf(**LIMITS)).encode())
    assert out.exit_code == 1
    err = json.loads(out.stdout)
    assert err["code"] == 7 and "chained" in err["msg"]


def test_version_does_not_import_pyroute2():
    code = (
        "import sys, os\n"
        "os.environ['CNI_COMMAND'] = 'VERSION'\n"
        "from cni_plugins.spec.skel import dispatch\n"
        "from cni_plugins import bandwidth\n"
        "out = dispatch(bandwidth.FUNCS, os.environ, b'')\n"
        "assert out.exit_code == 0 and '1.1.0' in out.stdout, out\n"
        # cni_plugins.kernel.netlink may register the bare package (no code runs); no module of it loads.
        "loaded = [m for m in sys.modules if m.startswith('pyroute2.')]\n"
        "assert not loaded, loaded\n"
        "assert 'IPRoute' not in vars(sys.modules.get('pyroute2', sys))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_add_without_limits_loads_no_netlink_code():
    """The common Kubernetes case (bandwidth chained, pod without limits) must not pay for netlink,
    tc or hashing: it only reads the configuration and passes prevResult through."""
    code = (
        "import json, sys\n"
        "from cni_plugins.spec.skel import dispatch\n"
        "from cni_plugins import bandwidth\n"
        f"env = {_env('ADD')!r}\n"
        f"out = dispatch(bandwidth.FUNCS, env, json.dumps({conf(prevResult=PREV)!r}).encode())\n"
        "assert out.exit_code == 0, out\n"
        "assert 'cni_plugins.bandwidth.plugin' in sys.modules\n"
        "loaded = [m for m in sys.modules if m.startswith('pyroute2.')]\n"
        "loaded += [m for m in ('cni_plugins.bandwidth.shaping', 'cni_plugins.kernel.tc', 'hashlib')\n"
        "           if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def _link(name: str, kind: str, alias: str) -> ip.Link:
    return ip.Link(
        name=name,
        index=7,
        mac="",
        mtu=1500,
        kind=kind,
        master=0,
        peer_index=0,
        oper_state="UP",
        flags=0,
        promiscuity=0,
        alias=alias,
    )


def test_gc_recognises_only_its_own_ifbs():
    """An ifb is ours when its alias names the network and its name is the hash of network and container."""
    ours = shaping.ifb_name("net", "c1")
    assert shaping.is_ifb_of(_link(ours, "ifb", "net/c1/eth0"), "net")
    assert not shaping.is_ifb_of(_link(ours, "ifb", "other/c1/eth0"), "net")  # another network's alias
    assert not shaping.is_ifb_of(_link(ours, "veth", "net/c1/eth0"), "net")  # not an ifb
    assert not shaping.is_ifb_of(_link("bwp0123456789a", "ifb", "net/c1/eth0"), "net")  # name and alias disagree
    assert not shaping.is_ifb_of(_link(ours, "ifb", ""), "net")
