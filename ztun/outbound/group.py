"""What the group outbounds (`selector`, `urltest`) share: a member chosen now, flows carried
through it, and the flows of a member the group left ended on request.

Owns: `GroupOutbound` (the `Outbound` interface delegated to the member in use, with its
capabilities read from that member, so a group of blocks refuses like a block), the table of
the flows open through each member (TCP sockets and UDP sessions, held weakly: a flow that
ends leaves it by itself), `interrupt_exist_connections`, and `chain` (the members a flow went
through, for the Clash API's `chains` and `ztun route`).

What the member is now is the subclass's (selector: a hand-made choice; urltest: the choice
of `ztun.outbound.choice`). Groups may contain groups; `ztun check` refuses cycles.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from ztun.address import Address
from ztun.errors import ZtunError
from ztun.outbound.base import (
    CloseHandler,
    Counters,
    DatagramHandler,
    Outbound,
    UdpSession,
    send_burst,
)
from ztun.route.metadata import FlowMeta
from ztun.runtime.netio import Handover

log = logging.getLogger("ztun")


class GroupOutbound:
    """An outbound that carries each flow through one of its members."""

    type = ""
    #: Clash's name of the group type (`/proxies`)
    clash_type = ""

    def __init__(self, tag: str, members: tuple[str, ...], interrupt: bool) -> None:
        self.tag = tag
        self.member_tags = members
        self.interrupt_exist_connections = interrupt
        self.counters = Counters()
        #: member tag → outbound; filled by `bind` once every outbound exists
        self.members: dict[str, Outbound] = {}
        #: live TCP sockets → (member tag, how to end the flow: set by `attach`, else None)
        self._sockets: weakref.WeakKeyDictionary[socket.socket, list[Any]] = (
            weakref.WeakKeyDictionary()
        )
        #: live UDP sessions opened through this group
        self._sessions: weakref.WeakSet[GroupUdpSession] = weakref.WeakSet()

    def bind(self, outbounds: Mapping[str, Outbound]) -> None:
        """Resolve the member tags (`ztun check` makes sure they exist; this says so too)."""
        missing = [tag for tag in self.member_tags if tag not in outbounds]
        if missing:
            raise ZtunError(f"group {self.tag!r}: no outbound tagged {missing[0]!r}")
        self.members = {tag: outbounds[tag] for tag in self.member_tags}

    # -- the choice -----------------------------------------------------------------------

    @property
    def now(self) -> str:
        """The member a new flow gets now."""
        raise NotImplementedError

    def member(self) -> Outbound:
        return self.members[self.now]

    def now_chain(self) -> tuple[str, ...]:
        """The members a new flow would go through now, this group first."""
        inner = self.member()
        more = inner.now_chain() if isinstance(inner, GroupOutbound) else (inner.tag,)
        return (self.tag, *more)

    @property
    def refuses_tcp(self) -> bool:
        return self.member().refuses_tcp

    @property
    def drops_udp(self) -> bool:
        return self.member().drops_udp

    @property
    def resolves_remotely(self) -> bool:
        return self.member().resolves_remotely

    def touch(self) -> None:
        """A flow is using the group (urltest: probing runs while it is used)."""

    def switched(self, old: str, new: str, why: str) -> None:
        """The choice moved from `old` to `new`: log it, and end the old member's flows when
        the group is told to."""
        log.info("group %s: %s → %s (%s)", self.tag, old, new, why)
        if self.interrupt_exist_connections and old != new:
            ended = self.interrupt(old, f"group {self.tag!r} switched to {new!r}")
            if ended:
                log.info("group %s: ended %d flow(s) through %s", self.tag, ended, old)

    def interrupt(self, member: str, why: str) -> int:
        """End every flow open through `member`; how many."""
        count = 0
        for sock, held in list(self._sockets.items()):
            if held[0] != member or sock.fileno() < 0:
                continue
            count += 1
            close = held[1]
            if close is not None:
                close()  # the relay ends the flow (and logs it) in its own layer
            else:  # a socket no relay took over (a DNS transport's, say): cut it
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            del self._sockets[sock]
        for session in list(self._sessions):
            if session.member_tag == member and not session.closed:
                count += 1
                session.end(why)
        return count

    # -- flows ----------------------------------------------------------------------------

    async def connect_tcp(
        self, dest: Address, meta: FlowMeta, handover: Handover | None = None
    ) -> socket.socket:
        self.touch()
        self.counters.tcp_flows += 1
        tag, sock = await self._connect(dest, meta, handover)
        self._sockets[sock] = [tag, None]
        return sock

    async def _connect(
        self, dest: Address, meta: FlowMeta, handover: Handover | None
    ) -> tuple[str, socket.socket]:
        """(member tag, socket) of a connection through the member in use (urltest: with
        another try through the next live member when the first is found dead)."""
        tag = self.now
        return tag, await self.members[tag].connect_tcp(dest, meta, handover)

    def attach(self, sock: socket.socket, close: Callable[[], None]) -> tuple[str, ...]:
        """The dispatcher relays `sock` and ends that flow with `close`: what `interrupt`
        calls (down through inner groups too). The flow's chain, this group first."""
        held = self._sockets.get(sock)
        if held is None:
            return (self.tag,)
        held[1] = close
        inner = self.members.get(held[0])
        if isinstance(inner, GroupOutbound):
            return (self.tag, *inner.attach(sock, close))
        return (self.tag, held[0])

    async def open_udp(
        self, meta: FlowMeta, on_datagram: DatagramHandler, on_close: CloseHandler
    ) -> UdpSession:
        self.touch()
        self.counters.udp_sessions += 1
        tag = self.now
        session = GroupUdpSession(self.tag, tag, on_close)
        member = self.members[tag]
        session.inner = await member.open_udp(meta, on_datagram, session.closed_by_member)
        self._sessions.add(session)
        return session

    async def close(self) -> None:
        return None


class GroupUdpSession:
    """A member's UDP session, as the group hands it out: the group can end it."""

    def __init__(self, group_tag: str, member_tag: str, on_close: CloseHandler) -> None:
        self.group_tag = group_tag
        self.member_tag = member_tag
        self.on_close = on_close
        self.inner: UdpSession | None = None
        self._ended = False

    @property
    def closed(self) -> bool:
        return self._ended or self.inner is None or self.inner.closed

    @property
    def chain(self) -> tuple[str, ...]:
        """The group and the member carrying the session (down through inner groups), as
        `GroupOutbound.attach` gives a TCP flow's."""
        inner = self.inner
        if isinstance(inner, GroupUdpSession):
            return (self.group_tag, *inner.chain)
        return (self.group_tag, self.member_tag)

    def send(self, dest: Address, payload: bytes) -> None:
        if self.inner is not None:
            self.inner.send(dest, payload)

    def send_many(self, items: list[tuple[Address, bytes]]) -> None:
        if self.inner is not None:
            send_burst(self.inner, items)

    def closed_by_member(self, why: str) -> None:
        if not self._ended:
            self._ended = True
            self.on_close(why)

    def end(self, why: str) -> None:
        """Ended by the group: the member's session closes, its owner hears `why`."""
        if self._ended:
            return
        self._ended = True
        if self.inner is not None:
            self.inner.close()
        self.on_close(why)

    def close(self) -> None:
        self._ended = True
        if self.inner is not None:
            self.inner.close()
