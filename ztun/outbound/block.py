"""The `block` outbound: TCP is refused at once, UDP is dropped; both are counted."""

from __future__ import annotations

import socket

from ztun.address import Address
from ztun.config.options import BlockOutboundOptions
from ztun.outbound.base import (
    CloseHandler,
    Counters,
    DatagramHandler,
    ErrorKind,
    OutboundError,
)
from ztun.route.metadata import FlowMeta
from ztun.runtime.netio import Handover


class BlockOutbound:
    type = "block"
    refuses_tcp = True
    resolves_remotely = False
    drops_udp = True

    def __init__(self, options: BlockOutboundOptions) -> None:
        self.options = options
        self.tag = options.tag
        self.counters = Counters()

    async def connect_tcp(
        self, dest: Address, meta: FlowMeta, handover: Handover | None = None
    ) -> socket.socket:
        self.counters.blocked_tcp += 1
        raise OutboundError(ErrorKind.BLOCKED, f"blocked by outbound {self.tag!r}")

    async def open_udp(
        self, meta: FlowMeta, on_datagram: DatagramHandler, on_close: CloseHandler
    ) -> BlockUdpSession:
        return BlockUdpSession(self.counters)

    async def close(self) -> None:
        return None


class BlockUdpSession:
    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.closed = False

    def send(self, dest: Address, payload: bytes) -> None:
        self.counters.blocked_udp += 1

    def close(self) -> None:
        self.closed = True
