"""The runtime set-up the documentation shows is the one the e2e suites run.

docs/runtimes.md (or the README, once merged there) gives one conflist, the
containerd CRI section, the podman containers.conf keys and cnitool's
environment. These checks tie each snippet to what kit/ hands the runtimes, so
the documentation cannot drift from what is tested. No root needed.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

from tests.e2e.kit import conflist, containerd, podman

REPO = Path(__file__).resolve().parents[2]
MARKER = '[plugins."io.containerd.grpc.v1.cri".cni]'


def _document() -> str:
    for candidate in (REPO / "docs" / "runtimes.md", REPO / "README.md"):
        if candidate.exists() and MARKER in candidate.read_text():
            return candidate.read_text()
    pytest.fail(f"no runtime documentation: neither docs/runtimes.md nor README.md shows {MARKER}")


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", _document(), re.S)


def _shape(raw: dict) -> list:
    """What must match: version, plugin types in order, their capabilities, the IPAM type."""
    return [
        raw["cniVersion"],
        [(p["type"], p.get("capabilities"), (p.get("ipam") or {}).get("type")) for p in raw["plugins"]],
    ]


def test_documented_conflist_is_the_tested_one():
    lists = [json.loads(block) for block in _blocks("json") if '"plugins"' in block]
    assert lists, "no conflist in the runtime documentation"
    for raw in lists:
        assert _shape(raw) == _shape(conflist.conflist("/x")), raw


def test_documented_containerd_section_is_the_tested_one():
    documented = next(tomllib.loads(b) for b in _blocks("toml") if MARKER in b)
    tested = tomllib.loads(containerd.config_toml(Path("/x"), bin_dir=Path("/b"), conf_dir=Path("/c")))
    cni = lambda doc: doc["plugins"]["io.containerd.grpc.v1.cri"]["cni"]  # noqa: E731
    assert documented["version"] == tested["version"]
    assert set(cni(documented)) == set(cni(tested)), (cni(documented), cni(tested))
    assert cni(documented)["max_conf_num"] == cni(tested)["max_conf_num"]


def test_documented_podman_keys_are_the_tested_ones():
    documented = next(tomllib.loads(b) for b in _blocks("toml") if "network_backend" in b)
    tested = tomllib.loads(podman.containers_conf(Path("/x"), bin_dir=Path("/b"), conf_dir=Path("/c"), network="n"))
    assert documented["network"]["network_backend"] == tested["network"]["network_backend"] == "cni"
    assert set(documented["network"]) <= set(tested["network"])
    assert isinstance(documented["network"]["cni_plugin_dirs"], list)


def test_documented_cnitool_environment_is_what_it_reads():
    source = (Path(__file__).parent / "kit" / "cnitool" / "main.go").read_text()
    shown = set(re.findall(r"\b(NETCONFPATH|CNI_PATH|CAP_ARGS|CNI_ARGS|CNI_IFNAME|CNI_CACHE_DIR)\b", _document()))
    assert shown == {"NETCONFPATH", "CNI_PATH", "CAP_ARGS", "CNI_ARGS", "CNI_IFNAME", "CNI_CACHE_DIR"}
    for variable in shown:
        assert f'"{variable}"' in source, variable
