#!/usr/bin/env bash
# pycni conformance run on this node, with --expect-nodes PYCNI_NODES: the run waits, its probe published in
# the cluster store, until every node of the cluster is there, then checks against all of them.
#
# Vagrant provisions the VMs one after another, node1 completely before node2 starts, so a run that
# waits for the later nodes must not hold up this node's provisioning. On the VMs it runs in the
# background as a transient systemd unit (systemd-run), and this step ends once the run has published
# its probe (`pycni conformance peers --node`): this node has joined, and provisioning goes on to the next
# VM. The last node's run completes the meeting; every run then checks and writes its results, and
# 60-report.sh on the last node waits for all of them. With PYCNI_CONFORMANCE_RUNNER=foreground the run
# runs here instead, and its exit status is the node's verdict (all nodes started together).
# Inputs: PYCNI_STORE, PYCNI_NETWORK, PYCNI_STATE_DIR, CNI_CONF_DIR, CNI_BIN_DIR, CNI_CACHE_DIR,
#         PYCNI_NODE_NAME, PYCNI_NODES, PYCNI_CONFORMANCE_RUNNER, PYCNI_CONFORMANCE_WAIT, PYCNI_SYSTEMD_RUN,
#         PYCNI_JOIN_WAIT, PYCNI_SYSTEMCTL.
source "$(dirname "$0")/lib.sh"

args=(conformance run --store "$PYCNI_STORE" --network "$PYCNI_NETWORK" --state-dir "$PYCNI_STATE_DIR"
      --netconf-path "$CNI_CONF_DIR" --cni-path "$CNI_BIN_DIR" --cache-dir "$CNI_CACHE_DIR"
      --node-name "$PYCNI_NODE_NAME" --wait "$PYCNI_CONFORMANCE_WAIT" --expect-nodes "$PYCNI_NODES")

case "$PYCNI_CONFORMANCE_RUNNER" in
foreground)
    exec "$PYCNI" "${args[@]}"
    ;;
systemd-run)
    # A run left by an earlier provisioning of this node (still waiting for the others) would meet the
    # others under this node's name too: stop it first (SIGTERM: it removes its probes and its entry).
    "$PYCNI_SYSTEMCTL" stop 'pycni-conformance-*' 2>/dev/null || true
    since=$(date +%s)
    unit="pycni-conformance-$since"
    "$PYCNI_SYSTEMD_RUN" --unit="$unit" --collect --quiet "$PYCNI" "${args[@]}"
    log "conformance run started in the background as $unit (journalctl -u $unit follows it)"
    # Joined: its probe is published, or (the last node, whose run completes the meeting) it has checked
    # and finished already. A run that cannot attach its probe fails this step at once.
    if ! "$PYCNI" conformance peers --store "$PYCNI_STORE" --node "$PYCNI_NODE_NAME" --since "$since" \
            --wait "$PYCNI_JOIN_WAIT" >&2; then
        die "the conformance run did not join within ${PYCNI_JOIN_WAIT}s (see above and journalctl -u $unit)"
    fi
    log "joined: the run waits for ${PYCNI_NODES} node(s) in total (--expect-nodes), then checks all of them"
    ;;
*)
    die "PYCNI_CONFORMANCE_RUNNER must be systemd-run or foreground, not $PYCNI_CONFORMANCE_RUNNER"
    ;;
esac
