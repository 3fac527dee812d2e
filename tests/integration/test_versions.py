"""Every pycni plugin supports at least the spec versions its reference counterpart does."""

import os
import sys

import pytest

from cni_plugins.spec.registry import PLUGINS
from tests.helpers.plugins import reference, run_plugin


# VERSION needs nothing but CNI_COMMAND: no stdin, no other CNI variable.
NO_CNI_VARS = dict.fromkeys(("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH", "CNI_ARGS"))


def version_info(cmd):
    outcome = run_plugin(cmd, "VERSION", None, env=NO_CNI_VARS)
    assert outcome.code == 0, (outcome.out, outcome.err)
    return outcome.out


@pytest.mark.parametrize("plugin_type", sorted(PLUGINS))
def test_supported_versions_cover_the_reference(plugin_type):
    module, function = PLUGINS[plugin_type].split(":")
    ours = version_info([sys.executable, "-I", "-c", f"from {module} import {function}; {function}()"])
    assert ours["cniVersion"] == "1.1.0"
    ref = reference(plugin_type)
    if plugin_type == "vxlan":
        pytest.skip("the reference plugins have no vxlan plugin (it is pycni's own)")
    if not os.path.exists(ref):
        pytest.skip(f"no reference plugin {ref} (install containernetworking-plugins)")
    theirs = version_info([ref])
    missing = set(theirs["supportedVersions"]) - set(ours["supportedVersions"])
    assert not missing, f"{plugin_type} lacks {sorted(missing)} that the reference supports"
    assert {"1.1.0", "1.0.0", "0.4.0", "0.3.1", "0.2.0", "0.1.0"} <= set(ours["supportedVersions"])
