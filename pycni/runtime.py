"""Running a network's plugin chain for a container, as libcni does for runtimes.

ADD runs the plugins in order, each seeing the previous one's result, and
caches the final result; DEL runs them in reverse with the cached result;
CHECK replays the cached result through every plugin; GC and STATUS (spec
1.1.0) ask every plugin to clean up or report health.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from cni_plugins.spec.args import split_cni_args
from cni_plugins.spec.errors import (
    ERR_INCOMPATIBLE_VERSION,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_UNKNOWN_CONTAINER,
    CNIError,
)
from cni_plugins.spec.skel import validate_container_id, validate_interface_name
from cni_plugins.spec.version import at_least
from conf import NetworkConfigList, build_plugin_config

from .cache import CachedAttachment, ResultCache
from .invoke import PluginRequest, exec_plugin, find_plugin, split_cni_path

VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"


@dataclass
class RuntimeConf:
    """One container's side of an invocation (libcni's RuntimeConf)."""

    container_id: str
    netns: str = ""
    ifname: str = "eth0"
    args: list[tuple[str, str]] = field(default_factory=list)
    capability_args: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Refuse values that would break CNI_ARGS or escape the cache directory."""
        # The same rules a plugin applies to CNI_CONTAINERID / CNI_IFNAME (libcni's too).
        validate_container_id(self.container_id)
        validate_interface_name(self.ifname)
        for key, value in self.args:
            if not key or any(c in key + value for c in ";=") or not value:
                raise CNIError(
                    ERR_INVALID_ENV,
                    f"invalid CNI_ARGS pair {key!r}={value!r}",
                    "CNI_ARGS is KEY=VALUE pairs separated by ';'",
                )

    @property
    def args_string(self) -> str:
        return ";".join(f"{key}={value}" for key, value in self.args)


def parse_cni_args(raw: str) -> list[tuple[str, str]]:
    """CNI_ARGS "K1=V1;K2=V2" as pairs, refusing malformed pairs (and empty values) like cnitool does."""
    return split_cni_args(raw, allow_empty_value=False)


def convert_result(result: dict[str, Any], version: str) -> dict[str, Any]:
    """``result`` written in spec ``version`` (unchanged when it already is)."""
    own = result.get("cniVersion") or version
    if own == version:
        return result
    from cni_plugins.spec.types import Result

    try:
        return Result.from_dict(result, own).to_dict(version)
    except CNIError as exc:
        raise CNIError(exc.code, f"cannot convert a {own} result to {version}: {exc.msg}", exc.details) from None


@dataclass
class GCReport:
    """What a GC pass did."""

    skipped: str = ""
    removed: list[CachedAttachment] = field(default_factory=list)
    valid: list[dict[str, str]] = field(default_factory=list)
    plugins: list[str] = field(default_factory=list)
    note: str = ""


@dataclass
class StatusReport:
    skipped: str = ""
    plugins: list[str] = field(default_factory=list)


class CNIRuntime:
    """Executes network configurations against containers (libcni's CNIConfig)."""

    def __init__(
        self,
        cni_path: str | list[str] | None = None,
        cache_dir: str | None = None,
        *,
        timeout: float | None = None,
        stderr_sink: Callable[[bytes], None] | None = None,
    ) -> None:
        self.cni_path = split_cni_path(cni_path)
        self.cache = ResultCache(cache_dir)
        self.timeout = timeout
        self.stderr_sink = stderr_sink

    # ---- plumbing -------------------------------------------------------
    def _resolve_all(self, netlist: NetworkConfigList) -> list[str]:
        """Every plugin's executable, found before any of them runs."""
        return [find_plugin(plugin["type"], self.cni_path) for plugin in netlist.plugins]

    def _run(self, path: str, request: PluginRequest, want_result: bool = False) -> dict[str, Any] | None:
        return exec_plugin(
            path, request, self.cni_path, want_result=want_result, timeout=self.timeout, stderr_sink=self.stderr_sink
        )

    def _container_request(self, command: str, config: dict[str, Any], rt: RuntimeConf) -> PluginRequest:
        return PluginRequest(
            command=command,
            config=config,
            container_id=rt.container_id,
            netns=rt.netns,
            ifname=rt.ifname,
            args=rt.args_string,
        )

    @staticmethod
    def _with_cached_args(rt: RuntimeConf, cached: CachedAttachment | None) -> RuntimeConf:
        """Fill in CNI_ARGS and capability args from ADD's cache entry when none were given."""
        if cached is None:
            return rt
        return RuntimeConf(
            container_id=rt.container_id,
            netns=rt.netns,
            ifname=rt.ifname,
            args=rt.args or list(cached.cni_args),
            capability_args=rt.capability_args or dict(cached.capability_args),
        )

    def cached_netlist(self, network: str, rt: RuntimeConf) -> NetworkConfigList | None:
        """The configuration ADD used, from its cache entry (None if there is none).

        Lets DEL clean up after the configuration file was removed, as
        container runtimes do.
        """
        from conf import parse_conflist

        rt.validate()
        entry = self.cache.load(network, rt.container_id, rt.ifname)
        if entry is None or not entry.config:
            return None
        return parse_conflist(entry.config, f"cache entry {self.cache.path(network, rt.container_id, rt.ifname)}")

    # ---- operations -----------------------------------------------------
    def add(self, netlist: NetworkConfigList, rt: RuntimeConf) -> dict[str, Any]:
        rt.validate()
        paths = self._resolve_all(netlist)
        result: dict[str, Any] | None = None
        for plugin, path in zip(netlist.plugins, paths):
            config = build_plugin_config(netlist, plugin, result, rt.capability_args)
            answer = self._run(path, self._container_request("ADD", config, rt), want_result=True)
            result = convert_result(answer, netlist.cni_version)
        if result is None:
            raise CNIError(ERR_INVALID_CONFIG, f"network {netlist.name!r} has no plugins")
        self.cache.save(
            CachedAttachment(
                network_name=netlist.name,
                container_id=rt.container_id,
                ifname=rt.ifname,
                config=netlist.source_bytes,
                netns=rt.netns,
                cni_args=list(rt.args),
                capability_args=dict(rt.capability_args),
                result=result,
            )
        )
        return result

    def check(self, netlist: NetworkConfigList, rt: RuntimeConf) -> bool:
        """Run CHECK; False when the network disables it, True when every plugin passed."""
        rt.validate()
        if not at_least(netlist.cni_version, "0.4.0"):
            raise CNIError(
                ERR_INCOMPATIBLE_VERSION,
                f"configuration version {netlist.cni_version!r} does not support the CHECK command",
                "CHECK needs cniVersion 0.4.0 or later",
            )
        if netlist.disable_check:
            return False
        entry = self.cache.load(netlist.name, rt.container_id, rt.ifname)
        if entry is None or entry.result is None:
            raise CNIError(
                ERR_UNKNOWN_CONTAINER,
                f"could not retrieve cached result for network {netlist.name!r}, container "
                f"{rt.container_id!r}, interface {rt.ifname!r}",
                f"no entry in {self.cache.results_dir}; was ADD run with the same cache "
                "directory, container ID and interface name?",
            )
        previous = convert_result(entry.result, netlist.cni_version)
        rt = self._with_cached_args(rt, entry)
        paths = self._resolve_all(netlist)
        for plugin, path in zip(netlist.plugins, paths):
            config = build_plugin_config(netlist, plugin, previous, rt.capability_args)
            self._run(path, self._container_request("CHECK", config, rt))
        return True

    def delete(self, netlist: NetworkConfigList, rt: RuntimeConf) -> None:
        """Run DEL in reverse order; succeeds again when already deleted."""
        rt.validate()
        previous: dict[str, Any] | None = None
        entry: CachedAttachment | None = None
        try:
            entry = self.cache.load(netlist.name, rt.container_id, rt.ifname)
            # Spec 0.4.0 introduced prevResult on DEL.
            if entry is not None and entry.result is not None and at_least(netlist.cni_version, "0.4.0"):
                previous = convert_result(entry.result, netlist.cni_version)
        except CNIError:
            # An unreadable entry must not block cleanup (libcni drops it too).
            self.cache.remove(netlist.name, rt.container_id, rt.ifname)
            entry, previous = None, None
        rt = self._with_cached_args(rt, entry)
        paths = self._resolve_all(netlist)
        for plugin, path in reversed(list(zip(netlist.plugins, paths))):
            config = build_plugin_config(netlist, plugin, previous, rt.capability_args)
            self._run(path, self._container_request("DEL", config, rt))
        self.cache.remove(netlist.name, rt.container_id, rt.ifname)

    def gc(self, netlist: NetworkConfigList, valid_attachments: Iterable[tuple[str, str]] | None = None) -> GCReport:
        """Garbage-collect the network.

        ``valid_attachments`` are the (container ID, interface) pairs still in
        use; by default every attachment in the cache counts as valid. Cached
        attachments that are not valid get a DEL (their cache entry goes
        with it); then, for cniVersion 1.1.0 and later, every plugin gets GC
        with ``cni.dev/valid-attachments`` so it frees anything else.
        """
        if netlist.disable_gc:
            return GCReport(skipped=f"network {netlist.name!r} sets disableGC")
        cached = self.cache.list(network=netlist.name)
        if valid_attachments is None:
            valid = {(entry.container_id, entry.ifname) for entry in cached}
        else:
            valid = set(valid_attachments)
        report = GCReport(valid=[{"containerID": cid, "ifname": ifname} for cid, ifname in sorted(valid)])
        errors: list[CNIError] = []
        for entry in cached:
            if (entry.container_id, entry.ifname) in valid:
                continue
            stale = RuntimeConf(
                container_id=entry.container_id,
                netns=entry.netns,
                ifname=entry.ifname,
                args=list(entry.cni_args),
                capability_args=dict(entry.capability_args),
            )
            try:
                self.delete(netlist, stale)
                report.removed.append(entry)
            except CNIError as exc:
                errors.append(
                    CNIError(exc.code, f"cannot delete stale attachment {entry.container_id} {entry.ifname}: {exc}")
                )
        if not at_least(netlist.cni_version, "1.1.0"):
            report.note = (
                f"plugins were not asked to GC: network {netlist.name!r} has cniVersion "
                f"{netlist.cni_version}, GC needs 1.1.0"
            )
        else:
            for plugin in netlist.plugins:
                config = build_plugin_config(netlist, plugin)
                config[VALID_ATTACHMENTS_KEY] = report.valid
                try:
                    path = find_plugin(plugin["type"], self.cni_path)
                    self._run(path, PluginRequest(command="GC", config=config))
                    report.plugins.append(plugin["type"])
                except CNIError as exc:
                    errors.append(exc)
        if errors:
            raise CNIError(errors[0].code, "GC failed: " + "; ".join(str(e) for e in errors))
        return report

    def status(self, netlist: NetworkConfigList) -> StatusReport:
        """Ask every plugin whether it is ready to ADD (spec 1.1.0); the first failure raises."""
        if not at_least(netlist.cni_version, "1.1.0"):
            return StatusReport(
                skipped=f"network {netlist.name!r} has cniVersion {netlist.cni_version}; STATUS needs 1.1.0"
            )
        report = StatusReport()
        for plugin in netlist.plugins:
            path = find_plugin(plugin["type"], self.cni_path)
            self._run(path, PluginRequest(command="STATUS", config=build_plugin_config(netlist, plugin)))
            report.plugins.append(plugin["type"])
        return report
