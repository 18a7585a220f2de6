"""The Internet checksum: the full RFC 1071 sum and the RFC 1624 incremental update.

The full sum uses one property of one's complement arithmetic: 2**16 ≡ 1 (mod 0xFFFF), so the
folded sum of all 16-bit big-endian words equals the whole buffer read as one big-endian integer
modulo 0xFFFF (with 0xFFFF standing for a non-zero buffer whose sum is ≡ 0). `int.from_bytes`
does that in C, far faster than a Python loop over words.
"""

from __future__ import annotations

from collections.abc import Iterable

Buffer = bytes | bytearray | memoryview


def ones_sum(data: Buffer, initial: int = 0) -> int:
    """The folded 16-bit one's complement sum of `data` (odd length: padded with a zero byte),
    added to `initial` (another folded sum). Never returns 0 for input that is not all zeros."""
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    n += initial
    s = n % 0xFFFF
    if s == 0 and n:
        return 0xFFFF
    return s


def finish(total: int) -> int:
    """The checksum field for a folded sum: its complement."""
    return ~total & 0xFFFF


def checksum(data: Buffer, initial: int = 0) -> int:
    """The checksum field value that makes `data` (with a zero checksum field) verify."""
    return finish(ones_sum(data, initial))


def fold(x: int) -> int:
    """Fold a non-negative sum of 16-bit words into 16 bits with end-around carry."""
    while x >> 16:
        x = (x & 0xFFFF) + (x >> 16)
    return x


def delta(old: Iterable[int], new: Iterable[int]) -> int:
    """The adjustment for changing 16-bit words `old` into `new` (RFC 1624 eqn. 3: ~m + m')."""
    d = 0
    for w in old:
        d += ~w & 0xFFFF
    for w in new:
        d += w
    return fold(d)


def words(data: Buffer) -> list[int]:
    """The 16-bit big-endian words of an even-length field (an address, a port pair)."""
    return [(data[i] << 8) | data[i + 1] for i in range(0, len(data) - 1, 2)]


def adjust(field: int, d: int) -> int:
    """A checksum field after applying an adjustment from `delta` (RFC 1624 eqn. 3)."""
    x = (~field & 0xFFFF) + d
    x = (x & 0xFFFF) + (x >> 16)
    x = (x & 0xFFFF) + (x >> 16)
    return ~x & 0xFFFF


def pseudo_header_sum(src: Buffer, dst: Buffer, proto: int, length: int) -> int:
    """The folded sum of the IPv4 or IPv6 pseudo-header (addresses, protocol, L4 length)."""
    return ones_sum(bytes(src) + bytes(dst), fold(proto + (length >> 16) + (length & 0xFFFF)))
