"""A flow's record (what its log line says) and how a routing verdict reaches an inbound core.

Owns: `Flow`, the one record per flow from its first packet or request to its log line;
`Refused`, a verdict that ends a flow before any outbound sees it; and `Decide`, the signature
of the routing step an inbound core is handed (the I/O layer's dispatcher implements it over the
pure router, so the core decides synchronously on the first packet and never awaits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ztun.address import NAME_REFUSALS, Address
from ztun.route.action import Decision
from ztun.route.metadata import FlowMeta
from ztun.sniff import ALL as ALL_SNIFFERS
from ztun.sniff import Sniffed, sniff_datagram


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
    #: where the rule walk goes on after a `sniff` rule (or an owner lookup), and the route
    #: options gathered so far; `walked_by`: the router that walk was on (a reload between
    #: the steps starts the walk again on the new rules)
    resume_at: int = 0
    gathered: dict[str, object] | None = None
    walked_by: object = None
    #: the first bytes were sniffed (later `sniff` rules are passed over)
    sniffed: bool = False
    #: how the flow's domain became known for an IP destination: "reverse" (an earlier DNS
    #: answer), "fakeip" (the destination is a FakeIP address) or "sniff"; None otherwise
    domain_from: str | None = None
    #: the flow's local owner was looked up (or needs none): `LookupFirst` is not asked again
    identified: bool = False
    #: through a group outbound: the groups and the member it went through, outermost first
    chain: tuple[str, ...] = ()

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


@dataclass(frozen=True, slots=True)
class SniffFirst:
    """A `sniff` rule matched: route again once the flow's first bytes were sniffed with
    `sniffers` (empty: all), waiting at most `timeout` seconds for them."""

    sniffers: tuple[str, ...]
    timeout: float
    override_destination: bool = False


@dataclass(frozen=True, slots=True)
class LookupFirst:
    """The rules need the flow's local owner (process, user): look it up off the packet path
    (the dispatcher's `identify`), then route again. `payload` is a UDP flow's first datagram,
    for a `sniff` rule after the lookup."""

    payload: bytes = b""


def apply_sniffed(flow: Flow, found: Sniffed | None, override_destination: bool = False) -> None:
    """Record what sniffing found (protocol, domain) for the next routing step; sniffing ran
    even when it found nothing, so the walk goes on past the sniff rule. With
    `override_destination` the flow goes to the sniffed domain instead of its IP."""
    flow.sniffed = True
    if found is None:
        return
    if found.bad_name:
        # An invalid name is "no domain", never a match; counted once per flow.
        NAME_REFUSALS[f"sniff-{found.protocol}"] += 1
    changes: dict[str, object] = {"protocol": found.protocol}
    if found.domain:
        # A name the client itself sent (SNI, Host) is more precise than a reverse mapping.
        changes["domain"] = found.domain
        flow.domain_from = "sniff"
        if override_destination:
            flow.dest = Address(found.domain, flow.dest.port)
    flow.meta = replace(flow.meta, **changes)  # type: ignore[arg-type]


def decide_datagram(decide: Decide, flow: Flow, network: str, payload: bytes) -> Any:
    """Route a UDP flow on its first datagram, sniffing that datagram when a rule asks."""
    verdict = decide(flow, network)
    if isinstance(verdict, LookupFirst):
        return LookupFirst(payload)
    if isinstance(verdict, SniffFirst):
        found = sniff_datagram(payload, verdict.sniffers or ALL_SNIFFERS)
        apply_sniffed(flow, found, verdict.override_destination)
        verdict = decide(flow, network)
        if isinstance(verdict, LookupFirst):  # a rule after the sniff reads the owner
            return LookupFirst(payload)
    return verdict


#: The routing step: fills `flow.decision`, `flow.outbound` (and `flow.dest` after route
#: options) and returns the outbound to use (opaque to the cores), `Refused`, `SniffFirst`
#: (sniff, then call it again) or `LookupFirst` (find the owner, then call it again).
#: `network` is "tcp" or "udp": an outbound that refuses a network (block) gives `Refused`.
Decide = Callable[[Flow, str], "Any | Refused | SniffFirst | LookupFirst"]
