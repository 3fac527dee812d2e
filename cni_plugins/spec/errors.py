"""CNI error codes and the exception that carries them to the caller.

Codes are the ones the CNI specification (1.1.0) reserves; plugins may add
their own from 100 upwards.
"""

from __future__ import annotations

import json
from typing import Any

ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_INVALID_NETNS = 8
ERR_TRY_AGAIN = 11
ERR_PLUGIN_NOT_AVAILABLE = 50
ERR_LIMITED_CONNECTIVITY = 51
ERR_INTERNAL = 999


class CNIError(Exception):
    """An error that a plugin reports to the runtime as the spec's error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_dict(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out

    def to_json(self, cni_version: str) -> str:
        return json.dumps(self.to_dict(cni_version), indent=4)

    def __str__(self) -> str:
        if self.details:
            return f"{self.msg}; {self.details}"
        return self.msg
