"""QUIC Initial sniffing: aioquic's real first flights, and Initials built here to reach what
aioquic never sends (CRYPTO frames out of order, ACKs, CONNECTION_CLOSE, bad keys)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sniffkit import (
    client_hello_body,
    crypto_frame,
    handshake,
    initial_packet,
    sni_extension,
    varint,
    vector,
)

from ztun.sniff import NEED_MORE, DatagramSniffer, Sniffed, sniff_datagram
from ztun.sniff import quic as q

HELLO = handshake(client_hello_body(sni_extension(b"built.example")))
BUILT = Sniffed("quic", "built.example")
MULTI = ("quic_multi_0.bin", "quic_multi_1.bin")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("quic_aioquic.bin", Sniffed("quic", "quic.example.net", ("h3",))),
        ("quic_aioquic_v2.bin", Sniffed("quic", "v2.example.net", ("h3",))),
    ],
)
def test_aioquic_first_datagram(name, expected):
    assert sniff_datagram(vector(name)) == expected


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_hello_over_two_datagrams(order):
    sniffer = DatagramSniffer()
    first, second = (vector(MULTI[i]) for i in order)
    assert sniffer.feed(first) is NEED_MORE
    found = sniffer.feed(second)
    assert isinstance(found, Sniffed) and found.domain == "multi.example.net"
    assert found.alpn[-1] == "h3" and len(found.alpn) == 21
    assert sniffer.feed(b"anything") == found  # final answers stick


def test_one_datagram_of_a_longer_hello_is_quic_without_a_name():
    assert sniff_datagram(vector(MULTI[0])) == Sniffed("quic")


def test_gives_up_after_max_datagrams():
    sniffer = q.QuicSniffer()
    packet = initial_packet(crypto_frame(0, HELLO[:10]))
    results = [sniffer.feed(packet) for _ in range(q.MAX_DATAGRAMS + 1)]
    assert results == [NEED_MORE] * (q.MAX_DATAGRAMS - 1) + [None, None]


def test_out_of_order_and_overlapping_crypto_frames():
    a, b, c = HELLO[:20], HELLO[20:50], HELLO[50:]
    frames = (
        b"\x01"  # PING
        + crypto_frame(50, c)
        + b"\x00\x00\x00"
        + crypto_frame(20, b)
        + crypto_frame(10, HELLO[10:30])  # overlaps both neighbours
        + b"\x02" + varint(3) + varint(0) + varint(1) + varint(0) + varint(0) + varint(1)  # ACK
        + b"\x03" + varint(3) + varint(0) + varint(0) + varint(0) + varint(1) * 3  # ACK_ECN
        + crypto_frame(5, b"")  # empty: allowed, carries nothing
        + crypto_frame(0, a)
    )  # fmt: skip
    assert sniff_datagram(initial_packet(frames)) == BUILT


def test_coalesced_initials_in_one_datagram():
    first = initial_packet(crypto_frame(0, HELLO[:40]), size=0)
    second = initial_packet(crypto_frame(40, HELLO[40:]), pn=1, size=1200 - len(first))
    assert sniff_datagram(first + second) == BUILT
    other = initial_packet(crypto_frame(40, HELLO[40:]), dcid=b"otherdcid", size=1200)
    assert sniff_datagram(first + other) == Sniffed("quic")  # another connection's: ignored


def test_same_connection_only_across_datagrams():
    sniffer = q.QuicSniffer()
    assert sniffer.feed(initial_packet(crypto_frame(0, HELLO[:40]))) is NEED_MORE
    # another connection's Initial, a small datagram, a 0-RTT packet: passed over
    assert sniffer.feed(initial_packet(crypto_frame(40, HELLO[40:]), dcid=b"12345678")) is NEED_MORE
    assert sniffer.feed(b"\x40" + bytes(50)) is NEED_MORE
    assert sniffer.feed(b"\xd0\x00\x00\x00\x01" + bytes(1200)) is None  # the 4th: give up


def test_interleaved_datagram_is_passed_over():
    sniffer = q.QuicSniffer()
    assert sniffer.feed(initial_packet(crypto_frame(0, HELLO[:40]))) is NEED_MORE
    assert sniffer.feed(b"\xd0\x00\x00\x00\x01" + bytes(1200)) is NEED_MORE  # 0-RTT
    assert sniffer.feed(initial_packet(crypto_frame(40, HELLO[40:]), pn=1)) == BUILT


def test_version_2_built():
    assert sniff_datagram(initial_packet(crypto_frame(0, HELLO), version=q.VERSION_2)) == BUILT


@pytest.mark.parametrize(
    "frames",
    [
        b"\x1c" + varint(0) + varint(0) + varint(0),  # CONNECTION_CLOSE
        b"\x08" + varint(0),  # STREAM: not in an Initial
        b"\x06" + varint(0) + varint(500) + b"x",  # CRYPTO cut short
        b"\x02" + varint(1) + varint(0) + varint(1 << 20),  # more ACK ranges than bytes
        crypto_frame(q.MAX_HELLO, b"x"),  # beyond the hello limit
        crypto_frame(0, b"\x02\x00\x00\x04abcd"),  # a ServerHello
        crypto_frame(0, b"\x01\x00\x40\x01"),  # a hello over MAX_HELLO
        crypto_frame(0, handshake(b"\x03\x03broken")),
    ],
)
def test_not_a_first_flight(frames):
    assert sniff_datagram(initial_packet(frames)) is None


def test_packet_level_refusals():
    good = bytearray(initial_packet(crypto_frame(0, HELLO)))
    assert sniff_datagram(bytes(good[:1199])) is None  # under 1200 bytes
    for i, value in [(0, 0x40), (0, 0xD0), (1, 0xFF), (5, 21), (500, good[500] ^ 1)]:
        bad = bytearray(good)
        bad[i] = value
        assert sniff_datagram(bytes(bad)) is None, i
    v2_as_v1 = initial_packet(crypto_frame(0, HELLO), version=q.VERSION_2)
    assert sniff_datagram(v2_as_v1[:1] + (1).to_bytes(4, "big") + v2_as_v1[5:]) is None


@given(st.data())
def test_mutated_datagrams(data):
    packet = bytearray(vector(data.draw(st.sampled_from(["quic_aioquic.bin", *MULTI]))))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, 60))  # the header, where a flip is still parsed
        packet[i] = data.draw(st.integers(0, 255))
    result = sniff_datagram(bytes(packet[: data.draw(st.integers(1150, len(packet)))]))
    assert result is None or result.protocol in ("quic", "dns")


@given(st.binary(min_size=1, max_size=200), st.integers(0, 40))
def test_arbitrary_decrypted_payloads(payload, at):
    # valid keys, arbitrary frames: exercises the frame walk past decryption
    result = sniff_datagram(initial_packet(payload[:at] + crypto_frame(0, HELLO) + payload[at:]))
    assert result is None or result.protocol == "quic"


@given(st.binary(min_size=1200, max_size=1300))
def test_arbitrary_long_headers(data):
    assert sniff_datagram(b"\xc0\x00\x00\x00\x01" + data) is None


@pytest.mark.parametrize(
    "frames",
    [
        crypto_frame(0, HELLO) + b"\x06",  # frame fields missing
        crypto_frame(0, HELLO) + b"\x06" + varint(0) + varint(500) + b"x",
        crypto_frame(0, HELLO) + b"\x02" + varint(1),
        crypto_frame(0, HELLO) + b"\x41",  # a 2-byte frame type, cut
    ],
)
def test_frames_cut_at_the_packet_end(frames):
    # no PADDING after them: the packet ends inside the frame (the datagram is padded after it)
    assert sniff_datagram(initial_packet(frames, size=0) + bytes(1200)) is None


def test_trailing_bytes_after_the_initial():
    packet = initial_packet(crypto_frame(0, HELLO), size=0)
    assert sniff_datagram(packet + b"\xc0\x00" + bytes(1200)) == BUILT
    packet = initial_packet(crypto_frame(0, HELLO), size=1198)
    assert sniff_datagram(packet + b"\xc0\x00") == BUILT  # too short for a header
