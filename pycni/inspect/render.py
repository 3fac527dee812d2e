"""Showing a NodeView or a ClusterView: as text, or as a Graphviz graph (dot source, SVG, PNG)."""
from __future__ import annotations

import html
import re
import shutil
import subprocess
from typing import Iterable

from .collect import NodeView, Pod, Remote
from .cluster import ClusterView

GRAPHVIZ_FORMATS = ("svg", "png")
DOT_TIMEOUT = 60
FONT = "Helvetica"
COLORS = {"pod": "#e8f1fb", "bridge": "#fff4d6", "vxlan": "#e6f5e6", "underlay": "#eeeeee",
          "remote": "#f3e8fb", "bad": "#fde2e2", "node": "#fafafa"}


class RenderError(Exception):
    """The picture cannot be made (Graphviz missing or failing); the message says what to do."""


def _ok(flag: bool) -> str:
    return "ok" if flag else "MISSING"


# ---- text ---------------------------------------------------------------------------------

def _pod_lines(pod: Pod, last: bool) -> list[str]:
    branch, stem = ("└─", "   ") if last else ("├─", "│  ")
    where = f"netns {pod.netns_name}" if pod.netns_name else "netns unknown"
    head = f"  {branch} {pod.host_veth or '(no host veth)'} <-> {pod.ifname} in {where}"
    lines = [head]
    who = pod.container_id or "(container unknown)"
    source = {"cache": "result cache", "lease": "host-local lease", "veth": "namespace listing"}[pod.source]
    lines.append(f"  {stem}    pod {who}  network {pod.network or '?'}  (from the {source})")
    details = [", ".join(pod.addresses) or "no address"]
    if pod.mac:
        details.append(f"mac {pod.mac}")
    if pod.mtu:
        details.append(f"mtu {pod.mtu}")
    if pod.gateway:
        details.append(f"gateway {', '.join(g for g in (pod.gateway, pod.gateway6) if g)}")
    lines.append(f"  {stem}    {pod.ifname} " + "  ".join(details))
    for mapping in pod.port_mappings:
        lines.append(f"  {stem}    hostPort {mapping.describe()}")
    if pod.masquerade:
        lines.append(f"  {stem}    masquerade: {pod.masquerade}")
    if pod.shaping:
        lines.append(f"  {stem}    shaping: {pod.shaping.describe()}")
    return lines


def _remote_lines(remote: Remote, last: bool) -> list[str]:
    branch, stem = ("└─", "   ") if last else ("├─", "│  ")
    name = remote.node_name or "?"
    entries = f"fdb {_ok(remote.fdb)}, neighbour {_ok(remote.neigh)}, route {_ok(remote.route)}"
    store = ", in store" if remote.in_store else ""
    lines = [f"  {branch} node {name}  {remote.public_ip or '?'}  subnet {remote.subnet or '?'}  "
             f"VTEP {remote.vtep_mac or '?'} at {remote.vtep_address or '?'}  ({entries}{store})"]
    if remote.dual:
        lines.append(f"  {stem}    IPv6 subnet {remote.subnet6 or '?'}  VTEP at {remote.vtep_address6 or '?'}  "
                     f"(neighbour {_ok(remote.neigh6)}, route {_ok(remote.route6)})")
    return lines


def _remote_line(remote: Remote, last: bool) -> str:
    return "\n".join(_remote_lines(remote, last))


def _node_addresses(view: NodeView) -> str:
    """"192.168.100.10 on eth0, fd70::10 on eth0": the node's own addresses and where they are."""
    parts = []
    for address, where in ((view.public_ip, view.underlay), (view.public_ipv6, view.underlay6)):
        if address:
            parts.append(address + (f" on {where}" if where else ""))
    return ", ".join(parts)


def node_text(view: NodeView) -> str:
    lines = []
    title = f"node {view.name or '(no overlay state)'}"
    if view.public_ip:
        title += f"  {_node_addresses(view)}"
    lines.append(title)
    if view.subnet:
        lines.append(f"  overlay: subnet {view.subnet} of {view.network}, gateway {view.gateway}, pod MTU {view.mtu}")
    if view.subnet6:
        lines.append(f"  overlay IPv6: subnet {view.subnet6} of {view.network6}, gateway {view.gateway6}")
    for bridge in view.bridges:
        lines.append("")
        lines.append(f"bridge {bridge.name}  {', '.join(bridge.addresses) or 'no address'}  mac {bridge.mac}  "
                     f"mtu {bridge.mtu}  {bridge.state.lower()}")
        pods = [p for p in view.pods if p.bridge == bridge.name]
        if not pods:
            lines.append("  (no pods)")
        for i, pod in enumerate(pods):
            lines += _pod_lines(pod, i == len(pods) - 1)
    loose = [p for p in view.pods if not p.bridge]
    if loose:
        lines.append("")
        lines.append("pods without a bridge port (namespace gone or not on a bridge)")
        for i, pod in enumerate(loose):
            lines += _pod_lines(pod, i == len(loose) - 1)
    for vx in view.vxlans:
        lines.append("")
        learning = "" if vx.learning is None else ("  learning on" if vx.learning else "  learning off")
        lines.append(f"vxlan {vx.name}  VNI {vx.vni}  UDP {vx.port}  local {vx.local or '?'}"
                     f"{' via ' + vx.underlay if vx.underlay else ''}  {', '.join(vx.addresses)}  mac {vx.mac}  "
                     f"mtu {vx.mtu}{learning}")
        if not vx.remotes:
            lines.append("  (no remote nodes)")
        for i, remote in enumerate(vx.remotes):
            lines += _remote_lines(remote, i == len(vx.remotes) - 1)
    lines.append("")
    lines.append("firewall")
    if view.overlay_members or view.overlay_masquerade:
        members = ", ".join(view.overlay_members) or "none"
        leaving = " and ".join(view.networks) or "the cluster"
        masq = f"; pod traffic leaving {leaving} masqueraded" if view.overlay_masquerade else ""
        lines.append(f"  pycni_overlay  VXLAN accepted from members {members}{masq}")
    else:
        lines.append("  pycni_overlay  (no table)")
    lines.append("  pycni_portmap  " + ("; ".join(m.describe() for m in view.portmap_entries) or "(no mappings)"))
    masq = sorted({f"{', '.join(p.ips)} via {p.masquerade}" for p in view.pods
                   if p.masquerade.startswith("pycni_masq")})
    lines.append("  pycni_masq     " + ("; ".join(masq) or "(no entries)"))
    if view.notes:
        lines.append("")
        lines.append("notes")
        lines += [f"  - {note}" for note in view.notes]
    return "\n".join(lines)


def cluster_text(view: ClusterView) -> str:
    lines = [view.describe()]
    columns = [("NODE", lambda l: l.node_name or "-"), ("PUBLIC-IP", lambda l: l.public_ip)]
    if any(l.subnet for l in view.leases) or not view.leases:
        columns.append(("SUBNET", lambda l: l.subnet or "-"))
    if any(l.ipv6_subnet for l in view.leases):
        columns.append(("IPV6-SUBNET", lambda l: l.ipv6_subnet or "-"))
    columns.append(("VTEP-MAC", lambda l: l.vtep_mac))
    if any(l.public_ipv6 for l in view.leases):
        columns += [("PUBLIC-IPV6", lambda l: l.public_ipv6 or "-"), ("IPV6-VTEP-MAC", lambda l: l.vtep_mac6 or "-")]
    rows = [tuple(title for title, _ in columns) + ("",)]
    for lease in view.leases:
        mark = "this node" if view.this_node and view.this_node in (lease.public_ip, lease.public_ipv6) else ""
        rows.append(tuple(value(lease) for _, value in columns) + (mark,))
    count = len(columns)
    widths = [max(len(r[i]) for r in rows) for i in range(count)]
    lines += ["  ".join(r[i].ljust(widths[i]) for i in range(count)) + ("  " + r[count] if r[count] else "")
              for r in rows]
    if not view.leases:
        lines.append("(no leases)")
    return "\n".join(line.rstrip() for line in lines)


# ---- Graphviz ----------------------------------------------------------------------------

def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _id(prefix: str, name: str) -> str:
    return prefix + "_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def _table(title: str, rows: Iterable[str], color: str, title_color: str = "#333333") -> str:
    cells = "".join(f'<TR><TD ALIGN="LEFT" BALIGN="LEFT">{row}</TD></TR>' for row in rows)
    return (f'<<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="0" CELLPADDING="4" BGCOLOR="{color}" '
            f'COLOR="#777777"><TR><TD ALIGN="LEFT"><FONT COLOR="{title_color}"><B>{title}</B></FONT></TD></TR>'
            f'{cells}</TABLE>>')


def _small(text: str) -> str:
    return f'<FONT POINT-SIZE="9" COLOR="#555555">{text}</FONT>'


def _pod_node(pod: Pod, index: int) -> str:
    rows = [f"{_e(', '.join(pod.addresses) or 'no address')}"]
    rows.append(_small(f"{_e(pod.ifname)}  mac {_e(pod.mac or '?')}  mtu {_e(pod.mtu or '?')}"))
    rows.append(_small(f"netns {_e(pod.netns_name or '?')}"))
    rows.append(_small(f"network {_e(pod.network or '?')}"))
    rows += [_small(f"hostPort {_e(m.describe())}") for m in pod.port_mappings]
    if pod.shaping:
        rows += [_small(f"shaping {_e(line)}") for line in _shaping_lines(pod)]
    if pod.masquerade:
        rows.append(_small(f"masquerade {_e(pod.masquerade)}"))
    title = f"pod {_e(_short(pod.container_id) if pod.container_id else '(unknown)')}"
    return f'  {_id("pod", str(index))} [label={_table(title, rows, COLORS["pod"])}];'


def _shaping_lines(pod: Pod) -> list[str]:
    from .collect import rate

    shaping, lines = pod.shaping, []
    if shaping is None:
        return lines
    if shaping.ingress_bits is not None:
        lines.append(f"to pod {rate(shaping.ingress_bits)}, burst {shaping.ingress_burst} B (tbf on {pod.host_veth})")
    if shaping.egress_bits is not None:
        lines.append(f"from pod {rate(shaping.egress_bits)}, burst {shaping.egress_burst} B (tbf on ifb {shaping.ifb})")
    return lines


def _short(container_id: str, keep: int = 28) -> str:
    return container_id if len(container_id) <= keep else container_id[:keep - 1] + "…"


def _remote_node(remote: Remote, key: str) -> str:
    bad = not remote.complete
    rows = [f"{_e(remote.public_ip or '?')}", _small(f"subnet {_e(remote.subnet or '?')}"),
            _small(f"VTEP {_e(remote.vtep_mac or '?')}"), _small(f"VTEP address {_e(remote.vtep_address or '?')}")]
    if remote.dual:
        rows += [_small(f"IPv6 subnet {_e(remote.subnet6 or '?')}"),
                 _small(f"IPv6 VTEP address {_e(remote.vtep_address6 or '?')}")]
    if bad:
        rows.append(f'<FONT COLOR="#b00020">missing: {_e(", ".join(remote.missing()))}</FONT>')
    title = f"node {_e(remote.node_name or '?')}"
    return f'  {key} [label={_table(title, rows, COLORS["bad"] if bad else COLORS["remote"])}];'


def node_dot(view: NodeView) -> str:
    title = f"pycni inspect: node {view.name or '?'}"
    if view.subnet:
        subnets = f"{view.subnet} of {view.network}" + (f", {view.subnet6} of {view.network6}" if view.subnet6 else "")
        title += f"  ({subnets}, pod MTU {view.mtu})"
    out = ["digraph pycni {",
           f'  graph [rankdir=LR, fontname="{FONT}", fontsize=12, labelloc=t, label=<<B>{_e(title)}</B>>, '
           'nodesep=0.25, ranksep=0.7, bgcolor="white", pad=0.2];',
           f'  node [shape=plain, fontname="{FONT}", fontsize=10];',
           f'  edge [fontname="{FONT}", fontsize=9, color="#666666", arrowsize=0.6];']
    out.append(f'  subgraph cluster_node {{ label=<{_e("node " + (view.name or "?") + "  " + _node_addresses(view))}>; '
               f'style="rounded,filled"; fillcolor="{COLORS["node"]}"; color="#999999";')
    for bridge in view.bridges:
        rows = [_e(", ".join(bridge.addresses) or "no address"), _small(f"mac {_e(bridge.mac)}  mtu {_e(bridge.mtu)}")]
        out.append(f'  {_id("br", bridge.name)} [label={_table("bridge " + _e(bridge.name), rows, COLORS["bridge"])}];')
    for i, pod in enumerate(view.pods):
        out.append(_pod_node(pod, i))
    for vx in view.vxlans:
        rows = [_e(", ".join(vx.addresses) or "no address"),
                _small(f"VNI {_e(vx.vni)}  UDP {_e(vx.port)}  mtu {_e(vx.mtu)}"), _small(f"mac {_e(vx.mac)}")]
        out.append(f'  {_id("vx", vx.name)} [label={_table("vxlan " + _e(vx.name), rows, COLORS["vxlan"])}];')
    underlays = _underlays(view)
    for name, addresses in underlays.items():
        rows = [_e(", ".join(addresses))]
        if view.overlay_members:
            rows.append(_small("VXLAN accepted from " + _e(", ".join(view.overlay_members))))
        table = _table("underlay " + _e(name), rows, COLORS["underlay"])
        out.append(f'  {_id("ul", name)} [label={table}];')
    out.append("  }")
    for i, pod in enumerate(view.pods):
        if pod.bridge:
            out.append(f'  {_id("pod", str(i))} -> {_id("br", pod.bridge)} [dir=both, label="{_e(pod.host_veth)}"];')
    for vx in view.vxlans:
        for bridge in view.bridges:
            out.append(f'  {_id("br", bridge.name)} -> {_id("vx", vx.name)} [style=dashed, label="routed"];')
        underlay = _underlay_of(vx, view, underlays)
        if underlay:
            out.append(f'  {_id("vx", vx.name)} -> {_id("ul", underlay)} [label="encap UDP {_e(vx.port)}"];')
        for j, remote in enumerate(vx.remotes):
            key = _id("remote", f"{vx.name}_{j}")
            out.append(_remote_node(remote, key))
            source = _id("ul", underlay) if underlay else _id("vx", vx.name)
            color = "#b00020" if not remote.complete else "#666666"
            subnets = ", ".join(s for s in (remote.subnet, remote.subnet6) if s)
            out.append(f'  {source} -> {key} [color="{color}", label="{_e(subnets)}"];')
    out.append("}")
    return "\n".join(out) + "\n"


def _underlays(view: NodeView) -> dict[str, list[str]]:
    """The node's underlay interfaces and the node's own addresses on each."""
    out: dict[str, list[str]] = {}
    for address, name in ((view.public_ip, view.underlay), (view.public_ipv6, view.underlay6)):
        if address and name:
            out.setdefault(name, []).append(address)
    return out


def _underlay_of(vx, view: NodeView, underlays: dict[str, list[str]]) -> str:
    """The underlay interface a VXLAN device sends on: the one holding its local address (else the first)."""
    for name, addresses in underlays.items():
        if vx.local and vx.local in addresses:
            return name
    return next(iter(underlays), "")


def cluster_dot(view: ClusterView) -> str:
    out = ["graph pycni_cluster {",
           f'  graph [layout=dot, rankdir=TB, fontname="{FONT}", fontsize=12, labelloc=t, '
           f'label=<<B>{_e(view.describe())}</B>>, bgcolor="white", pad=0.2, nodesep=0.4];',
           f'  node [shape=plain, fontname="{FONT}", fontsize=10];',
           f'  edge [fontname="{FONT}", fontsize=9, color="#666666"];',
           f'  underlay [shape=ellipse, style=filled, fillcolor="{COLORS["underlay"]}", '
           f'label="underlay\\nVXLAN UDP {_e(view.port or "?")}"];']
    networks = view.networks
    if networks:
        out.append(f'  overlay [shape=ellipse, style=filled, fillcolor="{COLORS["vxlan"]}", '
                   f'label="pod network {_e(" + ".join(networks))}\nVXLAN VNI {_e(view.vni)}"];')
    for i, lease in enumerate(view.leases):
        mark = " (this node)" if view.this_node and view.this_node in (lease.public_ip, lease.public_ipv6) else ""
        rows = [_e(", ".join(a for a in (lease.public_ip, lease.public_ipv6) if a))]
        rows += [_small(f"pod subnet {_e(subnet)}") for subnet in lease.subnets]
        rows.append(_small(f"VTEP {_e(lease.vtep_mac)}"))
        if lease.vtep_mac6:
            rows.append(_small(f"IPv6 VTEP {_e(lease.vtep_mac6)}"))
        color = COLORS["bridge"] if mark else COLORS["remote"]
        table = _table("node " + _e((lease.node_name or "?") + mark), rows, color)
        out.append(f'  {_id("n", str(i))} [label={table}];')
        if networks:
            out.append(f'  overlay -- {_id("n", str(i))} [label="{_e(", ".join(lease.subnets))}", style=dashed];')
        for address in (lease.public_ip, lease.public_ipv6):
            if address:
                out.append(f'  {_id("n", str(i))} -- underlay [label="{_e(address)}"];')
    out.append("}")
    return "\n".join(out) + "\n"


def graphviz(dot_source: str, fmt: str) -> bytes:
    """Run Graphviz's `dot` on the source; SVG or PNG bytes."""
    if fmt not in GRAPHVIZ_FORMATS:
        raise RenderError(f"unknown picture format {fmt!r}")
    exe = shutil.which("dot")
    if exe is None:
        raise RenderError("Graphviz is not installed (Debian: apt-get install graphviz); "
                          "--format text, json and dot work without it")
    args = [exe, f"-T{fmt}"] + (["-Gdpi=96"] if fmt == "png" else [])
    try:
        done = subprocess.run(args, input=dot_source.encode(), capture_output=True, timeout=DOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RenderError(f"Graphviz took longer than {DOT_TIMEOUT}s") from None
    if done.returncode != 0:
        raise RenderError(f"Graphviz failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout
