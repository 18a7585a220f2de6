"""Rule actions, in sing-box's vocabulary, and the Decision the router returns.

Final actions end the rule walk (`route`, `reject`, `hijack-dns`); non-final ones change how the
walk goes on (`sniff` asks the caller to sniff and resume, `route-options` accumulates options).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RejectMethod = Literal["default", "drop", "reply"]


@dataclass(frozen=True, slots=True)
class Route:
    outbound: str
    options: tuple[tuple[str, object], ...] = ()

    def __str__(self) -> str:
        return f"route({self.outbound})"


@dataclass(frozen=True, slots=True)
class Reject:
    method: RejectMethod = "default"
    no_drop: bool = False

    def __str__(self) -> str:
        return "reject" if self.method == "default" else f"reject({self.method})"


@dataclass(frozen=True, slots=True)
class HijackDNS:
    def __str__(self) -> str:
        return "hijack-dns"


@dataclass(frozen=True, slots=True)
class Sniff:
    """Non-final: the caller should sniff the first bytes, then resume the walk."""

    sniffers: tuple[str, ...] = ()
    timeout_ms: int = 300
    #: send the flow to the sniffed domain instead of its IP (sing-box's
    #: sniff_override_destination)
    override_destination: bool = False

    def __str__(self) -> str:
        return f"sniff({','.join(self.sniffers)})" if self.sniffers else "sniff"


@dataclass(frozen=True, slots=True)
class NeedOwner:
    """Non-final: the walk reached a rule on the flow's local owner (process, user) before
    the owner was looked up. The caller looks it up, then resumes at `resume_at` (that rule)."""

    def __str__(self) -> str:
        return "need-owner"


@dataclass(frozen=True, slots=True)
class RouteOptionsAction:
    """Non-final: options merged into the flow's decision (later rules override earlier)."""

    options: tuple[tuple[str, object], ...] = ()

    def __str__(self) -> str:
        return "route-options(" + ", ".join(f"{k}={v}" for k, v in self.options) + ")"


Action = Route | Reject | HijackDNS | Sniff | RouteOptionsAction | NeedOwner


# -- DNS rule actions (dns.rules): `reject` is the Reject above, with method default or drop --


@dataclass(frozen=True, slots=True)
class DnsRoute:
    """Ask `server` (a dns.servers tag); the options shape that one query."""

    server: str
    disable_cache: bool = False
    rewrite_ttl: int | None = None
    strategy: str | None = None

    def __str__(self) -> str:
        return f"route({self.server})"


@dataclass(frozen=True, slots=True)
class DnsRouteOptions:
    """Non-final: options for the query, whichever server answers it (later rules win)."""

    disable_cache: bool = False
    rewrite_ttl: int | None = None
    strategy: str | None = None

    def __str__(self) -> str:
        shown = [f"{k}={v}" for k, v in (("disable_cache", self.disable_cache),
                 ("rewrite_ttl", self.rewrite_ttl), ("strategy", self.strategy)) if v]  # fmt: skip
        return "route-options(" + ", ".join(shown) + ")"


@dataclass(frozen=True, slots=True)
class Predefined:
    """Answer at once with `rcode` and these records (zone-file text), asking no server."""

    rcode: str = "NOERROR"
    answer: tuple[str, ...] = ()
    ns: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()

    def __str__(self) -> str:
        records = len(self.answer) + len(self.ns) + len(self.extra)
        return f"predefined({self.rcode}, {records} records)" if records else (
            f"predefined({self.rcode})"
        )


DnsAction = DnsRoute | DnsRouteOptions | Reject | Predefined


@dataclass(frozen=True, slots=True)
class Decision:
    """What the router decided for a flow, and why.

    Decisions may be shared between flows: treat them, `options` included, as read-only.
    `rule_index` is the 0-based index in `route.rules` of the rule that decided, or None when
    no rule matched and `route.final` applies. When `action` is `Sniff`, the walk stopped to let
    the caller sniff: call `Router.decide` again with `start=resume_at` and the richer metadata.
    """

    action: Action
    rule_index: int | None
    rule: str
    options: dict[str, object] = field(default_factory=dict)
    resume_at: int = 0
    #: every rule that matched on the way (non-final ones too), as (index, text)
    trace: tuple[tuple[int, str], ...] = ()

    @property
    def outbound(self) -> str | None:
        return self.action.outbound if isinstance(self.action, Route) else None
