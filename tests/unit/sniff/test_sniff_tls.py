"""TLS ClientHello sniffing: captured hellos, split records, names, malformed structure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sniffkit import (
    alpn_extension,
    check_prefixes,
    client_hello,
    client_hello_body,
    extension,
    handshake,
    records,
    sni_extension,
    vector,
)

from ztun.sniff import NEED_MORE, Sniffed, sniff_stream, tls

PYTHON = Sniffed("tls", "python.example.com", ("h2", "http/1.1"))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("tls_python.bin", PYTHON),
        ("tls_split_records.bin", PYTHON),
        ("tls_openssl.bin", Sniffed("tls", "openssl.example.org", ("h2",))),
        ("tls_openssl_nosni.bin", Sniffed("tls", None)),
    ],
)
def test_captured_client_hellos(name, expected):
    assert check_prefixes(vector(name)) == expected


def test_bytes_after_the_hello_do_not_matter():
    data = vector("tls_python.bin")
    assert sniff_stream(data + b"\x14\x03\x03\x00\x01\x01" + bytes(100)) == PYTHON


def test_every_two_record_split_of_a_real_hello():
    message = vector("tls_python.bin")[5:]
    for cut in range(1, len(message)):
        assert sniff_stream(records(message, [cut])) == PYTHON, cut


@given(st.lists(st.integers(1, 516), max_size=40))
def test_many_records(cuts):
    message = vector("tls_python.bin")[5:]
    data = records(message, cuts)
    expected = PYTHON if len(set(cuts)) < tls.MAX_RECORDS else None
    assert sniff_stream(data) == expected


def test_too_many_records():
    message = handshake(client_hello_body(sni_extension(b"a.example")))
    data = records(message, list(range(1, tls.MAX_RECORDS + 1)))
    assert check_prefixes(data) is None


def test_one_byte_rules_it_out():
    assert sniff_stream(b"\x17") is None
    assert sniff_stream(b"\x16") is NEED_MORE
    assert sniff_stream(b"") is NEED_MORE


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x02",  # record version major 2
        b"\x16\x03\x05",  # record version 3.5
        b"\x16\x03\x01\x41",  # record longer than 2^14
        b"\x16\x03\x01\x00\x00",  # empty record
        b"\x16\x03\x01\x00\x10\x02",  # a ServerHello
        b"\x16\x03\x01\x00\x10\x01\x00\x40\x01",  # a hello longer than MAX_HELLO
        b"\x16\x03\x01\x00\x10\x01\x00\x01\x00\x02",  # legacy_version 2.x
        b"\x16\x03\x01\x00\x10\x01\x00\x01\x00\x03\x05",  # legacy_version 3.5
    ],
)
def test_early_refusals(data):
    assert sniff_stream(data) is None


def test_other_record_between_fragments():
    message = vector("tls_python.bin")[5:]
    data = records(message[:50]) + records(message[50:], content=0x17)
    assert sniff_stream(data) is None


@pytest.mark.parametrize(
    ("sni", "domain"),
    [
        (b"Example.COM", "example.com"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        (b"a" * 63 + b".example", "a" * 63 + ".example"),
        (b"a" * 64 + b".example", None),
        (b".".join([b"a" * 49] * 5) + b".abc", ".".join(["a" * 49] * 5) + ".abc"),  # 253
        (b".".join([b"a" * 49] * 5) + b".abcd", None),  # 254
        (b"example.com.", None),  # RFC 6066: no trailing dot
        (b"203.0.113.1", None),  # RFC 6066: no address literals
        (b"under_score.example", None),
        (b"-lead.example", None),
        (b"trail-.example", None),
        (b"a..b", None),
        (b"xn--.example", None),  # an A-label that decodes to nothing
        (b"xn--99999999999.example", None),  # not Punycode
        (b"xn--a.example", None),  # decodes to a control character
        (b"ex\xc3\xa4mple.com", None),  # raw UTF-8
        (b"exa mple.com", None),
        (b"", None),
    ],
)
def test_server_name_validation(sni, domain):
    # A refused name is flagged for counting; an address literal is no name, not a bad one.
    bad = domain is None and sni != b"203.0.113.1"
    assert sniff_stream(client_hello(sni)) == Sniffed("tls", domain, bad_name=bad)


def test_first_host_name_entry_counts():
    entry = b"\x00" + (3).to_bytes(2, "big") + b"a.b"
    other = b"\x01" + (3).to_bytes(2, "big") + b"c.d"
    names = other + entry + b"\x00" + (3).to_bytes(2, "big") + b"e.f"
    ext = extension(0, len(names).to_bytes(2, "big") + names)
    assert tls.parse_client_hello(client_hello_body(ext)) == Sniffed("tls", "a.b")


def test_alpn_keeps_printable_ids():
    data = client_hello(b"a.example", b"h2", b"\x0a\x1a", b"http/1.1")
    assert sniff_stream(data) == Sniffed("tls", "a.example", ("h2", "http/1.1"))


def test_hello_without_extensions():
    assert tls.parse_client_hello(client_hello_body(None)) == Sniffed("tls")


@pytest.mark.parametrize(
    "body",
    [
        client_hello_body(None)[:-1],  # compression methods cut
        client_hello_body(b"") + b"\x00",  # bytes after the extensions
        client_hello_body(sni_extension(b"a.b") + sni_extension(b"c.d")),  # duplicate
        client_hello_body(extension(0, b"\x00\x06\x00\x00\x02ab")),  # server_name list short
        client_hello_body(extension(0, b"\x00\x04\x00\x00\x01ab\x00")),  # trailing byte
        client_hello_body(extension(16, b"\x00\x01\x00")),  # empty ALPN id
        client_hello_body(alpn_extension(b"h2") + b"\x00"),  # extension cut
        b"\x03\x03" + bytes(32) + b"\x21" + bytes(40),  # session id over 32
        b"\x03\x03" + bytes(32) + b"\x00\x00\x03\x13\x01\x00\x01\x00",  # odd suites
        b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01\x00",  # no compression method
    ],
)
def test_malformed_hello_is_not_tls(body):
    assert tls.parse_client_hello(body) is None
    assert sniff_stream(records(handshake(body))) is None


@given(st.binary(max_size=300))
def test_arbitrary_handshake_records(tail):
    check_prefixes(b"\x16\x03\x01" + tail)
    check_prefixes(records(b"\x01" + len(tail).to_bytes(3, "big") + tail))


@given(st.data())
def test_mutated_real_hello(data):
    hello = bytearray(vector("tls_openssl.bin"))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(hello) - 1))
        hello[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(hello)))
    check_prefixes(bytes(hello[:cut]))


def test_module_entry_point_and_direct_body():
    assert tls.sniff_stream(b"G") is None
    assert tls.parse_client_hello(client_hello_body(version=b"\x02\x00")) is None
    assert tls.parse_client_hello(client_hello_body(extension(16, b"\x00\x03\x02h2\x00"))) is None
