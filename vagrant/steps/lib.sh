# Shared by every step: settings from the environment (with the VM defaults), a logger, bounded waits.
# The same steps run on the Vagrant VMs and, in CI, inside netns nodes: everything a step touches is
# named by one of these variables, so CI points them at temporary directories.
set -euo pipefail

: "${PYCNI_SRC:=/vagrant}"                       # the pycni checkout (the synced folder on a VM)
: "${PYCNI_VENV:=/opt/pycni}"                    # where 10-install.sh installs pycni
: "${PYCNI_BIN_LINK:=/usr/local/bin/pycni}"      # a symlink to the venv's pycni ("" for none)
: "${PYCNI_APT:=1}"                              # 1: install Debian packages with apt-get
: "${PYCNI_PIP_ARGS:=}"                          # extra pip arguments (CI: --no-index --no-deps ...)
: "${CNI_BIN_DIR:=/opt/cni/bin}"
: "${CNI_CONF_DIR:=/etc/cni/net.d}"
: "${CNI_CACHE_DIR:=/var/lib/cni}"
: "${CNI_IPAM_DIR:=/var/lib/cni/networks}"
: "${PYCNI_STATE_DIR:=/run/pycni}"
: "${PYCNI_SOCKET:=/run/pycni/agent.sock}"
: "${PYCNI_STORE:=etcd://192.168.56.10:2379}"
: "${PYCNI_CLUSTER_CIDR:=10.244.0.0/16}"
: "${PYCNI_NETWORK:=pycni-vxlan}"
: "${PYCNI_NODE_NAME:=$(hostname)}"
: "${PYCNI_UNIT_DIR:=/etc/systemd/system}"
: "${PYCNI_SYSTEMCTL:=systemctl}"
: "${PYCNI_AGENT_RUNNER:=systemd}"               # systemd (a unit) or exec (this process becomes the agent)
: "${PYCNI_AGENT_WAIT:=60}"                      # seconds to wait for the agent's subnet lease
: "${PYCNI_NODES:=0}"                            # the cluster's node count (the Vagrantfile passes its VM count):
                                                 # conformance waits for them all (0: the nodes holding a lease)
: "${PYCNI_CONFORMANCE_RUNNER:=systemd-run}"     # systemd-run (background unit) or foreground
: "${PYCNI_SYSTEMD_RUN:=systemd-run}"            # the systemd-run command (CI: a stand-in; no systemd in a netns)
: "${PYCNI_CONFORMANCE_WAIT:=1800}"              # seconds a node waits for the others (VMs boot one by one)
: "${PYCNI_JOIN_WAIT:=120}"                      # seconds 50-conformance waits for this node's probe to be published
: "${PYCNI_REPORT_WAIT:=2400}"                   # seconds the report waits for every node's results
export CNI_CACHE_DIR

PYCNI="$PYCNI_VENV/bin/pycni"
STEP="$(basename "$0" .sh)"

log() { echo "[$STEP ${PYCNI_NODE_NAME}] $*" >&2; }
die() { log "error: $*"; exit 1; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every half second, at most SECONDS.
wait_for() {
    local seconds=$1 what=$2 i
    shift 2
    for ((i = 0; i < seconds * 2; i++)); do
        if "$@"; then return 0; fi
        sleep 0.5
    done
    die "timed out after ${seconds}s waiting for $what"
}
