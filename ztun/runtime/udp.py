"""Carries out the UDP commands of a `ztun.nat.udp.UdpSessions` core, for either inbound.

Owns: opening outbound UDP sessions when the core asks (a task each, bounded by the outbound's
own connect timeout), sending on them, closing them, writing flow log lines, and feeding back
what happened (`opened`, `open_failed`, `ended`, replies). The decisions stay in the core; the
inbound drains the core's `out` list and hands each command here (the TUN handles its own
`WritePacket`s first).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

from ztun.address import Address
from ztun.log import LIMITER, limited
from ztun.nat.udp import UdpFlow, UdpSessions
from ztun.outbound.base import Outbound, OutboundError, UdpSession, send_burst
from ztun.runtime.dispatch import log_flow
from ztun.runtime.tracker import Tracked, Tracker
from ztun.stack.commands import (
    CloseUdpSession,
    Command,
    FlowEnded,
    OpenUdpSession,
    SendDatagram,
    WriteDatagram,
    WritePacket,
)
from ztun.stack.flow import Flow, LookupFirst

log = logging.getLogger("ztun.inbound")

#: Called with (session key, source address, payload) for each datagram that comes back.
ReplyHandler = Callable[[Hashable, Address, bytes], None]
#: Routes a flow whose session was asked for with `LookupFirst`: finds its owner, routes it
#: again, and gives its outbound or `Refused`.
Resolve = Callable[[Flow, LookupFirst], Awaitable[Any]]


class UdpSessionRunner:
    def __init__(
        self,
        core: UdpSessions,
        loop: asyncio.AbstractEventLoop,
        tasks: set[asyncio.Task[None]],
        on_reply: ReplyHandler,
        drain: Callable[[], None],
        tracker: Tracker | None = None,
        resolve: Resolve | None = None,
    ) -> None:
        self.core = core
        self.loop = loop
        self.tasks = tasks
        self.on_reply = on_reply
        #: called after the core was told something, so that its new commands are carried out
        self.drain = drain
        self.resolve = resolve
        #: the open sessions: session key -> (ident, session)
        self.sessions: dict[Hashable, tuple[int, UdpSession]] = {}
        #: the API's table of open flows; this runner's entries by id(flow) (the core's flow
        #: table bounds them: each leaves at its FlowEnded)
        self.tracker = tracker
        self._tracked: dict[int, Tracked] = {}
        core.on_flow = self._on_flow

    def _on_flow(self, uf: UdpFlow) -> None:
        """A routed flow joins the core: through a group whose session is already open (a
        SOCKS5 association's next destination), it carries the session's chain; with the API
        on, the tracker lists it."""
        held = self.sessions.get(uf.session_key)
        if held is not None:
            _set_chain(uf.flow, held[1])
        if self.tracker is not None:
            self._track(uf)

    def _track(self, uf: UdpFlow) -> None:
        assert self.tracker is not None
        flow, key = uf.flow, uf.key
        entry = self.tracker.add(flow, "udp", lambda: (flow.up, flow.down),
                                 lambda: self._close(key))  # fmt: skip
        if entry is not None:
            self._tracked[id(flow)] = entry

    def _close(self, key: Hashable) -> None:
        """Closed through the API: the core ends the flow (and its session when it was the
        last one on it), as if it had gone idle."""
        self.core.end(key, "closed")
        self.drain()

    def execute_all(
        self,
        commands: list[Command],
        write: Callable[[bytes], None],
        write_datagrams: Callable[[Hashable, list[bytes]], None] | None = None,
    ) -> None:
        """Carry out `commands`, `write` taking the packets and `write_datagrams` each run of
        one flow's `WriteDatagram`s, in order (what reaches the application keeps the order
        it came in). A session's datagrams go to it as one burst (`send_many`), which a socket
        sends in as few system calls as the kernel allows (ztun.runtime.udpio): in order
        within each session, and before any open or close that follows them; other sessions'
        datagrams and the packets may go first."""
        bursts: dict[Hashable, list[tuple[Address, bytes]]] = {}
        i, n = 0, len(commands)
        while i < n:
            c = commands[i]
            i += 1
            kind = type(c)
            if kind is SendDatagram:
                burst = bursts.get(c.key)  # type: ignore[union-attr]
                if burst is None:
                    bursts[c.key] = [(c.dest, c.payload)]  # type: ignore[union-attr]
                else:
                    burst.append((c.dest, c.payload))  # type: ignore[union-attr]
            elif kind is WriteDatagram:
                key, payloads = c.key, [c.payload]  # type: ignore[union-attr]
                while i < n and type(nxt := commands[i]) is WriteDatagram and nxt.key == key:  # type: ignore[union-attr]
                    payloads.append(nxt.payload)  # type: ignore[union-attr]
                    i += 1
                if write_datagrams is not None:
                    write_datagrams(key, payloads)
            elif kind is WritePacket:
                write(c.packet)  # type: ignore[union-attr]
            elif kind is FlowEnded:
                self.execute(c)
            else:  # opening or closing a session: what was sent before it goes first
                if bursts:
                    self._send_bursts(bursts)
                    bursts = {}
                self.execute(c)
        if bursts:
            self._send_bursts(bursts)

    def _send_bursts(self, bursts: dict[Hashable, list[tuple[Address, bytes]]]) -> None:
        for key, items in bursts.items():
            held = self.sessions.get(key)
            if held is None or held[1].closed:
                continue
            if len(items) == 1:
                held[1].send(*items[0])
            else:
                self.send_many(key, items)

    def send_many(self, key: Hashable, items: list[tuple[Address, bytes]]) -> None:
        held = self.sessions.get(key)
        if held is None or held[1].closed:
            return
        send_burst(held[1], items)

    def execute(self, c: Command) -> None:
        if isinstance(c, SendDatagram):
            held = self.sessions.get(c.key)
            if held is not None and not held[1].closed:
                held[1].send(c.dest, c.payload)
        elif isinstance(c, FlowEnded):
            f = c.flow
            if self._tracked:
                entry = self._tracked.pop(id(f), None)
                if entry is not None:
                    self.tracker.remove(entry)  # type: ignore[union-attr]
            if (f.end == "evicted" or (f.error or "").endswith("table is full")) and (
                LIMITER.allow((f.end, f.meta.inbound)) is None
            ):
                return  # a full table ends flows by the thousand: a line a second is enough
            log_flow(f, logging.DEBUG if c.quiet else logging.INFO)
        elif isinstance(c, OpenUdpSession):
            task = self.loop.create_task(self._open(c))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif isinstance(c, CloseUdpSession):
            held = self.sessions.get(c.key)
            if held is not None and held[0] == c.ident:
                del self.sessions[c.key]
                held[1].close()

    async def _open(self, c: OpenUdpSession) -> None:
        key, ident = c.key, c.ident
        outbound: Outbound = c.outbound
        if isinstance(outbound, LookupFirst):
            assert self.resolve is not None  # only an inbound with a resolver asks for one
            try:
                verdict = await self.resolve(c.flow, outbound)
            except Exception as e:  # a bug: the flow fails, never the runner
                self.core.open_failed(key, ident, f"routing failed: {e}", self.loop.time())
                self.drain()
                return
            if not self.core.routed(key, ident, verdict):
                self.drain()  # refused (its line is in `out`), or no longer wanted
                return
            outbound = verdict
        try:
            session = await outbound.open_udp(
                c.flow.meta,
                lambda src, payload: self.on_reply(key, src, payload),
                lambda why: self._ended(key, ident, outbound.tag, why),
            )
        except OutboundError as e:
            dropped = self.core.open_failed(key, ident, str(e), self.loop.time())
            limited(log, logging.WARNING, ("udp-open", outbound.tag),
                    "udp %s via %s: %s (%d datagram(s) dropped)",
                    c.flow.dest, outbound.tag, e, dropped)  # fmt: skip
            self.drain()
            return
        if self.core.opened(key, ident):
            self.sessions[key] = (ident, session)
            for uf in self.core.members(key):
                _set_chain(uf.flow, session)
        else:
            session.close()  # late: a newer session of this key, or none, is the live one
        self.drain()

    def _ended(self, key: Hashable, ident: int, tag: str, why: str) -> None:
        if why != "idle":  # a dead proxy or control connection: worth a line of its own
            limited(log, logging.WARNING, ("udp-ended", tag),
                    "udp via %s: session ended: %s", tag, why)  # fmt: skip
        held = self.sessions.get(key)
        if held is not None and held[0] == ident:
            del self.sessions[key]
        self.core.ended(key, ident, why)
        self.drain()

    def close_all(self) -> None:
        for _ident, session in self.sessions.values():
            session.close()
        self.sessions.clear()
        if self.tracker is not None:
            for entry in self._tracked.values():
                self.tracker.remove(entry)
        self._tracked.clear()


def _set_chain(flow: Flow, session: UdpSession) -> None:
    """Through a group, a flow's log line and its /connections entry name the member that
    carries it (the session's `chain`), as a TCP flow's do."""
    chain = getattr(session, "chain", None)
    if chain:
        flow.chain = chain
