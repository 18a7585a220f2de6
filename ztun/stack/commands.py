"""What an inbound core asks its I/O layer to do: a closed vocabulary of small records.

A core appends these to its `out` list while it handles a packet or an event; the I/O layer
drains the list (the TUN's after up to 64 packets, so that a flow's datagrams leave as one
burst) and carries the commands out in order: each session's in the order given, an open or
close after what came before it. Nothing in a command is awaited by the core: results come
back as calls (`opened`, `open_failed`, `reply`, …).

The TCP forward path is not a command: `TunStack.receive` returns `FORWARD` and the I/O layer
writes its read buffer back as it is, so the per-packet path builds no objects.

The per-datagram commands (`WritePacket`, `WriteDatagram`, `SendDatagram`) are plain slotted
dataclasses, not frozen ones: a frozen one's `__init__` sets each field through
`object.__setattr__`, about four times the cost, once per datagram (bench_dns). Nothing
changes a command after it is made; the others stay frozen.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from ztun.address import Address
from ztun.stack.flow import Flow


@dataclass(slots=True)
class WritePacket:
    """Write one IP packet that ztun built into the TUN (every checksum complete, so with an
    all-zero virtio-net header where the device uses them)."""

    packet: bytes


@dataclass(slots=True)
class WriteDatagram:
    """Write `payload` into the TUN as a UDP datagram to the client of flow `key` (source,
    source port, destination, destination port, as the client sent them), from the flow's
    destination. Only on a TUN that takes UDP super-packets (`TunStack.uso`): the I/O layer
    joins a flow's consecutive ones into as few writes as it can (`TunStack.reply_packets`)."""

    key: tuple[bytes, int, bytes, int]
    payload: bytes


@dataclass(frozen=True, slots=True)
class OpenUdpSession:
    """Open a UDP session through `outbound` for `flow`; answer with `opened(key, ident)` or
    `open_failed(key, ident, …)`. `ident` tells a late answer from the current attempt."""

    key: Hashable
    ident: int
    flow: Flow
    outbound: Any


@dataclass(slots=True)
class SendDatagram:
    """Send `payload` to `dest` through the open session `key`."""

    key: Hashable
    dest: Address
    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseUdpSession:
    """Close session `key` (its last flow ended), or a session opened too late (`ident`)."""

    key: Hashable
    ident: int


@dataclass(frozen=True, slots=True)
class FlowEnded:
    """A flow ended: write its log line (`quiet`: at debug level, for the common idle ends)."""

    flow: Flow
    quiet: bool = False


Command = WritePacket | WriteDatagram | OpenUdpSession | SendDatagram | CloseUdpSession | FlowEnded
