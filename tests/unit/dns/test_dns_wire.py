"""ztun.dns.wire against dnspython: never raises, and reads what dnspython reads."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.dns import message, wire

LABELS = st.sampled_from(["a", "B", "test", "q1", "x-y", "_srv", "*", "Z9"])
NAMES = st.lists(LABELS, min_size=0, max_size=4).map(lambda ls: ".".join(ls) + ".")
TTLS = st.one_of(st.integers(0, 5000), st.sampled_from([0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]))


@st.composite
def records(draw: st.DrawFn, qname: str) -> dns.rrset.RRset:
    owner = draw(st.one_of(st.just(qname), NAMES))
    kind = draw(st.sampled_from(["A", "AAAA", "CNAME", "SOA", "MX", "TXT", "NS"]))
    data = {
        "A": lambda: f"203.0.113.{draw(st.integers(0, 3))}",
        "AAAA": lambda: f"2001:db8::{draw(st.integers(0, 3))}",
        "CNAME": lambda: draw(st.one_of(NAMES, st.just(qname))),
        "NS": lambda: draw(NAMES),
        "SOA": lambda: f"{draw(NAMES)} {draw(NAMES)} 1 2 3 4 {draw(TTLS)}",
        "MX": lambda: f"{draw(st.integers(0, 20))} {draw(NAMES)}",
        "TXT": lambda: '"' + draw(st.text("abc ", max_size=5)) + '"',
    }[kind]()
    return dns.rrset.from_text(owner, draw(TTLS), "IN", kind, data)


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[bytes, bytes]:
    qname = draw(NAMES)
    query = dns.message.make_query(qname, draw(st.sampled_from(["A", "AAAA", "MX"])))
    if draw(st.booleans()):
        query.use_edns(0, payload=1232)
    response = dns.message.make_response(query)
    response.set_rcode(draw(st.sampled_from([dns.rcode.NOERROR, dns.rcode.NXDOMAIN, 2])))
    if draw(st.booleans()):
        response.flags |= dns.flags.TC
    for section in (response.answer, response.authority, response.additional):
        for rrset in draw(st.lists(records(qname), max_size=4)):
            section.append(rrset)
    return query.to_wire(), response.to_wire()


def _same_reading(qwire: bytes, rwire: bytes, scan: wire.Scan) -> None:
    parsed = message.parse_response(rwire)
    assert scan.rcode == parsed.rcode()
    assert scan.truncated == bool(parsed.flags & dns.flags.TC)
    assert scan.min_ttl == message.min_ttl(parsed)
    ips = [(ipaddress.ip_address(ip), ttl) for ip, ttl in scan.addresses]
    assert ips == message.addresses(parsed)
    rrs = sum(len(r) for s in (parsed.answer, parsed.authority, parsed.additional) for r in s)
    assert len(scan.ttl_offsets) >= rrs  # duplicates collapse in dnspython, not on the wire


@given(st.binary(max_size=600))
@settings(max_examples=400, deadline=None)
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    q = wire.read_question(data)
    probe = wire.read_question(dns.message.make_query("a.test.", "A").to_wire())
    assert probe is not None
    wire.scan_response(data, q or probe)
    wire.aged(data + bytes(8), (0, 4), 3, 7)


@given(exchanges())
@settings(max_examples=300, deadline=None)
def test_reads_what_dnspython_reads(pair: tuple[bytes, bytes]) -> None:
    qwire, rwire = pair
    q = wire.read_question(qwire)
    assert q is not None  # plain names, one question, at most an OPT: always the fast case
    parsed_q = message.parse_query(qwire)
    assert (q.name, q.qtype, q.qclass) == message.question(parsed_q)
    assert q.id == parsed_q.id and q.has_opt == (parsed_q.edns >= 0)
    scan = wire.scan_response(rwire, q)
    assert scan is not None
    _same_reading(qwire, rwire, scan)


@given(exchanges(), st.data())
@settings(max_examples=400, deadline=None)
def test_mutations_are_refused_or_read_alike(
    pair: tuple[bytes, bytes], data: st.DataObject
) -> None:
    """Flip bytes: whatever the scan still accepts, dnspython accepts and reads the same."""
    qwire, rwire = pair
    q = wire.read_question(qwire)
    assert q is not None
    buf = bytearray(rwire)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(2, len(buf) - 1))
        buf[at] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del buf[data.draw(st.integers(12, len(buf))) :]
    scan = wire.scan_response(bytes(buf), q)
    if scan is not None:
        _same_reading(qwire, bytes(buf), scan)
    qbuf = bytearray(qwire)
    at = data.draw(st.integers(0, len(qbuf) - 1))
    qbuf[at] = data.draw(st.integers(0, 255))
    mq = wire.read_question(bytes(qbuf))
    if mq is not None:
        parsed = message.parse_query(bytes(qbuf))
        assert (mq.name, mq.qtype, mq.qclass) == message.question(parsed)


@given(exchanges(), st.integers(0, 4000), st.integers(0, 0xFFFF))
@settings(max_examples=200, deadline=None)
def test_aged_lowers_every_ttl(pair: tuple[bytes, bytes], age: int, qid: int) -> None:
    qwire, rwire = pair
    q = wire.read_question(qwire)
    assert q is not None
    scan = wire.scan_response(rwire, q)
    assert scan is not None
    before = message.parse_response(rwire)
    after = message.parse_response(wire.aged(rwire, scan.ttl_offsets, age, qid))
    assert after.id == qid
    for old, new in zip(
        before.answer + before.authority + before.additional,
        after.answer + after.authority + after.additional,
        strict=True,
    ):
        assert new.ttl == max(0, old.ttl - age) or (age == 0 and new.ttl == old.ttl)
    assert after.edns == before.edns


def test_refuses_what_is_not_plain() -> None:
    base = dns.message.make_query("a.test.", "A")
    assert wire.read_question(base.to_wire()) is not None
    two = dns.message.make_query("a.test.", "A")
    two.question.append(dns.rrset.RRset(dns.name.from_text("b.test."), 1, 1))
    assert wire.read_question(two.to_wire()) is None
    assert wire.read_question(dns.message.make_query("a\\.b.test.", "A").to_wire()) is None
    response = dns.message.make_response(base)
    assert wire.read_question(response.to_wire()) is None
    assert wire.read_question(base.to_wire() + b"\x00") is None
    cookie = dns.message.make_query("a.test.", "A", use_edns=0)
    assert wire.read_question(cookie.to_wire()) is not None
    assert wire.with_id(base.to_wire(), 0x1234)[:2] == b"\x12\x34"


def test_scan_checks_the_question_and_id() -> None:
    query = dns.message.make_query("a.test.", "A")
    q = wire.read_question(query.to_wire())
    assert q is not None
    response = dns.message.make_response(query)
    assert wire.scan_response(response.to_wire(), q) is not None
    other = dns.message.make_response(dns.message.make_query("b.test.", "A"))
    other.id = query.id
    assert wire.scan_response(other.to_wire(), q) is None
    assert wire.scan_response(wire.with_id(response.to_wire(), query.id ^ 1), q) is None
    upper = dns.message.make_response(dns.message.make_query("A.TEST.", "A"))
    upper.id = query.id
    assert wire.scan_response(upper.to_wire(), q) is not None


def test_answers_checks_id_qr_and_the_question() -> None:
    import dns.message

    from ztun.dns.wire import answers

    query = dns.message.make_query("Example.test", "A")
    query.id = 0x1234
    wire = query.to_wire()
    response = dns.message.make_response(query)
    assert answers(wire, response.to_wire())
    # names compare without case
    upper = dns.message.make_query("EXAMPLE.TEST", "A")
    upper.id = 0x1234
    assert answers(wire, dns.message.make_response(upper).to_wire())
    # another id, no QR bit, another name or type: not the answer
    other = dns.message.make_response(query)
    other.id = 0x4321
    assert not answers(wire, other.to_wire())
    assert not answers(wire, wire)
    for name, qtype in (("other.test", "A"), ("example.test", "AAAA")):
        q = dns.message.make_query(name, qtype)
        q.id = 0x1234
        assert not answers(wire, dns.message.make_response(q).to_wire())
    # short or garbled: never raises
    assert not answers(wire, b"\x12\x34\x80")
    assert not answers(wire, b"\x12\x34\x80\x00" + b"\x00" * 8 + b"\xff")
