"""The benchmark runs end to end (smoke mode) and leaves nothing behind.

This checks the benchmark, not speed: no figure is compared with a threshold
except the ones that are correctness, i.e. concurrent ADDs never hand out an
address twice.
"""
import json
import os
import subprocess
import sys
import tempfile

import pytest

import netns
from tests.helpers.plugins import has_reference
from tests.helpers.state import link_names

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not has_reference("loopback"),
                       reason="needs the reference plugins in /usr/lib/cni (containernetworking-plugins)"),
]


def _bench_namespaces():
    return {n for n in netns.list_names() if n.startswith("pb-")}


def _bench_temp_dirs():
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("pycni-bench-")}


def _root_links():
    return set(link_names(None))  # only read: the machine's own namespace


def test_smoke_run_produces_ratios_and_no_duplicates(tmp_path):
    before = (_bench_namespaces(), _bench_temp_dirs(), _root_links())
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
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

    after = (_bench_namespaces(), _bench_temp_dirs(), _root_links())
    assert after[0] == before[0], "the benchmark left namespaces behind"
    assert after[1] == before[1], "the benchmark left temporary directories behind"
    assert after[2] == before[2], "the machine's own links changed during the benchmark"
