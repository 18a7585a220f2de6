"""The relay on local socket pairs: byte-exact both ways, half-close, back-pressure, idle, reset.

Runs for both pumps (splice and the copy fallback) on AF_UNIX socket pairs, so no network.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket

import pytest

from ztun.runtime import relay as relay_mod
from ztun.runtime.relay import RelayResult, relay

MODES = [pytest.param(True, id="splice"), pytest.param(False, id="copy")]
if not relay_mod.HAVE_SPLICE:  # pragma: no cover
    MODES = [pytest.param(False, id="copy")]


def pairs():
    a1, a2 = socket.socketpair()  # client side: app <-> relay
    b1, b2 = socket.socketpair()  # remote side: relay <-> server
    for s in (a1, a2, b1, b2):
        s.setblocking(False)
    return a1, a2, b1, b2


async def send_all_and_eof(sock: socket.socket, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, data)
    sock.shutdown(socket.SHUT_WR)


async def read_to_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    out = bytearray()
    while True:
        chunk = await loop.sock_recv(sock, 1 << 16)
        if not chunk:
            return bytes(out)
        out += chunk


@pytest.mark.parametrize("splice", MODES)
def test_bulk_both_ways_and_half_close(splice):
    up_data = os.urandom(3 * 1024 * 1024 + 17)
    down_data = os.urandom(2 * 1024 * 1024 + 5)

    async def main():
        app, rc, rr, srv = pairs()
        task = asyncio.create_task(relay(rc, rr, idle_timeout=10, use_splice=splice))
        # Half-close: app finishes sending first; the server keeps sending after seeing EOF.
        got_srv = asyncio.create_task(read_to_eof(srv))
        await send_all_and_eof(app, up_data)
        assert await got_srv == up_data
        got_app = asyncio.create_task(read_to_eof(app))
        await send_all_and_eof(srv, down_data)
        assert hashlib.sha256(await got_app).digest() == hashlib.sha256(down_data).digest()
        res = await asyncio.wait_for(task, 10)
        assert (res.up, res.down, res.reason) == (len(up_data), len(down_data), "eof")
        for s in (app, rc, rr, srv):
            s.close()

    asyncio.run(main())


@pytest.mark.parametrize("splice", MODES)
def test_initial_bytes_and_backpressure(splice):
    data = os.urandom(8 * 1024 * 1024)

    async def main():
        app, rc, rr, srv = pairs()
        task = asyncio.create_task(
            relay(rc, rr, idle_timeout=10, use_splice=splice, initial_up=b"HEAD")
        )
        sender = asyncio.create_task(send_all_and_eof(app, data))
        await asyncio.sleep(0.2)  # server not reading: the relay must stall, not buffer 8 MB
        assert not sender.done()
        got = await read_to_eof(srv)
        assert got == b"HEAD" + data
        srv.shutdown(socket.SHUT_WR)
        res = await asyncio.wait_for(task, 10)
        assert res.up == len(data) + 4 and res.down == 0
        for s in (app, rc, rr, srv):
            s.close()

    asyncio.run(main())


@pytest.mark.parametrize("splice", MODES)
def test_idle_timeout(splice):
    async def main():
        app, rc, rr, srv = pairs()
        res = await asyncio.wait_for(relay(rc, rr, idle_timeout=0.2, use_splice=splice), 5)
        assert res.reason == "idle"
        for s in (app, rc, rr, srv):
            s.close()

    asyncio.run(main())


@pytest.mark.parametrize("splice", MODES)
def test_peer_closes_with_data_in_flight(splice):
    async def main():
        app, rc, rr, srv = pairs()
        task = asyncio.create_task(relay(rc, rr, idle_timeout=10, use_splice=splice))
        await asyncio.get_running_loop().sock_sendall(app, b"x" * 100000)
        srv.close()  # the destination vanishes while data is on its way
        res = await asyncio.wait_for(task, 5)
        assert res.reason in ("reset", "error", "eof")
        for s in (app, rc, rr):
            s.close()

    asyncio.run(main())


def test_cancel_fills_result():
    async def main():
        app, rc, rr, srv = pairs()
        res = RelayResult()
        task = asyncio.create_task(relay(rc, rr, idle_timeout=10, result=res))
        await asyncio.get_running_loop().sock_sendall(app, b"abc")
        assert await asyncio.get_running_loop().sock_recv(srv, 10) == b"abc"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (res.reason, res.up) == ("cancelled", 3)
        for s in (app, rc, rr, srv):
            s.close()

    asyncio.run(main())
