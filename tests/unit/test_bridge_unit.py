"""bridge without namespaces: configuration, gateway planning, IPAM delegation, rollback."""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from cni_plugins.bridge import config as bridge_config
from cni_plugins.bridge import plugin as bridge
from cni_plugins.shared import ipam as ipam_exec
from cni_plugins.spec.exec import find_plugin
from cni_plugins.spec.errors import CNIError
from cni_plugins.spec.skel import CmdArgs
from cni_plugins.spec.types import Result, Route


def conf(**options):
    base = {"cniVersion": "1.0.0", "name": "net", "type": "bridge"}
    base.update(options)
    return base


# ---- configuration ------------------------------------------------------------------


def test_defaults_match_the_reference():
    n = bridge.load_conf(conf(), "")
    assert n.bridge == "cni0"
    assert not (n.is_gateway or n.is_default_gateway or n.ip_masq or n.hairpin_mode or n.promisc_mode)
    assert n.ip_masq_backend == "nftables" and n.mtu == 0 and n.vlan == 0 and n.vlans == []
    assert not n.is_layer3 and not n.vlan_filtering and n.mac == ""


def test_default_gateway_implies_gateway():
    n = bridge.load_conf(conf(isDefaultGateway=True), "")
    assert n.is_gateway and n.is_default_gateway


def test_mac_precedence():
    args = "IgnoreUnknown=1;MAC=0a:00:00:00:00:01"
    assert bridge.load_conf(conf(), args).mac == "0a:00:00:00:00:01"
    assert bridge.load_conf(conf(args={"cni": {"mac": "0a:00:00:00:00:02"}}), args).mac == "0a:00:00:00:00:02"
    both = conf(args={"cni": {"mac": "0a:00:00:00:00:02"}}, runtimeConfig={"mac": "0A:00:00:00:00:03"})
    assert bridge.load_conf(both, args).mac == "0a:00:00:00:00:03"


@pytest.mark.parametrize("mac", ["zz:00:00:00:00:01", "0a:00:00:00:00", "01:00:00:00:00:01"])
def test_bad_mac_is_a_config_error(mac):
    with pytest.raises(CNIError) as err:
        bridge.load_conf(conf(runtimeConfig={"mac": mac}), "")
    assert err.value.code == 7


def test_unknown_cni_args_need_ignore_unknown():
    with pytest.raises(CNIError):
        bridge.load_conf(conf(), "FOO=bar")
    assert bridge.load_conf(conf(), "IgnoreUnknown=1;FOO=bar").mac == ""


def test_vlan_trunk_expands_sorted_and_unique():
    n = bridge.load_conf(conf(vlanTrunk=[{"id": 42}, {"minID": 10, "maxID": 12}, {"id": 11}]), "")
    assert n.vlans == [10, 11, 12, 42] and n.vlan_filtering


@pytest.mark.parametrize(
    "trunk, message",
    [
        ([{"minID": 0, "maxID": 3}], "minID"),
        ([{"minID": 5, "maxID": 4095}], "maxID"),
        ([{"minID": 9, "maxID": 3}], "greater"),
        ([{"maxID": 3}], "minID is missing"),
        ([{"minID": 3}], "maxID is missing"),
        ([{"id": 4095}], "trunk id"),
    ],
)
def test_bad_vlan_trunk(trunk, message):
    with pytest.raises(CNIError) as err:
        bridge.load_conf(conf(vlanTrunk=trunk), "")
    assert message in err.value.msg


@pytest.mark.parametrize(
    "options, code",
    [
        ({"vlan": 4095}, 7),
        ({"vlan": -1}, 7),
        ({"vlan": 3, "vlanTrunk": [{"id": 4}]}, 7),
        ({"mtu": 20}, 7),
        ({"mtu": "1500"}, 6),
        ({"isGateway": "yes"}, 6),
        ({"ipMasqBackend": "pf"}, 7),
        ({"bridge": "a-much-too-long-bridge-name"}, 7),
        ({"ipam": []}, 7),
    ],
)
def test_invalid_options(options, code):
    with pytest.raises(CNIError) as err:
        bridge.load_conf(conf(**options), "")
    assert err.value.code == code


@pytest.mark.parametrize(
    "options",
    [{"hairpinMode": True, "promiscMode": True}, {"disableContainerInterface": True, "ipam": {"type": "host-local"}}],
)
def test_conflicting_options_rejected_before_any_change(options):
    req = CmdArgs(command="ADD", container_id="c", netns="/nonexistent", ifname="eth0", conf=conf(**options))
    with pytest.raises(CNIError) as err:
        bridge.cmd_add(req)
    assert err.value.code == 7


# ---- gateways --------------------------------------------------------------------


def ipam_result(*addresses, gateway=None, routes=()):
    return Result.from_dict(
        {
            "cniVersion": "1.0.0",
            "ips": [{"address": a, **({"gateway": gateway} if gateway else {})} for a in addresses],
            "routes": list(routes),
        },
        "1.0.0",
    )


def test_gateways_default_to_first_address_of_the_subnet():
    result = ipam_result("10.1.2.7/24", "fd00:1::7/64")
    gws = bridge.plan_gateways(result, bridge.load_conf(conf(isDefaultGateway=True), ""))
    assert [ip.gateway for ip in result.ips] == ["10.1.2.1", "fd00:1::1"]
    assert all(ip.interface == 2 for ip in result.ips)
    assert gws.v4 == ["10.1.2.1/24"] and gws.v6 == ["fd00:1::1/64"]
    assert [(r.dst, r.gw) for r in result.routes] == [("0.0.0.0/0", "10.1.2.1"), ("::/0", "fd00:1::1")]


def test_existing_default_route_is_kept():
    result = ipam_result("10.1.2.7/24", gateway="10.1.2.254", routes=[{"dst": "0.0.0.0/0", "gw": "10.1.2.9"}])
    bridge.plan_gateways(result, bridge.load_conf(conf(isDefaultGateway=True), ""))
    assert [(r.dst, r.gw) for r in result.routes] == [("0.0.0.0/0", "10.1.2.9")]


def test_no_gateway_without_is_gateway():
    result = ipam_result("10.1.2.7/24")
    gws = bridge.plan_gateways(result, bridge.load_conf(conf(), ""))
    assert result.ips[0].gateway is None and gws.v4 == [] and result.routes == []


# ---- rollback --------------------------------------------------------------------


def test_undo_runs_newest_first_and_survives_failures():
    from cni_plugins.shared.undo import Undo

    done, warnings = [], []
    undo = Undo(warnings.append)
    undo.push("one", lambda: done.append(1))
    undo.push("broken", lambda: 1 / 0)
    undo.push("three", lambda: done.append(3))
    undo.run()
    assert done == [3, 1]
    assert len(warnings) == 1 and "broken" in warnings[0]


# ---- IPAM delegation --------------------------------------------------------------


def write_plugin(directory, name, body):
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def request(tmp_path, ipam_type="fake", version="1.0.0", **extra):
    cfg = conf(cniVersion=version, ipam={"type": ipam_type}, **extra)
    return CmdArgs(
        command="ADD",
        container_id="c1",
        netns="/run/netns/x",
        ifname="eth0",
        path=f"{tmp_path / 'empty'}:{tmp_path}",
        stdin_data=json.dumps(cfg).encode(),
        conf=cfg,
        cni_version=version,
    )


def test_exec_add_reads_the_result_in_the_config_version(tmp_path):
    write_plugin(
        tmp_path,
        "fake",
        'cat >/dev/null; echo \'{"cniVersion":"0.2.0","ip4":{"ip":"10.3.0.5/16",'
        '"gateway":"10.3.0.1","routes":[{"dst":"0.0.0.0/0"}]}}\'',
    )
    result = ipam_exec.exec_add(request(tmp_path, version="0.2.0"))
    assert result.ips[0].address == "10.3.0.5/16" and result.ips[0].gateway == "10.3.0.1"
    assert [r.dst for r in result.routes] == ["0.0.0.0/0"]


def test_exec_passes_environment_and_stdin(tmp_path):
    log = tmp_path / "log"
    write_plugin(
        tmp_path,
        "fake",
        f"env | grep ^CNI_ | sort > {log}; cat >> {log}; "
        'echo \'{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.2/24"}]}\'',
    )
    req = request(tmp_path)
    ipam_exec.exec_del(req)
    text = log.read_text()
    assert "CNI_COMMAND=DEL" in text and "CNI_CONTAINERID=c1" in text and "CNI_IFNAME=eth0" in text
    assert text.rstrip().endswith(req.stdin_data.decode())


def test_exec_error_object_keeps_its_code(tmp_path):
    write_plugin(tmp_path, "fake", 'echo \'{"cniVersion":"1.0.0","code":11,"msg":"busy","details":"later"}\'; exit 1')
    with pytest.raises(CNIError) as err:
        ipam_exec.exec_add(request(tmp_path))
    assert (err.value.code, err.value.msg, err.value.details) == (11, "busy", "later")


def test_exec_garbage_failure_is_internal_error_with_stderr(tmp_path):
    write_plugin(tmp_path, "fake", "echo boom >&2; exit 3")
    with pytest.raises(CNIError) as err:
        ipam_exec.exec_check(request(tmp_path))
    assert err.value.code == 999 and "boom" in str(err.value)


def test_missing_plugin(tmp_path):
    with pytest.raises(CNIError) as err:
        ipam_exec.exec_add(request(tmp_path, ipam_type="nope"))
    assert "failed to find plugin" in err.value.msg
    with pytest.raises(CNIError):
        find_plugin("../bin/sh", [str(tmp_path)])


def test_in_process_only_for_our_own_host_local(tmp_path):
    from cni_plugins.spec import registry

    write_plugin(tmp_path, "host-local", "exit 0")  # someone else's host-local: executed
    assert registry.own_plugin(str(tmp_path / "host-local")) is None
    ours = tmp_path / "ours"
    ours.mkdir()
    script = ours / "host-local"
    script.write_text(
        f"#!/usr/bin/python3 -I\n{registry.LAUNCHER_TAG}host-local\nfrom ipam.host_local import main\nmain()\n"
    )
    script.chmod(0o755)
    assert registry.own_plugin(str(script)) == "host-local"
    legacy = ours / "legacy"
    legacy.write_text(
        "#!/usr/bin/python3 -I\n# Generated by `pycni install`: the pycni 'host-local' CNI plugin.\n"
        "import sys\nfrom ipam.host_local import main\nsys.exit(main())\n"
    )
    assert registry.own_plugin(str(legacy)) == "host-local"
    (ours / "bash-lookalike").write_text("#!/bin/sh\n# mentions ipam.host_local but is not ours\n")
    assert registry.own_plugin(str(ours / "bash-lookalike")) is None


def test_in_process_host_local_gives_the_executed_result(tmp_path):
    from cni_plugins.spec import registry

    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "host-local"
    script.write_text(f"#!{sys.executable} -I\n# pycni-plugin: host-local\nfrom ipam.host_local import main\nmain()\n")
    script.chmod(0o755)
    results = []
    for mode in ("inprocess", "exec"):
        data = tmp_path / mode
        cfg = conf(
            cniVersion="0.3.1",
            ipam={
                "type": "host-local",
                "subnet": "10.7.0.0/24",
                "dataDir": str(data),
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        )
        environ = {"PATH": os.environ["PATH"], **({"PYCNI_NO_INPROCESS": "1"} if mode == "exec" else {})}
        req = CmdArgs(
            command="ADD",
            container_id="c1",
            netns="/run/netns/x",
            ifname="eth0",
            path=str(bindir),
            stdin_data=json.dumps(cfg).encode(),
            conf=cfg,
            cni_version="0.3.1",
            environ=environ,
        )
        served_in_process = []
        original = registry.funcs
        registry.funcs = lambda name: served_in_process.append(name) or original(name)
        try:
            results.append(ipam_exec.exec_add(req).to_dict("0.3.1"))
            ipam_exec.exec_del(req)
        finally:
            registry.funcs = original
        # The path under test was really taken: in-process serves through the registry, exec never does.
        assert served_in_process == (["host-local", "host-local"] if mode == "inprocess" else [])
        assert sorted(os.listdir(data / "net")) in (["last_reserved_ip.0", "lock"], ["lock", "last_reserved_ip.0"])
    assert results[0] == results[1]
    assert results[0]["ips"][0]["address"] == "10.7.0.2/24"


def test_routes_without_gateway_keep_none():
    result = ipam_result("10.1.2.7/24", gateway="10.1.2.1", routes=[{"dst": "192.168.0.0/16"}])
    bridge.plan_gateways(result, bridge.load_conf(conf(isGateway=True), ""))
    assert result.routes == [Route(dst="192.168.0.0/16")]


# ---- VLAN entries (the kernel here lacks VLAN filtering, so the calls are checked) -------


@pytest.fixture
def vlan_calls(monkeypatch):
    from cni_plugins.kernel import ip

    calls = []
    monkeypatch.setattr(ip, "remove_port_vlans", lambda ipr, port: calls.append(("clear", port)))
    monkeypatch.setattr(
        ip,
        "bridge_vlan_add",
        lambda ipr, port, vid, pvid=False, untagged=False: calls.append(("add", port, vid, pvid, untagged)),
    )
    return calls


def test_access_port_vlan(vlan_calls):
    bridge._setup_port_vlans(None, bridge.load_conf(conf(vlan=100), ""), 7, "veth0")
    assert vlan_calls == [("clear", 7), ("add", 7, 100, True, True)]


def test_access_port_keeps_default_vlan_when_asked(vlan_calls):
    bridge._setup_port_vlans(None, bridge.load_conf(conf(vlan=100, preserveDefaultVlan=True), ""), 7, "v")
    assert vlan_calls == [("add", 7, 100, True, True)]


def test_trunk_port_vlans_with_native_vlan_1(vlan_calls):
    bridge._setup_port_vlans(None, bridge.load_conf(conf(vlanTrunk=[{"minID": 5, "maxID": 6}]), ""), 7, "v")
    assert vlan_calls == [
        ("clear", 7),
        ("add", 7, 5, False, False),
        ("add", 7, 6, False, False),
        ("add", 7, 1, True, True),
    ]


def test_no_vlan_no_calls(vlan_calls):
    bridge._setup_port_vlans(None, bridge.load_conf(conf(), ""), 7, "v")
    assert vlan_calls == []


def test_spoof_check_names_are_per_network_and_attachment():
    from cni_plugins.shared import spoofchk

    ids = {
        spoofchk.attachment_id(net, cid, ifname)
        for net in ("a", "b")
        for cid in ("c1", "c2")
        for ifname in ("eth0", "net1")
    }
    assert len(ids) == 8
    assert spoofchk.network_tag("a") != spoofchk.network_tag("b")


@pytest.mark.parametrize(
    "iface,mac",
    [
        ('veth" drop', "0a:58:00:00:00:01"),
        ("veth1;", "0a:58:00:00:00:01"),
        ("", "0a:58:00:00:00:01"),
        ("veth1", "0a:58:00:00:00:01 drop"),
        ("veth1", "zz:58:00:00:00:01"),
    ],
)
def test_spoof_check_refuses_rule_syntax_before_touching_nftables(iface, mac, monkeypatch):
    from cni_plugins.kernel import nft
    from cni_plugins.shared import spoofchk

    ran = []
    monkeypatch.setattr(nft, "run", lambda args, stdin=None: ran.append((args, stdin)))
    with pytest.raises(CNIError):
        spoofchk.setup("net", "ctr", "eth0", iface, mac)
    assert ran == []


def test_masq_backend_names_agree_with_the_masq_module():
    from cni_plugins.shared import masq

    assert bridge_config.MASQ_BACKENDS == masq.BACKENDS and bridge_config.DEFAULT_MASQ_BACKEND == masq.DEFAULT_BACKEND


# ---- the bridge's stable MAC --------------------------------------------------------

# Derived by the VTEP MAC code before stable_mac was shared: every node's published VTEP MAC
# depends on these values staying byte-identical.
KNOWN_MACS = {
    "pycni-test-seed": "aa:a0:71:ce:11:75",
    "": "e2:b0:c4:42:98:fc",
    "pycni-bridge|0123456789abcdef0123456789abcdef|cni0": "fa:cd:f3:35:3d:35",
}


@pytest.mark.parametrize("seed", sorted(KNOWN_MACS))
def test_stable_mac_keeps_the_vtep_mac_values(seed):
    from cni_plugins.kernel.names import stable_mac
    from cni_plugins.kernel.vxlan import stable_vtep_mac

    assert stable_mac(seed) == stable_vtep_mac(seed) == KNOWN_MACS[seed]


def test_stable_mac_is_a_locally_administered_unicast_mac():
    from cni_plugins.kernel.names import stable_mac

    macs = {stable_mac(f"pycni-bridge|node-{i}|cni0") for i in range(2000)}
    assert len(macs) == 2000
    for mac in macs:
        octets = mac.split(":")
        assert len(octets) == 6 and all(len(o) == 2 for o in octets) and mac == mac.lower()
        first = int(octets[0], 16)
        assert first & 0x02 and not first & 0x01, mac
    assert stable_mac("seed") == stable_mac("seed")


def test_bridge_mac_seed_names_the_node_and_the_bridge():
    from cni_plugins.kernel.names import bridge_mac_seed, stable_bridge_mac, stable_mac

    assert bridge_mac_seed("cni0", "3d12c7") == "pycni-bridge|3d12c7|cni0"
    assert stable_bridge_mac("cni0", "3d12c7") == stable_mac("pycni-bridge|3d12c7|cni0")
    assert stable_bridge_mac("cni0", "node-a") != stable_bridge_mac("cni0", "node-b")
    assert stable_bridge_mac("cni0", "node-a") != stable_bridge_mac("cni1", "node-a")


@pytest.mark.parametrize(
    "content, expected",
    [
        ("3d1219c7c4c5404aaa1f6d2a48adfda4\n", "3d1219c7c4c5404aaa1f6d2a48adfda4"),
        ("", None),
        ("uninitialized\n", None),
        (" \n", None),
    ],
)
def test_node_identity_is_the_machine_id_else_the_host_name(tmp_path, content, expected):
    import socket

    from cni_plugins.kernel.names import node_identity

    path = tmp_path / "machine-id"
    path.write_text(content)
    assert node_identity(str(path)) == (expected or socket.gethostname())
    assert node_identity(str(tmp_path / "missing")) == socket.gethostname()
