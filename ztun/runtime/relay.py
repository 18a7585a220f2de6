"""The TCP relay: moves bytes both ways between two connected sockets until both sides end.

Owns: the byte pump (Linux `splice` socket → pipe → socket, or a `recv_into`/`send` copy loop
where splice is missing), back-pressure (a direction stops reading while its destination cannot
take more), half-close (a side's EOF becomes `shutdown(SHUT_WR)` on the other side once
everything before it has been delivered, and the other direction keeps flowing), the idle
timeout, and byte counts.

Why splice: with asyncio streams every byte is copied into Python objects twice; splice keeps
bytes in the kernel, and the pump is driven by the loop's `add_reader`/`add_writer` callbacks,
so the cost per wake-up is a few syscalls whatever the size of the data.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import ClassVar

from ztun.runtime.netio import Waiter

try:
    import fcntl
except ImportError:  # pragma: no cover - not Linux
    fcntl = None  # type: ignore[assignment]

HAVE_SPLICE = hasattr(os, "splice") and fcntl is not None
_SPLICE_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if HAVE_SPLICE else 0
#: Pipe size asked for with F_SETPIPE_SZ; a refusal (per-user pipe quota) keeps the default.
PIPE_SIZE = 1 << 20
#: Buffer per direction for the copy fallback.
COPY_BUFFER = 256 * 1024
#: Pump rounds per wake-up before yielding to other flows (fairness between connections).
_MAX_ROUNDS = 16
#: Empty pipes kept for reuse: saves four syscalls per connection under a high connection rate.
_POOL_MAX = 256
_pipe_pool: list[tuple[int, int, int]] = []

# Errors that mean "the peer went away"; anything else is unexpected but still ends the relay.
_RESET_ERRNOS = {errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.ENOTCONN}


@dataclass(slots=True)
class RelayResult:
    """How a relay ended: bytes client→remote (`up`) and remote→client (`down`), and why."""

    up: int = 0
    down: int = 0
    #: "eof" (both sides finished), "idle", "reset", "error", "cancelled" or "closed"
    reason: str = "eof"
    error: str | None = None
    #: the running relay (for `moved` and `close`), None before it starts and after it ends
    live: _Relay | None = None
    #: `close` was asked for before the relay started: it ends as soon as it would start
    close_asked: bool = False

    def moved(self) -> tuple[int, int]:
        """(up, down) so far: the pumps' own counts while the relay runs (no extra work per
        chunk), the final ones after."""
        r = self.live
        if r is None:
            return self.up, self.down
        return r.base_up + r.up.count, r.base_down + r.down.count

    def close(self) -> None:
        """End the relay now (both sockets left to send RST when the caller closes them)."""
        self.close_asked = True
        if self.live is not None:
            self.live.close()


def _new_pipe() -> tuple[int, int, int]:
    """(read fd, write fd, capacity in bytes), from the pool when one is free."""
    if _pipe_pool:
        return _pipe_pool.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    cap = 65536
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    with contextlib.suppress(OSError):
        cap = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    return r, w, cap


def _release_pipe(pipe: tuple[int, int, int], empty: bool) -> None:
    if empty and len(_pipe_pool) < _POOL_MAX:
        _pipe_pool.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


class _Direction:
    """One direction of the relay: src → (pipe or buffer) → dst."""

    __slots__ = (
        "buf",
        "count",
        "done",
        "dst",
        "dst_fd",
        "end",
        "eof",
        "pipe",
        "reading",
        "relay",
        "splice",
        "src",
        "src_fd",
        "start",
        "writing",
    )

    def __init__(self, relay: _Relay, src: socket.socket, dst: socket.socket, splice: bool) -> None:
        self.relay = relay
        self.src, self.dst = src, dst
        self.src_fd, self.dst_fd = src.fileno(), dst.fileno()
        # Pipes and buffers are taken only while data is in flight, so an idle connection costs
        # no file descriptors or buffer memory (1000 open connections stay cheap).
        self.splice = splice
        self.pipe: tuple[int, int, int] | None = None
        self.buf: memoryview | None = None
        self.start = 0  # copy mode: first unsent byte in buf
        self.end = 0  # copy mode: one past the last received byte; splice mode: bytes in pipe
        self.count = 0
        self.eof = False
        self.done = False
        self.reading = False
        self.writing = False

    @property
    def pending(self) -> int:
        return self.end - self.start

    def pump(self) -> None:
        """Move what can be moved now without blocking, then wait for the right event."""
        if self.done:
            return
        try:
            if self.splice:
                if self.pipe is None:
                    self.pipe = _new_pipe()
                self._pump_splice()
                if self.end == 0 and len(_pipe_pool) < _POOL_MAX:
                    _pipe_pool.append(self.pipe)
                    self.pipe = None
            else:
                if self.buf is None:
                    self.buf = memoryview(bytearray(COPY_BUFFER))
                self._pump_copy()
        except OSError as e:
            self.relay.fail(e)
            return
        if self.eof and self.pending == 0:
            self._finish()
            return
        # Back-pressure: while bytes wait for dst, wait for dst and leave src unread.
        self._want(read=self.pending == 0 and not self.eof, write=self.pending > 0)

    def _pump_splice(self) -> None:
        r, w, cap = self.pipe  # type: ignore[misc]
        splice = os.splice
        moved = False
        for _ in range(_MAX_ROUNDS):
            progressed = False
            room = cap - self.end
            if not self.eof and room > 0:
                try:
                    n = splice(self.src_fd, w, room, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    # src empty, or the pipe is full in buffer slots; both resolve via dst.
                    n = -1
                if n == 0:
                    self.eof = True
                elif n > 0:
                    self.end += n
                    progressed = True
            if self.end:
                try:
                    m = splice(r, self.dst_fd, self.end, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    m = 0
                if m:
                    self.end -= m
                    self.count += m
                    progressed = True
            if not progressed:
                break
            moved = True
        if moved:
            self.relay.active = True

    def _pump_copy(self) -> None:
        buf = self.buf
        assert buf is not None
        moved = False
        for _ in range(_MAX_ROUNDS):
            progressed = False
            if not self.eof and self.start == self.end:
                self.start = self.end = 0
                try:
                    n = self.src.recv_into(buf)
                except BlockingIOError:
                    n = -1
                if n == 0:
                    self.eof = True
                elif n > 0:
                    self.end = n
                    progressed = True
            if self.end > self.start:
                try:
                    m = self.dst.send(buf[self.start : self.end])
                except BlockingIOError:
                    m = 0
                if m:
                    self.start += m
                    self.count += m
                    progressed = True
            if not progressed:
                break
            moved = True
        if moved:
            self.relay.active = True

    def arm(self) -> None:
        self._want(read=True, write=False)

    def _want(self, read: bool, write: bool) -> None:
        loop = self.relay.loop
        if read != self.reading:
            if read:
                loop.add_reader(self.src_fd, self.pump)
            else:
                loop.remove_reader(self.src_fd)
            self.reading = read
        if write != self.writing:
            if write:
                loop.add_writer(self.dst_fd, self.pump)
            else:
                loop.remove_writer(self.dst_fd)
            self.writing = write

    def _finish(self) -> None:
        """src ended and everything is delivered: pass the EOF on as a FIN."""
        self.done = True
        self._want(read=False, write=False)
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
        self.relay.direction_done()

    def stop(self) -> None:
        self._want(read=False, write=False)
        self.done = True
        if self.pipe is not None:
            _release_pipe(self.pipe, empty=self.end == 0)
            self.pipe = None


class _IdleClock:
    """One timer for all relays of a loop with the same idle period, ticking while any exist.

    Why shared: a timer per relay (created at start, cancelled at the end) cost a timer
    handle set up and torn down per connection; the relays' own ticks need no precision.
    """

    _clocks: ClassVar[dict[tuple[int, float], _IdleClock]] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop, period: float) -> None:
        self.loop = loop
        self.period = period
        self.relays: set[_Relay] = set()
        self.timer: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop, period: float) -> _IdleClock:
        key = (id(loop), period)
        clock = cls._clocks.get(key)
        if clock is None or clock.loop is not loop:  # an id can be reused by a later loop
            clock = cls._clocks[key] = cls(loop, period)
        return clock

    def arm(self) -> None:
        if self.timer is None:
            self.timer = self.loop.call_later(self.period, self._tick)

    def _tick(self) -> None:
        self.timer = None
        for r in list(self.relays):
            r._tick()
        if self.relays:
            self.arm()


class _Relay:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        remote: socket.socket,
        idle_timeout: float,
        splice: bool,
        result: RelayResult,
    ) -> None:
        self.loop = loop
        self.client, self.remote = client, remote
        self.idle_timeout = idle_timeout
        self.result = result
        self.future: asyncio.Future[None] = loop.create_future()
        self.active = False
        self.ended = False
        self.idle_ticks = 0
        self.clock: _IdleClock | None = None
        #: bytes sent before the pumps started (`initial_up`/`initial_down`)
        self.base_up = self.base_down = 0
        self.up = _Direction(self, client, remote, splice)
        try:
            self.down = _Direction(self, remote, client, splice)
        except BaseException:
            self.up.stop()
            raise

    def start(self, client_watch: Waiter | None = None, remote_watch: Waiter | None = None) -> None:
        if self.idle_timeout > 0:
            # Counted as active at start, so a silent connection still gets a full period.
            self.active = True
            self.clock = _IdleClock.of(self.loop, self.idle_timeout / 4)
            self.clock.relays.add(self)
            self.clock.arm()
        # A handshake's watch is taken over in place (see ztun/runtime/netio.py): add our readers
        # first, then drop a writer the handshake left, so the loop keeps the poll handle.
        c_state = client_watch.adopt() if client_watch is not None else (False, False)
        r_state = remote_watch.adopt() if remote_watch is not None else (False, False)
        # Wait for data rather than pump now: nothing is taken until a side has bytes.
        self.up.arm()
        self.down.arm()
        if c_state[1]:
            self.loop.remove_writer(self.up.src_fd)
        if r_state[1]:
            self.loop.remove_writer(self.down.src_fd)

    def _tick(self) -> None:
        # Activity is a flag set by the pumps, checked four times per idle period, so the hot
        # path never reads the clock.
        if self.active:
            self.active = False
            self.idle_ticks = 0
        else:
            self.idle_ticks += 1
            if self.idle_ticks >= 4:
                self.result.reason = "idle"
                self._end()

    def direction_done(self) -> None:
        if self.up.done and self.down.done:
            self._end()

    def close(self) -> None:
        """Closed from outside (the API): both sides get RST, as from a reset peer."""
        if not self.ended:
            self.result.reason = "closed"
            self._end(reset=True)

    def fail(self, exc: OSError) -> None:
        if self.ended:
            return
        self.result.reason = "reset" if exc.errno in _RESET_ERRNOS else "error"
        self.result.error = os.strerror(exc.errno) if exc.errno else str(exc)
        self._end(reset=True)

    def _end(self, reset: bool = False) -> None:
        # Not future.done(): cancelling the awaiting task cancels the future before we get here.
        if self.ended:
            return
        self.ended = True
        self.up.stop()
        self.down.stop()
        if self.clock is not None:
            self.clock.relays.discard(self)
        self.result.up = self.base_up + self.up.count
        self.result.down = self.base_down + self.down.count
        self.result.live = None
        if reset:
            # One side reset: reset the other too rather than pretend a clean end (RST, not FIN).
            for s in (self.client, self.remote):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if not self.future.done():
            self.future.set_result(None)


async def relay(
    client: socket.socket,
    remote: socket.socket,
    *,
    idle_timeout: float = 300.0,
    initial_up: bytes = b"",
    initial_down: bytes = b"",
    use_splice: bool | None = None,
    result: RelayResult | None = None,
    client_watch: Waiter | None = None,
    remote_watch: Waiter | None = None,
) -> RelayResult:
    """Relay between two connected non-blocking sockets until both directions end.

    `initial_up`/`initial_down` are bytes already read from one side (e.g. after a handshake)
    that must reach the other side first. The relay closes neither socket: the caller owns them
    (they are left with SO_LINGER 0 after a reset, so closing them sends RST). Pass `result` to
    read the counts even when the relay is cancelled.

    `client_watch`/`remote_watch`: a handshake's `netio.Waiter` still watching that socket; the
    relay takes the watch over in place (or ends it, when it must send initial bytes first) and
    unwatches the socket when it ends, so the caller's later `close()` of the Waiter is a no-op.
    """
    res = result if result is not None else RelayResult()
    loop = asyncio.get_running_loop()
    splice = HAVE_SPLICE if use_splice is None else (use_splice and HAVE_SPLICE)
    timeout = idle_timeout if idle_timeout > 0 else None
    extra_up = extra_down = 0
    if initial_up or initial_down:
        # Sent through the loop's own socket calls, which would take turns with a Waiter's
        # callback on the same socket (and may return early): end the watches first.
        for w in (client_watch, remote_watch):
            if w is not None:
                w.close()
        client_watch = remote_watch = None
    try:
        if initial_up:
            await asyncio.wait_for(loop.sock_sendall(remote, initial_up), timeout)
            extra_up = len(initial_up)
        if initial_down:
            await asyncio.wait_for(loop.sock_sendall(client, initial_down), timeout)
            extra_down = len(initial_down)
    except OSError as e:  # TimeoutError included
        res.reason = "idle" if isinstance(e, TimeoutError) else "reset"
        res.error = str(e) or None
        res.up, res.down = extra_up, extra_down
        return res
    try:
        r = _Relay(loop, client, remote, idle_timeout, splice, res)
    except BaseException:
        for w in (client_watch, remote_watch):
            if w is not None:
                w.close()
        raise
    r.base_up, r.base_down = extra_up, extra_down
    res.live = r
    r.start(client_watch, remote_watch)
    if res.close_asked:
        r.close()
    try:
        await r.future
    except asyncio.CancelledError:
        r.result.reason = "cancelled"
        r._end()
        raise
    return r.result
