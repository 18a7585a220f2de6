"""The common API: dispatch by first byte, sniffer selection, and the never-raise contract on
arbitrary bytes, whole and as growing prefixes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sniffkit import check_prefixes, client_hello, is_valid, vector

from ztun.sniff import ALL, NEED_MORE, DatagramSniffer, Sniffed, sniff_datagram, sniff_stream
from ztun.sniff._host import host_name

STREAM_VECTORS = ["tls_python.bin", "tls_openssl.bin", "http_curl.bin", "dns_query_tcp.bin"]
DATAGRAM_VECTORS = ["quic_aioquic.bin", "dns_query.bin"]


@pytest.mark.parametrize("name", STREAM_VECTORS)
def test_disabled_sniffer_answers_none_at_once(name):
    data = vector(name)
    protocol = sniff_stream(data).protocol
    others = ALL - {protocol}
    assert sniff_stream(data[:1], others) is None
    assert sniff_stream(data, {protocol}) == sniff_stream(data)
    assert sniff_stream(b"", ()) is None
    assert sniff_stream(b"", {"quic"}) is None
    assert sniff_stream(b"", {"stun", "http"}) is NEED_MORE


@pytest.mark.parametrize("name", DATAGRAM_VECTORS)
def test_datagram_sniffer_selection(name):
    data = vector(name)
    protocol = sniff_datagram(data).protocol
    assert sniff_datagram(data, ALL - {protocol}) is None
    assert sniff_datagram(data, {protocol}) == sniff_datagram(data)
    sniffer = DatagramSniffer({protocol})
    assert sniffer.feed(data) == sniff_datagram(data)


def test_datagram_sniffer_tries_dns_on_the_first_datagram_only():
    sniffer = DatagramSniffer()
    assert sniffer.feed(vector("quic_multi_0.bin")) is NEED_MORE
    assert sniffer.feed(vector("dns_query.bin")) is NEED_MORE  # passed over, not DNS
    assert sniffer.feed(vector("quic_multi_1.bin")).domain == "multi.example.net"
    assert DatagramSniffer().feed(vector("dns_query.bin")) == Sniffed("dns", "dns.example.com")
    assert DatagramSniffer(()).feed(vector("quic_aioquic.bin")) is None


@pytest.mark.parametrize("first", [0x10, 0x17, 0x20, 0x41, 0x7F, 0x80, 0xFF])
def test_one_byte_rules_out_everything(first):
    assert sniff_stream(bytes((first,))) is None


@given(st.binary(max_size=300))
def test_arbitrary_stream_bytes(data):
    check_prefixes(data)
    check_prefixes(data, frozenset({"tls"}))


@given(
    st.sampled_from([b"\x16", b"\x16\x03\x01", b"\x00", b"\x00\x1e", b"G", b"GET /", b"PRI"]),
    st.binary(max_size=200),
)
def test_arbitrary_bytes_after_a_plausible_start(start, tail):
    check_prefixes(start + tail)


@given(st.binary(max_size=1400))
def test_arbitrary_datagrams(data):
    assert is_valid(sniff_datagram(data))
    sniffer = DatagramSniffer()
    assert is_valid(sniffer.feed(data)) and is_valid(sniffer.feed(data))


@given(st.binary(max_size=300))
def test_host_name_never_raises(raw):
    name = host_name(raw)
    assert name is None or (name == name.lower() and len(name) <= 253)


def test_sniffed_is_a_value():
    a = sniff_stream(client_hello(b"a.example"))
    assert a == Sniffed("tls", "a.example") and hash(a) == hash(Sniffed("tls", "a.example"))
    with pytest.raises(AttributeError):
        a.domain = "b"  # type: ignore[misc]
    assert repr(NEED_MORE) == "NEED_MORE"


@pytest.mark.parametrize("name", STREAM_VECTORS + DATAGRAM_VECTORS)
def test_a_bytearray_buffer_answers_the_same(name):
    # the inbounds accumulate first bytes in a bytearray
    data = vector(name)
    assert sniff_stream(bytearray(data)) == sniff_stream(data)
    assert sniff_datagram(bytearray(data)) == sniff_datagram(data)
