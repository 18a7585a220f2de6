"""The mixed inbound's handshake against in-process clients (loopback only): the handshake
deadline, and a client that sends greeting and request in one write."""

from __future__ import annotations

import asyncio
import socket
import time

from mixed_to_block import mixed_to_block

from ztun.address import Address
from ztun.inbound.mixed import MixedInbound
from ztun.proto import socks5
from ztun.proto.socks5 import Reply


def _inbound(**kw: float) -> MixedInbound:
    return mixed_to_block(**kw)


async def _talk(port: int, data: bytes) -> tuple[bytes, float]:
    """Send `data`, read until the inbound closes; what came back and how long it took."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", port))
        t0 = time.monotonic()
        await loop.sock_sendall(s, data)
        got = b""
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(s, 4096), 5)
            if not chunk:
                return got, time.monotonic() - t0
            got += chunk
    finally:
        s.close()


def test_handshake_deadline_closes_a_stalled_client() -> None:
    async def main() -> None:
        ib = _inbound(handshake_timeout=0.2)
        await ib.start()
        try:
            # Half a greeting, then nothing: closed once the deadline passes, not before.
            got, took = await _talk(ib.listen_port, b"\x05")
            assert got == b"" and 0.15 < took < 2
            # Greeting answered, then no request: same.
            got, took = await _talk(ib.listen_port, b"\x05\x01\x00")
            assert got == b"\x05\x00" and 0.15 < took < 2
        finally:
            await ib.stop()

    asyncio.run(main())


def test_pipelined_greeting_and_request() -> None:
    async def main() -> None:
        ib = _inbound()
        await ib.start()
        try:
            request = bytes((5, 1, 0)) + socks5.build_address(Address("x.test", 443))
            got, _ = await _talk(ib.listen_port, b"\x05\x01\x00" + request)
            assert got == b"\x05\x00" + socks5.build_reply(Reply.NOT_ALLOWED)
        finally:
            await ib.stop()
            await asyncio.gather(*ib.tasks)

    asyncio.run(main())
