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
        details.append(f"gateway {pod.gateway}")
    lines.append(f"  {stem}    {pod.ifname} " + "  ".join(details))
    for mapping in pod.port_mappings:
        lines.append(f"  {stem}    hostPort {mapping.describe()}")
    if pod.masquerade:
        lines.append(f"  {stem}    masquerade: {pod.masquerade}")
    if pod.shaping:
        lines.append(f"  {stem}    shaping: {pod.shaping.describe()}")
    return lines


def _remote_line(remote: Remote, last: bool) -> str:
    branch = "└─" if last else "├─"
    name = remote.node_name or "?"
    entries = f"fdb {_ok(remote.fdb)}, neighbour {_ok(remote.neigh)}, route {_ok(remote.route)}"
    store = ", in store" if remote.in_store else ""
    return (f"  {branch} node {name}  {remote.public_ip or '?'}  subnet {remote.subnet or '?'}  "
            f"VTEP {remote.vtep_mac or '?'} at {remote.vtep_address or '?'}  ({entries}{store})")


def node_text(view: NodeView) -> str:
    lines = []
    title = f"node {view.name or '(no overlay state)'}"
    if view.public_ip:
        title += f"  {view.public_ip}" + (f" on {view.underlay}" if view.underlay else "")
    lines.append(title)
    if view.subnet:
        lines.append(f"  overlay: subnet {view.subnet} of {view.network}, gateway {view.gateway}, pod MTU {view.mtu}")
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
            lines.append(_remote_line(remote, i == len(vx.remotes) - 1))
    lines.append("")
    lines.append("firewall")
    if view.overlay_members or view.overlay_masquerade:
        members = ", ".join(view.overlay_members) or "none"
        masq = f"; pod traffic leaving {view.network or 'the cluster'} masqueraded" if view.overlay_masquerade else ""
        lines.append(f"  pycni_overlay  VXLAN accepted from members {members}{masq}")
    else:
        lines.append("  pycni_overlay  (no table)")
    lines.append("  pycni_portmap  " + ("; ".join(m.describe() for m in view.portmap_entries) or "(no mappings)"))
    masq = sorted({f"{p.ip} via {p.masquerade}" for p in view.pods if p.masquerade.startswith("pycni_masq")})
    lines.append("  pycni_masq     " + ("; ".join(masq) or "(no entries)"))
    if view.notes:
        lines.append("")
        lines.append("notes")
        lines += [f"  - {note}" for note in view.notes]
    return "\n".join(lines)


def cluster_text(view: ClusterView) -> str:
    lines = [view.describe()]
    rows = [("NODE", "PUBLIC-IP", "SUBNET", "VTEP-MAC", "")]
    for lease in view.leases:
        mark = "this node" if lease.public_ip == view.this_node else ""
        rows.append((lease.node_name or "-", lease.public_ip, lease.subnet, lease.vtep_mac, mark))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines += ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + ("  " + r[4] if r[4] else "") for r in rows]
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
    if bad:
        rows.append(f'<FONT COLOR="#b00020">missing: {_e(", ".join(remote.missing()))}</FONT>')
    title = f"node {_e(remote.node_name or '?')}"
    return f'  {key} [label={_table(title, rows, COLORS["bad"] if bad else COLORS["remote"])}];'


def node_dot(view: NodeView) -> str:
    title = f"pycni inspect: node {view.name or '?'}"
    if view.subnet:
        title += f"  ({view.subnet} of {view.network}, pod MTU {view.mtu})"
    out = ["digraph pycni {",
           f'  graph [rankdir=LR, fontname="{FONT}", fontsize=12, labelloc=t, label=<<B>{_e(title)}</B>>, '
           'nodesep=0.25, ranksep=0.7, bgcolor="white", pad=0.2];',
           f'  node [shape=plain, fontname="{FONT}", fontsize=10];',
           f'  edge [fontname="{FONT}", fontsize=9, color="#666666", arrowsize=0.6];']
    out.append(f'  subgraph cluster_node {{ label=<{_e("node " + (view.name or "?") + "  " + view.public_ip)}>; '
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
    if view.underlay:
        rows = [_e(view.public_ip)]
        if view.overlay_members:
            rows.append(_small("VXLAN accepted from " + _e(", ".join(view.overlay_members))))
        table = _table("underlay " + _e(view.underlay), rows, COLORS["underlay"])
        out.append(f'  {_id("ul", view.underlay)} [label={table}];')
    out.append("  }")
    for i, pod in enumerate(view.pods):
        if pod.bridge:
            out.append(f'  {_id("pod", str(i))} -> {_id("br", pod.bridge)} [dir=both, label="{_e(pod.host_veth)}"];')
    for vx in view.vxlans:
        for bridge in view.bridges:
            out.append(f'  {_id("br", bridge.name)} -> {_id("vx", vx.name)} [style=dashed, label="routed"];')
        if view.underlay:
            out.append(f'  {_id("vx", vx.name)} -> {_id("ul", view.underlay)} [label="encap UDP {_e(vx.port)}"];')
        for j, remote in enumerate(vx.remotes):
            key = _id("remote", f"{vx.name}_{j}")
            out.append(_remote_node(remote, key))
            source = _id("ul", view.underlay) if view.underlay else _id("vx", vx.name)
            color = "#b00020" if not remote.complete else "#666666"
            out.append(f'  {source} -> {key} [color="{color}", label="{_e(remote.subnet)}"];')
    out.append("}")
    return "\n".join(out) + "\n"


def cluster_dot(view: ClusterView) -> str:
    out = ["graph pycni_cluster {",
           f'  graph [layout=dot, rankdir=TB, fontname="{FONT}", fontsize=12, labelloc=t, '
           f'label=<<B>{_e(view.describe())}</B>>, bgcolor="white", pad=0.2, nodesep=0.4];',
           f'  node [shape=plain, fontname="{FONT}", fontsize=10];',
           f'  edge [fontname="{FONT}", fontsize=9, color="#666666"];',
           f'  underlay [shape=ellipse, style=filled, fillcolor="{COLORS["underlay"]}", '
           f'label="underlay\\nVXLAN UDP {_e(view.port or "?")}"];']
    if view.network:
        out.append(f'  overlay [shape=ellipse, style=filled, fillcolor="{COLORS["vxlan"]}", '
                   f'label="pod network {_e(view.network)}\nVXLAN VNI {_e(view.vni)}"];')
    for i, lease in enumerate(view.leases):
        mark = " (this node)" if lease.public_ip == view.this_node else ""
        rows = [_e(lease.public_ip), _small(f"pod subnet {_e(lease.subnet)}"), _small(f"VTEP {_e(lease.vtep_mac)}")]
        color = COLORS["bridge"] if mark else COLORS["remote"]
        table = _table("node " + _e((lease.node_name or "?") + mark), rows, color)
        out.append(f'  {_id("n", str(i))} [label={table}];')
        if view.network:
            out.append(f'  overlay -- {_id("n", str(i))} [label="{_e(lease.subnet)}", style=dashed];')
        out.append(f'  {_id("n", str(i))} -- underlay [label="{_e(lease.public_ip)}"];')
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
