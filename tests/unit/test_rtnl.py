"""kernel.rtnl and kernel.tc messages: what we build by hand is what pyroute2 builds (or reads) for the same request.

The tc requests are compared byte for byte with the messages pyroute2's
``tcmsg`` encodes from the same parameters (what the plugin sent before it had
its own encoder). Link, address and route requests are decoded with pyroute2's
parsers and their fields checked; the readers (``parse_*``, ``qdisc_from`` ...)
are fed messages pyroute2 encoded. The last tests talk to the kernel through
the loopback device only, which needs no privileges.
"""

import errno
import ipaddress
import socket
import struct

import pytest

from cni_plugins.kernel import ip, rtnl, tc  # first: kernel.ip loads pyroute2 without its package __init__
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg
from pyroute2.netlink.rtnl.tcmsg import tcmsg

SEQ = 7


def decoded(cls, request: rtnl.Request):
    msg = cls(request.encode(SEQ))
    msg.decode()
    return msg


def pyroute2_encoded(cls, kind: int, fields: dict, attrs: list, flags: int = 0) -> bytes:
    msg = cls()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    msg["header"]["type"] = kind
    msg["header"]["flags"] = flags
    msg["header"]["sequence_number"] = SEQ
    msg.encode()
    return bytes(msg.data)


def body(data: bytes) -> memoryview:
    return memoryview(data)[rtnl.NLMSGHDR.size :]


# ---- the netlink framing ----------------------------------------------------------------


def test_header_and_padding():
    request = rtnl.get_link(name="eth0")
    data = request.encode(SEQ)
    length, kind, flags, seq, pid = rtnl.NLMSGHDR.unpack_from(data)
    assert (length, kind, flags, seq, pid) == (len(data), rtnl.RTM_GETLINK, rtnl.NLM_F_REQUEST | rtnl.NLM_F_ACK, SEQ, 0)
    assert rtnl.attr_str(3, "eth0") == struct.pack("=HH", 9, 3) + b"eth0\0" + b"\0\0\0"
    assert len(rtnl.attr(1, b"\1")) == 8


def test_attrs_round_trip_and_first_of_a_type_wins():
    data = rtnl.attr_u32(4, 1500) + rtnl.attr_str(3, "br0") + rtnl.attr_u32(4, 9000)
    parsed = rtnl.attrs(data)
    assert rtnl.as_u32(parsed[4]) == 1500 and rtnl.as_str(parsed[3]) == "br0"
    assert [kind for kind, _ in rtnl.attr_list(data)] == [4, 3, 4]


# ---- links ----------------------------------------------------------------------------------


def test_get_link_by_name_and_by_index():
    msg = decoded(ifinfmsg, rtnl.get_link(name="veth1"))
    assert msg["index"] == 0 and msg.get_attr("IFLA_IFNAME") == "veth1"
    msg = decoded(ifinfmsg, rtnl.get_link(index=12))
    assert msg["index"] == 12 and msg.get_attr("IFLA_IFNAME") is None


def test_set_link_flags_and_attributes():
    msg = decoded(
        ifinfmsg,
        rtnl.set_link(5, up=True, promisc=False, mac="02:00:00:aa:bb:cc", master=3, alias="net/ctr/eth0", mtu=1400),
    )
    assert msg["index"] == 5
    assert msg["flags"] == rtnl.IFF_UP and msg["change"] == rtnl.IFF_UP | rtnl.IFF_PROMISC
    assert msg.get_attr("IFLA_ADDRESS") == "02:00:00:aa:bb:cc"
    assert msg.get_attr("IFLA_MASTER") == 3 and msg.get_attr("IFLA_MTU") == 1400
    assert msg.get_attr("IFLA_IFALIAS") == "net/ctr/eth0"
    msg = decoded(ifinfmsg, rtnl.set_link(5, master=0))  # 0: leave the bridge
    assert msg.get_attr("IFLA_MASTER") == 0 and msg["change"] == 0


def test_add_bridge():
    request = rtnl.add_bridge("cni0", mtu=1450, mac="02:11:22:33:44:55")
    assert request.flags == rtnl.NLM_F_ACK | rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL
    msg = decoded(ifinfmsg, request)
    assert msg.get_attr("IFLA_IFNAME") == "cni0" and msg.get_attr("IFLA_MTU") == 1450
    assert msg.get_attr("IFLA_ADDRESS") == "02:11:22:33:44:55"
    assert msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "bridge"


def test_add_veth_puts_the_peer_in_another_namespace():
    msg = decoded(ifinfmsg, rtnl.add_veth("eth0", "veth0123abcd", 9, mtu=1400, mac="02:00:00:00:00:01"))
    assert msg.get_attr("IFLA_IFNAME") == "eth0" and msg.get_attr("IFLA_MTU") == 1400
    assert msg.get_attr("IFLA_ADDRESS") == "02:00:00:00:00:01"
    info = msg.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "veth"
    # The peer is a whole ifinfmsg inside VETH_INFO_PEER: read it from the raw bytes.
    raw = rtnl.attrs(body(rtnl.add_veth("eth0", "veth0123abcd", 9, mtu=1400).encode(SEQ)), rtnl.IFINFOMSG.size)
    data = rtnl.attrs(rtnl.attrs(raw[rtnl.IFLA_LINKINFO])[rtnl.IFLA_INFO_DATA])
    peer = rtnl.attrs(data[rtnl.VETH_INFO_PEER], rtnl.IFINFOMSG.size)
    assert rtnl.as_str(peer[rtnl.IFLA_IFNAME]) == "veth0123abcd"
    assert rtnl.as_u32(peer[rtnl.IFLA_NET_NS_FD]) == 9 and rtnl.as_u32(peer[rtnl.IFLA_MTU]) == 1400


def test_add_ifb_comes_up_with_its_queue_length():
    msg = decoded(ifinfmsg, rtnl.add_ifb("bwp0123456789ab", 1500, 0))
    assert msg["flags"] & rtnl.IFF_UP and msg["change"] & rtnl.IFF_UP
    assert msg.get_attr("IFLA_TXQLEN") == 0 and msg.get_attr("IFLA_MTU") == 1500
    assert msg.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND") == "ifb"


def test_bridge_port_flags():
    raw = rtnl.attrs(body(rtnl.set_bridge_port(4, hairpin=True, isolated=False).encode(SEQ)), rtnl.IFINFOMSG.size)
    info = rtnl.attrs(raw[rtnl.IFLA_LINKINFO])
    assert rtnl.as_str(info[rtnl.IFLA_INFO_KIND]) == "bridge_slave"
    port = rtnl.attrs(info[rtnl.IFLA_INFO_SLAVE_DATA])
    assert bytes(port[rtnl.IFLA_BRPORT_MODE]) == b"\1" and bytes(port[rtnl.IFLA_BRPORT_ISOLATED]) == b"\0"


def test_delete_link_by_name():
    msg = decoded(ifinfmsg, rtnl.delete_link_by_name("veth9"))
    assert msg["header"]["type"] == rtnl.RTM_DELLINK and msg.get_attr("IFLA_IFNAME") == "veth9"


def test_parse_link_reads_what_pyroute2_encodes():
    data = pyroute2_encoded(
        ifinfmsg,
        rtnl.RTM_NEWLINK,
        {"index": 8, "flags": rtnl.IFF_UP | rtnl.IFF_PROMISC},
        [
            ["IFLA_IFNAME", "veth8"],
            ["IFLA_ADDRESS", "02:42:ac:11:00:02"],
            ["IFLA_MTU", 1450],
            ["IFLA_MASTER", 3],
            ["IFLA_LINK", 2],
            ["IFLA_OPERSTATE", "UP"],
            ["IFLA_PROMISCUITY", 1],
            ["IFLA_IFALIAS", "n/c/eth0"],
            ["IFLA_TXQLEN", 1000],
            ["IFLA_LINKINFO", {"attrs": [["IFLA_INFO_KIND", "veth"]]}],
        ],
    )
    link = rtnl.parse_link(body(data))
    assert link == rtnl.LinkInfo(
        name="veth8",
        index=8,
        mac="02:42:ac:11:00:02",
        mtu=1450,
        kind="veth",
        master=3,
        peer_index=2,
        oper_state="UP",
        flags=rtnl.IFF_UP | rtnl.IFF_PROMISC,
        promiscuity=1,
        alias="n/c/eth0",
        txqlen=1000,
    )
    assert ip.Link(**vars(link)).promisc


def test_link_of_an_answer():
    assert rtnl.link_of(rtnl.Answer(error=errno.ENODEV)) is None
    with pytest.raises(rtnl.NetlinkError) as caught:
        rtnl.link_of(rtnl.Answer(error=errno.EPERM, what="get link x"))
    assert caught.value.code == errno.EPERM and caught.value.args == (errno.EPERM, "Operation not permitted")
    assert ip.describe(caught.value) == "operation not permitted"


# ---- addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cidr, broadcast", [("10.1.2.3/24", "10.1.2.255"), ("10.1.2.3/31", None), ("10.1.2.3/32", None)]
)
def test_add_ipv4_address(cidr, broadcast):
    msg = decoded(ifaddrmsg, rtnl.add_address(6, cidr))
    iface = ipaddress.ip_interface(cidr)
    assert (msg["family"], msg["prefixlen"], msg["index"]) == (socket.AF_INET, iface.network.prefixlen, 6)
    assert msg.get_attr("IFA_ADDRESS") == msg.get_attr("IFA_LOCAL") == str(iface.ip)
    assert msg.get_attr("IFA_BROADCAST") == broadcast


def test_add_ipv6_address_nodad():
    msg = decoded(ifaddrmsg, rtnl.add_address(6, "fd00::5/64", nodad=True))
    assert (msg["family"], msg["prefixlen"]) == (socket.AF_INET6, 64)
    assert msg.get_attr("IFA_ADDRESS") == "fd00::5" and msg.get_attr("IFA_FLAGS") == 0x02
    assert decoded(ifaddrmsg, rtnl.add_address(6, "fd00::5/64")).get_attr("IFA_FLAGS") is None


def test_delete_address():
    msg = decoded(ifaddrmsg, rtnl.delete_address(6, "10.0.0.1/16"))
    assert msg["header"]["type"] == rtnl.RTM_DELADDR and msg["prefixlen"] == 16
    assert msg.get_attr("IFA_LOCAL") == "10.0.0.1"


def test_parse_address_prefers_the_32_bit_flags():
    data = pyroute2_encoded(
        ifaddrmsg,
        rtnl.RTM_NEWADDR,
        {"family": socket.AF_INET6, "prefixlen": 64, "flags": 0x40, "index": 4},
        [["IFA_ADDRESS", "fd00::1"], ["IFA_FLAGS", 0x40 | 0x200]],
    )
    index, iface, flags = rtnl.parse_address(body(data))
    assert (index, iface, flags) == (4, ipaddress.ip_interface("fd00::1/64"), 0x240)


# ---- routes -------------------------------------------------------------------------------------


def test_append_route_like_ip_route_append():
    request = rtnl.append_route(3, "10.2.0.0/16", "10.1.0.1", priority=100, table=None, scope=None, protocol=3)
    assert request.flags == rtnl.NLM_F_ACK | rtnl.NLM_F_CREATE | rtnl.NLM_F_APPEND
    msg = decoded(rtmsg, request)
    assert (msg["family"], msg["dst_len"], msg["table"], msg["proto"], msg["type"]) == (socket.AF_INET, 16, 254, 3, 1)
    assert msg.get_attr("RTA_DST") == "10.2.0.0" and msg.get_attr("RTA_GATEWAY") == "10.1.0.1"
    assert msg.get_attr("RTA_OIF") == 3 and msg.get_attr("RTA_PRIORITY") == 100 and msg.get_attr("RTA_TABLE") is None


def test_default_route_in_a_large_table():
    msg = decoded(rtmsg, rtnl.append_route(3, "::/0", "fd00::1", table=1000, scope=0))
    assert (msg["family"], msg["dst_len"], msg["table"]) == (socket.AF_INET6, 0, 252)  # RT_TABLE_COMPAT
    assert msg.get_attr("RTA_DST") is None and msg.get_attr("RTA_TABLE") == 1000


def test_route_request_from_a_route_spec():
    spec = ip.RouteSpec("192.168.0.0/24", None, None, None, 253)
    msg = decoded(rtmsg, ip.route_request(9, spec))
    assert msg["scope"] == 253 and msg["proto"] == ip.RTPROT_BOOT and msg.get_attr("RTA_GATEWAY") is None


def test_parse_route_flattens_multipath():
    data = pyroute2_encoded(
        rtmsg,
        rtnl.RTM_NEWROUTE,
        {"family": socket.AF_INET, "dst_len": 24, "table": 254},
        [
            ["RTA_DST", "10.9.0.0"],
            ["RTA_TABLE", 254],
            [
                "RTA_MULTIPATH",
                [
                    {"oif": 2, "attrs": [["RTA_GATEWAY", "10.0.0.1"]]},
                    {"oif": 3, "attrs": [["RTA_GATEWAY", "10.0.0.2"]]},
                ],
            ],
        ],
    )
    net = ipaddress.ip_network("10.9.0.0/24")
    assert rtnl.parse_route(body(data)) == [(net, "10.0.0.1", 2, 254), (net, "10.0.0.2", 3, 254)]
    data = pyroute2_encoded(
        rtmsg,
        rtnl.RTM_NEWROUTE,
        {"family": socket.AF_INET, "dst_len": 0, "table": 254},
        [["RTA_OIF", 5], ["RTA_GATEWAY", "10.0.0.9"]],
    )
    assert rtnl.parse_route(body(data)) == [(ipaddress.ip_network("0.0.0.0/0"), "10.0.0.9", 5, 254)]


# ---- tc: byte for byte what pyroute2's tcmsg encodes --------------------------------------------


def pyroute2_tc(kind: int, flags: int, index: int, handle: int, parent: int, attrs: list, info: int = 0) -> bytes:
    return pyroute2_encoded(
        tcmsg,
        kind,
        {"index": index, "handle": handle, "parent": parent, "info": info},
        attrs,
        rtnl.NLM_F_REQUEST | flags,
    )


BUCKET = tc.TokenBucket(rate=1_250_000, buffer=3_200_000, limit=81_250)


def test_tbf_bytes():
    parms = {"rate": BUCKET.rate, "limit": BUCKET.limit, "buffer": BUCKET.buffer}
    want = pyroute2_tc(
        tc.RTM_NEWQDISC,
        tc.CREATE,
        4,
        tc.ROOT_HANDLE,
        tc.TC_H_ROOT,
        [["TCA_KIND", "tbf"], ["TCA_OPTIONS", {"attrs": [["TCA_TBF_PARMS", parms]]}]],
    )
    assert tc.tbf_request(4, BUCKET).encode(SEQ) == want


def test_ingress_bytes():
    want = pyroute2_tc(
        tc.RTM_NEWQDISC,
        tc.CREATE,
        4,
        tc.INGRESS_HANDLE,
        tc.TC_H_INGRESS,
        [["TCA_KIND", "ingress"], ["TCA_OPTIONS", {"attrs": []}]],
    )
    assert tc.ingress_request(4).encode(SEQ) == want


def test_redirect_filter_bytes():
    options = {
        "attrs": [
            [
                "TCA_U32_ACT",
                {
                    "attrs": [
                        [
                            "TCA_ACT_PRIO_1",
                            {
                                "attrs": [
                                    ["TCA_ACT_KIND", "mirred"],
                                    [
                                        "TCA_ACT_OPTIONS",
                                        {"attrs": [["TCA_MIRRED_PARMS", {"eaction": 1, "action": 4, "ifindex": 11}]]},
                                    ],
                                ]
                            },
                        ]
                    ]
                },
            ],
            ["TCA_U32_CLASSID", tc.UNSHAPED_CLASS],
            ["TCA_U32_SEL", {"flags": 1, "keys": ["0x0/0x0+0"]}],
        ]
    }
    want = pyroute2_tc(
        tc.RTM_NEWTFILTER,
        tc.CREATE,
        4,
        0,
        tc.INGRESS_HANDLE,
        [["TCA_KIND", "u32"], ["TCA_OPTIONS", options]],
        info=(1 << 16) | socket.htons(tc.ETH_P_ALL),
    )
    assert tc.redirect_request(4, 11).encode(SEQ) == want


def _htb_class(rate: int, buffer: int, mtu: int) -> dict:
    quantum = max(tc.HTB_QUANTUM_MIN, mtu, min(tc.HTB_QUANTUM_MAX, rate // 10))
    parms = {
        "rate": min(rate, tc.U32_MAX),
        "ceil": min(rate, tc.U32_MAX),
        "buffer": buffer,
        "cbuffer": buffer,
        "quantum": quantum,
    }
    attrs: list = [["TCA_HTB_PARMS", parms]]
    if rate > tc.U32_MAX:
        attrs += [["TCA_HTB_RATE64", rate], ["TCA_HTB_CEIL64", rate]]
    return {"attrs": attrs}


@pytest.mark.parametrize("shaped", [True, False])
def test_htb_bytes(shaped):
    subnets = ["10.5.0.0/16", "fd00:5::/64"]
    mtu = 1500
    default = tc.UNSHAPED_CLASS if shaped else tc.SHAPED_CLASS
    init = {"version": 3, "rate2quantum": 10, "defcls": default & 0xFFFF, "debug": 0, "direct_pkts": 0}
    uncapped = tc.time_to_ticks(
        int((tc.UNCAPPED_RATE_BYTES // 1000 + mtu) * tc.TIME_UNITS_PER_SEC / tc.UNCAPPED_RATE_BYTES)
    )
    want = [
        pyroute2_tc(
            tc.RTM_NEWQDISC,
            tc.CREATE,
            4,
            tc.ROOT_HANDLE,
            tc.TC_H_ROOT,
            [["TCA_KIND", "htb"], ["TCA_OPTIONS", {"attrs": [["TCA_HTB_INIT", init]]}]],
        ),
        pyroute2_tc(
            tc.RTM_NEWTCLASS,
            tc.CREATE,
            4,
            tc.SHAPED_CLASS,
            tc.ROOT_HANDLE,
            [["TCA_KIND", "htb"], ["TCA_OPTIONS", _htb_class(BUCKET.rate, BUCKET.buffer, mtu)]],
        ),
        pyroute2_tc(
            tc.RTM_NEWTCLASS,
            tc.CREATE,
            4,
            tc.UNSHAPED_CLASS,
            tc.ROOT_HANDLE,
            [["TCA_KIND", "htb"], ["TCA_OPTIONS", _htb_class(tc.UNCAPPED_RATE_BYTES, uncapped, mtu)]],
        ),
    ]
    target = tc.SHAPED_CLASS if shaped else tc.UNSHAPED_CLASS
    for subnet in subnets:
        protocol, keys = tc.subnet_keys(subnet, True)
        prio = tc.HTB_PRIO_IPV4 if protocol == tc.ETH_P_IP else tc.HTB_PRIO_IPV6
        options = {"attrs": [["TCA_U32_CLASSID", target], ["TCA_U32_SEL", {"flags": 1, "keys": keys}]]}
        want.append(
            pyroute2_tc(
                tc.RTM_NEWTFILTER,
                tc.CREATE,
                4,
                0,
                tc.ROOT_HANDLE,
                [["TCA_KIND", "u32"], ["TCA_OPTIONS", options]],
                info=(prio << 16) | socket.htons(protocol),
            )
        )
    got = [r.encode(SEQ) for r in tc.htb_requests(4, BUCKET, subnets, shaped, True, mtu)]
    assert got == want


def test_qdisc_requests_ask_for_an_echo():
    """A qdisc GET is answered to the requester only with NLM_F_ECHO."""
    msg = decoded(tcmsg, tc.get_qdisc_request(4, tc.TC_H_ROOT))
    assert msg["header"]["flags"] & rtnl.NLM_F_ECHO and msg["parent"] == tc.TC_H_ROOT and msg["index"] == 4
    msg = decoded(tcmsg, tc.delete_qdisc_request(4, tc.INGRESS_HANDLE, tc.TC_H_INGRESS))
    assert msg["header"]["type"] == tc.RTM_DELQDISC and msg["handle"] == tc.INGRESS_HANDLE


# ---- tc readers --------------------------------------------------------------------------------


def test_qdisc_from_reads_tbf_and_htb():
    tbf = pyroute2_tc(
        tc.RTM_NEWQDISC,
        0,
        4,
        tc.ROOT_HANDLE,
        tc.TC_H_ROOT,
        [
            ["TCA_KIND", "tbf"],
            [
                "TCA_OPTIONS",
                {"attrs": [["TCA_TBF_PARMS", {"rate": BUCKET.rate, "limit": BUCKET.limit, "buffer": BUCKET.buffer}]]},
            ],
        ],
    )
    qdisc = tc.qdisc_from(body(tbf))
    assert (qdisc.index, qdisc.kind, qdisc.handle, qdisc.is_root) == (4, "tbf", tc.ROOT_HANDLE, True)
    assert qdisc.options == {"rate": BUCKET.rate, "limit": BUCKET.limit, "buffer": BUCKET.buffer}
    htb = pyroute2_tc(
        tc.RTM_NEWQDISC,
        0,
        4,
        tc.ROOT_HANDLE,
        tc.TC_H_ROOT,
        [
            ["TCA_KIND", "htb"],
            [
                "TCA_OPTIONS",
                {
                    "attrs": [
                        [
                            "TCA_HTB_INIT",
                            {"version": 3, "rate2quantum": 10, "defcls": 0x30, "debug": 0, "direct_pkts": 0},
                        ]
                    ]
                },
            ],
        ],
    )
    assert tc.qdisc_from(body(htb)).options == {"default": 0x30}


def test_qdisc_at():
    assert tc.qdisc_at(rtnl.Answer(error=errno.ENOENT)) is None
    assert tc.qdisc_at(rtnl.Answer()) is None  # a default qdisc: acknowledged, not described
    with pytest.raises(rtnl.NetlinkError):
        tc.qdisc_at(rtnl.Answer(error=errno.EPERM))


@pytest.mark.parametrize("rate", [BUCKET.rate, 2 * tc.U32_MAX])
def test_htb_class_from(rate):
    data = pyroute2_tc(
        tc.RTM_NEWTCLASS,
        0,
        4,
        tc.SHAPED_CLASS,
        tc.ROOT_HANDLE,
        [["TCA_KIND", "htb"], ["TCA_OPTIONS", _htb_class(rate, 4000, 1500)]],
    )
    assert tc.htb_class_from(body(data)) == tc.HtbClass(handle=tc.SHAPED_CLASS, rate=rate, ceil=rate, buffer=4000)
    other = pyroute2_tc(tc.RTM_NEWTCLASS, 0, 4, 0x10001, tc.ROOT_HANDLE, [["TCA_KIND", "mq"]])
    assert tc.htb_class_from(body(other)) is None


def test_u32_filters_from_reads_the_redirect_and_the_keys():
    request = tc.redirect_request(4, 11)
    reply = tc.subnet_filter_request(4, "10.5.0.0/16", tc.SHAPED_CLASS, False)
    filters = tc.u32_filters_from(
        [(tc.RTM_NEWTFILTER, body(request.encode(SEQ))), (tc.RTM_NEWTFILTER, body(reply.encode(SEQ)))]
    )
    assert filters[0] == tc.U32Filter(
        prio=1, protocol=tc.ETH_P_ALL, classid=tc.UNSHAPED_CLASS, keys=[(0, 0, 0)], redirect_to=[11]
    )
    assert filters[1].classid == tc.SHAPED_CLASS and filters[1].redirect_to == []
    assert filters[1].keys == [(0x0A050000, 0xFFFF0000, 16)]  # the destination address, as tc shows it


# ---- the socket ------------------------------------------------------------------------------------


def test_a_batch_is_answered_in_order():
    with rtnl.Rtnl() as sock:
        lo, missing, links = sock.run(
            [rtnl.get_link(name="lo"), rtnl.get_link(name="no-such-link0"), rtnl.dump_links()]
        )
    assert rtnl.link_of(lo).name == "lo"
    assert missing.error == errno.ENODEV and rtnl.link_of(missing) is None
    assert "lo" in [rtnl.parse_link(payload).name for kind, payload in links.messages if kind == rtnl.RTM_NEWLINK]


def test_call_raises_the_kernels_refusal():
    with rtnl.Rtnl() as sock, pytest.raises(rtnl.NetlinkError) as caught:
        sock.call(rtnl.get_link(name="no-such-link0"))
    assert caught.value.code == errno.ENODEV


def test_a_dump_goes_last():
    with rtnl.Rtnl() as sock, pytest.raises(ValueError, match="last"):
        sock.run([rtnl.dump_links(), rtnl.get_link(name="lo")])


def test_ip_functions_take_a_plain_socket():
    with ip.open_rtnl() as sock:
        lo = ip.find_link(sock, "lo")
        assert lo is not None and ip.link_by_index(sock, lo.index).name == "lo"
        assert ip.find_link(sock, "no-such-link0") is None
        assert any(link.name == "lo" for link in ip.list_links(sock))
        with pytest.raises(TypeError, match="open_netlink"):
            ip.bridge_vlans(sock, lo.index)
