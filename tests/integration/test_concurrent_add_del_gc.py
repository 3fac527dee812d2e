"""100 pods ADDed and DELeted concurrently (10 at a time) on one node, with GC calls in between.

Each pod runs bridge (host-local IPAM in-process, ipMasq) then portmap, and
later DEL in reverse order, as a runtime runs a .conflist; the pods' calls
overlap ten at a time. A GC thread keeps calling GC for bridge and portmap
with the attachments that may hold state at that moment (every pod between
the start of its ADD and the end of its DEL), as a runtime does. Afterwards:

* no address was ever held by two live pods at once (checked when each ADD
  returns, against every pod still live; the range is small, so addresses are
  reused many times over);
* every pod got an address, every call succeeded;
* the node is as it was before: no veth, lease, temporary file, masquerade
  or port-mapping entry (tests/helpers/snapshot.py).
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import threading
import time
from typing import Any

import pytest

import netns
from tests.helpers.netenv import Node, wait_until
from tests.helpers.plugins import run_plugin
from tests.helpers.snapshot import links, node_snapshot, state_diff

pytestmark = pytest.mark.integration

PODS = 100
PARALLEL = 10
NETWORK = "concnet"
VERSION = "1.1.0"
GC_INTERVAL = 1.0
# 10 addresses (.2-.11) for 100 pods, up to 10 live at a time: the round-robin allocator wraps
# around again and again and must step over the addresses live pods hold.
RANGE = {"subnet": "10.95.0.0/28", "rangeEnd": "10.95.0.11"}


def bridge_conf(node: Node, **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": VERSION,
        "name": NETWORK,
        "type": "bridge",
        "bridge": "cc0",
        "isGateway": True,
        "ipMasq": True,
        "ipam": {"type": "host-local", "dataDir": str(node.ipam_dir), "ranges": [[RANGE]]},
        **extra,
    }


def portmap_conf(port: int, **extra: Any) -> dict[str, Any]:
    return {
        "cniVersion": VERSION,
        "name": NETWORK,
        "type": "portmap",
        "runtimeConfig": {"portMappings": [{"hostPort": port, "containerPort": 80, "protocol": "tcp"}]},
        **extra,
    }


def test_100_concurrent_add_del_with_gc(make_node, launcher_dir):
    node = make_node("conc", cni_path=launcher_dir)
    bridge = os.path.join(launcher_dir, "bridge")
    portmap = os.path.join(launcher_dir, "portmap")

    def call(exe: str, command: str, conf: dict, container_id: str, netns_path: str) -> Any:
        return run_plugin(
            exe, command, conf, node=node, netns=netns_path, container_id=container_id, path=launcher_dir, timeout=120
        )

    # Warm up once so the node's lasting pieces (bridge, tables) exist before the baseline.
    with netns.temporary("pt-cpod") as pod:
        out = call(bridge, "ADD", bridge_conf(node), "warm", pod.path)
        assert out.code == 0, out
        assert call(portmap, "ADD", portmap_conf(20000, prevResult=out.out), "warm", pod.path).code == 0
        assert call(portmap, "DEL", portmap_conf(20000), "warm", pod.path).code == 0
        assert call(bridge, "DEL", bridge_conf(node), "warm", pod.path).code == 0
    wait_until(lambda: not [link for link in links(node.name) if link[1] == "veth"], timeout=5)
    baseline = node_snapshot(node.name, [node.ipam_dir], ignore_files=["last_reserved_ip.*"], derived_routes=False)

    lock = threading.Lock()
    registry = threading.Lock()  # held by GC while it runs: no attachment starts meanwhile
    live: dict[str, str] = {}  # container ID -> address, while its ADD result stands
    maybe_state: set[str] = set()  # container IDs between the start of ADD and the end of DEL
    problems: list[str] = []
    addresses: list[str] = []
    stop = threading.Event()
    gc_runs = [0]

    rng = random.Random(14)
    lifetimes = [2.5 if rng.random() < 0.2 else 0.0 for _ in range(PODS)]  # one pod in five lives long

    def one_pod(n: int) -> None:
        cid = f"conc-{n:03d}"
        with netns.temporary("pt-cpod") as pod:
            with registry, lock:
                maybe_state.add(cid)
            try:
                add = call(bridge, "ADD", bridge_conf(node), cid, pod.path)
                if add.code != 0:
                    problems.append(f"{cid} bridge ADD: {add.out} {add.err[-300:]}")
                    return
                address = add.out["ips"][0]["address"].split("/")[0]
                with lock:
                    holder = next((c for c, a in live.items() if a == address), None)
                    if holder:
                        problems.append(f"duplicate address {address}: {cid} and {holder}")
                    live[cid] = address
                    addresses.append(address)
                pm = call(portmap, "ADD", portmap_conf(20000 + n, prevResult=add.out), cid, pod.path)
                time.sleep(lifetimes[n])  # pods live for different times: releases come out of order
                if pm.code != 0:
                    problems.append(f"{cid} portmap ADD: {pm.out} {pm.err[-300:]}")
                for exe, conf in ((portmap, portmap_conf(20000 + n)), (bridge, bridge_conf(node))):
                    if exe == bridge:
                        with lock:
                            live.pop(cid, None)  # from here on the address may be released
                    out = call(exe, "DEL", conf, cid, pod.path)
                    if out.code != 0:
                        problems.append(f"{cid} DEL {os.path.basename(exe)}: {out.out} {out.err[-300:]}")
            finally:
                with lock:
                    live.pop(cid, None)
                    maybe_state.discard(cid)

    def collector() -> None:
        deadline = time.monotonic() + 600
        while not stop.is_set() and time.monotonic() < deadline:
            # Like a runtime, GC names every attachment that may hold state, and no attachment
            # starts while it runs (one that did could be collected before it is in the list).
            with registry:
                valid = [{"containerID": cid, "ifname": "eth0"} for cid in sorted(maybe_state)]
                for exe, conf in ((bridge, bridge_conf(node)), (portmap, portmap_conf(20000))):
                    out = call(exe, "GC", dict(conf, **{"cni.dev/valid-attachments": valid}), "gc", "")
                    if out.code != 0:
                        problems.append(f"GC {os.path.basename(exe)}: {out.out} {out.err[-300:]}")
            gc_runs[0] += 1
            stop.wait(GC_INTERVAL)

    gc_thread = threading.Thread(target=collector, daemon=True)
    gc_thread.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
            for future in [pool.submit(one_pod, n) for n in range(PODS)]:
                future.result(timeout=600)
    finally:
        stop.set()
        gc_thread.join(120)
    assert not problems, "\n".join(problems[:20])
    assert len(addresses) == PODS
    assert gc_runs[0] >= 3, "GC ran too rarely to overlap with the ADDs and DELs"
    # The DELs alone left nothing; a final GC with no valid attachment finds nothing to do.
    wait_until(lambda: links(node.name) == baseline["links"], timeout=10)
    after = node_snapshot(node.name, [node.ipam_dir], ignore_files=["last_reserved_ip.*"], derived_routes=False)
    assert after == baseline, state_diff(baseline, after)
    assert node.leases(NETWORK) == []
    for exe, conf in ((bridge, bridge_conf(node)), (portmap, portmap_conf(20000))):
        assert call(exe, "GC", dict(conf, **{"cni.dev/valid-attachments": []}), "gc", "").code == 0
    final = node_snapshot(node.name, [node.ipam_dir], ignore_files=["last_reserved_ip.*"], derived_routes=False)
    assert final == baseline, state_diff(baseline, final)
