"""The runtime (libcni semantics) driving fake plugins: real processes, no namespaces.

Each fake plugin records its environment and stdin, then answers like a
plugin would; its behaviour is steered from the configuration it gets.
"""

from __future__ import annotations

import base64
import json
import os
import sys

import pytest

from cni_plugins.spec.errors import ERR_INVALID_ENV, CNIError
from conf import load_conflist
from pycni.cache import ResultCache
from pycni.invoke import PluginError
from pycni.runtime import CNIRuntime, RuntimeConf

FAKE_PLUGIN = """#!{python} -I
import json, os, sys
conf = json.load(sys.stdin)
env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
log = os.environ["FAKE_LOG"]
n = len(os.listdir(log))
name = os.path.basename(sys.argv[0])
with open(os.path.join(log, "%03d-%s" % (n, name)), "w") as f:
    json.dump({{"plugin": name, "env": env, "conf": conf}}, f)
command = env["CNI_COMMAND"]
fail = conf.get("fail", {{}}).get(command)
if fail == "garbage":
    sys.stderr.write("panic: something broke deep inside\\n")
    print("this is not json")
    sys.exit(2)
if fail:
    print(json.dumps({{"cniVersion": conf["cniVersion"], "code": fail[0], "msg": fail[1], "details": fail[2]}}))
    sys.exit(1)
if command == "ADD":
    result = conf.get("prevResult") or {{"cniVersion": conf["cniVersion"], "ips": [], "interfaces": []}}
    result["interfaces"].append({{"name": name, "sandbox": env.get("CNI_NETNS", "")}})
    if not result["ips"]:
        result["ips"].append({{"address": "10.9.0.2/24", "interface": 0}})
    print(json.dumps(result))
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A CNI bin dir with fake plugins a, b, c; a config dir; a log dir; a cache dir."""
    bin_dir, conf_dir, log_dir, cache_dir = (tmp_path / d for d in ("bin", "net.d", "log", "cache"))
    for d in (bin_dir, conf_dir, log_dir):
        d.mkdir()
    for name in ("a", "b", "c"):
        path = bin_dir / name
        path.write_text(FAKE_PLUGIN.format(python=sys.executable))
        path.chmod(0o755)
    monkeypatch.setenv("FAKE_LOG", str(log_dir))
    # Protocol variables in our own environment must not leak to plugins.
    monkeypatch.setenv("CNI_CONTAINERID", "leaked")
    monkeypatch.setenv("CNI_NETNS", "/leaked")

    class Env:
        bin = bin_dir
        conf = conf_dir
        cache = cache_dir
        log = log_dir
        runtime = CNIRuntime(str(bin_dir), str(cache_dir), stderr_sink=lambda data: None)

        def network(self, plugins, version="1.0.0", name="fakenet", **extra):
            raw = {"cniVersion": version, "name": name, "plugins": plugins, **extra}
            (conf_dir / f"10-{name}.conflist").write_text(json.dumps(raw))
            return load_conflist(name, [str(conf_dir)])

        def calls(self):
            out = []
            for entry in sorted(os.listdir(log_dir)):
                with open(log_dir / entry) as handle:
                    out.append(json.load(handle))
            for entry in os.listdir(log_dir):
                os.unlink(log_dir / entry)
            return out

    return Env()


RT = RuntimeConf(
    container_id="ctr1",
    netns="/var/run/netns/pod1",
    ifname="eth0",
    args=[("K8S_POD_NAME", "web")],
    capability_args={"portMappings": [{"hostPort": 80}]},
)


def test_add_runs_chain_in_order_and_caches(env):
    netlist = env.network([{"type": "a"}, {"type": "b", "capabilities": {"portMappings": True}}, {"type": "c"}])
    result = env.runtime.add(netlist, RT)
    calls = env.calls()
    assert [c["plugin"] for c in calls] == ["a", "b", "c"]
    assert [i["name"] for i in result["interfaces"]] == ["a", "b", "c"]
    first, second, third = calls
    assert first["env"] == {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "ctr1",
        "CNI_NETNS": "/var/run/netns/pod1",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": "K8S_POD_NAME=web",
        "CNI_PATH": str(env.bin),
    }
    assert "prevResult" not in first["conf"]
    assert first["conf"]["name"] == "fakenet" and first["conf"]["cniVersion"] == "1.0.0"
    assert [i["name"] for i in second["conf"]["prevResult"]["interfaces"]] == ["a"]
    # Only the plugin declaring the capability gets runtimeConfig.
    assert second["conf"]["runtimeConfig"] == {"portMappings": [{"hostPort": 80}]}
    assert "runtimeConfig" not in first["conf"] and "runtimeConfig" not in third["conf"]

    cache_file = env.cache / "results" / "fakenet-ctr1-eth0"
    cached = json.loads(cache_file.read_text())
    assert cached["kind"] == "cniCacheV1"
    assert cached["containerId"] == "ctr1" and cached["ifName"] == "eth0" and cached["networkName"] == "fakenet"
    assert base64.b64decode(cached["config"]) == (env.conf / "10-fakenet.conflist").read_bytes()
    assert cached["netns"] == "/var/run/netns/pod1"
    assert cached["cniArgs"] == [["K8S_POD_NAME", "web"]]
    assert cached["capabilityArgs"] == {"portMappings": [{"hostPort": 80}]}
    assert cached["result"] == result
    assert oct(cache_file.stat().st_mode & 0o777) == "0o600"


def test_del_runs_in_reverse_with_cached_result_and_twice(env):
    netlist = env.network([{"type": "a"}, {"type": "b"}])
    result = env.runtime.add(netlist, RT)
    env.calls()
    env.runtime.delete(netlist, RuntimeConf(container_id="ctr1", netns="/var/run/netns/pod1"))
    calls = env.calls()
    assert [c["plugin"] for c in calls] == ["b", "a"]
    assert all(c["conf"]["prevResult"] == result for c in calls)
    assert all(c["env"]["CNI_COMMAND"] == "DEL" for c in calls)
    # CNI_ARGS and capability args default to what ADD used.
    assert calls[0]["env"]["CNI_ARGS"] == "K8S_POD_NAME=web"
    assert not (env.cache / "results" / "fakenet-ctr1-eth0").exists()
    env.runtime.delete(netlist, RT)
    calls = env.calls()
    assert [c["plugin"] for c in calls] == ["b", "a"]
    assert all("prevResult" not in c["conf"] for c in calls)


def test_del_before_0_4_0_has_no_prev_result(env):
    netlist = env.network([{"type": "a"}], version="0.3.1")
    env.runtime.add(netlist, RT)
    env.calls()
    env.runtime.delete(netlist, RT)
    assert "prevResult" not in env.calls()[0]["conf"]


def test_del_with_corrupt_cache_entry_still_cleans_up(env):
    netlist = env.network([{"type": "a"}])
    results = env.cache / "results"
    results.mkdir(parents=True)
    (results / "fakenet-ctr1-eth0").write_text("{garbage")
    env.runtime.delete(netlist, RT)
    assert [c["plugin"] for c in env.calls()] == ["a"]
    assert not (results / "fakenet-ctr1-eth0").exists()


def test_check_replays_cached_result(env):
    netlist = env.network([{"type": "a"}, {"type": "b"}])
    result = env.runtime.add(netlist, RT)
    env.calls()
    assert env.runtime.check(netlist, RT) is True
    calls = env.calls()
    assert [c["plugin"] for c in calls] == ["a", "b"]
    assert all(c["env"]["CNI_COMMAND"] == "CHECK" and c["conf"]["prevResult"] == result for c in calls)


def test_check_without_cached_result_fails(env):
    netlist = env.network([{"type": "a"}])
    with pytest.raises(CNIError, match="could not retrieve cached result"):
        env.runtime.check(netlist, RT)
    assert env.calls() == []


def test_check_skipped_when_disabled(env):
    netlist = env.network([{"type": "a"}], disableCheck="true")
    env.runtime.add(netlist, RT)
    env.calls()
    assert env.runtime.check(netlist, RT) is False
    assert env.calls() == []


def test_check_needs_0_4_0(env):
    netlist = env.network([{"type": "a"}], version="0.3.1")
    env.runtime.add(netlist, RT)
    env.calls()
    with pytest.raises(CNIError, match="does not support the CHECK command"):
        env.runtime.check(netlist, RT)
    assert env.calls() == []


def test_cached_result_converted_to_network_version(env):
    netlist = env.network([{"type": "a"}], version="1.0.0")
    env.runtime.add(netlist, RT)
    env.calls()
    older = env.network([{"type": "a"}], version="0.4.0")
    env.runtime.check(older, RT)
    prev = env.calls()[0]["conf"]["prevResult"]
    assert prev["cniVersion"] == "0.4.0" and prev["ips"][0]["version"] == "4"


def test_plugin_error_object_is_reported(env):
    netlist = env.network([{"type": "a"}, {"type": "b", "fail": {"ADD": [11, "try later", "busy"]}}])
    with pytest.raises(PluginError) as info:
        env.runtime.add(netlist, RT)
    error = info.value
    assert (error.code, error.msg, error.details, error.plugin, error.command) == (11, "try later", "busy", "b", "ADD")
    assert "plugin 'b' failed (ADD): try later; busy" == str(error)
    assert not (env.cache / "results" / "fakenet-ctr1-eth0").exists()


def test_plugin_garbage_output_reports_stderr(env):
    netlist = env.network([{"type": "a", "fail": {"DEL": "garbage"}}])
    with pytest.raises(PluginError) as info:
        env.runtime.delete(netlist, RT)
    text = str(info.value)
    assert "exited with status 2" in text and "panic: something broke deep inside" in text
    assert "this is not json" in text


def test_missing_plugin_names_dirs_and_runs_nothing(env):
    netlist = env.network([{"type": "a"}, {"type": "nosuch"}])
    with pytest.raises(CNIError) as info:
        env.runtime.add(netlist, RT)
    assert "'nosuch'" in str(info.value) and str(env.bin) in str(info.value)
    assert env.calls() == []


@pytest.mark.parametrize(
    "bad",
    [
        RuntimeConf(container_id="../../etc", netns="/x"),
        RuntimeConf(container_id="c1", netns="/x", ifname="../x"),
        RuntimeConf(container_id="c1", netns="/x", ifname="a-very-long-interface-name"),
        RuntimeConf(container_id="c1", netns="/x", args=[("A", "b;c")]),
    ],
)
def test_runtime_conf_is_validated(env, bad):
    netlist = env.network([{"type": "a"}])
    for operation in (env.runtime.add, env.runtime.delete, env.runtime.check):
        with pytest.raises(CNIError) as info:
            operation(netlist, bad)
        assert info.value.code == ERR_INVALID_ENV
    assert env.calls() == []


def test_gc_sends_valid_attachments_from_cache(env):
    netlist = env.network([{"type": "a"}, {"type": "b"}], version="1.1.0")
    env.runtime.add(netlist, RT)
    env.runtime.add(netlist, RuntimeConf(container_id="ctr2", netns="/var/run/netns/pod2", ifname="net1"))
    other = env.network([{"type": "c"}], version="1.1.0", name="othernet")
    env.runtime.add(other, RuntimeConf(container_id="ctr3", netns="/x"))
    env.calls()
    report = env.runtime.gc(netlist)
    calls = env.calls()
    assert [c["plugin"] for c in calls] == ["a", "b"]
    for call in calls:
        assert call["env"] == {"CNI_COMMAND": "GC", "CNI_PATH": str(env.bin)}
        assert call["conf"]["cni.dev/valid-attachments"] == [
            {"containerID": "ctr1", "ifname": "eth0"},
            {"containerID": "ctr2", "ifname": "net1"},
        ]
    assert report.removed == [] and report.plugins == ["a", "b"]
    assert len(ResultCache(str(env.cache)).list()) == 3


def test_gc_deletes_attachments_not_valid(env):
    netlist = env.network([{"type": "a"}], version="1.1.0")
    env.runtime.add(netlist, RT)
    env.runtime.add(netlist, RuntimeConf(container_id="ctr2", netns="/var/run/netns/pod2"))
    env.calls()
    report = env.runtime.gc(netlist, [("ctr1", "eth0")])
    calls = env.calls()
    assert [(c["env"]["CNI_COMMAND"], c["env"].get("CNI_CONTAINERID")) for c in calls] == [
        ("DEL", "ctr2"),
        ("GC", None),
    ]
    assert calls[0]["env"]["CNI_NETNS"] == "/var/run/netns/pod2"
    assert calls[1]["conf"]["cni.dev/valid-attachments"] == [{"containerID": "ctr1", "ifname": "eth0"}]
    assert [e.container_id for e in report.removed] == ["ctr2"]
    assert [e.container_id for e in ResultCache(str(env.cache)).list()] == ["ctr1"]


def test_gc_skipped_when_disabled(env):
    netlist = env.network([{"type": "a"}], version="1.1.0", disableGC=True)
    env.runtime.add(netlist, RT)
    env.calls()
    assert env.runtime.gc(netlist, []).skipped
    assert env.calls() == []
    assert len(ResultCache(str(env.cache)).list()) == 1


def test_gc_before_1_1_0_does_not_ask_plugins(env):
    netlist = env.network([{"type": "a"}], version="1.0.0")
    env.runtime.add(netlist, RT)
    env.calls()
    report = env.runtime.gc(netlist)
    assert env.calls() == [] and "1.1.0" in report.note


def test_status(env):
    netlist = env.network([{"type": "a"}, {"type": "b"}], version="1.1.0")
    assert env.runtime.status(netlist).plugins == ["a", "b"]
    calls = env.calls()
    assert [c["env"] for c in calls] == [{"CNI_COMMAND": "STATUS", "CNI_PATH": str(env.bin)}] * 2
    failing = env.network(
        [{"type": "a", "fail": {"STATUS": [50, "not ready", "no leases"]}}, {"type": "b"}], version="1.1.0"
    )
    with pytest.raises(PluginError) as info:
        env.runtime.status(failing)
    assert info.value.code == 50
    assert [c["plugin"] for c in env.calls()] == ["a"]
    assert env.runtime.status(env.network([{"type": "a"}], version="1.0.0")).skipped
    assert env.calls() == []
