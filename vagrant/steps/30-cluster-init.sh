#!/usr/bin/env bash
# Write the cluster network into the store (safe to repeat: every node runs it, the first one writes).
# Inputs: PYCNI_STORE, PYCNI_CLUSTER_CIDR.
source "$(dirname "$0")/lib.sh"

wait_for 120 "the cluster store $PYCNI_STORE" "$PYCNI" cluster leases --store "$PYCNI_STORE" >/dev/null
"$PYCNI" cluster init --store "$PYCNI_STORE" --network "$PYCNI_CLUSTER_CIDR" >&2
