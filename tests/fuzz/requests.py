"""Generating malformed CNI requests, each with the error codes the spec allows for it.

Every request starts from a valid one for its plugin (``Profile.base``) and
gets exactly one defect, so the answer it must get is known:

=================  ==================================================  ==========
kind               defect                                              code
=================  ==================================================  ==========
json               not JSON, NaN/Infinity, nesting > 64, not an        6
                   object, invalid UTF-8, trailing garbage
type               an option of the plugin's schema (any letter        7 (6 for
                   case, nested ones too) with a value of the wrong    cniVersion)
                   JSON type
value              an option with a value of the right type that the   7 (2 for an
                   plugin cannot take: out of range, huge, negative,   unsupported
                   malformed addresses, rule syntax                    protocol)
injection          shell/ruleset/path syntax in the network name,      7 / 4
                   the container ID or the interface name
string             NUL or an unpaired surrogate in any string of the   7
                   configuration (keys too)
env                CNI_COMMAND missing or unknown, a required          4 (8: the
                   variable missing, invalid UTF-8 or NUL in a CNI_*   plugin's own
                   value, CNI_NETNS not a network namespace            netns)
version            unsupported or unparseable cniVersion, a command    1 / 6
                   the configuration's version does not allow
=================  ==================================================  ==========

pycni answers an unparseable cniVersion with 6 (it cannot decode it), where
the v1.1.1 reference answers 1; the spec lets either fit ("incompatible" vs
"cannot decode"), and pycni keeps 1 for versions it can read but does not
support.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from hypothesis import strategies as st

from cni_plugins.spec.decode import AnyValue, ListOf, Schema

from .harness import FUZZ_IFNAME, NETWORK, FuzzNode, Request

ERR_VERSION, ERR_UNSUPPORTED, ERR_ENV, ERR_DECODE, ERR_CONFIG, ERR_NETNS = 1, 2, 4, 6, 7, 8
CONTAINER_COMMANDS = ("ADD", "DEL", "CHECK")
ALL_COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS")
REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
}

# Shell, ruleset, path and format syntax; each holds a character no name, ID or address allows.
PAYLOADS = [
    '"; flush ruleset',
    "$(reboot)",
    "`id`",
    "x\nflush ruleset",
    "../../../etc/passwd",
    "} ; drop",
    "a' OR '1'='1",
    "-j ACCEPT",
    "%s%n%x",
    "\u202eevil",
    "a b",
    "${IFS}",
    "|nc -l 4444",
    "x;y",
    "<script>",
    "\\\\x00",
    "ip saddr 1.2.3.4 }",
    "*",
    "10.0.0.1 } counter",
    "#comment",
]
# Interface names the kernel (and the spec) refuse: too long, or with '/', ':' or whitespace.
BAD_IFNAMES = ["a" * 16, "eth 0", "eth/0", "eth:0", ".", "..", "eth0\n", "\teth", "x" * 100, "eth0 ; reboot", "../../x"]


@dataclass
class Bad:
    """Values of one option that the plugin must refuse on ADD, with the allowed codes."""

    path: tuple[Any, ...]
    values: list[Any]
    codes: frozenset[int] = frozenset({ERR_CONFIG})


@dataclass
class Profile:
    plugin: str
    schema: Schema
    base: Callable[[FuzzNode], dict[str, Any]]
    bad: list[Bad] = field(default_factory=list)
    commands: tuple[str, ...] = ALL_COMMANDS  # the commands the plugin serves (with checks)
    ifname: str = ""  # CNI_IFNAME of its requests ("": the harness's free FUZZ_IFNAME)
    uses_netns: bool = True  # reads CNI_NETNS (IPAM and portmap do not: a bogus one is not their business)
    # CNI_ARGS values it must refuse on ADD: malformed pairs and unknown keys are 4; a well-formed
    # argument with a value the plugin cannot take may be 4 or 7 (e.g. MAC=zz), listed as (value, codes).
    bad_args: list[str | tuple[str, frozenset[int]]] = field(default_factory=list)


# ---- the schema's options ------------------------------------------------------------------


def schema_leaves(schema: Schema, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every option (nested ones too) as (path, spec); list items get index 0."""
    out: list[tuple[tuple, Any]] = []
    for name, spec in schema.fields.items():
        if isinstance(spec, AnyValue) or name == "prevResult":
            continue
        here = path + (name,)
        out.extend(_spec_leaves(spec, here))
    return out


def _spec_leaves(spec: Any, here: tuple) -> list[tuple[tuple, Any]]:
    if isinstance(spec, AnyValue):
        return []
    out = [(here, spec)]
    if isinstance(spec, Schema):
        out.extend(schema_leaves(spec, here))
    elif isinstance(spec, ListOf):
        out.extend(_spec_leaves(spec.item, here + (0,)))
    return out


def wrong_type(spec: Any) -> st.SearchStrategy:
    """A JSON value that is not of ``spec``'s type (never null: null means absent)."""
    text = st.text(max_size=8)
    ints = st.integers(min_value=-(2**70), max_value=2**70)
    floats = st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: f != int(f))
    lists = st.lists(st.integers(0, 9), max_size=2)
    dicts = st.dictionaries(st.text(max_size=3), st.integers(0, 9), max_size=2)
    bools = st.booleans()
    if isinstance(spec, Schema) or spec is dict:
        return st.one_of(text, ints, bools, lists)
    if isinstance(spec, ListOf) or spec is list:
        return st.one_of(text, ints, bools, dicts)
    if spec is int:
        return st.one_of(text, floats, bools, lists, dicts)
    if spec is float:
        return st.one_of(text, bools, lists, dicts)
    if spec is bool:
        return st.one_of(text, ints, floats, lists, dicts)
    if spec is str:
        return st.one_of(ints, floats, bools, lists, dicts)
    raise TypeError(spec)


def set_path(conf: dict, path: tuple, value: Any, key_case: Callable[[str], str] = str) -> None:
    """Put ``value`` at ``path`` (creating what is missing); the last key gets ``key_case``."""
    node: Any = conf
    for n, part in enumerate(path[:-1]):
        following = path[n + 1]
        if isinstance(part, int):
            while len(node) <= part:
                node.append([] if isinstance(following, int) else {})
            if not isinstance(node[part], (list if isinstance(following, int) else dict)):
                node[part] = [] if isinstance(following, int) else {}
            node = node[part]
        else:
            existing = _find_key(node, part)
            child = node.get(existing) if existing is not None else None
            want = list if isinstance(following, int) else dict
            if not isinstance(child, want):
                child = want()
                node[existing or part] = child
            node = child
    last = path[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append(None)
        node[last] = value
        return
    existing = _find_key(node, last)
    if existing is not None:
        del node[existing]
    node[key_case(last)] = value


def _find_key(obj: dict, key: str) -> str | None:
    for name in obj:
        if name.lower() == key.lower():
            return name
    return None


# ---- requests ---------------------------------------------------------------------------------


def encode(conf: Any) -> bytes:
    return json.dumps(conf).encode()


def _env(profile: Profile, fn: FuzzNode, command: str) -> dict[str, str | None]:
    return fn.env(command, ifname=profile.ifname or FUZZ_IFNAME)


def _config_for(profile: Profile, fn: FuzzNode, command: str) -> dict[str, Any]:
    conf = profile.base(fn)
    if command in ("GC",):
        conf["cni.dev/valid-attachments"] = [
            {"containerID": "base", "ifname": "eth1"},
            {"containerID": "basevx", "ifname": "eth3"},
        ]
    return conf


@st.composite
def json_defect(draw, profile: Profile, fn: FuzzNode) -> Request:
    command = draw(st.sampled_from(profile.commands))
    good = encode(_config_for(profile, fn, command))
    kind = draw(
        st.sampled_from(
            [
                "truncated",
                "garbage",
                "nan",
                "deep",
                "not-object",
                "bad-utf8",
                "trailing",
                "empty",
                "control",
                "bom",
                "utf16",
                "single-quotes",
            ]
        )
    )
    if kind == "truncated":
        cut = draw(st.integers(0, len(good) - 1))
        stdin = good[:cut]
    elif kind == "garbage":
        stdin = draw(st.binary(min_size=1, max_size=64).filter(lambda b: not _parses_to_object(b)))
    elif kind == "nan":
        token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        stdin = good[:-1] + b', "mtu": ' + token.encode() + b"}"
    elif kind == "deep":
        depth = draw(st.integers(65, 3000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        stdin = good[:-1] + b', "deep": ' + (opener * depth).encode() + b"1" + (closer * depth).encode() + b"}"
    elif kind == "not-object":
        stdin = draw(st.sampled_from([b"[]", b"null", b"1", b'"conf"', b"true", b"[" + good + b"]"]))
    elif kind == "bad-utf8":
        at = draw(st.integers(1, len(good) - 2))
        byte = draw(st.sampled_from([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80"]))
        quote = good.index(b'"', at) if b'"' in good[at:] else 1
        stdin = good[: quote + 1] + byte + good[quote + 1 :]
    elif kind == "trailing":
        stdin = good + draw(st.sampled_from([b"{}", b" x", b",", b"]", b"\x00"]))
    elif kind == "empty":
        stdin = draw(st.sampled_from([b"", b" ", b"\n"]))
    elif kind == "control":
        stdin = good.replace(NETWORK.encode(), NETWORK.encode() + draw(st.sampled_from([b"\x00", b"\n", b"\x1b"])), 1)
    elif kind == "bom":
        stdin = b"\xef\xbb\xbf" + good
    elif kind == "utf16":
        stdin = good.decode().encode(draw(st.sampled_from(["utf-16", "utf-16-le", "utf-16-be", "utf-32"])))
    else:
        stdin = good.replace(b'"', b"'")
    # Bytes that are not UTF-8: undecodable (6), or an encoded surrogate that decodes to an invalid string (7).
    expect = {ERR_DECODE, ERR_CONFIG} if kind == "bad-utf8" else {ERR_DECODE}
    return Request(profile.plugin, command, _env(profile, fn, command), stdin, frozenset(expect), f"json/{kind}")


def _parses_to_object(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data), dict)
    except (ValueError, RecursionError):
        return False


@st.composite
def type_defect(draw, profile: Profile, fn: FuzzNode) -> Request:
    path, spec = draw(st.sampled_from(schema_leaves(profile.schema)))
    value = draw(wrong_type(spec))
    conf = _config_for(profile, fn, "ADD")
    key_case = draw(st.sampled_from([str, str.lower, str.upper]))
    set_path(conf, path, value, key_case if path[-1] not in ("cniVersion", "name") else str)
    expect = {ERR_DECODE, ERR_CONFIG} if path == ("cniVersion",) else {ERR_CONFIG}
    return Request(
        profile.plugin,
        "ADD",
        _env(profile, fn, "ADD"),
        encode(conf),
        frozenset(expect),
        f"type/{'.'.join(map(str, path))}",
    )


@st.composite
def value_defect(draw, profile: Profile, fn: FuzzNode) -> Request:
    bad = draw(st.sampled_from(profile.bad))
    value = draw(st.sampled_from(bad.values))
    conf = _config_for(profile, fn, "ADD")
    set_path(conf, bad.path, value)
    return Request(
        profile.plugin,
        "ADD",
        _env(profile, fn, "ADD"),
        encode(conf),
        bad.codes,
        f"value/{'.'.join(map(str, bad.path))}",
    )


def _payload(draw) -> str:
    prefix = draw(st.text(alphabet="abcXYZ019", max_size=6))
    return prefix + draw(st.sampled_from(PAYLOADS)) + draw(st.text(alphabet="abc", max_size=3))


@st.composite
def injection_defect(draw, profile: Profile, fn: FuzzNode) -> Request:
    target = draw(st.sampled_from(["name", "container", "ifname"]))
    command = draw(
        st.sampled_from(
            [c for c in profile.commands if c in CONTAINER_COMMANDS] if target != "name" else profile.commands
        )
    )
    conf = _config_for(profile, fn, command)
    env = _env(profile, fn, command)
    if target == "name":
        conf["name"] = (
            _payload(draw) if draw(st.booleans()) else draw(st.sampled_from(["a" * 101, "-net", ".net", "_net", ""]))
        )
        expect = {ERR_CONFIG}
    elif target == "container":
        env["CNI_CONTAINERID"] = (
            _payload(draw) if draw(st.booleans()) else draw(st.sampled_from(["c" * 129, "-c", ".", "c" * 1000]))
        )
        expect = {ERR_ENV}
    else:
        env["CNI_IFNAME"] = draw(st.sampled_from(BAD_IFNAMES))
        expect = {ERR_ENV}
    return Request(profile.plugin, command, env, encode(conf), frozenset(expect), f"injection/{target}")


def _string_paths(obj: Any, path: tuple = ()) -> list[tuple[tuple, bool]]:
    """(path, is_key) of every string in a JSON document: values, and object keys."""
    out: list[tuple[tuple, bool]] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.append((path + (key,), True))
            out.extend(_string_paths(value, path + (key,)))
    elif isinstance(obj, list):
        for n, value in enumerate(obj):
            out.extend(_string_paths(value, path + (n,)))
    elif isinstance(obj, str):
        out.append((path, False))
    return out


@st.composite
def string_defect(draw, profile: Profile, fn: FuzzNode) -> Request:
    command = draw(st.sampled_from(profile.commands))
    conf = _config_for(profile, fn, command)
    path, is_key = draw(st.sampled_from(_string_paths(conf)))
    bad = draw(st.sampled_from(["\x00", "\ud800", "\udfff", "\udcff", "a\x00b", "\udbff\x00"]))
    container: Any = conf
    for part in path[:-1]:
        container = container[part]
    last = path[-1]
    if is_key:
        value = container.pop(last)
        at = draw(st.integers(0, len(last)))
        container[last[:at] + bad + last[at:]] = value
    else:
        text = container[last]
        at = draw(st.integers(0, len(text)))
        container[last] = text[:at] + bad + text[at:]
    # ensure_ascii (the default) writes NUL and lone surrogates as \\u escapes: valid JSON text.
    return Request(
        profile.plugin,
        command,
        _env(profile, fn, command),
        encode(conf),
        frozenset({ERR_CONFIG}),
        f"string/{'key' if is_key else 'value'}",
    )


@st.composite
def env_defect(draw, profile: Profile, fn: FuzzNode) -> Request:
    kinds = ["command", "missing", "utf8", "nul", "own-netns"]
    kinds += ["netns"] if profile.uses_netns else []
    kinds += ["args"] if profile.bad_args else []
    kind = draw(st.sampled_from(kinds))
    command = draw(st.sampled_from(profile.commands))
    conf = _config_for(profile, fn, command)
    env = _env(profile, fn, command)
    expect = {ERR_ENV}
    only_here = False
    if kind == "command":
        env["CNI_COMMAND"] = draw(
            st.sampled_from(
                [None, "", "add", "Add", "DELETE", "ADD ", " ADD", "VERSION;rm", "ADD\n", "CHECK2", "\u0410DD"]
            )
        )
        # Run by hand with no CNI_COMMAND, a plugin executable prints what it is and exits 0 (as the
        # reference's skeleton does): only dispatch, which serves requests, answers that with code 4.
        only_here = not env["CNI_COMMAND"]
    elif kind == "missing":
        command = draw(st.sampled_from(profile.commands))
        env = _env(profile, fn, command)
        conf = _config_for(profile, fn, command)
        env[draw(st.sampled_from(REQUIRED_ENV[command]))] = draw(st.sampled_from([None, ""]))
    elif kind == "utf8":
        var = draw(st.sampled_from(["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]))
        base = env.get(var) or "x"
        env[var] = base + draw(st.sampled_from(["\udcff", "\udc80", "\udcc0\udcaf", "\udced\udca0\udc80"]))
    elif kind == "nul":
        var = draw(st.sampled_from(["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]))
        env[var] = (env.get(var) or "x") + "\x00" + "y"
        only_here = True
    elif kind == "netns":
        command = draw(st.sampled_from([c for c in ("ADD", "CHECK") if c in profile.commands]))
        env = _env(profile, fn, command)
        conf = _config_for(profile, fn, command)
        env["CNI_NETNS"] = draw(
            st.sampled_from(["/nonexistent/netns", "/etc/hostname", "/", "/proc/1/ns/mnt", "relative/ns", "/dev/null"])
        )
        expect = {ERR_ENV, ERR_NETNS}
    elif kind == "own-netns":
        command = draw(st.sampled_from([c for c in ("ADD", "CHECK") if c in profile.commands]))
        env = _env(profile, fn, command)
        conf = _config_for(profile, fn, command)
        env["CNI_NETNS"] = fn.node.path  # the namespace the plugin runs in
        expect = {ERR_NETNS}
    else:
        command = "ADD"
        env = _env(profile, fn, command)
        conf = _config_for(profile, fn, command)
        choice = draw(st.sampled_from(profile.bad_args))
        env["CNI_ARGS"], expect = (choice, {ERR_ENV}) if isinstance(choice, str) else choice
    return Request(
        profile.plugin, command, env, encode(conf), frozenset(expect), f"env/{kind}", in_process_only=only_here
    )


@st.composite
def version_defect(draw, profile: Profile, fn: FuzzNode) -> Request:
    kind = draw(st.sampled_from(["unsupported", "unparseable", "command"]))
    command = draw(st.sampled_from(profile.commands))
    conf = _config_for(profile, fn, command)
    if kind == "unsupported":
        conf["cniVersion"] = draw(st.sampled_from(["9.9.9", "1.2.0", "2.0.0", "0.0.1", "0.5.0", "1.1.1", "10"]))
        expect = {ERR_VERSION}
    elif kind == "unparseable":
        conf["cniVersion"] = draw(
            st.sampled_from(
                ["x.y.z", "1.0.0.0", "-1.0.0", "1..0", "v1.0.0", "1.0.0-rc1", "one", "1.0.0 ", "\u0661.0.0"]
            )
        )
        expect = {ERR_DECODE, ERR_VERSION}  # pycni: 6 (cannot decode); the reference: 1
    else:
        command, conf["cniVersion"] = draw(
            st.sampled_from(
                [
                    (c, v)
                    for c, v in (
                        ("CHECK", "0.3.1"),
                        ("CHECK", "0.2.0"),
                        ("GC", "1.0.0"),
                        ("STATUS", "1.0.0"),
                        ("GC", "0.4.0"),
                        ("STATUS", "0.1.0"),
                    )
                    if c in profile.commands
                ]
            )
        )
        expect = {ERR_VERSION}
    return Request(
        profile.plugin, command, _env(profile, fn, command), encode(conf), frozenset(expect), f"version/{kind}"
    )


def malformed_request(profile: Profile, fn: FuzzNode) -> st.SearchStrategy:
    kinds = [
        json_defect(profile, fn),
        type_defect(profile, fn),
        injection_defect(profile, fn),
        string_defect(profile, fn),
        env_defect(profile, fn),
        version_defect(profile, fn),
    ]
    if profile.bad:
        kinds.append(value_defect(profile, fn))
        kinds.append(value_defect(profile, fn))  # the plugin-specific values get more weight
    return st.one_of(kinds)
