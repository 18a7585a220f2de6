"""The `socks` outbound: TCP through a SOCKS5 (or 4/4a) proxy, UDP through SOCKS5 UDP ASSOCIATE.

Owns: CONNECT (SOCKS5 on ztun's own codec, which can pipeline when asked: python-socks cannot,
and its step-by-step CONNECT cost about a fifth of the CPU per proxied connection, see
`_connect5`;
SOCKS4/4a via python-socks; a domain destination goes to the proxy unresolved), the UDP
ASSOCIATE client (RFC 1928 §7, on ztun's own codec because python-socks has none), and the
mapping of proxy failures to OutboundError kinds. Every socket it opens (CONNECT, SOCKS4/4a,
the UDP ASSOCIATE control and relay sockets) carries auto_route's own mark (`runtime/dial.py`),
so neither the server's address nor its relay's needs to be kept out of the TUN.

A UDP association lives exactly as long as its TCP control connection: when the proxy closes
it (or dies), the session ends and reports it; the next datagram opens a new association.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from typing import Any

from python_socks import ProxyConnectionError, ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from ztun.address import Address
from ztun.config.options import SocksOutboundOptions
from ztun.errors import ProtocolError
from ztun.outbound.base import (
    CloseHandler,
    Counters,
    DatagramHandler,
    ErrorKind,
    OutboundError,
    describe,
)
from ztun.proto import socks5
from ztun.proto.socks5 import Command, Reply
from ztun.route.metadata import FlowMeta
from ztun.runtime import netio, udpio
from ztun.runtime.dial import OWN, DialError, NoEgressError

#: Linux: a TCP socket non-blocking from birth (elsewhere, setblocking(False) right after).
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)

_REPLY_KIND = {
    Reply.NOT_ALLOWED: ErrorKind.BLOCKED,
    Reply.NETWORK_UNREACHABLE: ErrorKind.NETWORK_UNREACHABLE,
    Reply.HOST_UNREACHABLE: ErrorKind.HOST_UNREACHABLE,
    Reply.CONNECTION_REFUSED: ErrorKind.REFUSED,
    Reply.TTL_EXPIRED: ErrorKind.TIMEOUT,
    Reply.COMMAND_NOT_SUPPORTED: ErrorKind.UNSUPPORTED,
    Reply.ADDRESS_TYPE_NOT_SUPPORTED: ErrorKind.UNSUPPORTED,
}


def _mark(sock: socket.socket, where: str) -> None:
    try:
        OWN.apply(sock)
    except NoEgressError as e:
        raise OutboundError(ErrorKind.NO_EGRESS, f"{where}: {e}") from None
    except DialError as e:
        raise OutboundError(ErrorKind.GENERAL, f"{where}: {e}") from None


class _MarkedDialer:
    """python-socks' `forward` hook: opens the TCP connection to the proxy itself, marked."""

    async def connect(self, dest_host: str, dest_port: int, timeout: float | None = None,
                      **_: Any) -> socket.socket:  # fmt: skip
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(dest_host, dest_port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            try:
                OWN.apply(sock)
            except DialError as e:
                raise OSError(str(e)) from None
            await loop.sock_connect(sock, addr)
        except BaseException:
            sock.close()
            raise
        return sock


class SocksOutbound:
    type = "socks"
    refuses_tcp = False
    resolves_remotely = True  # the SOCKS5 server resolves a domain destination
    drops_udp = False

    def __init__(self, options: SocksOutboundOptions) -> None:
        self.options = options
        self.tag = options.tag
        self.server = server = options.server
        self.server_port = server_port = options.server_port
        self.version = options.version
        self.username = options.username
        self.password = options.password
        self.network = options.network
        self.connect_timeout = options.connect_timeout
        self.udp_timeout = options.udp_timeout
        #: greeting and CONNECT request in one write (`pipeline: true`; see `_connect5`)
        self.pipeline = options.pipeline
        self.counters = Counters()
        #: open UDP associations (a dict: ordered), for reset_network
        self._sessions: dict[SocksUdpSession, None] = {}
        self._proxy: Proxy | None = None
        # An IP literal needs no resolving: build its socket address once.
        self._server_addr: tuple[int, tuple[Any, ...]] | None = None
        try:
            ip = ipaddress.ip_address(server)
        except ValueError:
            pass
        else:
            if ip.version == 4:
                self._server_addr = (socket.AF_INET, (server, server_port))
            else:
                self._server_addr = (socket.AF_INET6, (server, server_port, 0, 0))

    @property
    def _where(self) -> str:
        host = f"[{self.server}]" if ":" in self.server else self.server
        return f"socks outbound {self.tag!r} ({host}:{self.server_port})"

    def _get_proxy(self) -> Proxy:
        if self._proxy is None:
            ptype = ProxyType.SOCKS5 if self.version == "5" else ProxyType.SOCKS4
            self._proxy = Proxy(
                ptype,
                self.server,
                self.server_port,
                username=self.username,
                password=self.password,
                # Send domains to the proxy unresolved (SOCKS4 has no domains; 4a does).
                rdns=self.version != "4",
                # python-socks opens its own socket to the proxy; `forward` (the proxy that
                # reaches this one) is the only way to hand it one that carries the mark.
                forward=_MarkedDialer(),  # type: ignore[arg-type]
                loop=asyncio.get_running_loop(),
            )
        return self._proxy

    # -- TCP ------------------------------------------------------------------------------

    async def connect_tcp(
        self, dest: Address, meta: FlowMeta, handover: netio.Handover | None = None
    ) -> socket.socket:
        self.counters.tcp_flows += 1
        if self.network == "udp":
            raise OutboundError(ErrorKind.UNSUPPORTED, f"{self._where} is configured for UDP only")
        if self.version == "5":
            return await self._connect5(dest, handover)
        try:
            sock = await self._get_proxy().connect(
                dest.host, dest.port, timeout=self.connect_timeout
            )
        except ProxyTimeoutError:
            self.counters.errors += 1
            raise OutboundError(
                ErrorKind.TIMEOUT,
                f"{self._where}: no answer within {self.connect_timeout:g}s for {dest}",
            ) from None
        except ProxyConnectionError as e:
            self.counters.errors += 1
            raise OutboundError(
                ErrorKind.PROXY_DOWN,
                f"{self._where}: cannot reach the proxy: {e.strerror or e}",
            ) from None
        except ProxyError as e:
            self.counters.errors += 1
            kind = ErrorKind.AUTH if "auth" in str(e).lower() else ErrorKind.GENERAL
            raise OutboundError(kind, f"{self._where}: {dest}: {e}") from None
        except OSError as e:
            self.counters.errors += 1
            raise OutboundError(ErrorKind.PROXY_DOWN, f"{self._where}: {describe(e)}") from None
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    async def _connect5(self, dest: Address, handover: netio.Handover | None) -> socket.socket:
        """SOCKS5 CONNECT on ztun's own codec, pipelined when the outbound says so.

        Why not python-socks here (it still does SOCKS4/4a): it cannot pipeline, and it reads
        the reply in three awaited reads of 3, 1 and 6 bytes, each a trip through the event
        loop (with uvloop, a poll handle set up and torn down each time). Each answer in one
        exact read, and with `pipeline` greeting and request in one write: 165-178 → 110-114
        CPU-µs per connect in-process against sing-box's SOCKS5 server (3000 connects, 16 at
        a time), and 315 → 245 CPU-µs per connection in bench/bench_mixed.py's
        connection-rate phase. Pipelining is off by default: microsocks reads the greeting
        with one recv and drops the request that came with it, so the flow waited out its
        connect_timeout; without it the same phase measured 255 against 225 CPU-µs.

        Reads ask for `hs.need` bytes, never more, so bytes the target sends right after the
        reply (a server-first banner) stay in the socket for the relay.
        """
        loop = asyncio.get_running_loop()
        sock: socket.socket | None = None
        waiter: netio.Waiter | None = None
        try:
            try:
                addr = self._server_addr
                if addr is None:
                    start = loop.time()
                    async with asyncio.timeout(self.connect_timeout):
                        addr = await self._resolve_server()
                    budget = self.connect_timeout - (loop.time() - start)
                else:
                    budget = self.connect_timeout
                # Non-blocking from birth: one ioctl fewer than setblocking(False).
                sock = socket.socket(addr[0], _STREAM_NONBLOCK)
                if not _STREAM_NONBLOCK & ~socket.SOCK_STREAM:
                    sock.setblocking(False)
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _mark(sock, self._where)
                waiter = netio.Waiter(loop, sock)
                # connect_timeout bounds connect and handshake: every wait below fails after it.
                waiter.set_deadline(budget)
                await netio.connect(sock, addr[1], waiter)
            except OSError as e:
                if isinstance(e, TimeoutError) and e.errno is None:
                    raise  # connect_timeout, not an error from the network
                why = f"{self._where}: cannot reach the proxy: {describe(e)}"
                raise OutboundError(ErrorKind.PROXY_DOWN, why) from None
            hs = socks5.ClientHandshake(
                Command.CONNECT, dest, self.username, self.password, pipeline=self.pipeline
            )
            await netio.send_all(sock, hs.data_to_send(), waiter)
            ready = False  # nothing can be back yet: wait before the first read
            while not hs.done:
                if not ready:
                    await waiter.readable()
                n = hs.need
                try:
                    data = sock.recv(n)
                except (BlockingIOError, InterruptedError):
                    ready = False
                    continue
                hs.receive_data(data)  # b"" raises: closed mid-handshake
                # A read that filled up means the rest of the answer is likely there.
                ready = len(data) == n
                out = hs.data_to_send()
                if out:
                    await netio.send_all(sock, out, waiter)
                    ready = False
            if handover is not None:
                # The relay takes this watch over: no poll handle torn down and rebuilt.
                waiter.clear_deadline()
                handover.waiter = waiter
            else:
                waiter.close()
            return sock
        except BaseException as e:
            if waiter is not None:
                waiter.close()
            if sock is not None:
                sock.close()
            mapped = self._map_error(e, dest)
            if mapped is None:
                raise  # cancellation: not a failure of the proxy
            self.counters.errors += 1
            if mapped is e:
                raise
            raise mapped from None

    async def _resolve_server(self) -> tuple[int, tuple[Any, ...]]:
        """(family, sockaddr) of the proxy; a name is resolved for each connection."""
        infos = await asyncio.get_running_loop().getaddrinfo(
            self.server, self.server_port, type=socket.SOCK_STREAM
        )
        family, _, _, _, addr = infos[0]
        return family, addr

    def _map_error(self, e: BaseException, dest: Address) -> OutboundError | None:
        if isinstance(e, OutboundError):
            return e
        if isinstance(e, TimeoutError):
            return OutboundError(
                ErrorKind.TIMEOUT,
                f"{self._where}: no answer within {self.connect_timeout:g}s for {dest}",
            )
        if isinstance(e, socks5.AuthFailedError):
            return OutboundError(ErrorKind.AUTH, f"{self._where}: authentication failed: {e}")
        if isinstance(e, socks5.ReplyError):
            kind = _REPLY_KIND.get(e.code, ErrorKind.GENERAL)  # type: ignore[call-overload]
            return OutboundError(kind, f"{self._where}: {dest}: {e}")
        if isinstance(e, ProtocolError):
            return OutboundError(ErrorKind.GENERAL, f"{self._where}: {dest}: {e}")
        if isinstance(e, OSError):
            return OutboundError(
                ErrorKind.PROXY_DOWN, f"{self._where}: connection to the proxy lost: {describe(e)}"
            )
        return None

    # -- UDP ------------------------------------------------------------------------------

    async def open_udp(
        self, meta: FlowMeta, on_datagram: DatagramHandler, on_close: CloseHandler
    ) -> SocksUdpSession:
        if self.network == "tcp":
            raise OutboundError(ErrorKind.UNSUPPORTED, f"{self._where} is configured for TCP only")
        if self.version != "5":
            raise OutboundError(ErrorKind.UNSUPPORTED, f"{self._where}: UDP needs SOCKS5")
        self.counters.udp_sessions += 1
        session = SocksUdpSession(self, on_datagram, on_close)
        try:
            await session.open()
        except OutboundError:
            self.counters.errors += 1
            session.close()
            raise
        except BaseException:
            session.close()
            raise
        self._sessions[session] = None
        return session

    def reset_network(self, why: str) -> int:
        """Close every UDP association, control connection and relay socket: they run over
        the network that went away. Each session's owner hears `why`; its next datagram
        opens a new association (see ztun.outbound.base.Outbound)."""
        sessions = [s for s in self._sessions if not s.closed]
        for session in sessions:
            session._end(why)
        self._sessions.clear()
        return len(sessions)

    async def close(self) -> None:
        return None


class SocksUdpSession:
    """One UDP ASSOCIATE: a TCP control connection plus a UDP socket connected to the relay."""

    def __init__(
        self, outbound: SocksOutbound, on_datagram: DatagramHandler, on_close: CloseHandler
    ) -> None:
        self.outbound = outbound
        self.on_datagram = on_datagram
        self.on_close = on_close
        self.closed = False
        self.control: socket.socket | None = None
        self.udp: socket.socket | None = None
        self.relay: Address | None = None
        self._loop = asyncio.get_running_loop()
        self._active = True
        self._timer: asyncio.TimerHandle | None = None
        self._sender: udpio.BatchSender | None = None
        #: the SOCKS5 UDP header of the last destination sent to (a flow has one destination)
        self._header: tuple[Address, bytes] | None = None

    async def open(self) -> None:
        ob = self.outbound
        loop = self._loop
        try:
            async with asyncio.timeout(ob.connect_timeout):
                infos = await loop.getaddrinfo(ob.server, ob.server_port, type=socket.SOCK_STREAM)
                family, _, _, _, addr = infos[0]
                self.control = socket.socket(family, socket.SOCK_STREAM)
                self.control.setblocking(False)
                _mark(self.control, ob._where)
                await loop.sock_connect(self.control, addr)
        except TimeoutError:
            raise OutboundError(
                ErrorKind.TIMEOUT, f"{ob._where}: no answer within {ob.connect_timeout:g}s"
            ) from None
        except OSError as e:
            raise OutboundError(
                ErrorKind.PROXY_DOWN, f"{ob._where}: cannot reach the proxy: {describe(e)}"
            ) from None
        hs = socks5.ClientHandshake(
            Command.UDP_ASSOCIATE, Address("0.0.0.0", 0), ob.username, ob.password
        )
        try:
            async with asyncio.timeout(ob.connect_timeout):
                while not hs.done:
                    out = hs.data_to_send()
                    if out:
                        await loop.sock_sendall(self.control, out)
                    hs.receive_data(await loop.sock_recv(self.control, 4096))
        except TimeoutError:
            raise OutboundError(
                ErrorKind.TIMEOUT, f"{ob._where}: UDP ASSOCIATE got no answer in time"
            ) from None
        except socks5.AuthFailedError as e:
            raise OutboundError(ErrorKind.AUTH, f"{ob._where}: {e}") from None
        except socks5.ReplyError as e:
            kind = _REPLY_KIND.get(e.code, ErrorKind.GENERAL)  # type: ignore[call-overload]
            raise OutboundError(kind, f"{ob._where}: UDP ASSOCIATE refused: {e}") from None
        except ProtocolError as e:
            raise OutboundError(ErrorKind.GENERAL, f"{ob._where}: {e}") from None
        except OSError as e:
            raise OutboundError(
                ErrorKind.PROXY_DOWN, f"{ob._where}: UDP ASSOCIATE failed: {describe(e)}"
            ) from None
        assert hs.bound is not None
        relay_host = hs.bound.host
        if not hs.bound.is_domain and ipaddress.ip_address(relay_host).is_unspecified:
            # "0.0.0.0" means "the address you reached me on".
            relay_host = str(self.control.getpeername()[0])
        self.relay = Address(relay_host, hs.bound.port)
        try:
            infos = await loop.getaddrinfo(relay_host, hs.bound.port, type=socket.SOCK_DGRAM)
            family, _, _, _, raddr = infos[0]
            self.udp = socket.socket(family, socket.SOCK_DGRAM)
            self.udp.setblocking(False)
            udpio.tune(self.udp)
            self._sender = udpio.BatchSender(self.udp)
            # The relay may have another address than the server: the mark, not an
            # excluded address, keeps these datagrams out of the TUN.
            _mark(self.udp, ob._where)
            # Connected: the kernel drops datagrams that do not come from the relay.
            self.udp.connect(raddr)
        except (OSError, UnicodeError, ValueError) as e:  # IDNA codec errors too
            raise OutboundError(
                ErrorKind.PROXY_DOWN, f"{ob._where}: UDP relay {self.relay}: {describe(e)}"
            ) from None
        loop.add_reader(self.udp.fileno(), self._on_udp)
        loop.add_reader(self.control.fileno(), self._on_control)
        if ob.udp_timeout > 0:
            self._timer = loop.call_later(ob.udp_timeout, self._tick)

    def send(self, dest: Address, payload: bytes) -> None:
        if self.closed or self.udp is None:
            return
        self._active = True
        header = self._header
        try:
            if header is None or (header[0] is not dest and header[0] != dest):
                header = self._header = (dest, socks5.build_udp_header(dest))
            self.udp.send(header[1] + payload)
        except (BlockingIOError, InterruptedError):
            pass
        except (OSError, ProtocolError):
            self.outbound.counters.errors += 1

    def send_many(self, items: list[tuple[Address, bytes]]) -> None:
        """Send a burst in order: equal-sized datagrams leave in one segmented send."""
        sender = self._sender
        if self.closed or sender is None:
            return
        self._active = True
        wire = []
        header = self._header
        for dest, payload in items:
            if header is None or (header[0] is not dest and header[0] != dest):
                try:
                    header = self._header = (dest, socks5.build_udp_header(dest))
                except ProtocolError:
                    self.outbound.counters.errors += 1  # a name too long to send, say
                    header = None
                    continue
            wire.append(header[1] + payload)
        errors = sender.errors
        sender.send(wire)
        self.outbound.counters.errors += sender.errors - errors

    def _on_udp(self) -> None:
        assert self.udp is not None
        for _ in range(64):
            try:
                data = self.udp.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # ICMP port unreachable from a dead relay: the control socket tells
            try:
                dgram = socks5.parse_udp_datagram(data)
            except ProtocolError:
                self.outbound.counters.errors += 1
                continue
            if dgram.frag != 0:
                # RFC 1928 allows dropping fragments; reassembly is optional and rare.
                self.outbound.counters.dropped_fragments += 1
                continue
            self._active = True
            self.on_datagram(dgram.address, dgram.payload)

    def _on_control(self) -> None:
        assert self.control is not None
        try:
            data = self.control.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._end(f"control connection lost: {describe(e)}")
            return
        if not data:
            self._end("proxy closed the control connection")

    def _tick(self) -> None:
        if self._active:
            self._active = False
            self._timer = self._loop.call_later(self.outbound.udp_timeout, self._tick)
        else:
            self._end("idle")

    def _end(self, why: str) -> None:
        if self.closed:
            return
        self.close()
        self.on_close(why)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.outbound._sessions.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
        for s in (self.udp, self.control):
            if s is not None:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(s.fileno())
                s.close()
