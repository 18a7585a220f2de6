"""UDP datagrams: reading one from a packet and building one back into an IP packet."""

from __future__ import annotations

from typing import NamedTuple

from ztun.packet.checksum import Buffer, checksum, pseudo_header_sum
from ztun.packet.ip import Drop, IPHeader, Proto, build_ip

#: Largest UDP payload that fits an IPv4 packet (65535 - 20 - 8).
MAX_PAYLOAD_V4 = 65507
#: Largest UDP payload that fits an IPv6 packet without a jumbogram (65535 - 8).
MAX_PAYLOAD_V6 = 65527


class UdpHeader(NamedTuple):
    sport: int
    dport: int
    start: int  # payload offset in the packet
    end: int


def parse_udp(buf: Buffer, h: IPHeader) -> UdpHeader | Drop:
    """The ports and payload bounds of the UDP datagram in an (unfragmented) packet."""
    t = h.l4
    if h.end - t < 8:
        return Drop.TRUNCATED
    length = (buf[t + 4] << 8) | buf[t + 5]
    if length < 8 or t + length > h.end:
        return Drop.BAD_LENGTH
    return UdpHeader((buf[t] << 8) | buf[t + 1], (buf[t + 2] << 8) | buf[t + 3], t + 8, t + length)


def build_udp(src: bytes, sport: int, dst: bytes, dport: int, payload: Buffer) -> bytes | Drop:
    """An IPv4 or IPv6 packet (by the address length) carrying one UDP datagram."""
    limit = MAX_PAYLOAD_V4 if len(src) == 4 else MAX_PAYLOAD_V6
    if len(payload) > limit:
        return Drop.BAD_LENGTH
    length = 8 + len(payload)
    seg = bytearray(8)
    seg[0], seg[1], seg[2], seg[3] = sport >> 8, sport & 0xFF, dport >> 8, dport & 0xFF
    seg[4], seg[5] = length >> 8, length & 0xFF
    seg += payload
    c = checksum(seg, pseudo_header_sum(src, dst, Proto.UDP, length))
    if c == 0:
        c = 0xFFFF  # 0 means "no checksum" in IPv4 and is forbidden in IPv6 (RFC 768, 8200)
    seg[6], seg[7] = c >> 8, c & 0xFF
    return bytes(build_ip(src, dst, Proto.UDP, length) + seg)


def udp_checksum_ok(buf: Buffer, h: IPHeader) -> bool:
    seg = buf[h.l4 : h.end]
    if h.version == 4 and seg[6] == 0 and seg[7] == 0:
        return True
    return checksum(seg, pseudo_header_sum(h.src, h.dst, Proto.UDP, len(seg))) == 0
