"""Reading a resolv.conf-style file into a CNI result's dns block (ipam.resolvConf)."""

from __future__ import annotations

from cni_plugins.spec.errors import ERR_IO, CNIError
from cni_plugins.spec.types import DNS


def parse_resolv_conf_text(text: str) -> DNS:
    """nameserver lines add servers, domain sets the domain (last one wins),
    search and options lines add their words; comments (# or ;) are skipped."""
    dns = DNS()
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        words = line.split()
        if len(words) < 2:
            continue
        keyword, values = words[0], words[1:]
        if keyword == "nameserver":
            dns.nameservers.append(values[0])
        elif keyword == "domain":
            dns.domain = values[0]
        elif keyword == "search":
            dns.search.extend(values)
        elif keyword == "options":
            dns.options.extend(values)
    return dns


def parse_resolv_conf(path: str) -> DNS:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return parse_resolv_conf_text(handle.read())
    except OSError as exc:
        raise CNIError(
            ERR_IO,
            f"cannot read resolvConf {path}: {exc.strerror}",
            "ipam.resolvConf must name a readable resolv.conf-style file",
        ) from None
