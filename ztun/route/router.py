"""The router: walks the compiled rules for one flow and returns a Decision.

First matching rule with a final action wins; `route.final` applies when none does. Non-final
actions do not end the walk: `route-options` accumulates options, `sniff` hands control back to
the caller (who sniffs the first bytes and calls `decide` again from `resume_at`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ztun.route.action import Decision, NeedOwner, Route, RouteOptionsAction, Sniff
from ztun.route.items import ClashMode
from ztun.route.metadata import FlowMeta
from ztun.route.rule import DefaultRule, LogicalRule, MatchState

Rule = DefaultRule | LogicalRule
NEED_OWNER = NeedOwner()


@dataclass(frozen=True, slots=True)
class Explanation:
    """`Decision` plus the human reasons, for `ztun route`."""

    decision: Decision
    reasons: tuple[str, ...]


class Router:
    """Compiled rules plus the final outbound. Thread-safe: a match keeps its state local."""

    __slots__ = (
        "_final_decision", "_plain", "final", "first_owner_rule", "mode", "outbound_types",
        "owner_needs", "rules",
    )  # fmt: skip

    def __init__(
        self,
        rules: Sequence[Rule],
        final: str,
        outbound_types: dict[str, str] | None = None,
        mode: ClashMode | None = None,
    ) -> None:
        self.rules = list(rules)
        #: the Clash API's mode, which `clash_mode` items read (the API switches it)
        self.mode = mode if mode is not None else ClashMode()
        self.final = final
        #: outbound tag → type (direct, socks, block), for callers that print decisions
        self.outbound_types = dict(outbound_types or {})
        #: what the rules ask of a flow's local owner ("user", "process"; see compile.py):
        #: only a router with a need makes its inbounds look owners up
        self.owner_needs: frozenset[str] = frozenset()
        #: the first rule that reads the owner (len(rules): none). `decide(owner_known=False)`
        #: stops there, so a flow decided before it is never looked up (compile.py sets it).
        self.first_owner_rule = len(self.rules)
        # The decision of rule i when nothing matched before it is always the same object:
        # building a Decision per flow would cost as much as the match itself.
        self._plain: list[Decision | None] = []
        for index, rule in enumerate(self.rules):
            action = rule.action
            if action is None or isinstance(action, RouteOptionsAction):
                self._plain.append(None)
                continue
            options = dict(action.options) if isinstance(action, Route) else {}
            self._plain.append(
                Decision(action, index, rule.text, options, index + 1, ((index, rule.text),))
            )
        self._final_decision = Decision(Route(final), None, "final", {}, len(self.rules), ())

    def decide(
        self, meta: FlowMeta, start: int = 0, options: dict[str, object] | None = None,
        owner_known: bool = True,
    ) -> Decision:  # fmt: skip
        """The decision for `meta`, walking rules from index `start`.

        Stops at a `sniff` rule (returned as the Decision, with `resume_at`) so the caller can
        sniff; `options` carries route-options gathered before a resume. With `owner_known`
        False (the flow's local owner not looked up yet) it stops before the first rule that
        reads the owner, with a `NeedOwner` decision whose `resume_at` is that rule.
        """
        gathered: dict[str, object] = dict(options or {})
        trace: list[tuple[int, str]] = []
        state = MatchState()
        rules = self.rules
        end = len(rules)
        if not owner_known and self.first_owner_rule < end:
            end = max(self.first_owner_rule, start)
        for index in range(start, end):
            rule = rules[index]
            state.reset()
            if not rule.match(meta, state):
                continue
            if not trace and not gathered and (plain := self._plain[index]) is not None:
                return plain
            action = rule.action
            trace.append((index, rule.text))
            if isinstance(action, RouteOptionsAction):
                gathered.update(action.options)
                continue
            if isinstance(action, Sniff):
                return Decision(action, index, rule.text, gathered, index + 1, tuple(trace))
            if isinstance(action, Route) and action.options:
                gathered.update(action.options)
            assert action is not None  # compile gives every top-level rule an action
            return Decision(action, index, rule.text, gathered, index + 1, tuple(trace))
        if end < len(rules):  # stopped before a rule on the owner (owner_known False)
            return Decision(NEED_OWNER, end, rules[end].text, gathered, end, tuple(trace))
        if not trace and not gathered:
            return self._final_decision
        return Decision(Route(self.final), None, "final", gathered, len(rules), tuple(trace))

    def decide_all(self, meta: FlowMeta) -> Decision:
        """The decision when sniffing has nothing to add (metadata already complete)."""
        decision = self.decide(meta)
        if not isinstance(decision.action, Sniff):
            return decision
        trace = list(decision.trace)
        while isinstance(decision.action, Sniff):
            decision = self.decide(meta, decision.resume_at, decision.options)
            trace.extend(decision.trace)
        return Decision(
            decision.action, decision.rule_index, decision.rule, decision.options,
            decision.resume_at, tuple(trace),
        )  # fmt: skip

    def explain(self, meta: FlowMeta) -> Explanation:
        """`decide_all` plus why each matching rule matched."""
        decision = self.decide_all(meta)
        reasons = []
        for index, _text in decision.trace:
            rule = self.rules[index]
            reasons.append(f"rule {index} ({rule.action}): {rule.explain(meta)}")
        if decision.rule_index is None:
            reasons.append(f"no rule decided, so route.final '{self.final}' applies")
        return Explanation(decision, tuple(reasons))
