"""Fixtures for the end-to-end suites (tests/e2e): real runtimes driving a plugin directory.

Every suite runs once per plugin directory (``plugin_set``): the reference Go
plugins in /usr/lib/cni and pycni's, as ``pycni install --cni-bin-dir DIR
--no-agent`` writes them. Each test gets a ``site``: a fresh Host (network
namespace + private mount namespace + outside namespace, kit/host.py), the
plugin directory behind logging wrappers (kit/capture.py: what the runtime
sends is kept and shown when a test fails), the e2e network's conflist and a
private host-local dataDir, and a cgroup parent for containers. After every
test the machine's root network namespace must be exactly as before.

The busybox image and cnitool are built once and kept in the pytest cache
(``.pytest_cache/d/pycni-e2e``).
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.kit import capture, conflist, image, leftovers, plugins, procs, rootns
from tests.e2e.kit.host import Host


@dataclass(frozen=True)
class PluginSet:
    kind: str            # "reference" or "pycni"
    path: Path           # the real plugin directory
    borrowed: tuple[str, ...] = ()   # reference plugins added to pycni's directory

    @property
    def is_reference(self) -> bool:
        return self.kind == "reference"


@pytest.fixture(scope="session")
def e2e_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("pycni-e2e"))
    return tmp_path_factory.mktemp("pycni-e2e-cache")


@pytest.fixture(scope="session", params=plugins.KINDS)
def plugin_set(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PluginSet:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if reason := plugins.reference_missing():
        pytest.skip(reason)
    if request.param == "reference":
        return PluginSet("reference", plugins.reference_dir())
    path, borrowed = plugins.install_pycni(tmp_path_factory.mktemp("pycni-bin"))
    return PluginSet("pycni", path, tuple(borrowed))


@pytest.fixture(scope="session")
def busybox_archive(e2e_cache: Path) -> Path:
    if reason := image.available():
        pytest.skip(reason)
    digest = os.stat(image.BUSYBOX)
    return image.docker_archive(e2e_cache / f"busybox-{digest.st_size}-{int(digest.st_mtime)}.tar")


@pytest.fixture(autouse=True)
def root_namespace_unchanged() -> Iterator[None]:
    """The machine's root network namespace is the same after the test as before it."""
    if os.geteuid() != 0:
        yield
        return
    before = rootns.snapshot()
    yield
    changed = rootns.differences(before, rootns.snapshot())
    assert not changed, "the root network namespace changed: " + "; ".join(changed)


@dataclass
class Site:
    """One test's host, with the plugin directory under test wrapped for capture."""

    host: Host
    plugins: PluginSet
    root: Path
    bin_dir: Path        # the wrappers: what the runtime is given as its CNI bin dir / CNI_PATH
    log_dir: Path        # what the wrappers logged
    conf_dir: Path       # holds the e2e network's conflist
    data_dir: Path       # host-local's dataDir
    cgroup_parent: str   # a cgroup name of our own, e.g. "pycni-e2e-1a2b3c4d5e"

    @property
    def cgroup_path(self) -> str:
        """The cgroup parent as runtimes take it ("/pycni-e2e-...")."""
        return "/" + self.cgroup_parent

    def requests(self) -> list[capture.Request]:
        return capture.requests(self.log_dir)

    def calls(self) -> str:
        """The plugin calls so far, for assertion messages (failed ones with their request)."""
        return f"[{self.plugins.kind} plugins] plugin calls:\n{capture.report(self.log_dir)}"

    def leftovers(self, **kwargs) -> list[str]:
        return leftovers.find(self.host, data_dir=self.data_dir, **kwargs)

    def host_veth(self, container_id: str) -> str | None:
        """The host-side veth the bridge ADD for container_id reported."""
        for request in self.requests():
            if (request.plugin, request.command) == ("bridge", "ADD") and \
                    request.env.get("CNI_CONTAINERID") == container_id and request.rc == 0:
                for iface in (request.answer or {}).get("interfaces", []):
                    if "sandbox" not in iface and iface.get("name") != conflist.BRIDGE:
                        return iface["name"]
        return None


@pytest.fixture
def site(plugin_set: PluginSet, tmp_path: Path) -> Iterator[Site]:
    root = tmp_path
    cgroup_parent = f"pycni-e2e-{uuid.uuid4().hex[:10]}"
    with Host(root / "host") as host:
        bin_dir = capture.wrap(plugin_set.path, root / "bin", root / "calls")
        data_dir = root / "ipam"
        conflist.write(root / "net.d", data_dir)
        try:
            yield Site(host, plugin_set, root, bin_dir, root / "calls", root / "net.d", data_dir, cgroup_parent)
        finally:
            host.stop_processes()
            procs.remove_cgroup(cgroup_parent)
    procs.remove_cgroup(cgroup_parent)
