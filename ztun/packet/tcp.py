"""TCP segments: reading ports and flags, and building the RST that refuses a segment.

RFC 9293 §3.10.7.1: a reset for a segment that carries ACK takes its sequence number from that
ACK; otherwise the reset acknowledges everything the segment occupied (SYN and FIN count one).
"""

from __future__ import annotations

from ztun.packet.checksum import Buffer, checksum, pseudo_header_sum
from ztun.packet.ip import Drop, IPHeader, Proto, build_ip

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10


def tcp_header_len(buf: Buffer, h: IPHeader) -> int | Drop:
    """The TCP header length of the segment, or Drop when it does not fit the packet."""
    if h.end - h.l4 < 20:
        return Drop.TRUNCATED
    off = (buf[h.l4 + 12] >> 4) * 4
    if off < 20 or h.l4 + off > h.end:
        return Drop.BAD_HEADER
    return off


def build_rst(buf: Buffer, h: IPHeader) -> bytes | Drop:
    """A RST answering the TCP segment `buf` (parsed as `h`), from its destination; Drop for
    a segment that must not be answered (itself a RST) or cannot be read."""
    hl = tcp_header_len(buf, h)
    if isinstance(hl, Drop):
        return hl
    t = h.l4
    flags = buf[t + 13]
    if flags & RST:
        return Drop.REJECTED
    seg = bytearray(20)
    seg[0:2] = buf[t + 2 : t + 4]  # their destination port is our source port
    seg[2:4] = buf[t : t + 2]
    if flags & ACK:
        seg[4:8] = buf[t + 8 : t + 12]
        seg[13] = RST
    else:
        seq = int.from_bytes(buf[t + 4 : t + 8], "big")
        length = h.end - t - hl + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
        seg[8:12] = ((seq + length) & 0xFFFFFFFF).to_bytes(4, "big")
        seg[13] = RST | ACK
    seg[12] = 5 << 4
    c = checksum(seg, pseudo_header_sum(h.dst, h.src, Proto.TCP, 20))
    seg[16], seg[17] = c >> 8, c & 0xFF
    return bytes(build_ip(h.dst, h.src, Proto.TCP, 20) + seg)


def tcp_checksum_ok(buf: Buffer, h: IPHeader) -> bool:
    """Whether the segment's checksum verifies (tests use it)."""
    seg = buf[h.l4 : h.end]
    return checksum(seg, pseudo_header_sum(h.src, h.dst, Proto.TCP, len(seg))) == 0
