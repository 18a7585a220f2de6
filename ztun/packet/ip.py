"""IPv4 and IPv6 headers: parsing into a small tuple of offsets and address bytes, building.

Parsers never raise on malformed input: they return a `Drop` reason, which the caller counts.
Addresses stay as `bytes` (4 or 16 long) so that they can be dict keys and copied into replies
without conversion; `ipaddress` objects are made only where the router needs them.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from ztun.packet.checksum import Buffer, checksum


class Proto(IntEnum):
    ICMP = 1
    TCP = 6
    UDP = 17
    IPV6_FRAGMENT = 44
    ICMPV6 = 58


class Drop(IntEnum):
    """Why a packet read from the TUN was not used; counted per reason."""

    TRUNCATED = 1
    BAD_VERSION = 2
    BAD_HEADER = 3
    BAD_LENGTH = 4
    BAD_CHECKSUM = 5
    FRAGMENT = 6  # IPv6 fragment, or an IPv4 fragment the reassembler refused
    FRAGMENT_LIMIT = 7
    FRAGMENT_TIMEOUT = 8
    EXTENSION_HEADER = 9
    PROTOCOL = 10  # a transport ztun does not handle
    NOT_UNICAST = 11
    NO_FLOW = 12  # a TCP segment for no known flow
    NAT_FULL = 13
    REJECTED = 14
    ICMP_TYPE = 15
    STOPPING = 16
    GSO = 17  # a super-packet of a kind ztun does not take (legacy UFO, TCP marked as UDP)
    FRAGMENT_OVERSIZE = 18  # IPv4 fragments that would reassemble to more than 65535 bytes
    ERROR = 19  # handling the packet raised an unexpected error (the TUN loop's guard)


#: IPv6 extension headers (RFC 8200 §4) that ztun does not walk: such packets are dropped.
_V6_EXTENSIONS = frozenset({0, 43, 50, 51, 60, 135, 139, 140, 253, 254})


class IPHeader(NamedTuple):
    """One parsed IP header. `l4` is where the transport header starts, `end` one past the
    packet (the total length, which may be shorter than the buffer). `frag` is IPv4's flags and
    fragment offset field without DF (non-zero means a fragment), 0 for IPv6."""

    version: int
    proto: int
    l4: int
    end: int
    src: bytes
    dst: bytes
    frag: int
    ttl: int


def parse_ip(buf: Buffer, size: int | None = None) -> IPHeader | Drop:
    """The header of the packet in `buf[:size]`, or why it is unusable."""
    n = len(buf) if size is None else min(size, len(buf))
    if n < 1:
        return Drop.TRUNCATED
    version = buf[0] >> 4
    if version == 4:
        if n < 20:
            return Drop.TRUNCATED
        ihl = (buf[0] & 0x0F) * 4
        total = (buf[2] << 8) | buf[3]
        if ihl < 20:
            return Drop.BAD_HEADER
        if total < ihl or total > n:
            return Drop.BAD_LENGTH
        frag = ((buf[6] << 8) | buf[7]) & 0x3FFF
        return IPHeader(4, buf[9], ihl, total, bytes(buf[12:16]), bytes(buf[16:20]), frag, buf[8])
    if version == 6:
        if n < 40:
            return Drop.TRUNCATED
        total = 40 + ((buf[4] << 8) | buf[5])
        if total > n:
            return Drop.BAD_LENGTH
        nh = buf[6]
        if nh == Proto.IPV6_FRAGMENT:
            return Drop.FRAGMENT
        if nh in _V6_EXTENSIONS:
            return Drop.EXTENSION_HEADER
        return IPHeader(6, nh, 40, total, bytes(buf[8:24]), bytes(buf[24:40]), 0, buf[7])
    return Drop.BAD_VERSION


def is_unicast(addr: bytes) -> bool:
    """False for multicast, broadcast, unspecified and IPv4 limited-broadcast destinations."""
    if len(addr) == 4:
        return not (addr[0] >= 224 or addr == b"\0\0\0\0")
    return addr[0] != 0xFF and addr != bytes(16)


def build_ip(src: bytes, dst: bytes, proto: int, payload_len: int, ttl: int = 64) -> bytearray:
    """An IPv4 or IPv6 header (by the length of `src`) for `payload_len` bytes of `proto`."""
    if len(src) == 4:
        total = 20 + payload_len
        h = bytearray(20)
        h[0] = 0x45
        h[2], h[3] = total >> 8, total & 0xFF
        h[6] = 0x40  # DF: replies are built to fit; nothing should fragment them
        h[8] = ttl
        h[9] = proto
        h[12:16] = src
        h[16:20] = dst
        c = checksum(h)
        h[10], h[11] = c >> 8, c & 0xFF
        return h
    h = bytearray(40)
    h[0] = 0x60
    h[4], h[5] = payload_len >> 8, payload_len & 0xFF
    h[6] = proto
    h[7] = ttl
    h[8:24] = src
    h[24:40] = dst
    return h


def ip_header_ok(buf: Buffer) -> bool:
    """Whether an IPv4 header's checksum verifies (tests and the reassembler use it)."""
    ihl = (buf[0] & 0x0F) * 4
    return checksum(buf[:ihl]) == 0
