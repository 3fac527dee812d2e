"""Error codes where pycni deliberately differs from the v1.1.1 reference, each compared side by side.

* An unparseable ``cniVersion`` ("one", "1.x"): the reference answers 1
  (incompatible version); pycni answers 6 (cannot decode), because it cannot
  read the version at all. A version it can read but does not support stays
  1 on both sides.
* ``CNI_NETNS`` that is not a network namespace (a regular file): the
  reference's bridge answers 999 (a generic error from opening the
  namespace); pycni answers 8, the spec's "invalid network namespace".

Both sides run as real processes inside a node namespace with the same input.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers.plugins import REFERENCE_DIR, has_reference, run_plugin

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not has_reference("bridge"), reason="needs the reference plugins in /usr/lib/cni"),
]


def codes(node, launcher_dir, plugin, conf, **kwargs):
    out = {}
    for side, directory in (("pycni", launcher_dir), ("reference", REFERENCE_DIR)):
        result = run_plugin(os.path.join(directory, plugin), "ADD", conf, node=node, path=directory, **kwargs)
        assert result.code == 1 and result.out, (side, result)
        out[side] = result.out["code"]
    return out


@pytest.mark.parametrize("version", ["one", "1.x.0", "v1.0.0"])
def test_unparseable_cni_version(make_node, launcher_dir, version):
    node = make_node("codes")
    pod = node.pod()
    conf = {"cniVersion": version, "name": "net", "type": "loopback"}
    assert codes(node, launcher_dir, "loopback", conf, netns=pod.path) == {"pycni": 6, "reference": 1}
    # A version both can read but neither supports: 1 on both sides.
    conf["cniVersion"] = "9.9.9"
    assert codes(node, launcher_dir, "loopback", conf, netns=pod.path) == {"pycni": 1, "reference": 1}


def test_netns_that_is_not_a_namespace(make_node, launcher_dir):
    node = make_node("codes")
    conf = {
        "cniVersion": "1.0.0",
        "name": "net",
        "type": "bridge",
        "bridge": "cd0",
        "ipam": node.host_local(subnet="10.93.0.0/24"),
    }
    assert codes(node, launcher_dir, "bridge", conf, netns="/etc/hostname") == {"pycni": 8, "reference": 999}
    assert node.leases("net") == []
