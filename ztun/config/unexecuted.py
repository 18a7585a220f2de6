"""Config fields the schema accepts but `ztun run` does not carry out yet.

The one table of them: `ztun check` turns every use into a warning at its file:line:col, and
`ztun run` logs the same warnings once at start. When a later change makes one of these work,
it deletes its entry here (and the matching sentence in docs/config.md).

Pure: data in, (path, message) pairs out; never raises, whatever shape the data has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ztun.config.validate import format_path
from ztun.errors import ConfigPath

__all__ = ["NOT_EXECUTED", "NotExecuted", "not_executed"]

#: Where a key sits: "config" (top level), "route", "rule" (a route rule, nested logical ones
#: too), "rule-set rule" (a rule of an inline route.rule_set), or an inbound type ("tun").
Context = str

#: Given the whole config and the mapping holding the key: True when the field does act.
Condition = Callable[[Mapping[str, Any], Mapping[str, Any]], bool]

_ANY = object()


@dataclass(frozen=True, slots=True)
class NotExecuted:
    """One accepted-but-not-executed feature: `key` in `context` (only `value`, if given)."""

    context: Context
    key: str
    #: what ztun run does instead, one clause
    instead: str
    #: only this value (or a list holding it) is not executed
    value: object = _ANY
    #: the field does act when this holds
    unless: Condition | None = None

    def message(self, path: ConfigPath) -> str:
        """The warning for a use at `path`: one sentence, starting with the config path."""
        what = "accepted"
        if self.value is not _ANY:
            value = self.value
            shown = ("true" if value else "false") if isinstance(value, bool) else str(value)
            what = f"{shown} is accepted"
        return f"{format_path(path)}: {what} but not yet executed by `ztun run`: {self.instead}"


def _tun_auto_route(config: Mapping[str, Any], inbound: Mapping[str, Any]) -> bool:
    del config
    return inbound.get("auto_route") is True


def _any_tun_auto_route(config: Mapping[str, Any], route: Mapping[str, Any]) -> bool:
    del route
    inbounds = config.get("inbounds")
    return isinstance(inbounds, list) and any(
        isinstance(i, Mapping) and i.get("type") == "tun" and i.get("auto_route") is True
        for i in inbounds
    )


NOT_EXECUTED: tuple[NotExecuted, ...] = (
    # ICMP never reaches the router: the tun inbound answers or drops echo requests itself
    NotExecuted(
        "rule",
        "network",
        "ICMP is never routed (the tun inbound's `icmp` option "
        "answers or drops echo requests), so it never matches",
        value="icmp",
    ),
    NotExecuted(
        "rule-set rule",
        "network",
        "ICMP is never routed (the tun inbound's `icmp` "
        "option answers or drops echo requests), so it never matches",
        value="icmp",
    ),
    # rule actions
    NotExecuted("rule", "method", "it refuses like `default`", value="reply"),
    NotExecuted("rule", "no_drop", "ztun never switches rejections to silent drop"),
    NotExecuted("rule", "udp_timeout", "UDP flows use the inbound's idle timeout"),
    NotExecuted("rule", "udp_connect", "UDP sockets are used as the outbound opens them"),
    # route options
    NotExecuted(
        "route",
        "default_mark",
        "it is only the fwmark of a tun inbound's auto_route, and no tun inbound has auto_route",
        unless=_any_tun_auto_route,
    ),
    # tun options that only shape auto_route
    NotExecuted(
        "tun", "strict_route", "it only changes auto_route, which is off", unless=_tun_auto_route
    ),
    NotExecuted(
        "tun", "route_address", "it only changes auto_route, which is off", unless=_tun_auto_route
    ),
    NotExecuted(
        "tun",
        "route_exclude_address",
        "it only changes auto_route, which is off",
        unless=_tun_auto_route,
    ),
)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _rules(rules: Any, path: ConfigPath) -> Iterator[tuple[Mapping[str, Any], ConfigPath]]:
    """Every rule of a list with its path, nested logical rules included, in order."""
    stack = [(rule, (*path, i)) for i, rule in enumerate(_list(rules))]
    stack.reverse()
    while stack:
        rule, rule_path = stack.pop()
        if not isinstance(rule, Mapping):
            continue
        yield rule, rule_path
        if rule.get("type") == "logical":
            subs = enumerate(_list(rule.get("rules")))
            nested = [(sub, (*rule_path, "rules", i)) for i, sub in subs]
            stack.extend(reversed(nested))


def _places(
    config: Mapping[str, Any],
) -> Iterator[tuple[Context, Mapping[str, Any], ConfigPath]]:
    """Every mapping the table can name, with its context and path."""
    yield "config", config, ()
    route = config.get("route")
    if isinstance(route, Mapping):
        yield "route", route, ("route",)
        for rule, path in _rules(route.get("rules"), ("route", "rules")):
            yield "rule", rule, path
        for index, rule_set in enumerate(_list(route.get("rule_set"))):
            if isinstance(rule_set, Mapping) and rule_set.get("type") == "inline":
                base: ConfigPath = ("route", "rule_set", index, "rules")
                for rule, path in _rules(rule_set.get("rules"), base):
                    yield "rule-set rule", rule, path
    for index, inbound in enumerate(_list(config.get("inbounds"))):
        if isinstance(inbound, Mapping) and isinstance(inbound.get("type"), str):
            yield str(inbound["type"]), inbound, ("inbounds", index)


def not_executed(config: Any) -> list[tuple[ConfigPath, str]]:
    """Each place `config` uses a feature of NOT_EXECUTED: its path and the warning text.

    The path is the key, or the list item holding a value the entry names.
    """
    if not isinstance(config, Mapping):
        return []
    by_context: dict[Context, list[NotExecuted]] = {}
    for entry in NOT_EXECUTED:
        by_context.setdefault(entry.context, []).append(entry)
    found: list[tuple[ConfigPath, str]] = []
    for context, mapping, path in _places(config):
        for entry in by_context.get(context, ()):
            if mapping.get(entry.key) in (None, [], {}):
                continue  # absent, or written empty: nothing to execute
            if entry.unless is not None and entry.unless(config, mapping):
                continue
            value = mapping[entry.key]
            key_path = (*path, entry.key)
            if entry.value is _ANY:
                found.append((key_path, entry.message(key_path)))
            elif isinstance(value, list):
                for i, item in enumerate(value):
                    if item == entry.value and type(item) is type(entry.value):
                        found.append(((*key_path, i), entry.message(key_path)))
            elif value == entry.value and type(value) is type(entry.value):
                found.append((key_path, entry.message(key_path)))
    return found
