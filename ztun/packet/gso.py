"""UDP segmentation offload, the pure half: which datagrams go out in one send, and how many
datagrams that came as one are cut apart again.

With `UDP_SEGMENT` (Linux 4.18+) one `sendmsg` carries a buffer of datagrams that are all
`size` bytes long but the last, which may be shorter; the kernel cuts it into datagrams after
the one trip through the stack, so a burst to one destination costs one system call instead of
one per datagram (`runs`). The syscalls live in `ztun.runtime.udpio`.

The TUN has the same offload (USO, Linux 6.2+, negotiated with TUN_F_USO4/6): a write may be
one UDP "super-packet" of many datagrams of one flow, a virtio-net header saying how to cut it
(`build_udp_super`), and a read may be one (its payload cut by `split`).
"""

from __future__ import annotations

from collections.abc import Sequence

from ztun.packet.checksum import pseudo_header_sum
from ztun.packet.ip import Drop, Proto, build_ip
from ztun.packet.virtio import F_NEEDS_CSUM, GSO_UDP_L4, VnetHeader, build_header

#: At most this many datagrams per send (the kernel's UDP_MAX_SEGMENTS, 64 before Linux 6.10).
MAX_SEGMENTS = 64
#: At most this many payload bytes per send (an IPv4 datagram's limit; IPv6's is 20 more).
MAX_BYTES = 65507


def runs(
    datagrams: Sequence[bytes], max_segments: int = MAX_SEGMENTS, max_bytes: int = MAX_BYTES
) -> list[tuple[int, int, int]]:
    """Cut `datagrams` (in order, one destination) into sends: `(start, end, size)` each, where
    `datagrams[start:end]` go out as one buffer of `size`-byte segments (`size` 0: one datagram
    sent as it is). A run is datagrams of equal, non-zero length, optionally ended by one
    shorter datagram, as `UDP_SEGMENT` requires; order is kept."""
    out: list[tuple[int, int, int]] = []
    n = len(datagrams)
    i = 0
    while i < n:
        size = len(datagrams[i])
        j = i + 1
        if size:
            total = size
            while j < n and j - i < max_segments:
                m = len(datagrams[j])
                if m == 0 or m > size or total + m > max_bytes:
                    break
                total += m
                j += 1
                if m < size:
                    break  # a shorter datagram can only end a run
        out.append((i, j, size if j - i > 1 else 0))
        i = j
    return out


def split(buf: bytes | bytearray | memoryview, n: int, size: int) -> list[bytes]:
    """The datagrams in `buf[:n]` that came as one (a UDP super-packet's payload, or one
    `UDP_GRO` receive): `size`-byte pieces, the last possibly shorter (`size` 0 or not below
    `n`: a single datagram)."""
    if size <= 0 or size >= n:
        return [bytes(buf[:n])]
    view = memoryview(buf)
    return [bytes(view[i : min(i + size, n)]) for i in range(0, n, size)]


def build_udp_super(
    src: bytes, sport: int, dst: bytes, dport: int, payloads: Sequence[bytes], size: int
) -> tuple[bytes, bytes] | Drop:
    """A virtio-net header and one IPv4 or IPv6 packet (by the address length) that the TUN
    cuts into one UDP datagram per payload: `payloads` as `runs` groups them (at least two,
    all `size` bytes but the last, at most `MAX_BYTES` together). The UDP checksum is left
    to the kernel (NEEDS_CSUM: the field holds the pseudo-header sum of the whole length,
    which the kernel adjusts for each datagram); the IPv4 header checksum is complete."""
    total = sum(map(len, payloads))
    if len(payloads) < 2 or size <= 0 or total > MAX_BYTES or total <= size:
        return Drop.BAD_LENGTH
    length = 8 + total
    partial = pseudo_header_sum(src, dst, Proto.UDP, length)
    udp = bytes((sport >> 8, sport & 0xFF, dport >> 8, dport & 0xFF, length >> 8, length & 0xFF,
                 partial >> 8, partial & 0xFF))  # fmt: skip
    ip = build_ip(src, dst, Proto.UDP, length)
    l4 = len(ip)
    hdr = build_header(VnetHeader(F_NEEDS_CSUM, GSO_UDP_L4, l4 + 8, size, l4, 6))
    return hdr, b"".join((ip, udp, *payloads))

