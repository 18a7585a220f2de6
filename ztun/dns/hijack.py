"""`hijack-dns`: ztun's DNS module as an outbound, so hijacked flows need nothing special.

A route rule with `action: hijack-dns` hands a flow to `DnsHijack` as it would to any outbound:
- UDP (TUN or SOCKS5 UDP ASSOCIATE): `open_udp` gives a session that answers in-process; each
  datagram is a query for `DnsClient.exchange`, and the answer goes back as if from the server
  the client asked (the session's `dest`).
- TCP (a TUN flow to port 53, or a CONNECT to port 53 on the mixed inbound): `connect_tcp`
  returns one end of a socket pair and serves DNS over TCP (RFC 7766 framing) on the other, so
  the inbound relays it like any connection.

Bounds: queries in flight per UDP session and per TCP connection, the size of a TCP message
(65535, the framing's own limit), an idle timeout per TCP connection, and the client's own
timeout (`DnsClient` answers SERVFAIL after its bounded wait, never hangs).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Protocol

from ztun.address import Address
from ztun.outbound.base import CloseHandler, Counters, DatagramHandler
from ztun.route.metadata import FlowMeta
from ztun.runtime.netio import Handover

log = logging.getLogger("ztun.dns")

#: Queries one UDP session (one client socket) may have in flight; more are dropped.
MAX_IN_FLIGHT = 64
#: A DNS-over-TCP connection with no query for this long is closed (RFC 7766 §6.2.3 asks
#: servers to keep idle connections short).
TCP_IDLE_TIMEOUT = 10.0


class DnsExchange(Protocol):
    """What the hijack needs of the DNS module (`ztun.dns.client.DnsClient`)."""

    async def exchange(self, query: bytes, meta: FlowMeta) -> bytes | None: ...


class DnsHijack:
    """The outbound every `hijack-dns` flow is given (tag `hijack-dns`)."""

    type = "dns"
    refuses_tcp = False
    drops_udp = False
    resolves_remotely = False

    def __init__(self, client: DnsExchange, tag: str = "hijack-dns") -> None:
        self.tag = tag
        self.client = client
        self.counters = Counters()
        self.tasks: set[asyncio.Task[None]] = set()
        #: queries answered, and queries dropped because too many were in flight
        self.queries = 0
        self.dropped = 0

    async def connect_tcp(
        self, dest: Address, meta: FlowMeta, handover: Handover | None = None
    ) -> socket.socket:
        inside, outside = socket.socketpair()
        inside.setblocking(False)
        outside.setblocking(False)
        self._spawn(self._serve_tcp(inside, meta))
        return outside

    async def open_udp(
        self, meta: FlowMeta, on_datagram: DatagramHandler, on_close: CloseHandler
    ) -> HijackSession:
        return HijackSession(self, meta, on_datagram)

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _serve_tcp(self, sock: socket.socket, meta: FlowMeta) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                        head = await _recv_exactly(loop, sock, 2)
                        if head is None:
                            return
                        (size,) = struct.unpack("!H", head)
                        query = await _recv_exactly(loop, sock, size) if size else b""
                except TimeoutError:
                    return
                if not query:
                    return
                answer = await self.client.exchange(query, meta)
                self.queries += 1
                if answer is None:
                    return  # a query that cannot be answered at all: close, as servers do
                await loop.sock_sendall(sock, struct.pack("!H", len(answer)) + answer)
        except OSError:
            return
        finally:
            sock.close()

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)


class HijackSession:
    """A UDP session of the hijack: every datagram is a query, answered in-process.

    A cache hit is answered within `send`; a miss is handed to the DNS module's `fetch_soon`,
    whose callback answers it. Why no task per query: a task (and the coroutines under it) was
    about a third of a miss's CPU. Only a query off the fast path gets a task."""

    def __init__(self, owner: DnsHijack, meta: FlowMeta, on_datagram: DatagramHandler) -> None:
        self.owner = owner
        self.meta = meta
        self.on_datagram = on_datagram
        self.closed = False
        self.in_flight: set[asyncio.Task[None]] = set()
        #: misses waiting for fetch_soon's callback
        self.waiting = 0
        # A client without the synchronous fast path (a test double) is asked through exchange.
        self._answer_cached = getattr(owner.client, "answer_cached", None)
        self._fetch_soon = getattr(owner.client, "fetch_soon", None)

    def send(self, dest: Address, payload: bytes) -> None:
        if self.closed:
            return
        if self.waiting + len(self.in_flight) >= MAX_IN_FLIGHT:
            self.owner.dropped += 1
            return
        ready = None if self._answer_cached is None else self._answer_cached(payload, self.meta)
        if isinstance(ready, bytes):
            self.owner.queries += 1
            self.on_datagram(dest, ready)
            return
        if ready is not None and self._fetch_soon is not None:
            self.waiting += 1
            self._fetch_soon(ready, lambda answer: self._answered(dest, answer))
            return
        task = self.owner._spawn(self._answer(dest, payload))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    def _answered(self, dest: Address, answer: bytes) -> None:
        self.waiting -= 1
        self.owner.queries += 1
        # From the server the client asked, whatever answered it. Also after the flow went
        # idle: a slow upstream (SERVFAIL comes only after the module's timeout) can outlast
        # a short UDP idle timeout, and the client is still waiting.
        self.on_datagram(dest, answer)

    async def _answer(self, dest: Address, payload: bytes) -> None:
        answer = await self.owner.client.exchange(payload, self.meta)
        self.owner.queries += 1
        if answer is not None:  # None: nothing to send (a malformed query, reject-drop)
            self.on_datagram(dest, answer)

    def close(self) -> None:
        # Queries in flight finish (each is bounded by the DNS module's timeout) so that
        # their answers still reach the client; DnsHijack.close cancels them at shutdown.
        self.closed = True


async def _recv_exactly(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int
) -> bytes | None:
    """`n` bytes, or None when the peer closed first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
