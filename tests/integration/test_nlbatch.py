"""Pipelined rtnetlink writes (cni_plugins/kernel/nlbatch.py) against the kernel, in a test namespace. Root only.

What `bridge fdb`, `ip neigh` and `ip route` show afterwards must be exactly what the one-request-at-a-time
helpers of cni_plugins/kernel/vxlan.py would have made, for many entries at once.
"""

from __future__ import annotations

import os

import pytest

import netns
from cni_plugins.kernel import ip as kip
from cni_plugins.kernel import nlbatch
from cni_plugins.kernel import vxlan as kvx

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces"),
]

COUNT = 600


@pytest.fixture
def vxlan_ns():
    with netns.temporary("nlb") as ns:
        with netns.enter(ns.path):
            ipr = kip.open_netlink()
            ipr.link(
                "add", ifname="vx", kind="vxlan", vxlan_id=7, vxlan_port=8472, vxlan_learning=0, vxlan_local="192.0.2.1"
            )
            index = ipr.link_lookup(ifname="vx")[0]
            ipr.link("set", index=index, state="up")
            ipr.addr("add", index=index, address="10.99.0.0", prefixlen=32)  # onlink routes need one
            try:
                yield ipr, index
            finally:
                ipr.close()


def remotes(count: int) -> list[kvx.FdbEntry | kvx.NeighEntry | kvx.OnlinkRoute]:
    out = []
    for i in range(count):
        mac = f"0a:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}"
        vtep = f"10.{100 + (i >> 8)}.{i & 0xFF}.0"
        out.append(
            (
                kvx.FdbEntry(mac, f"198.51.{i >> 8}.{i & 0xFF}"),
                kvx.NeighEntry(vtep, mac),
                kvx.OnlinkRoute(f"{vtep}/24", vtep),
            )
        )
    return out


def test_many_entries_in_one_batch_are_what_the_kernel_holds_and_delete_the_same_way(vxlan_ns):
    ipr, index = vxlan_ns
    entries = remotes(COUNT)
    adds = []
    for f, n, r in entries:
        adds += [
            nlbatch.fdb(True, index, f.mac, f.dst),
            nlbatch.neigh(True, index, n.ip, n.mac),
            nlbatch.onlink_route(True, index, r.dst, r.gw, kip.RTPROT_BOOT),
        ]
    with nlbatch.BatchSocket() as batch:
        assert batch.run(adds) == [0] * len(adds)
        assert set(kvx.fdb_entries(ipr, index)) == {f for f, _n, _r in entries}
        assert set(kvx.neigh_entries(ipr, index)) == {n for _f, n, _r in entries}
        assert set(kvx.onlink_routes(ipr, index)) == {r for _f, _n, r in entries}
        # replace is idempotent: the same batch again changes nothing and fails nothing
        assert batch.run(adds[:30]) == [0] * 30
        dels = []
        for f, n, r in entries[: COUNT // 2]:
            dels += [
                nlbatch.onlink_route(False, index, r.dst, r.gw, 0),
                nlbatch.neigh(False, index, n.ip, n.mac),
                nlbatch.fdb(False, index, f.mac, f.dst),
            ]
        assert batch.run(dels) == [0] * len(dels)
        # deleting what is gone answers "not there" per request, and the rest of the batch still runs
        answers = batch.run(dels[:3] + adds[:3])
        assert all(code != 0 for code in answers[:3]) and answers[3:] == [0, 0, 0]
    rest = entries[COUNT // 2 :] + entries[:1]
    assert set(kvx.fdb_entries(ipr, index)) == {f for f, _n, _r in rest}
    assert set(kvx.neigh_entries(ipr, index)) == {n for _f, n, _r in rest}
    assert set(kvx.onlink_routes(ipr, index)) == {r for _f, _n, r in rest}
