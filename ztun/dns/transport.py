"""DNS transports: one per server type, each turning a query's wire bytes into a response's.

Owns: `udp` (one datagram per query, resent once, TC → TCP), `tcp` and `tls` (RFC 7766
length framing on one reused connection, queries pipelined), `https` (RFC 8484 POST over
HTTP/1.1 with h11, a few keep-alive connections), and the in-process servers `local` (the
system resolver), `hosts` (hosts files and a predefined table) and `fakeip` (a FakeIPPool).

Every network transport reaches its server through an outbound (the server's `detour`, else
the direct one): TCP-based ones take their socket from `connect_tcp`, so a socks detour does a
CONNECT and a direct one gives a socket that carries ztun's routing mark under auto_route; UDP
goes through `open_udp` (a UDP ASSOCIATE through socks).

The common interface is `exchange(query, timeout) -> response` and `close()`; any failure,
including the timeout, is a `DnsTransportError` with a reason, never another exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import os
import socket
import ssl
import struct
from collections import OrderedDict
from collections.abc import Callable, Container, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import h11

from ztun.address import Address, IPAddress, clip, ip_or_none
from ztun.config.options import (
    DNSServerOptions,
    DNSServerTLSOptions,
    FakeIPDNSServerOptions,
    HostsDNSServerOptions,
    HTTPSDNSServerOptions,
    LocalDNSServerOptions,
    TCPDNSServerOptions,
    TLSDNSServerOptions,
    UDPDNSServerOptions,
)
from ztun.dns import message
from ztun.dns import wire as dnswire
from ztun.errors import ZtunError
from ztun.outbound.base import Outbound, OutboundError
from ztun.route.metadata import FlowMeta

log = logging.getLogger("ztun.dns")

#: TTL of answers the in-process servers make up (the system resolver tells no TTL).
LOCAL_TTL = 60
#: How long a server's host name, resolved by the system resolver, is reused.
SERVER_NAME_TTL = 60.0
#: Queries waiting on one TCP/TLS connection; more open another exchange's wait on the lock.
MAX_PIPELINE = 64
#: Keep-alive HTTP/1.1 connections a DoH server may have at once (HTTP/1.1 cannot pipeline
#: safely, so concurrency means connections).
MAX_DOH_CONNECTIONS = 4
#: The largest DoH response body read.
MAX_BODY = message.MAX_MESSAGE
DEFAULT_HOSTS = "/etc/hosts"

_A, _AAAA = 1, 28
_TC = 0x02


class DnsTransportError(ZtunError):
    """A query got no usable answer from a server; `reason` is the short why."""

    def __init__(self, server: str, reason: str) -> None:
        super().__init__(f"DNS server {server!r}: {reason}")
        self.server = server
        self.reason = reason


class DnsTimeoutError(DnsTransportError):
    """The server did not answer within the time the query had."""


class Transport(Protocol):
    tag: str
    #: Answers are worth caching (not for servers answering from memory anyway).
    cacheable: bool

    async def exchange(self, query: bytes, timeout: float) -> bytes: ...

    async def close(self) -> None: ...


# -- wire helpers ------------------------------------------------------------------------------


def _with_id(wire: bytes, qid: int) -> bytes:
    return struct.pack("!H", qid) + wire[2:]


def _meta(dest: Address, network: str) -> FlowMeta:
    ip = ip_or_none(dest.host)
    return FlowMeta(
        network=network,  # type: ignore[arg-type]
        destination=ip,
        destination_port=dest.port,
        domain=None if ip is not None else dest.host,
    )


class _RandomIds:
    """16-bit ids from the OS's random source, read 1024 at a time: `secrets.randbelow` reads
    it once per call, a syscall per upstream query (~3 µs, as much as the rest of sending)."""

    __slots__ = ("_ids", "_left")

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._left = 0

    def next(self) -> int:
        if not self._left:
            self._ids = memoryview(os.urandom(2048)).cast("H").tolist()
            self._left = len(self._ids)
        self._left -= 1
        return self._ids[self._left]

    def unused(self, taken: Container[int]) -> int:
        """A random id not in `taken` (RFC 5452: a guessable id makes forging answers easy;
        ids in flight on one channel must tell their answers apart)."""
        qid = self.next()
        while qid in taken:
            qid = self.next()
        return qid


class _Ids:
    """Message ids for queries in flight on one channel: random (RFC 5452: a guessable id
    makes forging answers easy) and unique among those waiting."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[bytes]] = {}
        self._random = _RandomIds()

    def take(self, loop: asyncio.AbstractEventLoop) -> tuple[int, asyncio.Future[bytes]]:
        qid = self._random.unused(self.waiting)
        fut: asyncio.Future[bytes] = loop.create_future()
        self.waiting[qid] = fut
        return qid, fut

    def fail_all(self, exc: BaseException) -> None:
        waiting, self.waiting = self.waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(exc)


# -- the way to a server -----------------------------------------------------------------------


class _Dialer:
    """Where a network server is and how to reach it: its outbound, and its address as that
    outbound should get it.

    Why the system resolver for a host name behind a direct detour: the direct outbound
    resolves names through the DNS module, so handing it the server's name would ask this
    very server how to reach itself. A socks detour gets the name (the proxy resolves it)."""

    def __init__(self, tag: str, server: str, port: int, outbound: Outbound) -> None:
        self.tag = tag
        self.server = server
        self.port = port
        self.outbound = outbound
        self._local_resolve = ip_or_none(server) is None and hasattr(outbound, "set_resolver")
        self._resolved: tuple[str, float] | None = None

    async def address(self) -> Address:
        if not self._local_resolve:
            return Address(self.server, self.port)
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._resolved is not None and self._resolved[1] > now:
            return Address(self._resolved[0], self.port)
        try:
            infos = await loop.getaddrinfo(self.server, self.port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError) as e:  # IDNA: a label getaddrinfo refuses
            raise DnsTransportError(self.tag, f"cannot resolve {self.server}: {e}") from None
        ip = str(infos[0][4][0])
        self._resolved = (ip, now + SERVER_NAME_TTL)
        return Address(ip, self.port)

    async def connect(self) -> socket.socket:
        dest = await self.address()
        try:
            return await self.outbound.connect_tcp(dest, _meta(dest, "tcp"))
        except OutboundError as e:
            raise DnsTransportError(self.tag, str(e)) from None


def _timeout_error(tag: str, timeout: float) -> DnsTimeoutError:
    return DnsTimeoutError(tag, f"no answer within {timeout:g}s")


# -- UDP -------------------------------------------------------------------------------------


#: What a query sent with `UdpTransport.query_soon` is told when it ends, once: the answer
#: (the query's own id on it), or the error.
QueryDone = Callable[[bytes | None, DnsTransportError | None], None]
#: Queries in flight on one UDP server at once (ids are 16 bits; the DNS client's own bound
#: is lower, this one keeps the id search short whatever calls in).
MAX_UDP_IN_FLIGHT = 32768


class _Pending:
    """A UDP query in flight: what was sent, whom to tell, and its times."""

    __slots__ = ("caller_id", "deadline", "done", "resend_at", "timeout", "wire")

    def __init__(
        self, wire: bytes, caller_id: bytes, done: QueryDone, timeout: float, resend_at: float,
        deadline: float,
    ) -> None:  # fmt: skip
        self.wire = wire
        self.caller_id = caller_id
        self.done = done
        self.timeout = timeout
        self.resend_at = resend_at
        self.deadline = deadline


class UdpTransport:
    """One datagram per query on a UDP session of the detour, kept while it lives.

    Why one shared session: through socks every session is a UDP ASSOCIATE (a TCP connection
    and a handshake); ids tell the answers apart. A query is sent again once halfway through
    its time (a lost datagram is the usual reason for silence); a truncated answer is asked
    again over TCP with the time left.

    Why callbacks (`query_soon`) underneath `exchange`: a query in flight is an entry in two
    tables, with one timer for the whole transport (`_on_timer`); a task, a future and two
    timers per query were about a third of a hijacked miss's CPU (py-spy, bench_dns)."""

    cacheable = True

    def __init__(self, options: UDPDNSServerOptions, outbound: Outbound) -> None:
        self.tag = options.tag
        self.dialer = _Dialer(options.tag, options.server, options.server_port, outbound)
        self.tcp = TcpTransport(
            TCPDNSServerOptions(
                tag=options.tag, server=options.server, server_port=options.server_port
            ),
            outbound,
        )
        self._session: Any = None
        self._opening: asyncio.Future[Any] | None = None
        self._dest: Address | None = None
        #: queries in flight by the id they were sent with
        self._pending: dict[int, _Pending] = {}
        #: the same queries in the order of their next timer: those not resent yet by send
        #: time, those resent by resend time (with one timeout for all, that is deadline order)
        self._to_resend: OrderedDict[int, _Pending] = OrderedDict()
        self._to_expire: OrderedDict[int, _Pending] = OrderedDict()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._tasks: set[asyncio.Task[None]] = set()
        self._random_ids = _RandomIds()

    async def _get_session(self) -> Any:
        if self._session is not None and not self._session.closed:
            return self._session
        if self._opening is not None:
            return await asyncio.shield(self._opening)
        loop = asyncio.get_running_loop()
        self._opening = loop.create_future()
        try:
            self._dest = await self.dialer.address()
            session = await self.dialer.outbound.open_udp(
                _meta(self._dest, "udp"), self._on_datagram, self._on_close
            )
        except BaseException as e:
            err = e
            if isinstance(e, OutboundError):
                err = DnsTransportError(self.tag, str(e))
            self._opening.set_exception(err)
            self._opening.exception()  # retrieved: nobody else may be waiting
            self._opening = None
            if err is e:
                raise
            raise err from None
        self._session = session
        self._opening.set_result(session)
        self._opening = None
        return session

    async def exchange(self, query: bytes, timeout: float) -> bytes:
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def done(answer: bytes | None, error: DnsTransportError | None) -> None:
            if fut.done():  # the asker gave up; the entry ended on its own
                return
            if error is not None:
                fut.set_exception(error)
            else:
                assert answer is not None
                fut.set_result(answer)

        self.query_soon(query, timeout, done)
        return await fut

    def query_soon(self, query: bytes, timeout: float, done: QueryDone) -> None:
        """Send `query`; `done` is called exactly once, later, within about `timeout`: with
        the answer (carrying the query's id) or a DnsTransportError. No task and no future
        while the session is open (only opening one needs a task)."""
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or session.closed:
            task = loop.create_task(self._open_then_send(query, timeout, done))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._send(loop, session, query, timeout, done)

    async def _open_then_send(self, query: bytes, timeout: float, done: QueryDone) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            async with asyncio.timeout(timeout):
                session = await self._get_session()
        except TimeoutError:
            done(None, _timeout_error(self.tag, timeout))
            return
        except DnsTransportError as e:
            done(None, e)
            return
        except asyncio.CancelledError:
            done(None, DnsTransportError(self.tag, "closed"))
            raise
        except Exception as e:  # an outbound's unexpected failure is this query's error
            done(None, DnsTransportError(self.tag, f"cannot open a UDP session: {e}"))
            return
        left = max(0.001, timeout - (loop.time() - start))
        self._send(loop, session, query, left, done, told=timeout)

    def _send(
        self, loop: asyncio.AbstractEventLoop, session: Any, query: bytes, timeout: float,
        done: QueryDone, told: float | None = None,
    ) -> None:  # fmt: skip
        """`told`: the time the caller gave, for the timeout's message (`timeout` is what is
        left of it)."""
        pending = self._pending
        if len(pending) >= MAX_UDP_IN_FLIGHT:
            done(None, DnsTransportError(self.tag, "too many queries in flight"))
            return
        qid = self._random_ids.unused(pending)
        wire = _with_id(query, qid)
        now = loop.time()
        # A lost datagram is the usual reason for silence: sent once more halfway.
        entry = _Pending(wire, query[:2], done, told or timeout, now + timeout / 2, now + timeout)
        pending[qid] = entry
        self._to_resend[qid] = entry
        assert self._dest is not None
        session.send(self._dest, wire)
        if entry.resend_at < self._timer_at:  # none armed, or one for later (a longer timeout)
            self._arm(loop, entry.resend_at)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._on_timer), when

    def _on_timer(self) -> None:
        """Resend and expire what is due. Why two ordered tables and one timer rather than a
        heap or a timer per query: a query answered in milliseconds then costs two dict
        operations, not a heap item that lingers until its time (py-spy, bench_dns: the heap
        and its clean-ups were ~6% of a miss). The DNS module gives every query the same time,
        so each table is in deadline order; a query given less time than one sent before it
        waits for that one's turn."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._timer, self._timer_at = None, math.inf
        to_resend, to_expire, pending = self._to_resend, self._to_expire, self._pending
        # In send order: with one timeout for all, also in time order; a query given less
        # time than one before it is seen when that one's turn comes, or at the next timer.
        while to_resend:
            qid, entry = next(iter(to_resend.items()))
            if entry.resend_at > now:
                break
            del to_resend[qid]
            to_expire[qid] = entry
            session = self._session
            if session is not None and not session.closed and self._dest is not None:
                session.send(self._dest, entry.wire)
        while to_expire:
            qid, entry = next(iter(to_expire.items()))
            if entry.deadline > now:
                break
            del to_expire[qid]
            del pending[qid]
            _tell(entry, None, _timeout_error(self.tag, entry.timeout))
        due = min(
            next(iter(to_resend.values())).resend_at if to_resend else math.inf,
            next(iter(to_expire.values())).deadline if to_expire else math.inf,
        )
        if due < self._timer_at:  # (a query sent from a callback above may have armed it)
            self._arm(loop, due)

    def _forget(self, qid: int) -> _Pending:
        """An answered query leaves every table."""
        entry = self._pending.pop(qid)
        if self._to_resend.pop(qid, None) is None:
            self._to_expire.pop(qid, None)
        return entry

    def _on_datagram(self, src: Address, payload: bytes) -> None:
        if len(payload) < 12:
            return
        qid = (payload[0] << 8) | payload[1]
        entry = self._pending.get(qid)
        # Right id, wrong question (or no answer at all): not ours; keep waiting for ours.
        if entry is None or not dnswire.answers(entry.wire, payload):
            return
        self._forget(qid)
        if payload[2] & _TC:
            task = asyncio.get_running_loop().create_task(self._over_tcp(entry))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        _tell(entry, entry.caller_id + payload[2:], None)

    async def _over_tcp(self, entry: _Pending) -> None:
        """A truncated answer: the same query over TCP, with the time it has left."""
        left = entry.deadline - asyncio.get_running_loop().time()
        if left <= 0:
            _tell(entry, None, _timeout_error(self.tag, entry.timeout))
            return
        try:
            answer = await self.tcp.exchange(entry.caller_id + entry.wire[2:], left)
        except DnsTransportError as e:
            _tell(entry, None, e)
            return
        except asyncio.CancelledError:
            _tell(entry, None, DnsTransportError(self.tag, "closed"))
            raise
        _tell(entry, answer, None)

    def _on_close(self, why: str) -> None:
        self._session = None
        self._fail_all(DnsTransportError(self.tag, f"UDP session ended: {why}"))

    def _fail_all(self, error: DnsTransportError) -> None:
        pending, self._pending = self._pending, {}
        self._to_resend.clear()
        self._to_expire.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        for entry in pending.values():
            _tell(entry, None, error)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.close()
        self._fail_all(DnsTransportError(self.tag, "closed"))
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
        await self.tcp.close()


def _tell(entry: _Pending, answer: bytes | None, error: DnsTransportError | None) -> None:
    """Hand a query's end to whoever sent it; their failure is theirs, not the transport's."""
    try:
        entry.done(answer, error)
    except Exception:
        log.exception("DNS answer delivery failed")


async def _open_stream(
    dialer: _Dialer, tls: ssl.SSLContext | None, server_hostname: str | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream over a socket from the server's detour, with TLS when `tls` is given (DoT,
    DoH); the socket is closed when the handshake fails."""
    sock = await dialer.connect()
    try:
        return await asyncio.open_connection(sock=sock, ssl=tls, server_hostname=server_hostname)
    except (OSError, ssl.SSLError) as e:
        sock.close()
        raise DnsTransportError(dialer.tag, f"TLS handshake failed: {e}") from None
    except BaseException:
        sock.close()
        raise


# -- TCP and TLS -----------------------------------------------------------------------------


class _StreamConnection:
    """One RFC 7766 connection: length-prefixed messages, queries pipelined, answers matched
    by id in any order (a server may answer out of order)."""

    def __init__(
        self, tag: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.tag = tag
        self.reader = reader
        self.writer = writer
        self.ids = _Ids()
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        why = "server closed the connection"
        try:
            while True:
                head = await self.reader.readexactly(2)
                (n,) = struct.unpack("!H", head)
                body = await self.reader.readexactly(n)
                if n < 12:
                    continue
                (qid,) = struct.unpack_from("!H", body)
                fut = self.ids.waiting.get(qid)
                if fut is not None and not fut.done():
                    fut.set_result(body)
        except asyncio.IncompleteReadError:
            pass
        except (OSError, ssl.SSLError) as e:
            why = f"connection lost: {e}"
        except asyncio.CancelledError:
            why = "closed"
        finally:
            self._shut(why)

    def _shut(self, why: str) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()
        self.ids.fail_all(DnsTransportError(self.tag, why))

    @property
    def busy(self) -> bool:
        return len(self.ids.waiting) >= MAX_PIPELINE

    async def exchange(self, query: bytes) -> bytes:
        qid, fut = self.ids.take(asyncio.get_running_loop())
        wire = _with_id(query, qid)
        try:
            self.writer.write(struct.pack("!H", len(wire)) + wire)
            await self.writer.drain()
            response = await fut
        except (OSError, ssl.SSLError) as e:
            self._shut(f"connection lost: {e}")
            raise DnsTransportError(self.tag, f"connection lost: {e}") from None
        finally:
            self.ids.waiting.pop(qid, None)
        if not dnswire.answers(wire, response):
            raise DnsTransportError(self.tag, "the answer is for another question")
        return query[:2] + response[2:]

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class TcpTransport:
    """DNS over TCP (and, with a TLS context, over TLS): one connection reused while it
    lasts; a query that meets a connection the server has just closed is sent once more on
    a new one (RFC 7766 §6.2.1 lets idle connections be closed at any time)."""

    cacheable = True

    def __init__(
        self,
        options: TCPDNSServerOptions | TLSDNSServerOptions,
        outbound: Outbound,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        self.tag = options.tag
        self.dialer = _Dialer(options.tag, options.server, options.server_port, outbound)
        self.tls = tls
        self.server_hostname = server_hostname
        self._conn: _StreamConnection | None = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> _StreamConnection:
        async with self._lock:
            conn = self._conn
            if conn is not None and not conn.closed and not conn.busy:
                return conn
            reader, writer = await _open_stream(self.dialer, self.tls, self.server_hostname)
            new = _StreamConnection(self.tag, reader, writer)
            if conn is None or conn.closed:
                self._conn = new
            return new

    async def exchange(self, query: bytes, timeout: float) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                for attempt in range(2):
                    conn = await self._connection()
                    fresh = conn is not self._conn or not conn.ids.waiting
                    try:
                        return await conn.exchange(query)
                    except DnsTransportError:
                        if attempt or not conn.closed or not fresh:
                            raise
                raise AssertionError("unreachable")
        except TimeoutError:
            raise _timeout_error(self.tag, timeout) from None

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()


# -- TLS contexts ----------------------------------------------------------------------------


def tls_context(
    options: DNSServerTLSOptions, server: str, alpn: list[str]
) -> tuple[ssl.SSLContext, str]:
    """The client context and the name to send (SNI) and verify: `server_name`, else the
    server's host name, else its IP (then the certificate must name that IP)."""
    ctx = ssl.create_default_context()
    name = options.server_name or server
    if options.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    return ctx, name


# -- HTTPS -----------------------------------------------------------------------------------


class _HttpConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT)

    def close(self) -> None:
        self.writer.close()


class HttpsTransport:
    """RFC 8484: each query a POST of application/dns-message over HTTP/1.1 on TLS, with id 0
    on the wire (the RFC's advice, so HTTP caches can share answers); keep-alive connections
    are reused, up to MAX_DOH_CONNECTIONS at once."""

    cacheable = True

    def __init__(self, options: HTTPSDNSServerOptions, outbound: Outbound) -> None:
        self.tag = options.tag
        self.dialer = _Dialer(options.tag, options.server, options.server_port, outbound)
        self.tls, self.server_hostname = tls_context(options.tls, options.server, ["http/1.1"])
        host = options.tls.server_name or options.server
        if ":" in host:
            host = f"[{host}]"
        self.host = host if options.server_port == 443 else f"{host}:{options.server_port}"
        self.path = options.path
        self._idle: list[_HttpConnection] = []
        self._slots = asyncio.Semaphore(MAX_DOH_CONNECTIONS)

    async def _open(self) -> _HttpConnection:
        reader, writer = await _open_stream(self.dialer, self.tls, self.server_hostname)
        return _HttpConnection(reader, writer)

    async def exchange(self, query: bytes, timeout: float) -> bytes:
        try:
            async with asyncio.timeout(timeout), self._slots:
                for attempt in range(2):
                    reused = bool(self._idle)
                    conn = self._idle.pop() if reused else await self._open()
                    try:
                        response = await self._post(conn, query)
                    except DnsTransportError:
                        conn.close()
                        # A kept-alive connection the server closed meanwhile: once more.
                        if attempt or not reused:
                            raise
                        continue
                    except BaseException:
                        conn.close()
                        raise
                    return query[:2] + response[2:]
                raise AssertionError("unreachable")
        except TimeoutError:
            raise _timeout_error(self.tag, timeout) from None

    async def _post(self, conn: _HttpConnection, query: bytes) -> bytes:
        wire = _with_id(query, 0)
        h = conn.h11
        request = h11.Request(
            method="POST",
            target=self.path,
            headers=[
                ("Host", self.host),
                ("Content-Type", "application/dns-message"),
                ("Accept", "application/dns-message"),
                ("Content-Length", str(len(wire))),
            ],
        )
        try:
            out = h.send(request) + h.send(h11.Data(data=wire)) + h.send(h11.EndOfMessage())
            conn.writer.write(out)
            await conn.writer.drain()
            status = 0
            body = bytearray()
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    data = await conn.reader.read(65536)
                    h.receive_data(data)
                    continue
                if isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_BODY:
                        raise DnsTransportError(self.tag, "response body too large")
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise DnsTransportError(self.tag, "server closed the connection")
        except h11.RemoteProtocolError as e:
            raise DnsTransportError(self.tag, f"bad HTTP response: {e}") from None
        except (OSError, ssl.SSLError) as e:
            raise DnsTransportError(self.tag, f"connection lost: {e}") from None
        if status != 200:
            conn.close()  # the body may be an error page; the connection has done its job
            raise _HttpStatusError(self.tag, f"HTTP status {status}")
        response = bytes(body)
        if not dnswire.answers(wire, response):
            conn.close()
            raise _HttpStatusError(self.tag, "the answer is for another question")
        if h.our_state is h11.DONE and h.their_state is h11.DONE:
            h.start_next_cycle()
            self._idle.append(conn)
        else:
            conn.close()
        return response

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _HttpStatusError(DnsTransportError):
    """The server answered, and not with a DNS message: asking again will not help."""


# -- in-process servers ----------------------------------------------------------------------


def _parse(tag: str, query: bytes) -> Any:
    try:
        return message.parse_query(query)
    except ZtunError as e:
        raise DnsTransportError(tag, str(e)) from None


#: getaddrinfo's "the name exists, without addresses of this family".
_NO_DATA = (getattr(socket, "EAI_NODATA", -5), getattr(socket, "EAI_ADDRFAMILY", -9))


class LocalTransport:
    """The system resolver (getaddrinfo, so /etc/nsswitch.conf, /etc/hosts and the host's
    own DNS setup all apply); it knows A and AAAA only and gives no TTL, so answers carry
    LOCAL_TTL and other types are answered empty."""

    cacheable = True

    def __init__(self, options: LocalDNSServerOptions) -> None:
        self.tag = options.tag

    async def exchange(self, query: bytes, timeout: float) -> bytes:
        msg = _parse(self.tag, query)
        name, qtype, _qclass = message.question(msg)
        family = {_A: socket.AF_INET, _AAAA: socket.AF_INET6}.get(qtype)
        if family is None or not name:
            return message.answer_with(msg, [], LOCAL_TTL)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(name, None, family=family, type=socket.SOCK_STREAM)
        except TimeoutError:
            raise _timeout_error(self.tag, timeout) from None
        except socket.gaierror as e:
            if e.errno == socket.EAI_NONAME:
                return message.nxdomain(msg)
            if e.errno in _NO_DATA:
                return message.answer_with(msg, [], LOCAL_TTL)
            raise DnsTransportError(self.tag, f"system resolver: {e.strerror or e}") from None
        except (OSError, UnicodeError, ValueError) as e:
            # The IDNA codec refuses what the wire allows (a label with a dot or a byte
            # over 0x7f, in its escaped text form): SERVFAIL and a counted error, as any
            # resolver failure.
            raise DnsTransportError(self.tag, f"system resolver: {clip(e)}") from None
        found = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
        return message.answer_with(msg, found, LOCAL_TTL)

    async def close(self) -> None:
        return None


def read_hosts(lines: Iterable[str], into: dict[str, list[IPAddress]]) -> None:
    """hosts(5) lines into name → addresses (first file and line first)."""
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        ip = ip_or_none(fields[0].split("%", 1)[0])
        if ip is None:
            continue
        for name in fields[1:]:
            key = name.rstrip(".").lower()
            found = into.setdefault(key, [])
            if ip not in found:
                found.append(ip)


class HostsTransport:
    """Answers from hosts files (read when built; default /etc/hosts) and the `predefined`
    table (which wins); a name found in neither is NXDOMAIN, as sing-box answers."""

    cacheable = False  # answered from memory: a cache would only hold stale copies

    def __init__(self, options: HostsDNSServerOptions, base_dir: str | Path | None = None) -> None:
        self.tag = options.tag
        table: dict[str, list[IPAddress]] = {}
        for name, values in options.predefined.items():
            found = table.setdefault(name.rstrip(".").lower(), [])
            for value in values:
                ip = ip_or_none(value)
                if ip is None:
                    raise ZtunError(f"hosts server {self.tag!r}: {value!r} is not an IP address")
                found.append(ip)
        files: dict[str, list[IPAddress]] = {}
        for path in options.path or (DEFAULT_HOSTS,):
            full = Path(base_dir or ".", os.path.expanduser(path))
            try:
                read_hosts(full.read_text(encoding="utf-8", errors="replace").splitlines(), files)
            except OSError as e:
                if options.path:  # a missing default /etc/hosts is not the user's mistake
                    raise ZtunError(
                        f"hosts server {self.tag!r}: cannot read {full}: {e.strerror}"
                    ) from None
        for name, found in files.items():
            table.setdefault(name, found)
        self.table = table

    async def exchange(self, query: bytes, timeout: float) -> bytes:
        msg = _parse(self.tag, query)
        name, _qtype, _qclass = message.question(msg)
        found = self.table.get(name)
        if found is None:
            return message.nxdomain(msg)
        return message.answer_with(msg, found, LOCAL_TTL)

    async def close(self) -> None:
        return None


class FakeIPTransport:
    """A and AAAA get an address from the pool (the same one for a name while the pool keeps
    it); other types an empty NOERROR, so clients fall back to A/AAAA."""

    cacheable = False  # the pool is the memory; a cache could outlive an evicted mapping
    #: What clients may keep a fake address for.
    TTL = 1

    def __init__(self, options: FakeIPDNSServerOptions, pool: Any) -> None:
        self.tag = options.tag
        self.pool = pool

    async def exchange(self, query: bytes, timeout: float) -> bytes:
        msg = _parse(self.tag, query)
        name, qtype, _qclass = message.question(msg)
        version = {_A: 4, _AAAA: 6}.get(qtype)
        if version is None or not name:
            return message.answer_with(msg, [], self.TTL)
        try:
            ip = self.pool.allocate(name, version)
        except (ZtunError, ValueError) as e:
            raise DnsTransportError(self.tag, str(e)) from None
        return message.answer_with(msg, [ip], self.TTL)

    async def close(self) -> None:
        return None


# -- the factory -----------------------------------------------------------------------------


def build_transport(
    options: DNSServerOptions,
    outbound_for: Callable[[str | None], Outbound],
    *,
    fakeip: Any = None,
    base_dir: str | Path | None = None,
) -> Transport:
    """The transport for one server; `outbound_for(detour)` gives the outbound (None: direct).
    Raises ZtunError for a server that cannot be built (a detour that does not exist, an
    unreadable hosts file, a fakeip server without a pool)."""
    if isinstance(options, UDPDNSServerOptions):
        return UdpTransport(options, outbound_for(options.detour))
    if isinstance(options, TCPDNSServerOptions):
        return TcpTransport(options, outbound_for(options.detour))
    if isinstance(options, TLSDNSServerOptions):
        ctx, name = tls_context(options.tls, options.server, ["dot"])
        return TcpTransport(options, outbound_for(options.detour), ctx, name)
    if isinstance(options, HTTPSDNSServerOptions):
        return HttpsTransport(options, outbound_for(options.detour))
    if isinstance(options, LocalDNSServerOptions):
        return LocalTransport(options)
    if isinstance(options, HostsDNSServerOptions):
        return HostsTransport(options, base_dir)
    if isinstance(options, FakeIPDNSServerOptions):
        if fakeip is None:
            raise ZtunError(f"fakeip server {options.tag!r} has no address pool")
        return FakeIPTransport(options, fakeip)
    raise ZtunError(f"DNS server type {options.type!r} cannot run yet")


def default_transports(
    servers: Iterable[DNSServerOptions],
    outbounds: Mapping[str, Outbound],
    default_outbound: Outbound,
    *,
    fakeip: Any = None,
    base_dir: str | Path | None = None,
) -> dict[str, Transport]:
    """Every server's transport by tag."""

    def outbound_for(detour: str | None) -> Outbound:
        if detour is None:
            return default_outbound
        try:
            return outbounds[detour]
        except KeyError:
            raise ZtunError(f"DNS detour {detour!r} is not an outbound") from None

    return {
        s.tag: build_transport(s, outbound_for, fakeip=fakeip, base_dir=base_dir) for s in servers
    }
