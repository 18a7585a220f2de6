"""The virtio-net header codec and the partial (NEEDS_CSUM) checksum rewrite of the TCP NAT."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from ztun.nat.tcp import FORWARD, NEW, TcpNat
from ztun.packet.checksum import fold, ones_sum, pseudo_header_sum
from ztun.packet.ip import Drop, IPHeader, Proto, build_ip, ip_header_ok, parse_ip
from ztun.packet.tcp import ACK, FIN, SYN, tcp_checksum_ok
from ztun.packet.virtio import (
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    HEADER_LEN,
    PLAIN,
    VnetHeader,
    adjust_partial,
    build_header,
    finish_partial,
    gso_ok,
    parse_header,
)

A4, B4 = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
A6 = bytes.fromhex("fdfedcba987600000000000000000001")
B6 = bytes.fromhex("fdfedcba987600000000000000000002")
P = 40000


@given(st.binary(max_size=40))
def test_parse_header_never_raises(data: bytes) -> None:
    h = parse_header(data)
    if len(data) < HEADER_LEN:
        assert h == Drop.TRUNCATED
    else:
        assert isinstance(h, VnetHeader)
        assert build_header(h) == data[:HEADER_LEN]


def test_plain_header_is_zero() -> None:
    assert parse_header(PLAIN) == VnetHeader(0, 0, 0, 0, 0, 0)


@given(st.integers(0, 255), st.integers(0, 255))
def test_gso_ok_only_tcp(gso_type: int, proto: int) -> None:
    ok = gso_ok(gso_type, proto)
    g = gso_type & ~GSO_ECN
    assert ok == (g == GSO_NONE or (proto == 6 and g in (GSO_TCPV4, GSO_TCPV6)))
    assert not gso_ok(GSO_UDP_L4, 17) and not gso_ok(GSO_UDP, 17)


def partial_segment(src: bytes, dst: bytes, sp: int, dp: int, flags: int,
                    payload: bytes) -> bytearray:  # fmt: skip
    """A TCP segment as a kernel with checksum offload sends it: the checksum field holds the
    folded pseudo-header sum, not complemented."""
    seg = bytearray(struct.pack("!HHIIBBHHH", sp, dp, 7, 9, 5 << 4, flags, 1000, 0, 0)) + payload
    part = pseudo_header_sum(src, dst, Proto.TCP, len(seg))
    seg[16:18] = part.to_bytes(2, "big")
    return bytearray(build_ip(src, dst, Proto.TCP, len(seg))) + seg


def finish(pkt: bytearray) -> IPHeader:
    """Complete the checksum as the kernel would and check the result verifies."""
    h = parse_ip(bytes(pkt))
    assert isinstance(h, IPHeader)
    assert finish_partial(pkt, h.end, h.l4, 16)
    h = parse_ip(bytes(pkt))
    assert isinstance(h, IPHeader)
    assert tcp_checksum_ok(bytes(pkt), h)
    if h.version == 4:
        assert ip_header_ok(bytes(pkt))
    return h


addr_pairs = st.one_of(
    st.tuples(st.just(4), st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4)),
    st.tuples(st.just(6), st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16)),
)


@given(addr_pairs, st.integers(1, 65535), st.integers(1, 65535), st.binary(max_size=2000),
       st.sampled_from([ACK, ACK | 0x08, ACK | FIN]))  # fmt: skip
def test_partial_rewrite_then_finish_verifies(fam: tuple[int, bytes, bytes], sp: int, dp: int,
                                              payload: bytes, flags: int) -> None:  # fmt: skip
    version, s, d = fam
    a, b = (A4, B4) if version == 4 else (A6, B6)
    if (s, d) == (a, b):
        return
    nat = TcpNat(a, b, P)
    syn = partial_segment(s, d, sp, dp, SYN, b"")
    assert nat.translate(syn, len(syn), 0.0, partial=True) == NEW
    n = nat.add(s, sp, d, dp, 0.0)
    assert isinstance(n, int) and not isinstance(n, Drop)
    for pkt, want in (
        (partial_segment(s, d, sp, dp, flags, payload), (b, a, n, P)),
        (partial_segment(a, b, P, n, flags, payload), (d, s, dp, sp)),  # the listener's side
    ):
        assert nat.translate(pkt, len(pkt), 1.0, partial=True) == FORWARD
        # Before finishing, the field is exactly the new pseudo-header's partial sum.
        h = parse_ip(bytes(pkt))
        assert isinstance(h, IPHeader)
        field = int.from_bytes(pkt[h.l4 + 16 : h.l4 + 18], "big")
        want_part = pseudo_header_sum(want[0], want[1], Proto.TCP, h.end - h.l4)
        assert field % 0xFFFF == want_part % 0xFFFF
        h = finish(pkt)
        assert (h.src, h.dst) == want[:2]
        assert struct.unpack("!HH", pkt[h.l4 : h.l4 + 4]) == want[2:]
        assert pkt[h.l4 + 20 :] == payload


@given(st.integers(0, 0xFFFF), st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=16),
       st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=16))  # fmt: skip
def test_adjust_partial_is_sum_arithmetic(field: int, old: list[int], new: list[int]) -> None:
    from ztun.packet.checksum import delta

    k = min(len(old), len(new))
    old, new = old[:k], new[:k]
    got = adjust_partial(field, delta(old, new))
    # field - sum(old) + sum(new), in one's complement (mod 0xFFFF)
    assert got % 0xFFFF == (field - sum(old) + sum(new)) % 0xFFFF
    assert got == fold(got)


@given(st.binary(max_size=200), st.integers(0, 300), st.integers(0, 300))
def test_finish_partial_never_raises(data: bytes, start: int, offset: int) -> None:
    buf = bytearray(data)
    o = start + offset
    pseudo = int.from_bytes(buf[o : o + 2], "big")  # the partial sum stands in for it
    ok = finish_partial(buf, len(buf), start, offset)
    if ok and offset % 2 == 0:
        # What a receiver checks: data plus pseudo-header sum to "minus zero".
        assert ones_sum(buf[start:], pseudo) % 0xFFFF == 0
