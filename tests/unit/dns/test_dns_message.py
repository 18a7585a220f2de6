"""DNS messages: the parsers' boundary, the builders, strategy, addresses and TTLs."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.dns import message as m
from ztun.errors import ProtocolError


def query(name: str = "www.example.com", qtype: str = "A", **kw: object) -> dns.message.Message:
    return m.parse_query(dns.message.make_query(name, qtype, **kw).to_wire())


def response(q: dns.message.Message, *records: str, rcode: int = 0) -> dns.message.Message:
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for text in records:
        rrset = m.parse_record(text)
        section = r.authority if rrset.rdtype == dns.rdatatype.SOA else r.answer
        section.append(rrset)
    return m.parse_response(r.to_wire())


# -- the boundary ------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_parsers_raise_only_protocol_error(wire: bytes) -> None:
    for parse in (m.parse_query, m.parse_response):
        try:
            msg = parse(wire)
        except ProtocolError:
            continue
        name, qtype, qclass = m.question(msg)
        assert isinstance(name, str) and qtype >= 0 and qclass >= 0
    reply = m.formerr_for(wire)
    assert reply is None or len(reply) == 12


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=12, max_size=12), st.binary(max_size=200))
def test_mutated_queries_raise_only_protocol_error(header: bytes, tail: bytes) -> None:
    good = dns.message.make_query("a.example", "AAAA", use_edns=0).to_wire()
    for wire in (header + good[12:], good[:12] + tail, good + tail, header + tail):
        try:
            q = m.parse_query(wire)
        except ProtocolError:
            continue
        # whatever was accepted can be answered
        for build in (m.servfail, m.refused, m.nxdomain, m.nodata):
            m.parse_response(build(q))


def test_refused_shapes() -> None:
    q = dns.message.make_query("a.example", "A")
    two = dns.message.make_query("a.example", "A")
    two.question.append(dns.rrset.RRset(q.question[0].name, 1, 28))
    with pytest.raises(ProtocolError, match="2 questions"):
        m.parse_query(two.to_wire())
    none = dns.message.Message()
    with pytest.raises(ProtocolError, match="0 questions"):
        m.parse_query(none.to_wire())
    notify = dns.message.make_query("a.example", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    with pytest.raises(ProtocolError, match="opcode"):
        m.parse_query(notify.to_wire())
    with pytest.raises(ProtocolError, match="response flag"):
        m.parse_query(dns.message.make_response(q).to_wire())
    with pytest.raises(ProtocolError, match="lacks the response flag"):
        m.parse_response(q.to_wire())
    with pytest.raises(ProtocolError, match="longer"):
        m.parse_query(q.to_wire() + bytes(m.MAX_MESSAGE))


def test_question_is_lower_case_without_root_dot() -> None:
    assert m.question(query("WWW.Example.COM.", "AAAA")) == ("www.example.com", 28, 1)
    assert m.question(query(".", "NS")) == ("", 2, 1)


def test_formerr_echoes_id_and_never_answers_a_response() -> None:
    wire = dns.message.make_query("a.example", "A", id=0x1234).to_wire()
    reply = m.formerr_for(wire + b"junk")
    assert reply is not None
    parsed = dns.message.from_wire(reply)
    assert parsed.id == 0x1234 and parsed.rcode() == dns.rcode.FORMERR
    assert parsed.flags & dns.flags.QR and parsed.flags & dns.flags.RD
    assert m.formerr_for(wire[:11]) is None
    resp = dns.message.make_response(dns.message.make_query("a.example", "A")).to_wire()
    assert m.formerr_for(resp) is None


@pytest.mark.parametrize(
    ("build", "rcode"),
    [(m.servfail, "SERVFAIL"), (m.refused, "REFUSED"), (m.nxdomain, "NXDOMAIN"),
     (m.nodata, "NOERROR")],
)  # fmt: skip
def test_error_builders(build: object, rcode: str) -> None:
    q = query(use_edns=0)
    r = m.parse_response(build(q))  # type: ignore[operator]
    assert r.id == q.id and dns.rcode.to_text(r.rcode()) == rcode
    assert m.question(r) == m.question(q) and not r.answer
    assert r.edns == 0  # the query spoke EDNS, so does the answer


# -- predefined and answer_with ----------------------------------------------------------------


def test_predefined_records_and_wildcards() -> None:
    q = query("www.example.com", "A")
    wire = m.predefined(
        q,
        "NOERROR",
        ["*.example.com. IN A 198.51.100.1", "www.example.com. 60 IN A 198.51.100.2"],
        ns=["example.com. IN NS ns.example.net."],
        extra=["ns.example.net. IN A 198.51.100.53"],
    )
    r = m.parse_response(wire)
    assert r.flags & dns.flags.AA and r.rcode() == dns.rcode.NOERROR
    assert sorted(str(ip) for ip, _ in m.addresses(r)) == ["198.51.100.1", "198.51.100.2"]
    assert len(r.answer) == 1 and r.answer[0].ttl == 60  # merged rrset: the smaller TTL
    assert str(r.authority[0].name) == "example.com."
    assert str(r.additional[0].name) == "ns.example.net."


def test_predefined_rcode_only() -> None:
    r = m.parse_response(m.predefined(query(), "nxdomain", []))
    assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer
    with pytest.raises(ValueError, match="response code"):
        m.predefined(query(), "NOPE", [])
    with pytest.raises(ValueError):
        m.predefined(query(), "NOERROR", ["x. IN A 300.1.1.1"])


@pytest.mark.parametrize(
    "text",
    ["", "example.com.", "example.com. IN", "x. IN A 1.2.3", "x. IN BOGUS 1",
     "x. 99999999999 A 1.1.1.1"],
)  # fmt: skip
def test_parse_record_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        m.parse_record(text)


def test_parse_record_defaults() -> None:
    rrset = m.parse_record("localhost AAAA ::1")
    assert str(rrset.name) == "localhost." and rrset.ttl == m.DEFAULT_RECORD_TTL
    assert m.parse_record('t. 5 IN TXT "hello world"').ttl == 5
    assert m.parse_record("a. IN 7 CNAME b").to_text() == "a. 7 IN CNAME b."


def test_answer_with_fits_the_question() -> None:
    v4, v6 = ipaddress.ip_address("198.51.100.7"), ipaddress.ip_address("2001:db8::7")
    a = m.parse_response(m.answer_with(query(qtype="A"), [v4, v6, v4], 30))
    assert m.addresses(a) == [(v4, 30)]
    aaaa = m.parse_response(m.answer_with(query(qtype="AAAA"), [v4, v6], 30))
    assert m.addresses(aaaa) == [(v6, 30)]
    mx = m.parse_response(m.answer_with(query(qtype="MX"), [v4], 30))
    assert mx.rcode() == dns.rcode.NOERROR and not mx.answer


def test_to_wire_truncates() -> None:
    q = query(qtype="A")
    many = [ipaddress.ip_address(f"198.51.100.{i}") for i in range(1, 100)]
    r = m.parse_response(m.answer_with(q, many, 30))
    small = m.to_wire(r, 512)
    assert len(small) <= 512
    t = dns.message.from_wire(small)
    assert t.flags & dns.flags.TC and not t.answer and t.id == q.id


# -- strategy ----------------------------------------------------------------------------------


def test_strategy_only_modes() -> None:
    q4 = query(qtype="A")
    r4 = response(q4, "www.example.com. 60 IN A 198.51.100.1")
    assert m.apply_strategy(r4, "ipv4_only") is r4
    assert m.apply_strategy(r4, "prefer_ipv6") is r4
    assert m.apply_strategy(r4, None) is r4
    empty = m.apply_strategy(r4, "ipv6_only")
    assert empty.rcode() == dns.rcode.NOERROR and not empty.answer and empty.id == r4.id
    q6 = query(qtype="AAAA")
    r6 = response(q6, "www.example.com. 60 IN AAAA 2001:db8::1")
    assert not m.apply_strategy(r6, "ipv4_only").answer
    assert m.blocked_by_strategy(28, "ipv4_only") and m.blocked_by_strategy(1, "ipv6_only")
    assert not m.blocked_by_strategy(1, "ipv4_only") and not m.blocked_by_strategy(28, None)


def test_strategy_drops_other_family_from_any() -> None:
    q = query(qtype="ANY")
    r = response(q, "www.example.com. 60 IN A 198.51.100.1",
                 "www.example.com. 60 IN AAAA 2001:db8::1")  # fmt: skip
    only4 = m.apply_strategy(r, "ipv4_only")
    assert [str(ip) for ip, _ in m.addresses(only4)] == ["198.51.100.1"]
    assert len(m.addresses(r)) == 2  # the original is untouched


# -- addresses and TTLs ------------------------------------------------------------------------


def test_addresses_follow_cnames_with_ttl_caps() -> None:
    q = query("www.example.com", "A")
    r = response(
        q,
        "www.example.com. 30 IN CNAME cdn.example.net.",
        "cdn.example.net. 300 IN CNAME edge.example.org.",
        "edge.example.org. 600 IN A 198.51.100.9",
        "other.example. 5 IN A 203.0.113.1",
    )
    assert m.addresses(r) == [(ipaddress.ip_address("198.51.100.9"), 30)]
    assert m.min_ttl(r) == 5


def test_addresses_survive_cname_loop() -> None:
    q = query("a.example", "A")
    r = response(q, "a.example. 30 IN CNAME b.example.", "b.example. 30 IN CNAME a.example.")
    assert m.addresses(r) == []


def test_min_ttl_negative() -> None:
    q = query("nx.example", "A")
    soa = "example. 900 IN SOA ns.example. host.example. 1 7200 900 1209600 86400"
    nx = response(q, soa, rcode=dns.rcode.NXDOMAIN)
    assert m.min_ttl(nx) == m.NEGATIVE_TTL_CAP
    small = "example. 40 IN SOA ns.example. host.example. 1 7200 900 1209600 86400"
    assert m.min_ttl(response(q, small)) == 40
    assert m.min_ttl(response(q, rcode=dns.rcode.NXDOMAIN)) == 0
