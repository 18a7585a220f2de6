"""What every outbound offers, and the errors an outbound can end a flow with.

Owns: the `Outbound` and `UdpSession` interfaces (with the capabilities by which inbounds
treat outbounds differently: never by their `type`), `OutboundError` with its kinds, and the
mapping from a kind to the SOCKS5 reply code and HTTP status the inbound answers with.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from ztun.address import Address
from ztun.errors import ZtunError
from ztun.proto.socks5 import Reply
from ztun.route.metadata import FlowMeta
from ztun.runtime.netio import Handover

#: Called with (source address, payload) for each datagram that comes back.
DatagramHandler = Callable[[Address, bytes], None]
#: Called once when a UDP session ends on its own (control connection lost, socket error).
CloseHandler = Callable[[str], None]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ErrorKind(Enum):
    REFUSED = "connection refused"
    HOST_UNREACHABLE = "host unreachable"
    NETWORK_UNREACHABLE = "network unreachable"
    TIMEOUT = "timed out"
    DNS = "name resolution failed"
    PROXY_DOWN = "proxy unreachable"
    #: auto_detect_interface finds no uplink: refused at once rather than left to time out
    NO_EGRESS = "no network"
    AUTH = "proxy authentication failed"
    BLOCKED = "blocked"
    UNSUPPORTED = "not supported"
    GENERAL = "failed"


_SOCKS_REPLY = {
    ErrorKind.REFUSED: Reply.CONNECTION_REFUSED,
    ErrorKind.HOST_UNREACHABLE: Reply.HOST_UNREACHABLE,
    ErrorKind.NETWORK_UNREACHABLE: Reply.NETWORK_UNREACHABLE,
    ErrorKind.TIMEOUT: Reply.HOST_UNREACHABLE,
    ErrorKind.DNS: Reply.HOST_UNREACHABLE,
    ErrorKind.PROXY_DOWN: Reply.GENERAL_FAILURE,
    ErrorKind.NO_EGRESS: Reply.NETWORK_UNREACHABLE,
    ErrorKind.AUTH: Reply.GENERAL_FAILURE,
    ErrorKind.BLOCKED: Reply.NOT_ALLOWED,
    ErrorKind.UNSUPPORTED: Reply.COMMAND_NOT_SUPPORTED,
    ErrorKind.GENERAL: Reply.GENERAL_FAILURE,
}


class OutboundError(ZtunError):
    """A flow could not be opened through an outbound; `str()` is the one log line to show."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def socks_reply(self) -> int:
        return int(_SOCKS_REPLY[self.kind])

    @property
    def http_status(self) -> int:
        if self.kind is ErrorKind.TIMEOUT:
            return 504
        if self.kind is ErrorKind.BLOCKED:
            return 403
        if self.kind is ErrorKind.NO_EGRESS:
            return 503
        return 502


_ERRNO_KIND = {
    errno.ECONNREFUSED: ErrorKind.REFUSED,
    errno.EHOSTUNREACH: ErrorKind.HOST_UNREACHABLE,
    errno.ENETUNREACH: ErrorKind.NETWORK_UNREACHABLE,
    errno.ETIMEDOUT: ErrorKind.TIMEOUT,
    errno.EADDRNOTAVAIL: ErrorKind.NETWORK_UNREACHABLE,
}


def kind_of(exc: OSError) -> ErrorKind:
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return ErrorKind.TIMEOUT
    if isinstance(exc, socket.gaierror):
        return ErrorKind.DNS
    return _ERRNO_KIND.get(exc.errno or 0, ErrorKind.GENERAL)


def describe(exc: BaseException) -> str:
    """A short reason: "Connection refused", not asyncio's "Connect call failed (...)"."""
    if isinstance(exc, OSError) and exc.errno and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


@dataclass
class Counters:
    """Per-outbound counters (read by tests and, later, by an API)."""

    tcp_flows: int = 0
    udp_sessions: int = 0
    errors: int = 0
    blocked_tcp: int = 0
    blocked_udp: int = 0
    dropped_fragments: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class UdpSession(Protocol):
    """Datagrams from one inbound association through one outbound."""

    closed: bool

    def send(self, dest: Address, payload: bytes) -> None: ...

    def close(self) -> None: ...


def send_burst(session: UdpSession, items: list[tuple[Address, bytes]]) -> None:
    """`items` through `session`, in order: in one burst where the session can (`send_many`,
    an optional part of a session: UDP_SEGMENT, sendmmsg), else one datagram at a time."""
    many = getattr(session, "send_many", None)
    if many is not None:
        many(items)
    else:
        for dest, payload in items:
            session.send(dest, payload)


class Outbound(Protocol):
    tag: str
    type: str
    counters: Counters
    #: `connect_tcp` always fails with ErrorKind.BLOCKED, so an inbound may refuse a TCP flow
    #: (an RST to a TUN SYN) without calling it; it then counts `counters.blocked_tcp` itself.
    refuses_tcp: bool
    #: A UDP session only drops (and counts) datagrams: the flow is logged as blocked.
    drops_udp: bool
    #: The far end resolves names itself (a proxy): given a flow whose IP ztun's own DNS
    #: answer produced (reverse mapping), it gets the name instead, as the application asked.
    resolves_remotely: bool

    async def connect_tcp(
        self, dest: Address, meta: FlowMeta, handover: Handover | None = None
    ) -> socket.socket:
        """A connected, non-blocking socket to `dest`, or OutboundError.

        Who owns the socket's watch (the same rule for every inbound): without `handover`, the
        socket comes back unwatched by the loop and the caller just closes it when done. With
        one, the outbound may leave its handshake's `netio.Waiter` watching the socket and put
        it in `handover.waiter` (deadline cleared); the caller then owns that watch too, and
        must either pass it to the relay (`relay(..., remote_watch=handover.take())`, which
        takes the watch over in place and drops it at the end) or call `handover.release()`
        before closing the socket. On OutboundError the outbound has closed both itself and
        leaves `handover` empty. Why: each dropped and re-made watch costs a poll handle (an
        ioctl and two epoll_ctl with uvloop) per connection; see ztun/runtime/netio.py.
        """
        ...

    async def open_udp(
        self, meta: FlowMeta, on_datagram: DatagramHandler, on_close: CloseHandler
    ) -> UdpSession:
        """A session that sends datagrams anywhere and hands back what returns."""
        ...

    # Optional, for outbounds whose sessions hold sockets of the network (direct, socks):
    # `reset_network(why) -> int`, called by the network monitor when the uplink changed,
    # ends every UDP session (its `on_close(why)` runs, so the next datagram opens a new one
    # on the new network), leaves TCP flows alone, and says how many sessions it ended.

    async def close(self) -> None: ...
