"""Socket readiness for handshakes: wait without setting up the loop's watch again each time.

Owns: `Waiter` (await readable/writable on one non-blocking socket, with an optional
deadline), `send_all` and `connect` (a non-blocking TCP connect to an already resolved
address).

Why not `loop.sock_recv` / `loop.sock_connect`: with uvloop each of them registers the socket,
waits once and unregisters it, and a registration costs a poll handle (an ioctl and several
epoll_ctl calls); `sock_connect` also resolves the address in libuv's thread pool, even an IP
literal. A handshake waits several times on the same socket, so `Waiter` keeps the watch
between waits and drops it only when the socket is ready with nobody waiting (else a ready
socket would wake the loop again and again). Callers must call `close()` before closing the
socket; whoever takes the socket over next (the relay) may replace the callback with its own
`add_reader`/`add_writer`, which the loop does in place.

Why a deadline here rather than `asyncio.timeout`: a handshake only ever blocks in a wait, so
one timer that fails the pending wait does the job; `asyncio.timeout` cancels and uncancels the
task around it and cost about 4 µs per use against 1 µs for the timer, twice per connection.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Any

_IN_PROGRESS = (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY)


class Waiter:
    """Awaits readiness of one non-blocking socket; one wait at a time.

    A wake can be spurious (a readiness event the loop collected before the last read), so
    callers read non-blocking and wait again on EAGAIN.
    """

    __slots__ = ("_expired", "_fd", "_fut", "_loop", "_reading", "_timer", "_writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self._loop = loop
        self._fd = sock.fileno()
        self._fut: asyncio.Future[None] | None = None
        self._reading = False
        self._writing = False
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    def set_deadline(self, delay: float) -> None:
        """From `delay` seconds on, the pending wait and every later one raise TimeoutError."""
        self.clear_deadline()
        self._timer = self._loop.call_later(delay, self._expire)

    def clear_deadline(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        self._expired = True
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_exception(TimeoutError())

    def _wake(self) -> None:
        fut = self._fut
        if fut is None:
            # Ready, but nobody waits: stop watching until the next wait.
            self._unwatch()
            return
        self._fut = None
        if not fut.done():
            fut.set_result(None)

    async def readable(self) -> None:
        loop = self._loop
        # Add before remove: the socket stays watched, so the loop keeps its poll handle.
        if not self._reading:
            loop.add_reader(self._fd, self._wake)
            self._reading = True
        if self._writing:
            loop.remove_writer(self._fd)
            self._writing = False
        await self._wait()

    async def writable(self) -> None:
        loop = self._loop
        if not self._writing:
            loop.add_writer(self._fd, self._wake)
            self._writing = True
        if self._reading:
            loop.remove_reader(self._fd)
            self._reading = False
        await self._wait()

    async def _wait(self) -> None:
        if self._expired:
            raise TimeoutError
        fut = self._fut = self._loop.create_future()
        try:
            await fut
        finally:
            self._fut = None

    def close(self) -> None:
        """Stop watching and drop the deadline (idempotent); call before closing the socket."""
        self.clear_deadline()
        self._unwatch()

    def _unwatch(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False


async def send_all(sock: socket.socket, data: bytes, waiter: Waiter) -> None:
    """Send all of `data`; handshake messages are small, so this almost never waits."""
    while data:
        try:
            n = sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        data = data[n:]
        if data:
            await waiter.writable()


async def connect(sock: socket.socket, address: tuple[Any, ...], waiter: Waiter) -> None:
    """Connect non-blocking `sock` to a resolved `address`; raises OSError like connect(2)."""
    err = sock.connect_ex(address)
    if err == 0:
        return
    if err not in _IN_PROGRESS:
        raise OSError(err, os.strerror(err))
    await waiter.writable()
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))
