"""The plugin side of the CNI contract: environment, stdin, dispatch, errors.

Every plugin hands ``plugin_main`` a ``PluginFuncs`` of plain functions that
take a ``CmdArgs`` and return a ``Result`` (or nothing). ``dispatch`` does the
validation the spec and the reference skeleton do and turns every failure
into the spec's error object, so it can also serve requests in-process.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from cni_plugins.spec.errors import (
    ERR_DECODE,
    ERR_INCOMPATIBLE_VERSION,
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_INVALID_ENV,
    ERR_INVALID_NETNS,
    ERR_IO,
    ERR_UNKNOWN_CONTAINER,
    CNIError,
)
from cni_plugins.spec.version import (
    CURRENT_VERSION,
    SUPPORTED_VERSIONS,
    at_least,
    config_version,
    require_supported,
    version_info,
)

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
# Which environment variables each command needs (the spec's table).
_REQUIRED_ENV: dict[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}
# The minimum configuration version that allows a command.
_MIN_VERSION = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}

_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")  # used with fullmatch: no trailing newline slips through
# Documented limits, checked before anything is touched: names and IDs end up in interface
# aliases (256 bytes: "<network>/<containerID>/<ifname>"), chain names, comments and file names.
MAX_NETWORK_NAME = 100
MAX_CONTAINER_ID = 128
GC_ATTACHMENT_KEYS = ("cni.dev/valid-attachments", "cni.dev/attachments")


# How long a delegated plugin may take by default (it may wait on a lock held by a concurrent ADD).
DEFAULT_TIMEOUT = 120.0


@dataclass
class CmdArgs:
    """One CNI request: the environment plus the parsed configuration.

    Everything a request needs travels here rather than in process-wide
    state, so one process can serve many requests at once (the warm agent):
    ``environ`` is the request's whole environment (delegated plugins inherit
    it), ``warn`` collects its diagnostics (they reach the caller's stderr),
    ``timeout`` bounds what it waits for.
    """

    command: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: str = ""
    path: str = ""
    stdin_data: bytes = b""
    conf: dict[str, Any] = field(default_factory=dict)
    cni_version: str = CURRENT_VERSION
    netns_override: bool = False
    environ: Mapping[str, str] = field(default_factory=dict)
    diagnostics: list[str] = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT

    @property
    def network_name(self) -> str:
        return self.conf.get("name", "")

    @property
    def path_dirs(self) -> list[str]:
        return [d for d in self.path.split(os.pathsep) if d]

    @property
    def exec_policy(self) -> Any:
        """What a delegated executable may be, when `pycni agent` serves this request (an ``exec.ExecPolicy``).

        The agent puts it into the request's environment (``environ``), so it
        travels with the request and its derived ones; None (the cold path):
        whatever CNI_PATH finds may run.
        """
        from cni_plugins.spec.exec import ExecPolicy

        return ExecPolicy.from_environ(self.environ)

    def warn(self, message: str) -> None:
        """A diagnostic line for the caller's stderr (never stdout)."""
        self.diagnostics.append(message if message.endswith("\n") else message + "\n")

    def derive(self, conf: dict[str, Any], command: str | None = None) -> CmdArgs:
        """The same request with another configuration (and command): what a delegated plugin gets."""
        import json

        return CmdArgs(
            command=command or self.command,
            container_id=self.container_id,
            netns=self.netns,
            ifname=self.ifname,
            args=self.args,
            path=self.path,
            stdin_data=json.dumps(conf).encode(),
            conf=conf,
            cni_version=config_version(conf),
            netns_override=self.netns_override,
            environ=self.environ,
            diagnostics=self.diagnostics,
            timeout=self.timeout,
        )


PluginFunc = Callable[[CmdArgs], Any]


_FUNC_NAMES = {"ADD": "cmd_add", "DEL": "cmd_del", "CHECK": "cmd_check", "GC": "cmd_gc", "STATUS": "cmd_status"}


@dataclass
class PluginFuncs:
    """What a plugin does for each command.

    Either the functions themselves, or ``module``: the dotted name of a module
    holding ``cmd_add``, ``cmd_del`` and optionally ``cmd_check``, ``cmd_gc``,
    ``cmd_status``. That module is imported when the first command that needs
    it runs, never for VERSION: this is the one seam that keeps a plugin's
    start-up cheap, so plugin modules import what they use at the top.
    """

    add: PluginFunc | None = None
    delete: PluginFunc | None = None
    check: PluginFunc | None = None
    gc: PluginFunc | None = None
    status: PluginFunc | None = None
    supported_versions: tuple[str, ...] = SUPPORTED_VERSIONS
    module: str = ""
    # A decode.Schema, or the dotted name of the module whose SCHEMA it is (imported on first use, so
    # VERSION never pays for it); with ``module`` and none given, that module's SCHEMA.
    schema: Any = None

    def options(self) -> Any:
        """The Schema the configuration is decoded with (None: the plugin reads it raw)."""
        if isinstance(self.schema, str) or (self.schema is None and self.module):
            import importlib

            self.schema = getattr(importlib.import_module(self.schema or self.module), "SCHEMA", None)
        return self.schema

    def func(self, command: str) -> PluginFunc | None:
        """The function serving ``command`` (None: the plugin has nothing to do for it)."""
        explicit = {"ADD": self.add, "DEL": self.delete, "CHECK": self.check, "GC": self.gc, "STATUS": self.status}[
            command
        ]
        if explicit is not None or not self.module:
            return explicit
        import importlib

        return getattr(importlib.import_module(self.module), _FUNC_NAMES[command], None)


# ---- validation ----------------------------------------------------------


def validate_container_id(container_id: str) -> None:
    if not container_id:
        raise CNIError(ERR_UNKNOWN_CONTAINER, "missing containerID", "set CNI_CONTAINERID to the container's ID")
    if not _NAME_RE.fullmatch(container_id):
        raise CNIError(ERR_INVALID_ENV, "invalid characters in containerID", repr(container_id))
    if len(container_id) > MAX_CONTAINER_ID:
        raise CNIError(
            ERR_INVALID_ENV,
            "containerID is too long",
            f"it has {len(container_id)} characters; pycni accepts at most {MAX_CONTAINER_ID}",
        )


def validate_network_name(name: Any) -> None:
    if not name:
        raise CNIError(ERR_INVALID_CONFIG, "missing network name", "the network configuration needs a 'name'")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise CNIError(ERR_INVALID_CONFIG, "invalid characters found in network name", repr(name))
    if len(name) > MAX_NETWORK_NAME:
        raise CNIError(
            ERR_INVALID_CONFIG,
            "network name is too long",
            f"it has {len(name)} characters; pycni accepts at most {MAX_NETWORK_NAME}",
        )


def interface_name_problem(name: str) -> str | None:
    """Why the kernel would refuse ``name`` as an interface name (None: it would not)."""
    if not name:
        return "interface name is empty"
    if len(name.encode("utf-8", "surrogatepass")) > 15:
        return f"interface name is too long: {name!r} has more than the kernel's 15 bytes"
    if name in (".", ".."):
        return "interface name is . or .."
    if any(c in "/:" or c.isspace() for c in name):
        return "interface name contains / or : or whitespace characters"
    return None


def validate_interface_name(ifname: str) -> None:
    """CNI_IFNAME as the reference skeleton checks it (an environment error, code 4)."""
    problem = interface_name_problem(ifname)
    if problem:
        raise CNIError(ERR_INVALID_ENV, problem, "set CNI_IFNAME to an interface name such as eth0")


def validate_link_name(name: str, option: str) -> None:
    """An interface name given in the configuration (a configuration error, code 7)."""
    problem = interface_name_problem(name)
    if problem:
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"invalid {option} {name!r}: {problem}",
            "an interface name has at most 15 bytes, is not . or .., and has no '/', ':' or spaces",
        )


MAX_DEPTH = 64  # nesting deeper than any configuration needs is refused, not recursed into


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_config(stdin_data: bytes) -> dict[str, Any]:
    """The configuration as Go's decoder would accept it: strict JSON, an object, sane nesting."""
    try:
        # Strict UTF-8 without a byte-order mark, as Go's decoder reads it (json.loads(bytes)
        # would also take UTF-16/32 and strip a BOM).
        text = (stdin_data or b"").decode("utf-8")
        if text.startswith("\ufeff"):
            raise ValueError("a byte-order mark is not valid JSON")
        conf = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise CNIError(
            ERR_DECODE,
            "error decoding network config: nesting too deep",
            f"a network configuration nests at most {MAX_DEPTH} levels",
        ) from None
    except ValueError as exc:
        raise CNIError(
            ERR_DECODE,
            f"error decoding network config: {exc}",
            "stdin must hold the network configuration as a JSON object",
        ) from None
    if not isinstance(conf, dict):
        raise CNIError(
            ERR_DECODE, "error decoding network config: expected a JSON object", f"got {type(conf).__name__}"
        )
    check_strings(conf)
    return conf


def _bad_string(text: str) -> str | None:
    """Why ``text`` cannot reach a kernel name, a file or a ruleset (None: it can)."""
    if "\x00" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains an unpaired surrogate (not valid UTF-8)"
    return None


def check_strings(conf: Any) -> None:
    """Refuse NUL and unpaired surrogates anywhere in the document, and nesting past MAX_DEPTH."""
    stack: list[tuple[Any, str, int]] = [(conf, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CNIError(
                ERR_DECODE,
                "error decoding network config: nesting too deep",
                f"{path or 'the document'} nests deeper than {MAX_DEPTH} levels",
            )
        if isinstance(value, str):
            why = _bad_string(value)
            if why:
                raise CNIError(
                    ERR_INVALID_CONFIG,
                    f"invalid string at {path or 'top level'}: {why}",
                    "configuration strings must be valid UTF-8 text without NUL",
                )
        elif isinstance(value, dict):
            for key, item in value.items():
                why = _bad_string(key)
                if why:
                    raise CNIError(
                        ERR_INVALID_CONFIG,
                        f"invalid key in {path or 'top level'}: {why}",
                        "configuration keys must be valid UTF-8 text without NUL",
                    )
                stack.append((item, f"{path}.{key}" if path else key, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{n}]", depth + 1) for n, item in enumerate(value))


def gc_attachments(conf: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The valid attachments of a GC request, as (containerID, ifname) pairs."""
    for key in GC_ATTACHMENT_KEYS:
        if key in conf:
            raw = conf[key]
            break
    else:
        return []
    if not isinstance(raw, list):
        raise CNIError(ERR_INVALID_CONFIG, f"{key} must be a list of attachments")
    out = []
    for n, item in enumerate(raw):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("containerID"), str)
            or not isinstance(item.get("ifname"), str)
        ):
            raise CNIError(ERR_INVALID_CONFIG, f"{key}[{n}] must be an object with string 'containerID' and 'ifname'")
        out.append((item["containerID"], item["ifname"]))
    return out


def _same_netns_as_plugin(path: str) -> bool:
    try:
        target = os.stat(path)
        mine = os.stat("/proc/thread-self/ns/net")
    except OSError:
        return False
    return (target.st_dev, target.st_ino) == (mine.st_dev, mine.st_ino)


# ---- dispatch -----------------------------------------------------------


@dataclass
class Outcome:
    exit_code: int
    stdout: str
    stderr: str = ""


def read_request(environ: Mapping[str, str], stdin_data: bytes) -> CmdArgs:
    """Turn the environment and stdin into a validated CmdArgs (or raise CNIError)."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CNIError(
            ERR_INVALID_ENV,
            "required env variables [CNI_COMMAND] missing",
            f"set CNI_COMMAND to one of {', '.join(COMMANDS)}",
        )
    if command not in COMMANDS:
        raise CNIError(
            ERR_INVALID_ENV, f"unknown CNI_COMMAND: {command}", f"CNI_COMMAND must be one of {', '.join(COMMANDS)}"
        )
    for name in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"):
        why = _bad_string(environ.get(name, ""))
        if why:
            raise CNIError(ERR_INVALID_ENV, f"{name} {why}", "CNI environment values must be valid UTF-8 text")
    missing = [name for name in _REQUIRED_ENV[command] if not environ.get(name)]
    if missing:
        raise CNIError(
            ERR_INVALID_ENV,
            f"required env variables [{','.join(missing)}] missing",
            f"{command} needs {', '.join(_REQUIRED_ENV[command])}",
        )
    override = environ.get("CNI_NETNS_OVERRIDE", "").lower() in ("1", "true")
    req = CmdArgs(
        command=command,
        container_id=environ.get("CNI_CONTAINERID", ""),
        netns=environ.get("CNI_NETNS", ""),
        ifname=environ.get("CNI_IFNAME", ""),
        args=environ.get("CNI_ARGS", ""),
        path=environ.get("CNI_PATH", ""),
        stdin_data=stdin_data,
        netns_override=override,
        environ=dict(environ),
    )
    if command == "VERSION":
        return req
    req.conf = parse_config(stdin_data)
    validate_network_name(req.conf.get("name"))
    if command in ("ADD", "DEL", "CHECK"):
        validate_container_id(req.container_id)
        validate_interface_name(req.ifname)
    req.cni_version = config_version(req.conf)
    return req


def _check_version(req: CmdArgs, funcs: PluginFuncs) -> None:
    minimum = _MIN_VERSION.get(req.command)
    if minimum and not at_least(req.cni_version, minimum):
        raise CNIError(
            ERR_INCOMPATIBLE_VERSION,
            f"config version does not allow {req.command}",
            f"{req.command} needs cniVersion {minimum} or later; the config has {req.cni_version}",
        )
    require_supported(req.cni_version, funcs.supported_versions)


def run_command(req: CmdArgs, funcs: PluginFuncs) -> Any:
    """Run one validated request (not VERSION); return what the plugin's function returned.

    In-process delegation calls this too, so a delegated plugin gets exactly
    the checks it would get as an executable.
    """
    _check_version(req, funcs)
    if req.command in ("ADD", "CHECK") and not req.netns_override and _same_netns_as_plugin(req.netns):
        raise CNIError(
            ERR_INVALID_NETNS,
            "plugin's netns and netns from CNI_NETNS should not be the same",
            f"CNI_NETNS={req.netns} is the namespace the plugin runs in; give the container's",
        )
    func = funcs.func(req.command)
    if func is None:
        return None  # an optional command the plugin has nothing to do for (add and delete are required)
    schema = funcs.options()
    if schema is not None:
        from cni_plugins.spec.decode import decode

        req.conf = decode(req.conf, schema, lenient=req.command == "DEL", warn=req.warn)
    return func(req)


def handle(req: CmdArgs, funcs: PluginFuncs) -> str:
    """Run one validated request; return what goes to stdout."""
    if req.command == "VERSION":
        return json.dumps(version_info(funcs.supported_versions))
    result = run_command(req, funcs)
    if result is None:
        return ""
    if isinstance(result, dict):
        return json.dumps(result, indent=4)
    return result.to_json(req.cni_version)


def dispatch(funcs: PluginFuncs, environ: Mapping[str, str], stdin_data: bytes) -> Outcome:
    """Validate and run one request; never raises, always returns an Outcome."""
    version = CURRENT_VERSION
    req: CmdArgs | None = None
    try:
        req = read_request(environ, stdin_data)
        version = req.cni_version
        return Outcome(0, handle(req, funcs), _diagnostics(req))
    except CNIError as err:
        return Outcome(1, err.to_json(version) + "\n", _diagnostics(req))
    except OSError as exc:
        err = CNIError(ERR_IO, str(exc))
        return Outcome(1, err.to_json(version) + "\n", _diagnostics(req) + _trace())
    except Exception as exc:  # a bug: report it as the spec's internal error, trace on stderr
        err = CNIError(ERR_INTERNAL, f"{type(exc).__name__}: {exc}")
        return Outcome(1, err.to_json(version) + "\n", _diagnostics(req) + _trace())


def _diagnostics(req: CmdArgs | None) -> str:
    return "".join(req.diagnostics) if req is not None else ""


def _trace() -> str:
    import traceback  # only on the failure path: it is slow to import

    return traceback.format_exc()


def setup_logging() -> None:
    """Diagnostics go to stderr, or to PYCNI_LOG_FILE when set; never stdout.

    Plugins log through logging.getLogger("pycni..."); logging is only
    imported when PYCNI_LOG_LEVEL or PYCNI_LOG_FILE asks for it, or when a
    plugin module imports it itself (then warnings still reach stderr).
    """
    if not (os.environ.get("PYCNI_LOG_LEVEL") or os.environ.get("PYCNI_LOG_FILE")):
        return
    import logging

    log = logging.getLogger("pycni")
    level = os.environ.get("PYCNI_LOG_LEVEL", "WARNING").upper()
    target = os.environ.get("PYCNI_LOG_FILE")
    handler: logging.Handler = logging.FileHandler(target) if target else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(getattr(logging, level, logging.WARNING))


def plugin_main(funcs: PluginFuncs, about: str) -> None:
    """Entry point of a plugin executable: serve one request and exit."""
    setup_logging()
    environ = os.environ
    if not environ.get("CNI_COMMAND"):
        # Run by hand with no command: say what this is, like the reference does.
        sys.stderr.write(f"{about}\nCNI protocol versions supported: {', '.join(funcs.supported_versions)}\n")
        sys.exit(0)
    if environ.get("CNI_COMMAND") == "VERSION":
        stdin_data = b""
    else:
        try:
            stdin_data = sys.stdin.buffer.read()
        except OSError as exc:
            sys.stdout.write(CNIError(ERR_IO, f"error reading from stdin: {exc}").to_json(CURRENT_VERSION) + "\n")
            sys.exit(1)
    outcome = dispatch(funcs, environ, stdin_data)
    if outcome.stderr:
        sys.stderr.write(outcome.stderr)
    if outcome.stdout:
        sys.stdout.write(outcome.stdout if outcome.stdout.endswith("\n") else outcome.stdout + "\n")
    sys.stdout.flush()
    sys.exit(outcome.exit_code)


def prev_result(req: CmdArgs):
    """The prevResult of a chained request, read in the configuration's version (or None)."""
    raw = req.conf.get("prevResult")
    if raw is None:
        return None
    from cni_plugins.spec.types import Result

    return Result.from_dict(raw, req.cni_version)
