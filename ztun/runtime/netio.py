"""Socket readiness for handshakes: wait without setting up the loop's watch again each time.

Owns: `Waiter` (await readable/writable on one non-blocking socket, with an optional
deadline), `Handover` (how an outbound passes its socket's live watch on to the relay),
`send_all` and `connect` (a non-blocking TCP connect to an already resolved address).

Why not `loop.sock_recv` / `loop.sock_connect`: with uvloop each of them registers the socket,
waits once and unregisters it, and a registration costs a poll handle (an ioctl and several
epoll_ctl calls); `sock_connect` also resolves the address in libuv's thread pool, even an IP
literal. A handshake waits several times on the same socket, so `Waiter` keeps the watch
between waits and drops it only when the socket is ready with nobody waiting (else a ready
socket would wake the loop again and again). Callers must call `close()` before closing the
socket; whoever takes the socket over next (the relay) may replace the callback with its own
`add_reader`/`add_writer`, which the loop does in place (`Waiter.adopt`).

Why hand a watch over: with uvloop, dropping a socket's last watch closes its poll handle
(epoll_ctl DEL) and the relay's first `add_reader` builds a new one (an ioctl and epoll_ctl
ADD); kept, the relay's callbacks replace the handshake's in place at no syscall, or at one
epoll_ctl MOD when the events change (a connect waited for writable, the relay reads).

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
_TCP_INFO = getattr(socket, "TCP_INFO", 11)
#: tcpi_state values (the first byte of struct tcp_info): include/net/tcp_states.h
_TCP_ESTABLISHED, _TCP_CLOSE = 1, 7


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

    def adopt(self) -> tuple[bool, bool]:
        """Give the watch up to a new owner without touching the loop: (reading, writing).

        The new owner must `add_reader` the socket before it removes a writer it does not
        want, so the loop keeps the poll handle; this Waiter's `close()` is then a no-op."""
        self.clear_deadline()
        state = (self._reading, self._writing)
        self._reading = self._writing = False
        self._fut = None
        return state

    def _unwatch(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False


class Handover:
    """Filled by an outbound's `connect_tcp` with the socket's still-watching `Waiter`.

    The rule (see ztun.outbound.base.Outbound.connect_tcp): whoever passed the Handover owns
    the watch with the socket; it gives `waiter` to the relay (which adopts it) or calls
    `release()` before it closes the socket. A socket closed while watched would leave the loop
    a stale poll handle for a file descriptor number that the next socket reuses.
    """

    __slots__ = ("waiter",)

    def __init__(self) -> None:
        self.waiter: Waiter | None = None

    def take(self) -> Waiter | None:
        """The waiter, now the caller's (the Handover forgets it)."""
        w, self.waiter = self.waiter, None
        return w

    def release(self) -> None:
        """Stop the watch, if still held (idempotent)."""
        w, self.waiter = self.waiter, None
        if w is not None:
            w.close()


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


async def connect(
    sock: socket.socket, address: tuple[Any, ...], waiter: Waiter, timeout: float | None = None
) -> None:
    """Connect non-blocking `sock` to a resolved `address`; raises OSError like connect(2).
    `timeout`: a deadline on `waiter`, set only if the connect has to wait."""
    err = sock.connect_ex(address)
    if err == 0:
        return
    if err not in _IN_PROGRESS:
        raise OSError(err, os.strerror(err))
    # Over loopback or a veth pair the whole three-way handshake usually runs inside connect()
    # (the peer's answer is processed before the call returns): ask the socket's TCP state
    # first, which saves the watch for writable and a trip through the loop.
    state = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0]
    if state == _TCP_ESTABLISHED:
        return
    if state != _TCP_CLOSE:
        if timeout is not None:
            waiter.set_deadline(timeout)
        await waiter.writable()
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if not err and state == _TCP_CLOSE:
        err = errno.ECONNREFUSED  # closed already, its error taken by someone: still a failure
    if err:
        raise OSError(err, os.strerror(err))
