#!/usr/bin/env bash
# The etcd VM: Debian's etcd-server, listening on the private network address only.
# Inputs: ETCD_IP (the address on the private network), ETCD_NAME.
source "$(dirname "$0")/lib.sh"
: "${ETCD_IP:?set ETCD_IP to the private network address of this VM}"
: "${ETCD_NAME:=etcd}"

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends etcd-server etcd-client >/dev/null
cat >/etc/default/etcd <<CONF
ETCD_NAME="$ETCD_NAME"
ETCD_DATA_DIR="/var/lib/etcd/default"
ETCD_LISTEN_CLIENT_URLS="http://$ETCD_IP:2379"
ETCD_ADVERTISE_CLIENT_URLS="http://$ETCD_IP:2379"
ETCD_LISTEN_PEER_URLS="http://$ETCD_IP:2380"
ETCD_INITIAL_ADVERTISE_PEER_URLS="http://$ETCD_IP:2380"
ETCD_INITIAL_CLUSTER="$ETCD_NAME=http://$ETCD_IP:2380"
CONF
"$PYCNI_SYSTEMCTL" restart etcd
wait_for 60 "etcd to answer on $ETCD_IP:2379" \
    env ETCDCTL_API=3 etcdctl --endpoints "http://$ETCD_IP:2379" endpoint health
log "etcd is up on http://$ETCD_IP:2379"
