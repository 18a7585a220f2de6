"""DNS messages: parse queries and responses safely, read what routing needs, build answers.

dnspython does the wire format. What this module adds is a boundary: whatever bytes arrive,
the parsers return a Message or raise `ztun.errors.RemoteProtocolError` (dnspython raises
dozens of exception types, some not even DNSException), and every builder returns wire bytes
for a query that `parse_query` accepted.

Pure: no clock (TTLs are numbers in, numbers out), no sockets.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ztun.address import NAME_REFUSALS, IPAddress
from ztun.errors import BadNameError, RemoteProtocolError

__all__ = [
    "MAX_MESSAGE",
    "NEGATIVE_TTL_CAP",
    "RCODES",
    "Strategy",
    "addresses",
    "answer_with",
    "apply_strategy",
    "blocked_by_strategy",
    "formerr_for",
    "min_ttl",
    "nodata",
    "nxdomain",
    "parse_query",
    "parse_record",
    "parse_response",
    "predefined",
    "question",
    "refused",
    "servfail",
    "to_wire",
]

#: The largest DNS message (the TCP length prefix is 16 bits).
MAX_MESSAGE = 65535
#: Records a query may carry besides its question (an OPT, a TSIG or SIG(0), an IXFR's SOA):
#: a client's 64 KB "query" of thousands of records would cost ~100 ms of dnspython's CPU on
#: the event loop before it could be refused (found by the fuzz run, bench/fuzz).
MAX_QUERY_RECORDS = 4
#: Negative answers are kept no longer than this (RFC 2308 suggests hours; a name that starts
#: to exist should not stay missing for long behind ztun).
NEGATIVE_TTL_CAP = 300
#: The TTL of a predefined record written without one (what zone-file readers default to).
DEFAULT_RECORD_TTL = 3600
#: CNAME hops `addresses` follows before giving up (a loop or an absurd chain).
MAX_CNAME_HOPS = 16
#: Response codes a `predefined` action may answer with.
RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")

Strategy = Literal["prefer_ipv4", "prefer_ipv6", "ipv4_only", "ipv6_only"]

_A = dns.rdatatype.A
_AAAA = dns.rdatatype.AAAA
_CNAME = dns.rdatatype.CNAME
_SOA = dns.rdatatype.SOA
_IN = dns.rdataclass.IN
_QR = dns.flags.QR
_RD = dns.flags.RD


# -- parsing -----------------------------------------------------------------------------------


#: dnspython's refusals of a name in wire form: too long, a label length over 63.
_BAD_NAMES = (dns.name.NameTooLong, dns.name.BadLabelType, dns.name.LabelTooLong)


def _question_name_problem(wire: bytes | bytearray | memoryview) -> str | None:
    """What is wrong with the first question's name, read only as far as a name can go (255
    bytes): dnspython reads a 16 KB run of labels to its end before it refuses it (15 ms)."""
    if wire[4:6] == b"\x00\x00":
        return None  # no question (refused below for that)
    pos, total = 12, 0
    while pos < len(wire):
        n = wire[pos]
        if n == 0 or n >= 0xC0:  # the end, or a pointer (dnspython checks those)
            return None
        if n > 63:
            return "has a reserved label type (a label over 63 bytes)"
        total += n + 1
        if total > 254:  # with the root's zero byte: over 255
            return "longer than 255 bytes in wire form"
        pos += n + 1
    return None


def _from_wire(wire: bytes, what: str) -> dns.message.Message:
    if not isinstance(wire, bytes | bytearray | memoryview):
        raise RemoteProtocolError(f"a DNS {what} must be bytes")
    if len(wire) > MAX_MESSAGE:
        raise RemoteProtocolError(f"DNS {what} of {len(wire)} bytes is longer than {MAX_MESSAGE}")
    if len(wire) < 12:
        raise RemoteProtocolError(f"DNS {what} of {len(wire)} bytes is shorter than its header")
    problem = _question_name_problem(wire)
    if problem is not None:
        NAME_REFUSALS[f"dns-{what}"] += 1
        raise BadNameError(f"DNS {what}: question name {problem}")
    try:
        msg = dns.message.from_wire(bytes(wire))
    except _BAD_NAMES as exc:
        # The wire form bounds a name (255 bytes, labels of 63, no empty label inside), so a
        # name over those limits is one of these; the answer is FORMERR, the count "dns-…".
        NAME_REFUSALS[f"dns-{what}"] += 1
        raise BadNameError(f"DNS {what}: {exc}") from None
    except Exception as exc:  # dnspython raises many kinds (ValueError, struct.error, ...)
        raise RemoteProtocolError(f"malformed DNS {what}: {exc or type(exc).__name__}") from None
    if not isinstance(msg, dns.message.Message) or msg.had_tsig:
        # TSIG needs a key ztun does not have; answering would mean signing with none.
        raise RemoteProtocolError(f"DNS {what} with a TSIG signature is not supported")
    if len(msg.question) != 1:
        raise RemoteProtocolError(f"DNS {what} has {len(msg.question)} questions, not one")
    if msg.opcode() != dns.opcode.QUERY:
        raise RemoteProtocolError(f"DNS {what} has opcode {msg.opcode()}, not QUERY")
    return msg


def parse_query(wire: bytes) -> dns.message.Message:
    """A query with exactly one question and opcode QUERY; RemoteProtocolError otherwise."""
    if isinstance(wire, bytes | bytearray | memoryview) and 12 <= len(wire) <= MAX_MESSAGE:
        records = sum(int.from_bytes(wire[i : i + 2], "big") for i in (6, 8, 10))
        if records > MAX_QUERY_RECORDS:
            raise RemoteProtocolError(f"DNS query with {records} records besides its question")
    msg = _from_wire(wire, "query")
    if msg.flags & _QR:
        raise RemoteProtocolError("DNS query has the response flag set")
    return msg


def parse_response(wire: bytes) -> dns.message.Message:
    """A response with exactly one question and opcode QUERY; RemoteProtocolError otherwise."""
    msg = _from_wire(wire, "response")
    if not msg.flags & _QR:
        raise RemoteProtocolError("DNS response lacks the response flag")
    return msg


def _name_text(name: dns.name.Name) -> str:
    return "" if name == dns.name.root else name.to_text(omit_final_dot=True).lower()


def question(msg: dns.message.Message) -> tuple[str, int, int]:
    """(name in lower case without the root dot, qtype, qclass) of the message's question."""
    q = msg.question[0]
    return _name_text(q.name), int(q.rdtype), int(q.rdclass)


# -- building ----------------------------------------------------------------------------------


def _reply(query: dns.message.Message, rcode: int) -> dns.message.Message:
    """An empty response to `query`: same id and question, RD copied, RA set."""
    out = dns.message.Message(id=query.id)
    out.flags = _QR | (query.flags & _RD) | dns.flags.RA
    out.set_opcode(dns.opcode.QUERY)
    out.question = [dns.rrset.RRset(q.name, q.rdclass, q.rdtype) for q in query.question[:1]]
    if query.edns >= 0:
        out.use_edns(0)
    out.set_rcode(rcode)
    return out


def to_wire(msg: dns.message.Message, max_size: int = MAX_MESSAGE) -> bytes:
    """Wire bytes of `msg`; when they exceed `max_size` (512 for plain UDP without EDNS), the
    records are left out and TC is set, so the client retries over TCP."""
    try:
        return bytes(msg.to_wire(max_size=max_size))
    except dns.exception.TooBig:
        out = _reply(msg, msg.rcode())
        out.id = msg.id
        out.flags = msg.flags | dns.flags.TC
        return bytes(out.to_wire(max_size=max_size))


def servfail(query: dns.message.Message) -> bytes:
    return to_wire(_reply(query, dns.rcode.SERVFAIL))


def refused(query: dns.message.Message) -> bytes:
    return to_wire(_reply(query, dns.rcode.REFUSED))


def nxdomain(query: dns.message.Message) -> bytes:
    return to_wire(_reply(query, dns.rcode.NXDOMAIN))


def nodata(query: dns.message.Message) -> bytes:
    """NOERROR with no records: the name exists but has nothing of the asked type."""
    return to_wire(_reply(query, dns.rcode.NOERROR))


def formerr_for(wire: bytes) -> bytes | None:
    """A bare FORMERR header for bytes `parse_query` refused, echoing their id and opcode.

    None when there is no header to echo (under 12 bytes) or the bytes claim to be a response:
    answering a response could start a loop between two servers.
    """
    if not isinstance(wire, bytes | bytearray | memoryview) or len(wire) < 12:
        return None
    head = bytes(wire[:4])
    if head[2] & 0x80:
        return None
    # QR, the opcode and RD copied, RCODE 1 (FORMERR), no records.
    return head[:2] + bytes([0x80 | (head[2] & 0x79), 0x01]) + bytes(8)


_TOKEN = re.compile(r"\s*(\S+)")


@lru_cache(maxsize=1024)
def _record(text: str) -> tuple[dns.name.Name, int, int, dns.rdata.Rdata]:
    pos = 0
    match = _TOKEN.match(text, pos)
    if match is None:
        raise ValueError("empty record")
    name = dns.name.from_text(match.group(1), origin=dns.name.root)
    pos = match.end()
    ttl: int | None = None
    rdclass: int | None = None
    while True:
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError("no record type")
        token, pos = match.group(1), match.end()
        if ttl is None and token.isdigit():
            ttl = int(token)
            if ttl > 0x7FFFFFFF:
                raise ValueError(f"TTL {token} is too large")
            continue
        if rdclass is None:
            try:
                rdclass = int(dns.rdataclass.from_text(token))
                continue
            except dns.exception.DNSException:
                pass
        rdtype = int(dns.rdatatype.from_text(token))
        break
    rdclass = _IN if rdclass is None else rdclass
    rdata = dns.rdata.from_text(
        rdclass, rdtype, text[pos:].strip(), origin=dns.name.root, relativize=False
    )
    return name, DEFAULT_RECORD_TTL if ttl is None else ttl, rdclass, rdata


def parse_record(text: str) -> dns.rrset.RRset:
    """One record in zone-file text ("example.com. 60 IN A 198.51.100.1"); TTL and class may
    be left out (3600, IN), names are absolute. ValueError with the reason otherwise."""
    try:
        name, ttl, rdclass, rdata = _record(text)
    except ValueError:
        raise
    except Exception as exc:  # dnspython's syntax errors, unknown types, bad rdata
        raise ValueError(str(exc) or type(exc).__name__) from None
    rrset = dns.rrset.RRset(name, rdclass, rdata.rdtype)
    rrset.add(rdata, ttl)
    return rrset


def _section(texts: Iterable[str], qname: dns.name.Name) -> list[dns.rrset.RRset]:
    out: list[dns.rrset.RRset] = []
    for text in texts:
        rrset = parse_record(text)
        # sing-box answers a wildcard record under the asked name when the name is below it.
        if rrset.name.labels[:1] == (b"*",) and qname.is_subdomain(rrset.name.parent()):
            renamed = dns.rrset.RRset(qname, rrset.rdclass, rrset.rdtype)
            renamed.update(rrset)
            rrset = renamed
        for existing in out:
            if existing.full_match(rrset.name, rrset.rdclass, rrset.rdtype, rrset.covers):
                existing.union_update(rrset)
                break
        else:
            out.append(rrset)
    return out


def predefined(
    query: dns.message.Message,
    rcode: str,
    answer: Sequence[str],
    ns: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> bytes:
    """sing-box's `predefined` action: a response with `rcode` and these records, as written.

    Records are zone-file text; a record named `*.suffix` answers under the asked name when
    that is below `suffix`. ValueError for an unknown rcode or a record that does not parse
    (the rule compiler checks both, so a compiled rule never fails here).
    """
    if rcode.upper() not in RCODES:
        raise ValueError(f"{rcode!r} is not a response code ({', '.join(RCODES)})")
    out = _reply(query, dns.rcode.from_text(rcode.upper()))
    out.flags |= dns.flags.AA
    qname = query.question[0].name
    out.answer = _section(answer, qname)
    out.authority = _section(ns, qname)
    out.additional = _section(extra, qname)
    return to_wire(out)


def answer_with(query: dns.message.Message, addresses: Sequence[IPAddress], ttl: int) -> bytes:
    """NOERROR with the addresses that fit the question (A: IPv4 ones, AAAA: IPv6 ones) under
    the asked name; no fitting address gives an empty NOERROR. For hosts, local and FakeIP."""
    q = query.question[0]
    out = _reply(query, dns.rcode.NOERROR)
    version = {_A: 4, _AAAA: 6}.get(q.rdtype) if q.rdclass == _IN else None
    fitting = [a for a in dict.fromkeys(addresses) if a.version == version]
    if fitting:
        rrset = dns.rrset.from_text_list(
            q.name, max(0, min(int(ttl), 0x7FFFFFFF)), _IN, q.rdtype, [str(a) for a in fitting]
        )
        out.answer = [rrset]
    return to_wire(out)


# -- reading responses -------------------------------------------------------------------------


def blocked_by_strategy(qtype: int, strategy: str | None) -> bool:
    """The query is for a family `strategy` excludes: answer it empty without asking anyone,
    as sing-box does (AAAA under ipv4_only, A under ipv6_only)."""
    return (qtype == _AAAA and strategy == "ipv4_only") or (qtype == _A and strategy == "ipv6_only")


def apply_strategy(response: dns.message.Message, strategy: str | None) -> dns.message.Message:
    """`response` under the domain strategy: ipv4_only drops AAAA records (and answers an AAAA
    question with no records), ipv6_only the reverse; prefer_ipv4/prefer_ipv6 and None change
    nothing in a message (they order addresses when something connects).

    Returns `response` itself when nothing changes, else a new message.
    """
    drop = {"ipv4_only": _AAAA, "ipv6_only": _A}.get(strategy or "")
    if drop is None:
        return response
    qtype = response.question[0].rdtype if response.question else None
    if qtype == drop:
        out = _reply(response, dns.rcode.NOERROR)
        out.id = response.id
        return out
    sections = (response.answer, response.authority, response.additional)
    if not any(r.rdtype == drop for section in sections for r in section):
        return response
    out = _reply(response, response.rcode())
    out.id = response.id
    out.flags = response.flags
    out.answer = [r for r in response.answer if r.rdtype != drop]
    out.authority = list(response.authority)
    out.additional = [r for r in response.additional if r.rdtype != drop]
    return out


def addresses(response: dns.message.Message) -> list[tuple[IPAddress, int]]:
    """The A and AAAA records of the asked name, following CNAMEs in the answer section, each
    with its TTL (no longer than the CNAMEs that led to it)."""
    if not response.question:
        return []
    aliases: dict[dns.name.Name, tuple[dns.name.Name, int]] = {}
    found: dict[dns.name.Name, list[dns.rrset.RRset]] = {}
    for rrset in response.answer:
        if rrset.rdclass != _IN:
            continue
        if rrset.rdtype == _CNAME and len(rrset) > 0:
            aliases.setdefault(rrset.name, (next(iter(rrset)).target, rrset.ttl))
        elif rrset.rdtype in (_A, _AAAA):
            found.setdefault(rrset.name, []).append(rrset)
    out: list[tuple[IPAddress, int]] = []
    name = response.question[0].name
    ttl_cap = 0x7FFFFFFF
    seen: set[dns.name.Name] = set()
    for _ in range(MAX_CNAME_HOPS + 1):
        if name in seen:
            break
        seen.add(name)
        for rrset in found.get(name, ()):
            ttl = min(rrset.ttl, ttl_cap)
            for rdata in rrset:
                out.append((ipaddress.ip_address(rdata.address), ttl))
        if name not in aliases:
            break
        name, alias_ttl = aliases[name]
        ttl_cap = min(ttl_cap, alias_ttl)
    return out


def min_ttl(response: dns.message.Message) -> int:
    """How long `response` may be reused: the smallest TTL of its answer; for a negative answer
    (NXDOMAIN, or NOERROR with no answer) the SOA's negative TTL, at most NEGATIVE_TTL_CAP, or
    0 without an SOA (RFC 2308: not to be cached)."""
    if response.answer:
        return max(0, min(r.ttl for r in response.answer))
    for rrset in response.authority:
        if rrset.rdtype == _SOA and len(rrset) > 0:
            soa = next(iter(rrset))
            return max(0, min(rrset.ttl, soa.minimum, NEGATIVE_TTL_CAP))
    return 0
