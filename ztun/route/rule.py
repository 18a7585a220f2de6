"""Rules: how the items of one rule combine, with sing-box's semantics.

A default rule sorts its items into groups: source address, source port, destination address
(domains, `ip_cidr`, `ip_is_private`, `geoip` together) and destination port. Items within a
group are OR'ed; the groups and every other item (network, inbound, rule_set, ...) are AND'ed;
then `invert` applies. A logical rule combines whole rules with `and` / `or`.

sing-box keeps "this group already matched" flags in the flow's context so that a `rule_set`
inside a rule adds its entries to the outer rule's groups. ztun does the same, but the flags
live in a `MatchState` owned by the match call, never in the flow's metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ztun.route.action import Action, DnsAction
from ztun.route.items import RuleItem, RuleSetItem
from ztun.route.metadata import FlowMeta


class MatchState:
    """Scratch for one top-level rule match (sing-box's rule cache); reset before each rule."""

    __slots__ = (
        "destination_address",
        "destination_port",
        "did_match",
        "ip_cidr_match_source",
        "source_address",
        "source_port",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.source_address = False
        self.source_port = False
        self.destination_address = False
        self.destination_port = False
        self.did_match = False
        self.ip_cidr_match_source = False


@dataclass
class ItemGroups:
    """A rule's items, sorted into sing-box's groups."""

    source_address: list[RuleItem] = field(default_factory=list)
    source_port: list[RuleItem] = field(default_factory=list)
    destination_address: list[RuleItem] = field(default_factory=list)
    destination_port: list[RuleItem] = field(default_factory=list)
    other: list[RuleItem] = field(default_factory=list)

    def all(self) -> list[RuleItem]:
        return [
            *self.source_address,
            *self.source_port,
            *self.destination_address,
            *self.destination_port,
            *self.other,
        ]


def _first_hit(items: Sequence[RuleItem], meta: FlowMeta, state: MatchState) -> bool:
    # A plain loop: a generator in any() costs more than the items themselves here.
    for item in items:  # noqa: SIM110 - faster than any() with a generator
        if item.match(meta, state):
            return True
    return False


class DefaultRule:
    """A rule of match fields (no `type`, or `type: default`)."""

    __slots__ = (
        "_da", "_dp", "_only_da", "_other", "_sa", "_sp", "action", "groups", "invert", "text",
    )  # fmt: skip

    def __init__(
        self, groups: ItemGroups, *, invert: bool = False,
        action: Action | DnsAction | None = None, text: str = "",
    ) -> None:  # fmt: skip
        self.groups = groups
        self._sa = tuple(groups.source_address)
        self._sp = tuple(groups.source_port)
        self._da = tuple(groups.destination_address)
        self._dp = tuple(groups.destination_port)
        self._other = tuple(groups.other)
        # Most rule-set rules test only the destination (domains, CIDRs): give them a short path.
        self._only_da = bool(self._da) and not (self._sa or self._sp or self._dp or self._other)
        self.invert = invert
        self.action = action
        self.text = text or self.describe()

    @property
    def is_catch_all(self) -> bool:
        """True when the rule has no conditions, so it matches every flow."""
        return not self.invert and not (self._sa or self._sp or self._da or self._dp or self._other)

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        if self._only_da:
            if not state.destination_address:
                state.did_match = True
                for item in self._da:
                    if item.match(meta, state):
                        state.destination_address = True
                        break
                else:
                    return self.invert
            return not self.invert
        sa, sp, da, dp = self._sa, self._sp, self._da, self._dp
        if not (sa or sp or da or dp or self._other):
            return True
        if sa and not state.source_address:
            state.did_match = True
            if _first_hit(sa, meta, state):
                state.source_address = True
        if sp and not state.source_port:
            state.did_match = True
            if _first_hit(sp, meta, state):
                state.source_port = True
        if da and not state.destination_address:
            state.did_match = True
            if _first_hit(da, meta, state):
                state.destination_address = True
        if dp and not state.destination_port:
            state.did_match = True
            if _first_hit(dp, meta, state):
                state.destination_port = True
        for item in self._other:
            if not isinstance(item, RuleSetItem):
                state.did_match = True
            if not item.match(meta, state):
                return self.invert
        if (
            (sa and not state.source_address)
            or (sp and not state.source_port)
            or (da and not state.destination_address)
            or (dp and not state.destination_port)
        ):
            return self.invert
        if not state.did_match:
            return True
        return not self.invert

    def explain(self, meta: FlowMeta) -> str:
        """Why this rule matches `meta`, in config words (call after `match` returned True)."""
        if self.invert:
            return "no condition holds, and the rule is inverted"
        reasons: list[str] = []
        groups = (self._sa, self._sp, self._da, self._dp)
        for group in groups:
            for item in group:
                why = item.explain(meta, MatchState())
                if why:
                    reasons.append(why)
                    break
        for item in self._other:
            why = item.explain(meta, MatchState())
            if why:
                reasons.append(why)
        return "; ".join(reasons) if reasons else "the rule has no conditions"

    def describe(self) -> str:
        parts = [str(item) for item in self.groups.all()]
        if self.invert:
            parts.append("invert=true")
        return " ".join(p for p in parts if p) or "(matches everything)"

    def __str__(self) -> str:
        return self.text


class LogicalRule:
    """`{type: logical, mode: and|or, rules: [...]}`; each sub-rule starts with fresh state."""

    __slots__ = ("action", "invert", "mode", "rules", "text")

    def __init__(
        self, mode: str, rules: Sequence[DefaultRule | LogicalRule], *, invert: bool = False,
        action: Action | DnsAction | None = None, text: str = "",
    ) -> None:  # fmt: skip
        self.mode = mode
        self.rules = list(rules)
        self.invert = invert
        self.action = action
        self.text = text or self.describe()

    @property
    def is_catch_all(self) -> bool:
        if self.invert:
            return False
        if self.mode == "and":
            return all(r.is_catch_all for r in self.rules)
        return any(r.is_catch_all for r in self.rules)

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        if self.mode == "and":
            for rule in self.rules:
                state.reset()
                if not rule.match(meta, state):
                    return self.invert
            return not self.invert
        for rule in self.rules:
            state.reset()
            if rule.match(meta, state):
                return not self.invert
        return self.invert

    def explain(self, meta: FlowMeta) -> str:
        if self.invert:
            return f"no sub-rule combination holds for mode '{self.mode}', and the rule is inverted"
        parts = []
        state = MatchState()
        for index, rule in enumerate(self.rules):
            state.reset()
            if rule.match(meta, state):
                parts.append(f"rules[{index}]: {rule.explain(meta)}")
                if self.mode == "or":
                    break
        return f"{self.mode}(" + "; ".join(parts) + ")"

    def describe(self) -> str:
        inner = f" {self.mode} ".join(f"({r.describe()})" for r in self.rules)
        return f"not ({inner})" if self.invert else inner

    def __str__(self) -> str:
        return self.text


HeadlessRule = DefaultRule | LogicalRule
