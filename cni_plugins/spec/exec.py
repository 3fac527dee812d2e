"""Executing a CNI plugin as a process: find it in CNI_PATH, run it, read its answer.

The one place where the suite forks a plugin, for both sides of the
contract: a plugin delegating to another one (the bridge to its IPAM plugin)
and the runtime side (`pycni add`, the cache-driven DEL). An error object the
plugin prints is passed on with its code; anything else a failing plugin
does becomes an internal error that quotes what it wrote.

A request that `pycni agent` serves carries an ``ExecPolicy`` (in its
environment, read by ``CmdArgs.exec_policy``): the agent runs as root on
behalf of a caller, so it executes delegates only from the directories its
operator allowed, and hands them the caller's CNI_NETNS only where that path
means the namespace the caller passed. Anything else raises ``ExecRefused``
and the caller runs the whole request in its own process. The cold path (a
plugin process the runtime started) has no policy and no such limits.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from typing import Any, Mapping

from cni_plugins.spec.errors import ERR_INTERNAL, ERR_INVALID_CONFIG, ERR_TRY_AGAIN, CNIError

# The variables of the CNI protocol; a plugin gets only the ones its command uses.
CNI_ENV_VARS = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
OUTPUT_TAIL = 2000
# Set by `pycni agent` in the environment of every request it serves, never taken from its caller:
# the directories delegated executables may come from (real paths joined by ':'; empty: none) ...
AGENT_BIN_DIRS_VARIABLE = "PYCNI_AGENT_CNI_BIN_DIRS"
# ... and CNI_NETNS as the caller gave it, when the agent replaced it by the descriptor the caller passed.
AGENT_NETNS_VARIABLE = "PYCNI_AGENT_CNI_NETNS"


class ExecRefused(BaseException):
    """Running this delegate here is not allowed: the request must run in its caller's own process.

    Raised only under an ``ExecPolicy`` (a request the agent serves). It is a
    BaseException so that no plugin turns it into a CNI error object, while
    every undo (``except BaseException: undo.run(); raise``) still runs: the
    agent answers with a refusal once the plugin has taken back what it did,
    and the shim runs the request itself.
    """


@dataclass(frozen=True)
class ExecPolicy:
    """What a request the agent serves may execute, and the CNI_NETNS a delegate gets."""

    allowed_dirs: tuple[str, ...]  # real paths of the directories delegates may come from
    caller_netns: str = ""  # CNI_NETNS as the caller gave it ("" when it was not replaced)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ExecPolicy | None:
        """The policy a request's environment carries (None: no agent set one, anything may run)."""
        dirs = environ.get(AGENT_BIN_DIRS_VARIABLE)
        if dirs is None:
            return None
        return cls(tuple(d for d in dirs.split(":") if d), environ.get(AGENT_NETNS_VARIABLE, ""))

    def executable(self, path: str) -> str:
        """What to execute for ``path`` (found in CNI_PATH): the same file by its real directory.

        ExecRefused unless that directory is an allowed one. Executing the
        checked real path means a symlinked CNI_PATH entry cannot be switched
        to another directory between the check and the exec.
        """
        directory, name = os.path.split(path)
        real = os.path.realpath(directory or ".")
        if real not in self.allowed_dirs:
            allowed = ", ".join(self.allowed_dirs) or "none"
            raise ExecRefused(
                f"{path} is outside the directories the pycni agent may execute plugins from "
                f"({allowed}; see pycni agent --cni-bin-dir)"
            )
        return os.path.join(real, name)

    def child_request(self, netns: str, conf: dict[str, Any], stdin: bytes) -> tuple[str, bytes]:
        """CNI_NETNS and stdin for a delegated executable: the caller's path, where it means the same here.

        The agent works on the namespace descriptor the caller passed and names
        it by a /proc path of its own (``netns``). An executable gets the
        caller's CNI_NETNS instead, as it would cold (a plugin like dhcp keeps
        the path beyond the call), but only when that path names the very
        same namespace for the agent; otherwise ExecRefused.
        """
        if not self.caller_netns or not netns or self.caller_netns == netns:
            return netns, stdin
        try:
            here, passed = os.stat(self.caller_netns), os.stat(netns)
        except OSError as exc:
            raise ExecRefused(
                f"CNI_NETNS {self.caller_netns} cannot be handed to a delegated plugin: "
                f"the agent cannot see it ({exc.strerror})"
            ) from None
        if (here.st_dev, here.st_ino) != (passed.st_dev, passed.st_ino):
            raise ExecRefused(
                f"CNI_NETNS {self.caller_netns} is another namespace for the agent than for the "
                f"caller: a delegated plugin would act on the wrong one"
            )
        replaced = replace_sandbox(conf, netns, self.caller_netns)
        return self.caller_netns, stdin if replaced is None else json.dumps(replaced).encode()


def replace_sandbox(conf: Any, old: str, new: str) -> dict[str, Any] | None:
    """``conf`` with every prevResult interface whose sandbox is ``old`` moved to ``new`` (None: none was)."""
    if not isinstance(conf, dict) or not isinstance(conf.get("prevResult"), dict):
        return None
    interfaces = conf["prevResult"].get("interfaces")
    if not isinstance(interfaces, list):
        return None
    changed = [dict(i, sandbox=new) if isinstance(i, dict) and i.get("sandbox") == old else i for i in interfaces]
    if changed == interfaces:
        return None
    return dict(conf, prevResult=dict(conf["prevResult"], interfaces=changed))


class PluginError(CNIError):
    """A plugin failed: the error object it printed, or what we saw instead."""

    def __init__(self, code: int, msg: str, details: str = "", plugin: str = "", command: str = "") -> None:
        super().__init__(code, msg, details)
        self.plugin = plugin
        self.command = command
        self.stderr = b""  # what the plugin wrote to stderr, for the caller's diagnostics

    def __str__(self) -> str:
        text = super().__str__()
        if not self.plugin:
            return text
        during = f" ({self.command})" if self.command else ""
        return f"plugin {self.plugin!r} failed{during}: {text}"


def check_plugin_name(name: str, what: str = "plugin type") -> None:
    """A plugin name is a plain file name: no path separators, not '.' or '..' (CVE-2021-20206 class)."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"invalid {what} {name!r}",
            "a plugin type is the plain file name of an executable in CNI_PATH",
        )


def find_executable(name: str, path_dirs: list[str]) -> str | None:
    """The executable called ``name`` in the first directory of ``path_dirs`` that has it."""
    for directory in path_dirs:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_plugin(name: str, path_dirs: list[str]) -> str:
    """The executable for plugin type ``name`` in CNI_PATH, or the spec's error."""
    check_plugin_name(name)
    if not path_dirs:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"failed to find plugin {name!r}: CNI_PATH is empty",
            "set CNI_PATH to the directories holding the plugin executables",
        )
    found = find_executable(name, path_dirs)
    if found:
        return found
    raise CNIError(
        ERR_INVALID_CONFIG,
        f"failed to find plugin {name!r} in path {path_dirs}",
        "install the plugin into a CNI_PATH directory (`pycni install --cni-bin-dir DIR`) or fix the plugin type",
    )


def plugin_environment(base: Mapping[str, str], command: str, cni: Mapping[str, str | None]) -> dict[str, str]:
    """``base`` without its CNI_* protocol variables, then the ones this call sets (None: left out)."""
    env = {k: v for k, v in base.items() if k not in CNI_ENV_VARS}
    env["CNI_COMMAND"] = command
    for key, value in cni.items():
        if value is not None:
            env[key] = value
    return env


def error_from_output(plugin: str, returncode: int, stdout: bytes, stderr: bytes) -> PluginError:
    """What a failed plugin run means: its error object, or an internal error quoting its output."""
    try:
        parsed = json.loads(stdout) if stdout.strip() else None
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("code"), int) and "msg" in parsed:
        return PluginError(parsed["code"], str(parsed.get("msg", "")), str(parsed.get("details", "") or ""), plugin)
    tail = stderr.decode(errors="replace").strip()[-OUTPUT_TAIL:]
    how = f"killed by signal {-returncode}" if returncode < 0 else f"exited with status {returncode}"
    details = f"stderr: {tail}" if tail else "it wrote nothing to stderr"
    if stdout.strip():
        details += f"; stdout: {stdout.decode(errors='replace').strip()[-OUTPUT_TAIL:]}"
    return PluginError(ERR_INTERNAL, f"{how} without a CNI error object on stdout", details, plugin)


def run_plugin(
    path: str, command: str, env: Mapping[str, str], stdin: bytes, timeout: float | None
) -> tuple[bytes, bytes]:
    """Run one plugin process; return (stdout, stderr) or raise PluginError."""
    name = os.path.basename(path)
    try:
        proc = subprocess.run([path], input=stdin, env=dict(env), capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PluginError(
            ERR_TRY_AGAIN,
            f"did not answer {command} within {timeout:g} s",
            "it may be waiting on a lock held by another request; try again",
            plugin=name,
            command=command,
        ) from None
    except OSError as exc:
        raise PluginError(
            ERR_INTERNAL, f"cannot execute {path}: {exc.strerror}", plugin=name, command=command
        ) from None
    if proc.returncode != 0:
        error = error_from_output(name, proc.returncode, proc.stdout, proc.stderr)
        error.command = command
        error.stderr = proc.stderr
        raise error
    return proc.stdout, proc.stderr
