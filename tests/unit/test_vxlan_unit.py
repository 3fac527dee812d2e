"""The vxlan plugin's pieces called directly: configuration, delegate derivation, cache, command flow.

No namespaces here: the bridge delegate is replaced by a recorder, so these
tests show what the plugin asks of the bridge and in which order.
"""

from __future__ import annotations

import json
import os

import pytest

from cni_plugins.shared.overlaystate import OverlayState, write_state
from cni_plugins.spec.errors import CNIError
from cni_plugins.spec.skel import CmdArgs
from cni_plugins.vxlan import cache
from cni_plugins.vxlan import plugin as vxlan_plugin
from cni_plugins.vxlan.netconf import (
    PLACEHOLDER_SUBNET,
    delegate_request,
    delegate_subnet,
    derive_delegate,
    fallback_delegate,
    load_conf,
)

STATE = OverlayState(
    network="10.244.0.0/16",
    subnet="10.244.3.0/24",
    gateway="10.244.3.1",
    mtu=1450,
    bridge="pycni0",
    vxlan_device="pycni.1",
    vni=1,
    public_ip="192.168.100.11",
    vtep_mac="0a:00:00:00:00:0b",
)


def conf(tmp_path, **options):
    base = {
        "cniVersion": "1.0.0",
        "name": "overlay",
        "type": "vxlan",
        "stateDir": str(tmp_path / "state"),
        "dataDir": str(tmp_path / "data"),
    }
    base.update(options)
    return base


def request(tmp_path, command="ADD", container_id="ctr1", ifname="eth0", **options):
    c = conf(tmp_path, **options)
    return CmdArgs(
        command=command,
        container_id=container_id,
        netns="/run/netns/pod",
        ifname=ifname,
        path="/opt/cni/bin",
        stdin_data=json.dumps(c).encode(),
        conf=c,
        cni_version=c["cniVersion"],
    )


# ---- configuration and derivation --------------------------------------------------


def test_derived_delegate_is_flannels_bridge_configuration(tmp_path):
    n = load_conf(conf(tmp_path), "1.0.0")
    assert derive_delegate(n, STATE) == {
        "cniVersion": "1.0.0",
        "name": "overlay",
        "type": "bridge",
        "bridge": "pycni0",
        "isGateway": True,
        "isDefaultGateway": True,
        "ipMasq": False,
        "mtu": 1450,
        "hairpinMode": True,
        "ipam": {
            "type": "host-local",
            "dataDir": str(tmp_path / "data"),
            "ranges": [[{"subnet": "10.244.3.0/24", "gateway": "10.244.3.1"}]],
            "routes": [{"dst": "10.244.0.0/16"}],
        },
    }


def test_defaults(tmp_path):
    n = load_conf({"name": "overlay", "type": "vxlan"}, "1.0.0")
    assert (n.state_dir, n.data_dir) == ("/run/pycni", "/var/lib/cni/networks")
    assert n.hairpin_mode and n.is_default_gateway and n.mtu == 0 and n.bridge == ""


def test_options_and_delegate_override_the_derived_keys(tmp_path):
    n = load_conf(
        conf(
            tmp_path,
            mtu=1400,
            hairpinMode=False,
            isDefaultGateway=False,
            bridge="br9",
            dns={"nameservers": ["10.96.0.10"]},
            ipam={"routes": [{"dst": "10.96.0.0/12"}], "resolvConf": "/etc/r.conf"},
            delegate={"type": "bridge", "ipMasq": True, "macspoofchk": True},
        ),
        "1.0.0",
    )
    d = derive_delegate(n, STATE)
    assert (d["mtu"], d["hairpinMode"], d["isDefaultGateway"], d["bridge"]) == (1400, False, False, "br9")
    assert d["ipMasq"] is True and d["macspoofchk"] is True and d["type"] == "bridge"
    assert d["dns"] == {"nameservers": ["10.96.0.10"]}
    assert d["ipam"]["routes"] == [{"dst": "10.96.0.0/12"}, {"dst": "10.244.0.0/16"}]
    assert d["ipam"]["resolvConf"] == "/etc/r.conf"


def test_data_dir_may_come_from_the_ipam_section(tmp_path):
    n = load_conf({"name": "overlay", "ipam": {"dataDir": "/srv/leases"}}, "1.0.0")
    assert n.data_dir == "/srv/leases"
    n = load_conf({"name": "overlay", "dataDir": "/a", "ipam": {"dataDir": "/b"}}, "1.0.0")
    assert n.data_dir == "/a"


@pytest.mark.parametrize(
    "options, code, words",
    [
        ({"mtu": 10}, 7, "MTU"),
        ({"mtu": "1400"}, 6, "integer"),
        ({"hairpinMode": 1}, 6, "hairpinMode"),
        ({"stateDir": "run/pycni"}, 7, "absolute"),
        ({"dataDir": "leases"}, 7, "absolute"),
        ({"bridge": "a-very-long-bridge-name"}, 7, "bridge name"),
        ({"delegate": {"type": "ptp"}}, 7, "not supported"),
        ({"delegate": {"ipam": {}}}, 7, "delegate.ipam"),
        ({"delegate": []}, 6, "delegate"),
        ({"ipam": {"ranges": [[{"subnet": "10.0.0.0/8"}]]}}, 7, "ipam.ranges"),
        ({"ipam": {"type": 5}}, 7, "ipam.type"),
    ],
)
def test_invalid_options(tmp_path, options, code, words):
    with pytest.raises(CNIError) as err:
        load_conf(conf(tmp_path, **options), "1.0.0")
    assert err.value.code == code
    assert words in err.value.msg


def test_fallback_delegate_can_release_by_container_id(tmp_path):
    d = fallback_delegate(load_conf(conf(tmp_path), "1.0.0"))
    assert d["type"] == "bridge" and d["ipMasq"] is False and d["name"] == "overlay"
    assert d["ipam"] == {
        "type": "host-local",
        "dataDir": str(tmp_path / "data"),
        "ranges": [[{"subnet": PLACEHOLDER_SUBNET}]],
    }


def test_delegate_request_carries_the_runtime_keys_and_version():
    delegate = {"cniVersion": "0.4.0", "name": "n", "type": "bridge"}
    request_conf = {
        "runtimeConfig": {"mac": "0a:58:00:00:00:01"},
        "prevResult": {"cniVersion": "1.0.0"},
        "cni.dev/valid-attachments": [],
        "mtu": 9000,
        "args": {"cni": {"ips": ["10.0.0.5"]}},
    }
    out = delegate_request(delegate, request_conf, "1.0.0")
    assert out["cniVersion"] == "1.0.0"
    assert out["runtimeConfig"] == {"mac": "0a:58:00:00:00:01"} and "prevResult" in out and "args" in out
    assert "cni.dev/valid-attachments" in out and "mtu" not in out
    assert delegate["cniVersion"] == "0.4.0", "the cached delegate itself is left alone"
    assert delegate_subnet({"ipam": {"ranges": [[{"subnet": "10.1.0.0/24"}]]}}) == "10.1.0.0/24"
    assert delegate_subnet({}) is None


# ---- the cache ----------------------------------------------------------------------


def test_cache_round_trip_and_file_name(tmp_path):
    state_dir = str(tmp_path)
    path = cache.save(state_dir, "overlay", "ctr1", "eth0", {"type": "bridge"})
    assert path == os.path.join(state_dir, "vxlan", "overlay-ctr1-eth0.json")
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"  # root's alone (tests/unit/test_state_trust.py)
    entry = cache.load(state_dir, "overlay", "ctr1", "eth0")
    assert entry.delegate == {"type": "bridge"} and entry.attachment == ("ctr1", "eth0")
    assert cache.load(state_dir, "overlay", "ctr1", "eth1") is None
    assert cache.remove(state_dir, "overlay", "ctr1", "eth0")
    assert not cache.remove(state_dir, "overlay", "ctr1", "eth0")
    assert os.listdir(os.path.join(state_dir, "vxlan")) == []


def test_cache_names_that_clash_get_a_hashed_file(tmp_path):
    state_dir = str(tmp_path)
    first = cache.save(state_dir, "a-b", "c", "eth0", {"n": 1})
    second = cache.save(state_dir, "a", "b-c", "eth0", {"n": 2})  # same plain name "a-b-c-eth0.json"
    assert first != second and os.path.basename(second).startswith("a-h")
    assert cache.load(state_dir, "a-b", "c", "eth0").delegate == {"n": 1}
    assert cache.load(state_dir, "a", "b-c", "eth0").delegate == {"n": 2}
    assert cache.remove(state_dir, "a", "b-c", "eth0")
    assert cache.load(state_dir, "a-b", "c", "eth0").delegate == {"n": 1}


def test_cache_long_names_and_symlinks(tmp_path):
    state_dir = str(tmp_path)
    long_id = "c" * 250
    path = cache.save(state_dir, "overlay", long_id, "eth0", {"n": 1})
    assert len(os.path.basename(path)) < 255
    assert cache.load(state_dir, "overlay", long_id, "eth0").delegate == {"n": 1}
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"network": "overlay", "containerID": "x", "ifname": "eth0", "delegate": {}}))
    os.symlink(target, os.path.join(state_dir, "vxlan", "overlay-x-eth0.json"))
    assert cache.load(state_dir, "overlay", "x", "eth0") is None, "a symlink is never followed"


def test_remove_stale_keeps_valid_attachments_and_other_networks(tmp_path):
    state_dir = str(tmp_path)
    for cid in ("keep", "drop"):
        cache.save(state_dir, "overlay", cid, "eth0", {})
    cache.save(state_dir, "other", "drop", "eth0", {})
    removed = cache.remove_stale(state_dir, "overlay", [("keep", "eth0")])
    assert [e.container_id for e in removed] == ["drop"]
    assert sorted(os.listdir(os.path.join(state_dir, "vxlan"))) == ["other-drop-eth0.json", "overlay-keep-eth0.json"]


# ---- the commands, with the bridge replaced by a recorder ----------------------------------


@pytest.fixture
def bridge_calls(monkeypatch):
    calls = []

    def fake(req, plugin_type, conf, command=None):
        calls.append((command, plugin_type, conf))
        if command == "ADD":
            from cni_plugins.spec.types import Result

            return Result.from_dict(
                {"cniVersion": conf["cniVersion"], "ips": [{"address": "10.244.3.2/24", "gateway": "10.244.3.1"}]},
                conf["cniVersion"],
            )
        return None

    monkeypatch.setattr(vxlan_plugin, "run_in_process", fake)
    return calls


def test_add_caches_then_delegates_and_del_uses_the_cache(tmp_path, bridge_calls):
    write_state(str(tmp_path / "state"), STATE)
    result = vxlan_plugin.cmd_add(request(tmp_path))
    assert result.ips[0].address == "10.244.3.2/24"
    command, plugin_type, delegated = bridge_calls[-1]
    assert (command, plugin_type) == ("ADD", "bridge")
    assert delegated["ipam"]["ranges"] == [[{"subnet": "10.244.3.0/24", "gateway": "10.244.3.1"}]]
    assert cache.load(str(tmp_path / "state"), "overlay", "ctr1", "eth0").delegate["mtu"] == 1450

    # The lease changes; DEL still uses what ADD used.
    write_state(
        str(tmp_path / "state"),
        OverlayState(**{**STATE.__dict__, "subnet": "10.244.7.0/24", "gateway": "10.244.7.1", "extra": {}}),
    )
    vxlan_plugin.cmd_del(request(tmp_path, "DEL"))
    command, _, delegated = bridge_calls[-1]
    assert command == "DEL" and delegate_subnet(delegated) == "10.244.3.0/24"
    assert cache.load(str(tmp_path / "state"), "overlay", "ctr1", "eth0") is None


def test_failed_add_drops_the_cache_entry(tmp_path, monkeypatch):
    write_state(str(tmp_path / "state"), STATE)

    def failing(req, plugin_type, conf, command=None):
        raise CNIError(999, "bridge failed")

    monkeypatch.setattr(vxlan_plugin, "run_in_process", failing)
    with pytest.raises(CNIError, match="bridge failed"):
        vxlan_plugin.cmd_add(request(tmp_path))
    assert cache.load(str(tmp_path / "state"), "overlay", "ctr1", "eth0") is None


def test_a_failed_repeat_add_keeps_the_live_attachments_entry(tmp_path, monkeypatch, bridge_calls):
    state_dir = str(tmp_path / "state")
    write_state(state_dir, STATE)
    vxlan_plugin.cmd_add(request(tmp_path))
    write_state(
        state_dir, OverlayState(**{**STATE.__dict__, "subnet": "10.244.7.0/24", "gateway": "10.244.7.1", "extra": {}})
    )

    def failing(req, plugin_type, conf, command=None):
        raise CNIError(999, "container already has eth0")

    monkeypatch.setattr(vxlan_plugin, "run_in_process", failing)
    with pytest.raises(CNIError):
        vxlan_plugin.cmd_add(request(tmp_path))
    assert delegate_subnet(cache.load(state_dir, "overlay", "ctr1", "eth0").delegate) == "10.244.3.0/24"


def test_failed_del_keeps_the_cache_entry_for_the_retry(tmp_path, monkeypatch, bridge_calls):
    write_state(str(tmp_path / "state"), STATE)
    vxlan_plugin.cmd_add(request(tmp_path))

    def failing(req, plugin_type, conf, command=None):
        raise CNIError(5, "cannot release")

    monkeypatch.setattr(vxlan_plugin, "run_in_process", failing)
    with pytest.raises(CNIError):
        vxlan_plugin.cmd_del(request(tmp_path, "DEL"))
    assert cache.load(str(tmp_path / "state"), "overlay", "ctr1", "eth0") is not None


def test_del_without_state_or_cache_uses_the_fallback(tmp_path, bridge_calls):
    vxlan_plugin.cmd_del(request(tmp_path, "DEL"))
    command, _, delegated = bridge_calls[-1]
    assert command == "DEL" and delegate_subnet(delegated) == PLACEHOLDER_SUBNET
    assert delegated["ipam"]["dataDir"] == str(tmp_path / "data")


def test_del_with_a_corrupt_state_file_still_succeeds(tmp_path, bridge_calls):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "overlay.json").write_text("{")
    vxlan_plugin.cmd_del(request(tmp_path, "DEL"))
    assert delegate_subnet(bridge_calls[-1][2]) == PLACEHOLDER_SUBNET


def test_add_without_state_is_try_again(tmp_path, bridge_calls):
    with pytest.raises(CNIError) as err:
        vxlan_plugin.cmd_add(request(tmp_path))
    assert err.value.code == 11 and "pycni agent" in err.value.details
    assert bridge_calls == []


def test_status_codes(tmp_path, bridge_calls, monkeypatch):
    req = request(tmp_path, "STATUS", cniVersion="1.1.0")
    with pytest.raises(CNIError) as err:
        vxlan_plugin.cmd_status(req)
    assert err.value.code == 50
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "overlay.json").write_text("[]")
    with pytest.raises(CNIError) as err:
        vxlan_plugin.cmd_status(req)
    assert err.value.code == 50 and "overlay state" in err.value.msg
    write_state(str(tmp_path / "state"), STATE)
    monkeypatch.setattr(vxlan_plugin, "_link_exists", lambda name: False)
    with pytest.raises(CNIError) as err:
        vxlan_plugin.cmd_status(req)
    assert err.value.code == 51
    monkeypatch.setattr(vxlan_plugin, "_link_exists", lambda name: True)
    vxlan_plugin.cmd_status(req)
    assert bridge_calls[-1][0] == "STATUS"


def test_gc_passes_the_valid_list_and_prunes_the_cache(tmp_path, bridge_calls):
    write_state(str(tmp_path / "state"), STATE)
    for cid in ("a", "b"):
        vxlan_plugin.cmd_add(request(tmp_path, container_id=cid))
    valid = [{"containerID": "a", "ifname": "eth0"}]
    vxlan_plugin.cmd_gc(request(tmp_path, "GC", cniVersion="1.1.0", **{"cni.dev/valid-attachments": valid}))
    command, _, delegated = bridge_calls[-1]
    assert command == "GC" and delegated["cni.dev/valid-attachments"] == valid
    assert [e.container_id for e in cache.entries(str(tmp_path / "state"), "overlay")] == ["a"]


def test_check_refuses_a_pod_from_an_old_subnet(tmp_path, bridge_calls):
    write_state(str(tmp_path / "state"), STATE)
    vxlan_plugin.cmd_add(request(tmp_path))
    vxlan_plugin.cmd_check(request(tmp_path, "CHECK", prevResult={"cniVersion": "1.0.0"}))
    assert bridge_calls[-1][0] == "CHECK" and "prevResult" in bridge_calls[-1][2]
    write_state(
        str(tmp_path / "state"),
        OverlayState(**{**STATE.__dict__, "subnet": "10.244.7.0/24", "gateway": "10.244.7.1", "extra": {}}),
    )
    with pytest.raises(CNIError) as err:
        vxlan_plugin.cmd_check(request(tmp_path, "CHECK", prevResult={"cniVersion": "1.0.0"}))
    assert "10.244.3.0/24" in err.value.msg


def test_version_does_not_import_the_plugin_module():
    import subprocess
    import sys

    code = (
        "import os, sys, io; os.environ['CNI_COMMAND'] = 'VERSION'\n"
        "from cni_plugins.vxlan import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write(str(sorted(m for m in sys.modules if m.startswith('cni_plugins.vxlan'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert json.loads(proc.stdout)["supportedVersions"][-1] == "1.1.0"
    assert "cni_plugins.vxlan.plugin" not in proc.stderr


def test_the_plugin_imports_only_downwards():
    """cni_plugins never imports ipam or pycni (DESIGN.md, Layers)."""
    import ast
    import pathlib

    package = pathlib.Path(vxlan_plugin.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("ipam", "pycni"), f"{source.name} imports {name}"


def test_del_and_gc_remove_what_a_killed_add_left_and_spare_a_writer_at_work(tmp_path):
    import subprocess

    state_dir = str(tmp_path)
    cache.save(state_dir, "net", "c1", "eth0", {"type": "bridge"})
    dead_pid = subprocess.Popen(["true"])  # a process that has ended and been reaped: its PID names nobody now
    dead_pid.wait()
    directory = cache.cache_dir(state_dir)
    orphan = os.path.join(directory, f"{cache.TMP_PREFIX}{dead_pid.pid}-abcd.tmp")
    working = os.path.join(directory, f"{cache.TMP_PREFIX}{os.getpid()}-efgh.tmp")
    for path in (orphan, working):
        with open(path, "w") as fh:
            fh.write("{")
    assert cache.remove(state_dir, "net", "c1", "eth0")
    assert not os.path.exists(orphan) and os.path.exists(working)
    os.unlink(working)
    with open(orphan, "w") as fh:
        fh.write("{")
    cache.remove_stale(state_dir, "net", [])
    assert not os.path.exists(orphan)
