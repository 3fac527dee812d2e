"""Gaps the fuzz suite found (issue 14), each pinned by a test of the behaviour wanted.

Stdin that is not plain UTF-8 JSON, bridge names the kernel refuses, and a
route gateway with a zone index were accepted (or answered 999); they are
refused with the right code now.
"""

from __future__ import annotations

import pytest

from cni_plugins.spec.errors import CNIError


@pytest.mark.parametrize(
    "data",
    [
        b'\xef\xbb\xbf{"cniVersion": "1.0.0", "name": "n", "type": "x"}',
        '{"cniVersion": "1.0.0", "name": "n", "type": "x"}'.encode("utf-16-le"),
    ],
)
def test_stdin_that_is_not_plain_utf8_json_is_code_6(data):
    from cni_plugins.spec.skel import parse_config

    with pytest.raises(CNIError) as info:
        parse_config(data)
    assert info.value.code == 6


@pytest.mark.parametrize("name", [".", "..", "br:0"])
def test_bridge_names_the_kernel_refuses_are_code_7(name):
    from cni_plugins.bridge.config import load_conf

    with pytest.raises(CNIError) as info:
        load_conf({"cniVersion": "1.0.0", "name": "n", "type": "bridge", "bridge": name}, "")
    assert info.value.code == 7


def test_route_gateway_with_a_zone_index_is_refused():
    from cni_plugins.spec.types import Route

    with pytest.raises(CNIError):
        Route.from_dict({"dst": "0.0.0.0/0", "gw": "fe80::1%eth0"})
