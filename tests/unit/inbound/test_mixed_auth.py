"""The mixed inbound's users over real loopback sockets: failed attempts throttled per source
(SOCKS5 and HTTP Basic), other sources unaffected, the table bounded under many sources; and
an open proxy beyond loopback refused unless asked for.

Sources are told apart by binding the client to different loopback addresses (127.0.0.0/8 is
all loopback on Linux)."""

from __future__ import annotations

import asyncio
import base64
import socket
import time

import pytest
from mixed_to_block import mixed_to_block

from ztun.errors import ZtunError
from ztun.inbound.mixed import MixedInbound
from ztun.stack.auth import MAX_FAILURES, UserAuth

USERS = [{"username": "alice", "password": "wonderland"}]


def _inbound(**options: object) -> MixedInbound:
    return mixed_to_block(options)


async def _exchange(port: int, source: str, data: bytes, want: int) -> bytes:
    """From `source`: send `data`, read until `want` bytes came or the inbound closed."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    try:
        s.bind((source, 0))
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, data)
        got = b""
        while len(got) < want:
            chunk = await asyncio.wait_for(loop.sock_recv(s, 4096), 5)
            if not chunk:
                break
            got += chunk
        return got
    finally:
        s.close()


def _socks5_login(user: str, password: str) -> bytes:
    u, p = user.encode(), password.encode()
    return b"\x05\x01\x02" + bytes((1, len(u))) + u + bytes((len(p),)) + p


def _http(user: str, password: str) -> bytes:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return (f"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n"
            f"Proxy-Authorization: Basic {token}\r\n\r\n").encode()  # fmt: skip


def test_socks5_wrong_password_is_throttled_per_source() -> None:
    async def main() -> None:
        ib = _inbound(users=USERS)
        await ib.start()
        port = ib.listen_port
        try:
            for _ in range(MAX_FAILURES):
                got = await _exchange(port, "127.0.0.1", _socks5_login("alice", "guess"), 4)
                assert got == b"\x05\x02\x01\x01"  # USERPASS chosen, then: failed
            # Now blocked: the right password from the same source fails, at once.
            t0 = time.monotonic()
            got = await _exchange(port, "127.0.0.1", _socks5_login("alice", "wonderland"), 4)
            assert got == b"\x05\x02\x01\x01" and time.monotonic() - t0 < 1.0
            assert ib.auth.throttled == 1
            # Another source with the right password is not affected.
            got = await _exchange(port, "127.0.0.2", _socks5_login("alice", "wonderland"), 4)
            assert got == b"\x05\x02\x01\x00"
        finally:
            await ib.stop()

    asyncio.run(main())


def test_http_basic_is_throttled_per_source() -> None:
    async def main() -> None:
        ib = _inbound(users=USERS)
        await ib.start()
        port = ib.listen_port
        try:
            for _ in range(MAX_FAILURES):
                got = await _exchange(port, "127.0.0.3", _http("alice", "guess"), 1 << 16)
                assert got.startswith(b"HTTP/1.1 407 ")
            got = await _exchange(port, "127.0.0.3", _http("alice", "wonderland"), 1 << 16)
            assert got.startswith(b"HTTP/1.1 429 ") and b"\r\nRetry-After: 6" in got
            got = await _exchange(port, "127.0.0.4", _http("alice", "wonderland"), 1 << 16)
            assert got.startswith(b"HTTP/1.1 403 ")  # authenticated; the route blocks it
            # The two protocols share one count per source.
            got = await _exchange(port, "127.0.0.3", _socks5_login("alice", "wonderland"), 4)
            assert got == b"\x05\x02\x01\x01"
        finally:
            await ib.stop()

    asyncio.run(main())


def test_failure_table_is_bounded_under_many_sources() -> None:
    async def main() -> None:
        ib = _inbound(users=USERS)
        ib.auth = UserAuth([("alice", "wonderland")], max_sources=64)
        await ib.start()
        try:
            sources = [f"127.0.{i // 250 + 1}.{i % 250 + 1}" for i in range(300)]
            for i in range(0, len(sources), 50):
                await asyncio.gather(*(
                    _exchange(ib.listen_port, src, _socks5_login("alice", "guess"), 4)
                    for src in sources[i : i + 50]
                ))  # fmt: skip
                assert len(ib.auth) <= 64
            assert ib.auth.evicted == 300 - 64
            right = _socks5_login("alice", "wonderland")
            got = await _exchange(ib.listen_port, sources[-1], right, 4)
            assert got == b"\x05\x02\x01\x00"
        finally:
            await ib.stop()

    asyncio.run(main())


@pytest.mark.parametrize("listen", ["0.0.0.0", "::"])
def test_open_proxy_refused_unless_asked_for(listen: str) -> None:
    with pytest.raises(ZtunError, match=r"would be an open proxy.*allow_unauthenticated_remote"):
        _inbound(listen=listen)
    _inbound(listen=listen, allow_unauthenticated_remote=True)
    _inbound(listen=listen, users=USERS)
