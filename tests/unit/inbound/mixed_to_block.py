"""A mixed inbound on 127.0.0.1 (port chosen by the kernel) whose route blocks every flow:
the handshake, auth and UDP ASSOCIATE tests talk to it over real sockets, and what they check
ends before any outbound would connect."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ztun.config.options import BlockOutboundOptions, MixedInboundOptions, build
from ztun.inbound.mixed import MixedInbound
from ztun.outbound.block import BlockOutbound
from ztun.route.action import Decision, Route
from ztun.route.metadata import FlowMeta
from ztun.runtime.dispatch import Dispatcher


class ToBlock:
    """A router whose one decision is `route.final: block`; `seen` is what it was asked."""

    final = "block"

    def __init__(self) -> None:
        self.seen: list[FlowMeta] = []

    def decide(
        self, meta: FlowMeta, start: int = 0, options: dict[str, object] | None = None,
        owner_known: bool = True,
    ) -> Decision:  # fmt: skip
        self.seen.append(meta)
        return Decision(Route("block"), None, "final")


def mixed_to_block(
    config: Mapping[str, object] | None = None,
    *,
    udp_idle_timeout: float | None = None,
    **inbound: float,
) -> MixedInbound:
    """The inbound: `config` adds to its options (users, …), `udp_idle_timeout` goes to the
    dispatcher, `inbound` to MixedInbound (its handshake bounds)."""
    block = BlockOutbound(build(BlockOutboundOptions, {"tag": "block"}))
    extra: dict[str, Any] = {}
    if udp_idle_timeout is not None:
        extra["udp_idle_timeout"] = udp_idle_timeout
    dispatcher = Dispatcher(ToBlock(), {"block": block}, **extra)
    data = {"tag": "mixed-in", "listen": "127.0.0.1", "listen_port": 0, **(config or {})}
    return MixedInbound(build(MixedInboundOptions, data), dispatcher, **inbound)
