"""The benchmark runs end to end (smoke mode) and leaves nothing behind.

This checks the benchmark, not speed: no figure is compared with a threshold
except the ones that are correctness, i.e. concurrent ADDs never hand out an
address twice.

Hermetic: the run is tagged with a unique PYCNI_BENCH_PREFIX, and only the
namespaces and directories carrying that tag are checked, so another
benchmark, demo or test running on the machine at the same time changes
nothing here. (The machine's own links are not compared: the benchmark only
ever creates links inside its namespaces, and a machine-wide comparison fails
whenever anything else on the machine adds or removes one.)
"""

import json
import os
import secrets
import subprocess
import sys
import tempfile

import pytest

import netns
from tests.helpers.plugins import has_reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not has_reference("loopback"),
        reason="needs the reference plugins in /usr/lib/cni (containernetworking-plugins)",
    ),
]


def _bench_namespaces(tag):
    return {n for n in netns.list_names() if n.startswith(f"{tag}-")}


def _bench_temp_dirs(tag):
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith(f"pycni-bench-{tag}-")}


def test_smoke_run_produces_ratios_and_no_duplicates(tmp_path):
    tag = f"pbt{secrets.token_hex(4)}"  # this run's namespaces and directories, nobody else's
    assert not _bench_namespaces(tag) and not _bench_temp_dirs(tag)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYCNI_BENCH_PREFIX=tag),
    )
    # Exit code 0 also means no figure failed (bench exits 1 on any "error" entry).
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    doc = json.loads(out.read_text())
    assert doc["meta"]["mode"] == "smoke" and not doc["meta"]["interrupted"]
    results = doc["results"]

    loopback = results["latency"]["loopback"]
    for op in ("add", "del"):
        figure = loopback[op]
        assert isinstance(figure["ratio"], float) and figure["ratio"] > 0
        for side in ("pycni", "reference"):
            s = figure[side]
            assert s["n"] >= 2 and s["min"] <= s["median"] <= s["max"]
    assert isinstance(results["startup"]["loopback"]["wall"]["ratio"], float)

    concurrency = results["concurrency"]
    measured = [v for v in concurrency.values() if "duplicates" in v]
    assert "duplicates" in concurrency["host-local"], "concurrent ADDs on host-local were not measured"
    for figure in measured:
        assert figure["duplicates"] == {"pycni": 0, "reference": 0}
        assert figure["failures"] == {"pycni": 0, "reference": 0}

    # Real runtimes with the cold shims and with the warm path (an agent in the runtime's host).
    e2e = results["e2e"]
    if "skipped" not in e2e:
        for figure in ("podman run --rm", "warm/podman run --rm", "warm/cri sandbox plain/cycle"):
            assert isinstance(e2e[figure]["ratio"], float), (figure, e2e.get(figure))

    # The run used its tag (its plugin directory, printed and recorded, carries it).
    assert f"pycni-bench-{tag}-" in proc.stdout + out.read_text(), "PYCNI_BENCH_PREFIX was ignored"
    assert not _bench_namespaces(tag), "the benchmark left namespaces behind"
    assert not _bench_temp_dirs(tag), "the benchmark left temporary directories behind"


@pytest.mark.skipif(not os.access("/usr/bin/etcd", os.X_OK), reason="needs /usr/bin/etcd (etcd-server)")
def test_smoke_store_case_on_etcd(tmp_path):
    """`--only store` (not in the default set): a real etcd, real agents and simulated nodes, tiny sizes.

    Figures are not compared with the issue's targets; correctness is: no duplicate subnet among nodes
    that start at once, every join, leave and change around a compaction programmed on every agent.
    """
    tag = f"pbt{secrets.token_hex(4)}"
    out = tmp_path / "store.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "store", "--no-warm", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYCNI_BENCH_PREFIX=tag),
    )
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    store = json.loads(out.read_text())["results"]["store"]
    assert "error" not in store, store["error"]
    settings = store["settings"]
    assert settings["nodes"] == settings["real agents"] + settings["simulated nodes"]

    steady = store["steady state"]
    assert steady["requests per real agent per minute"]["all methods"]["median"] > 0
    assert steady["requests per simulated node per minute (baseline window)"]["LeaseKeepAlive"]["median"] > 0
    assert steady["real agent CPU"]["n"] == settings["real agents"]
    assert steady["open watch streams"]["n"] >= 3

    for kind in ("join", "leave"):
        figure = store["join/leave"][kind]
        assert figure["p99, every agent programmed"]["n"] == 1, figure
        assert figure["not everywhere within 30 s"] == 0

    starts = next(v for k, v in store.items() if k.endswith("simultaneous starts"))
    assert starts["leased"] == starts["nodes"] and starts["failed"] == 0, starts
    assert starts["duplicate subnets"] == 0
    assert starts["store writes per node"]["median"] >= 1

    compaction = store["compaction"]
    assert compaction["lost updates"] == 0 and compaction["agents whose FDB differs from the store at the end"] == 0
    assert "skipped" in store["partition"]  # the 3-member variant is full mode only

    assert not _bench_namespaces(tag), "the benchmark left namespaces behind"
    assert not _bench_temp_dirs(tag), "the benchmark left temporary directories behind"
