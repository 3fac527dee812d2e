"""Fixtures for the end-to-end suites (tests/e2e): real runtimes driving a plugin directory.

Every suite runs once per plugin directory (``plugin_set``): the reference Go
plugins in /usr/lib/cni and pycni's, as ``pycni install --cni-bin-dir DIR
--no-agent`` writes them. Each test gets a ``site``: a fresh Host (network
namespace + private mount namespace + outside namespace, kit/host.py), the
plugin directory behind logging wrappers (kit/capture.py: what the runtime
sends is kept and shown when a test fails), the e2e network's conflist and a
private host-local dataDir, and a cgroup parent for containers. After every
test the test's own namespaces and cgroup are gone, and nothing attributable
to the test or pycni changed in the machine's root network namespace
(kit/rootns.py); the rest of the machine (other suites running at the same
time included) is not compared.

The busybox image and cnitool are built once and kept in the pytest cache
(``.pytest_cache/d/pycni-e2e``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import netns
from tests.e2e.kit import capture, conflist, image, leftovers, plugins, procs, rootns
from tests.e2e.kit.host import Host


@dataclass(frozen=True)
class PluginSet:
    kind: str  # "reference" or "pycni"
    path: Path  # the real plugin directory
    borrowed: tuple[str, ...] = ()  # reference plugins added to pycni's directory

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
    """Nothing of ours changed in the machine's root network namespace (kit/rootns.py: links, addresses,
    routes, rules, qdiscs and firewall lines named like what pycni and the kit make or in the suites'
    subnets, the default-route links, forwarding sysctls). What others do there (a module load's ifb0,
    another engine's veths, another copy of this suite) is not compared."""
    if os.geteuid() != 0:
        yield
        return
    before = rootns.snapshot()
    yield
    changed = rootns.differences(before, rootns.snapshot(watch=before.watch))
    assert not changed, "the root network namespace changed: " + "; ".join(changed)


@dataclass
class Site:
    """One test's host, with the plugin directory under test wrapped for capture."""

    host: Host
    plugins: PluginSet
    root: Path
    bin_dir: Path  # the wrappers: what the runtime is given as its CNI bin dir / CNI_PATH
    log_dir: Path  # what the wrappers logged
    conf_dir: Path  # holds the e2e network's conflist
    data_dir: Path  # host-local's dataDir
    cgroup_parent: str  # a cgroup name of our own, e.g. "pycni-e2e-1a2b3c4d5e"

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
            if (
                (request.plugin, request.command) == ("bridge", "ADD")
                and request.env.get("CNI_CONTAINERID") == container_id
                and request.rc == 0
            ):
                for iface in (request.answer or {}).get("interfaces", []):
                    if "sandbox" not in iface and iface.get("name") != conflist.BRIDGE:
                        return iface["name"]
        return None


@contextlib.contextmanager
def short_path(target: Path) -> Iterator[Path]:
    """A short name of the test's own for target (/tmp/pe2e-<random>, a symlink removed afterwards).

    Unix socket paths must fit in 108 bytes (containerd refuses > 104), and pytest's tmp_path grows with
    the run number and, under xdist, a popen-gw<N> level: what lives under the site root goes by this name.
    """
    link = Path(tempfile.mkdtemp(prefix="pe2e-", dir="/tmp" if os.path.isdir("/tmp") else None))
    link.rmdir()
    link.symlink_to(target, target_is_directory=True)  # FileExistsError if the name was taken meanwhile
    try:
        yield link
    finally:
        link.unlink()


@pytest.fixture
def site(plugin_set: PluginSet, tmp_path: Path) -> Iterator[Site]:
    with short_path(tmp_path) as root:
        yield from _site(plugin_set, root)


def _site(plugin_set: PluginSet, root: Path) -> Iterator[Site]:
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
    left = procs.remove_cgroup(cgroup_parent)
    # What the test owned, and only that, is gone: its namespaces (named pt-e2eh-/pt-e2eo-<hex> by
    # netns.temporary) and its cgroup.
    pinned = [name for name in (host.name, host.outside) if netns.exists(name)]
    assert not pinned and not left, f"the test's namespaces {pinned} or cgroups {left} are left"
