"""host-local's options with their JSON types, for the skeleton's one decoding layer.

Kept apart from ``config`` so that declaring them costs VERSION nothing: the
skeleton decodes with this before host-local reads its configuration (any
letter case, as Go's decoder matches; null = absent; a wrong type is error 7).
"""

from cni_plugins.spec.decode import COMMON, ListOf, Schema

RANGE = Schema({"subnet": str, "rangeStart": str, "rangeEnd": str, "gateway": str})
ROUTE = Schema({"dst": str, "gw": str, "mtu": int, "advmss": int, "priority": int, "table": int, "scope": int})

SCHEMA = COMMON.extend(
    ipam=Schema(
        {
            "type": str,
            "subnet": str,
            "rangeStart": str,
            "rangeEnd": str,
            "gateway": str,
            "ranges": ListOf(ListOf(RANGE)),
            "routes": ListOf(ROUTE),
            "dataDir": str,
            "resolvConf": str,
        }
    ),
    runtimeConfig=Schema({"ips": ListOf(str), "ipRanges": ListOf(ListOf(RANGE))}),
    args=Schema({"cni": Schema({"ips": ListOf(str)})}),
)
