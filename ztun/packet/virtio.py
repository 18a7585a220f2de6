"""The virtio-net header that a TUN opened with IFF_VNET_HDR puts before every packet.

With offload on (TUNSETOFFLOAD CSUM|TSO4|TSO6) the kernel hands over TCP "super-packets" of up to
64 KiB that it would otherwise have cut into MTU-sized segments, and takes them back the same
way: one read and one write per 64 KiB instead of per 9000 bytes. The header says how:

    struct virtio_net_hdr { u8 flags; u8 gso_type; u16 hdr_len, gso_size, csum_start, csum_offset; }

in host byte order (the legacy layout the TUN uses unless told otherwise).

`F_NEEDS_CSUM` means the transport checksum is unfinished: its field holds the folded,
*non-complemented* sum of the pseudo-header, and whoever sends the packet on sums the bytes from
`csum_start` to the end and stores the complement at `csum_start + csum_offset`. A NAT that
changes addresses must therefore move that partial sum by the address change (`adjust_partial`,
RFC 1624's update without the complements); port changes need nothing, as the ports are summed
later with the rest of the segment. The IPv4 header checksum is always complete.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ztun.packet.checksum import Buffer, fold, ones_sum
from ztun.packet.ip import Drop

#: Size of `struct virtio_net_hdr` (without the mergeable-buffers count).
HEADER_LEN = 10
_HEADER = struct.Struct("=BBHHHH")

F_NEEDS_CSUM = 0x01
F_DATA_VALID = 0x02

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

#: An all-zero header: a complete packet with every checksum filled in (what ztun builds itself).
PLAIN = bytes(HEADER_LEN)


class VnetHeader(NamedTuple):
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int


def parse_header(buf: Buffer) -> VnetHeader | Drop:
    """The header at the start of `buf`, or Drop.TRUNCATED when it is shorter than one."""
    if len(buf) < HEADER_LEN:
        return Drop.TRUNCATED
    return VnetHeader(*_HEADER.unpack_from(buf, 0))


def build_header(h: VnetHeader) -> bytes:
    return _HEADER.pack(*h)


def gso_ok(gso_type: int, proto: int) -> bool:
    """Whether ztun may pass a packet with this GSO type on: none at all, or TCP super-packets
    carrying TCP (a UDP super-packet is never passed on: the stack cuts it into datagrams)."""
    g = gso_type & ~GSO_ECN
    return g == GSO_NONE or (proto == 6 and g in (GSO_TCPV4, GSO_TCPV6))


def adjust_partial(field: int, d: int) -> int:
    """A partial (non-complemented) checksum field after an address change whose adjustment
    `d` comes from `checksum.delta(old, new)`: the pseudo-header sum moves by the same amount."""
    return fold(field + d)


def finish_partial(buf: bytearray, end: int, csum_start: int, csum_offset: int) -> bool:
    """Complete a NEEDS_CSUM checksum the way the kernel or a NIC would: sum `buf[csum_start:end]`
    (the field holds the pseudo-header part) and store the complement. False when the offsets do
    not fit the packet. Tests use it to check the partial-sum rewrite against a full checksum."""
    o = csum_start + csum_offset
    if csum_start >= end or o + 2 > end:
        return False
    c = ~ones_sum(buf[csum_start:end]) & 0xFFFF
    buf[o], buf[o + 1] = c >> 8, c & 0xFF
    return True
