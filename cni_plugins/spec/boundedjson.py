"""Decoding JSON that anyone may have written, at a bounded cost.

``json.loads`` recurses once per nesting level, so a document of a few
kilobytes of ``[`` raises RecursionError (not ValueError) and a caller that
only expects ValueError dies. ``loads`` here refuses such input before
``json.loads`` sees it:

    size      len(bytes) <= max_bytes                   checked first, O(1)
    text      strict UTF-8, no byte-order mark          one decode, O(n)
    depth     nesting <= max_depth                      one linear scan, no recursion
    grammar   strict JSON, no NaN/Infinity/-Infinity    json.loads, recursion <= max_depth

The depth scan steps from one structural character to the next with a
regular expression and jumps over string literals as a whole (escapes
included), so brackets inside strings do not count and a 10 MB input costs
linear time. Every refusal is a ValueError whose message says what was wrong.

    doc = loads(entry.value, max_bytes=4096, max_depth=8)
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["check_depth", "loads"]

# The next bracket or string opening; everything else is skipped in C.
_STRUCTURE = re.compile(r'[\[\]{}"]')
# The rest of a string literal after its opening quote: runs of plain characters and escape pairs.
_STRING_REST = re.compile(r'[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (NaN and Infinity are refused)")


def check_depth(text: str, max_depth: int) -> None:
    """ValueError if ``text`` nests arrays and objects deeper than max_depth; no recursion, linear time.

    Not a validator: malformed JSON may pass, and is left to the parser.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return  # it cannot nest deeper than it has brackets (the common, small case)
    depth = 0
    pos = 0
    search, string_rest = _STRUCTURE.search, _STRING_REST.match
    while True:
        found = search(text, pos)
        if found is None:
            return
        char = found.group()
        pos = found.end()
        if char == '"':
            rest = string_rest(text, pos)
            if rest is None:
                return  # an unterminated string: the parser reports it
            pos = rest.end()
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise ValueError(f"JSON input nests deeper than {max_depth} levels (at offset {found.start()})")
        elif depth:
            depth -= 1


def loads(data: bytes | str, *, max_bytes: int, max_depth: int) -> Any:
    """The JSON value in ``data``; ValueError if it is too large, too deep, not UTF-8 or not JSON.

    max_bytes bounds the UTF-8 size, max_depth the nesting of arrays and
    objects (``{"a": [1]}`` nests 2 levels). NaN, Infinity and -Infinity,
    which Python's json accepts and JSON does not, are refused.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if isinstance(data, bytes):
        if len(data) > max_bytes:
            raise ValueError(f"JSON input of {len(data)} bytes is larger than the {max_bytes} bytes allowed")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"JSON input is not UTF-8 (invalid byte at offset {err.start})") from None
    elif isinstance(data, str):
        if len(data) > max_bytes:  # every character is at least one byte
            raise ValueError(f"JSON input of {len(data)} characters is larger than the {max_bytes} bytes allowed")
        try:
            size = len(data.encode("utf-8"))
        except UnicodeEncodeError as err:
            raise ValueError(f"JSON input is not UTF-8 (an unpaired surrogate at offset {err.start})") from None
        if size > max_bytes:
            raise ValueError(f"JSON input of {size} bytes is larger than the {max_bytes} bytes allowed")
        text = data
    else:
        raise ValueError(f"JSON input must be bytes or str, not {type(data).__name__}")
    if text.startswith("\ufeff"):
        raise ValueError("JSON input starts with a byte-order mark, which JSON does not allow")
    check_depth(text, max_depth)
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:  # unreachable after the depth scan; never let it escape as anything but ValueError
        raise ValueError(f"JSON input nests deeper than {max_depth} levels") from None
    except ValueError as err:
        raise ValueError(f"not JSON: {err}") from None
