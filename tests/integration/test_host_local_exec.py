"""host-local as an executable, side by side with the reference /usr/lib/cni/host-local.

Both run as real processes with the CNI environment and stdin, each on its own
temporary dataDir (or on one shared dataDir where the test is about sharing).
host-local only touches files and never enters CNI_NETNS; CNI_NETNS still names
a real (empty) namespace of the module, so that the warm half is really served by
the agent (which refuses a path that is no network namespace and leaves the
request to run cold).

Where the reference (v1.1.1) departs from the spec we follow the spec and the
test says so: the reference reports every error as 999 (internal), pycni uses
7 (invalid config) and 4 (invalid environment) for bad input; the reference
accepts a gateway outside the subnet, which upstream host-local now rejects.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from dataclasses import dataclass, field
from typing import Any

import pytest

import netns
from tests.helpers.plugins import Outcome, has_reference, reference, run_plugin

REFERENCE = reference("host-local")
POD_NETNS = ""  # the module's namespace (pod_netns), set before any test runs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not has_reference("host-local"), reason="reference host-local not installed"),
]


@pytest.fixture(scope="module", autouse=True)
def pod_netns():
    """One empty namespace for every request's CNI_NETNS (host-local never enters it)."""
    global POD_NETNS
    with netns.temporary("pt-hle") as ns:
        POD_NETNS = ns.path
        try:
            yield ns.path
        finally:
            POD_NETNS = ""


@pytest.fixture(scope="module")
def pycni_bin(launcher_dir) -> str:
    """Our host-local executable, as `pycni install` writes it."""
    return os.path.join(launcher_dir, "host-local")


def run(binary: str, command: str, conf: dict, cid: str = "c1", ifname: str = "eth0", args: str = "") -> Outcome:
    outcome = run_plugin(binary, command, conf, netns=POD_NETNS, container_id=cid, ifname=ifname, args=args)
    assert "Traceback" not in json.dumps(outcome.out)
    return outcome


def snapshot(data_dir: str, network: str = "net1") -> dict[str, tuple[str, bytes]] | None:
    path = os.path.join(data_dir, network)
    if not os.path.isdir(path):
        return None
    return {
        name: (oct(os.stat(os.path.join(path, name)).st_mode), open(os.path.join(path, name), "rb").read())
        for name in sorted(os.listdir(path))
    }


def make_conf(data_dir: str, ipam: dict, version: str = "1.0.0", **top: Any) -> dict:
    conf = {
        "cniVersion": version,
        "name": "net1",
        "type": "bridge",
        "ipam": {"type": "host-local", "dataDir": data_dir, **ipam},
    }
    conf.update(top)
    return conf


@dataclass
class Step:
    command: str
    cid: str
    ifname: str = "eth0"
    args: str = ""
    top: dict = field(default_factory=dict)  # extra top-level config keys (args, runtimeConfig)


@pytest.fixture
def dirs(tmp_path):
    ref, ours = tmp_path / "ref", tmp_path / "ours"
    ref.mkdir()
    ours.mkdir()
    return str(ref), str(ours)


def compare(pycni_bin: str, dirs, ipam: dict, steps: list[Step], version: str = "1.0.0") -> list[Outcome]:
    """Run every step on both plugins and insist on the same outcome and the same files."""
    ref_dir, our_dir = dirs
    outcomes = []
    for n, step in enumerate(steps):
        ref = run(
            REFERENCE, step.command, make_conf(ref_dir, ipam, version, **step.top), step.cid, step.ifname, step.args
        )
        ours = run(
            pycni_bin, step.command, make_conf(our_dir, ipam, version, **step.top), step.cid, step.ifname, step.args
        )
        where = f"step {n} {step}"
        assert ours.code == ref.code, f"{where}: reference {ref.out}, pycni {ours.out}"
        if ref.code == 0:
            assert ours.out == ref.out, where
        else:
            assert ours.error == ref.error, where
        assert snapshot(our_dir) == snapshot(ref_dir), where
        outcomes.append(ours)
    return outcomes


def addresses(outcomes: list[Outcome]) -> list[str]:
    return [ip["address"] for o in outcomes if o.code == 0 and o.out and "ips" in o.out for ip in o.out["ips"]]


# ---- same answers as the reference ---------------------------------------------


def test_sequence_with_exhaustion_release_and_reuse(pycni_bin, dirs):
    ipam = {"subnet": "10.1.2.0/29", "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.1.2.1"}]}
    steps = [Step("ADD", f"c{n}") for n in range(1, 7)]
    steps += [
        Step("DEL", "c3"),
        Step("ADD", "c7"),
        Step("ADD", "c1"),
        Step("DEL", "nobody"),
        Step("CHECK", "c1"),
        Step("CHECK", "c9"),
        Step("ADD", "c8"),
        Step("DEL", "c1"),
        Step("DEL", "c1"),
        Step("ADD", "c9"),
        Step("ADD", "c1", "eth1"),
    ]
    outcomes = compare(pycni_bin, dirs, ipam, steps)
    assert outcomes[5].error == (
        999,
        "failed to allocate for range 0: no IP addresses available in range set: 10.1.2.1-10.1.2.6",
    )
    assert addresses(outcomes)[:5] == [f"10.1.2.{n}/29" for n in range(2, 7)]


def test_multi_range_set_with_bounds_and_gateway(pycni_bin, dirs):
    ipam = {
        "ranges": [
            [
                {"subnet": "10.2.0.0/28", "rangeStart": "10.2.0.10", "rangeEnd": "10.2.0.12", "gateway": "10.2.0.11"},
                {"subnet": "10.3.0.0/29", "rangeEnd": "10.3.0.3"},
            ]
        ]
    }
    steps = [Step("ADD", f"c{n}") for n in range(6)] + [
        Step("DEL", "c2"),
        Step("DEL", "c0"),
        Step("ADD", "c6"),
        Step("ADD", "c7"),
        Step("ADD", "c8"),
    ]
    compare(pycni_bin, dirs, ipam, steps)


@pytest.mark.parametrize("version", ["0.2.0", "0.3.1", "0.4.0", "1.0.0"])
def test_dual_stack_every_result_version(pycni_bin, dirs, version):
    ipam = {
        "ranges": [[{"subnet": "10.4.0.0/24"}], [{"subnet": "fd00:4::/64", "rangeStart": "fd00:4::10"}]],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0", "gw": "fd00:4::1"}],
    }
    steps = [Step("ADD", "c1"), Step("ADD", "c2"), Step("DEL", "c1"), Step("ADD", "c3")]
    if version >= "0.4.0":
        steps += [Step("CHECK", "c2"), Step("CHECK", "c1")]
    outcomes = compare(pycni_bin, dirs, ipam, steps, version)
    assert outcomes[0].code == 0


def test_several_range_sets_per_family(pycni_bin, dirs):
    ipam = {"ranges": [[{"subnet": "10.5.0.0/30"}], [{"subnet": "10.6.0.0/30"}], [{"subnet": "fd00:6::/126"}]]}
    steps = [Step("ADD", "c1"), Step("ADD", "c2"), Step("DEL", "c1"), Step("ADD", "c3")]
    outcomes = compare(pycni_bin, dirs, ipam, steps, "0.3.1")
    assert outcomes[1].error[1].startswith("failed to allocate for range 0")  # /30: one address besides the gw


def _requested_steps(request) -> list[Step]:
    """c1 asks for .5 (granted), c2 for .5 (taken), c3 for an address outside every range, c4 for the
    gateway, c5 for nothing."""
    return [
        request("c1", "10.7.0.5"),
        request("c2", "10.7.0.5"),
        request("c3", "10.99.0.5"),
        request("c4", "10.7.0.1"),
        Step("ADD", "c5"),
        Step("DEL", "c1"),
        request("c6", "10.7.0.5/24"),
    ]


@pytest.mark.parametrize("route", ["cni_args", "args.cni.ips", "runtimeConfig.ips"])
def test_requested_ips_through_every_route(pycni_bin, dirs, route):
    def request(cid: str, ip: str) -> Step:
        if route == "cni_args":
            return Step("ADD", cid, args=f"IgnoreUnknown=1;IP={ip.split('/')[0]}")
        if route == "args.cni.ips":
            return Step("ADD", cid, top={"args": {"cni": {"ips": [ip]}}})
        return Step("ADD", cid, top={"runtimeConfig": {"ips": [ip]}})

    outcomes = compare(pycni_bin, dirs, {"subnet": "10.7.0.0/24"}, _requested_steps(request))
    assert outcomes[0].out["ips"][0]["address"] == "10.7.0.5/24"
    assert outcomes[1].error == (
        999,
        "failed to allocate for range 0: requested IP address 10.7.0.5 is not "
        "available in range set 10.7.0.1-10.7.0.254",
    )
    assert outcomes[2].error == (999, "failed to allocate all requested IPs: 10.99.0.5")
    # c3's failed ADD reserved .6 before failing and released it, but the round-robin moved on
    assert outcomes[4].out["ips"][0]["address"] == "10.7.0.7/24"


def test_requested_dual_stack_addresses(pycni_bin, dirs):
    ipam = {"ranges": [[{"subnet": "10.8.0.0/24"}], [{"subnet": "fd00:8::/64"}]]}
    want = {"runtimeConfig": {"ips": ["fd00:8::99", "10.8.0.99"]}}
    steps = [Step("ADD", "c1", top=want), Step("ADD", "c2", top=want), Step("ADD", "c3"), Step("DEL", "c1")]
    outcomes = compare(pycni_bin, dirs, ipam, steps)
    assert [ip["address"] for ip in outcomes[0].out["ips"]] == ["10.8.0.99/24", "fd00:8::99/64"]


def test_comma_separated_ip_arg_goes_beyond_the_reference(pycni_bin, tmp_path):
    conf = make_conf(str(tmp_path), {"ranges": [[{"subnet": "10.9.0.0/24"}], [{"subnet": "fd00:9::/64"}]]})
    ours = run(pycni_bin, "ADD", conf, "c1", args="IP=10.9.0.50,fd00:9::50")
    assert [ip["address"] for ip in ours.out["ips"]] == ["10.9.0.50/24", "fd00:9::50/64"]


def test_resolv_conf(pycni_bin, dirs, tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(
        "# generated\nnameserver 10.0.0.53\nnameserver fd00::53\ndomain example.org\n"
        "search a.example.org b.example.org\noptions ndots:2 edns0\n"
    )
    outcomes = compare(pycni_bin, dirs, {"subnet": "10.10.0.0/24", "resolvConf": str(resolv)}, [Step("ADD", "c1")])
    assert outcomes[0].out["dns"]["nameservers"] == ["10.0.0.53", "fd00::53"]


def test_ip_ranges_capability(pycni_bin, dirs):
    runtime = {"runtimeConfig": {"ipRanges": [[{"subnet": "10.11.0.0/24", "rangeStart": "10.11.0.100"}]]}}
    compare(
        pycni_bin,
        dirs,
        {"ranges": [[{"subnet": "fd00:11::/64"}]]},
        [Step("ADD", "c1", top=runtime), Step("ADD", "c2", top=runtime), Step("DEL", "c1", top=runtime)],
    )


def test_release_of_legacy_id_only_files(pycni_bin, dirs):
    ref_dir, our_dir = dirs
    for d in dirs:
        os.makedirs(os.path.join(d, "net1"))
        with open(os.path.join(d, "net1", "10.12.0.7"), "w") as handle:
            handle.write("old-container")
    compare(
        pycni_bin,
        dirs,
        {"subnet": "10.12.0.0/24"},
        [Step("CHECK", "old-container"), Step("DEL", "old-container"), Step("CHECK", "old-container")],
        "0.4.0",
    )
    assert "10.12.0.7" not in snapshot(our_dir)


# ---- bad input ----------------------------------------------------------------

BAD_IPAM = [
    ({"subnet": "10.20.0.0/31"}, 7, "too small"),
    ({"subnet": "10.20.0.0/32"}, 7, "too small"),
    ({"subnet": "fd00::/127"}, 7, "too small"),
    ({"subnet": "fd00::/128"}, 7, "too small"),
    ({"subnet": "10.20.0.1/24"}, 7, "host bits"),
    ({"subnet": "10.20.0.0/24", "rangeStart": "10.21.0.1"}, 7, "rangeStart"),
    ({"subnet": "10.20.0.0/24", "rangeEnd": "10.21.0.1"}, 7, "rangeEnd"),
    ({"ranges": [[{"subnet": "10.20.0.0/24"}], [{"subnet": "10.20.0.0/25"}]]}, 7, "overlaps"),
    ({"ranges": [[{"subnet": "10.20.0.0/24"}, {"subnet": "10.20.0.0/25"}]]}, 7, "overlap"),
    ({"ranges": [[{"subnet": "10.20.0.0/24"}, {"subnet": "fd00::/64"}]]}, 7, "mixed address families"),
    ({"ranges": [[]]}, 7, "empty range set"),
    ({}, 7, "no IP ranges"),
    ({"subnet": "bogus"}, 7, "invalid CIDR"),
    ({"subnet": "10.20.0.0/24", "routes": [{"dst": "bad"}]}, 7, "routes[0].dst"),
    ({"subnet": "10.20.0.0/24", "resolvConf": "/nonexistent/resolv.conf"}, 5, "resolvConf"),
]


@pytest.mark.parametrize("ipam, code, words", BAD_IPAM)
def test_bad_config_is_rejected_and_changes_nothing(pycni_bin, dirs, ipam, code, words):
    ref_dir, our_dir = dirs
    ref = run(REFERENCE, "ADD", make_conf(ref_dir, ipam))
    ours = run(pycni_bin, "ADD", make_conf(our_dir, ipam))
    assert ref.code != 0 and ours.code != 0
    assert ref.out["code"] == 999  # the reference reports all errors as internal; the spec has codes for these
    assert ours.out["code"] == code and words in ours.out["msg"], ours.out
    assert snapshot(our_dir) is None and snapshot(ref_dir) is None


@pytest.mark.parametrize("args, words", [("IP=10.30.0.300", "invalid IP"), ("FOO=bar", "unknown argument")])
def test_bad_cni_args(pycni_bin, dirs, args, words):
    ref_dir, our_dir = dirs
    ref = run(REFERENCE, "ADD", make_conf(ref_dir, {"subnet": "10.30.0.0/24"}), args=args)
    ours = run(pycni_bin, "ADD", make_conf(our_dir, {"subnet": "10.30.0.0/24"}), args=args)
    assert ref.code != 0 and ours.code != 0 and ours.out["code"] == 4 and words in ours.out["msg"]
    assert snapshot(our_dir) is None


def test_missing_ipam_and_two_addresses_per_family_in_old_versions(pycni_bin, tmp_path):
    no_ipam = {"cniVersion": "1.0.0", "name": "net1", "type": "bridge"}
    assert run(pycni_bin, "ADD", no_ipam).out["code"] == 7
    old = make_conf(str(tmp_path), {"ranges": [[{"subnet": "10.31.0.0/24"}], [{"subnet": "10.32.0.0/24"}]]}, "0.2.0")
    ours = run(pycni_bin, "ADD", old)
    assert ours.out["code"] == 7 and "more than 1 address per family" in ours.out["msg"]
    assert snapshot(str(tmp_path)) is None


def test_gateway_outside_subnet_rejected_like_upstream(pycni_bin, tmp_path):
    # v1.1.1 accepts it (and hands out .1); upstream host-local rejects it, and so do we.
    ours = run(pycni_bin, "ADD", make_conf(str(tmp_path), {"subnet": "10.33.0.0/24", "gateway": "10.34.0.1"}))
    assert ours.out["code"] == 7 and "gateway 10.34.0.1 not in network 10.33.0.0/24" in ours.out["msg"]


# ---- sharing one directory with the reference ---------------------------------------


def test_interleaved_with_reference_on_one_directory(pycni_bin, tmp_path):
    conf = make_conf(str(tmp_path), {"ranges": [[{"subnet": "10.40.0.0/28"}], [{"subnet": "fd00:40::/124"}]]})
    binaries = [REFERENCE, pycni_bin]
    got = []
    for n in range(12):
        outcome = run(binaries[n % 2], "ADD", conf, f"c{n}")
        assert outcome.code == 0, outcome.out
        got.append([ip["address"] for ip in outcome.out["ips"]])
    assert [g[0] for g in got] == [f"10.40.0.{n}/28" for n in range(2, 14)]  # one round-robin sequence
    assert [g[1] for g in got] == [f"fd00:40::{n:x}/124" for n in range(2, 14)]
    last = run(REFERENCE, "ADD", conf, "c98")
    assert [ip["address"] for ip in last.out["ips"]] == ["10.40.0.14/28", "fd00:40::e/124"]
    full = run(pycni_bin, "ADD", conf, "c99")
    assert full.error == (
        999,
        "failed to allocate for range 0: no IP addresses available in range set: 10.40.0.1-10.40.0.14",
    )
    for n in range(12):  # each releases what the other one reserved
        assert run(binaries[(n + 1) % 2], "DEL", conf, f"c{n}").code == 0
    assert run(pycni_bin, "DEL", conf, "c98").code == 0
    assert sorted(snapshot(str(tmp_path))) == ["last_reserved_ip.0", "last_reserved_ip.1", "lock"]


def test_200_concurrent_adds_then_dels(pycni_bin, tmp_path):
    """Separate processes, 16 at a time, every fourth one the reference: no address twice."""
    conf = make_conf(str(tmp_path), {"subnet": "10.50.0.0/24"})

    def one(command: str, n: int) -> Outcome:
        return run(REFERENCE if n % 4 == 0 else pycni_bin, command, conf, f"pod-{n}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        adds = list(pool.map(lambda n: one("ADD", n), range(200)))
        assert all(a.code == 0 for a in adds), [a.out for a in adds if a.code]
        ips = [a.out["ips"][0]["address"] for a in adds]
        assert len(set(ips)) == 200
        files = snapshot(str(tmp_path))
        assert len([f for f in files if f.startswith("10.50.0.")]) == 200
        owners = {files[ip.split("/")[0]][1] for ip in ips}
        assert owners == {f"pod-{n}\r\neth0".encode() for n in range(200)}
        dels = list(pool.map(lambda n: one("DEL", n), range(200)))
    assert all(d.code == 0 for d in dels)
    assert sorted(snapshot(str(tmp_path))) == ["last_reserved_ip.0", "lock"]


# ---- what the reference cannot do: GC and STATUS (spec 1.1.0) -------------------------------


def test_gc_releases_exactly_the_invalid_attachments(pycni_bin, tmp_path):
    old = make_conf(str(tmp_path), {"subnet": "10.60.0.0/24"})
    for n in range(6):
        binary = REFERENCE if n % 2 else pycni_bin
        assert run(binary, "ADD", old, f"c{n}").code == 0
    valid = [
        {"containerID": "c1", "ifname": "eth0"},
        {"containerID": "c4", "ifname": "eth0"},
        {"containerID": "c5", "ifname": "eth1"},
    ]
    new = make_conf(str(tmp_path), {"subnet": "10.60.0.0/24"}, "1.1.0", **{"cni.dev/valid-attachments": valid})
    assert run(pycni_bin, "GC", new, "").code == 0
    left = {name: data for name, (_, data) in snapshot(str(tmp_path)).items() if name.startswith("10.")}
    assert left == {"10.60.0.3": b"c1\r\neth0", "10.60.0.6": b"c4\r\neth0"}
    assert run(pycni_bin, "CHECK", make_conf(str(tmp_path), {"subnet": "10.60.0.0/24"}, "1.1.0"), "c4").code == 0


def test_gc_without_attachment_list_releases_nothing(pycni_bin, tmp_path):
    conf = make_conf(str(tmp_path), {"subnet": "10.63.0.0/24"}, "1.1.0")
    assert run(pycni_bin, "ADD", conf, "c1").code == 0
    outcome = run(pycni_bin, "GC", conf, "")
    assert outcome.code != 0 and outcome.out["code"] == 7
    assert "10.63.0.2" in snapshot(str(tmp_path))
    empty = dict(conf, **{"cni.dev/valid-attachments": []})
    assert run(pycni_bin, "GC", empty, "").code == 0
    assert "10.63.0.2" not in snapshot(str(tmp_path))


def test_status(pycni_bin, tmp_path):
    good = make_conf(str(tmp_path / "store"), {"subnet": "10.61.0.0/24"}, "1.1.0")
    assert run(pycni_bin, "STATUS", good, "").code == 0
    (tmp_path / "file").write_text("")
    bad = make_conf(str(tmp_path / "file" / "store"), {"subnet": "10.61.0.0/24"}, "1.1.0")
    outcome = run(pycni_bin, "STATUS", bad, "")
    assert outcome.code != 0 and outcome.out["code"] == 50


def test_result_1_1_0_and_version(pycni_bin, tmp_path):
    conf = make_conf(str(tmp_path), {"subnet": "10.62.0.0/24", "routes": [{"dst": "0.0.0.0/0", "mtu": 1400}]}, "1.1.0")
    outcome = run(pycni_bin, "ADD", conf)
    assert outcome.out == {
        "cniVersion": "1.1.0",
        "ips": [{"address": "10.62.0.2/24", "gateway": "10.62.0.1"}],
        "routes": [{"dst": "0.0.0.0/0", "mtu": 1400}],
        "dns": {},
    }
    version = run(pycni_bin, "VERSION", {})
    assert "1.1.0" in version.out["supportedVersions"]


@pytest.mark.parametrize("version", ["0.2.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_in_process_api_matches_the_executable(pycni_bin, tmp_path, version):
    from cni_plugins.spec.errors import CNIError
    from ipam import host_local

    ipam = {
        "ranges": [[{"subnet": "10.70.0.0/30"}], [{"subnet": "fd00:70::/64"}]],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.70.0.1"}],
    }
    api_dir, exe_dir = str(tmp_path / "api"), str(tmp_path / "exe")
    api_conf, exe_conf = make_conf(api_dir, ipam, version), make_conf(exe_dir, ipam, version)
    assert host_local.allocate(api_conf, "c1", "eth0").to_dict(version) == run(pycni_bin, "ADD", exe_conf).out
    with pytest.raises(CNIError) as info:  # the /30 has one address besides the gateway
        host_local.allocate(api_conf, "c2", "eth0")
    assert (info.value.code, info.value.msg) == run(pycni_bin, "ADD", exe_conf, "c2").error
    assert snapshot(api_dir) == snapshot(exe_dir)
    assert sorted(host_local.release(api_conf, "c1", "eth0")) == ["10.70.0.2", "fd00:70::2"]
    assert run(pycni_bin, "DEL", exe_conf, "c1").code == 0
    assert snapshot(api_dir) == snapshot(exe_dir)
