"""Running the `nft` command: JSON listings, atomic ruleset transactions, safe strings.

Every change goes through ``apply``: one ruleset text fed to ``nft -f -``, which
the kernel commits as a single transaction (all of it or none of it). Strings
that end up inside a ruleset (names, comments) must pass ``identifier`` or
``comment`` first, so that no value can smuggle in rule syntax.

Everything runs in the calling thread's network namespace: a child process
inherits the namespace of the thread that starts it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cni_plugins.kernel import hostcmd
from cni_plugins.spec.errors import ERR_INTERNAL, ERR_INVALID_CONFIG, CNIError

NFT = "nft"
TIMEOUT_SECONDS = 30
COMMENT_MAX = 128  # the kernel's limit on a comment (NFTNL_UDATA_COMMENT_MAXLEN)

_IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# What a comment may hold: no quotes, backslashes, semicolons, braces, '#', '$' or
# control characters, so it can never end its string or start a statement.
_COMMENT_RE = re.compile(r"^[A-Za-z0-9 _.,:@+=%/\-]*$")


class NftError(CNIError):
    """`nft` failed; ``not_found``: the listed object does not exist; ``missing``: nft is not installed."""

    def __init__(self, msg: str, details: str = "", not_found: bool = False, missing: bool = False) -> None:
        super().__init__(ERR_INTERNAL, msg, details)
        self.not_found = not_found
        self.missing = missing


def run(args: list[str], stdin: str | None = None) -> str:
    """Run ``nft ARGS`` and return its stdout; raise NftError when it fails."""
    try:
        return hostcmd.run([NFT, *args], stdin, TIMEOUT_SECONDS, alternative="or choose the iptables backend")
    except hostcmd.HostToolError as err:
        raise NftError(
            err.msg, err.details, not_found="No such file or directory" in err.stderr, missing=err.missing
        ) from None


def list_json(*what: str) -> list[dict[str, Any]] | None:
    """`nft -j list WHAT...` as its list of objects (metainfo left out); None when it does not exist."""
    try:
        out = run(["-j", "list", *what])
    except NftError as err:
        if err.not_found:
            return None
        raise
    try:
        data = json.loads(out)
    except json.JSONDecodeError as exc:
        raise NftError(f"cannot parse the JSON of nft -j list {' '.join(what)}", str(exc)) from None
    return [obj for obj in data.get("nftables", []) if "metainfo" not in obj]


def apply(ruleset: str) -> None:
    """Apply ``ruleset`` (nft script text) as one atomic transaction."""
    if ruleset.strip():
        run(["-f", "-"], stdin=ruleset)


def identifier(name: str) -> str:
    """Return ``name`` if it is a plain nft identifier (table, chain, set names); else raise."""
    if not _IDENTIFIER_RE.match(name):
        raise CNIError(
            ERR_INVALID_CONFIG,
            f"{name!r} is not a valid nftables name",
            "use letters, digits and '_' (at most 64), starting with a letter or '_'",
        )
    return name


def comment(text: str) -> str:
    """Return ``text`` as a quoted nft comment, cut to the kernel's limit; raise if it is unsafe."""
    if not _COMMENT_RE.match(text):
        bad = sorted({c for c in text if not _COMMENT_RE.match(c)})
        raise CNIError(
            ERR_INVALID_CONFIG,
            "refusing to put unsafe characters into an nftables comment",
            f"{text!r} contains {bad!r}",
        )
    return '"' + text[:COMMENT_MAX] + '"'


@dataclass(frozen=True)
class Element:
    """One element of a set or map as `nft -j` lists it."""

    key: Any
    comment: str | None
    value: Any = None  # a map's data, e.g. {"jump": {"target": "chain"}}

    @property
    def jump_target(self) -> str | None:
        if isinstance(self.value, dict):
            for verdict in ("jump", "goto"):
                if verdict in self.value:
                    return self.value[verdict].get("target")
        return None


def elements(set_or_map: dict[str, Any]) -> list[Element]:
    """The elements of a listed set or map object (the value of its "set"/"map" key)."""
    out = []
    for raw in set_or_map.get("elem", []):
        value = None
        if isinstance(raw, list) and len(raw) == 2:  # a map element: [key, data]
            raw, value = raw
        key, note = raw, None
        if isinstance(raw, dict) and "elem" in raw:
            key, note = raw["elem"].get("val"), raw["elem"].get("comment")
        out.append(Element(key=key, comment=note, value=value))
    return out
