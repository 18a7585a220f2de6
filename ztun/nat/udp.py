"""UDP flows and their outbound sessions, for both inbounds (TUN and SOCKS5 UDP ASSOCIATE).

`UdpTable` is the bounded table: an entry is created on a flow's first datagram and lives until
it has been idle for `timeout` seconds or is evicted as the least recently used when the table
is full. `UdpSessions` builds on it and ties each flow to an outbound session (its docstring
says how). Pure: every call that needs the time takes `now`; what is dropped is handed back, or
asked of the I/O layer as commands.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Generic, TypeVar

from ztun.address import Address, ip_or_none
from ztun.stack.commands import (
    CloseUdpSession,
    Command,
    FlowEnded,
    OpenUdpSession,
    SendDatagram,
)
from ztun.stack.flow import Flow, Refused

V = TypeVar("V")


class UdpTable(Generic[V]):
    def __init__(self, *, timeout: float = 60.0, max_sessions: int = 4096) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.timeout = timeout
        self.max_sessions = max_sessions
        self._items: OrderedDict[Hashable, tuple[V, float]] = OrderedDict()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable, now: float) -> V | None:
        """The live session for `key` (marked used at `now`), or None."""
        item = self._items.get(key)
        if item is None:
            return None
        if now - item[1] > self.timeout:
            return None  # expired; `expire` hands it back for closing
        self._items[key] = (item[0], now)
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: V, now: float) -> list[V]:
        """Add (or replace) a session; the sessions that had to go (replaced, expired, evicted)."""
        gone: list[V] = []
        old = self._items.pop(key, None)
        if old is not None:
            gone.append(old[0])
        if len(self._items) >= self.max_sessions:
            gone += self.expire(now)
        while len(self._items) >= self.max_sessions:
            _, (v, _) = self._items.popitem(last=False)
            self.evicted += 1
            gone.append(v)
        self._items[key] = (value, now)
        return gone

    def peek(self, key: Hashable) -> V | None:
        """The session for `key`, live or not, without marking it used."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def pop(self, key: Hashable) -> V | None:
        item = self._items.pop(key, None)
        return None if item is None else item[0]

    def expire(self, now: float) -> list[V]:
        """Remove sessions idle longer than the timeout (oldest first); hand them back."""
        gone: list[V] = []
        while self._items:
            key, (v, last) = next(iter(self._items.items()))
            if now - last <= self.timeout:
                break  # LRU order: every later one is younger
            del self._items[key]
            self.expired += 1
            gone.append(v)
        return gone

    def clear(self) -> list[V]:
        gone = [v for v, _ in self._items.values()]
        self._items.clear()
        return gone

    def keys(self) -> list[Hashable]:
        return list(self._items)

    def values(self) -> Iterator[V]:
        return (v for v, _ in self._items.values())

    def items(self) -> Iterator[tuple[Hashable, V]]:
        return ((k, v) for k, (v, _) in self._items.items())


# ---------------------------------------------------------------------------------------------
# RFC 4787 behaviours: sing-box's `udp_mapping` / `udp_filtering` values

ENDPOINT_INDEPENDENT = "endpoint_independent"
ADDRESS_DEPENDENT = "address_dependent"
ADDRESS_AND_PORT_DEPENDENT = "address_and_port_dependent"
BEHAVIOURS = (ENDPOINT_INDEPENDENT, ADDRESS_DEPENDENT, ADDRESS_AND_PORT_DEPENDENT)


def mapped_session(
    mapping: str, key: tuple[bytes, int, bytes, int], outbound: Hashable
) -> Hashable:
    """The session key of the TUN flow `key` (src, sport, dst, dport) by `mapping`: which
    flows of one client port share an outbound socket. Every key but the per-flow one names
    the outbound too, since destinations of one client port may be routed apart."""
    if mapping == ADDRESS_AND_PORT_DEPENDENT:
        return key
    if mapping == ADDRESS_DEPENDENT:
        return (key[0], key[1], key[2], outbound)
    return (key[0], key[1], outbound)


# ---------------------------------------------------------------------------------------------
# Flows and their outbound sessions, for both inbounds


class UdpFlow:
    """One UDP flow (a source to a destination) in a `UdpSessions`: its record, its routing
    verdict (`outbound`, or `refused`), and the key of the outbound session it sends through."""

    __slots__ = ("flow", "key", "outbound", "refused", "session_key")

    def __init__(
        self, key: Hashable, flow: Flow, outbound: Any, refused: Refused | None,
        session_key: Hashable,
    ) -> None:  # fmt: skip
        self.key = key
        self.flow = flow
        self.outbound = outbound
        self.refused = refused
        self.session_key = session_key


def _host_key(uf: UdpFlow) -> str | None:
    """What `sent_to` remembers of a flow's destination: its host, or None for a name that
    the outbound resolves far away (a proxy), whose replies may come from any address."""
    host = uf.flow.dest.host
    if ip_or_none(host) is None and getattr(uf.outbound, "resolves_remotely", True):
        return None
    return host


#: Datagrams a flow's session holds while it is being opened; more are dropped and counted.
MAX_PENDING = 64
#: After a session failed to open, its datagrams are dropped this long before the next try.
RETRY_DELAY = 1.0

_OPENING, _OPEN, _FAILED = 0, 1, 2


class _Session:
    __slots__ = ("ident", "pending", "retry_at", "state")

    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.state = _OPENING
        self.pending: list[tuple[Address, bytes]] = []
        self.retry_at = 0.0


class UdpSessions:
    """The UDP flow table of an inbound and the state of its outbound sessions (sans-I/O).

    Flows live in a `UdpTable` (bounded, LRU, idle expiry), so both inbounds expire and evict
    the same way. Each flow sends through a session its inbound names: the TUN gives every
    flow its own session (session key = flow key), a SOCKS5 UDP ASSOCIATE shares one session
    per outbound among its destinations (session key = outbound tag). A session is opened on
    its first datagram (the I/O layer answers `opened` or `open_failed`), holds up to
    `max_pending` datagrams meanwhile, and is closed when its last flow ends. After a failed
    open its flows end `failed` and datagrams are dropped for `retry_delay` seconds, so a dead
    proxy costs one attempt per delay, not one per datagram.

    Every call that needs the time takes `now`; what the I/O layer must do is appended to `out`.
    """

    def __init__(
        self,
        out: list[Command],
        *,
        timeout: float,
        max_flows: int,
        max_pending: int = MAX_PENDING,
        retry_delay: float = RETRY_DELAY,
    ) -> None:
        self.out = out
        self.flows: UdpTable[UdpFlow] = UdpTable(timeout=timeout, max_sessions=max_flows)
        self.max_pending = max_pending
        self.retry_delay = retry_delay
        self._sessions: dict[Hashable, _Session] = {}
        #: session key -> keys of the live flows that send through it (a dict: ordered, so
        #: the flows of a failed session end, and are logged, in the order they began)
        self._members: dict[Hashable, dict[Hashable, None]] = {}
        #: session key -> destination host of its live flows -> how many flows (None: a
        #: name resolved far away, whose address only the proxy knows): what `sent_to` asks
        self._hosts: dict[Hashable, dict[str | None, int]] = {}
        self._next_ident = 0
        #: datagrams dropped: queue full while a session opened, or inside a retry delay
        self.dropped = 0
        #: told of every flow that is not refused as it is added (the I/O layer's tracker)
        self.on_flow: Callable[[UdpFlow], None] | None = None

    def __len__(self) -> int:
        return len(self.flows)

    def get(self, key: Hashable, now: float) -> UdpFlow | None:
        """The live flow `key` (marked used at `now`), or None."""
        return self.flows.get(key, now)

    def add(
        self, key: Hashable, flow: Flow, verdict: Any, session_key: Hashable, now: float
    ) -> UdpFlow:
        """A new flow with its routing verdict: an outbound, or `Refused` (logged now, and
        kept so that its next datagrams are answered without routing it again)."""
        refused = verdict if isinstance(verdict, Refused) else None
        uf = UdpFlow(key, flow, None if refused else verdict, refused, session_key)
        if refused is not None:
            flow.end, flow.error = "blocked", refused.reason
            self.out.append(FlowEnded(flow))
        for gone in self.flows.put(key, uf, now):
            self._end(gone, "evicted")
        if refused is None:
            if self.on_flow is not None:
                self.on_flow(uf)
            self._members.setdefault(session_key, {})[key] = None
            host = _host_key(uf)
            hosts = self._hosts.setdefault(session_key, {})
            hosts[host] = hosts.get(host, 0) + 1
        return uf

    def flow_of(self, key: Hashable) -> UdpFlow | None:
        """Flow `key`, live or idle, without marking it used."""
        return self.flows.peek(key)

    def members(self, session_key: Hashable) -> list[UdpFlow]:
        """The live flows that send through session `session_key`."""
        peek = self.flows.peek
        found = (peek(k) for k in self._members.get(session_key, ()))
        return [uf for uf in found if uf is not None]

    def sent_to(self, session_key: Hashable, host: str) -> bool:
        """Whether a live flow of the session sends to address `host`, or to a name that a
        proxy resolves (whose address ztun cannot know)."""
        hosts = self._hosts.get(session_key)
        return hosts is not None and (host in hosts or None in hosts)

    def send(self, uf: UdpFlow, payload: bytes, now: float) -> None:
        """Send a datagram of a flow that is not refused (the caller answers refused ones).
        `flow.up` counts what is sent or queued, not what is dropped."""
        key = uf.session_key
        s = self._sessions.get(key)
        if s is None or (s.state == _FAILED and now >= s.retry_at):
            self._next_ident += 1
            s = self._sessions[key] = _Session(self._next_ident)
            s.pending.append((uf.flow.dest, payload))
            self.out.append(OpenUdpSession(key, s.ident, uf.flow, uf.outbound))
        elif s.state == _OPEN:
            self.out.append(SendDatagram(key, uf.flow.dest, payload))
        elif s.state == _OPENING and len(s.pending) < self.max_pending:
            s.pending.append((uf.flow.dest, payload))
        else:
            self.dropped += 1
            return
        uf.flow.up += len(payload)

    def opened(self, session_key: Hashable, ident: int) -> bool:
        """The session asked for with `ident` is open: send what waited for it. False when
        nobody waits for it any more (its flows ended, or a newer attempt replaced it): the
        caller closes it, and must not let it stand in for a newer session of the same key."""
        s = self._sessions.get(session_key)
        if s is None or s.ident != ident or s.state != _OPENING:
            self.out.append(CloseUdpSession(session_key, ident))
            return False
        s.state = _OPEN
        pending, s.pending = s.pending, []
        for dest, payload in pending:
            self.out.append(SendDatagram(session_key, dest, payload))
        return True

    def routed(self, session_key: Hashable, ident: int, verdict: Any) -> bool:
        """The flow of a session asked for with a `LookupFirst` verdict was routed once its
        owner was known: `verdict` is its outbound (True: go on opening the session through
        it) or `Refused` (False: the flow ends blocked, its waiting datagrams are dropped, and
        its next ones are refused without routing it again)."""
        s = self._sessions.get(session_key)
        if s is None or s.ident != ident or s.state != _OPENING:
            return False
        members = self.members(session_key)
        for uf in members:
            self._forget_host(uf)
            uf.outbound = None if isinstance(verdict, Refused) else verdict
        if not isinstance(verdict, Refused):
            for uf in members:
                host = _host_key(uf)
                hosts = self._hosts.setdefault(session_key, {})
                hosts[host] = hosts.get(host, 0) + 1
            return True
        self.dropped += len(s.pending)
        del self._sessions[session_key]
        self._members.pop(session_key, None)
        for uf in members:
            uf.refused = verdict
            uf.flow.end, uf.flow.error = "blocked", verdict.reason
            self.out.append(FlowEnded(uf.flow))
        return False

    def open_failed(self, session_key: Hashable, ident: int, error: str, now: float) -> int:
        """Opening failed: its flows end `failed`; datagrams are dropped for `retry_delay`.
        Returns how many waiting datagrams were dropped."""
        s = self._sessions.get(session_key)
        if s is None or s.ident != ident:
            return 0
        dropped = len(s.pending)
        self.dropped += dropped
        s.state, s.pending, s.retry_at = _FAILED, [], now + self.retry_delay
        self._end_members(session_key, "failed", error)
        return dropped

    def ended(self, session_key: Hashable, ident: int, why: str) -> None:
        """The open session ended on its own (control connection lost, socket error, idle):
        its flows end, and the next datagram opens a new one."""
        s = self._sessions.get(session_key)
        if s is None or s.ident != ident:
            return
        del self._sessions[session_key]
        self._end_members(session_key, "idle" if why == "idle" else "reset",
                          None if why == "idle" else why)  # fmt: skip

    def reply(self, key: Hashable, payload: bytes, now: float) -> UdpFlow | None:
        """A datagram came back for flow `key`: counted, and the flow kept alive."""
        uf = self.flows.get(key, now)
        if uf is not None:
            uf.flow.down += len(payload)
        return uf

    def expire(self, now: float) -> None:
        """End flows idle longer than the timeout; forget failures whose delay is over."""
        for uf in self.flows.expire(now):
            self._end(uf, "idle")
        for key in [k for k, s in self._sessions.items()
                    if s.state == _FAILED and now >= s.retry_at]:  # fmt: skip
            del self._sessions[key]

    def end(self, key: Hashable, end: str, error: str | None = None) -> None:
        """End flow `key` now."""
        uf = self.flows.pop(key)
        if uf is not None:
            self._end(uf, end, error)

    def clear(self, end: str = "closed", error: str | None = None) -> None:
        """End every flow, and so close every session (and forget failed ones: after a
        network change the next datagram tries again at once)."""
        for uf in self.flows.clear():
            self._end(uf, end, error)
        self._sessions.clear()

    def _end_members(self, session_key: Hashable, end: str, error: str | None) -> None:
        for key in list(self._members.get(session_key, ())):
            uf = self.flows.pop(key)
            if uf is not None:
                self._end(uf, end, error)

    def _forget_host(self, uf: UdpFlow) -> None:
        hosts = self._hosts.get(uf.session_key)
        if hosts is not None:
            host = _host_key(uf)
            left = hosts.get(host, 0) - 1
            if left > 0:
                hosts[host] = left
            else:
                hosts.pop(host, None)
                if not hosts:
                    del self._hosts[uf.session_key]

    def _end(self, uf: UdpFlow, end: str, error: str | None = None) -> None:
        if uf.refused is not None:
            return  # logged when it was refused
        uf.flow.end, uf.flow.error = end, error
        # Idle and closed are how nearly every UDP flow ends: those lines are at debug level.
        self.out.append(FlowEnded(uf.flow, quiet=end in ("idle", "closed")))
        self._forget_host(uf)
        members = self._members.get(uf.session_key)
        if members is not None:
            members.pop(uf.key, None)
            if members:
                return
            del self._members[uf.session_key]
        s = self._sessions.get(uf.session_key)
        if s is not None and s.state != _FAILED:
            del self._sessions[uf.session_key]
            self.out.append(CloseUdpSession(uf.session_key, s.ident))
