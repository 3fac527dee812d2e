"""Showing a NodeView or a ClusterView: as text, or as a Graphviz graph (dot source, SVG, PNG).

The pictures are made to be read at README width (about 900 px), so they grow
downwards, not sideways:

- a node is drawn top to bottom: its pods in rows of at most POD_COLUMNS
  above the bridge they hang on, the VXLAN device beside the underlay link
  below it, and the other nodes as a grid of cards under the underlay link,
  one edge to the whole grid (its label counts them, red when one is
  unhealthy) instead of one edge per node;
- the cluster is a grid of node cards (and of the store's rejected keys)
  under a title that states the pod networks, the VXLAN settings and the
  store, wrapped onto lines of its own.

Grids are HTML-like tables inside one Graphviz node, so their rows and
columns do not depend on how dot orders things. Each grid has about as many
columns as rows (at most GRID_COLUMNS), and ``graphviz`` measures the laid-out
drawing and, should it still be wider than MAX_ASPECT (width:height), lays it
out again stretched to that ratio. Every node, this one and the others, wears
a health mark: a green check with what was checked ("ok · vxlan", "ok ·
direct") or a red cross with the problems. Long values are wrapped between
items, never inside one, so every address and MAC stays one piece of text.
"""

from __future__ import annotations

import html
import math
import re
import shutil
import subprocess
from typing import Iterable

from .cluster import ClusterView, LeaseView
from .collect import NodeView, Pod, Remote, short_id

GRAPHVIZ_FORMATS = ("svg", "png")
DOT_TIMEOUT = 60
FONT = "Helvetica"
MAX_ASPECT = 2.5  # widest picture allowed, width:height
POD_COLUMNS = 3  # pods side by side above their bridge
GRID_COLUMNS = 5  # node cards side by side
WRAP = 46  # characters per line of a card row
MEMBERS_SHOWN = 4  # underlay addresses listed on the underlay card; more are counted
COLORS = {
    "pod": "#e8f1fb",
    "bridge": "#fff4d6",
    "vxlan": "#e6f5e6",
    "underlay": "#eeeeee",
    "remote": "#f3e8fb",
    "bad": "#fde2e2",
    "node": "#fafafa",
    "this": "#fff4d6",
}
OK_COLOR, OK_FILL = "#1b6e2c", "#d9f2de"
BAD_COLOR, BAD_FILL = "#b00020", "#fbd5d5"


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
    named = f"{pod.title}  container {who}" if pod.pod_name else who
    source = {"cache": "result cache", "lease": "host-local lease", "veth": "namespace listing"}[pod.source]
    lines.append(f"  {stem}    pod {named}  network {pod.network or '?'}  (from the {source})")
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
    store = ", in store" if remote.in_store else (", NOT in the store" if remote.store_checked else "")
    if remote.direct:
        how = f"direct via {remote.direct}{' on ' + remote.direct_dev if remote.direct_dev else ''}"
        entries = f"direct route {_ok(remote.route)}"
        if remote.needs_fdb:
            entries = f"fdb {_ok(remote.fdb)}, " + entries
    else:
        how = f"VTEP {remote.vtep_mac or '?'} at {remote.vtep_address or '?'}"
        entries = f"fdb {_ok(remote.fdb)}, neighbour {_ok(remote.neigh)}, route {_ok(remote.route)}"
    lines = [
        f"  {branch} node {name}  {remote.public_ip or '?'}  subnet {remote.subnet or '?'}  {how}  ({entries}{store})"
    ]
    if remote.dual:
        if remote.direct6:
            lines.append(
                f"  {stem}    IPv6 subnet {remote.subnet6 or '?'}  direct via {remote.direct6}  "
                f"(direct route {_ok(remote.route6)})"
            )
        else:
            lines.append(
                f"  {stem}    IPv6 subnet {remote.subnet6 or '?'}  VTEP at {remote.vtep_address6 or '?'}  "
                f"(neighbour {_ok(remote.neigh6)}, route {_ok(remote.route6)})"
            )
    return lines


def _remote_line(remote: Remote, last: bool) -> str:
    return "\n".join(_remote_lines(remote, last))


def _node_addresses(view: NodeView) -> str:
    """ "192.168.100.10 on eth0, fd70::10 on eth0": the node's own addresses and where they are."""
    parts = []
    for address, where in ((view.public_ip, view.underlay), (view.public_ipv6, view.underlay6)):
        if address:
            parts.append(address + (f" on {where}" if where else ""))
    return ", ".join(parts)


def _health_text(problems: list[str]) -> str:
    return "ok" if not problems else "PROBLEM: " + "; ".join(problems)


def node_text(view: NodeView) -> str:
    lines = []
    title = f"node {view.name or '(no overlay state)'}"
    if view.public_ip:
        title += f"  {_node_addresses(view)}"
    lines.append(title)
    lines.append(f"  health: {_health_text(view.problems())}")
    if view.subnet:
        lines.append(
            f"  overlay: subnet {view.subnet} of {view.network}, gateway {view.gateway}, pod MTU {view.mtu}"
            + (", direct routing on" if view.direct_routing else "")
        )
    if view.subnet6:
        lines.append(f"  overlay IPv6: subnet {view.subnet6} of {view.network6}, gateway {view.gateway6}")
    for bridge in view.bridges:
        lines.append("")
        lines.append(
            f"bridge {bridge.name}  {', '.join(bridge.addresses) or 'no address'}  mac {bridge.mac}  "
            f"mtu {bridge.mtu}  {bridge.state.lower()}"
        )
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
        lines.append(
            f"vxlan {vx.name}  VNI {vx.vni}  UDP {vx.port}  local {vx.local or '?'}"
            f"{' via ' + vx.underlay if vx.underlay else ''}  {', '.join(vx.addresses)}  mac {vx.mac}  "
            f"mtu {vx.mtu}{learning}"
        )
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
    masq = sorted(
        {f"{', '.join(p.ips)} via {p.masquerade}" for p in view.pods if p.masquerade.startswith("pycni_masq")}
    )
    lines.append("  pycni_masq     " + ("; ".join(masq) or "(no entries)"))
    if view.notes:
        lines.append("")
        lines.append("notes")
        lines += [f"  - {note}" for note in view.notes]
    return "\n".join(lines)


def _lease_health(view: ClusterView, lease: LeaseView) -> str:
    if lease.problems:
        return "PROBLEM: " + "; ".join(lease.problems)
    return "ok" + (f" ({lease.mode})" if lease.mode and lease.mode != "this node" else "")


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
    judged = bool(view.seen_from) or any(l.problems for l in view.leases)
    if judged:
        columns.append(("HEALTH", lambda l: _lease_health(view, l)))
    rows = [tuple(title for title, _ in columns) + ("",)]
    for lease in view.leases:
        mark = "this node" if view.is_this_node(lease) else ""
        rows.append(tuple(value(lease) for _, value in columns) + (mark,))
    count = len(columns)
    widths = [max(len(r[i]) for r in rows) for i in range(count)]
    # The last column (HEALTH) is not padded: its width would only push "this node" away.
    lines += [
        "  ".join(r[i].ljust(widths[i]) if i < count - 1 or r[count] else r[i] for i in range(count))
        + ("  " + r[count] if r[count] else "")
        for r in rows
    ]
    if not view.leases:
        lines.append("(no leases)")
    if view.seen_from:
        lines.append(f"(health as seen from node {view.seen_from})")
    for rejected in view.rejected:
        lines.append(f"rejected {rejected.key}: {rejected.reason}")
    return "\n".join(line.rstrip() for line in lines)


# ---- Graphviz: pieces ----------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _id(prefix: str, name: str) -> str:
    return prefix + "_" + re.sub(r"[^A-Za-z0-9_]", "_", name)


def _wrap(text: str, width: int = WRAP) -> str:
    """``text`` escaped, broken into left-aligned lines of about ``width`` characters after ", " or a space
    (never inside an address or a MAC: a line holds whole words)."""
    words = re.split(r"(?<=,) |(?<=[^,]) (?=\S)", text)
    lines: list[str] = []
    for word in words:
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return '<BR ALIGN="LEFT"/>'.join(_e(line) for line in lines)


def _small(text: str) -> str:
    return f'<FONT POINT-SIZE="9" COLOR="#555555">{text}</FONT>'


def _mark(problems: list[str], ok_text: str = "ok") -> str:
    """The health mark: a green check and what was checked, or a red cross and the problems."""
    if not problems:
        return f'<FONT COLOR="{OK_COLOR}"><B>✓ {_e(ok_text)}</B></FONT>'
    return f'<FONT COLOR="{BAD_COLOR}"><B>✗</B> {_wrap("; ".join(problems), WRAP - 2)}</FONT>'


def _card(
    title: str, rows: Iterable[str], color: str, mark: str = "", healthy: bool = True, border: str = "#777777"
) -> str:
    """One box: a bold title, the health mark on a band of its own, then the rows."""
    cells = "".join(f'<TR><TD ALIGN="LEFT" BALIGN="LEFT">{row}</TD></TR>' for row in rows)
    band = ""
    if mark:
        band = f'<TR><TD ALIGN="LEFT" BALIGN="LEFT" BGCOLOR="{OK_FILL if healthy else BAD_FILL}">{mark}</TD></TR>'
    return (
        f'<TABLE BORDER="1" CELLBORDER="0" CELLSPACING="0" CELLPADDING="3" BGCOLOR="{color}" '
        f'COLOR="{border}"><TR><TD ALIGN="LEFT"><B>{title}</B></TD></TR>{band}{cells}</TABLE>'
    )


def _table(title: str, rows: Iterable[str], color: str, mark: str = "", healthy: bool = True) -> str:
    return f"<{_card(title, rows, color, mark, healthy)}>"


def _columns(count: int, most: int = GRID_COLUMNS) -> int:
    """Columns of a grid of ``count`` cards: about as many as rows (cards are wider than tall), at most ``most``."""
    return max(1, min(count, most, math.ceil(math.sqrt(count))))


def _grid(cards: list[str], columns: int) -> str:
    """Cards in rows of ``columns`` (an HTML-like table: the grid is exact whatever dot does)."""
    rows = []
    for start in range(0, len(cards), columns):
        cells = "".join(f'<TD VALIGN="TOP">{card}</TD>' for card in cards[start : start + columns])
        rows.append(f"<TR>{cells}</TR>")
    return f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="8" CELLPADDING="0">{"".join(rows)}</TABLE>>'


def _title(lines: list[str]) -> str:
    head, rest = lines[0], lines[1:]
    out = f'<FONT POINT-SIZE="15"><B>{head}</B></FONT>'
    return "<" + "<BR/>".join([out] + rest) + ">"


# ---- Graphviz: a node --------------------------------------------------------------------------


def _pod_card(pod: Pod) -> str:
    rows = [_e(", ".join(pod.addresses) or "no address")]
    if pod.pod_name and pod.container_id:
        rows.append(_small(f"container {_e(short_id(pod.container_id))}"))
    rows.append(_small(f"{_e(pod.ifname)}  mac {_e(pod.mac or '?')}  mtu {_e(pod.mtu or '?')}"))
    rows.append(_small(f"netns {_e(pod.netns_name or '?')}"))
    rows.append(_small(f"network {_e(pod.network or '?')}"))
    rows += [_small(f"hostPort {_e(m.describe())}") for m in pod.port_mappings]
    if pod.shaping:
        rows += [_small(_wrap(line)) for line in _shaping_lines(pod)]
    if pod.masquerade:
        rows.append(_small(_wrap(f"masquerade {pod.masquerade}")))
    return _table(f"pod {_e(pod.title)}", rows, COLORS["pod"])


def _shaping_lines(pod: Pod) -> list[str]:
    from .collect import rate

    shaping, lines = pod.shaping, []
    if shaping is None:
        return lines
    if shaping.ingress_bits is not None:
        lines.append(
            f"shaping to pod {rate(shaping.ingress_bits)}, burst {shaping.ingress_burst} B (tbf on {pod.host_veth})"
        )
    if shaping.egress_bits is not None:
        lines.append(
            f"shaping from pod {rate(shaping.egress_bits)}, burst {shaping.egress_burst} B (tbf on ifb {shaping.ifb})"
        )
    return lines


def _remote_card(remote: Remote) -> str:
    problems = remote.problems()
    rows = [_e(remote.public_ip or "?"), _small(f"subnet {_e(remote.subnet or '?')}")]
    if remote.subnet6:
        rows.append(_small(f"IPv6 subnet {_e(remote.subnet6)}"))
    if remote.direct or remote.direct6:
        hops = ", ".join(dict.fromkeys(h for h in (remote.direct, remote.direct6) if h))
        rows.append(_small(f"routed via {_e(hops)}" + (f" on {_e(remote.direct_dev)}" if remote.direct_dev else "")))
    if remote.needs_fdb:
        rows.append(_small(f"VTEP {_e(remote.vtep_mac or '?')}"))
        vteps = [
            a
            for a, direct in ((remote.vtep_address, remote.direct), (remote.vtep_address6, remote.direct6))
            if a and not direct
        ]
        rows.append(_small(f"VTEP address {_e(', '.join(vteps) or '?')}"))
    healthy = not problems
    return _card(
        f"node {_e(remote.node_name or '?')}",
        rows,
        COLORS["remote"] if healthy else COLORS["bad"],
        _mark(problems, f"ok · {remote.mode}"),
        healthy,
        "#777777" if healthy else BAD_COLOR,
    )


def _health_line(problems: list[str], ok_text: str) -> str:
    if not problems:
        return f'<FONT COLOR="{OK_COLOR}">✓ {_e(ok_text)}</FONT>'
    return f'<FONT COLOR="{BAD_COLOR}">✗ {_wrap("; ".join(problems), 70)}</FONT>'


def node_dot(view: NodeView) -> str:
    problems = view.problems()
    remotes = [r for vx in view.vxlans for r in vx.remotes]
    title = [f"pycni inspect: node {_e(view.name or '?')}"]
    if view.subnet:
        subnets = f"{view.subnet} of {view.network}" + (f", {view.subnet6} of {view.network6}" if view.subnet6 else "")
        title.append(
            _e(f"pod subnet {subnets}, pod MTU {view.mtu}") + (_e(", direct routing on") if view.direct_routing else "")
        )
    plural = "s" if len(remotes) != 1 else ""
    title.append(
        _health_line(problems, f"healthy, {len(remotes)} other node{plural} reachable" if remotes else "healthy")
    )
    out = [
        "digraph pycni {",
        f'  graph [rankdir=TB, newrank=true, fontname="{FONT}", fontsize=12, labelloc=t, label={_title(title)}, '
        'nodesep=0.3, ranksep=0.45, bgcolor="white", pad=0.25];',
        f'  node [shape=plain, fontname="{FONT}", fontsize=10];',
        f'  edge [fontname="{FONT}", fontsize=9, color="#666666", arrowsize=0.6];',
    ]
    node_label = f"node {view.name or '?'}  {_node_addresses(view)}".strip()
    mark = _health_line(view.own_problems, "node ok")
    out.append(
        f"  subgraph cluster_node {{ label=<<B>{_e(node_label)}</B><BR/>{mark}>; "
        f'style="rounded,filled"; fillcolor="{COLORS["node"]}"; '
        f'color="{"#999999" if not view.own_problems else BAD_COLOR}";'
    )
    pod_ids = {id(pod): _id("pod", str(i)) for i, pod in enumerate(view.pods)}
    for pod in view.pods:
        out.append(f"  {pod_ids[id(pod)]} [label={_pod_card(pod)}];")
    # Pods in rows of POD_COLUMNS above their bridge: each row one rank, rows stacked by invisible edges.
    groups = [[p for p in view.pods if p.bridge == b.name] for b in view.bridges] + [
        [p for p in view.pods if not p.bridge]
    ]
    for pods in groups:
        rows = [pods[i : i + POD_COLUMNS] for i in range(0, len(pods), POD_COLUMNS)]
        for row in rows:
            if len(row) > 1:
                out.append("  { rank=same; " + "; ".join(pod_ids[id(p)] for p in row) + "; }")
        for upper, lower in zip(rows, rows[1:]):
            for k, pod in enumerate(lower):
                out.append(f"  {pod_ids[id(upper[min(k, len(upper) - 1)])]} -> {pod_ids[id(pod)]} [style=invis];")
    for bridge in view.bridges:
        rows = [
            _e(", ".join(bridge.addresses) or "no address"),
            _small(f"mac {_e(bridge.mac)}  mtu {_e(bridge.mtu)}  {_e(bridge.state.lower())}"),
        ]
        out.append(f"  {_id('br', bridge.name)} [label={_table('bridge ' + _e(bridge.name), rows, COLORS['bridge'])}];")
    for vx in view.vxlans:
        rows = [
            _e(", ".join(vx.addresses) or "no address"),
            _small(f"VNI {_e(vx.vni)}  UDP {_e(vx.port)}  mtu {_e(vx.mtu)}"),
            _small(f"mac {_e(vx.mac)}"),
        ]
        out.append(f"  {_id('vx', vx.name)} [label={_table('vxlan ' + _e(vx.name), rows, COLORS['vxlan'])}];")
    underlays = _underlays(view)
    for name, addresses in underlays.items():
        rows = [_e(", ".join(addresses))]
        if len(view.overlay_members) > MEMBERS_SHOWN:
            rows.append(_small(f"VXLAN accepted from {len(view.overlay_members)} members (pycni_overlay)"))
        elif view.overlay_members:
            rows.append(_small(_wrap("VXLAN accepted from " + ", ".join(view.overlay_members))))
        out.append(f"  {_id('ul', name)} [label={_table('underlay ' + _e(name), rows, COLORS['underlay'])}];")
    level = [_id("vx", vx.name) for vx in view.vxlans] + [_id("ul", name) for name in underlays]
    if len(level) > 1:
        out.append("  { rank=same; " + "; ".join(level) + "; }")
    out.append("  }")
    for pod in view.pods:
        if pod.bridge:
            out.append(f'  {pod_ids[id(pod)]} -> {_id("br", pod.bridge)} [dir=both, label="{_e(pod.host_veth)}"];')
    for vx in view.vxlans:
        for bridge in view.bridges:
            out.append(f'  {_id("br", bridge.name)} -> {_id("vx", vx.name)} [style=dashed, label="routed"];')
        underlay = _underlay_of(vx, view, underlays)
        if underlay:
            out.append(f'  {_id("vx", vx.name)} -> {_id("ul", underlay)} [label="encap UDP {_e(vx.port)}"];')
        if not vx.remotes:
            continue
        key = _id("remotes", vx.name)
        cards = [_remote_card(remote) for remote in vx.remotes]
        out.append(f"  {key} [label={_grid(cards, _columns(len(cards)))}];")
        bad = [r for r in vx.remotes if not r.healthy]
        count = f"{len(vx.remotes)} other node{'s' if len(vx.remotes) != 1 else ''}"
        label = f"{vx.name}: {count}" + (f", {len(bad)} unhealthy" if bad else "")
        source = _id("ul", underlay) if underlay else _id("vx", vx.name)
        color = BAD_COLOR if bad else "#666666"
        out.append(f'  {source} -> {key} [color="{color}", fontcolor="{color}", label="{_e(label)}"];')
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


# ---- Graphviz: the cluster -----------------------------------------------------------------------


def _lease_card(view: ClusterView, lease: LeaseView) -> str:
    this = view.is_this_node(lease)
    rows = [_e(", ".join(lease.addresses))]
    rows += [_small(f"pod subnet {_e(subnet)}") for subnet in lease.subnets]
    rows.append(_small(f"VTEP {_e(lease.vtep_mac)}"))
    if lease.vtep_mac6:
        rows.append(_small(f"IPv6 VTEP {_e(lease.vtep_mac6)}"))
    if lease.mode:  # judged from a node
        ok = f"ok · {lease.mode}"
    else:  # the store alone: the lease is valid and clashes with none
        ok = "lease ok"
    healthy = lease.healthy
    color = (COLORS["this"] if this else COLORS["remote"]) if healthy else COLORS["bad"]
    title = "node " + _e(lease.node_name or "?") + (" (this node)" if this else "")
    return _card(title, rows, color, _mark(lease.problems, ok), healthy, "#777777" if healthy else BAD_COLOR)


def _rejected_card(key: str, reason: str) -> str:
    return _card(_e(key), [_small(_wrap(reason))], COLORS["bad"], _mark(["rejected by every agent"]), False, BAD_COLOR)


def _store_lines(store: str, width: int = 70) -> list[str]:
    """The store URL, split at "/" or "," onto lines of about ``width`` characters (a file store's path is long)."""
    parts = re.split(r"(?<=[/,])", store)
    lines = [""]
    for part in parts:
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return [_e(line) for line in lines]


def cluster_dot(view: ClusterView) -> str:
    bad = [l for l in view.leases if not l.healthy]
    title = ["pycni cluster"]
    if view.networks:
        title += [_e(pool) for pool in view.pools()]
        title.append(
            _e(f"VXLAN VNI {view.vni} on UDP {view.port}")
            + (_e(", direct routing on one underlay subnet") if view.direct_routing else "")
        )
    else:
        title.append(_e("no cluster configuration (run `pycni cluster init`)"))
    store = _store_lines(f"{len(view.leases)} node(s) in {view.store}")
    title += store
    problems = [f"{len(bad)} of {len(view.leases)} nodes unhealthy"] if bad else []
    if view.rejected:
        problems.append(f"{len(view.rejected)} lease key(s) rejected")
    if view.seen_from:
        problems = [f"{p} (seen from node {view.seen_from})" for p in problems]
        ok = f"all {len(view.leases)} nodes healthy (seen from node {view.seen_from})"
    else:
        ok = f"all {len(view.leases)} leases valid (run on a node to check its entries too)"
    title.append(_health_line(problems, ok if view.leases else "no nodes"))
    cards = [_lease_card(view, lease) for lease in view.leases]
    cards += [_rejected_card(r.key, r.reason) for r in view.rejected]
    out = [
        "graph pycni_cluster {",
        f'  graph [fontname="{FONT}", fontsize=12, labelloc=t, label={_title(title)}, bgcolor="white", pad=0.25];',
        f'  node [shape=plain, fontname="{FONT}", fontsize=10];',
    ]
    if cards:
        out.append(f"  nodes [label={_grid(cards, _columns(len(cards)))}];")
    else:
        out.append('  nodes [label="(no leases)"];')
    out.append("}")
    return "\n".join(out) + "\n"


# ---- running Graphviz ------------------------------------------------------------------------


def _dot(exe: str, args: list[str], source: bytes) -> bytes:
    try:
        done = subprocess.run([exe, *args], input=source, capture_output=True, timeout=DOT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RenderError(f"Graphviz took longer than {DOT_TIMEOUT}s") from None
    if done.returncode != 0:
        raise RenderError(f"Graphviz failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def layout_size(plain: bytes) -> tuple[float, float]:
    """(width, height) in inches from `dot -Tplain` output ("graph SCALE WIDTH HEIGHT" on its first line)."""
    first = plain.split(b"\n", 1)[0].split()
    if len(first) < 4 or first[0] != b"graph":
        raise RenderError("Graphviz printed no layout size")
    return float(first[2]), float(first[3])


def graphviz(dot_source: str, fmt: str, max_aspect: float | None = MAX_ASPECT) -> bytes:
    """Run Graphviz's `dot` on the source; SVG or PNG bytes, no wider than ``max_aspect`` (width:height).

    The layout is measured first (`-Tplain`); a drawing that is still too wide
    is laid out again with Graphviz's ``ratio`` set to 1/max_aspect, which
    spreads it vertically (the text keeps its size).
    """
    if fmt not in GRAPHVIZ_FORMATS:
        raise RenderError(f"unknown picture format {fmt!r}")
    exe = shutil.which("dot")
    if exe is None:
        raise RenderError(
            "Graphviz is not installed (Debian: apt-get install graphviz); --format text, json and dot work without it"
        )
    source = dot_source.encode()
    args = [f"-T{fmt}"] + (["-Gdpi=96"] if fmt == "png" else [])
    if max_aspect:
        width, height = layout_size(_dot(exe, ["-Tplain"], source))
        if height > 0 and width / height > max_aspect:
            # A little under the limit: the margins (pad) are added around the stretched drawing.
            args.append(f"-Gratio={1.02 / max_aspect:.4f}")
    return _dot(exe, args, source)
