"""The plugin skeleton: environment and config validation, dispatch, error objects."""

import json
import os
import subprocess
import sys

import pytest

from cni_plugins.spec.args import load_args, parse_cni_args
from cni_plugins.spec.errors import CNIError
from cni_plugins.spec.skel import PluginFuncs, dispatch, gc_attachments
from cni_plugins.spec.types import IPConfig, Result
from cni_plugins.spec.version import SUPPORTED_VERSIONS

CONF = {"cniVersion": "1.0.0", "name": "net1", "type": "fake"}
calls: list = []


def _add(req):
    calls.append(("ADD", req))
    return Result(ips=[IPConfig("10.0.0.2/24", "10.0.0.1")])


def _fail(req):
    raise CNIError(11, "busy", "come back later")


def _crash(req):
    raise ValueError("boom")


FUNCS = PluginFuncs(
    add=_add,
    delete=lambda req: calls.append(("DEL", req)),
    check=lambda req: calls.append(("CHECK", req)),
    gc=lambda req: calls.append(("GC", req)),
    status=lambda req: calls.append(("STATUS", req)),
)


def env(command="ADD", **extra):
    e = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "abc123",
        "CNI_NETNS": "/var/run/netns/nothere",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
    }
    e.update(extra)
    return {k: v for k, v in e.items() if v is not None}


def run(environ, conf=CONF, funcs=FUNCS):
    calls.clear()
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    out = dispatch(funcs, environ, data)
    return out


def error_of(outcome):
    assert outcome.exit_code != 0
    err = json.loads(outcome.stdout)
    assert set(err) <= {"cniVersion", "code", "msg", "details"}
    assert "Traceback" not in outcome.stdout
    return err


def test_add_prints_result_in_config_version():
    out = run(env(), {**CONF, "cniVersion": "0.3.1"})
    assert out.exit_code == 0
    assert json.loads(out.stdout)["ips"][0] == {"version": "4", "address": "10.0.0.2/24", "gateway": "10.0.0.1"}
    assert calls[0][1].container_id == "abc123"


def test_add_result_in_legacy_version():
    out = run(env(), {**CONF, "cniVersion": "0.2.0"})
    assert json.loads(out.stdout) == {
        "cniVersion": "0.2.0",
        "ip4": {"ip": "10.0.0.2/24", "gateway": "10.0.0.1"},
        "dns": {},
    }


@pytest.mark.parametrize(
    "environ,code,fragment",
    [
        (env(command=None), 4, "CNI_COMMAND"),
        (env(command="FROB"), 4, "unknown CNI_COMMAND"),
        (env(CNI_NETNS=None), 4, "[CNI_NETNS]"),
        (env(CNI_CONTAINERID=None, CNI_IFNAME=None), 4, "[CNI_CONTAINERID,CNI_IFNAME]"),
        (env(CNI_PATH=None), 4, "CNI_PATH"),
        (env(command="DEL", CNI_PATH=None), 4, "CNI_PATH"),
        (env(CNI_CONTAINERID="-bad"), 4, "containerID"),
        (env(CNI_CONTAINERID="a b"), 4, "containerID"),
        (env(CNI_CONTAINERID="a;rm"), 4, "containerID"),
        (env(CNI_IFNAME="x" * 16), 4, "too long"),
        (env(CNI_IFNAME="."), 4, ". or .."),
        (env(CNI_IFNAME=".."), 4, ". or .."),
        (env(CNI_IFNAME="et/h0"), 4, "whitespace"),
        (env(CNI_IFNAME="eth:0"), 4, "whitespace"),
        (env(CNI_IFNAME="eth 0"), 4, "whitespace"),
    ],
)
def test_bad_environment(environ, code, fragment):
    err = error_of(run(environ))
    assert err["code"] == code
    assert fragment in err["msg"] + err.get("details", "")
    assert calls == []


def test_del_needs_no_netns():
    out = run(env(command="DEL", CNI_NETNS=None))
    assert out.exit_code == 0 and out.stdout == ""
    assert calls[0][0] == "DEL"


@pytest.mark.parametrize(
    "conf,code,fragment",
    [
        (b"{not json", 6, "decoding"),
        (b"", 6, "decoding"),
        (b"[1, 2]", 6, "JSON object"),
        ({"cniVersion": "1.0.0", "type": "x"}, 7, "missing network name"),
        ({"cniVersion": "1.0.0", "name": "bad name", "type": "x"}, 7, "network name"),
        ({"cniVersion": "1.0.0", "name": "_x", "type": "x"}, 7, "network name"),
        ({"cniVersion": "1.0.0", "name": 5, "type": "x"}, 7, "network name"),
        ({"cniVersion": "2.0.0", "name": "n", "type": "x"}, 1, "incompatible"),
        # Unparseable: pycni says 6 (cannot decode), the v1.1.1 reference 1 (incompatible version);
        # compared side by side in tests/integration/test_codes_where_pycni_differs.py.
        ({"cniVersion": "one", "name": "n", "type": "x"}, 6, "version"),
        ({"cniVersion": 1, "name": "n", "type": "x"}, 6, "cniVersion"),
    ],
)
def test_bad_config(conf, code, fragment):
    err = error_of(run(env(), conf))
    assert err["code"] == code
    assert fragment in err["msg"]
    assert calls == []


def test_missing_cni_version_means_010():
    out = run(env(), {"name": "n", "type": "x"})
    assert json.loads(out.stdout)["cniVersion"] == "0.1.0"


@pytest.mark.parametrize(
    "command,version,allowed",
    [
        ("CHECK", "0.3.1", False),
        ("CHECK", "0.4.0", True),
        ("CHECK", "1.1.0", True),
        ("GC", "1.0.0", False),
        ("GC", "1.1.0", True),
        ("STATUS", "0.4.0", False),
        ("STATUS", "1.1.0", True),
    ],
)
def test_command_gating(command, version, allowed):
    out = run(env(command=command), {**CONF, "cniVersion": version})
    if allowed:
        assert out.exit_code == 0, out.stdout
        assert calls and calls[0][0] == command
    else:
        err = error_of(out)
        assert err["code"] == 1 and f"does not allow {command}" in err["msg"]
        assert calls == []


def test_gc_and_status_need_only_command_and_path():
    environ = {"CNI_COMMAND": "GC", "CNI_PATH": "/opt/cni/bin"}
    assert run(environ, {**CONF, "cniVersion": "1.1.0"}).exit_code == 0
    environ["CNI_COMMAND"] = "STATUS"
    assert run(environ, {**CONF, "cniVersion": "1.1.0"}).exit_code == 0


def test_version_lists_every_version_and_ignores_stdin():
    out = run({"CNI_COMMAND": "VERSION"}, b"garbage")
    assert json.loads(out.stdout) == {"cniVersion": "1.1.0", "supportedVersions": list(SUPPORTED_VERSIONS)}


def test_plugin_error_keeps_its_code_and_config_version():
    funcs = PluginFuncs(add=_fail, delete=_fail)
    err = error_of(run(env(), {**CONF, "cniVersion": "0.4.0"}, funcs))
    assert err == {"cniVersion": "0.4.0", "code": 11, "msg": "busy", "details": "come back later"}


def test_unexpected_exception_is_internal_error_with_trace_on_stderr_only():
    out = run(env(), CONF, PluginFuncs(add=_crash, delete=_crash))
    err = error_of(out)
    assert err["code"] == 999 and "boom" in err["msg"]
    assert "Traceback" in out.stderr


def test_plugin_netns_equal_to_cni_netns_is_refused():
    me = "/proc/thread-self/ns/net"
    err = error_of(run(env(CNI_NETNS=me)))
    assert err["code"] == 8
    assert run(env(CNI_NETNS=me, CNI_NETNS_OVERRIDE="1")).exit_code == 0


def test_gc_attachment_keys():
    for key in ("cni.dev/valid-attachments", "cni.dev/attachments"):
        conf = {key: [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]}
        assert gc_attachments(conf) == [("a", "eth0"), ("b", "net1")]
    assert gc_attachments({}) == []
    with pytest.raises(CNIError) as exc:
        gc_attachments({"cni.dev/valid-attachments": [{"containerID": 1}]})
    assert exc.value.code == 7


def test_cni_args():
    assert parse_cni_args("IP=10.0.0.5;MAC=aa:bb:cc:dd:ee:ff") == {"IP": "10.0.0.5", "MAC": "aa:bb:cc:dd:ee:ff"}
    assert parse_cni_args("") == {}
    for bad in ("IP", "IP=1=2", "=x"):
        with pytest.raises(CNIError) as exc:
            parse_cni_args(bad)
        assert exc.value.code == 4
    with pytest.raises(CNIError) as exc:
        load_args("IP=10.0.0.5;FOO=bar", {"IP"})
    assert exc.value.code == 4 and "FOO" in exc.value.msg
    assert load_args("IgnoreUnknown=1;IP=10.0.0.5;FOO=bar", {"IP"}) == {"IP": "10.0.0.5"}
    assert load_args("IgnoreUnknown=true;FOO=bar", {"IP"}) == {}
    with pytest.raises(CNIError):
        load_args("IgnoreUnknown=maybe", {"IP"})


def _run_plugin(environ, stdin=b""):
    return subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cni_plugins.loopback"],
        input=stdin,
        env={"PATH": os.environ["PATH"], **environ},
        capture_output=True,
        timeout=30,
    )


def test_version_does_not_import_netlink_code():
    proc = _run_plugin({"CNI_COMMAND": "VERSION"})
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["supportedVersions"] == list(SUPPORTED_VERSIONS)
    imported = proc.stderr.decode()
    assert "pyroute2" not in imported
    assert " netns" not in imported


def test_no_command_prints_about_on_stderr():
    proc = _run_plugin({})
    assert proc.returncode == 0 and proc.stdout == b""
    assert b"CNI protocol versions supported: 0.1.0" in proc.stderr


def test_process_error_exit_and_json_on_stdout():
    proc = _run_plugin(
        {
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": "x",
            "CNI_NETNS": "/nonexistent",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": "/x",
        },
        b"{bad",
    )
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["code"] == 6
