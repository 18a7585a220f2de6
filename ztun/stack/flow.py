"""A flow's record (what its log line says) and how a routing verdict reaches an inbound core.

Owns: `Flow`, the one record per flow from its first packet or request to its log line;
`Refused`, a verdict that ends a flow before any outbound sees it; and `Decide`, the signature
of the routing step an inbound core is handed (the I/O layer's dispatcher implements it over the
pure router, so the core decides synchronously on the first packet and never awaits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ztun.address import Address
from ztun.route.action import Decision
from ztun.route.metadata import FlowMeta

#: How a flow ended, as its log line says it (`end=`).
End = Literal[
    "", "closed", "idle", "reset", "failed", "blocked", "evicted", "cancelled", "timeout"
]


@dataclass(slots=True)
class Flow:
    """One flow, from its first packet or request to its log line.

    `started` is the monotonic time the flow began (the caller's `now`); `outbound` the tag
    (or action text) it was given; `up`/`down` the payload bytes moved each way.
    """

    meta: FlowMeta
    dest: Address
    started: float
    decision: Decision | None = None
    outbound: str | None = None
    up: int = 0
    down: int = 0
    end: str = ""
    error: str | None = None

    @property
    def rule(self) -> str:
        d = self.decision
        if d is None:
            return "-"
        return "final" if d.rule_index is None else f"{d.rule_index}"


@dataclass(frozen=True, slots=True)
class Refused:
    """The flow is not to be opened: `drop` silently, or answered (TCP RST, ICMP port
    unreachable, a SOCKS5/HTTP error) with `reason` in its log line."""

    reason: str
    drop: bool = False


#: The routing step: fills `flow.decision`, `flow.outbound` (and `flow.dest` after route
#: options) and returns the outbound to use (opaque to the cores) or `Refused`. `network` is
#: "tcp" or "udp": an outbound that refuses a network (block) gives `Refused` here.
Decide = Callable[[Flow, str], "Any | Refused"]
