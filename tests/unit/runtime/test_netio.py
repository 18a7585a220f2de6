"""netio.Waiter and netio.connect on local sockets (socket pairs; loopback for connect).

Each test runs on asyncio's own loop and on uvloop (what `ztun run` uses), which differ in how
they keep watches.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from ztun.runtime import netio

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    if request.param == "uvloop":

        def on_uvloop(coro: Coroutine[Any, Any, None]) -> None:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(coro)

        return on_uvloop
    return asyncio.run


async def recv(w: netio.Waiter, sock: socket.socket) -> bytes:
    """Like every caller: a wake may be spurious, so read until the read succeeds."""
    while True:
        await w.readable()
        try:
            return sock.recv(10)
        except BlockingIOError:
            continue


def test_waiter_keeps_the_watch_between_waits_and_drops_it_when_idle(run: Runner) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        w = netio.Waiter(loop, a)
        try:
            loop.call_later(0.01, b.send, b"x")
            assert await recv(w, a) == b"x"
            assert w._reading  # still watched: the next wait costs no new registration
            loop.call_later(0.01, b.send, b"y")
            assert await recv(w, a) == b"y"
            # Ready with nobody waiting: the watch is dropped instead of waking the loop forever.
            b.send(b"z")
            await asyncio.sleep(0.05)
            assert not w._reading
            assert await recv(w, a) == b"z"  # watches again; the byte is still there
            await w.writable()  # switches to writing without a gap
            assert w._writing and not w._reading
        finally:
            w.close()
            w.close()  # idempotent
            assert not loop.remove_reader(a.fileno())  # uvloop says None, asyncio False
            assert not loop.remove_writer(a.fileno())
            a.close()
            b.close()

    run(main())


def test_waiter_cancelled_wait_leaves_it_usable(run: Runner) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        w = netio.Waiter(loop, a)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(w.readable(), 0.02)
        b.send(b"x")
        assert await asyncio.wait_for(recv(w, a), 1) == b"x"
        w.close()
        a.close()
        b.close()

    run(main())


def test_connect_ok_and_refused(run: Runner) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen(1)
            s = socket.socket()
            s.setblocking(False)
            w = netio.Waiter(loop, s)
            await netio.connect(s, srv.getsockname(), w)
            w.close()
            s.close()
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))  # bound, not listening
            s = socket.socket()
            s.setblocking(False)
            w = netio.Waiter(loop, s)
            with pytest.raises(OSError) as ei:
                await netio.connect(s, closed.getsockname(), w)
            assert ei.value.errno == errno.ECONNREFUSED
            w.close()
            s.close()

    run(main())


def test_deadline_fails_the_pending_and_later_waits(run: Runner) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        w = netio.Waiter(loop, a)
        try:
            w.set_deadline(0.05)
            t0 = loop.time()
            with pytest.raises(TimeoutError):
                await w.readable()
            assert loop.time() - t0 >= 0.04
            with pytest.raises(TimeoutError):
                await w.writable()  # expired for good
            # A cleared deadline never fires.
            w2 = netio.Waiter(loop, b)
            w2.set_deadline(0.02)
            w2.clear_deadline()
            loop.call_later(0.1, a.send, b"x")
            assert await recv(w2, b) == b"x"
            w2.close()
        finally:
            w.close()
            a.close()
            b.close()

    run(main())


def test_connect_over_loopback_needs_no_watch(run: Runner) -> None:
    # Loopback finishes the handshake inside connect(): TCP_INFO says so, nothing is watched.
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket() as srv:
            srv.bind(("127.0.0.1", 0))
            srv.listen(1)
            s = socket.socket()
            s.setblocking(False)
            w = netio.Waiter(loop, s)
            await netio.connect(s, srv.getsockname(), w, timeout=1.0)
            assert not w._reading and not w._writing and w._timer is None
            w.close()
            s.close()

    run(main())


@pytest.mark.parametrize("state", ["reading", "writing"])
def test_relay_adopts_a_handshake_watch_in_place(run: Runner, state: str) -> None:
    from ztun.runtime.relay import relay

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a1, a2 = socket.socketpair()
        b1, b2 = socket.socketpair()
        for s in (a1, a2, b1, b2):
            s.setblocking(False)
        handover = netio.Handover()
        w = netio.Waiter(loop, b1)
        # Leave the watch as a handshake would: last waited readable (SOCKS5) or writable
        # (connect), then hand it over with nobody waiting.
        if state == "reading":
            b2.send(b"r")
            await recv(w, b1)
        else:
            await w.writable()
        handover.waiter = w
        task = asyncio.ensure_future(relay(a1, b1, remote_watch=handover.take()))
        await asyncio.sleep(0)
        assert not w._reading and not w._writing  # adopted: the Waiter no longer owns it
        w.close()  # a no-op now: must not drop the relay's reader
        a2.send(b"up")
        b2.send(b"down")
        a2.shutdown(socket.SHUT_WR)
        b2.shutdown(socket.SHUT_WR)
        got_b = await loop.sock_recv(b2, 10)
        got_a = await loop.sock_recv(a2, 10)
        res = await asyncio.wait_for(task, 2)
        assert (got_b, got_a) == (b"up", b"down")
        assert (res.up, res.down, res.reason) == (2, 4, "eof")
        for s in (a1, a2, b1, b2):
            s.close()

    run(main())


def test_handover_release_drops_the_watch(run: Runner) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        w = netio.Waiter(loop, a)
        loop.call_later(0.01, b.send, b"x")
        await recv(w, a)
        h = netio.Handover()
        h.waiter = w
        h.release()
        h.release()  # idempotent
        assert h.waiter is None and not w._reading
        a.close()
        b.close()

    run(main())
