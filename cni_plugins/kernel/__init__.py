"""Kernel mechanics with no plugin knowledge: netlink links, addresses and routes,
sysctls, tc, the nftables and iptables runners, host tools, locks and
reference-compatible hashed names.

Imports only ``spec`` (for CNIError) and the standard library / pyroute2.
"""
