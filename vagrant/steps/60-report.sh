#!/usr/bin/env bash
# The matrix, once every node has written its results: every node holding a lease, and at least
# PYCNI_NODES of them (--expect-nodes); exits 1 on any failed check or a missing node.
# Also prints this node's network and the cluster (pycni inspect).
# Inputs: PYCNI_STORE, PYCNI_STATE_DIR, CNI_CACHE_DIR, PYCNI_NODES, PYCNI_REPORT_WAIT.
source "$(dirname "$0")/lib.sh"

"$PYCNI" inspect --cluster --store "$PYCNI_STORE" --state-dir "$PYCNI_STATE_DIR" >&2 || true
"$PYCNI" conformance report --store "$PYCNI_STORE" --wait "$PYCNI_REPORT_WAIT" --expect-nodes "$PYCNI_NODES"
