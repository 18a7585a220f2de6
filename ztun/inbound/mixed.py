"""The `mixed` inbound: SOCKS5, SOCKS4/4a and HTTP proxy on one TCP port.

Owns: the listening socket, protocol detection from the first byte (0x05 SOCKS5, 0x04 SOCKS4/4a,
anything else HTTP), the handshakes (through the sans-I/O codecs in ztun.proto), user checks,
the replies for each outcome, and SOCKS5 UDP ASSOCIATE: one UDP relay socket per association,
bound to the life of its TCP control connection, with a routing decision per destination.

Limits: at most `max_flows` connections at once (more are closed at accept), a handshake
timeout, and a bounded table of UDP destinations per association. An association ends with its
control connection: when the client closes it, when TCP keepalive finds the client gone (about
`KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT` seconds), or when no datagram has
passed either way for the UDP idle timeout (the control connection is then closed). Users are
checked in constant time and failed attempts throttled per source (`stack/auth.py`). Listening
beyond loopback without users is refused unless `allow_unauthenticated_remote` says so
(`ztun check` says why; this inbound refuses too, for configs built without the check).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ztun.address import Address, clip, is_loopback
from ztun.config.options import MixedInboundOptions
from ztun.errors import BadNameError, ProtocolError, ZtunError
from ztun.log import limited
from ztun.nat.udp import UdpSessions
from ztun.outbound.base import ErrorKind, OutboundError
from ztun.proto import http_proxy, socks5
from ztun.proto.socks5 import AuthMethod, Command, Reply
from ztun.runtime import dial, netio
from ztun.runtime.dispatch import Dispatcher, RejectedError, adopt_owner, log_flow, meta_for
from ztun.runtime.udp import UdpSessionRunner
from ztun.stack.auth import UserAuth
from ztun.stack.commands import Command as StackCommand
from ztun.stack.flow import Flow, decide_datagram

if TYPE_CHECKING:
    from ztun.platform.linux.owner import Owner

log = logging.getLogger("ztun.inbound")

MAX_FLOWS = 4096
HANDSHAKE_TIMEOUT = 10.0
#: The listener's queue of connections not yet accepted, and how many one wake-up accepts.
BACKLOG = 1024
ACCEPT_BATCH = 64
MAX_UDP_FLOWS = 1024
#: TCP keepalive on a UDP ASSOCIATE's control connection: a client that vanished without a
#: FIN (suspended laptop, lost network) is noticed after about 30 + 10 * 3 = 60 seconds.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3

T = TypeVar("T")


class _Closed(Exception):
    """The client closed the connection during the handshake."""


@dataclass(slots=True)
class _TcpRequest:
    """What a handshake asked for, and how to answer it."""

    proto: str  # "socks5", "socks4", "http-connect", "http"
    dest: Address
    user: str | None
    leftover: bytes
    http: http_proxy.ProxyRequest | None = None


class MixedInbound:
    type = "mixed"

    def __init__(
        self,
        options: MixedInboundOptions,
        dispatcher: Dispatcher,
        *,
        max_flows: int = MAX_FLOWS,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.options = options
        self.tag = options.tag
        self.dispatcher = dispatcher
        self.listen = options.listen
        # Not frozen: port 0 becomes the port the kernel chose at start().
        self.listen_port = options.listen_port
        self.users = {u.username: u.password for u in options.users}
        self.auth = UserAuth((u.username, u.password) for u in options.users)
        if not self.users and not options.allow_unauthenticated_remote and not is_loopback(
            options.listen
        ):
            raise ZtunError(
                f"inbound {options.tag!r}: listening on {options.listen} without users would "
                "be an open proxy; add users, listen on 127.0.0.1, or set "
                "allow_unauthenticated_remote: true"
            )
        self.max_flows = max_flows
        self.handshake_timeout = handshake_timeout
        self.tasks: set[asyncio.Task[None]] = set()
        self.sock: socket.socket | None = None
        self.refused = 0
        self.dropped_fragments = 0
        #: SO_REUSEPORT on the listener, so that worker processes listen on the same port and
        #: the kernel spreads connections over them (runtime/workers.py)
        self.reuse_port = False

    # -- listening ------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.listen else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            # Under auto_route, accepted sockets inherit the mark, so what this inbound sends
            # to a client beyond the default route is not routed into the TUN.
            dial.LOCAL.apply(sock)
            # Set once here: Linux copies it to every accepted socket (one syscall per flow less).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((self.listen, self.listen_port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except (OSError, dial.DialError) as e:
            sock.close()
            why = (e.strerror or e) if isinstance(e, OSError) else e
            raise OutboundError(
                ErrorKind.GENERAL,
                f"inbound {self.tag!r}: cannot listen on {self.listen}:{self.listen_port}: {why}",
            ) from None
        self.sock = sock
        self.listen_port = sock.getsockname()[1]
        loop.add_reader(sock.fileno(), self._on_accept)
        log.info("inbound %s (mixed) listening on %s", self.tag, self._where)

    @property
    def _where(self) -> str:
        host = f"[{self.listen}]" if ":" in self.listen else self.listen
        return f"{host}:{self.listen_port}"

    async def stop(self, serve_queued: bool = False) -> None:
        """Stop accepting; flows already open go on. `serve_queued`: first accept and serve
        what waits in the listener's queue (a worker retiring after a reload: closing one
        socket of a SO_REUSEPORT group resets the connections queued on it, which the
        other sockets never see), up to one full backlog."""
        if self.sock is not None and serve_queued:
            for _ in range(BACKLOG // ACCEPT_BATCH):
                if self._accept_batch():
                    break
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None

    def abort(self) -> None:
        """Nothing on the host to put back (see Inbound.abort)."""

    def _on_accept(self) -> None:
        self._accept_batch()

    def _accept_batch(self) -> bool:
        """Accept up to `ACCEPT_BATCH` connections; True once the queue is empty (or accept
        failed: EMFILE and friends, said in a line; the next wake-up tries again)."""
        loop = asyncio.get_running_loop()
        assert self.sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as e:
                limited(log, logging.WARNING, ("accept", self.tag),
                        "inbound %s: accept failed: %s", self.tag, e.strerror or e)  # fmt: skip
                return True
            if len(self.tasks) >= self.max_flows:
                self.refused += 1
                conn.close()
                if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
                    log.warning(
                        "inbound %s: %d connections refused (max %d open flows)",
                        self.tag,
                        self.refused,
                        self.max_flows,
                    )
                continue
            conn.setblocking(False)
            task = loop.create_task(self._handle(conn, (str(addr[0]), int(addr[1]))))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        return False

    # -- one connection -------------------------------------------------------------------

    async def _handle(self, conn: socket.socket, source: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        # One watch on the client socket for the whole handshake; the relay takes it over.
        waiter = netio.Waiter(loop, conn)
        buf = bytearray()
        kind = -1  # the first byte: which protocol the client speaks
        try:
            try:
                # The handshake only ever blocks in the waiter, so its deadline bounds it.
                waiter.set_deadline(self.handshake_timeout)
                try:
                    # Most clients send right after connecting: often already here.
                    first = conn.recv(16384)
                except (BlockingIOError, InterruptedError):
                    first = await self._recv(conn, waiter)
                if not first:
                    return
                buf += first
                kind = first[0]
                if kind == socks5.VERSION5:
                    req = await self._socks5_handshake(conn, waiter, buf, source)
                elif kind == socks5.VERSION4:
                    req = await self._socks4_handshake(conn, waiter, buf)
                else:
                    req = await self._http_handshake(conn, waiter, buf, source)
                waiter.clear_deadline()
            except TimeoutError:
                log.debug("inbound %s: %s:%d: handshake timed out", self.tag, *source)
                return
            except _Closed:
                return
            except BadNameError as e:
                # A name no host can have (counted where it was parsed): the protocol's own
                # refusal, so the client shows an error instead of a dropped connection.
                log.warning("inbound %s: %s:%d: refused: %s", self.tag, *source, e)
                with contextlib.suppress(OSError):
                    await loop.sock_sendall(conn, _bad_name_reply(kind))
                return
            except ProtocolError as e:
                log.warning("inbound %s: %s:%d: bad request: %s", self.tag, *source, clip(e))
                if kind not in (socks5.VERSION4, socks5.VERSION5):
                    status = 431 if "too large" in str(e) else 400
                    with contextlib.suppress(OSError):
                        await loop.sock_sendall(conn, http_proxy.build_response(status))
                return
            except OSError as e:
                log.debug("inbound %s: %s:%d: %s", self.tag, *source, e.strerror or e)
                return
            if req is None:
                return
            # The client's process, when rules ask and the client is on this host: the
            # owner of its socket to us, for its TCP flow or every flow of its association.
            owner = await self.dispatcher.owner_of_peer("tcp", source, _local(conn))
            if isinstance(req, _UdpAssociateRequest):
                waiter.close()
                await UdpAssociation(self, conn, source, req.user, owner).run()
                return
            await self._tcp_flow(conn, waiter, source, req, owner)
        finally:
            waiter.close()
            conn.close()

    @staticmethod
    async def _recv(conn: socket.socket, waiter: netio.Waiter) -> bytes:
        while True:
            await waiter.readable()
            try:
                return conn.recv(16384)
            except (BlockingIOError, InterruptedError):
                continue

    async def _need(
        self,
        conn: socket.socket,
        waiter: netio.Waiter,
        buf: bytearray,
        parse: Callable[[bytearray], T | None],
    ) -> T:
        while True:
            res = parse(buf)
            if res is not None:
                return res
            data = await self._recv(conn, waiter)
            if not data:
                raise _Closed
            buf += data

    def _check_user(
        self, source: tuple[str, int], username: str, password: str, proto: str
    ) -> bool:
        now = asyncio.get_running_loop().time()
        blocked = self.auth.blocked_for(source[0], now)
        if self.auth.check(source[0], username, password, now):
            return True
        if blocked:
            log.debug("inbound %s: %s:%d: %s attempt refused: too many failures",
                      self.tag, *source, proto)  # fmt: skip
            return False
        # Capped: the name is the client's, and may be long.
        log.warning("inbound %s: %s:%d: %s auth failed for user %r", self.tag, *source,
                    proto, clip(username, 64))  # fmt: skip
        if self.auth.just_blocked(source[0], now):
            log.warning("inbound %s: %s: %d failed attempts within %gs: refused for %gs",
                        self.tag, source[0], self.auth.max_failures, self.auth.window,
                        self.auth.block)  # fmt: skip
        return False

    async def _socks5_handshake(
        self, conn: socket.socket, waiter: netio.Waiter, buf: bytearray, source: tuple[str, int]
    ) -> _TcpRequest | _UdpAssociateRequest | None:
        greeting, n = await self._need(conn, waiter, buf, socks5.parse_greeting)
        del buf[:n]
        wanted = AuthMethod.USERPASS if self.users else AuthMethod.NO_AUTH
        if wanted not in greeting.methods:
            await netio.send_all(
                conn, socks5.build_method_selection(AuthMethod.NO_ACCEPTABLE), waiter
            )
            log.warning(
                "inbound %s: SOCKS5 client offers no %s method",
                self.tag,
                "username/password" if self.users else "no-auth",
            )
            return None
        await netio.send_all(conn, socks5.build_method_selection(wanted), waiter)
        user = None
        if self.users:
            creds, n = await self._need(conn, waiter, buf, socks5.parse_userpass)
            del buf[:n]
            ok = self._check_user(source, creds.username, creds.password, "SOCKS5")
            await netio.send_all(conn, socks5.build_userpass_reply(ok), waiter)
            if not ok:
                return None
            user = creds.username
        request, n = await self._need(conn, waiter, buf, socks5.parse_request)
        del buf[:n]
        if request.command == Command.CONNECT:
            return _TcpRequest("socks5", request.address, user, bytes(buf))
        if request.command == Command.UDP_ASSOCIATE:
            return _UdpAssociateRequest(request.address, user)
        await netio.send_all(conn, socks5.build_reply(Reply.COMMAND_NOT_SUPPORTED), waiter)
        return None

    async def _socks4_handshake(
        self, conn: socket.socket, waiter: netio.Waiter, buf: bytearray
    ) -> _TcpRequest | None:
        request, n = await self._need(conn, waiter, buf, socks5.parse_socks4_request)
        del buf[:n]
        if self.users or request.command != Command.CONNECT:
            # SOCKS4 cannot carry a password, so it cannot pass a users list.
            await netio.send_all(conn, socks5.build_socks4_reply(False), waiter)
            if self.users:
                log.warning("inbound %s: SOCKS4 refused: this inbound requires users", self.tag)
            return None
        return _TcpRequest("socks4", request.address, None, bytes(buf))

    async def _http_handshake(
        self, conn: socket.socket, waiter: netio.Waiter, buf: bytearray, source: tuple[str, int]
    ) -> _TcpRequest | None:
        request, n = await self._need(conn, waiter, buf, http_proxy.parse_request)
        del buf[:n]
        user = None
        if self.users:
            creds = http_proxy.proxy_credentials(request)
            now = asyncio.get_running_loop().time()
            wait = self.auth.blocked_for(source[0], now)
            if wait:
                self.auth.throttled += 1
                retry = (("Retry-After", str(int(wait) + 1)),)
                await netio.send_all(
                    conn, http_proxy.build_response(429, extra_headers=retry), waiter
                )
                return None
            if creds is None or not self._check_user(source, creds[0], creds[1], "HTTP proxy"):
                challenge = (("Proxy-Authenticate", 'Basic realm="ztun"'),)
                await netio.send_all(
                    conn, http_proxy.build_response(407, extra_headers=challenge), waiter
                )
                return None
            user = creds[0]
        dest = Address(request.host, request.port)
        proto = "http-connect" if request.is_connect else "http"
        return _TcpRequest(proto, dest, user, bytes(buf), request)

    async def _tcp_flow(
        self,
        conn: socket.socket,
        waiter: netio.Waiter,
        source: tuple[str, int],
        req: _TcpRequest,
        owner: Owner | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        meta = meta_for("tcp", req.dest, source, self.tag, req.user)
        flow = Flow(meta, req.dest, loop.time())
        adopt_owner(flow, owner)
        # The outbound's watch on its socket comes with it, for the relay to take over.
        handover = netio.Handover()
        try:
            remote = await self.dispatcher.open_tcp(flow, handover)
        except OutboundError as e:
            if isinstance(e, RejectedError) and e.drop:
                return
            with contextlib.suppress(OSError):
                await loop.sock_sendall(conn, _failure_reply(req, e))
            return
        try:
            initial = req.leftover
            if req.proto == "socks5":
                await loop.sock_sendall(conn, socks5.build_reply(Reply.SUCCEEDED))
            elif req.proto == "socks4":
                await loop.sock_sendall(conn, socks5.build_socks4_reply(True))
            elif req.proto == "http-connect":
                await loop.sock_sendall(conn, http_proxy.build_response(200))
            else:
                assert req.http is not None
                initial = http_proxy.build_origin_request(req.http) + req.leftover
            await self.dispatcher.relay_tcp(
                flow, conn, remote, initial, client_watch=waiter, remote_watch=handover.take()
            )
        except OSError as e:
            flow.end, flow.error = "reset", e.strerror or str(e)
            log_flow(flow)
        finally:
            handover.release()  # still held only if the relay never got it
            remote.close()


def _local(conn: socket.socket) -> tuple[str, int]:
    """ztun's end of an accepted connection (host, port), whatever the family."""
    try:
        name = conn.getsockname()
    except OSError:
        return ("", 0)
    return str(name[0]), int(name[1])


def _bad_name_reply(kind: int) -> bytes:
    """The refusal of a request whose host name cannot exist, by protocol (its first byte).
    SOCKS5 answers 0x04 "host unreachable", the code ztun also gives when a name does not
    resolve: the client learns "no such host" rather than 0x01 "the proxy failed", which
    would make it blame (and retry) the proxy. SOCKS4 has one refusal, 0x5B; HTTP 400."""
    if kind == socks5.VERSION5:
        return socks5.build_reply(Reply.HOST_UNREACHABLE)
    if kind == socks5.VERSION4:
        return socks5.build_socks4_reply(False)
    return http_proxy.build_response(400)


def _failure_reply(req: _TcpRequest, e: OutboundError) -> bytes:
    if req.proto == "socks5":
        return socks5.build_reply(e.socks_reply)
    if req.proto == "socks4":
        return socks5.build_socks4_reply(False)
    return http_proxy.build_response(e.http_status)


@dataclass(slots=True)
class _UdpAssociateRequest:
    address: Address
    user: str | None


# ---------------------------------------------------------------------------------------------
# UDP ASSOCIATE


class UdpAssociation:
    """One client's UDP ASSOCIATE: its relay socket and its flows, one per destination, each
    routed on its own. Flows and sessions are a `UdpSessions` core shared with the TUN: here
    one outbound session per outbound serves every destination routed to it."""

    def __init__(
        self,
        inbound: MixedInbound,
        conn: socket.socket,
        source: tuple[str, int],
        user: str | None,
        owner: Owner | None = None,
    ) -> None:
        self.inbound = inbound
        #: the client's process (the owner of its control connection), when rules ask
        self.owner = owner
        self.dispatcher = inbound.dispatcher
        self.conn = conn
        self.source = source
        self.user = user
        self.loop = asyncio.get_running_loop()
        self.udp: socket.socket | None = None
        self.client: tuple[Any, ...] | None = None
        self.out: list[StackCommand] = []
        self.core = UdpSessions(
            self.out,
            timeout=self.dispatcher.udp_idle_timeout,
            max_flows=MAX_UDP_FLOWS,
        )
        self.tasks: set[asyncio.Task[None]] = set()
        tracker = getattr(self.dispatcher, "tracker", None)
        self.runner = UdpSessionRunner(self.core, self.loop, self.tasks, self._on_reply,
                                       self._drain, tracker)  # fmt: skip
        self.closed = False
        #: when a datagram last passed either way (the association's idle clock)
        self.last_active = self.loop.time()

    async def run(self) -> None:
        local_ip = str(self.conn.getsockname()[0])
        family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        sweep: asyncio.TimerHandle | None = None
        try:
            _keepalive(self.conn)
            self.udp.bind((local_ip, 0))
            self.udp.setblocking(False)
            # Replies to a client beyond the default route must not be routed into a TUN.
            dial.LOCAL.apply(self.udp)
            bound = Address(local_ip, self.udp.getsockname()[1])
            await self.loop.sock_sendall(self.conn, socks5.build_reply(Reply.SUCCEEDED, bound))
            self.loop.add_reader(self.udp.fileno(), self._on_client)
            sweep = self.loop.call_later(self._sweep_interval, self._sweep)
            # The association lives as long as the control connection (RFC 1928 §7).
            while True:
                data = await self.loop.sock_recv(self.conn, 4096)
                if not data:
                    break
        except (OSError, dial.DialError):
            pass
        finally:
            self.closed = True
            if sweep is not None:
                sweep.cancel()
            self._shutdown()

    @property
    def _sweep_interval(self) -> float:
        return max(self.dispatcher.udp_idle_timeout / 4, 0.05)

    def _shutdown(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.core.clear("closed")
        self._drain()
        self.runner.close_all()
        if self.udp is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.udp.fileno())
            self.udp.close()

    def _drain(self) -> None:
        """Carry out what the core asked for."""
        commands = self.out[:]
        self.out.clear()
        for c in commands:
            self.runner.execute(c)

    def _sweep(self) -> None:
        now = self.loop.time()
        self.core.expire(now)
        self._drain()
        if (not self.closed and not len(self.core)
                and now - self.last_active > self.dispatcher.udp_idle_timeout):  # fmt: skip
            # Idle: end it as if the client had closed (run() sees the EOF and cleans up).
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
            return
        if not self.closed:
            self.loop.call_later(self._sweep_interval, self._sweep)

    # client → outbound
    def _on_client(self) -> None:
        assert self.udp is not None
        for _ in range(64):
            try:
                data, addr = self.udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if self.client is None:
                # Only the client that owns the control connection may use this relay.
                if _same_ip(addr[0], self.source[0]):
                    self.client = addr
                else:
                    continue
            elif addr != self.client:
                continue
            try:
                dgram = socks5.parse_udp_datagram(data)
            except ProtocolError:
                continue
            if dgram.frag != 0:
                self.inbound.dropped_fragments += 1
                continue
            self.last_active = self.loop.time()
            self._forward(dgram.address, dgram.payload)

    def _forward(self, dest: Address, payload: bytes) -> None:
        key = (dest.host, dest.port)
        now = self.loop.time()
        uf = self.core.get(key, now)
        if uf is None:
            client = (self.client[0], self.client[1]) if self.client else None
            meta = meta_for("udp", dest, client, self.inbound.tag, self.user)
            flow = Flow(meta, dest, now)
            adopt_owner(flow, self.owner)
            verdict = decide_datagram(self.dispatcher.route, flow, "udp", payload)
            # One outbound session per outbound, whatever the destination.
            uf = self.core.add(key, flow, verdict, flow.outbound, now)
        if uf.refused is None:
            self.core.send(uf, payload, now)
        if self.out:
            self._drain()

    # outbound → client
    def _on_reply(self, session_key: Hashable, src: Address, payload: bytes) -> None:
        if self.closed or self.udp is None or self.client is None:
            return
        self.last_active = self.loop.time()
        self.core.reply((src.host, src.port), payload, self.loop.time())
        with contextlib.suppress(OSError):
            self.udp.sendto(socks5.build_udp_datagram(src, payload), self.client)


def _keepalive(conn: socket.socket) -> None:
    """TCP keepalive with short timers, where the platform has them."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                            ("TCP_KEEPCNT", KEEPALIVE_COUNT)):  # fmt: skip
            opt = getattr(socket, name, None)
            if opt is not None:
                conn.setsockopt(socket.IPPROTO_TCP, opt, value)


def _same_ip(a: str, b: str) -> bool:
    try:
        ia, ib = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return a == b
    if ia.version == 6 and ia.ipv4_mapped is not None:
        ia = ia.ipv4_mapped
    if ib.version == 6 and ib.ipv4_mapped is not None:
        ib = ib.ipv4_mapped
    return ia == ib
