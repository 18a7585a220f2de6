"""The mixed inbound refuses host names that cannot exist over real loopback sockets, with
each protocol's reply: SOCKS5 REP 0x04, SOCKS4a 0x5B, HTTP 400 (CONNECT and absolute-URI GET),
in under 5 ms from the request's last byte to the reply (best of three: a bound, not a
benchmark). The parser-level bounds are in tests/unit/test_names.py."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from mixed_to_block import mixed_to_block

from ztun.address import NAME_REFUSALS
from ztun.inbound.mixed import MixedInbound

BAD = {
    "254": (".".join(["a" * 49] * 5) + ".abcd").encode(),
    "empty-label": b"a..b",
    "label-64": b"a" * 64 + b".example",
    "16k": b"a." * 8000 + b"example",
}
SOCKS5_REFUSED = b"\x05\x04\x00\x01" + bytes(6)
SOCKS4_REFUSED = b"\x00\x5b" + bytes(6)
BOUND = 0.005


def inbound(users: bool = False) -> MixedInbound:
    alice = [{"username": "alice", "password": "wonderland"}]
    return mixed_to_block({"users": alice} if users else None)


async def talk(port: int, before: bytes, data: bytes = b"") -> tuple[bytes, float]:
    """Send `before` and read its answer (a greeting's), then send `data`; what came back
    until the inbound closed, and how long after the last write it took."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", port))
        got = b""
        if not data:
            before, data = b"", before
        if before:
            await loop.sock_sendall(s, before)
            got = await asyncio.wait_for(loop.sock_recv(s, 4096), 5)
        t0 = time.perf_counter()
        await loop.sock_sendall(s, data)
        while True:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(s, 65536), 5)
            except ConnectionResetError:  # closed with our bytes still unread: fine
                chunk = b""
            if not chunk:
                return got, time.perf_counter() - t0
            got += chunk
    finally:
        s.close()


def _requests(name: bytes) -> dict[str, tuple[bytes, bytes, bytes]]:
    """protocol → (greeting, request, expected reply)."""
    s5 = name[:255]
    return {
        "socks5": (b"\x05\x01\x00", b"\x05\x01\x00\x03" + bytes((len(s5),)) + s5 + b"\x01\xbb",
                   b"\x05\x00" + SOCKS5_REFUSED),
        "socks4a": (b"", b"\x04\x01\x01\xbb\x00\x00\x00\x01\x00" + name + b"\x00", SOCKS4_REFUSED),
        "http-connect": (b"", b"CONNECT " + name + b":443 HTTP/1.1\r\nHost: " + name
                         + b":443\r\n\r\n", b"HTTP/1.1 400 Bad Request\r\n"),
        "http-get": (b"", b"GET http://" + name + b"/x HTTP/1.1\r\nHost: " + name + b"\r\n\r\n",
                     b"HTTP/1.1 400 Bad Request\r\n"),
    }  # fmt: skip


@pytest.mark.parametrize("proto", ["socks5", "socks4a", "http-connect", "http-get"])
def test_bad_names_refused_with_the_protocols_reply(proto: str) -> None:
    async def main() -> None:
        ib = inbound()
        await ib.start()
        try:
            for case, name in BAD.items():
                greeting, request, expected = _requests(name)[proto]
                before = sum(NAME_REFUSALS.values())
                best = float("inf")
                for _ in range(3):
                    got, took = await talk(ib.listen_port, greeting, request)
                    assert got.startswith(expected), (case, got[:40])
                    if proto.startswith("socks"):
                        assert got == expected, case
                    best = min(best, took)
                assert best < BOUND, (case, best)
                assert sum(NAME_REFUSALS.values()) == before + 3, case
            # nothing with a bad name reached the router
            assert not ib.dispatcher.router.seen  # type: ignore[attr-defined]
            # a good name still goes through to routing (and the block outbound's refusal)
            greeting, request, _ = _requests(b"ok.example")[proto]
            got, _ = await talk(ib.listen_port, greeting, request)
            assert got  # the block outbound's refusal (for SOCKS4 the same 0x5B)
            assert ib.dispatcher.router.seen[-1].domain == "ok.example"  # type: ignore[attr-defined]
        finally:
            await ib.stop()
            await asyncio.gather(*ib.tasks)

    asyncio.run(main())
