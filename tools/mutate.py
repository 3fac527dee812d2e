"""pycni's own mutation check: break the code on purpose, one meaningful bug at a time, and see the tests fail.

Each mutation below replaces one exact piece of source (found exactly once,
or the mutation is reported stale) with a plausible bug: an off-by-one, a
check left out, a comparison turned round, a renewal at the wrong period.
For each, the tool

1. applies it to the working tree,
2. runs the tests that should catch it (``pytest -x``, bounded by a timeout),
3. restores the file byte for byte (also on Ctrl-C, a crash or a timeout),

and reports it **killed** (a test failed) or **survived** (every test
passed: the suite cannot see that bug). A baseline run first proves the
selected tests pass on the unmutated code, so a kill means the mutation,
not a broken tree.

    sudo .venv/bin/python tools/mutate.py                 # every mutation (~10-15 min)
    sudo .venv/bin/python tools/mutate.py --list          # what there is
    sudo .venv/bin/python tools/mutate.py -k lease -k mac # those whose name contains a word
    sudo .venv/bin/python tools/mutate.py --json out.json

It edits files of the checkout it runs from, one at a time and only while
that mutation's tests run: do not run it while editing or testing the same
checkout. Exit status: 0 when every mutation was killed, 1 otherwise.
docs/reliability.md records the latest figure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
TIMEOUT = 600.0  # per mutation: its tests, seconds


@dataclass(frozen=True)
class Mutation:
    name: str
    area: str  # decoding, host-local, bridge, portmap, agent, overlay, store, vxlan
    path: str  # relative to the checkout
    old: str  # exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files or node ids that must catch it
    why: str  # the bug it stands for


M = Mutation
MUTATIONS: tuple[Mutation, ...] = (
    # ---- the decoding layer ----
    M(
        "bool-is-an-int",
        "decoding",
        "cni_plugins/spec/decode.py",
        "        return isinstance(value, int) and not isinstance(value, bool)\n",
        "        return isinstance(value, int)\n",
        ("tests/unit/test_decode.py",),
        "true/false accepted where the Go decoder wants a number",
    ),
    M(
        "nesting-one-deeper",
        "decoding",
        "cni_plugins/spec/boundedjson.py",
        "            if depth > max_depth:\n",
        "            if depth > max_depth + 1:\n",
        ("tests/unit/test_decode.py", "tests/unit/test_skel.py", "tests/unit/test_store_entries.py"),
        "JSON one level deeper than the bound gets through",
    ),
    M(
        "first-spelling-wins",
        "decoding",
        "cni_plugins/spec/decode.py",
        "            out.pop(name, None)  # a later spelling of the same option wins\n",
        "            if name in out:\n                continue\n",
        ("tests/unit/test_decode.py",),
        "of two spellings of one option (Go's case-insensitive match) the first wins, not the last",
    ),
    # ---- host-local ----
    M(
        "broadcast-allocated",
        "host-local",
        "ipam/ranges.py",
        "        return subnet.broadcast_address - 1\n",
        "        return subnet.broadcast_address\n",
        ("tests/unit/test_host_local.py",),
        "the IPv4 broadcast address is handed to a pod",
    ),
    M(
        "gateway-allocated",
        "host-local",
        "ipam/allocator.py",
        "        if current != rng.gateway:\n            yield current, rng\n",
        "        yield current, rng\n",
        ("tests/unit/test_host_local.py",),
        "the gateway address is handed to a pod",
    ),
    M(
        "reservation-not-exclusive",
        "host-local",
        "ipam/store.py",
        "            except FileExistsError:\n                return False\n            finally:\n"
        "                _unlink_quietly(fd, tmp)\n",
        "            except FileExistsError:\n                return True\n            finally:\n"
        "                _unlink_quietly(fd, tmp)\n",
        ("tests/unit/test_host_local.py", "tests/integration/test_concurrent_add_del_gc.py"),
        "two containers racing for one address both believe they got it",
    ),
    M(
        "duplicate-allocation",
        "host-local",
        "ipam/allocator.py",
        "            if held_ip is not None and self.range_set.contains(held_ip):\n",
        "            if False:\n",
        ("tests/unit/test_host_local.py",),
        "a second ADD of one container and interface gets a second address",
    ),
    M(
        "range-start-after-end",
        "host-local",
        "ipam/ranges.py",
        "    if start > end:\n",
        "    if False:\n",
        ("tests/unit/test_host_local.py",),
        "a range whose rangeStart is after its rangeEnd is accepted",
    ),
    # ---- bridge ----
    M(
        "bridge-mac-follows-ports",
        "bridge",
        "cni_plugins/kernel/names.py",
        "    return stable_mac(bridge_mac_seed(bridge, node_identity() if node_id is None else node_id))\n",
        "    return None  # type: ignore[return-value]\n",
        ("tests/unit/test_bridge_unit.py", "tests/integration/test_bridge.py"),
        "pycni's bridges get no address of their own: a Linux bridge then takes its lowest port's MAC and the "
        "pods' gateway MAC moves as pods come and go",
    ),
    M(
        "vxlan-overhead",
        "vxlan",
        "cni_plugins/kernel/vxlan.py",
        "VXLAN_OVERHEAD_V4 = 50\n",
        "VXLAN_OVERHEAD_V4 = 40\n",
        ("tests/unit/test_overlay_unit.py", "tests/unit/test_vxlan_unit.py"),
        "the VXLAN device's MTU leaves too little room for the encapsulation (large packets dropped)",
    ),
    # ---- portmap ----
    M(
        "port-zero",
        "portmap",
        "cni_plugins/portmap/config.py",
        "        if not 0 < port < 65536:\n",
        "        if not 0 <= port < 65536:\n",
        ("tests/unit/test_portmap_unit.py",),
        "hostPort 0 is accepted",
    ),
    M(
        "repeated-mapping-last-wins",
        "portmap",
        "cni_plugins/portmap/config.py",
        "        if key not in seen:\n            seen.add(key)\n            cfg.mappings.append(mapping)\n",
        "        seen.add(key)\n        cfg.mappings.append(mapping)\n",
        ("tests/unit/test_portmap_unit.py", "tests/integration/test_portmap_integration.py"),
        "a repeated hostPort mapping is programmed twice (the reference forwards to the first only)",
    ),
    # ---- the agent ----
    M(
        "one-connection-too-many",
        "agent",
        "pycni/agent/server.py",
        "                full = self._connections >= self.options.max_connections\n",
        "                full = self._connections > self.options.max_connections\n",
        ("tests/integration/test_agent_trust.py::test_connections_are_bounded_and_slow_clients_cut_off",),
        "the agent serves one connection more than --max-connections",
    ),
    M(
        "delegate-from-anywhere",
        "agent",
        "pycni/agent/server.py",
        '        return f"ipam type {name!r}: {exc}"\n',
        '        return ""\n',
        ("tests/integration/test_agent_trust.py",),
        "the agent executes an IPAM binary from a directory its operator did not allow",
    ),
    M(
        "oversized-request",
        "agent",
        "pycni/agent/server.py",
        "        if size > protocol.MAX_BODY:\n",
        "        if size > 2 * protocol.MAX_BODY:\n",
        ("tests/integration/test_shim_protocol.py", "tests/integration/test_agent_trust.py"),
        "the agent reads requests larger than it announces it takes",
    ),
    M(
        "descriptor-leak",
        "agent",
        "pycni/agent/server.py",
        "    for fd in fds:\n        try:\n            os.close(fd)\n        except OSError:\n            pass\n    fds.clear()\n",
        "    fds.clear()\n",
        ("tests/integration/test_agent_trust.py",),
        "the namespace descriptors a request brings are never closed (the agent runs out of descriptors)",
    ),
    # ---- the overlay node ----
    M(
        "renew-at-3x-ttl",
        "overlay",
        "pycni/overlay/node.py",
        "        next_renew = now + self.opts.lease_ttl / 3\n",
        "        next_renew = now + self.opts.lease_ttl * 3\n",
        ("tests/integration/test_overlay_agent.py", "tests/integration/test_cluster_etcd.py"),
        "the lease is renewed at three times its TTL instead of a third (it lapses between renewals)",
    ),
    M(
        "masquerade-pod-to-pod",
        "overlay",
        "pycni/overlay/firewall.py",
        "                f\"        {fam} saddr {net} {fam} daddr {net} return comment {nft.comment('pod to pod')}\",\n",
        "",
        ("tests/unit/test_overlay_unit.py", "tests/integration/test_multinode_pods.py"),
        "pod to pod traffic across nodes is masqueraded (the receiver sees the node, not the pod)",
    ),
    M(
        "vxlan-from-anyone",
        "overlay",
        "pycni/overlay/firewall.py",
        "        f\"        udp dport {port} counter drop comment {nft.comment('vxlan from non-members')}\",\n",
        "",
        ("tests/unit/test_overlay_unit.py", "tests/integration/test_overlay_real_nodes.py"),
        "VXLAN from hosts that hold no lease is accepted (anyone can inject packets into the pod network)",
    ),
    M(
        "zone-in-public-ip",
        "overlay",
        "ipam/cluster/leases.py",
        '    if "%" in text:\n        return None, f"carries a zone',
        '    if False:\n        return None, f"carries a zone',
        ("tests/unit/test_store_entries.py", "tests/unit/test_dual_stack_leases.py"),
        "a lease whose public IP carries a zone (192.0.2.77%eth0) is accepted",
    ),
    M(
        "subnet-outside-network",
        "overlay",
        "ipam/cluster/leases.py",
        "        if not net.subnet_of(whole):  # type: ignore[arg-type]\n",
        "        if False:\n",
        (
            "tests/unit/test_store_entries.py",
            "tests/unit/test_dual_stack_leases.py",
            "tests/unit/test_cluster_store.py",
        ),
        "a lease for a subnet outside the cluster network is accepted and programmed",
    ),
    # ---- the stores ----
    M(
        "file-store-cas",
        "store",
        "ipam/cluster/filestore.py",
        '                if old is None or old["mod_revision"] != expected_mod_revision:\n',
        "                if old is None:\n",
        ("tests/unit/test_cluster_store.py",),
        "compare-and-swap on the file store overwrites a newer value",
    ),
    M(
        "file-watch-misses-compaction",
        "store",
        "ipam/cluster/filestore.py",
        "            if after_revision < compacted:\n",
        "            if False:\n",
        ("tests/unit/test_store_watch.py", "tests/unit/test_cluster_store.py"),
        "a file-store watch behind the compacted log silently misses changes instead of re-listing",
    ),
    M(
        "expired-key-still-alive",
        "store",
        "ipam/cluster/filestore.py",
        "        if record is None or _expired(record, _wall_clock()):\n            return None\n        return record\n",
        "        if record is None:\n            return None\n        return record\n",
        ("tests/unit/test_cluster_store.py", "tests/unit/test_store_watch.py"),
        "a lease past its TTL still reads as alive on the file store (a dead node keeps its subnet)",
    ),
    # ---- the vxlan plugin ----
    M(
        "pods-masqueraded-by-bridge",
        "vxlan",
        "cni_plugins/vxlan/netconf.py",
        '        "ipMasq": False,\n        "mtu": n.mtu or state.mtu,\n',
        '        "ipMasq": True,\n        "mtu": n.mtu or state.mtu,\n',
        ("tests/unit/test_vxlan_unit.py", "tests/integration/test_vxlan_plugin.py"),
        "the vxlan plugin's bridge masquerades pod traffic (pods lose their own source address)",
    ),
    M(
        "no-route-to-cluster",
        "vxlan",
        "cni_plugins/vxlan/netconf.py",
        '    routes = list(n.ipam.get("routes") or []) + [{"dst": network} for network, _subnet, _gw in pools]\n',
        '    routes = list(n.ipam.get("routes") or [])\n',
        ("tests/unit/test_vxlan_unit.py", "tests/integration/test_vxlan_plugin.py"),
        "pods get no route to the cluster network (without a default route they reach no other node)",
    ),
)


def _pytest(args: tuple[str, ...], timeout: float) -> tuple[int, float, str]:
    """(exit status, seconds, the tail of the output); status -1 on a timeout (counted as killed: it hung)."""
    cmd = [PYTHON, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", *args]
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        status = -1
    return status, time.monotonic() - started, "\n".join(out.strip().splitlines()[-3:])


def _apply(m: Mutation) -> bytes:
    """Apply ``m``; the file's original bytes (to restore). ValueError if the source is not found exactly once."""
    path = ROOT / m.path
    original = path.read_bytes()
    text = original.decode()
    count = text.count(m.old)
    if count != 1:
        raise ValueError(f"stale: the text to mutate occurs {count} times in {m.path}")
    path.write_bytes(text.replace(m.old, m.new).encode())
    return original


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", action="append", default=[], help="only mutations whose name or area contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated code")
    opts = parser.parse_args()
    chosen = [m for m in MUTATIONS if not opts.k or any(k in m.name or k in m.area for k in opts.k)]
    if opts.list:
        for m in chosen:
            print(f"{m.area:10} {m.name:28} {m.path}: {m.why}")
        return 0
    if os.geteuid() != 0:
        print("mutate: the tests need root (network namespaces); run it with sudo", file=sys.stderr)
        return 2
    for m in chosen:  # every mutation applies before anything runs
        if (ROOT / m.path).read_text().count(m.old) != 1:
            print(f"mutate: {m.name}: stale: its text is not found exactly once in {m.path}", file=sys.stderr)
            return 2
    if not opts.no_baseline:
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        print(f"baseline: {len(tests)} test selection(s) on the unmutated code ...", flush=True)
        status, took, tail = _pytest(tests, TIMEOUT * 3)
        if status != 0:
            print(
                f"mutate: the tests fail without any mutation (exit {status}, {took:.0f} s):\n{tail}", file=sys.stderr
            )
            return 2
        print(f"baseline: passed in {took:.0f} s", flush=True)
    results = []
    for m in chosen:
        original = _apply(m)
        try:
            status, took, tail = _pytest(m.tests, TIMEOUT)
        finally:
            (ROOT / m.path).write_bytes(original)
        verdict = "survived" if status == 0 else "killed"
        results.append(
            {
                "name": m.name,
                "area": m.area,
                "path": m.path,
                "why": m.why,
                "verdict": verdict,
                "exit": status,
                "seconds": round(took, 1),
            }
        )
        print(f"{verdict:8} {m.area:10} {m.name:28} {took:6.1f} s  {tail.splitlines()[-1] if tail else ''}", flush=True)
    killed = sum(r["verdict"] == "killed" for r in results)
    print(
        f"\n{killed} of {len(results)} mutations killed"
        + (
            ""
            if killed == len(results)
            else f"; survived: {', '.join(r['name'] for r in results if r['verdict'] != 'killed')}"
        )
    )
    if opts.json:
        Path(opts.json).write_text(json.dumps({"killed": killed, "total": len(results), "results": results}, indent=2))
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
