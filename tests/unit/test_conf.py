"""Loading and validating network configurations (libcni semantics)."""

from __future__ import annotations

import json
import os

import pytest

from cni_plugins.spec.errors import ERR_DECODE, ERR_INCOMPATIBLE_VERSION, ERR_INVALID_CONFIG, CNIError
from conf import (
    ConfError,
    NetworkConfigList,
    build_plugin_config,
    conf_dirs,
    load_conflist,
    load_conflist_file,
    parse_conflist,
)


def write(directory, filename, content) -> str:
    path = os.path.join(str(directory), filename)
    with open(path, "w") as handle:
        handle.write(content if isinstance(content, str) else json.dumps(content))
    return path


def conflist(name="net1", version="1.0.0", plugins=None, **extra) -> dict:
    out = {"cniVersion": version, "name": name, "plugins": plugins if plugins is not None else [{"type": "bridge"}]}
    out.update(extra)
    return out


# ---- finding the file ----------------------------------------------------


def test_first_conflist_in_lexical_order_wins(tmp_path):
    write(tmp_path, "20-b.conflist", conflist(plugins=[{"type": "second"}]))
    write(tmp_path, "10-a.conflist", conflist(plugins=[{"type": "first"}]))
    write(tmp_path, "05-other.conflist", conflist(name="other"))
    netlist = load_conflist("net1", [str(tmp_path)])
    assert netlist.plugins[0]["type"] == "first"
    assert netlist.path == str(tmp_path / "10-a.conflist")
    assert netlist.name == "net1" and netlist.cni_version == "1.0.0"


def test_name_must_match(tmp_path):
    write(tmp_path, "10-a.conflist", conflist(name="alpha"))
    write(tmp_path, "20-b.conflist", conflist(name="beta", plugins=[{"type": "ptp"}]))
    assert load_conflist("beta", [str(tmp_path)]).plugins[0]["type"] == "ptp"


def test_conflist_preferred_over_conf(tmp_path):
    write(tmp_path, "00-single.conf", {"cniVersion": "0.4.0", "name": "net1", "type": "single"})
    write(tmp_path, "99-list.conflist", conflist(plugins=[{"type": "listed"}]))
    assert load_conflist("net1", [str(tmp_path)]).plugins[0]["type"] == "listed"


@pytest.mark.parametrize("ext", [".conf", ".json"])
def test_single_plugin_conf_is_wrapped_into_a_list(tmp_path, ext):
    plugin = {
        "cniVersion": "0.4.0",
        "name": "net1",
        "type": "bridge",
        "bridge": "br9",
        "ipam": {"type": "host-local", "subnet": "10.1.0.0/24"},
    }
    write(tmp_path, "10-net" + ext, plugin)
    netlist = load_conflist("net1", [str(tmp_path)])
    assert netlist.cni_version == "0.4.0"
    assert netlist.plugins == [plugin]
    assert netlist.disable_check is False and netlist.disable_gc is False
    assert json.loads(netlist.source_bytes) == {"name": "net1", "cniVersion": "0.4.0", "plugins": [plugin]}


def test_single_conf_without_version_is_0_1_0(tmp_path):
    write(tmp_path, "10-net.conf", {"name": "net1", "type": "bridge"})
    assert load_conflist("net1", [str(tmp_path)]).cni_version == "0.1.0"


def test_several_directories_first_wins(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    write(second, "00.conflist", conflist(plugins=[{"type": "from-b"}]))
    write(first, "99.conflist", conflist(plugins=[{"type": "from-a"}]))
    netlist = load_conflist("net1", f"{tmp_path / 'missing'}:{first}:{second}")
    assert netlist.plugins[0]["type"] == "from-a"


def test_netconfpath_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("NETCONFPATH", f"{tmp_path}:/x")
    assert conf_dirs() == [str(tmp_path), "/x"]
    monkeypatch.delenv("NETCONFPATH")
    assert conf_dirs() == ["/etc/cni/net.d"]
    write(tmp_path, "1.conflist", conflist())
    monkeypatch.setenv("NETCONFPATH", str(tmp_path))
    assert load_conflist("net1").name == "net1"


def test_not_found_lists_directories_and_networks(tmp_path):
    write(tmp_path, "1.conflist", conflist(name="alpha"))
    missing = tmp_path / "nope"
    with pytest.raises(ConfError) as info:
        load_conflist("beta", [str(tmp_path), str(missing)])
    text = str(info.value)
    assert "'beta'" in text and str(tmp_path) in text and f"{missing} (missing)" in text
    assert "alpha" in text and "NETCONFPATH" in text
    assert info.value.code == ERR_INVALID_CONFIG


def test_directories_and_other_extensions_are_ignored(tmp_path):
    (tmp_path / "sub.conflist").mkdir()
    write(tmp_path, "notes.txt", "not json")
    write(tmp_path, "1.conflist", conflist())
    assert load_conflist("net1", [str(tmp_path)]).name == "net1"


def test_requested_name_is_validated(tmp_path):
    with pytest.raises(ConfError, match="not a valid network name"):
        load_conflist("../etc", [str(tmp_path)])


# ---- versions and flags --------------------------------------------------


@pytest.mark.parametrize(
    "versions,single,expected",
    [
        (["0.3.1", "1.0.0", "0.4.0"], None, "1.0.0"),
        (["1.1.0", "9.9.9"], None, "1.1.0"),  # unsupported ones are ignored
        (["0.4.0"], "1.0.0", "1.0.0"),  # cniVersion takes part
        (["1.1.0"], "0.4.0", "1.1.0"),
    ],
)
def test_cni_versions_pick_highest_supported(tmp_path, versions, single, expected):
    raw = {"name": "net1", "cniVersions": versions, "plugins": [{"type": "x"}]}
    if single:
        raw["cniVersion"] = single
    path = write(tmp_path, "1.conflist", raw)
    assert load_conflist_file(path).cni_version == expected


def test_cni_versions_none_supported(tmp_path):
    path = write(tmp_path, "1.conflist", {"name": "n", "cniVersions": ["7.0.0"], "plugins": [{"type": "x"}]})
    with pytest.raises(ConfError) as info:
        load_conflist_file(path)
    assert info.value.code == ERR_INCOMPATIBLE_VERSION
    assert "'cniVersions'" in str(info.value) and path in str(info.value)


@pytest.mark.parametrize(
    "value,expected",
    [
        (True, True),
        (False, False),
        ("true", True),
        ("false", False),
        ("TRUE", True),
        ("False", False),
    ],
)
@pytest.mark.parametrize("key,attr", [("disableCheck", "disable_check"), ("disableGC", "disable_gc")])
def test_disable_flags_accept_bool_and_strings(tmp_path, key, attr, value, expected):
    path = write(tmp_path, "1.conflist", conflist(**{key: value}))
    assert getattr(load_conflist_file(path), attr) is expected


def test_returns_dataclass_with_raw(tmp_path):
    raw = conflist(plugins=[{"type": "a"}, {"type": "b", "capabilities": {"portMappings": True}}])
    path = write(tmp_path, "1.conflist", raw)
    netlist = load_conflist_file(path)
    assert isinstance(netlist, NetworkConfigList)
    assert netlist.raw == raw and [p["type"] for p in netlist.plugins] == ["a", "b"]
    assert json.loads(netlist.source_bytes) == raw


# ---- malformed input -----------------------------------------------------

MALFORMED = [
    # (content, field named in the message, code)
    ("{not json", None, ERR_DECODE),
    ("[1, 2]", None, ERR_DECODE),
    ({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}, "name", ERR_INVALID_CONFIG),
    ({"name": 5, "cniVersion": "1.0.0", "plugins": [{"type": "x"}]}, "name", ERR_INVALID_CONFIG),
    ({"name": "net1", "plugins": [{"type": "x"}]}, "cniVersion", ERR_INVALID_CONFIG),
    (conflist(version=3), "cniVersion", ERR_INVALID_CONFIG),
    (conflist(version="one"), "cniVersion", ERR_INVALID_CONFIG),
    (conflist(version="0.5.0"), "cniVersion", ERR_INCOMPATIBLE_VERSION),
    (conflist(cniVersions="1.0.0"), "cniVersions", ERR_INVALID_CONFIG),
    (conflist(cniVersions=["1.0.0", 2]), "cniVersions[1]", ERR_INVALID_CONFIG),
    (conflist(disableCheck="yes"), "disableCheck", ERR_INVALID_CONFIG),
    (conflist(disableCheck=1), "disableCheck", ERR_INVALID_CONFIG),
    (conflist(disableGC="maybe"), "disableGC", ERR_INVALID_CONFIG),
    ({"name": "net1", "cniVersion": "1.0.0"}, "plugins", ERR_INVALID_CONFIG),
    (conflist(plugins=[]), "plugins", ERR_INVALID_CONFIG),
    (conflist(plugins={"type": "x"}), "plugins", ERR_INVALID_CONFIG),
    (conflist(plugins=["bridge"]), "plugins[0]", ERR_INVALID_CONFIG),
    (conflist(plugins=[{"type": "x"}, {"bridge": "br0"}]), "plugins[1].type", ERR_INVALID_CONFIG),
    (conflist(plugins=[{"type": ""}]), "plugins[0].type", ERR_INVALID_CONFIG),
    (conflist(plugins=[{"type": 7}]), "plugins[0].type", ERR_INVALID_CONFIG),
    (
        conflist(plugins=[{"type": "x", "capabilities": ["portMappings"]}]),
        "plugins[0].capabilities",
        ERR_INVALID_CONFIG,
    ),
    (
        conflist(plugins=[{"type": "x", "capabilities": {"portMappings": "yes"}}]),
        "plugins[0].capabilities",
        ERR_INVALID_CONFIG,
    ),
]


@pytest.mark.parametrize("content,field,code", MALFORMED)
def test_malformed_conflist_names_file_and_field(tmp_path, content, field, code):
    path = write(tmp_path, "10-x.conflist", content)
    with pytest.raises(ConfError) as info:
        load_conflist_file(path)
    error = info.value
    assert isinstance(error, CNIError)
    assert error.code == code
    assert error.path == path and str(error).startswith(path + ": ")
    assert error.field == field
    if field:
        assert f"field {field!r}: " in str(error)


def test_example_message_format(tmp_path):
    path = write(tmp_path, "10-x.conflist", conflist(plugins=[]))
    with pytest.raises(ConfError) as info:
        load_conflist("net1", [str(tmp_path)])
    assert str(info.value) == f"{path}: field 'plugins': must be a non-empty list"


def test_broken_json_stops_the_search(tmp_path):
    # Like libcni: a file we cannot read might have been the network asked for.
    write(tmp_path, "05-broken.conflist", "{")
    write(tmp_path, "10-ok.conflist", conflist())
    with pytest.raises(ConfError) as info:
        load_conflist("net1", [str(tmp_path)])
    assert info.value.code == ERR_DECODE and "05-broken.conflist" in str(info.value)


def test_invalid_network_name_in_file(tmp_path):
    path = write(tmp_path, "1.conflist", conflist(name="bad name!"))
    with pytest.raises(ConfError, match="'name'") as info:
        load_conflist_file(path)
    assert str(info.value).startswith(f"{path}: field 'name': 'bad name!' is not a valid network name")
    assert info.value.code == ERR_INVALID_CONFIG


@pytest.mark.parametrize(
    "name,valid",
    [
        ("net1", True),
        ("a.b_c-d", True),
        ("9net", True),
        ("-net", False),
        (".net", False),
        ("a/b", False),
        ("a b", False),
        ("a;b", False),
    ],
)
def test_network_name_rule_is_the_plugins_rule(name, valid):
    """A file is refused exactly when the plugins (skel) would refuse its name."""
    from cni_plugins.spec.skel import validate_network_name

    data = json.dumps(conflist(name=name)).encode()
    if valid:
        validate_network_name(name)
        assert parse_conflist(data, "f.conflist").name == name
    else:
        with pytest.raises(CNIError):
            validate_network_name(name)
        with pytest.raises(ConfError, match="f.conflist: field 'name'"):
            parse_conflist(data, "f.conflist")


def test_single_conf_errors_name_its_fields(tmp_path):
    path = write(tmp_path, "1.conf", {"cniVersion": "1.0.0", "name": "net1", "type": "../x"})
    with pytest.raises(ConfError) as info:
        load_conflist("net1", [str(tmp_path)])
    assert info.value.field == "type" and info.value.path == path


@pytest.mark.parametrize("bad_type", ["../../something", "/usr/bin/id", "sub/dir", "..", ".", "a\\b", "..\\..\\x"])
def test_plugin_type_with_path_is_refused(tmp_path, bad_type):
    write(tmp_path, "1.conflist", conflist(plugins=[{"type": "loopback"}, {"type": bad_type}]))
    with pytest.raises(ConfError) as info:
        load_conflist("net1", [str(tmp_path)])
    assert info.value.code == ERR_INVALID_CONFIG
    assert info.value.field == "plugins[1].type"
    assert repr(bad_type) in str(info.value)


# ---- building a plugin's stdin -------------------------------------------


def _netlist(plugins) -> NetworkConfigList:
    return parse_conflist(json.dumps(conflist(name="mynet", version="1.0.0", plugins=plugins)).encode())


def test_build_injects_name_version_and_prev_result():
    netlist = _netlist(
        [
            {
                "type": "portmap",
                "name": "ignored",
                "cniVersion": "0.1.0",
                "args": {"cni": {"ips": ["10.0.0.5"]}},
                "snat": True,
            }
        ]
    )
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.5/24"}]}
    config = build_plugin_config(netlist, netlist.plugins[0], prev, None)
    assert config == {
        "type": "portmap",
        "name": "mynet",
        "cniVersion": "1.0.0",
        "args": {"cni": {"ips": ["10.0.0.5"]}},
        "snat": True,
        "prevResult": prev,
    }
    # The loaded configuration is not modified.
    assert netlist.plugins[0]["name"] == "ignored" and "prevResult" not in netlist.plugins[0]


def test_build_without_prev_result_has_no_key():
    netlist = _netlist([{"type": "bridge"}])
    assert "prevResult" not in build_plugin_config(netlist, netlist.plugins[0], None, None)


def test_only_declared_and_enabled_capabilities_are_injected():
    netlist = _netlist([{"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False}}])
    caps = {
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 1},
        "ips": ["10.0.0.9/24"],
    }
    config = build_plugin_config(netlist, netlist.plugins[0], None, caps)
    assert config["runtimeConfig"] == {"portMappings": caps["portMappings"]}


def test_no_capabilities_means_no_runtime_config():
    netlist = _netlist([{"type": "bridge"}])
    config = build_plugin_config(netlist, netlist.plugins[0], None, {"portMappings": []})
    assert "runtimeConfig" not in config
    netlist = _netlist([{"type": "portmap", "capabilities": {"portMappings": True}}])
    assert "runtimeConfig" not in build_plugin_config(netlist, netlist.plugins[0], None, {"other": 1})


def test_injected_runtime_config_replaces_written_one():
    netlist = _netlist([{"type": "portmap", "capabilities": {"portMappings": True}, "runtimeConfig": {"stale": True}}])
    config = build_plugin_config(netlist, netlist.plugins[0], None, {"portMappings": []})
    assert config["runtimeConfig"] == {"portMappings": []}
    # Nothing to inject: what the file says stays.
    config = build_plugin_config(netlist, netlist.plugins[0], None, {})
    assert config["runtimeConfig"] == {"stale": True}
