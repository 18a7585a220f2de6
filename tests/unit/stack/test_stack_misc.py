"""TunStack playbooks for ICMP echo, malformed packets, virtio-net headers, and a property test:
whatever bytes come in, the core never raises and only asks for known commands."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from playbook import (
    FAMILIES,
    KNOWN_COMMANDS,
    P,
    check_icmp,
    check_tcp,
    check_udp,
    echo_request,
    feed,
    fragments_v4,
    make_stack,
    take,
    tcp,
    udp,
)

from ztun.nat.tcp import FORWARD
from ztun.packet.checksum import checksum, pseudo_header_sum
from ztun.packet.icmp import ECHO_REPLY_V4, ECHO_REPLY_V6
from ztun.packet.ip import Drop, IPHeader, Proto, build_ip, parse_ip
from ztun.packet.tcp import ACK, PSH, RST, SYN, tcp_checksum_ok
from ztun.packet.virtio import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    VnetHeader,
    build_header,
    finish_partial,
)
from ztun.stack.commands import (
    CloseUdpSession,
    FlowEnded,
    OpenUdpSession,
    SendDatagram,
    WritePacket,
)
from ztun.stack.tun import HANDLED, TunStack

VERSIONS = pytest.mark.parametrize("v", [4, 6])


# -- ICMP ---------------------------------------------------------------------------------


@VERSIONS
def test_echo_request_answered(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    req = echo_request(f["app"], f["ok"], ident=0xBEEF, seq=3, payload=b"0123456789abcdef!")
    r, _ = feed(stack, req)
    assert r == HANDLED
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], WritePacket)
    h, typ, code, body = check_icmp(out[0].packet)
    assert (h.src, h.dst) == (f["ok"], f["app"])
    assert (typ, code) == ((ECHO_REPLY_V4, 0) if v == 4 else (ECHO_REPLY_V6, 0))
    assert out[0].packet[h.l4 + 4 : h.l4 + 8] == struct.pack("!HH", 0xBEEF, 3)
    assert body == b"0123456789abcdef!"
    assert stack.drops == {}
    # ICMP is answered by the stack itself: nothing is routed.
    assert len(stack.udp) == 0


@VERSIONS
@pytest.mark.parametrize("mode", ["drop", "off", ""])
def test_echo_not_answered_unless_reply(v: int, mode: str) -> None:
    f = FAMILIES[v]
    stack = make_stack(icmp=mode)
    r, _ = feed(stack, echo_request(f["app"], f["ok"]))
    assert r == HANDLED
    assert take(stack) == []
    assert stack.drops == {Drop.ICMP_TYPE: 1}


@VERSIONS
def test_other_icmp_dropped(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    req = bytearray(echo_request(f["app"], f["ok"]))
    l4 = 20 if v == 4 else 40
    req[l4] = 13 if v == 4 else 135  # timestamp / neighbour solicitation
    feed(stack, req)
    multicast = bytes([224, 0, 0, 1]) if v == 4 else ipaddress.IPv6Address("ff02::1").packed
    feed(stack, echo_request(f["app"], multicast))
    # An ICMP message shorter than its 8-byte header.
    proto = Proto.ICMP if v == 4 else Proto.ICMPV6
    feed(stack, bytes(build_ip(f["app"], f["ok"], proto, 4)) + b"\x08\0\0\0")
    assert take(stack) == []
    assert stack.drops == {Drop.ICMP_TYPE: 3}


def test_echo_fragment_dropped() -> None:
    f = FAMILIES[4]
    stack = make_stack()
    frags = fragments_v4(echo_request(f["app"], f["ok"], payload=bytes(64)), 32)
    for frag in frags:
        feed(stack, frag)
    assert take(stack) == []
    assert stack.drops == {Drop.ICMP_TYPE: len(frags)}


# -- malformed packets ----------------------------------------------------------------------


def v4_header(proto: int, *, ihl: int = 5, total: int | None = None, size: int = 40) -> bytes:
    f = FAMILIES[4]
    h = bytearray(size)
    h[0] = 0x40 | ihl
    t = size if total is None else total
    h[2:4] = t.to_bytes(2, "big")
    h[8], h[9] = 64, proto
    h[12:16], h[16:20] = f["app"], f["ok"]
    return bytes(h)


def v6_header(proto: int, *, plen: int = 20, size: int = 60) -> bytes:
    f = FAMILIES[6]
    h = bytearray(size)
    h[0] = 0x60
    h[4:6] = plen.to_bytes(2, "big")
    h[6], h[7] = proto, 64
    h[8:24], h[24:40] = f["app"], f["ok"]
    return bytes(h)


MALFORMED = [
    ("empty", b"", Drop.TRUNCATED),
    ("19 bytes of v4", v4_header(17)[:19], Drop.TRUNCATED),
    ("19 bytes of v6", v6_header(17)[:19], Drop.TRUNCATED),
    ("version 5", b"\x55" + bytes(39), Drop.BAD_VERSION),
    ("version 0", bytes(40), Drop.BAD_VERSION),
    ("v4 udp ihl 4", v4_header(17, ihl=4), Drop.BAD_HEADER),
    ("v4 icmp ihl 0", v4_header(1, ihl=0), Drop.BAD_HEADER),
    ("v4 tcp ihl 4", v4_header(6, ihl=4), Drop.BAD_HEADER),
    ("v4 udp total > packet", v4_header(17, total=41), Drop.BAD_LENGTH),
    ("v4 udp total < ihl", v4_header(17, total=19), Drop.BAD_LENGTH),
    ("v4 tcp short", v4_header(6, size=39), Drop.TRUNCATED),
    ("v4 gre", v4_header(47), Drop.PROTOCOL),
    ("v4 sctp", v4_header(132), Drop.PROTOCOL),
    ("v6 udp short", v6_header(17)[:39], Drop.TRUNCATED),
    ("v6 udp payload > packet", v6_header(17, plen=21), Drop.BAD_LENGTH),
    ("v6 tcp payload > packet", v6_header(6, plen=21), Drop.BAD_LENGTH),
    ("v6 tcp short", v6_header(6, size=59), Drop.TRUNCATED),
    ("v6 gre", v6_header(47), Drop.PROTOCOL),
    ("v6 hop-by-hop", v6_header(0), Drop.PROTOCOL),
    ("v6 fragment header", v6_header(44), Drop.PROTOCOL),
]


@pytest.mark.parametrize(("pkt", "reason"), [(p, r) for _, p, r in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])  # fmt: skip
def test_malformed_packet_dropped(pkt: bytes, reason: Drop) -> None:
    for vnet in (False, True):
        stack = make_stack()
        buf = bytearray(pkt) + bytearray(16)
        if vnet:
            r = stack.receive_vnet(buf, len(pkt), bytes(10), 0.0)
        else:
            r = stack.receive(buf, len(pkt), 0.0)
        assert r == HANDLED
        assert take(stack) == []
        assert stack.drops == {reason: 1}
        assert stack.packets == 1


def test_reassembled_datagram_longer_than_64k_is_dropped() -> None:
    """A first fragment with a 60-byte header and a last fragment with a 20-byte one: their
    datagram would be 65575 bytes long. Dropped, not raised (it once raised ValueError)."""
    f = FAMILIES[4]

    def frag(ihl: int, offset: int, data: bytes, more: bool) -> bytes:
        h = bytearray(ihl)
        h[0] = 0x40 | (ihl // 4)
        h[2:4] = (ihl + len(data)).to_bytes(2, "big")
        h[4:6] = b"\x12\x34"
        h[6:8] = ((0x2000 if more else 0) | offset // 8).to_bytes(2, "big")
        h[8], h[9] = 64, Proto.UDP
        h[12:16], h[16:20] = f["app"], f["ok"]
        h[20:] = b"\x01" * (ihl - 20)  # NOP options
        h[10:12] = checksum(h).to_bytes(2, "big")
        return bytes(h) + data

    stack = make_stack()
    first = frag(60, 0, bytes(8), True)
    last = frag(20, 8, bytes(65507), False)
    assert feed(stack, first)[0] == HANDLED
    assert feed(stack, last)[0] == HANDLED
    assert take(stack) == []
    assert stack.drops == {Drop.FRAGMENT_OVERSIZE: 1}
    assert len(stack.frags) == 0


# -- virtio-net headers ---------------------------------------------------------------------


def vnet(flags: int = 0, gso: int = GSO_NONE, gso_size: int = 0, l4: int = 20) -> bytes:
    return build_header(VnetHeader(flags, gso, l4 + 20 if gso else 0, gso_size,
                                   l4 if flags else 0, 16 if flags else 0))  # fmt: skip


def partial_tcp(src: bytes, dst: bytes, sp: int, dp: int, flags: int, payload: bytes = b"",
                seq: int = 1000, ack: int = 0) -> bytes:  # fmt: skip
    """A segment as the kernel hands it over with checksum offload: the TCP checksum field
    holds the folded pseudo-header sum, not complemented."""
    seg = bytearray(struct.pack("!HHIIBBHHH", sp, dp, seq, ack, 5 << 4, flags, 65535, 0, 0))
    seg += payload
    seg[16:18] = pseudo_header_sum(src, dst, Proto.TCP, len(seg)).to_bytes(2, "big")
    return bytes(build_ip(src, dst, Proto.TCP, len(seg))) + bytes(seg)


def finished(buf: bytearray) -> bytearray:
    """Complete a NEEDS_CSUM checksum as the kernel would; the segment then verifies."""
    h = parse_ip(bytes(buf))
    assert isinstance(h, IPHeader)
    assert finish_partial(buf, h.end, h.l4, 16)
    return buf


def feed_vnet(stack: TunStack, pkt: bytes, hdr: bytes, now: float = 0.0) -> tuple[int, bytearray]:
    buf = bytearray(pkt) + bytearray(64)
    r = stack.receive_vnet(buf, len(pkt), hdr, now)
    return r, buf[: len(pkt)]


@VERSIONS
def test_tcp_super_packet_with_partial_checksum(v: int) -> None:
    f = FAMILIES[v]
    app, dst, local, peer = f["app"], f["ok"], f["local"], f["peer"]
    l4 = 20 if v == 4 else 40
    gso = GSO_TCPV4 if v == 4 else GSO_TCPV6
    stack = make_stack()

    r, buf = feed_vnet(stack, partial_tcp(app, dst, 40001, 443, SYN), vnet(F_NEEDS_CSUM, l4=l4))
    assert r == FORWARD
    h, n, dp, _, _, flags = check_tcp(finished(buf))
    assert (h.src, h.dst, dp, flags) == (peer, local, P, SYN)

    # A 60 KB super-packet, as TSO hands it over: rewritten whole, its partial sum moved.
    payload = bytes(range(256)) * 240
    pkt = partial_tcp(app, dst, 40001, 443, ACK | PSH, payload, seq=1001, ack=1)
    r, buf = feed_vnet(stack, pkt, vnet(F_NEEDS_CSUM, gso, 1400, l4=l4))
    assert r == FORWARD
    h, sp, dp, seq, _, _ = check_tcp(finished(buf))
    assert (h.src, h.dst, sp, dp, seq) == (peer, local, n, P, 1001)
    assert bytes(buf[h.l4 + 20 :]) == payload

    # The listener's super-packet, with ECN, back to the app.
    pkt = partial_tcp(local, peer, P, n, ACK, payload, seq=1, ack=len(payload) + 1001)
    r, buf = feed_vnet(stack, pkt, vnet(F_NEEDS_CSUM, gso | GSO_ECN, 1400, l4=l4))
    assert r == FORWARD
    h, sp, dp, _, _, _ = check_tcp(finished(buf))
    assert (h.src, h.dst, sp, dp) == (dst, app, 443, 40001)

    # A segment with a complete checksum (no NEEDS_CSUM) on the same device.
    r, buf = feed_vnet(stack, tcp(app, dst, 40001, 443, ACK, seq=1001), vnet(l4=l4))
    assert r == FORWARD
    h = check_tcp(buf)[0]
    assert tcp_checksum_ok(bytes(buf), h)
    assert stack.drops == {}


@VERSIONS
def test_blocked_syn_with_partial_checksum_gets_valid_rst(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    l4 = 20 if v == 4 else 40
    r, _ = feed_vnet(stack, partial_tcp(f["app"], f["block"], 40001, 443, SYN, seq=9),
                     vnet(F_NEEDS_CSUM, l4=l4))  # fmt: skip
    assert r == HANDLED
    out = take(stack)
    assert [type(c) for c in out] == [FlowEnded, WritePacket]
    rst = out[1]
    assert isinstance(rst, WritePacket)
    h, sp, dp, seq, ack, flags = check_tcp(rst.packet)
    assert (h.src, h.dst, sp, dp, seq, ack, flags) == (f["block"], f["app"], 443, 40001, 0, 10,
                                                       RST | ACK)  # fmt: skip
    assert stack.drops == {Drop.REJECTED: 1}


@VERSIONS
def test_legacy_udp_gso_dropped(v: int) -> None:
    """UFO (GSO_UDP, IP fragments) is never negotiated, and TCP marked with a UDP GSO type
    is refused."""
    f = FAMILIES[v]
    stack = make_stack()
    pkt = udp(f["app"], 5000, f["ok"], 53, bytes(3000))
    r, _ = feed_vnet(stack, pkt, vnet(F_NEEDS_CSUM, GSO_UDP, 1000, l4=20 if v == 4 else 40))
    assert r == HANDLED
    assert take(stack) == []
    assert stack.drops == {Drop.GSO: 1}
    for gso in (GSO_UDP, GSO_UDP_L4):
        r, _ = feed_vnet(stack, tcp(f["app"], f["ok"], 1, 2, ACK), vnet(0, gso, 1000))
        assert r == HANDLED
    assert stack.drops == {Drop.GSO: 3}
    assert take(stack) == []


@VERSIONS
@pytest.mark.parametrize("gso", [GSO_UDP_L4, GSO_UDP_L4 | GSO_ECN])
def test_udp_super_packet_read_is_its_datagrams(v: int, gso: int) -> None:
    """Issue 13: with USO an application's UDP_SEGMENT burst arrives in one read; each of its
    datagrams goes on, in order, through the flow's session."""
    f = FAMILIES[v]
    stack = make_stack()
    payload = bytes(range(250)) * 12  # 3000 bytes: 1000 + 1000 + 1000
    pkt = udp(f["app"], 5000, f["ok"], 53, payload + b"tail")
    r, _ = feed_vnet(stack, pkt, vnet(F_NEEDS_CSUM, gso, 1000, l4=20 if v == 4 else 40))
    assert r == HANDLED
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], OpenUdpSession)
    stack.udp.opened(out[0].key, out[0].ident)
    sent = take(stack)
    assert all(isinstance(c, SendDatagram) for c in sent)
    assert [c.payload for c in sent] == [payload[:1000], payload[1000:2000],  # type: ignore[union-attr]
                                         payload[2000:], b"tail"]  # fmt: skip
    assert stack.drops == {}


@VERSIONS
def test_udp_and_icmp_through_vnet(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    r, _ = feed_vnet(stack, udp(f["app"], 5000, f["ok"], 53, b"q"), vnet())
    assert r == HANDLED
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], OpenUdpSession)
    r, _ = feed_vnet(stack, echo_request(f["app"], f["ok"]), vnet())
    assert r == HANDLED
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], WritePacket)
    check_icmp(out[0].packet)
    assert stack.drops == {}


# -- property: the core never raises ----------------------------------------------------------


def seeds() -> list[bytes]:
    f4, f6 = FAMILIES[4], FAMILIES[6]
    out = []
    for f in (f4, f6):
        out += [
            tcp(f["app"], f["ok"], 1234, 80, SYN),
            tcp(f["app"], f["block"], 1234, 80, SYN),
            tcp(f["app"], f["ok"], 1234, 80, ACK, payload=b"data"),
            tcp(f["local"], f["peer"], P, 10000, ACK),
            udp(f["app"], 5000, f["ok"], 53, b"query"),
            udp(f["app"], 5000, f["block"], 53, b"query"),
            echo_request(f["app"], f["ok"]),
        ]
    out += fragments_v4(udp(f4["app"], 5000, f4["ok"], 53, bytes(100)), 32)
    return out


SEEDS = seeds()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid packet with a few bytes changed and maybe cut short or extended."""
    pkt = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        pkt[draw(st.integers(0, len(pkt) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(pkt) + 8))
    return bytes(pkt[:cut]) + bytes(max(0, cut - len(pkt)))


packets = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.sampled_from([0x45, 0x46, 0x4F, 0x40, 0x60, 0x6F]), st.binary(max_size=200)).map(
        lambda t: bytes([t[0]]) + t[1]
    ),
    mutated(),
)
vnet_headers = st.one_of(
    st.binary(min_size=10, max_size=10),
    st.binary(min_size=12, max_size=12),
    st.tuples(st.sampled_from([0, F_NEEDS_CSUM]),
              st.sampled_from([GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, GSO_TCPV4 | GSO_ECN]))
    .map(lambda t: bytes(t) + bytes(8)),
)  # fmt: skip


def check_commands(stack: TunStack) -> None:
    for c in take(stack):
        assert isinstance(c, KNOWN_COMMANDS)
        if isinstance(c, WritePacket):
            # Everything ztun writes itself carries complete, valid checksums.
            h = parse_ip(c.packet)
            assert isinstance(h, IPHeader)
            if h.proto == Proto.TCP:
                check_tcp(c.packet)
            elif h.proto == Proto.UDP:
                check_udp(c.packet)
            else:
                check_icmp(c.packet)
        elif isinstance(c, OpenUdpSession):
            stack.udp.opened(c.key, c.ident)
            stack.udp_reply(c.key, c.flow.dest, b"reply", 0.5)
        else:
            assert isinstance(c, SendDatagram | CloseUdpSession | FlowEnded)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(packets, vnet_headers, st.booleans()), min_size=1, max_size=6))
def test_arbitrary_packets_never_raise(items: list[tuple[bytes, bytes, bool]]) -> None:
    stack = make_stack(max_udp_sessions=2)
    for i, (pkt, hdr, use_vnet) in enumerate(items):
        buf = bytearray(pkt) + bytearray(64)
        now = i * 0.25
        if use_vnet:
            r = stack.receive_vnet(buf, len(pkt), hdr, now)
        else:
            r = stack.receive(buf, len(pkt), now)
        assert r in (FORWARD, HANDLED)
        if r == FORWARD:
            assert parse_ip(bytes(buf[: len(pkt)])) is not None
        check_commands(stack)
    stack.expire(100.0)
    stack.stop()
    check_commands(stack)
    assert stack.packets == len(items)
    assert all(isinstance(k, Drop) for k in stack.drops)
