"""Delegating a request to another plugin: in-process when it is ours, else its executable.

A plugin hands part of its work to another plugin the way the reference's
pkg/invoke does: the delegate is looked up in CNI_PATH and run with the same
request (environment, container, interface), another command and another
configuration. When the executable CNI_PATH finds is one of this suite's
launchers (``registry.own_plugin``), the same code runs in this process
instead: no fork/exec, identical checks and results. ``PYCNI_NO_INPROCESS=1``
in the request's environment forces the executable (for comparisons).

``run_in_process`` serves a delegate of this suite without any CNI_PATH
lookup; the vxlan plugin attaches its pods through the bridge that way.

A request `pycni agent` serves carries an ``ExecPolicy`` (``req.exec_policy``):
an executable outside the directories the agent's operator allowed is never
run (``ExecRefused``: the plugin undoes what it did and the caller runs the
request itself), and the one that runs gets the caller's CNI_NETNS.
"""

from __future__ import annotations

from typing import Any

from cni_plugins.spec import registry
from cni_plugins.spec.exec import AGENT_NETNS_VARIABLE, find_plugin, plugin_environment, run_plugin
from cni_plugins.spec.skel import CmdArgs, run_command
from cni_plugins.spec.types import Result

NO_INPROCESS_VARS = ("PYCNI_NO_INPROCESS", "PYCNI_IPAM_NO_INPROCESS")


def _in_process_allowed(req: CmdArgs) -> bool:
    return not any(req.environ.get(var) for var in NO_INPROCESS_VARS)


def delegate(req: CmdArgs, plugin_type: str, command: str, conf: dict[str, Any] | None = None) -> Result | None:
    """Run ``plugin_type`` for ``command`` on ``conf`` (default: the request's own configuration).

    Returns the delegate's result for ADD (read in the configuration's
    version), None for the other commands; raises the delegate's CNIError.
    """
    sub = req.derive(req.conf if conf is None else conf, command)
    path = find_plugin(plugin_type, sub.path_dirs)
    own = registry.own_plugin(path) if _in_process_allowed(req) else None
    if own == plugin_type:
        return _serve(sub, plugin_type)
    netns, stdin = sub.netns, sub.stdin_data
    policy = req.exec_policy
    if policy is not None:  # served by the agent: only what its operator allows, in the caller's namespace
        path = policy.executable(path)
        netns, stdin = policy.child_request(sub.netns, sub.conf, sub.stdin_data)
    base = {k: v for k, v in req.environ.items() if k != AGENT_NETNS_VARIABLE}
    env = plugin_environment(
        base,
        command,
        {
            "CNI_CONTAINERID": sub.container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": sub.ifname,
            "CNI_ARGS": sub.args,
            "CNI_PATH": sub.path,
        },
    )
    stdout, stderr = run_plugin(path, command, env, stdin, req.timeout)
    if stderr:
        req.warn(stderr.decode(errors="replace").rstrip("\n"))
    if command != "ADD":
        return None
    return Result.from_json(stdout, sub.cni_version)


def run_in_process(req: CmdArgs, plugin_type: str, conf: dict[str, Any], command: str | None = None) -> Result | None:
    """Serve ``conf`` with this suite's ``plugin_type`` in this process (no CNI_PATH lookup)."""
    return _serve(req.derive(conf, command), plugin_type)


def _serve(sub: CmdArgs, plugin_type: str) -> Result | None:
    result = run_command(sub, registry.funcs(plugin_type))
    if sub.command != "ADD":
        return None
    # Read it as a delegated result is read: in the configuration's version.
    if isinstance(result, Result):
        return result.convert(sub.cni_version)
    return Result.from_dict(result, sub.cni_version)
