#!/usr/bin/env bash
# Install pycni from the checkout into a virtual environment, and the system tools its plugins drive.
# Inputs: PYCNI_SRC, PYCNI_VENV, PYCNI_BIN_LINK, PYCNI_APT, PYCNI_PIP_ARGS (see lib.sh).
source "$(dirname "$0")/lib.sh"

if [ "$PYCNI_APT" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends iproute2 nftables iptables kmod procps iputils-ping \
        python3 python3-venv python3-pip rsync graphviz >/dev/null
fi
[ -f "$PYCNI_SRC/setup.cfg" ] || die "no pycni checkout in $PYCNI_SRC (set PYCNI_SRC)"
if [ ! -x "$PYCNI_VENV/bin/python" ]; then
    python3 -m venv "$PYCNI_VENV"
fi
# Build from a copy: the checkout (a synced folder on the VMs) stays untouched (no build/, no egg-info).
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar -C "$PYCNI_SRC" --exclude=./.git --exclude=./.venv --exclude='*.egg-info' --exclude=__pycache__ \
    --exclude=./build -cf - . | tar -C "$build" -xf -
# shellcheck disable=SC2086  # PYCNI_PIP_ARGS is a list of options
"$PYCNI_VENV/bin/python" -m pip install -q --disable-pip-version-check $PYCNI_PIP_ARGS "$build"
if [ -n "$PYCNI_BIN_LINK" ]; then
    mkdir -p "$(dirname "$PYCNI_BIN_LINK")"
    ln -sfn "$PYCNI" "$PYCNI_BIN_LINK"
fi
"$PYCNI" version >&2
"$PYCNI" conformance --help >/dev/null
log "pycni installed in $PYCNI_VENV"
