"""DNS wire format by hand, for the common case only: read a query's question, scan an answer.

Why it exists: on the hijack path dnspython cost ~430 µs of CPU per query (measured through
the TUN with bench/bench_dns.py, issue 11: `Message.from_wire` ~70 µs per parse, done two or
three times a query, and `to_wire` ~100 µs), ten times sing-box's 38 µs. Reading the question
and scanning an answer here costs a few µs (`read_question` ~3 µs, `scan_response` ~13 µs for
a three-record answer, against ~220 µs for dnspython's from_wire + to_wire of it, on the bench
machine), and the cache hands back the upstream bytes with their id and TTLs patched in place
(~1 µs), so a hijacked query never builds a Message. Through the TUN: 95 µs of CPU per query
on cache misses, 30 µs on hits (bench/README.md).

Deliberately narrow: anything outside the plain case (not a single-question QUERY, a name with
characters dnspython would escape, record types it does not fully check here, EDNS options
dnspython parses specially, TSIG, ...) returns None, and the caller takes the dnspython path
(`ztun.dns.message`), which stays the one place that knows every corner. What is accepted here
is accepted by dnspython too, and reads the same (tests/unit/dns/test_dns_wire.py compares
them on generated messages).

Pure and bounded: no I/O, every loop is bounded by the message size (65535) or a constant.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Question", "Scan", "aged", "answers", "read_question", "scan_response", "with_id",
]  # fmt: skip

MAX_MESSAGE = 65535
#: Negative answers are kept no longer than this (as `ztun.dns.message.NEGATIVE_TTL_CAP`).
NEGATIVE_TTL_CAP = 300
#: CNAME hops followed for addresses (as `ztun.dns.message.MAX_CNAME_HOPS`).
MAX_CNAME_HOPS = 16
#: Compression pointers one name may follow (dnspython's own limit).
MAX_POINTER_HOPS = 16

_A, _NS, _CNAME, _SOA, _PTR, _MX, _TXT, _AAAA, _DNAME, _OPT = 1, 2, 5, 6, 12, 15, 16, 28, 39, 41
_IN = 1
_RCODE_NOERROR, _RCODE_NXDOMAIN = 0, 3
_QR, _TC = 0x8000, 0x0200
#: Rdata types whose rdata is one domain name.
_NAME_RDATA = frozenset({_NS, _CNAME, _PTR, _DNAME})
#: Types of which an RRset holds one record (dnspython's singletons)
_SINGLETONS = frozenset({_CNAME, _SOA, _DNAME})
#: Record types whose rdata is checked here exactly as dnspython would; others → slow path.
_KNOWN = frozenset({_A, _AAAA, _SOA, _MX, _TXT}) | _NAME_RDATA
#: EDNS options dnspython parses with rules of its own (EDE, ECS, ...): slow path. NSID is
#: plain bytes; COOKIE is checked below.
_SPECIAL_OPTIONS = frozenset({8, 15, 18, 22, 23, 24, 25})
_COOKIE = 10
#: Name bytes dnspython's text form shows as they are (others are escaped), lower-cased.
_PLAIN = bytes(range(256)).translate(None, bytes(
    c for c in range(256)
    if not (0x21 <= c <= 0x7E) or chr(c) in '"().;\\@$'
))  # fmt: skip
_PLAIN_OR_DOT = _PLAIN + b"."
_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")

_HEADER = struct.Struct("!HHHHHH")
_RR = struct.Struct("!HHIH")
_HH = struct.Struct("!HH")
_TTL = struct.Struct("!I")

#: dnspython's RRsets as the scan sees them: (section, owner, type) → [ttl, unique rdatas]
_Groups = dict[tuple[int, bytes, int], list[Any]]


# Question and Scan are made once per query and never changed: plain slotted dataclasses,
# since a frozen one's __init__ costs about four times as much (object.__setattr__ per field).
@dataclass(slots=True)
class Question:
    """A plain query's header and question."""

    id: int
    flags: int
    #: lower case, no root dot ("" for the root), as `message.question` gives it
    name: str
    #: the question name in wire form, lower-cased (no compression in a query's question)
    qname: bytes
    qtype: int
    qclass: int
    #: offset just past the question
    end: int
    #: an OPT record follows the question
    has_opt: bool


@dataclass(slots=True)
class Scan:
    """What the client needs of an answer to `question`, read without building a Message."""

    id: int
    flags: int
    rcode: int
    truncated: bool
    #: where each record's TTL field is (OPT excluded: its "TTL" holds EDNS flags)
    ttl_offsets: tuple[int, ...]
    #: how long the answer may be reused (as `message.min_ttl`)
    min_ttl: int
    #: A/AAAA addresses (packed, 4 or 16 bytes) of the asked name through CNAMEs, with TTLs
    addresses: tuple[tuple[bytes, int], ...]


def read_question(wire: bytes) -> Question | None:
    """The question of a plain query: one question, opcode QUERY, QR clear, no answer or
    authority records, at most one additional record and that one an OPT whose options read
    cleanly, a name whose text needs no escaping, and nothing after. None otherwise (the
    dnspython path decides what to make of it)."""
    n = len(wire)
    if n < 17 or n > MAX_MESSAGE:
        return None
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(wire)
    if flags & 0xF800 or qd != 1 or an or ns or ar > 1:  # QR and opcode bits must be 0
        return None
    pos = 12
    labels: list[bytes] = []
    while True:
        length = wire[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:  # a pointer or a reserved label type: not in a plain query
            return None
        labels.append(wire[pos + 1 : pos + 1 + length])
        pos += 1 + length
        if pos - 12 > 254 or pos >= n:
            return None
    if pos + 4 > n:
        return None
    qtype, qclass = _HH.unpack_from(wire, pos)
    qname = wire[12:pos].translate(_LOWER)
    pos += 4
    if ar:
        end = _opt_end(wire, pos, n)
        if end != n:
            return None
    elif pos != n:
        return None
    text = b".".join(labels)
    # One check for all labels: plain characters or the dots put between them (a label with
    # a dot of its own shows as one dot too many).
    if text.translate(None, _PLAIN_OR_DOT) or text.count(b".") != max(0, len(labels) - 1):
        return None
    name = text.translate(_LOWER).decode("ascii")
    return Question(qid, flags, name, qname, qtype, qclass, pos, bool(ar))


def _opt_end(wire: bytes, pos: int, n: int) -> int:
    """The end of an OPT record at `pos` (owner root), or -1 when it is not one dnspython
    reads as plain options."""
    if pos + 11 > n or wire[pos] != 0:
        return -1
    rtype, _payload, _ttl, rdlen = _RR.unpack_from(wire, pos + 1)
    start = pos + 11
    end = start + rdlen
    if rtype != _OPT or end > n or not _options_ok(wire, start, end):
        return -1
    return end


def _options_ok(wire: bytes, pos: int, end: int) -> bool:
    while pos < end:
        if pos + 4 > end:
            return False
        code, size = _HH.unpack_from(wire, pos)
        pos += 4 + size
        if pos > end or code in _SPECIAL_OPTIONS:
            return False
        if code == _COOKIE and not (size == 8 or 16 <= size <= 40):
            return False
    return True


def _name(wire: bytes, pos: int, limit: int) -> tuple[bytes, int]:
    """A possibly compressed name at `pos` (not reading past `limit`): (its labels in wire form,
    lower-cased, uncompressed; the offset after it where it sits). Raises ValueError where
    dnspython would refuse it (pointers must point back, before the name and every earlier
    target; a name is at most 255 bytes)."""
    out = bytearray()
    after = -1
    start = pos
    biggest = pos
    hops = 0
    while True:
        if pos >= limit:
            raise ValueError("name runs past its end")
        length = wire[pos]
        if length == 0:
            pos += 1
            break
        if length < 64:
            stop = pos + 1 + length
            if stop > limit:
                raise ValueError("label runs past its end")
            out += wire[pos:stop]
            pos = stop
        elif length >= 192:
            if pos + 2 > limit:
                raise ValueError("pointer runs past its end")
            target = ((length & 0x3F) << 8) | wire[pos + 1]
            if after < 0:
                after = pos + 2
            if target >= biggest:
                raise ValueError("pointer does not point back")
            hops += 1
            if hops > MAX_POINTER_HOPS:
                raise ValueError("pointer chain too long")
            biggest = target
            limit = start  # what a pointer leads to may not overlap the part read before
            start = pos = target
        else:
            raise ValueError("reserved label type")
        if len(out) > 254:
            raise ValueError("name too long")
    out.append(0)
    return bytes(out).translate(_LOWER), (pos if after < 0 else after)


def scan_response(wire: bytes, question: Question) -> Scan | None:
    """Scan an answer to `question`: QR set, opcode QUERY, the same id, one question equal to
    it (names compared without case), records of types read here, at most one OPT (last
    section, root owner), nothing after. None for anything else (malformed or unusual: the
    dnspython path takes it)."""
    try:
        return _scan(wire, question)
    except (ValueError, IndexError, struct.error):
        return None


def _scan(wire: bytes, q: Question) -> Scan | None:
    n = len(wire)
    if n < 12 or n > MAX_MESSAGE:
        return None
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(wire)
    if qid != q.id or not flags & _QR or flags & 0x7800 or qd != 1:
        return None
    qname = q.qname
    pos = 12 + len(qname)
    # Servers echo the question as it was asked: compare bytes, walk the name only if not.
    if wire[12:pos].translate(_LOWER) != qname:
        qname, pos = _name(wire, 12, n)
        if qname != q.qname:
            return None
    if pos + 4 > n:
        return None
    if _HH.unpack_from(wire, pos) != (q.qtype, q.qclass):
        return None
    pos += 4
    offsets: list[int] = []
    # dnspython's RRsets, by (section, owner, type): [ttl (the smallest), unique rdatas]
    groups: _Groups = {}
    answer_ttl = -1
    soa_key: tuple[int, bytes, int] | None = None
    seen_opt = False
    extended_rcode = 0
    total = an + ns + ar
    for index in range(total):
        if wire[pos] == 0xC0 and wire[pos + 1] == 12:
            owner, pos = qname, pos + 2  # the usual owner: a pointer to the question's name
        else:
            owner, pos = _name(wire, pos, n)
        if pos + 10 > n:
            return None
        rtype, rclass, ttl, rdlen = _RR.unpack_from(wire, pos)
        start = pos + 10
        end = start + rdlen
        if end > n:
            return None
        if rtype == _OPT:
            if index < an + ns or seen_opt or owner != b"\x00":
                return None
            if not _options_ok(wire, start, end):
                return None
            seen_opt = True
            # EDNS (RFC 6891 §6.1.3): the OPT record's TTL carries the upper 8 bits of the
            # rcode (BADVERS is 16), which a 4-bit header rcode alone would read as NOERROR.
            extended_rcode = ttl >> 24
            pos = end
            continue
        if rtype not in _KNOWN or rclass != _IN:
            return None
        offsets.append(pos + 4)
        if ttl > 0x7FFFFFFF:  # dnspython reads these as 0 (RFC 2181 §8)
            ttl = 0
        if rtype == _A and rdlen == 4:  # the usual record, without a call
            rdata: object = wire[start:end]
        else:
            rdata = _rdata(wire, rtype, start, end)
        key = (0 if index < an else 1 if index < an + ns else 2, owner, rtype)
        group = groups.get(key)
        if group is None:
            groups[key] = [ttl, [rdata]]
        else:
            group[0] = min(group[0], ttl)
            if rtype in _SINGLETONS:  # dnspython keeps the last one (and the smallest TTL)
                group[1] = [rdata]
            elif rdata not in group[1]:
                group[1].append(rdata)
        if index < an:
            answer_ttl = ttl if answer_ttl < 0 else min(answer_ttl, ttl)
        elif index < an + ns and rtype == _SOA and soa_key is None:
            soa_key = key
        pos = end
    if pos != n:
        return None
    rcode = (extended_rcode << 4) | (flags & 0x000F)
    if answer_ttl >= 0:
        keep = answer_ttl
    elif soa_key is not None:
        soa_ttl, soas = groups[soa_key]
        keep = min(soa_ttl, soas[0][0], NEGATIVE_TTL_CAP)
    else:
        keep = 0
    addresses = _addresses(groups, q.qname) if an else ()
    return Scan(qid, flags, rcode, bool(flags & _TC), tuple(offsets), keep, addresses)


def _rdata(wire: bytes, rtype: int, start: int, end: int) -> object:
    """The rdata's identity for de-duplication and what the scan needs of it: the address, the
    CNAME target, the SOA minimum; raises ValueError where dnspython would refuse it."""
    size = end - start
    if rtype in (_A, _AAAA):
        if size != (4 if rtype == _A else 16):
            raise ValueError("address of the wrong size")
        return wire[start:end]
    if rtype in _NAME_RDATA:
        target, after = _name(wire, start, end)
        if after != end:
            raise ValueError("junk after the name")
        return target
    if rtype == _SOA:
        mname, pos = _name(wire, start, end)
        rname, pos = _name(wire, pos, end)
        if pos + 20 != end:
            raise ValueError("SOA of the wrong size")
        # minimum first: the negative TTL reads it; the rest only tells records apart
        return (_TTL.unpack_from(wire, pos + 16)[0], mname, rname, wire[pos : pos + 16])
    if rtype == _MX:
        if size < 3:
            raise ValueError("MX too short")
        exchange, after = _name(wire, start + 2, end)
        if after != end:
            raise ValueError("junk after the name")
        return (wire[start : start + 2], exchange)
    # TXT: one or more counted strings filling the rdata exactly
    if size < 1:
        raise ValueError("empty TXT")
    pos = start
    while pos < end:
        pos += 1 + wire[pos]
    if pos != end:
        raise ValueError("TXT string runs past its end")
    return wire[start:end]


def _addresses(groups: _Groups, qname: bytes) -> tuple[tuple[bytes, int], ...]:
    """As `message.addresses`: the answer section's A/AAAA records of the asked name through
    CNAMEs, each TTL capped by the CNAMEs that led to it."""
    out: list[tuple[bytes, int]] = []
    name = qname
    cap = 0x7FFFFFFF
    seen: set[bytes] = set()
    for _ in range(MAX_CNAME_HOPS + 1):
        if name in seen:
            break
        seen.add(name)
        for (section, owner, rtype), group in groups.items():  # in the answer's order
            if section == 0 and owner == name and rtype in (_A, _AAAA):
                ttl = min(group[0], cap)
                for ip in group[1]:
                    out.append((ip, ttl))
        alias = groups.get((0, name, _CNAME))
        if alias is None:
            break
        name = alias[1][0]
        cap = min(cap, alias[0])
    return tuple(out)


def answers(query: bytes, response: bytes) -> bool:
    """`response` answers `query`: the same id, QR set, the same question (names compared
    without case, and read through compression). A transport drops anything else, so a stray
    or spoofed datagram for another query is never taken as the answer."""
    if len(response) < 12 or response[:2] != query[:2] or not response[2] & (_QR >> 8):
        return False
    end = _plain_name_end(query)
    if end > 0 and response[12:end] == query[12:end]:
        return True  # the question echoed byte for byte, as servers do
    try:
        qname, qend = _name(query, 12, len(query))
        rname, rend = _name(response, 12, len(response))
    except ValueError:
        return False
    if qend + 4 > len(query) or rend + 4 > len(response):
        return False
    return qname == rname and query[qend : qend + 4] == response[rend : rend + 4]


def _plain_name_end(query: bytes) -> int:
    """The offset past the question (name, type, class) of a query whose name has no
    pointers, or -1."""
    pos, n = 12, len(query)
    while pos < n:
        length = query[pos]
        if length == 0:
            return pos + 5 if pos + 5 <= n else -1
        if length > 63:
            return -1
        pos += 1 + length
    return -1


def with_id(wire: bytes, qid: int) -> bytes:
    """`wire` with message id `qid`."""
    return qid.to_bytes(2, "big") + wire[2:]


def aged(wire: bytes, ttl_offsets: tuple[int, ...], seconds: int, qid: int | None = None) -> bytes:
    """A copy of `wire` with every TTL at `ttl_offsets` lowered by `seconds` (not below 0; one
    above 2**31-1 reads as 0, as dnspython has it), and the id set to `qid` when given."""
    out = bytearray(wire)
    if qid is not None:
        out[0] = qid >> 8
        out[1] = qid & 0xFF
    if seconds > 0:
        for off in ttl_offsets:
            (ttl,) = _TTL.unpack_from(out, off)
            if ttl > 0x7FFFFFFF:
                ttl = 0
            _TTL.pack_into(out, off, max(0, ttl - seconds))
    return bytes(out)
