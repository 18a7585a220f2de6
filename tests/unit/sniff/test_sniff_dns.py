"""DNS query sniffing, over UDP and over TCP's length prefix."""

from __future__ import annotations

import dns.message
import dns.name
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sniffkit import check_prefixes, vector

from ztun.sniff import Sniffed, sniff_datagram, sniff_stream
from ztun.sniff import dns as sdns


def query(name: str = "a.example", **kwargs) -> bytes:
    return dns.message.make_query(name, "A", **kwargs).to_wire()


def tcp(msg: bytes) -> bytes:
    return len(msg).to_bytes(2, "big") + msg


def test_captured_queries():
    assert sniff_datagram(vector("dns_query.bin")) == Sniffed("dns", "dns.example.com")
    assert check_prefixes(vector("dns_query_tcp.bin")) == Sniffed("dns", "dns.example.com")


@pytest.mark.parametrize(
    ("name", "domain", "bad"),
    [
        ("A.Example.", "a.example", False),
        ("_dmarc.example.com", "_dmarc.example.com", False),
        ("_sip._tcp.example", "_sip._tcp.example", False),
        (".", None, False),
        ("bad\\032label.example", None, True),
        ("dot\\.inside.example", None, True),
        ("1.0.0.127.in-addr.arpa", "1.0.0.127.in-addr.arpa", False),
        ("4.3.2.1", None, False),
    ],
)
def test_question_names(name, domain, bad):
    """A name that is not a host name is "no domain", flagged so its consumer counts it."""
    assert sniff_datagram(query(name)) == Sniffed("dns", domain, bad_name=bad)
    assert sniff_stream(tcp(query(name))) == Sniffed("dns", domain, bad_name=bad)


def test_edns_and_tsig_shapes():
    assert sniff_datagram(query(use_edns=0, pad=128)) == Sniffed("dns", "a.example")
    msg = dns.message.make_query("a.example", "A", use_edns=0)
    msg.use_tsig(
        {dns.name.from_text("k."): b"0123456789abcdef"},
        keyname=dns.name.from_text("k."),
    )
    assert sniff_datagram(msg.to_wire()) == Sniffed("dns", "a.example")


def test_not_queries():
    q = dns.message.make_query("a.example", "A")
    response = dns.message.make_response(q)
    assert sniff_datagram(response.to_wire()) is None
    raw = bytearray(q.to_wire())
    assert sniff_datagram(bytes(raw) + b"\x00") is None  # trailing bytes
    assert sniff_datagram(bytes(raw[:-1])) is None  # cut short
    raw[5] = 2  # two questions
    assert sniff_datagram(bytes(raw)) is None
    assert sniff_datagram(b"") is None
    notify = bytearray(q.to_wire())
    notify[2] = 4 << 3  # opcode NOTIFY
    assert sniff_datagram(bytes(notify)) is None


def test_compressed_question_is_refused():
    msg = bytes.fromhex("1234 0100 0001 0000 0000 0000") + b"\xc0\x0c\x00\x01\x00\x01"
    assert sniff_datagram(msg) is None


def test_tcp_refusals():
    assert sniff_stream(b"\x10") is None  # a 4 KiB+ query
    assert sniff_stream(b"\x00\x05") is None  # shorter than any query
    response = dns.message.make_response(dns.message.make_query("a.b", "A")).to_wire()
    assert sniff_stream(tcp(response)[:5]) is None  # QR set: refused at the flags byte
    assert sniff_stream(b"\x00\x20\x12\x34\x01\x00\x00\x02") is None  # QDCOUNT 2


def test_name_length_limit():
    long = ".".join(["a" * 63] * 3 + ["a" * 61])  # 253 characters, 255 on the wire
    assert sniff_datagram(query(long)) == Sniffed("dns", long)
    wire = bytearray(query(long))
    wire[12 + 64 * 3] = 62  # one more byte in the last label: 256 on the wire
    assert sdns.parse_query(bytes(wire[:-4]) + b"a" + bytes(wire[-4:])) is None


@given(st.binary(max_size=80))
def test_arbitrary_datagrams(data):
    result = sniff_datagram(data)
    assert result is None or result.protocol == "dns"
    check_prefixes(tcp(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + data))
    check_prefixes(data)


def test_additional_record_cut_short():
    wire = query(use_edns=0)
    assert sniff_datagram(wire[:-3]) is None


def test_module_entry_points():
    assert sdns.sniff_stream(b"\x16") is None
