"""The one decoding layer: Go's key matching, null as absent, strict JSON, types named in errors."""

from __future__ import annotations

import json

import pytest

from cni_plugins.bridge import FUNCS as BRIDGE
from cni_plugins.bridge.config import SCHEMA as BRIDGE_SCHEMA
from cni_plugins.bridge.config import load_conf
from cni_plugins.spec.decode import COMMON, ListOf, Schema, decode
from cni_plugins.spec.errors import CNIError
from cni_plugins.spec.skel import MAX_CONTAINER_ID, MAX_NETWORK_NAME, dispatch

PORTS = COMMON.extend(
    runtimeConfig=Schema(
        {"portMappings": ListOf(Schema({"hostPort": int, "containerPort": int, "protocol": str, "hostIP": str}))}
    )
)


def test_keys_match_in_any_letter_case_and_exact_wins():
    out = decode({"MTU": 1400, "IsGateway": True, "bridge": "b0", "BRIDGE": "b1"}, BRIDGE_SCHEMA)
    assert out == {"mtu": 1400, "isGateway": True, "bridge": "b1"}  # the later spelling wins, as in Go
    conf = load_conf({"name": "n", **out}, "")
    assert (conf.mtu, conf.is_gateway, conf.bridge) == (1400, True, "b1")


def test_capability_arguments_in_runtime_letter_case():
    raw = {"runtimeConfig": {"PortMappings": [{"HostPort": 8080, "ContainerPort": 80, "Protocol": "tcp"}]}}
    out = decode(raw, PORTS)
    assert out["runtimeConfig"]["portMappings"] == [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]


def test_null_is_absent_and_unknown_keys_stay():
    out = decode({"mtu": None, "somethingElse": {"X": 1}, "ipam": {"type": "host-local", "Subnet": "x"}}, BRIDGE_SCHEMA)
    assert out == {"somethingElse": {"X": 1}, "ipam": {"type": "host-local", "Subnet": "x"}}


@pytest.mark.parametrize(
    "conf, path",
    [
        ({"mtu": "1400"}, "mtu"),
        ({"isGateway": 1}, "isGateway"),
        ({"mtu": True}, "mtu"),
        ({"ipam": {"type": []}}, "ipam.type"),  # issue 14: an empty list is not "no IPAM"
        ({"vlanTrunk": [{"id": "3"}]}, "vlanTrunk[0].id"),
        ({"runtimeConfig": {"portMappings": [{"hostPort": 80, "hostIP": []}]}}, "runtimeConfig.portMappings[0].hostIP"),
    ],
)
def test_wrong_type_is_error_7_naming_the_option(conf, path):
    schema = PORTS if "runtimeConfig" in conf else BRIDGE_SCHEMA
    with pytest.raises(CNIError) as err:
        decode(conf, schema)
    assert err.value.code == 7 and err.value.msg.startswith(f"{path} must be")


def test_del_drops_a_bad_value_with_a_warning():
    warnings: list[str] = []
    out = decode(
        {"runtimeConfig": {"portMappings": [{"hostPort": "x", "containerPort": 80}, "junk"]}},
        PORTS,
        lenient=True,
        warn=warnings.append,
    )
    assert out["runtimeConfig"]["portMappings"] == [{"containerPort": 80}]
    assert len(warnings) == 2 and "hostPort" in warnings[0]


# ---- the skeleton: refused before the plugin runs ----------------------------------------


def env(command="ADD", **extra):
    base = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/nonexistent/netns",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/nonexistent",
    }
    base.update(extra)
    return base


def run(stdin: bytes | str, command="ADD", **extra):
    data = stdin.encode() if isinstance(stdin, str) else stdin
    out = dispatch(BRIDGE, env(command, **extra), data)
    return out.exit_code, json.loads(out.stdout) if out.stdout else None, out.stderr


@pytest.mark.parametrize(
    "text",
    [
        '{"cniVersion":"1.0.0","name":"n","type":"bridge","mtu":NaN}',
        '{"cniVersion":"1.0.0","name":"n","type":"bridge","mtu":Infinity}',
        '{"cniVersion":"1.0.0","name":"n","type":"bridge","x":' + "[" * 5000 + "]" * 5000 + "}",
        '{"cniVersion":"1.0.0","name":"n","type":"bridge","x":' + "[" * 100 + "]" * 100 + "}",
    ],
)
def test_invalid_json_is_code_6_without_traceback(text):
    code, err, stderr = run(text)
    assert code == 1 and err["code"] == 6 and "Traceback" not in stderr


@pytest.mark.parametrize(
    "conf",
    [
        {"bridge": "br\u0000x"},
        {"bridge": "br\ud800"},
        {"ipam": {"type": "host-local", "dataDir": "/tmp/\u0000"}},
        {"x\u0000": 1},
    ],
)
def test_nul_and_unpaired_surrogates_are_code_7(conf):
    text = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "bridge", **conf})
    code, err, stderr = run(text)
    assert code == 1 and err["code"] == 7 and "Traceback" not in stderr


def test_environment_that_is_not_utf8_is_code_4():
    # os.environ decodes invalid bytes to lone surrogates (surrogateescape)
    text = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "bridge"})
    code, err, _ = run(text, CNI_IFNAME="eth\udcff")
    assert code == 1 and err["code"] == 4


def test_length_limits_are_checked_up_front():
    text = json.dumps({"cniVersion": "1.0.0", "name": "n" * (MAX_NETWORK_NAME + 1), "type": "bridge"})
    code, err, _ = run(text)
    assert err["code"] == 7 and "too long" in err["msg"]
    text = json.dumps({"cniVersion": "1.0.0", "name": "n", "type": "bridge"})
    code, err, _ = run(text, CNI_CONTAINERID="c" * (MAX_CONTAINER_ID + 1))
    assert err["code"] == 4 and "too long" in err["msg"]
    code, err, _ = run(text, CNI_CONTAINERID="abc\n")
    assert err["code"] == 4


def test_wrong_type_refused_on_add_but_del_goes_on():
    conf = {"cniVersion": "1.0.0", "name": "n", "type": "bridge", "mtu": "big"}
    code, err, _ = run(json.dumps(conf))
    assert code == 1 and err["code"] == 7 and "mtu" in err["msg"]
    # DEL without a namespace and without IPAM has nothing to remove, and a bad mtu is no reason to fail.
    code, out, stderr = run(json.dumps(conf), "DEL", CNI_NETNS="")
    assert code == 0 and out is None and "ignoring mtu" in stderr
