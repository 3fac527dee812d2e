#!/usr/bin/env bash
# Install the plugin executables (pycni install) and the node's network configuration: the example
# vxlan network (vxlan + portmap + bandwidth) with this node's agent state and host-local directories.
# Inputs: CNI_BIN_DIR, CNI_CONF_DIR, CNI_IPAM_DIR, PYCNI_SOCKET, PYCNI_STATE_DIR, PYCNI_NETWORK.
source "$(dirname "$0")/lib.sh"

"$PYCNI" install --cni-bin-dir "$CNI_BIN_DIR" --agent-socket "$PYCNI_SOCKET" >&2
mkdir -p "$CNI_CONF_DIR" "$CNI_IPAM_DIR"
"$PYCNI_VENV/bin/python" - "$CNI_CONF_DIR/10-$PYCNI_NETWORK.conflist" <<PY
import json, sys
from importlib import resources
conflist = json.loads(resources.files("conf").joinpath("examples", "10-pycni-vxlan.conflist").read_text())
conflist["name"] = "$PYCNI_NETWORK"
for plugin in conflist["plugins"]:
    if plugin["type"] == "vxlan":
        plugin["stateDir"] = "$PYCNI_STATE_DIR"
        plugin["dataDir"] = "$CNI_IPAM_DIR"
with open(sys.argv[1], "w") as fh:
    json.dump(conflist, fh, indent=2)
PY
log "plugins in $CNI_BIN_DIR, network $PYCNI_NETWORK in $CNI_CONF_DIR"
