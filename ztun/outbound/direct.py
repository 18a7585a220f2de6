"""The `direct` outbound: connect to the destination from this host.

Owns: dial options (bind_interface, routing_mark and auto_route's own mark, applied by
`runtime/dial.py`; connect_timeout), resolving a domain destination by `domain_strategy`
(through the DNS module when one is set with `set_resolver`, else getaddrinfo) with Happy
Eyeballs (RFC 8305) when both families are there, and direct UDP sessions.

Bounds on name lookups: one lookup in flight per name (every flow to it waits on that one);
at most `MAX_LOOKUPS` run at once and `MAX_QUEUED_LOOKUPS` more wait for a turn (each for at
most `connect_timeout`); beyond that a flow to a new name fails at once with a DNS error, so a
flood of unique names costs a refusal each and never delays flows to IP addresses. A UDP
session keeps at most `MAX_UDP_NAMES` resolved names and `MAX_UDP_REVERSE` reply addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import TypeVar

from ztun.address import MAX_IP_TEXT, Address, IPAddress, clip
from ztun.config.options import DirectOutboundOptions
from ztun.outbound.base import (
    CloseHandler,
    Counters,
    DatagramHandler,
    ErrorKind,
    OutboundError,
    describe,
    kind_of,
)
from ztun.route.metadata import FlowMeta
from ztun.runtime import netio, udpio
from ztun.runtime.dial import DialError, DialOptions, NoEgressError, check_egress

K = TypeVar("K")
V = TypeVar("V")

#: Linux: a TCP socket non-blocking from birth (elsewhere, setblocking(False) right after).
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)

#: RFC 8305 "Connection Attempt Delay".
ATTEMPT_DELAY = 0.25
_STRATEGIES = ("prefer_ipv4", "prefer_ipv6", "ipv4_only", "ipv6_only")

#: Name lookups running at once per outbound, and waiting for a turn beyond those.
MAX_LOOKUPS = 64
MAX_QUEUED_LOOKUPS = 1024
#: A direct UDP session's caches: names resolved, and reply addresses mapped back to names.
MAX_UDP_NAMES = 1024
MAX_UDP_REVERSE = 4096
#: Datagrams held per name while it is being resolved, and names resolving at once.
MAX_UDP_PENDING = 16
MAX_UDP_RESOLVING = 256

#: (name, domain_strategy) → addresses, or OutboundError(ErrorKind.DNS): the DNS module's
#: `DnsClient.lookup`, when the config has a `dns` section.
Resolver = Callable[[str, "str | None"], Awaitable[list[IPAddress]]]


def _ip_literal(host: str) -> str | None:
    """`host` as a normalized IP string, or None for a domain (cached for short text: hosts
    repeat; a long host is never an IP and must not become a cache key)."""
    return _ip_text(host) if len(host) <= MAX_IP_TEXT else None


@lru_cache(maxsize=4096)
def _ip_text(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def order_addresses(infos: list[str], strategy: str | None) -> list[str]:
    """Addresses in the order to try: filtered by strategy, then families interleaved
    (RFC 8305 §4) starting with the preferred one."""
    v4 = [a for a in infos if ":" not in a]
    v6 = [a for a in infos if ":" in a]
    if strategy == "ipv4_only":
        return v4
    if strategy == "ipv6_only":
        return v6
    if strategy == "prefer_ipv4":
        first, second = v4, v6
    elif strategy == "prefer_ipv6":
        first, second = v6, v4
    else:
        # The resolver's order (RFC 6724) says which family comes first.
        first, second = (v6, v4) if infos and ":" in infos[0] else (v4, v6)
    out: list[str] = []
    for i in range(max(len(first), len(second))):
        out += first[i : i + 1] + second[i : i + 1]
    return out


class DirectOutbound:
    type = "direct"
    refuses_tcp = False
    resolves_remotely = False
    drops_udp = False

    def __init__(self, options: DirectOutboundOptions) -> None:
        strategy = options.domain_strategy
        if strategy is not None and strategy not in _STRATEGIES:
            raise OutboundError(ErrorKind.GENERAL, f"unknown domain_strategy {strategy!r}")
        self.options = options
        self.tag = options.tag
        self.bind_interface = options.bind_interface
        self.routing_mark = options.routing_mark
        #: Without routing_mark or bind_interface, its sockets carry auto_route's own mark.
        self.dial = DialOptions(options.routing_mark, options.bind_interface)
        self.connect_timeout = options.connect_timeout
        self.domain_strategy = strategy
        self.counters = Counters()
        self._resolver: Resolver | None = None
        #: name -> the one lookup in flight for it
        self._lookups: dict[str, asyncio.Task[list[str]]] = {}
        self._lookup_slots: asyncio.Semaphore | None = None  # made in the running loop
        self.max_lookups = MAX_LOOKUPS
        self.max_queued_lookups = MAX_QUEUED_LOOKUPS
        #: lookups refused because too many were running or waiting
        self.lookups_refused = 0
        #: the open UDP sessions (a dict: ordered), for reset_network
        self._sessions: dict[DirectUdpSession, None] = {}

    def set_resolver(self, resolver: Resolver | None) -> None:
        """Resolve domain destinations with `resolver` (DNS rules, hosts, cache) instead of
        the system's getaddrinfo; None goes back to getaddrinfo."""
        self._resolver = resolver

    # -- socket options -------------------------------------------------------------------

    def _apply_dial_options(self, sock: socket.socket) -> None:
        try:
            self.dial.apply(sock)
        except NoEgressError as e:
            raise OutboundError(ErrorKind.NO_EGRESS, f"direct outbound {self.tag!r}: {e}") from None
        except DialError as e:
            raise OutboundError(ErrorKind.GENERAL, f"direct outbound {self.tag!r}: {e}") from None

    # -- resolution -----------------------------------------------------------------------

    async def resolve(self, host: str) -> list[str]:
        """The addresses to try for `host` (an IP literal is itself), by domain_strategy.
        One lookup per name runs for every flow that asks (see the module's bounds)."""
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            return [str(ip)]
        task = self._lookups.get(host)
        if task is None:
            if len(self._lookups) >= self.max_lookups + self.max_queued_lookups:
                self.lookups_refused += 1
                raise OutboundError(
                    ErrorKind.DNS, f"cannot resolve {host}: too many name lookups in progress"
                )
            task = asyncio.get_running_loop().create_task(self._lookup(host))
            self._lookups[host] = task
            task.add_done_callback(lambda t: self._lookup_done(host, t))
        # Shielded: one flow giving up (its connect timeout) does not cancel the others'.
        return await asyncio.shield(task)

    def _lookup_done(self, host: str, task: asyncio.Task[list[str]]) -> None:
        if self._lookups.get(host) is task:
            del self._lookups[host]
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody waits for any more is no error

    async def _lookup(self, host: str) -> list[str]:
        slots = self._lookup_slots
        if slots is None:
            slots = self._lookup_slots = asyncio.Semaphore(self.max_lookups)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await slots.acquire()
        except TimeoutError:
            raise OutboundError(
                ErrorKind.TIMEOUT,
                f"cannot resolve {host}: no lookup slot within {self.connect_timeout:g}s",
            ) from None
        try:
            return await self._resolve_now(host)
        finally:
            slots.release()

    async def _resolve_now(self, host: str) -> list[str]:
        if self._resolver is not None:
            try:
                found = await self._resolver(host, self.domain_strategy)
            except (UnicodeError, ValueError) as e:  # a name the DNS module cannot encode
                raise OutboundError(
                    ErrorKind.DNS, f"cannot resolve {clip(host)}: {describe(e)}"
                ) from None
            addrs = order_addresses(list(dict.fromkeys(str(a) for a in found)),
                                    self.domain_strategy)  # fmt: skip
            if not addrs:
                raise OutboundError(
                    ErrorKind.DNS, f"{clip(host)} has no address allowed by {self.domain_strategy}"
                )
            return addrs
        loop = asyncio.get_running_loop()
        family = {
            "ipv4_only": socket.AF_INET,
            "ipv6_only": socket.AF_INET6,
        }.get(self.domain_strategy or "", socket.AF_UNSPEC)
        try:
            infos = await loop.getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError, ValueError) as e:
            # gaierror, and what the IDNA codec raises for a name it cannot encode (a label
            # over 63 bytes, an empty one): each is "cannot resolve", never a traceback.
            raise OutboundError(
                ErrorKind.DNS, f"cannot resolve {clip(host)}: {describe(e)}"
            ) from None
        seen: list[str] = []
        for info in infos:
            a = str(info[4][0])
            if a not in seen:
                seen.append(a)
        addrs = order_addresses(seen, self.domain_strategy)
        if not addrs:
            raise OutboundError(
                ErrorKind.DNS, f"{clip(host)} has no address allowed by {self.domain_strategy}"
            )
        return addrs

    # -- TCP ------------------------------------------------------------------------------

    async def connect_tcp(
        self, dest: Address, meta: FlowMeta, handover: netio.Handover | None = None
    ) -> socket.socket:
        self.counters.tcp_flows += 1
        ip = _ip_literal(dest.host)
        try:
            if ip is not None:
                # An IP literal (every TUN flow): nothing to resolve, and the connect's own
                # deadline bounds it rather than asyncio.timeout (about 3 µs less per flow).
                return await self._connect_one(ip, dest.port, handover, self.connect_timeout)
            async with asyncio.timeout(self.connect_timeout):
                addrs = await self.resolve(dest.host)
                return await self._happy_eyeballs(addrs, dest.port)
        except TimeoutError:
            self.counters.errors += 1
            raise OutboundError(
                ErrorKind.TIMEOUT,
                f"connect to {clip(dest)} timed out after {self.connect_timeout:g}s",
            ) from None
        except OutboundError:
            self.counters.errors += 1
            raise
        except OSError as e:
            self.counters.errors += 1
            raise OutboundError(kind_of(e), f"connect to {clip(dest)}: {describe(e)}") from None

    async def _connect_one(
        self,
        ip: str,
        port: int,
        handover: netio.Handover | None = None,
        deadline: float | None = None,
    ) -> socket.socket:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        # Non-blocking from birth: one ioctl fewer than setblocking(False).
        sock = socket.socket(family, _STREAM_NONBLOCK)
        if not _STREAM_NONBLOCK & ~socket.SOCK_STREAM:
            sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._apply_dial_options(sock)
            # netio.connect, not loop.sock_connect: uvloop resolves even an IP literal in its
            # thread pool and re-registers the socket per call (see ztun/runtime/netio.py).
            waiter = netio.Waiter(asyncio.get_running_loop(), sock)
            try:
                # The deadline's timer is set only when the connect has to wait.
                await netio.connect(sock, (ip, port), waiter, deadline)
            except BaseException:
                waiter.close()
                raise
            if handover is not None:
                # The relay takes this watch over (see Outbound.connect_tcp).
                waiter.clear_deadline()
                handover.waiter = waiter
            else:
                waiter.close()
        except BaseException:
            sock.close()
            raise
        return sock

    async def _happy_eyeballs(self, addrs: list[str], port: int) -> socket.socket:
        if len(addrs) == 1:
            return await self._connect_one(addrs[0], port)
        pending: set[asyncio.Task[socket.socket]] = set()
        last_error: BaseException | None = None
        winner: socket.socket | None = None
        try:
            for ip in addrs:
                pending.add(asyncio.create_task(self._connect_one(ip, port)))
                # Start the next attempt after the delay, or at once when one fails.
                winner, last_error = await self._first(pending, ATTEMPT_DELAY, last_error)
                if winner is not None:
                    return winner
            while pending and winner is None:
                winner, last_error = await self._first(pending, None, last_error)
            if winner is not None:
                return winner
            assert last_error is not None
            raise last_error
        finally:
            for t in pending:
                t.cancel()
            for t in pending:
                with contextlib.suppress(BaseException):
                    s = await t
                    s.close()

    @staticmethod
    async def _first(
        pending: set[asyncio.Task[socket.socket]],
        timeout: float | None,
        last_error: BaseException | None,
    ) -> tuple[socket.socket | None, BaseException | None]:
        done, _ = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        winner = None
        for t in done:
            pending.discard(t)
            exc = t.exception()
            if exc is not None:
                last_error = exc
            elif winner is None:
                winner = t.result()
            else:
                t.result().close()
        return winner, last_error

    # -- UDP ------------------------------------------------------------------------------

    async def open_udp(
        self, meta: FlowMeta, on_datagram: DatagramHandler, on_close: CloseHandler
    ) -> DirectUdpSession:
        if not self.bind_interface:
            try:
                check_egress()  # its sockets come later: fail the flow now, not each datagram
            except NoEgressError as e:
                raise OutboundError(ErrorKind.NO_EGRESS,
                                    f"direct outbound {self.tag!r}: {e}") from None  # fmt: skip
        self.counters.udp_sessions += 1
        session = DirectUdpSession(self, on_datagram, on_close)
        self._sessions[session] = None
        return session

    def reset_network(self, why: str) -> int:
        """End every UDP session: their sockets are bound to the interface that was the
        egress (see ztun.outbound.base.Outbound)."""
        sessions = list(self._sessions)
        for session in sessions:
            session.end(why)
        return len(sessions)

    async def close(self) -> None:
        return None


class DirectUdpSession:
    """One unconnected UDP socket per family, created when first needed; replies from a
    resolved domain's address are reported as coming from the domain."""

    def __init__(
        self, outbound: DirectOutbound, on_datagram: DatagramHandler, on_close: CloseHandler
    ) -> None:
        self.outbound = outbound
        self.on_datagram = on_datagram
        self.on_close = on_close
        self.closed = False
        self._socks: dict[int, socket.socket] = {}
        self._senders: dict[int, udpio.BatchSender] = {}
        self._resolved: dict[str, str] = {}  # domain -> ip, oldest first
        self._reverse: dict[tuple[str, int], Address] = {}  # (ip, port) -> domain address
        #: name -> datagrams waiting for its one lookup
        self._resolving: dict[str, list[tuple[Address, bytes]]] = {}
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        #: datagrams dropped: too many waiting for a name, or too many names resolving
        self.dropped = 0

    def _sock(self, family: int) -> socket.socket:
        s = self._socks.get(family)
        if s is None:
            s = socket.socket(family, socket.SOCK_DGRAM)
            try:
                s.setblocking(False)
                self.outbound._apply_dial_options(s)
                s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
                udpio.tune(s)
            except BaseException:
                s.close()
                raise
            self._loop.add_reader(s.fileno(), self._on_readable, s)
            self._socks[family] = s
            self._senders[family] = udpio.BatchSender(s)
        return s

    def send(self, dest: Address, payload: bytes) -> None:
        if self.closed:
            return
        ip = self._resolved.get(dest.host)
        if ip is None and dest.is_domain:
            waiting = self._resolving.get(dest.host)
            if waiting is not None:
                if len(waiting) < MAX_UDP_PENDING:
                    waiting.append((dest, payload))
                else:
                    self.dropped += 1
                return
            if len(self._resolving) >= MAX_UDP_RESOLVING:
                self.dropped += 1
                return
            self._resolving[dest.host] = [(dest, payload)]
            t = self._loop.create_task(self._resolve_and_send(dest.host))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
            return
        self._sendto(ip or dest.host, dest, payload)

    def send_many(self, items: list[tuple[Address, bytes]]) -> None:
        """Send a burst in order: equal-sized datagrams to one IP address leave in one
        segmented send; names go through `send` (and their lookup)."""
        i, n = 0, len(items)
        while i < n and not self.closed:
            dest = items[i][0]
            j = i + 1
            while j < n and (items[j][0] is dest or items[j][0] == dest):
                j += 1
            ip = self._resolved.get(dest.host)
            if j - i < 2 or (ip is None and dest.is_domain):
                for d, payload in items[i:j]:
                    self.send(d, payload)
            else:
                self._sendto_many(ip or dest.host, dest, [p for _, p in items[i:j]])
            i = j

    def _sendto_many(self, ip: str, dest: Address, payloads: list[bytes]) -> None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        if dest.is_domain:
            _bounded_put(self._reverse, (ip, dest.port), dest, MAX_UDP_REVERSE)
        try:
            self._sock(family)
        except (OutboundError, OSError):
            self.outbound.counters.errors += 1
            return
        sender = self._senders[family]
        errors = sender.errors
        sender.send(payloads, (ip, dest.port))
        self.outbound.counters.errors += sender.errors - errors

    async def _resolve_and_send(self, host: str) -> None:
        try:
            addrs = await asyncio.wait_for(
                self.outbound.resolve(host), self.outbound.connect_timeout
            )
        except (OutboundError, TimeoutError):
            self.outbound.counters.errors += 1
            self.dropped += len(self._resolving.pop(host, ()))
            return
        waiting = self._resolving.pop(host, [])
        _bounded_put(self._resolved, host, addrs[0], MAX_UDP_NAMES)
        for dest, payload in waiting:
            self._sendto(addrs[0], dest, payload)

    def _sendto(self, ip: str, dest: Address, payload: bytes) -> None:
        if self.closed:
            return
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        if dest.is_domain:
            _bounded_put(self._reverse, (ip, dest.port), dest, MAX_UDP_REVERSE)
        try:
            self._sock(family).sendto(payload, (ip, dest.port))
        except (BlockingIOError, InterruptedError):
            pass  # UDP may drop under load; so may we
        except OutboundError:
            self.outbound.counters.errors += 1
        except OSError:
            self.outbound.counters.errors += 1

    def _on_readable(self, s: socket.socket) -> None:
        for _ in range(64):
            try:
                data, addr = s.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ICMP errors surface here on some kernels; the next datagram may work.
                return
            key = (str(addr[0]), int(addr[1]))
            src = self._reverse.get(key) or Address(*key)
            self.on_datagram(src, data)

    def end(self, why: str) -> None:
        """Close, and tell the session's owner why (`on_close`)."""
        if not self.closed:
            self.close()
            self.on_close(why)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.outbound._sessions.pop(self, None)
        for t in self._tasks:
            t.cancel()
        self._resolving.clear()
        for s in self._socks.values():
            self._loop.remove_reader(s.fileno())
            s.close()
        self._socks.clear()
        self._senders.clear()


def _bounded_put(table: dict[K, V], key: K, value: V, cap: int) -> None:
    """Set `table[key]`, first dropping the oldest entry if the table is at `cap`."""
    if key not in table and len(table) >= cap:
        del table[next(iter(table))]
    table[key] = value
