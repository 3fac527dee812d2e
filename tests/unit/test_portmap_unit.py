"""portmap: configuration parsing, address choice, ownership and the nftables script."""

import hashlib
import json
import subprocess
import sys

import pytest

from cni_plugins.kernel import hostcmd, nft
from cni_plugins.portmap import config as portmap
from cni_plugins.portmap import hostside
from cni_plugins.portmap import ipt as portmap_ipt
from cni_plugins.portmap import nft as portmap_nft
from cni_plugins.portmap.owner import Owner
from cni_plugins.spec.errors import CNIError
from cni_plugins.spec.types import Result

PREV = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/var/run/netns/p"}],
    "ips": [
        {"address": "10.1.0.1/24", "interface": 0},
        {"address": "10.88.0.5/24", "interface": 2},
        {"address": "10.88.0.6/24", "interface": 2},
        {"address": "fd88::5/64", "interface": 2},
    ],
}


def conf(**extra):
    base = {
        "cniVersion": "1.0.0",
        "name": "net1",
        "type": "portmap",
        "runtimeConfig": {"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]},
    }
    base.update(extra)
    return base


def code_of(raw) -> int:
    with pytest.raises(CNIError) as info:
        portmap.parse_config(raw)
    return info.value.code


def test_defaults_follow_the_reference():
    cfg = portmap.parse_config(conf())
    assert (cfg.snat, cfg.masq_all, cfg.mark_bit, cfg.mark) == (True, False, 13, 0x2000)
    assert cfg.backend == "nftables" and cfg.external_set_mark_chain is None
    assert cfg.mappings == [portmap.PortMapping(8080, 80, "tcp", "")]


def test_protocol_is_case_insensitive_and_defaults_to_tcp():
    cfg = portmap.parse_config(
        conf(
            runtimeConfig={
                "portMappings": [
                    {"hostPort": 1, "containerPort": 2, "protocol": "UDP"},
                    {"hostPort": 3, "containerPort": 4},
                ]
            }
        )
    )
    assert [m.protocol for m in cfg.mappings] == ["udp", "tcp"]


def test_duplicate_mapping_keeps_the_first():
    maps = [
        {"hostPort": 1, "containerPort": 2, "protocol": "tcp"},
        {"hostPort": 1, "containerPort": 3, "protocol": "tcp"},
    ]
    cfg = portmap.parse_config(conf(runtimeConfig={"portMappings": maps}))
    assert [m.container_port for m in cfg.mappings] == [2]


def test_host_ip_is_normalised_and_wildcards_recognised():
    cfg = portmap.parse_config(
        conf(
            runtimeConfig={
                "portMappings": [
                    {"hostPort": 1, "containerPort": 2, "protocol": "tcp", "hostIP": "FD00:0::1"},
                    {"hostPort": 1, "containerPort": 2, "protocol": "tcp", "hostIP": "0.0.0.0"},
                ]
            }
        )
    )
    v6, any4 = cfg.mappings
    assert v6.host_ip == "fd00::1" and not v6.wildcard() and v6.applies_to(6) and not v6.applies_to(4)
    assert any4.wildcard() and any4.applies_to(4) and not any4.applies_to(6)


@pytest.mark.parametrize(
    "extra, code",
    [
        ({"markMasqBit": 32}, 7),
        ({"markMasqBit": True}, 7),
        ({"markMasqBit": 1, "externalSetMarkChain": "X"}, 7),
        ({"snat": "yes"}, 7),
        ({"backend": "ipfw"}, 7),
        ({"backend": "nftables", "externalSetMarkChain": "KUBE-MARK-MASQ"}, 7),
        ({"backend": "iptables", "conditionsV4": ["ip saddr 1.2.3.4"]}, 7),
        ({"externalSetMarkChain": "A B"}, 7),
        ({"conditionsV4": "ip saddr 1.2.3.4"}, 7),
        ({"conditionsV4": ["ip saddr 1.2.3.4;", "flush ruleset"]}, 7),
        ({"conditionsV6": ["ip6 saddr ::1 # comment"]}, 7),
        ({"conditionsV4": ["ip saddr 1.2.3.4 jump elsewhere"]}, 7),
        ({"conditionsV4": ['meta iifname "eth0']}, 7),
        ({"backend": "iptables", "conditionsV4": ["-s", "1.2.3.4", "--jump", "ACCEPT"]}, 7),
        ({"runtimeConfig": {"portMappings": [{"hostPort": 0, "containerPort": 80}]}}, 7),
        ({"runtimeConfig": {"portMappings": [{"hostPort": 65536, "containerPort": 80}]}}, 7),
        ({"runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]}}, 2),
        ({"runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "hostIP": "1.2.3.4 }"}]}}, 7),
        ({"runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80, "hostIP": "fe80::1%eth0"}]}}, 7),
        ({"runtimeConfig": {"portMappings": "80:80"}}, 7),
        ({"runtimeConfig": {"portMappings": ["80:80"]}}, 7),
    ],
)
def test_bad_options_are_rejected(extra, code):
    assert code_of(conf(**extra)) == code


def test_backend_follows_iptables_only_options_when_not_named():
    assert portmap.parse_config(conf(conditionsV4=["-s", "1.2.3.4"])).backend == "iptables"
    assert portmap.parse_config(conf(externalSetMarkChain="KUBE-MARK-MASQ")).backend == "iptables"
    assert portmap.parse_config(conf(conditionsV4=["ip saddr 1.2.3.4"])).backend == "nftables"
    assert portmap.parse_config(conf(conditionsV4=[""])).backend == "nftables"


def test_targets_are_the_first_sandbox_address_per_family():
    targets = portmap.container_targets(Result.from_dict(PREV), "eth0")
    assert str(targets.v4) == "10.88.0.5/24" and str(targets.v6) == "fd88::5/64"
    assert portmap.container_targets(Result.from_dict(PREV), "eth1").items() == []
    no_iface = {"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/8"}]}
    assert str(portmap.container_targets(Result.from_dict(no_iface), "eth0").v4) == "10.0.0.2/8"


def test_owner_comment_is_keyed_safe_and_short():
    owner = Owner("net1", "c" * 200, 'e"t;h}0')
    assert owner.comment.startswith(owner.key + " ")
    assert len(owner.comment) <= 120
    assert all(ch.isalnum() or ch in " _.:/-" for ch in owner.comment)
    assert Owner("net1", "a", "eth0").key != Owner("net1", "a", "eth1").key
    assert Owner("net1", "ab", "c").key != Owner("net1a", "b", "c").key


def test_nft_network_rules_carry_conditions_mark_and_masquerade():
    cfg = portmap.parse_config(conf(conditionsV4=['iifname != "lo"'], markMasqBit=4))
    lines = portmap_nft._network_rules(cfg, portmap_nft.Names("0123456789ab"))
    text = "\n".join(lines)
    assert 'meta nfproto ipv4 iifname != "lo" ip saddr @n0123456789ab_src4' in text
    assert "meta mark set meta mark | 0x10" in text
    assert "meta mark and 0x10 == 0x10 masquerade" in text
    assert all("iifname" not in line for line in lines if "ipv6" in line)
    no_snat = "\n".join(
        portmap_nft._network_rules(portmap.parse_config(conf(snat=False)), portmap_nft.Names("0123456789ab"))
    )
    assert "masquerade" not in no_snat and "mark" not in no_snat
    masq_all = "\n".join(
        portmap_nft._network_rules(portmap.parse_config(conf(masqAll=True)), portmap_nft.Names("0123456789ab"))
    )
    assert "saddr @" not in masq_all and "meta mark set" in masq_all


def test_nft_desired_elements_split_by_host_ip():
    maps = [
        {"hostPort": 1, "containerPort": 2, "protocol": "tcp"},
        {"hostPort": 3, "containerPort": 4, "protocol": "udp", "hostIP": "192.0.2.1"},
        {"hostPort": 5, "containerPort": 6, "protocol": "sctp", "hostIP": "2001:db8::1"},
    ]
    cfg = portmap.parse_config(conf(runtimeConfig={"portMappings": maps}))
    names = portmap_nft.Names("0123456789ab")
    wanted = portmap_nft._desired_elements(cfg, names, portmap.container_targets(Result.from_dict(PREV), "eth0"))
    E = portmap_nft.Element
    assert wanted == {
        names.any(4): [E(("tcp", "1"), ("10.88.0.5", "2"))],
        names.hip(4): [E(("192.0.2.1", "udp", "3"), ("10.88.0.5", "4"))],
        names.any(6): [E(("tcp", "1"), ("fd88::5", "2"))],
        names.hip(6): [E(("2001:db8::1", "sctp", "5"), ("fd88::5", "6"))],
    }
    assert (
        portmap_nft._elem_text(("tcp", "1"), ("10.88.0.5", "2"), "k x") == '{ tcp . 1 comment "k x" : 10.88.0.5 . 2 }'
    )


def _listed(item):
    """One element of an `nft -j` map or set listing, parsed as portmap reads it."""
    (listed,) = nft.elements({"elem": [item]})
    return portmap_nft._element(listed)


def test_nft_listing_is_parsed():
    item = [
        {"elem": {"val": {"concat": ["10.1.1.1", "tcp", 8080]}, "comment": "abcd net/c/eth0"}},
        {"concat": ["10.22.0.5", 80]},
    ]
    assert _listed(item) == portmap_nft.Element(("10.1.1.1", "tcp", "8080"), ("10.22.0.5", "80"), "abcd")
    assert _listed({"prefix": {"addr": "10.0.0.0", "len": 8}}).key == ("10.0.0.0/8",)
    with pytest.raises(ValueError):
        _listed(["1.2.3.4 } ; flush ruleset", "x"])


def test_iptables_chain_name_matches_the_reference_scheme():
    name = portmap_ipt.dnat_chain_name("net1", "ctr")
    assert name == ("CNI-DN-" + hashlib.sha512(b"net1ctr").hexdigest())[:28] and len(name) == 28
    assert name == "CNI-DN-af904b857e2a422e5919e"


def test_nft_names_and_owner_keys_are_stable():
    """Names that are already in nftables tables on nodes: they must never change."""
    assert portmap_nft.network_hash("net1") == hashlib.sha256(b"net1").hexdigest()[:12] == "6c270ef2f251"
    assert Owner("net1", "ctr", "eth0").key == "8092b25ff5cd9930"


def _tool_error(**kwargs):
    return hostcmd.HostToolError("conntrack failed", **kwargs)


@pytest.mark.parametrize(
    "error, warnings",
    [
        (None, 0),
        (_tool_error(returncode=1, stderr="0 flow entries have been deleted."), 0),
        (_tool_error(returncode=2, stderr="bad"), 2),  # one per UDP port, and the next port is tried
        (_tool_error(missing=True), 1),  # the next port would fare no better
    ],
)
def test_conntrack_flush_failures_are_request_diagnostics(monkeypatch, error, warnings):
    calls = []

    def run(argv, stdin=None, timeout=0, alternative=""):
        calls.append(argv)
        if error is not None:
            raise error
        return ""

    monkeypatch.setattr(hostcmd, "run", run)
    maps = [
        {"hostPort": 53, "containerPort": 53, "protocol": "udp"},
        {"hostPort": 54, "containerPort": 54, "protocol": "udp"},
        {"hostPort": 80, "containerPort": 80, "protocol": "tcp"},
    ]
    said = []
    hostside.flush_udp_conntrack(portmap.parse_config(conf(runtimeConfig={"portMappings": maps})), 4, said.append)
    assert len(said) == warnings
    assert calls[0] == ["conntrack", "-D", "-f", "ipv4", "-p", "udp", "--orig-port-dst", "53"]
    assert len(calls) == (1 if error is not None and error.missing else 2)


def test_backends_import_the_configuration_not_the_plugin():
    """No import cycle: each backend stands on portmap.config alone."""
    code = (
        "import sys\n"
        "import cni_plugins.portmap.nft, cni_plugins.portmap.ipt\n"
        "assert 'cni_plugins.portmap.plugin' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True, timeout=30)


def test_iptables_container_chain_rules():
    maps = [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 53, "containerPort": 5353, "protocol": "udp", "hostIP": "192.0.2.1"},
    ]
    cfg = portmap.parse_config(
        conf(backend="iptables", runtimeConfig={"portMappings": maps}, conditionsV4=["-i", "eth0"])
    )
    owner = Owner("net1", "ctr", "eth0")
    targets = portmap.container_targets(Result.from_dict(PREV), "eth0")
    chain = portmap_ipt._container_chain(cfg, owner, 4, targets.v4)
    assert chain.entry_rules == [
        [
            "-m",
            "comment",
            "--comment",
            'dnat name: "net1" id: "ctr"',
            "-m",
            "multiport",
            "-p",
            "tcp",
            "--destination-ports",
            "8080",
            "-i",
            "eth0",
        ],
        [
            "-m",
            "comment",
            "--comment",
            'dnat name: "net1" id: "ctr"',
            "-m",
            "multiport",
            "-p",
            "udp",
            "--destination-ports",
            "53",
            "-i",
            "eth0",
        ],
    ]
    assert chain.rules == [
        ["-p", "tcp", "--dport", "8080", "-s", "10.88.0.0/24", "-j", "CNI-HOSTPORT-SETMARK"],
        ["-p", "tcp", "--dport", "8080", "-s", "127.0.0.1", "-j", "CNI-HOSTPORT-SETMARK"],
        ["-p", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", "10.88.0.5:80"],
        ["-p", "udp", "--dport", "53", "-d", "192.0.2.1", "-s", "10.88.0.0/24", "-j", "CNI-HOSTPORT-SETMARK"],
        ["-p", "udp", "--dport", "53", "-d", "192.0.2.1", "-s", "127.0.0.1", "-j", "CNI-HOSTPORT-SETMARK"],
        ["-p", "udp", "--dport", "53", "-d", "192.0.2.1", "-j", "DNAT", "--to-destination", "10.88.0.5:5353"],
    ]
    v6 = portmap_ipt._container_chain(cfg, owner, 6, targets.v6)
    assert v6.rules == [
        ["-p", "tcp", "--dport", "8080", "-s", "fd88::/64", "-j", "CNI-HOSTPORT-SETMARK"],
        ["-p", "tcp", "--dport", "8080", "-j", "DNAT", "--to-destination", "[fd88::5]:80"],
    ]


def test_multiport_lists_hold_at_most_fifteen_ports():
    maps = [{"hostPort": 1000 + n, "containerPort": 80, "protocol": "tcp"} for n in range(20)]
    cfg = portmap.parse_config(conf(backend="iptables", runtimeConfig={"portMappings": maps}))
    targets = portmap.container_targets(Result.from_dict(PREV), "eth0")
    chain = portmap_ipt._container_chain(cfg, Owner("n", "c", "e"), 4, targets.v4)
    assert [len(r[r.index("--destination-ports") + 1].split(",")) for r in chain.entry_rules] == [15, 5]


def test_version_loads_no_backend_or_tool_modules():
    """VERSION is start-up cost only: no firewall backend, subprocess, logging, hashing or addresses."""
    code = (
        "import sys\n"
        "from cni_plugins.spec.skel import dispatch\n"
        "from cni_plugins import portmap\n"
        "out = dispatch(portmap.FUNCS, {'CNI_COMMAND': 'VERSION'}, b'')\n"
        "assert out.exit_code == 0 and '1.1.0' in out.stdout, out\n"
        "heavy = ('cni_plugins.portmap.plugin', 'cni_plugins.portmap.config', 'cni_plugins.portmap.hostside',\n"
        "         'cni_plugins.portmap.nft', 'cni_plugins.portmap.ipt', 'cni_plugins.kernel.nft', 'subprocess',\n"
        "         'logging', 'hashlib', 'ipaddress')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True, timeout=30)


def test_nft_read_state_reads_maps_and_tolerates_merged_source_ranges(monkeypatch):
    """auto-merge lists adjacent pod subnets of a source set as one range; reading must not fail on it."""
    names = portmap_nft.Names("0123456789ab")
    listing = [
        {"chain": {"name": names.dnat}},
        {
            "set": {
                "name": names.src(4),
                "elem": [{"range": ["10.88.0.0", "10.88.2.255"]}, {"prefix": {"addr": "127.0.0.0", "len": 8}}],
            }
        },
        {
            "map": {
                "name": names.any(4),
                "elem": [
                    [
                        {"elem": {"val": {"concat": ["tcp", 8080]}, "comment": "k1 pmnet/c/eth0"}},
                        {"concat": ["10.88.0.5", 80]},
                    ]
                ],
            }
        },
        {"rule": {"chain": "prerouting", "expr": [{"jump": {"target": names.dnat}}]}},
    ]
    monkeypatch.setattr(nft, "list_json", lambda *what: listing)
    state = portmap_nft.read_state()
    assert state.exists and state.networks == {"0123456789ab"}
    assert state.elements == {names.any(4): [portmap_nft.Element(("tcp", "8080"), ("10.88.0.5", "80"), "k1")]}
    assert state.jumps == {"prerouting": {names.dnat}}
    monkeypatch.setattr(nft, "list_json", lambda *what: None)
    assert portmap_nft.read_state() == portmap_nft.TableState()


def test_add_without_mappings_loads_no_backend():
    """portmap's most common call (a pod without host ports) passes prevResult through without
    loading the backends, host tools, hashing or subprocess."""
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c1",
        "CNI_NETNS": "/var/run/netns/nowhere",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
    }
    stdin = json.dumps(conf(runtimeConfig={}, prevResult=PREV)).encode()
    code = (
        "import json, sys\n"
        "from cni_plugins.spec.skel import dispatch\n"
        "from cni_plugins import portmap\n"
        f"out = dispatch(portmap.FUNCS, {env!r}, {stdin!r})\n"
        f"assert out.exit_code == 0 and json.loads(out.stdout)['ips'] == {PREV['ips']!r}, out\n"
        "assert 'cni_plugins.portmap.plugin' in sys.modules\n"
        "heavy = ('cni_plugins.portmap.hostside', 'cni_plugins.portmap.nft', 'cni_plugins.portmap.ipt',\n"
        "         'cni_plugins.portmap.owner', 'subprocess', 'hashlib', 'logging')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True, timeout=30)
