"""Every pycni plugin supports at least the spec versions its reference counterpart does."""
import json
import os
import subprocess
import sys

import pytest

from cni_plugins.spec.registry import PLUGINS

REFERENCE_DIR = "/usr/lib/cni"


def version_info(cmd):
    proc = subprocess.run(cmd, env={"PATH": os.environ["PATH"], "CNI_COMMAND": "VERSION"},
                          capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("plugin_type", sorted(PLUGINS))
def test_supported_versions_cover_the_reference(plugin_type):
    module, function = PLUGINS[plugin_type].split(":")
    ours = version_info([sys.executable, "-I", "-c", f"from {module} import {function}; {function}()"])
    assert ours["cniVersion"] == "1.1.0"
    reference = os.path.join(REFERENCE_DIR, plugin_type)
    if not os.path.exists(reference):
        pytest.skip(f"no reference plugin {reference} (install containernetworking-plugins)")
    theirs = version_info([reference])
    missing = set(theirs["supportedVersions"]) - set(ours["supportedVersions"])
    assert not missing, f"{plugin_type} lacks {sorted(missing)} that the reference supports"
    assert {"1.1.0", "1.0.0", "0.4.0", "0.3.1", "0.2.0", "0.1.0"} <= set(ours["supportedVersions"])
