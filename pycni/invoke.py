"""Running one CNI plugin as a process: find it, set its environment, read its answer."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from cni_plugins.spec.errors import ERR_DECODE, ERR_INVALID_CONFIG, CNIError
from cni_plugins.spec.exec import OUTPUT_TAIL, PluginError, find_executable, plugin_environment, run_plugin

DEFAULT_CNI_PATH = "/opt/cni/bin"


@dataclass
class PluginRequest:
    """Everything one plugin invocation gets besides its executable."""

    command: str
    config: dict[str, Any]
    container_id: str | None = None
    netns: str | None = None
    ifname: str | None = None
    args: str | None = None

    def env(self, cni_path: list[str]) -> dict[str, str]:
        return plugin_environment(
            os.environ,
            self.command,
            {
                "CNI_PATH": ":".join(cni_path),
                "CNI_CONTAINERID": self.container_id,
                "CNI_NETNS": self.netns,
                "CNI_IFNAME": self.ifname,
                "CNI_ARGS": self.args,
            },
        )


def split_cni_path(value: str | list[str] | None) -> list[str]:
    """CNI_PATH as a list of directories (default /opt/cni/bin when unset)."""
    from conf.loader import dir_list

    return dir_list(value, "CNI_PATH", DEFAULT_CNI_PATH)


def find_plugin(plugin_type: str, cni_path: list[str]) -> str:
    """The executable called ``plugin_type`` in the first CNI_PATH directory that has it."""
    from conf import check_plugin_type

    check_plugin_type(plugin_type, None, "type")
    found = find_executable(plugin_type, cni_path)
    if found:
        return found
    raise CNIError(
        ERR_INVALID_CONFIG,
        f"plugin {plugin_type!r} not found in CNI_PATH ({':'.join(cni_path)})",
        "set CNI_PATH to the directories holding the plugin executables, "
        "or install pycni's plugins with `pycni install --cni-bin-dir DIR`",
    )


def exec_plugin(
    plugin_path: str,
    request: PluginRequest,
    cni_path: list[str],
    *,
    want_result: bool = False,
    timeout: float | None = None,
    stderr_sink: Callable[[bytes], None] | None = None,
) -> dict[str, Any] | None:
    """Run a plugin with the CNI environment and its config on stdin.

    Returns the parsed stdout object when ``want_result`` (ADD), else None.
    Raises PluginError when the plugin fails or answers something unreadable.
    Whatever the plugin writes to stderr is handed to ``stderr_sink``
    (default: our own stderr), so its diagnostics stay visible.
    """
    name = os.path.basename(plugin_path)
    stdin = json.dumps(request.config).encode()
    sink = stderr_sink or _write_stderr
    try:
        stdout, stderr = run_plugin(plugin_path, request.command, request.env(cni_path), stdin, timeout)
    except PluginError as error:
        if error.stderr:
            sink(error.stderr)
        raise
    if stderr:
        sink(stderr)
    if not want_result:
        return None
    try:
        result = json.loads(stdout)
    except ValueError as exc:
        raise PluginError(
            ERR_DECODE,
            f"succeeded but its output is not JSON: {exc}",
            f"stdout: {stdout.decode(errors='replace')[:OUTPUT_TAIL]!r}",
            name,
            request.command,
        ) from None
    if not isinstance(result, dict):
        raise PluginError(
            ERR_DECODE, "succeeded but its output is not a JSON object", plugin=name, command=request.command
        )
    return result


def _write_stderr(data: bytes) -> None:
    buffer = getattr(sys.stderr, "buffer", None)
    if buffer is not None:
        buffer.write(data)
    else:
        sys.stderr.write(data.decode(errors="replace"))
    sys.stderr.flush()
