"""A worker that retires after a reload serves what is queued on its listeners before it
closes them: closing one socket of a SO_REUSEPORT group resets the connections queued on it
(the new workers' sockets never see them). Real loopback sockets; the loop is kept from
accepting (no await between the connects and the stop), so the connections are queued."""

from __future__ import annotations

import asyncio
import socket

import pytest
from mixed_to_block import mixed_to_block

from ztun.inbound.redirect import RedirectListener

QUEUED = 5


def answer(c: socket.socket) -> bytes | str:
    """What a client gets for a SOCKS5 greeting: the inbound's reply, or how it ended."""
    c.settimeout(2.0)
    try:
        c.sendall(b"\x05\x01\x00")
        return c.recv(2)
    except ConnectionResetError:
        return "reset"
    finally:
        c.close()


@pytest.mark.parametrize("serve_queued", [True, False])
def test_mixed_retiring_serves_its_queue(serve_queued: bool) -> None:
    async def go() -> list[bytes | str]:
        inbound = mixed_to_block()
        inbound.reuse_port = True
        await inbound.start()
        port = inbound.listen_port
        clients = [socket.create_connection(("127.0.0.1", port), 2) for _ in range(QUEUED)]
        await inbound.stop(serve_queued=serve_queued)
        loop = asyncio.get_running_loop()
        got = await asyncio.gather(*(loop.run_in_executor(None, answer, c) for c in clients))
        await asyncio.gather(*inbound.tasks)
        return list(got)

    got = asyncio.run(go())
    if serve_queued:
        assert got == [b"\x05\x00"] * QUEUED
    else:  # what closing the listener did before: every queued connection reset
        assert set(got) <= {"reset", b""}


@pytest.mark.parametrize("serve_queued", [True, False])
def test_redirect_retiring_accepts_its_queue(serve_queued: bool) -> None:
    """Without nftables nothing here was redirected: the queued connections are accepted and
    answered as not redirected (counted), instead of being reset by the close."""
    served: list[object] = []

    async def go() -> int:
        listener = RedirectListener("tun-in", lambda f, n: None, lambda *a: served.append(a))  # type: ignore[arg-type,return-value]
        ports = listener.open([4], reuse_port=True)
        clients = [socket.create_connection(("127.0.0.1", ports[4]), 2) for _ in range(QUEUED)]
        listener.close(serve_queued=serve_queued)
        for c in clients:
            c.close()
        return listener.not_redirected

    assert asyncio.run(go()) == (QUEUED if serve_queued else 0)
    assert served == []
