"""The `pycni` command: run CNI networks by hand, manage namespaces, install plugins.

`cli` is a click group; another module can add commands with
``cli.add_command(...)``, or be listed in OPTIONAL_COMMANDS to be imported
only when its command is used (so `pycni --help` stays fast).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from typing import Any, Callable, NoReturn

import click

from cni_plugins.spec.errors import ERR_INVALID_ENV, CNIError

DEFAULT_IFNAME = "eth0"

# command name -> "module:attribute" of a click command defined elsewhere.
OPTIONAL_COMMANDS: dict[str, str] = {
    "ipam": "pycni.ipam_cmd:ipam",
    "demo": "pycni.demo:demo",
    "cluster": "pycni.cluster_cmd:cluster",
    "agent": "pycni.agent.cli:agent",
    "conformance": "pycni.conformance.cli:conformance",
    "inspect": "pycni.inspect:inspect",
}


class LazyGroup(click.Group):
    """A group whose optional subcommands are imported on first use."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def _available(self) -> dict[str, str]:
        found = {}
        for name, target in self.lazy_commands.items():
            module = target.partition(":")[0]
            try:
                if importlib.util.find_spec(module) is not None:
                    found[name] = target
            except ImportError:
                continue
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._available()))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            return command
        target = self._available().get(cmd_name)
        if target is None:
            return None
        module_name, _, attribute = target.partition(":")
        return getattr(importlib.import_module(module_name), attribute)


def fail(exc: BaseException) -> NoReturn:
    """Report an error on stderr and exit 1 (stdout stays clean for results)."""
    code = getattr(exc, "code", None)
    if isinstance(exc, OSError) or not isinstance(code, int):
        click.echo(f"Error: {exc}", err=True)
    else:
        click.echo(f"Error: {exc} (CNI code {code})", err=True)
    sys.exit(1)


def run_reporting_errors(fn: Callable[[], Any]) -> Any:
    from netns.errors import NetnsError

    try:
        return fn()
    except (CNIError, NetnsError, OSError) as exc:
        fail(exc)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    click.echo(f"pycni {_pycni_version()}")
    ctx.exit()


@click.group(cls=LazyGroup, lazy_commands=OPTIONAL_COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print pycni's version and exit (`pycni version` also lists spec versions and plugins).",
)
def cli() -> None:
    """pycni: CNI plugins and the tools to run them.

    Attach a network namespace to a CNI network (add, check, del), clean up
    (gc), ask plugins whether they are ready (status), manage network
    namespaces (netns) and install pycni's plugins for a container runtime
    (install). Run `pycni COMMAND --help` for details.
    """


# ---- network commands (cnitool equivalents) ------------------------------

_ENV_HEADER = """
\b
Environment (each also settable by the option named in brackets):
"""
_PATHS_ENV = """\
  NETCONFPATH   ':'-separated directories holding *.conflist / *.conf
                files (default /etc/cni/net.d)            [--netconf-path]
  CNI_PATH      ':'-separated directories holding the plugin executables
                (default /opt/cni/bin)                    [--cni-path]
"""
_ATTACHMENT_ENV = """\
  CNI_ARGS      extra arguments for the plugins, KEY=VALUE;KEY=VALUE
                                                          [--cni-args]
  CAP_ARGS      capability arguments as a JSON object, e.g.
                '{"portMappings": [{"hostPort": 8080,
                  "containerPort": 80, "protocol": "tcp"}]}'
                a plugin receives a key only if its config declares
                that capability                           [--cap-args]
  CNI_IFNAME    interface name inside the namespace (default eth0) [--ifname]
"""
_CACHE_ENV = """\
  CNI_CACHE_DIR where results are cached (default /var/lib/cni) [--cache-dir]
"""
_NETNS_HELP = """
NETNS is a namespace name (as in `ip netns`, meaning /var/run/netns/NAME)
or a path containing '/' (e.g. /proc/1234/ns/net). Unless --container-id
is given, the container ID is derived from the namespace path the way
cnitool does, so the two tools share cache entries.
"""
# add / check / del take a namespace; gc / status work on the whole network.
NETWORK_ENV_HELP = _ENV_HEADER + _PATHS_ENV + _ATTACHMENT_ENV + _CACHE_ENV + _NETNS_HELP
CLUSTER_ENV_HELP = _ENV_HEADER + _PATHS_ENV + _CACHE_ENV


def _option_group(*options: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[..., Any]:
    """One decorator applying ``options`` in the order listed (as if stacked top to bottom)."""

    def apply(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


_common_options = _option_group(
    click.option(
        "--netconf-path",
        envvar="NETCONFPATH",
        default="",
        show_envvar=False,
        help="Directories with network configurations (env NETCONFPATH).",
    ),
    click.option(
        "--cni-path", envvar="CNI_PATH", default="", help="Directories with plugin executables (env CNI_PATH)."
    ),
    click.option(
        "--cache-dir",
        envvar="CNI_CACHE_DIR",
        default="/var/lib/cni",
        show_default=True,
        help="Result cache directory (env CNI_CACHE_DIR).",
    ),
)

_attachment_options = _option_group(
    click.option(
        "--container-id", default=None, help="Container ID passed to the plugins (default: derived from NETNS)."
    ),
    click.option(
        "-i",
        "--ifname",
        envvar="CNI_IFNAME",
        default=DEFAULT_IFNAME,
        show_default=True,
        help="Interface name inside the namespace (env CNI_IFNAME).",
    ),
    click.option(
        "--cni-args", envvar="CNI_ARGS", default="", help="KEY=VALUE;... arguments for the plugins (env CNI_ARGS)."
    ),
    click.option(
        "--cap-args", envvar="CAP_ARGS", default="", help="Capability arguments as a JSON object (env CAP_ARGS)."
    ),
)


def netns_path(netns: str) -> str:
    """A namespace name means /var/run/netns/NAME; anything with '/' is a path."""
    if "/" not in netns:
        from netns import RUN_DIR

        return os.path.join(RUN_DIR, netns)
    return os.path.abspath(netns)


def derived_container_id(path: str) -> str:
    """cnitool's container ID: "cnitool-" + hex of the first 10 bytes of sha512(path)."""
    return "cnitool-" + hashlib.sha512(path.encode()).digest()[:10].hex()


def _load(network: str, netconf_path: str):
    from conf import load_conflist

    return load_conflist(network, netconf_path or None)


def _runtime(cni_path: str, cache_dir: str):
    from .runtime import CNIRuntime

    return CNIRuntime(cni_path or None, cache_dir)


def _runtime_conf(netns: str, container_id: str | None, ifname: str, cni_args: str, cap_args: str):
    from .runtime import RuntimeConf, parse_cni_args

    path = netns_path(netns)
    caps: dict[str, Any] = {}
    if cap_args:
        try:
            caps = json.loads(cap_args)
        except ValueError as exc:
            raise CNIError(ERR_INVALID_ENV, f"CAP_ARGS is not valid JSON: {exc}") from None
        if not isinstance(caps, dict):
            raise CNIError(ERR_INVALID_ENV, "CAP_ARGS must be a JSON object, e.g. '{\"portMappings\": [...]}'")
    return RuntimeConf(
        container_id=container_id or derived_container_id(path),
        netns=path,
        ifname=ifname,
        args=parse_cni_args(cni_args),
        capability_args=caps,
    )


@cli.command("add", epilog=NETWORK_ENV_HELP)
@click.argument("network")
@click.argument("netns")
@_attachment_options
@_common_options
def add_cmd(
    network: str,
    netns: str,
    container_id: str | None,
    ifname: str,
    cni_args: str,
    cap_args: str,
    netconf_path: str,
    cni_path: str,
    cache_dir: str,
) -> None:
    """Attach namespace NETNS to NETWORK and print the result as JSON.

    Runs every plugin of the network's configuration with CNI_COMMAND=ADD,
    in order, each getting the previous one's result, and caches the final
    result for check and del.
    """
    from .invoke import PluginError

    def run() -> dict:
        netlist = _load(network, netconf_path)
        rt = _runtime_conf(netns, container_id, ifname, cni_args, cap_args)
        try:
            return _runtime(cni_path, cache_dir).add(netlist, rt)
        except PluginError as exc:
            if len(netlist.plugins) == 1:
                raise
            raise CNIError(
                exc.code, str(exc), f"undo what earlier plugins did with `pycni del {network} {netns}`"
            ) from None

    click.echo(json.dumps(run_reporting_errors(run), indent=4))


@cli.command("check", epilog=NETWORK_ENV_HELP)
@click.argument("network")
@click.argument("netns")
@_attachment_options
@_common_options
def check_cmd(
    network: str,
    netns: str,
    container_id: str | None,
    ifname: str,
    cni_args: str,
    cap_args: str,
    netconf_path: str,
    cni_path: str,
    cache_dir: str,
) -> None:
    """Verify that NETNS is still attached to NETWORK as ADD left it.

    Runs every plugin with CNI_COMMAND=CHECK and the cached ADD result.
    Exits 0 when all plugins agree, 1 with the first plugin's error
    otherwise. Needs cniVersion 0.4.0 or later; a network with
    "disableCheck": true is not checked.
    """

    def run() -> None:
        netlist = _load(network, netconf_path)
        rt = _runtime_conf(netns, container_id, ifname, cni_args, cap_args)
        if not _runtime(cni_path, cache_dir).check(netlist, rt):
            click.echo(f"CHECK skipped: network {network!r} sets disableCheck", err=True)

    run_reporting_errors(run)


@cli.command("del", epilog=NETWORK_ENV_HELP)
@click.argument("network")
@click.argument("netns")
@_attachment_options
@_common_options
def del_cmd(
    network: str,
    netns: str,
    container_id: str | None,
    ifname: str,
    cni_args: str,
    cap_args: str,
    netconf_path: str,
    cni_path: str,
    cache_dir: str,
) -> None:
    """Detach NETNS from NETWORK.

    Runs the plugins with CNI_COMMAND=DEL in reverse order, with the cached
    ADD result, then forgets the cached result. Deleting something already
    deleted (or a namespace that is gone) succeeds. CNI_ARGS and CAP_ARGS
    default to the ones ADD used; if the network's configuration file was
    removed since ADD, the configuration ADD cached is used.
    """
    from conf import NetworkNotFoundError

    def run() -> None:
        rt = _runtime_conf(netns, container_id, ifname, cni_args, cap_args)
        runtime = _runtime(cni_path, cache_dir)
        try:
            netlist = _load(network, netconf_path)
        except NetworkNotFoundError:
            netlist = runtime.cached_netlist(network, rt)
            if netlist is None:
                raise
            click.echo(
                f"note: network {network!r} has no configuration file any more; using the configuration ADD cached",
                err=True,
            )
        runtime.delete(netlist, rt)

    run_reporting_errors(run)


def _parse_attachment(value: str) -> tuple[str, str]:
    container_id, sep, ifname = value.partition(":")
    if not container_id:
        raise click.BadParameter(f"{value!r}: expected CONTAINER_ID[:IFNAME]")
    return container_id, (ifname if sep else DEFAULT_IFNAME)


@cli.command("gc", epilog=CLUSTER_ENV_HELP)
@click.argument("network")
@click.argument("netns", required=False)
@click.option(
    "--valid",
    "valid",
    multiple=True,
    metavar="CONTAINER_ID[:IFNAME]",
    help="An attachment still in use (repeatable). When given, cached attachments not "
    "listed are deleted. Default: every cached attachment is in use.",
)
@_common_options
def gc_cmd(
    network: str, netns: str | None, valid: tuple[str, ...], netconf_path: str, cni_path: str, cache_dir: str
) -> None:
    """Garbage-collect NETWORK: free what no attachment uses any more.

    Cached attachments that are not valid get a DEL; then every plugin is
    sent CNI_COMMAND=GC with "cni.dev/valid-attachments" listing the valid
    ones, so it can free leftovers (IP leases, rules) of containers that are
    gone. Plugin GC needs cniVersion 1.1.0; "disableGC": true skips it all.
    NETNS is accepted for cnitool compatibility and ignored.
    """

    def run() -> None:
        netlist = _load(network, netconf_path)
        attachments = [_parse_attachment(v) for v in valid] if valid else None
        report = _runtime(cni_path, cache_dir).gc(netlist, attachments)
        if report.skipped:
            click.echo(f"GC skipped: {report.skipped}")
            return
        for entry in report.removed:
            click.echo(f"deleted stale attachment {entry.container_id} {entry.ifname}")
        if report.plugins:
            click.echo(f"GC sent to {', '.join(report.plugins)} with {len(report.valid)} valid attachment(s)")
        if report.note:
            click.echo(report.note)

    run_reporting_errors(run)


STATUS_READY, STATUS_NOT_READY, STATUS_UNKNOWN = 0, 1, 2
_STATUS_CODES_HELP = """
\b
Exit status:
  0  ready: every plugin answered STATUS with success
  1  not ready: a plugin answered with an error (printed on stderr with
     its CNI code: 50 plugin not available, 51 limited connectivity, ...)
  2  could not ask: no network of that name, an unusable configuration,
     a cniVersion older than 1.1.0 (no STATUS before it), or a plugin
     that is not in CNI_PATH, cannot be executed or did not answer
"""


def _plugin_answered(exc: BaseException) -> bool:
    """Whether a plugin error is the plugin's own answer (it ran and exited non-zero), not a plugin that
    could not be run or did not answer in time (those are raised while handling the OSError or timeout)."""
    import subprocess

    from cni_plugins.spec.exec import PluginError

    return isinstance(exc, PluginError) and not isinstance(exc.__context__, (OSError, subprocess.TimeoutExpired))


@cli.command("status", epilog=_STATUS_CODES_HELP + CLUSTER_ENV_HELP)
@click.argument("network")
@click.argument("netns", required=False)
@_common_options
def status_cmd(network: str, netns: str | None, netconf_path: str, cni_path: str, cache_dir: str) -> None:
    """Ask NETWORK's plugins whether they are ready to add containers.

    Sends CNI_COMMAND=STATUS to each plugin (cniVersion 1.1.0 or later) and
    stops at the first error. The exit status tells ready (0) from not
    ready (1) from could not ask (2); see below. NETNS is accepted and
    ignored.
    """
    from netns.errors import NetnsError

    try:
        netlist = _load(network, netconf_path)
        report = _runtime(cni_path, cache_dir).status(netlist)
    except (CNIError, NetnsError, OSError) as exc:
        code = getattr(exc, "code", None)
        click.echo(f"Error: {exc}" + (f" (CNI code {code})" if isinstance(code, int) else ""), err=True)
        sys.exit(STATUS_NOT_READY if _plugin_answered(exc) else STATUS_UNKNOWN)
    if report.skipped:
        click.echo(f"Error: cannot ask: STATUS not supported: {report.skipped}", err=True)
        sys.exit(STATUS_UNKNOWN)
    click.echo(f"network {network!r} is ready ({', '.join(report.plugins)})")


# ---- namespaces ----------------------------------------------------------


@cli.group("netns")
def netns_group() -> None:
    """Create, list, delete and run commands in network namespaces.

    Namespaces are pinned under /var/run/netns like `ip netns` does, so
    both tools see the same ones.
    """


@netns_group.command("add")
@click.argument("name")
def netns_add(name: str) -> None:
    """Create network namespace NAME and print its path."""
    import netns

    click.echo(run_reporting_errors(lambda: netns.create(name)))


@netns_group.command("del")
@click.argument("name")
def netns_del(name: str) -> None:
    """Delete network namespace NAME (its interfaces go with it)."""
    import netns

    run_reporting_errors(lambda: netns.delete(name))


@netns_group.command("list")
def netns_list() -> None:
    """List network namespace names, one per line."""
    import netns

    for name in run_reporting_errors(netns.list_names):
        click.echo(name)


@netns_group.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def netns_exec(name: str, command: tuple[str, ...]) -> None:
    """Run COMMAND inside network namespace NAME and exit with its status.

    Example: pycni netns exec pod1 -- ip addr
    """
    import subprocess

    import netns

    def run() -> int:
        with netns.enter(name):
            try:
                return subprocess.run(list(command), check=False).returncode
            except FileNotFoundError:
                click.echo(f"Error: command not found: {command[0]}", err=True)
                return 127

    code = run_reporting_errors(run)
    sys.exit(code if code >= 0 else 128 - code)


# ---- version and install -------------------------------------------------


def _pycni_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pycni")
    except PackageNotFoundError:
        return "unknown"


@cli.command("version")
def version_cmd() -> None:
    """Show the pycni version, CNI spec versions and plugins."""
    from cni_plugins.spec.version import SUPPORTED_VERSIONS

    from .install import plugin_registry

    click.echo(f"pycni {_pycni_version()}")
    click.echo(f"CNI spec versions: {', '.join(SUPPORTED_VERSIONS)}")
    click.echo(f"plugins: {', '.join(sorted(plugin_registry()))}")


@cli.command("install")
@click.option(
    "--cni-bin-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Directory to write the plugin executables to, e.g. /opt/cni/bin (created if missing).",
)
@click.option("--force", is_flag=True, help="Replace plugin files that pycni did not write.")
@click.option(
    "--agent-socket",
    default="/run/pycni/agent.sock",
    show_default=True,
    metavar="PATH",
    help="Where the executables look for `pycni agent` (give the agent the same --socket).",
)
@click.option(
    "--no-agent",
    is_flag=True,
    help="Write executables that never try an agent: every call runs the plugin in-process (the cold "
    "path). These are always Python shims.",
)
@click.option(
    "--native-shim",
    "shim",
    flag_value="native",
    help="Insist on the compiled shim (the default anyway): fail instead of falling back to the "
    "Python shim when there is none.",
)
@click.option(
    "--python-shim",
    "shim",
    flag_value="python",
    help="Put the Python shim in front of the plugins instead of the compiled one (it starts a Python "
    "interpreter on every call, ~10 ms).",
)
@click.option(
    "--systemd-unit",
    is_flag=True,
    help="Also install the agent's systemd unit (pycni-agent.service) into --systemd-dir, and where "
    "systemd runs, reload it and enable and start the agent (systemctl enable --now).",
)
@click.option(
    "--systemd-dir",
    "--unit-dir",
    "unit_dir",
    default="/etc/systemd/system",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where --systemd-unit writes the unit.",
)
def install_cmd(
    cni_bin_dir: str,
    force: bool,
    agent_socket: str,
    no_agent: bool,
    shim: str | None,
    systemd_unit: bool,
    unit_dir: str,
) -> None:
    """Install pycni's plugins as executables in a CNI bin directory.

    Writes one small executable per plugin (bridge, host-local, ...). Each
    hands its request to `pycni agent` over the agent's unix socket (the warm
    path: the plugin's code is already loaded there) and, when no agent
    answers, runs the plugin itself with the Python interpreter pycni is
    installed in (the cold path, with identical results; it then says so in
    one line on stderr). Point your container runtime's CNI bin dir (or
    CNI_PATH) there. Refuses directories on $PATH, and files it did not write
    unless --force.

    \b
    The shim in front of the plugins:
      compiled (default)  pycni-shim in the same directory runs every plugin
                          file; a warm call starts no interpreter. It is built
                          with the package (pip install on a machine with a C
                          compiler), or compiled now with $CC, cc or gcc.
      Python              --python-shim, or when there is no compiled shim and
                          no compiler (install then says so): the same
                          protocol and fallback, plus a Python start per call.

    Then start the agent: `pycni agent`, or --systemd-unit to install its
    unit, and where systemd runs, enable and start it. Without an agent every
    call runs cold (~3-30x the Go plugins' time per pod start).
    """
    from .install import agent_command, enable_systemd_unit, install, install_systemd_unit, warm_path_hint

    socket_path = None if no_agent else agent_socket
    done = run_reporting_errors(
        lambda: install(cni_bin_dir, force=force, agent_socket=socket_path, shim=shim or "auto")
    )
    for item in done.plugins:
        click.echo(f"wrote {item.path} ({item.target})")
    if done.shim == "compiled":
        click.echo(f"wrote {done.shim_binary} (the compiled shim, {done.shim_origin})")
    if done.note:
        click.echo(f"pycni install: {done.note}", err=True)
    if not systemd_unit:
        click.echo(f"pycni install: {warm_path_hint(socket_path)}")
        return
    # The agent executes delegates only from directories it is told: this one is where the shims went.
    unit = run_reporting_errors(
        lambda: install_systemd_unit(unit_dir, agent_socket=agent_socket, cni_bin_dirs=(os.path.abspath(cni_bin_dir),))
    )
    click.echo(f"wrote {unit}")
    outcome = run_reporting_errors(lambda: enable_systemd_unit(unit))
    if outcome.enabled:
        click.echo(f"pycni install: {outcome.message}")
    else:
        click.echo(
            f"pycni install: {outcome.message}; meanwhile start the agent with `{agent_command(agent_socket)}`",
            err=True,
        )


def main(argv: list[str] | None = None) -> None:
    # Every flag can come from the environment: PYCNI_<COMMAND>_<FLAG> (e.g. PYCNI_AGENT_LEASE_TTL); the
    # store's flags and the agent's identity have the short names they document (PYCNI_STORE, PYCNI_PUBLIC_IP).
    cli.main(args=argv, prog_name="pycni", auto_envvar_prefix="PYCNI")


if __name__ == "__main__":
    main()
