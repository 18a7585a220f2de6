"""SOCKS5/4a codec: playbooks, round trips and fuzzing (only ProtocolError may escape)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztun.address import Address
from ztun.errors import ProtocolError
from ztun.proto import socks5 as s5


def feed_bytewise(parse, data: bytes):
    """Feed `data` one byte more at a time: None until complete, then the same as whole."""
    for i in range(len(data)):
        res = parse(data[:i])
        assert res is None, (i, res)
    return parse(data)


def test_greeting():
    assert s5.parse_greeting(b"\x05") is None
    assert s5.parse_greeting(b"\x05\x02\x00") is None
    g, n = s5.parse_greeting(b"\x05\x02\x00\x02rest")
    assert g.methods == (0, 2) and n == 4
    with pytest.raises(ProtocolError):
        s5.parse_greeting(b"\x04\x01\x00")
    with pytest.raises(ProtocolError):
        s5.parse_greeting(b"\x05\x00")


def test_userpass():
    data = b"\x01\x04user\x04pass"
    up, n = feed_bytewise(s5.parse_userpass, data)
    assert (up.username, up.password, n) == ("user", "pass", len(data))
    assert s5.build_userpass_reply(True) == b"\x01\x00"
    assert s5.build_userpass_reply(False) == b"\x01\x01"


@pytest.mark.parametrize(
    "addr",
    [Address("192.0.2.1", 80), Address("2001:db8::1", 443), Address("example.com", 8080)],
)
def test_request_round_trip(addr):
    data = bytes((5, s5.Command.CONNECT, 0)) + s5.build_address(addr)
    req, n = feed_bytewise(s5.parse_request, data)
    assert req == s5.Request(s5.Command.CONNECT, addr) and n == len(data)


def test_request_errors():
    with pytest.raises(ProtocolError):
        s5.parse_request(b"\x05\x09\x00\x01\x00\x00\x00\x00\x00\x00")
    with pytest.raises(ProtocolError):
        s5.parse_request(b"\x05\x01\x00\x07")
    with pytest.raises(ProtocolError):
        s5.parse_request(b"\x05\x01\x00\x03\x00\x00\x50")


def test_reply():
    assert s5.build_reply(0) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    r = s5.build_reply(5, Address("::1", 1080))
    assert r[:4] == b"\x05\x05\x00\x04" and len(r) == 4 + 16 + 2


def test_socks4_and_4a():
    data = b"\x04\x01\x00\x50\xc0\x00\x02\x01bob\x00"
    req, n = feed_bytewise(s5.parse_socks4_request, data)
    assert req.address == Address("192.0.2.1", 80) and req.user_id == "bob" and n == len(data)
    data4a = b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00example.org\x00"
    req, n = feed_bytewise(s5.parse_socks4_request, data4a)
    assert req.address == Address("example.org", 443) and n == len(data4a)
    assert s5.build_socks4_reply(True)[:2] == b"\x00\x5a"
    assert s5.build_socks4_reply(False)[:2] == b"\x00\x5b"


def test_udp_datagram_round_trip():
    for addr in (Address("198.51.100.7", 53), Address("2001:db8::2", 5353), Address("a.test", 9)):
        d = s5.build_udp_datagram(addr, b"payload")
        p = s5.parse_udp_datagram(d)
        assert (p.frag, p.address, p.payload) == (0, addr, b"payload")
    frag = b"\x00\x00\x01" + s5.build_address(Address("192.0.2.1", 1)) + b"x"
    assert s5.parse_udp_datagram(frag).frag == 1
    with pytest.raises(ProtocolError):
        s5.parse_udp_datagram(b"\x00\x01\x00\x01\x00\x00\x00\x00\x00\x00")
    with pytest.raises(ProtocolError):
        s5.parse_udp_datagram(b"\x00\x00\x00\x01\x00")


def test_client_handshake_no_auth():
    hs = s5.ClientHandshake(s5.Command.UDP_ASSOCIATE, Address("0.0.0.0", 0))
    assert hs.data_to_send() == b"\x05\x01\x00"
    hs.receive_data(b"\x05\x00")
    assert hs.data_to_send() == b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00"
    reply = s5.build_reply(0, Address("127.0.0.1", 4000))
    for i in range(len(reply)):  # byte at a time
        assert not hs.done
        hs.receive_data(reply[i : i + 1])
    assert hs.done and hs.bound == Address("127.0.0.1", 4000) and hs.leftover == b""


def test_client_handshake_auth_and_failures():
    hs = s5.ClientHandshake(s5.Command.UDP_ASSOCIATE, Address("0.0.0.0", 0), "u", "p")
    assert hs.data_to_send() == b"\x05\x02\x00\x02"
    hs.receive_data(b"\x05\x02")
    assert hs.data_to_send() == b"\x01\x01u\x01p"
    with pytest.raises(s5.AuthFailedError):
        hs.receive_data(b"\x01\x01")

    hs = s5.ClientHandshake(s5.Command.UDP_ASSOCIATE, Address("0.0.0.0", 0))
    hs.data_to_send()
    with pytest.raises(s5.AuthFailedError):
        hs.receive_data(b"\x05\xff")

    hs = s5.ClientHandshake(s5.Command.CONNECT, Address("x.test", 1))
    hs.data_to_send()
    hs.receive_data(b"\x05\x00")
    with pytest.raises(s5.ReplyError) as ei:
        hs.receive_data(s5.build_reply(s5.Reply.CONNECTION_REFUSED))
    assert ei.value.code == s5.Reply.CONNECTION_REFUSED
    with pytest.raises(ProtocolError):
        s5.ClientHandshake(s5.Command.CONNECT, Address("x", 1)).receive_data(b"")


PARSERS = [s5.parse_greeting, s5.parse_userpass, s5.parse_request, s5.parse_socks4_request]


@pytest.mark.parametrize("parse", PARSERS)
@given(data=st.binary(max_size=300))
def test_fuzz_parsers(parse, data):
    try:
        whole = parse(data)
    except ProtocolError:
        return
    # Byte at a time: every prefix is None, an error, or the same result.
    for i in range(len(data) + 1):
        try:
            res = parse(data[:i])
        except ProtocolError:
            continue
        if res is not None:
            assert whole is not None and res[0] == whole[0]
            break


@given(data=st.binary(max_size=300))
def test_fuzz_udp(data):
    with contextlib.suppress(ProtocolError):
        s5.parse_udp_datagram(data)


@given(
    chunks=st.lists(st.binary(max_size=40), max_size=8),
    user=st.booleans(),
    pipeline=st.booleans(),
)
def test_fuzz_client_handshake(chunks, user, pipeline):
    hs = s5.ClientHandshake(
        s5.Command.UDP_ASSOCIATE, Address("0.0.0.0", 0), "u" if user else None, "p",
        pipeline=pipeline,
    )  # fmt: skip
    hs.data_to_send()
    assert hs.need >= 1
    try:
        for c in chunks:
            if hs.done:
                break
            hs.receive_data(c)
            hs.data_to_send()
            assert hs.need >= 1 or hs.done
    except ProtocolError:
        pass


def test_client_handshake_pipelined():
    dest = Address("x.test", 443)
    request = bytes((5, 1, 0)) + s5.build_address(dest)
    # No credentials: only "no auth" is offered, so the request goes with the greeting.
    hs = s5.ClientHandshake(s5.Command.CONNECT, dest, pipeline=True)
    assert hs.data_to_send() == b"\x05\x01\x00" + request
    hs.receive_data(b"\x05\x00")
    assert hs.data_to_send() == b""
    hs.receive_data(s5.build_reply(0))
    assert hs.done and hs.leftover == b""
    # Credentials: the greeting alone, then credentials and request together.
    hs = s5.ClientHandshake(s5.Command.CONNECT, dest, "u", "p", pipeline=True)
    assert hs.data_to_send() == b"\x05\x02\x00\x02"
    hs.receive_data(b"\x05\x02")
    assert hs.data_to_send() == b"\x01\x01u\x01p" + request
    hs.receive_data(b"\x01\x00" + s5.build_reply(0))
    assert hs.done and hs.data_to_send() == b""
    # The server picked "no auth" after all: just the request.
    hs = s5.ClientHandshake(s5.Command.CONNECT, dest, "u", "p", pipeline=True)
    hs.data_to_send()
    hs.receive_data(b"\x05\x00")
    assert hs.data_to_send() == request


def test_client_handshake_failure_code_from_two_bytes():
    hs = s5.ClientHandshake(s5.Command.CONNECT, Address("x.test", 1), pipeline=True)
    hs.data_to_send()
    with pytest.raises(s5.ReplyError) as ei:
        hs.receive_data(b"\x05\x00\x05\x04")
    assert ei.value.code == s5.Reply.HOST_UNREACHABLE


bound_addresses = st.one_of(
    st.ip_addresses().map(str),
    # host names a server may give (a name that cannot exist is refused: test_names.py)
    st.lists(st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=63),
             min_size=1, max_size=4).map(".".join),
)


@given(
    bound=bound_addresses,
    port=st.integers(0, 0xFFFF),
    user=st.booleans(),
    pipeline=st.booleans(),
    trailer=st.binary(min_size=1, max_size=64),
    cuts=st.lists(st.integers(1, 40), max_size=30),
)
def test_need_never_reads_past_the_reply(bound, port, user, pipeline, trailer, cuts):
    """Reading at most `need` bytes at a time never takes bytes that follow the reply."""
    hs = s5.ClientHandshake(
        s5.Command.CONNECT, Address("x.test", 1), "u" if user else None, "p", pipeline=pipeline
    )
    hs.data_to_send()
    answers = b"\x05\x02\x01\x00" if user else b"\x05\x00"
    stream = answers + s5.build_reply(0, Address(bound, port)) + trailer
    pos = 0
    sizes = iter(cuts)
    while not hs.done:
        n = min(hs.need, next(sizes, 1 << 16))
        assert n >= 1
        hs.receive_data(stream[pos : pos + n])
        pos += n
        hs.data_to_send()
    assert hs.bound == Address(bound, port)
    assert hs.leftover == b"" and stream[pos:] == trailer
