"""DNS query sniffing (RFC 1035 §4.1; §4.2.2 for TCP's 2-byte length prefix).

Owns: deciding that a UDP datagram, or a TCP stream's first message, is a DNS query with one
question, and reading its name. A query here is QR=0, opcode QUERY, rcode 0, one question, no
answer or authority records and at most two additional ones (OPT, TSIG), whose records must end
exactly where the message does: a strict shape, so that random UDP payloads are not taken for
DNS. The question name may not be compressed (it is the first name in the message). Its
domain is the name lower-cased, without the root dot, if every label is LDH or underscore;
else (and for the root itself) the domain is None.

A hand-written reader rather than dnspython: the checks above are a few lines, and a
prefix-by-prefix stream check needs the header fields one at a time anyway.

Cost (timeit, Python 3.11, dev box): a first TCP byte of 0x10 or more is refused in about
0.2 µs, a datagram that is not a query in under 1 µs; a 44-byte EDNS query sniffs in about 5 µs.
"""

from __future__ import annotations

from ztun.sniff._host import sniffed_name
from ztun.sniff.result import NEED_MORE, Sniffed, StreamResult

HEADER = 12
MIN_QUERY = HEADER + 1 + 4  # header, root name, type and class
#: Largest TCP query sniffed: real ones stay under 1 KiB, even padded (RFC 8467).
MAX_TCP_QUERY = 4096
MAX_ADDITIONAL = 2
MAX_NAME_WIRE = 255


def _header_prefix_ok(msg: bytes) -> bool:
    """Could `msg` begin a query header? Checks each field as soon as its bytes are there."""
    n = len(msg)
    if n > 2 and msg[2] & 0xF8:  # QR must be 0 and opcode QUERY (0)
        return False
    if n > 3 and msg[3] & 0x0F:  # rcode 0 in a query
        return False
    expected = ((4, 0), (5, 1), (6, 0), (7, 0), (8, 0), (9, 0), (10, 0))
    if any(n > i and msg[i] != v for i, v in expected):  # QDCOUNT 1, ANCOUNT 0, NSCOUNT 0
        return False
    return n <= 11 or msg[11] <= MAX_ADDITIONAL


def _skip_name(msg: bytes, pos: int, allow_pointer: bool) -> int:
    """The offset after the name at `pos`, or -1 if it is malformed."""
    wire = 0
    while pos < len(msg):
        n = msg[pos]
        if n == 0:
            return pos + 1
        if n & 0xC0:
            # a pointer ends the name; in the question (the first name) there is nothing to point to
            return pos + 2 if allow_pointer and n & 0xC0 == 0xC0 and pos + 2 <= len(msg) else -1
        wire += n + 1
        if wire >= MAX_NAME_WIRE:
            return -1
        pos += 1 + n
    return -1


def parse_query(msg: bytes) -> Sniffed | None:
    """A whole DNS message → `Sniffed("dns", qname)` if it is a query as above, else None."""
    if len(msg) < MIN_QUERY or not _header_prefix_ok(msg[:HEADER]):
        return None
    name_end = _skip_name(msg, HEADER, allow_pointer=False)
    if name_end < 0 or name_end + 4 > len(msg):
        return None
    pos = name_end + 4
    for _ in range(msg[11]):
        pos = _skip_name(msg, pos, allow_pointer=True)
        if pos < 0 or pos + 10 > len(msg):
            return None
        pos += 10 + int.from_bytes(msg[pos + 8 : pos + 10], "big")
    if pos != len(msg):
        return None
    domain, bad_name = _qname(msg, name_end)
    return Sniffed("dns", domain, bad_name=bad_name)


def _qname(msg: bytes, name_end: int) -> tuple[str | None, bool]:
    """(the asked name, False), or (None, refused) with refused True for an invalid name (the
    root, asked by a priming query, is no name and not refused)."""
    labels: list[bytes] = []
    pos = HEADER
    while pos < name_end - 1:
        n = msg[pos]
        label = msg[pos + 1 : pos + 1 + n]
        if b"." in label:
            return None, True  # a dot inside a label has no text form a rule could match
        labels.append(label)
        pos += 1 + n
    return sniffed_name(b".".join(labels), underscore=True) if labels else (None, False)


def sniff_datagram(data: bytes) -> Sniffed | None:
    return parse_query(data)


def sniff_stream(data: bytes) -> StreamResult:
    """A TCP client's first bytes (2-byte length, then the message) → `Sniffed("dns", …)`,
    `NEED_MORE` while they are a valid prefix of a query, None as soon as they cannot be."""
    if data and data[0] >= MAX_TCP_QUERY >> 8:
        return None  # the common "not DNS" answer, decided by one byte
    if len(data) < 2:
        return NEED_MORE
    length = int.from_bytes(data[:2], "big")
    if not MIN_QUERY <= length < MAX_TCP_QUERY:
        return None
    msg = data[2 : 2 + length]
    if len(msg) < length:
        return NEED_MORE if _header_prefix_ok(msg[:HEADER]) else None
    return parse_query(msg)
