"""The `block` outbound: TCP is refused at once, UDP is dropped; both are counted."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from ztun.address import Address
from ztun.outbound.base import CloseHandler, Counters, DatagramHandler, ErrorKind, OutboundError
from ztun.route.metadata import FlowMeta
from ztun.runtime.netio import Handover


class BlockOutbound:
    type = "block"

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.counters = Counters()

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> BlockOutbound:
        return cls(opts["tag"])

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
