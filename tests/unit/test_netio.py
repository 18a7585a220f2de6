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

from ztun import netio

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    if request.param == "uvloop":
        if uvloop is None:  # pragma: no cover
            pytest.skip("uvloop not installed")

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
