#!/usr/bin/env bash
# pycni conformance run on this node. The nodes meet in the cluster store, so the run waits for the
# others: on VMs, which Vagrant provisions one after another, it runs in the background as a transient
# systemd unit (systemd-run) and 60-report.sh collects the results; with
# PYCNI_CONFORMANCE_RUNNER=foreground it runs here and its exit status is the node's verdict.
# Inputs: PYCNI_STORE, PYCNI_NETWORK, PYCNI_STATE_DIR, CNI_CONF_DIR, CNI_BIN_DIR, CNI_CACHE_DIR,
#         PYCNI_NODE_NAME, PYCNI_CONFORMANCE_RUNNER, PYCNI_CONFORMANCE_WAIT.
source "$(dirname "$0")/lib.sh"

args=(conformance run --store "$PYCNI_STORE" --network "$PYCNI_NETWORK" --state-dir "$PYCNI_STATE_DIR"
      --netconf-path "$CNI_CONF_DIR" --cni-path "$CNI_BIN_DIR" --cache-dir "$CNI_CACHE_DIR"
      --node-name "$PYCNI_NODE_NAME" --wait "$PYCNI_CONFORMANCE_WAIT")

case "$PYCNI_CONFORMANCE_RUNNER" in
foreground)
    exec "$PYCNI" "${args[@]}"
    ;;
systemd-run)
    systemd-run --unit "pycni-conformance-$(date +%s)" --collect --quiet "$PYCNI" "${args[@]}"
    log "conformance run started in the background (journalctl -u 'pycni-conformance-*' to follow it)"
    ;;
*)
    die "PYCNI_CONFORMANCE_RUNNER must be systemd-run or foreground, not $PYCNI_CONFORMANCE_RUNNER"
    ;;
esac
