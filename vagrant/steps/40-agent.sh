#!/usr/bin/env bash
# Run the node agent in overlay mode: a systemd unit (pycni install --systemd-unit, plus a drop-in with
# this node's overlay options), or, with PYCNI_AGENT_RUNNER=exec, this process becomes the agent
# (netns nodes have no systemd; whoever started the script stops the agent by its PID).
# Inputs: PYCNI_STORE, PYCNI_PUBLIC_IP, PYCNI_NODE_NAME, PYCNI_STATE_DIR, PYCNI_SOCKET, PYCNI_UNIT_DIR,
#         PYCNI_SYSTEMCTL, PYCNI_AGENT_RUNNER, PYCNI_AGENT_WAIT.
source "$(dirname "$0")/lib.sh"
: "${PYCNI_PUBLIC_IP:?set PYCNI_PUBLIC_IP to the address of this node on the node network}"

args=(agent --socket "$PYCNI_SOCKET" --store "$PYCNI_STORE" --public-ip "$PYCNI_PUBLIC_IP"
      --state-dir "$PYCNI_STATE_DIR" --node-name "$PYCNI_NODE_NAME")

case "$PYCNI_AGENT_RUNNER" in
exec)
    log "exec $PYCNI ${args[*]}"
    exec "$PYCNI" "${args[@]}"
    ;;
systemd)
    # The drop-in first: where systemd runs, install enables and starts the unit at once.
    dropin="$PYCNI_UNIT_DIR/pycni-agent.service.d"
    mkdir -p "$dropin"
    {
        echo "# Written by vagrant/steps/40-agent.sh: the overlay options of this node."
        echo "[Service]"
        echo "ExecStart="
        echo "ExecStart=$PYCNI ${args[*]}"
    } >"$dropin/overlay.conf"
    "$PYCNI" install --cni-bin-dir "$CNI_BIN_DIR" --agent-socket "$PYCNI_SOCKET" --systemd-unit \
        --systemd-dir "$PYCNI_UNIT_DIR" >&2
    "$PYCNI_SYSTEMCTL" daemon-reload
    "$PYCNI_SYSTEMCTL" enable --now pycni-agent.service
    "$PYCNI_SYSTEMCTL" restart pycni-agent.service
    wait_for "$PYCNI_AGENT_WAIT" "the agent's subnet lease ($PYCNI_STATE_DIR/overlay.json)" \
        test -s "$PYCNI_STATE_DIR/overlay.json"
    log "agent running: $(cat "$PYCNI_STATE_DIR/overlay.json" | tr -d '\n ' | cut -c1-160)"
    ;;
*)
    die "PYCNI_AGENT_RUNNER must be systemd or exec, not $PYCNI_AGENT_RUNNER"
    ;;
esac
