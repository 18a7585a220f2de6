"""Packet layer: checksums against a naive sum, parsers and builders under arbitrary bytes."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.packet import checksum as ck
from ztun.packet.fragment import Reassembler
from ztun.packet.icmp import (
    build_echo_reply,
    build_port_unreachable,
    icmp_checksum_ok,
    is_echo_request,
)
from ztun.packet.ip import Drop, IPHeader, Proto, build_ip, ip_header_ok, parse_ip
from ztun.packet.tcp import ACK, FIN, RST, SYN, build_rst, tcp_checksum_ok
from ztun.packet.udp import build_udp, parse_udp, udp_checksum_ok


def naive_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return s


def naive_checksum(data: bytes) -> int:
    return ~naive_sum(data) & 0xFFFF


v4 = st.binary(min_size=4, max_size=4)
v6 = st.binary(min_size=16, max_size=16)
port = st.integers(0, 65535)


def tcp_packet(src: bytes, dst: bytes, sp: int, dp: int, flags: int, payload: bytes,
               seq: int = 1000, ack: int = 0) -> bytes:  # fmt: skip
    seg = bytearray(struct.pack("!HHIIBBHHH", sp, dp, seq, ack, 5 << 4, flags, 65535, 0, 0))
    seg += payload
    pseudo = src + dst + struct.pack("!HH", Proto.TCP, len(seg))
    c = naive_checksum(pseudo + bytes(seg))
    seg[16:18] = c.to_bytes(2, "big")
    return bytes(build_ip(src, dst, Proto.TCP, len(seg))) + bytes(seg)


@given(st.binary(max_size=3000))
def test_ones_sum_matches_naive(data: bytes) -> None:
    assert ck.ones_sum(data) == naive_sum(data)
    assert ck.checksum(data) == naive_checksum(data)


@given(st.binary(min_size=4, max_size=200).filter(lambda b: len(b) % 2 == 0),
       st.data())  # fmt: skip
def test_incremental_update_equals_recompute(data: bytes, draw: st.DataObject) -> None:
    # a buffer whose checksum field (first two bytes) verifies, then some words change
    body = data[2:]
    # A last word that never changes stands for the pseudo-header's protocol number: real
    # checksummed data is never all zeros (whose sum has no one's complement "+0" form).
    buf = bytearray(b"\0\0" + body + b"\x00\x06")
    c = ck.checksum(buf)
    buf[0:2] = c.to_bytes(2, "big")
    nwords = (len(buf) - 4) // 2
    i = draw.draw(st.integers(0, nwords - 1))
    new = draw.draw(st.integers(0, 0xFFFF))
    off = 2 + 2 * i
    old = (buf[off] << 8) | buf[off + 1]
    buf[off : off + 2] = new.to_bytes(2, "big")
    updated = ck.adjust(c, ck.delta([old], [new]))
    fresh = bytearray(buf)
    fresh[0:2] = b"\0\0"
    assert updated == ck.checksum(fresh)


@given(st.binary(max_size=200))
def test_parse_ip_never_raises(data: bytes) -> None:
    h = parse_ip(data)
    assert isinstance(h, IPHeader | Drop)
    if isinstance(h, IPHeader):
        assert h.l4 <= h.end <= len(data)
        for f in (build_rst, build_echo_reply):
            assert isinstance(f(data, h), bytes | Drop)
        assert isinstance(parse_udp(data, h), tuple | Drop)
        assert isinstance(build_port_unreachable(data, h), bytes)


@given(st.binary(max_size=80), st.sampled_from([0x45, 0x46, 0x60]))
def test_parse_ip_with_plausible_first_byte(data: bytes, first: int) -> None:
    buf = bytes([first]) + data
    h = parse_ip(buf)
    assert isinstance(h, IPHeader | Drop)
    if isinstance(h, IPHeader):
        assert isinstance(build_rst(buf, h), bytes | Drop)
        assert isinstance(build_echo_reply(buf, h), bytes | Drop)


@given(st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), port, port, st.binary(max_size=2000))
def test_udp_round_trip(addrs: tuple[bytes, bytes], sp: int, dp: int, payload: bytes) -> None:
    src, dst = addrs
    pkt = build_udp(src, sp, dst, dp, payload)
    assert isinstance(pkt, bytes)
    h = parse_ip(pkt)
    assert isinstance(h, IPHeader)
    assert (h.src, h.dst, h.proto, h.end) == (src, dst, Proto.UDP, len(pkt))
    if h.version == 4:
        assert ip_header_ok(pkt)
    u = parse_udp(pkt, h)
    assert not isinstance(u, Drop)
    assert (u.sport, u.dport, pkt[u.start : u.end]) == (sp, dp, payload)
    assert udp_checksum_ok(pkt, h)
    assert pkt[h.l4 + 6 : h.l4 + 8] != b"\0\0"


@given(st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), port, port,
       st.sampled_from([SYN, SYN | ACK, ACK, ACK | FIN, FIN, ACK | 0x08]),
       st.binary(max_size=100), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))  # fmt: skip
def test_rst_answers_segment(addrs: tuple[bytes, bytes], sp: int, dp: int, flags: int,
                             payload: bytes, seq: int, ack: int) -> None:  # fmt: skip
    src, dst = addrs
    pkt = tcp_packet(src, dst, sp, dp, flags, payload, seq, ack)
    h = parse_ip(pkt)
    assert isinstance(h, IPHeader)
    assert tcp_checksum_ok(pkt, h)
    rst = build_rst(pkt, h)
    assert isinstance(rst, bytes)
    r = parse_ip(rst)
    assert isinstance(r, IPHeader)
    assert (r.src, r.dst) == (dst, src)
    assert tcp_checksum_ok(rst, r)
    sport, dport, rseq, rack, _, rflags = struct.unpack("!HHIIBB", rst[r.l4 : r.l4 + 14])
    assert (sport, dport) == (dp, sp)
    assert rflags & RST
    if flags & ACK:
        assert rseq == ack and not rflags & ACK
    else:
        used = len(payload) + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        assert rack == (seq + used) % 2**32


def test_no_rst_for_rst() -> None:
    pkt = tcp_packet(bytes(4), bytes([1, 2, 3, 4]), 1, 2, RST, b"")
    h = parse_ip(pkt)
    assert isinstance(h, IPHeader)
    assert build_rst(pkt, h) is Drop.REJECTED


def echo_request(src: bytes, dst: bytes, payload: bytes) -> bytes:
    v6 = len(src) == 16
    msg = bytearray([128 if v6 else 8, 0, 0, 0, 0x12, 0x34, 0, 1]) + payload
    if v6:
        pseudo = src + dst + struct.pack("!II", len(msg), Proto.ICMPV6)
        c = naive_checksum(pseudo + bytes(msg))
    else:
        c = naive_checksum(bytes(msg))
    msg[2:4] = c.to_bytes(2, "big")
    return bytes(build_ip(src, dst, Proto.ICMPV6 if v6 else Proto.ICMP, len(msg))) + bytes(msg)


@given(st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), st.binary(max_size=1500))
def test_echo_reply(addrs: tuple[bytes, bytes], payload: bytes) -> None:
    src, dst = addrs
    pkt = echo_request(src, dst, payload)
    h = parse_ip(pkt)
    assert isinstance(h, IPHeader) and is_echo_request(pkt, h)
    assert icmp_checksum_ok(pkt, h)
    rep = build_echo_reply(pkt, h)
    assert isinstance(rep, bytes)
    r = parse_ip(rep)
    assert isinstance(r, IPHeader)
    assert (r.src, r.dst) == (dst, src)
    assert icmp_checksum_ok(rep, r)
    assert rep[r.l4] == (129 if h.version == 6 else 0)
    assert rep[r.l4 + 4 :] == pkt[h.l4 + 4 :]


@given(st.one_of(st.tuples(v4, v4), st.tuples(v6, v6)), port, port, st.binary(max_size=3000))
def test_port_unreachable(addrs: tuple[bytes, bytes], sp: int, dp: int, payload: bytes) -> None:
    src, dst = addrs
    pkt = build_udp(src, sp, dst, dp, payload)
    assert isinstance(pkt, bytes)
    h = parse_ip(pkt)
    assert isinstance(h, IPHeader)
    err = build_port_unreachable(pkt, h)
    r = parse_ip(err)
    assert isinstance(r, IPHeader)
    assert (r.src, r.dst) == (dst, src)
    assert icmp_checksum_ok(err, r)
    assert len(err) <= (576 if h.version == 4 else 1280)
    assert err[r.l4 + 8 : r.l4 + 8 + 28] == pkt[:28]


def fragments(pkt: bytes, size: int) -> list[bytes]:
    """Split an IPv4 packet into fragments carrying `size` (a multiple of 8) data bytes."""
    ihl = (pkt[0] & 15) * 4
    data = pkt[ihl:]
    out = []
    for off in range(0, len(data), size):
        chunk = data[off : off + size]
        hdr = bytearray(pkt[:ihl])
        more = off + size < len(data)
        hdr[2:4] = (ihl + len(chunk)).to_bytes(2, "big")
        hdr[4:6] = b"\x12\x34"
        hdr[6:8] = ((0x2000 if more else 0) | (off // 8)).to_bytes(2, "big")
        hdr[10:12] = b"\0\0"
        hdr[10:12] = naive_checksum(bytes(hdr)).to_bytes(2, "big")
        out.append(bytes(hdr) + chunk)
    return out


@given(st.binary(min_size=1, max_size=4000), st.integers(1, 100), st.randoms())
def test_reassembly_any_order(payload: bytes, eighths: int, rnd) -> None:  # type: ignore[no-untyped-def]
    pkt = build_udp(b"\xc6\x33\x64\x01", 5, b"\xcb\x00\x71\x01", 7, payload)
    assert isinstance(pkt, bytes)
    frags = fragments(pkt, eighths * 8)
    rnd.shuffle(frags)
    r = Reassembler()
    out: object = None
    for i, f in enumerate(frags):
        h = parse_ip(f)
        assert isinstance(h, IPHeader)
        if len(frags) == 1:
            assert not h.frag
            return
        out = r.push(f, h, 0.0)
        if i < len(frags) - 1:
            assert out is None
    whole = bytearray(pkt)
    whole[6] = 0x40
    assert out == bytes(whole) or (out is not None and out[20:] == pkt[20:])
    assert isinstance(out, bytes) and ip_header_ok(out)
    assert len(r) == 0 and r.bytes == 0


def test_reassembly_limits_and_timeout() -> None:
    pkt = build_udp(b"\xc6\x33\x64\x01", 5, b"\xcb\x00\x71\x01", 7, bytes(800))
    assert isinstance(pkt, bytes)
    frags = fragments(pkt, 80)
    r = Reassembler(max_fragments=4, timeout=1.0)
    results = [r.push(f, parse_ip(f), 0.0) for f in frags[:6]]  # type: ignore[arg-type]
    assert Drop.FRAGMENT_LIMIT in results
    r2 = Reassembler(timeout=1.0)
    h0 = parse_ip(frags[0])
    assert r2.push(frags[0], h0, 0.0) is None  # type: ignore[arg-type]
    assert r2.expire(5.0) == 1 and len(r2) == 0 and r2.bytes == 0
    r3 = Reassembler(max_datagrams=1)
    other = bytearray(frags[0])
    other[4] = 0x99
    assert r3.push(frags[0], h0, 0.0) is None  # type: ignore[arg-type]
    assert r3.push(bytes(other), parse_ip(bytes(other)), 0.0) is Drop.FRAGMENT_LIMIT  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.lists(st.binary(min_size=20, max_size=120), max_size=8))
def test_reassembler_never_raises(packets: list[bytes]) -> None:
    r = Reassembler(max_datagrams=4, max_fragments=4, max_bytes=400)
    for p in packets:
        buf = bytearray(p)
        buf[0] = 0x45
        buf[2:4] = len(buf).to_bytes(2, "big")
        buf[6] |= 0x20
        h = parse_ip(bytes(buf))
        if isinstance(h, IPHeader) and h.frag:
            out = r.push(bytes(buf), h, 0.0)
            assert out is None or isinstance(out, bytes | Drop)
        assert r.bytes >= 0
