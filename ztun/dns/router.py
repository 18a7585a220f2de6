"""The DNS router: walks the compiled `dns.rules` for one query and returns a DnsDecision.

The same rules, items and match state as route rules (ztun.route.rule); only the actions
differ: `route` names a DNS server, `reject` refuses (REFUSED, or no answer with method
drop), `predefined` answers with fixed records, and `route-options` (not final) gathers
options for whichever server answers. `dns.final` answers when no rule decides.

The query is described by a FlowMeta: `domain` is the asked name, `query_type` its type,
`inbound` and `source` where it came from, and `outbound` the outbound the flow that caused
the query was routed to, when there is one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ztun.route.action import DnsAction, DnsRoute, DnsRouteOptions, Predefined, Reject
from ztun.route.metadata import FlowMeta
from ztun.route.rule import DefaultRule, LogicalRule, MatchState

Rule = DefaultRule | LogicalRule


@dataclass(frozen=True, slots=True)
class DnsDecision:
    """What to do with one query. Exactly one of `server`, `reject` and `predefined` is set.

    `rule_index` is the index in `dns.rules` of the rule that decided, None when `dns.final`
    applies. The options (`disable_cache`, `rewrite_ttl`, `strategy`) matter with `server`.
    """

    server: str | None
    reject: Reject | None
    predefined: Predefined | None
    rule_index: int | None
    rule: str
    disable_cache: bool = False
    rewrite_ttl: int | None = None
    strategy: str | None = None
    #: every rule that matched on the way (route-options ones too), as (index, text)
    trace: tuple[tuple[int, str], ...] = ()

    @property
    def action(self) -> DnsRoute | Reject | Predefined:
        if self.reject is not None:
            return self.reject
        if self.predefined is not None:
            return self.predefined
        return DnsRoute(self.server or "", self.disable_cache, self.rewrite_ttl, self.strategy)


@dataclass(frozen=True, slots=True)
class DnsExplanation:
    """`DnsDecision` plus the human reasons, for `ztun route`-style output."""

    decision: DnsDecision
    reasons: tuple[str, ...]


@dataclass(slots=True)
class _Options:
    disable_cache: bool = False
    rewrite_ttl: int | None = None
    strategy: str | None = None

    def merge(self, action: DnsRoute | DnsRouteOptions) -> None:
        # A later rule overrides what it sets; disable_cache only ever turns on.
        self.disable_cache = self.disable_cache or action.disable_cache
        if action.rewrite_ttl is not None:
            self.rewrite_ttl = action.rewrite_ttl
        if action.strategy is not None:
            self.strategy = action.strategy


class DnsRouter:
    """Compiled DNS rules plus the final server. Thread-safe: a match keeps its state local."""

    __slots__ = ("_final_decision", "final", "owner_needs", "rules", "server_types")

    def __init__(
        self, rules: Sequence[Rule], final: str, server_types: Mapping[str, str] | None = None
    ) -> None:
        self.rules = list(rules)
        self.final = final
        #: server tag → type (udp, tls, fakeip, ...), for callers that print decisions
        self.server_types = dict(server_types or {})
        #: what the rules ask of a query's local owner, as `Router.owner_needs`
        self.owner_needs: frozenset[str] = frozenset()
        self._final_decision = DnsDecision(final, None, None, None, "final")

    def decide(self, meta: FlowMeta, *, allow_fakeip: bool = True) -> DnsDecision:
        """The decision for the query `meta` describes: the first final action that matches,
        with the route-options gathered before it; `dns.final` when none does.

        `allow_fakeip=False` (ztun's own lookups, for an outbound connecting to a name) passes
        over rules that pick a fakeip server, as sing-box does: a FakeIP answer there would
        send the connection back into the TUN."""
        options = _Options()
        trace: list[tuple[int, str]] = []
        state = MatchState()
        for index, rule in enumerate(self.rules):
            state.reset()
            if not rule.match(meta, state):
                continue
            action: DnsAction | None = rule.action  # type: ignore[assignment]
            trace.append((index, rule.text))
            if isinstance(action, DnsRouteOptions):
                options.merge(action)
                continue
            if isinstance(action, Reject):
                return DnsDecision(None, action, None, index, rule.text, trace=tuple(trace))
            if isinstance(action, Predefined):
                return DnsDecision(None, None, action, index, rule.text, trace=tuple(trace))
            if isinstance(action, DnsRoute):
                if not allow_fakeip and self.server_types.get(action.server) == "fakeip":
                    trace.pop()
                    continue
                options.merge(action)
                return DnsDecision(
                    action.server, None, None, index, rule.text, options.disable_cache,
                    options.rewrite_ttl, options.strategy, tuple(trace),
                )  # fmt: skip
        if not trace:
            return self._final_decision
        return DnsDecision(
            self.final, None, None, None, "final", options.disable_cache, options.rewrite_ttl,
            options.strategy, tuple(trace),
        )  # fmt: skip

    def explain(self, meta: FlowMeta) -> DnsExplanation:
        """`decide` plus why each matching rule matched."""
        decision = self.decide(meta)
        reasons = []
        for index, _text in decision.trace:
            rule = self.rules[index]
            reasons.append(f"rule {index} ({rule.action}): {rule.explain(meta)}")
        if decision.rule_index is None:
            reasons.append(f"no rule decided, so dns.final '{self.final}' applies")
        return DnsExplanation(decision, tuple(reasons))
