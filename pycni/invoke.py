"""Running one CNI plugin as a process: find it, set its environment, read its answer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable

from cni_plugins.spec.errors import ERR_DECODE, ERR_INTERNAL, ERR_INVALID_CONFIG, CNIError

DEFAULT_CNI_PATH = "/opt/cni/bin"
# The variables of the CNI protocol; a plugin gets only the ones its command uses.
CNI_ENV_VARS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
STDERR_TAIL = 2000


class PluginError(CNIError):
    """A plugin failed: the error object it printed, or what we saw instead."""

    def __init__(self, code: int, msg: str, details: str = "", plugin: str = "", command: str = "") -> None:
        super().__init__(code, msg, details)
        self.plugin = plugin
        self.command = command

    def __str__(self) -> str:
        text = super().__str__()
        if not self.plugin:
            return text
        during = f" ({self.command})" if self.command else ""
        return f"plugin {self.plugin!r} failed{during}: {text}"


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
        env = {k: v for k, v in os.environ.items() if k not in CNI_ENV_VARS}
        env["CNI_COMMAND"] = self.command
        env["CNI_PATH"] = ":".join(cni_path)
        for key, value in (("CNI_CONTAINERID", self.container_id), ("CNI_NETNS", self.netns),
                           ("CNI_IFNAME", self.ifname), ("CNI_ARGS", self.args)):
            if value is not None:
                env[key] = value
        return env


def split_cni_path(value: str | list[str] | None) -> list[str]:
    """CNI_PATH as a list of directories (default /opt/cni/bin when unset)."""
    from conf.loader import dir_list

    return dir_list(value, "CNI_PATH", DEFAULT_CNI_PATH)


def find_plugin(plugin_type: str, cni_path: list[str]) -> str:
    """The executable called ``plugin_type`` in the first CNI_PATH directory that has it."""
    from cni_plugins.shared.ipam import find_executable
    from conf import check_plugin_type

    check_plugin_type(plugin_type, None, "type")
    found = find_executable(plugin_type, cni_path)
    if found:
        return found
    raise CNIError(ERR_INVALID_CONFIG, f"plugin {plugin_type!r} not found in CNI_PATH ({':'.join(cni_path)})",
                   "set CNI_PATH to the directories holding the plugin executables, "
                   "or install pycni's plugins with `pycni install --cni-bin-dir DIR`")


def _stderr_tail(stderr: bytes) -> str:
    text = stderr.decode(errors="replace").strip()
    return text[-STDERR_TAIL:]


def _error_from_output(plugin: str, returncode: int, stdout: bytes, stderr: bytes) -> PluginError:
    try:
        parsed = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("code"), int) and "msg" in parsed:
        return PluginError(parsed["code"], str(parsed.get("msg", "")), str(parsed.get("details", "") or ""),
                           plugin)
    tail = _stderr_tail(stderr)
    how = f"killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
    details = f"stderr: {tail}" if tail else "it wrote nothing to stderr"
    if stdout.strip():
        details += f"; stdout: {stdout.decode(errors='replace').strip()[-STDERR_TAIL:]}"
    return PluginError(ERR_INTERNAL, f"{how} without a CNI error object on stdout", details, plugin)


def exec_plugin(plugin_path: str, request: PluginRequest, cni_path: list[str], *,
                want_result: bool = False, timeout: float | None = None,
                stderr_sink: Callable[[bytes], None] | None = None) -> dict[str, Any] | None:
    """Run a plugin with the CNI environment and its config on stdin.

    Returns the parsed stdout object when ``want_result`` (ADD), else None.
    Raises PluginError when the plugin fails or answers something unreadable.
    Whatever the plugin writes to stderr is handed to ``stderr_sink``
    (default: our own stderr), so its diagnostics stay visible.
    """
    name = os.path.basename(plugin_path)
    stdin = json.dumps(request.config).encode()
    try:
        proc = subprocess.run([plugin_path], input=stdin, env=request.env(cni_path),
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PluginError(ERR_INTERNAL, f"did not finish within {timeout} seconds",
                          plugin=name, command=request.command) from None
    except OSError as exc:
        raise PluginError(ERR_INTERNAL, f"cannot execute {plugin_path}: {exc.strerror}",
                          plugin=name, command=request.command) from None
    if proc.stderr:
        (stderr_sink or _write_stderr)(proc.stderr)
    if proc.returncode != 0:
        error = _error_from_output(name, proc.returncode, proc.stdout, proc.stderr)
        error.command = request.command
        raise error
    if not want_result:
        return None
    try:
        result = json.loads(proc.stdout)
    except ValueError as exc:
        raise PluginError(ERR_DECODE, f"succeeded but its output is not JSON: {exc}",
                          f"stdout: {proc.stdout.decode(errors='replace')[:STDERR_TAIL]!r}", name,
                          request.command) from None
    if not isinstance(result, dict):
        raise PluginError(ERR_DECODE, "succeeded but its output is not a JSON object",
                          plugin=name, command=request.command)
    return result


def _write_stderr(data: bytes) -> None:
    buffer = getattr(sys.stderr, "buffer", None)
    if buffer is not None:
        buffer.write(data)
    else:
        sys.stderr.write(data.decode(errors="replace"))
    sys.stderr.flush()
