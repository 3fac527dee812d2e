"""Unit tests for the masquerade module and its nft/iptables helpers (no root, no kernel).

`nft` and `iptables` are replaced by fakes that record what would be run.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest

from cni_plugins.kernel import iptables
from cni_plugins.shared import masq
from cni_plugins.kernel import nft
from cni_plugins.spec.errors import CNIError
from cni_plugins.shared.masq import (
    Owner,
    gc_masq,
    iptables_chain,
    iptables_comment,
    parse_addresses,
    setup_masq,
    subnet_chain,
    teardown_masq,
)


@pytest.fixture(autouse=True)
def no_real_commands(monkeypatch, tmp_path):
    """Fail any real subprocess; take a lock name of this test's own (never the real one)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected command: {args}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(masq, "LOCK_NAME", f"pycni-test-masq-{os.urandom(6).hex()}")


class FakeNft:
    """Stands in for `nft`: serves a listing of our table and records applied scripts."""

    def __init__(self, elements: list[tuple[str, str, str]] | None = None, chains=("postrouting",)):
        self.table = None
        if elements is not None:
            objs = [{"table": {"family": "inet", "name": masq.TABLE}}]
            for fam, name in masq.POD_MAPS.items():
                elems = [
                    [{"elem": {"val": ip, "comment": note}}, {"jump": {"target": target}}]
                    for ip, note, target in elements
                    if (":" in ip) == (fam == 6)
                ]
                objs.append({"map": {"family": "inet", "table": masq.TABLE, "name": name, "elem": elems}})
            for chain in set(chains) | {t for _, _, t in elements}:
                objs.append({"chain": {"family": "inet", "table": masq.TABLE, "name": chain}})
            self.table = {"nftables": [{"metainfo": {}}, *objs]}
        self.scripts: list[str] = []

    def run(self, args, stdin=None):
        if args[:2] == ["-j", "list"]:
            if self.table is None:
                raise nft.NftError("nft list failed", "Error: No such file or directory", not_found=True)
            return json.dumps(self.table)
        assert args == ["-f", "-"], args
        self.scripts.append(stdin)
        return ""


@pytest.fixture
def fake_nft(monkeypatch):
    def install(*args, **kwargs):
        fake = FakeNft(*args, **kwargs)
        monkeypatch.setattr(nft, "run", fake.run)
        return fake

    return install


def note(network, cid, ifname):
    return Owner(network, cid, ifname).nft_comment


# ---- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "network, cid, ifname, code",
    [
        ("net1; flush ruleset", "c", "eth0", 7),
        ('a"b', "c", "eth0", 7),
        ("net\n1", "c", "eth0", 7),
        ("", "c", "eth0", 7),
        ("net1", 'c"; flush ruleset', "eth0", 4),
        ("net1", "c}", "eth0", 4),
        ("net1", "", "eth0", 3),
        ("net1", "c", 'e"th0', 4),
        ("net1", "c", "e\\th0", 4),
        ("net1", "c", "eth;0", 4),
        ("net1", "c", "eth 0", 4),
        ("net1", "c", "a/b", 4),
        ("net1", "c", "x" * 16, 4),
    ],
)
def test_bad_names_are_rejected_before_any_command_runs(network, cid, ifname, code):
    for call in (
        lambda: setup_masq(network, cid, ifname, ["10.88.0.5/24"]),
        lambda: teardown_masq(network, cid, ifname),
        lambda: masq.check_masq(network, cid, ifname, ["10.88.0.5/24"], "iptables"),
    ):
        with pytest.raises(CNIError) as info:
            call()
        assert info.value.code == code


def test_a_bare_address_is_a_host_subnet():
    assert parse_addresses(["10.88.0.5"])[0].subnet.prefixlen == 32


@pytest.mark.parametrize(
    "addresses", [["10.88.0.5/33"], ["10.88.0.5/24 "], ["fe80::1%eth0/64"], ["x"], [None], "10.88.0.5/24", None]
)
def test_bad_addresses_are_config_errors(addresses):
    with pytest.raises(CNIError) as info:
        setup_masq("net1", "c", "eth0", addresses)
    assert info.value.code == 7


def test_unknown_backend_is_code_7():
    with pytest.raises(CNIError) as info:
        setup_masq("net1", "c", "eth0", ["10.88.0.5/24"], backend="pf")
    assert info.value.code == 7 and "pf" in info.value.msg
    with pytest.raises(CNIError) as info:
        gc_masq("net1", [], backend="")
    assert info.value.code == 7


def test_parse_addresses_keeps_address_and_subnet_and_drops_duplicates():
    pods = parse_addresses(["10.88.0.5/24", "fd00::5/64", "10.88.0.5/24"])
    assert [(str(p.ip), str(p.subnet), p.family) for p in pods] == [
        ("10.88.0.5", "10.88.0.0/24", 4),
        ("fd00::5", "fd00::/64", 6),
    ]


# ---- names ---------------------------------------------------------------------


def test_iptables_names_match_the_reference():
    # Test vectors of the reference's pkg/utils.
    assert iptables_chain("test", "1234") == "CNI-2bbe0c48b91a7d1b8a6753a8"
    assert iptables_chain("testalongnamethatdoesnotmakesense", "1234") == "CNI-374f33fe84ab0ed84dcdebe3"
    assert iptables_comment("net1", "abc") == 'name: "net1" id: "abc"'


def test_subnet_chain_names():
    import ipaddress

    assert subnet_chain(ipaddress.ip_network("10.88.0.0/24")) == "net4_0a580000_24"
    assert subnet_chain(ipaddress.ip_network("fd00::/64")) == "net6_fd000000000000000000000000000000_64"
    assert nft.identifier(subnet_chain(ipaddress.ip_network("fd00::/64")))


def test_owner_tag_starts_with_the_network_and_tells_attachments_apart():
    a, b, c = Owner("n", "c1", "eth0"), Owner("n", "c1", "net1"), Owner("m", "c1", "eth0")
    assert a.tag.split("-")[0] == b.tag.split("-")[0] == masq.network_tag("n")
    assert len({a.tag, b.tag, c.tag}) == 3
    assert a.nft_comment == f"{a.tag} n c1 eth0"


# ---- nft helper ------------------------------------------------------------------


@pytest.mark.parametrize("text", ['a"b', "a;b", "a{b", "a}b", "a\nb", "a#b", "a$b", "a\\b", "a\tb", "é"])
def test_nft_comment_refuses_what_could_end_the_string(text):
    with pytest.raises(CNIError) as info:
        nft.comment(text)
    assert info.value.code == 7


def test_nft_comment_quotes_and_truncates():
    assert nft.comment("abc def") == '"abc def"'
    assert nft.comment("x" * 200) == '"' + "x" * 128 + '"'


@pytest.mark.parametrize("name", ["pycni_masq", "net4_0a580000_24", "_x"])
def test_nft_identifier_accepts_plain_names(name):
    assert nft.identifier(name) == name


@pytest.mark.parametrize("name", ["", "1abc", "a-b", "a b", "a;b", 'a"', "x" * 65])
def test_nft_identifier_refuses_others(name):
    with pytest.raises(CNIError):
        nft.identifier(name)


def test_nft_elements_parses_maps_and_sets():
    listed = {
        "elem": [
            [{"elem": {"val": "10.0.0.1", "comment": "hi"}}, {"jump": {"target": "c1"}}],
            ["10.0.0.2", {"goto": {"target": "c2"}}],
            [{"elem": {"val": "10.0.0.3"}}, {"accept": None}],
        ]
    }
    got = nft.elements(listed)
    assert [(e.key, e.comment, e.jump_target) for e in got] == [
        ("10.0.0.1", "hi", "c1"),
        ("10.0.0.2", None, "c2"),
        ("10.0.0.3", None, None),
    ]
    assert [(e.key, e.comment) for e in nft.elements({"elem": ["10.0.0.9", {"elem": {"val": "10.0.0.8"}}]})] == [
        ("10.0.0.9", None),
        ("10.0.0.8", None),
    ]
    assert nft.elements({}) == []


def test_nft_run_reports_a_missing_binary(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("nft")

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(nft.NftError, match="not found"):
        nft.apply("add table inet x\n")
    teardown_masq("net1", "c", "eth0")  # DEL where nft is missing: nothing of ours can exist


def test_nft_list_json_maps_not_found_to_none(monkeypatch):
    def fake(argv, **kwargs):
        return subprocess.CompletedProcess(argv, 1, "", "Error: No such file or directory\nlist table inet x")

    monkeypatch.setattr(subprocess, "run", fake)
    assert nft.list_json("table", "inet", "x") is None


# ---- nftables backend with a fake nft ---------------------------------------------------


def test_setup_writes_one_transaction_with_elements_and_shared_rules(fake_nft):
    fake = fake_nft()
    setup_masq("net1", "c1", "eth0", ["10.88.0.5/24", "fd00::5/64"])
    (script,) = fake.scripts
    lines = script.splitlines()
    assert "add rule inet pycni_masq postrouting ip daddr 224.0.0.0/4 return" in lines
    assert "add rule inet pycni_masq postrouting ip6 daddr ff00::/8 return" in lines
    assert "add rule inet pycni_masq postrouting ip saddr vmap @pods4" in lines
    assert "add rule inet pycni_masq net4_0a580000_24 ip daddr != 10.88.0.0/24 masquerade" in lines
    assert (
        f'add element inet pycni_masq pods4 {{ 10.88.0.5 comment "{note("net1", "c1", "eth0")}" '
        f": jump net4_0a580000_24 }}"
    ) in lines
    assert any(line.startswith("add element inet pycni_masq pods6 { fd00::5 ") for line in lines)
    assert not any(line.startswith("delete") for line in lines)


def test_setup_replaces_a_stale_owner_and_its_own_old_addresses(fake_nft):
    fake = fake_nft(
        [
            ("10.88.0.5", note("net1", "old", "eth0"), "net4_0a580000_24"),
            ("10.77.0.9", note("net1", "c1", "eth0"), "net4_0a4d0000_24"),
        ]
    )
    setup_masq("net1", "c1", "eth0", ["10.88.0.5/24"])
    lines = fake.scripts[0].splitlines()
    assert "delete element inet pycni_masq pods4 { 10.88.0.5 }" in lines
    assert "delete element inet pycni_masq pods4 { 10.77.0.9 }" in lines
    assert "delete chain inet pycni_masq net4_0a4d0000_24" in lines  # nothing jumps there any more
    assert "delete chain inet pycni_masq net4_0a580000_24" not in lines
    assert lines[-1].startswith("add element inet pycni_masq pods4 { 10.88.0.5 ")


def test_teardown_deletes_only_the_attachments_elements(fake_nft):
    fake = fake_nft(
        [
            ("10.88.0.5", note("net1", "c1", "eth0"), "net4_0a580000_24"),
            ("fd00::5", note("net1", "c1", "eth0"), "net6_fd000000000000000000000000000000_64"),
            ("10.88.0.6", note("net1", "c2", "eth0"), "net4_0a580000_24"),
            ("10.88.0.7", note("net1", "c1", "net1"), "net4_0a580000_24"),
            ("10.88.0.8", note("net2", "c1", "eth0"), "net4_0a580000_24"),
        ]
    )
    teardown_masq("net1", "c1", "eth0")
    assert fake.scripts[0].splitlines() == [
        "delete element inet pycni_masq pods4 { 10.88.0.5 }",
        "delete element inet pycni_masq pods6 { fd00::5 }",
        "delete chain inet pycni_masq net6_fd000000000000000000000000000000_64",
    ]


def test_teardown_of_the_last_pod_deletes_the_table(fake_nft):
    fake = fake_nft([("10.88.0.5", note("net1", "c1", "eth0"), "net4_0a580000_24")])
    teardown_masq("net1", "c1", "eth0")
    assert fake.scripts == ["delete table inet pycni_masq\n"]


def test_teardown_with_nothing_to_do_runs_no_transaction(fake_nft):
    fake = fake_nft()  # no table at all
    teardown_masq("net1", "c1", "eth0")
    fake = fake_nft([("10.88.0.5", note("net1", "c2", "eth0"), "net4_0a580000_24")])
    teardown_masq("net1", "c1", "eth0")
    assert fake.scripts == []


def test_gc_deletes_the_networks_invalid_attachments(fake_nft):
    fake = fake_nft(
        [
            ("10.88.0.5", note("net1", "c1", "eth0"), "net4_0a580000_24"),
            ("10.88.0.6", note("net1", "c2", "eth0"), "net4_0a580000_24"),
            ("10.88.0.7", note("net1", "c2", "net1"), "net4_0a580000_24"),
            ("10.88.0.8", note("net2", "c9", "eth0"), "net4_0a580000_24"),
            ("10.88.0.9", "someone else's element", "net4_0a580000_24"),
        ]
    )
    gc_masq("net1", [("c2", "eth0")])
    assert fake.scripts[0].splitlines() == [
        "delete element inet pycni_masq pods4 { 10.88.0.5 }",
        "delete element inet pycni_masq pods4 { 10.88.0.7 }",
    ]


def test_check_names_what_is_missing(fake_nft):
    fake_nft()
    with pytest.raises(CNIError, match="does not exist"):
        masq.check_masq("net1", "c1", "eth0", ["10.88.0.5/24"])


# ---- iptables helper ---------------------------------------------------------------


def test_iptables_listing_parses_quoted_comments():
    text = "\n".join(
        [
            "-P POSTROUTING ACCEPT",
            "-N CNI-abc",
            '-A POSTROUTING -s 10.88.0.5/32 -m comment --comment "name: \\"net1\\" id: \\"c1\\"" -j CNI-abc',
            "-A CNI-abc ! -d 224.0.0.0/4 -j MASQUERADE",
        ]
    )
    listing = iptables.parse_listing(text)
    assert listing.chains == {"CNI-abc"}
    assert listing.rules_of("POSTROUTING") == [
        ["-s", "10.88.0.5/32", "-m", "comment", "--comment", 'name: "net1" id: "c1"', "-j", "CNI-abc"]
    ]
    assert listing.rules_of("CNI-abc") == [["!", "-d", "224.0.0.0/4", "-j", "MASQUERADE"]]
    assert listing.rules_of("nope") == []


def test_iptables_rule_line_round_trips_through_shell_quoting():
    args = ["-s", "10.0.0.1", "-m", "comment", "--comment", 'name: "n" id: "c"', "-j", "CNI-x"]
    line = iptables.rule_line("-A", "POSTROUTING", args)
    assert shlex.split(line) == ["-A", "POSTROUTING", *args]
    with pytest.raises(CNIError):
        iptables.quote("a\nb")


def test_iptables_gc_only_touches_chains_named_for_the_network(monkeypatch):
    chain_a, chain_b = iptables_chain("net1", "a"), iptables_chain("net1", "b")
    c = iptables.quote(iptables_comment("net1", "a"))
    listing = "\n".join(
        [
            f"-N {chain_a}",
            f"-N {chain_b}",
            f"-A POSTROUTING -s 10.88.0.2/32 -m comment --comment {c} -j {chain_a}",
            f"-A POSTROUTING -s 10.88.0.3/32 -m comment --comment {iptables.quote(iptables_comment('net1', 'b'))} "
            f"-j {chain_b}",
            f"-A POSTROUTING -s 10.88.0.4/32 -m comment --comment {c} -j CNI-LOOKALIKE",  # not this layout's chain
        ]
    )
    batches = []
    monkeypatch.setattr(iptables, "run", lambda family, args: listing if family == 4 else "")
    monkeypatch.setattr(iptables, "restore", lambda family, batch: batches.append((family, batch)))
    gc_masq("net1", [("b", "eth0")], backend="iptables")
    assert len(batches) == 1
    family, batch = batches[0]
    assert family == 4
    assert chain_a in batch and chain_b not in batch and "LOOKALIKE" not in batch
    assert batch.splitlines()[-3:] == [f":{chain_a} - [0:0]", f"-X {chain_a}", "COMMIT"]


def test_the_lock_is_the_namespace_s_own_and_no_file(monkeypatch):
    """Held as an abstract socket name of the calling thread's namespace: a second holder there waits."""
    import socket

    from cni_plugins.kernel import locks

    monkeypatch.setattr(masq, "LOCK_TIMEOUT_SECONDS", 0.05)
    assert not hasattr(masq, "LOCK_PATH")
    with masq._locked():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with pytest.raises(OSError):
                probe.bind("\0" + masq.LOCK_NAME)  # taken while held
        finally:
            probe.close()
        with pytest.raises(CNIError) as info:
            with locks.netns_lock(masq.LOCK_NAME, timeout=0.05):
                pass
        assert info.value.code == 11
    with masq._locked():  # released again
        pass
