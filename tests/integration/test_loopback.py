"""loopback as a real process, side by side with the reference loopback."""

import sys

import pytest

from tests.helpers.plugins import reference, run_plugin
from tests.helpers.state import link

pytestmark = pytest.mark.integration

REFERENCE = reference("loopback")


def ours_cmd():
    return [sys.executable, "-m", "cni_plugins.loopback"]


def lo_up(pod):
    return "UP" in link(pod, "lo")["flags"]


@pytest.fixture
def pods(make_pod):
    return make_pod("lo-a"), make_pod("lo-b")


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0"])
def test_add_check_del_match_reference(pods, version):
    conf = {"cniVersion": version, "name": "lo", "type": "loopback"}
    results = {}
    for (label, cmd), pod in zip((("ours", ours_cmd()), ("ref", [REFERENCE])), pods):
        assert not lo_up(pod)
        add = run_plugin(cmd, "ADD", conf, netns=pod)
        assert add.code == 0, add.out
        assert lo_up(pod)
        out = add.out
        out["interfaces"][0]["sandbox"] = "<netns>"
        results[label] = out
        if version != "0.3.1":
            assert run_plugin(cmd, "CHECK", conf, netns=pod).code == 0
        delete = run_plugin(cmd, "DEL", conf, netns=pod)
        assert delete.code == 0 and not lo_up(pod)
        if version != "0.3.1":
            check = run_plugin(cmd, "CHECK", conf, netns=pod)
            assert check.code != 0 and "down" in check.out["msg"]
    if version in ("0.3.1", "0.4.0"):
        # The spec's 0.3.x/0.4.0 results carry ips[].version. Debian's v1.1.1 loopback
        # builds a 1.0.0 result labelled with the config's version and so leaves it
        # out; pycni follows the spec, so compare with that field set aside.
        assert [ip["version"] for ip in results["ours"]["ips"]] == ["4", "6"]
        for ip in results["ours"]["ips"]:
            del ip["version"]
    assert results["ours"] == results["ref"]
    ips = {ip["address"] for ip in results["ours"]["ips"]}
    assert "127.0.0.1/8" in ips


def test_legacy_version_result(pods):
    conf = {"cniVersion": "0.2.0", "name": "lo", "type": "loopback"}
    add = run_plugin(ours_cmd(), "ADD", conf, netns=pods[0])
    assert add.code == 0
    assert add.out["ip4"] == {"ip": "127.0.0.1/8"}


def test_prev_result_passes_through(pods):
    prev = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pods[0].path}],
        "ips": [{"address": "10.0.0.5/24", "interface": 0}],
        "dns": {},
    }
    conf = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback", "prevResult": prev}
    add = run_plugin(ours_cmd(), "ADD", conf, netns=pods[0])
    assert add.code == 0 and add.out == prev and lo_up(pods[0])


def test_del_on_missing_namespace_succeeds():
    conf = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}
    for cmd in (ours_cmd(), [REFERENCE]):
        assert run_plugin(cmd, "DEL", conf, netns="/var/run/netns/pycni-does-not-exist").code == 0
        assert run_plugin(cmd, "DEL", conf, netns="").code == 0


def test_add_on_missing_or_wrong_namespace_fails_cleanly(tmp_path):
    conf = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}
    plain = tmp_path / "file"
    plain.write_text("")
    for path in ("/var/run/netns/pycni-does-not-exist", str(plain), "/proc/self/ns/mnt"):
        add = run_plugin(ours_cmd(), "ADD", conf, netns=path)
        assert add.code == 1 and add.out["code"] == 8 and path in add.out["msg"]


def test_add_and_del_load_no_netlink_code(pods):
    """loopback flips lo with an ioctl: neither ADD nor DEL pays for pyroute2."""
    conf = {"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}
    cmd = [sys.executable, "-X", "importtime", "-m", "cni_plugins.loopback"]
    for command in ("ADD", "DEL"):
        outcome = run_plugin(cmd, command, conf, netns=pods[0])
        assert outcome.code == 0, outcome.out
        assert "pyroute2" not in outcome.err
