"""Delegating to the IPAM plugin a configuration names (the reference's pkg/ipam).

The plugin named by ``ipam.type`` is looked up in CNI_PATH and executed with
the same environment and stdin as the calling plugin, only CNI_COMMAND set
to the delegated command. Its result is read in the configuration's
cniVersion; an error object it prints is passed on with its code.

When ``ipam.type`` is "host-local" and the executable CNI_PATH finds is this
suite's own host-local, the request is served in-process instead (same code,
same on-disk store, no fork/exec), provided the in-process API is available.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable

from cni_plugins.spec.errors import ERR_INTERNAL, ERR_INVALID_CONFIG, ERR_TRY_AGAIN, CNIError
from cni_plugins.spec.skel import CmdArgs
from cni_plugins.spec.types import Result

# A delegated plugin may wait on a lock held by a concurrent ADD; bound the wait anyway.
EXEC_TIMEOUT = 120.0
# Marker that our own executables carry (see their launcher scripts).
_OWN_HOST_LOCAL_MARKERS = (b"ipam.host_local", b"ipam/host_local")


def ipam_type(conf: dict[str, Any]) -> str:
    ipam = conf.get("ipam")
    if ipam is None:
        return ""
    if not isinstance(ipam, dict):
        raise CNIError(ERR_INVALID_CONFIG, "ipam must be an object", f"got {type(ipam).__name__}")
    value = ipam.get("type", "") or ""
    if not isinstance(value, str):
        raise CNIError(ERR_INVALID_CONFIG, "ipam.type must be a string", f"got {value!r}")
    return value


def find_executable(name: str, path_dirs: list[str]) -> str | None:
    """The executable called ``name`` in the first directory of ``path_dirs`` that has it."""
    for directory in path_dirs:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_plugin(name: str, path_dirs: list[str]) -> str:
    """The IPAM executable called ``name`` in CNI_PATH."""
    if not name or "/" in name or name in (".", ".."):
        raise CNIError(ERR_INVALID_CONFIG, f"invalid plugin name {name!r}", "ipam.type must be a plain file name")
    if not path_dirs:
        raise CNIError(ERR_INVALID_CONFIG, f"failed to find plugin {name!r}: CNI_PATH is empty")
    found = find_executable(name, path_dirs)
    if found:
        return found
    raise CNIError(ERR_INVALID_CONFIG, f"failed to find plugin {name!r} in path {path_dirs}",
                   "install the IPAM plugin into a CNI_PATH directory or fix ipam.type")


def delegate_env(req: CmdArgs, command: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": req.container_id,
        "CNI_NETNS": req.netns,
        "CNI_IFNAME": req.ifname,
        "CNI_ARGS": req.args,
        "CNI_PATH": req.path,
    })
    return env


def exec_plugin(plugin: str, command: str, req: CmdArgs) -> bytes:
    """Run ``plugin`` for ``command``; return its stdout or raise its error."""
    import subprocess

    try:
        proc = subprocess.run([plugin], input=req.stdin_data, env=delegate_env(req, command),
                              capture_output=True, timeout=EXEC_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise CNIError(ERR_TRY_AGAIN, f"IPAM plugin {plugin} did not answer {command} within "
                       f"{EXEC_TIMEOUT:g} s", "it may be waiting on its store lock; try again") from None
    except OSError as exc:
        raise CNIError(ERR_INTERNAL, f"failed to execute IPAM plugin {plugin}: {exc.strerror}") from None
    if proc.returncode == 0:
        return proc.stdout
    raise _plugin_error(plugin, command, proc.stdout, proc.stderr)


def _plugin_error(plugin: str, command: str, stdout: bytes, stderr: bytes) -> CNIError:
    try:
        obj = json.loads(stdout)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and isinstance(obj.get("code"), int) and "msg" in obj:
        return CNIError(obj["code"], str(obj.get("msg", "")), str(obj.get("details", "") or ""))
    text = (stderr or stdout).decode(errors="replace").strip()
    return CNIError(ERR_INTERNAL, f"netplugin failed: {text!r}" if text else
                    f"IPAM plugin {os.path.basename(plugin)} failed {command} without an error object")


# ---- in-process host-local ------------------------------------------------

def _own_host_local(plugin: str) -> Any:
    """The in-process host-local module if ``plugin`` is this suite's executable, else None."""
    if os.environ.get("PYCNI_IPAM_NO_INPROCESS"):
        return None
    try:
        with open(plugin, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return None
    if not head.startswith(b"#!") or not any(marker in head for marker in _OWN_HOST_LOCAL_MARKERS):
        return None
    try:
        from ipam import host_local  # type: ignore[import-not-found]
    except ImportError:
        return None
    if not all(hasattr(host_local, fn) for fn in ("allocate", "release", "check", "gc", "status")):
        return None
    return host_local


def _in_process(req: CmdArgs) -> tuple[str, Any]:
    """(path of the IPAM executable, in-process module or None)."""
    name = ipam_type(req.conf)
    plugin = find_plugin(name, req.path_dirs)
    module = _own_host_local(plugin) if name == "host-local" else None
    return plugin, module


# ---- the pkg/ipam surface -----------------------------------------------------

def exec_add(req: CmdArgs) -> Result:
    plugin, module = _in_process(req)
    if module is not None:
        result = module.allocate(req.conf, req.container_id, req.ifname, req.args)
        # Read it as a delegated result would be read: in the configuration's version.
        return result.convert(req.cni_version) if isinstance(result, Result) else \
            Result.from_dict(result, req.cni_version)
    out = exec_plugin(plugin, "ADD", req)
    return Result.from_json(out, req.cni_version)


def exec_del(req: CmdArgs) -> None:
    _delegate(req, "DEL", lambda module: module.release(req.conf, req.container_id, req.ifname, req.args))


def exec_check(req: CmdArgs) -> None:
    _delegate(req, "CHECK", lambda module: module.check(req.conf, req.container_id, req.ifname, req.args))


def exec_gc(req: CmdArgs, valid: list[tuple[str, str]]) -> None:
    """GC with ``valid``, the (container ID, ifname) pairs the runtime still uses."""
    _delegate(req, "GC", lambda module: module.gc(req.conf, valid))


def exec_status(req: CmdArgs) -> None:
    _delegate(req, "STATUS", lambda module: module.status(req.conf))


def _delegate(req: CmdArgs, command: str, serve_in_process: Callable[[Any], Any]) -> None:
    """Serve a command whose answer is only success or an error: in-process or through the executable."""
    plugin, module = _in_process(req)
    if module is not None:
        serve_in_process(module)
    else:
        exec_plugin(plugin, command, req)
