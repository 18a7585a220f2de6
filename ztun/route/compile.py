"""Config data → compiled rules. The only code that knows rule field names.

Input is the (schema-validated) config data as plain dicts; output is a `Router`. Every value
the compiler rejects (a bad CIDR, regex, port range, an action without an outbound) becomes a
`Diagnostic` with the path of the offending field; compilation goes on so that one run reports
every mistake. Nothing here reads files: rule-set contents and the GeoIP database are handed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ztun.config.duration import parse_duration
from ztun.config.legacy_dns import is_legacy_server, legacy_server
from ztun.dns.router import DnsRouter
from ztun.errors import ConfigError, ConfigPath, Diagnostic
from ztun.route import regex
from ztun.route.action import (
    Action,
    DnsAction,
    DnsRoute,
    DnsRouteOptions,
    HijackDNS,
    Predefined,
    Reject,
    Route,
    RouteOptionsAction,
    Sniff,
)
from ztun.route.compact import PACKED_CIDRS, PACKED_DOMAINS, DomainTable, IPRangeSet
from ztun.route.items import (
    ClashMode,
    ClashModeItem,
    DomainItem,
    DomainKeywordItem,
    DomainRegexItem,
    FieldInItem,
    GeoIPItem,
    IPCIDRItem,
    IPIsPrivateItem,
    OutboundItem,
    PortItem,
    ProcessPathRegexItem,
    RuleItem,
    RuleSetItem,
    parse_port_range,
    parse_prefix,
)
from ztun.route.metadata import FlowMeta
from ztun.route.router import Router
from ztun.route.rule import DefaultRule, HeadlessRule, ItemGroups, LogicalRule, MatchState

if TYPE_CHECKING:
    from ztun.route.geoip import GeoIPDatabase

ROUTE_OPTION_FIELDS = ("override_address", "override_port", "udp_timeout", "udp_connect")
VALID_NETWORKS = frozenset({"tcp", "udp", "icmp"})
#: DNS query type names that `query_type` accepts besides numbers.
STRATEGIES = ("prefer_ipv4", "prefer_ipv6", "ipv4_only", "ipv6_only")
QUERY_TYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16,
               "AAAA": 28, "SRV": 33, "SVCB": 64, "HTTPS": 65, "ANY": 255}  # fmt: skip


def as_list(value: object) -> list[Any]:
    """sing-box's "listable": one value or a list of them."""
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


@dataclass
class _Compiler:
    rule_sets: Mapping[str, Sequence[HeadlessRule]]
    geoip: GeoIPDatabase | None
    report_references: bool
    #: the config names a GeoIP database that could not be opened (already reported)
    geoip_failed: bool = False
    #: compiling dns.rules: DNS actions, and `outbound` is a match item, not an action field
    dns: bool = False
    diagnostics: list[Diagnostic] = field(default_factory=list)
    #: the "google-re2 is missing" warning is given once per compile
    regex_fallback_warned: bool = False
    #: the Clash API's mode, shared by every `clash_mode` item of the router
    mode: ClashMode = field(default_factory=ClashMode)
    #: what the rules need to know of a flow's local owner: "user" (the socket's uid is
    #: enough) and/or "process" (its process too); empty: no flow pays for a lookup
    owner_needs: set[str] = field(default_factory=set)
    #: owner items compiled so far (a rule that raised it needs the owner), and the rule sets
    #: with such items (a rule naming one needs it too)
    owner_items: int = 0
    owner_sets: set[str] = field(default_factory=set)

    def error(self, message: str, path: ConfigPath) -> None:
        self.diagnostics.append(Diagnostic(message, path))

    def warn(self, message: str, path: ConfigPath) -> None:
        self.diagnostics.append(Diagnostic(message, path, severity="warning"))

    # -- items --------------------------------------------------------------------------------

    def _prefixes(self, values: list[Any], path: ConfigPath) -> list[str]:
        good = []
        for i, value in enumerate(values):
            try:
                parse_prefix(str(value))
                good.append(str(value))
            except ValueError:
                self.error(f"'{value}' is not an IP address or CIDR prefix", (*path, i))
        return good

    def _regexes(self, values: list[Any], path: ConfigPath) -> list[str]:
        good = []
        for i, value in enumerate(values):
            if (why := regex.pattern_error(str(value))) is None:
                good.append(str(value))
            else:
                self.error(f"'{value}' is not a regular expression sing-box accepts (RE2 "
                           f"syntax): {why}", (*path, i))  # fmt: skip
        if values and regex.ENGINE != "re2" and not self.regex_fallback_warned:
            self.regex_fallback_warned = True
            self.warn(regex.FALLBACK_WARNING, path)
        return good

    def _ports(self, rule: Mapping[str, Any], prefix: str, path: ConfigPath) -> RuleItem | None:
        ports: list[int] = []
        ranges: list[str] = []
        port_key, range_key = f"{prefix}port", f"{prefix}port_range"
        for i, value in enumerate(as_list(rule.get(port_key))):
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535:
                ports.append(value)
            else:
                self.error(f"'{value}' is not a port (0 to 65535)", (*path, port_key, i))
        for i, value in enumerate(as_list(rule.get(range_key))):
            try:
                parse_port_range(str(value))
                ranges.append(str(value))
            except ValueError as exc:
                self.error(str(exc), (*path, range_key, i))
        if not ports and not ranges:
            return None
        field_name = "source_port" if prefix else "port"
        return PortItem(ports, ranges, source=bool(prefix), field=field_name)

    def _geoip(self, codes: list[Any], path: ConfigPath, *, source: bool) -> RuleItem:
        real = [str(c) for c in codes if str(c).lower() != "private"]
        if real and self.geoip is None and not self.geoip_failed:
            self.error(
                "geoip rules need a GeoIP database: set route.geoip.path to a MaxMind .mmdb file",
                path,
            )
        return GeoIPItem([str(c) for c in codes], self.geoip, source=source)

    def items(self, rule: Mapping[str, Any], path: ConfigPath, *, headless: bool) -> ItemGroups:
        groups = ItemGroups()
        domains = [str(v) for v in as_list(rule.get("domain"))]
        suffixes = [str(v) for v in as_list(rule.get("domain_suffix"))]
        if domains or suffixes:
            groups.destination_address.append(DomainItem(domains, suffixes))
        # A rule set's big lists come packed by the loader (`ztun.route.compact.pack_rules`).
        if isinstance(table := rule.get(PACKED_DOMAINS), DomainTable):
            groups.destination_address.append(DomainItem(table=table))
        if keywords := as_list(rule.get("domain_keyword")):
            groups.destination_address.append(DomainKeywordItem(str(k) for k in keywords))
        if regexes := self._regexes(as_list(rule.get("domain_regex")), (*path, "domain_regex")):
            groups.destination_address.append(DomainRegexItem(regexes))
        if geo := as_list(rule.get("geoip")):
            groups.destination_address.append(self._geoip(geo, (*path, "geoip"), source=False))
        if cidrs := self._prefixes(as_list(rule.get("ip_cidr")), (*path, "ip_cidr")):
            groups.destination_address.append(IPCIDRItem(cidrs, source=False))
        if isinstance(ranges := rule.get(PACKED_CIDRS["ip_cidr"]), IPRangeSet):
            groups.destination_address.append(IPCIDRItem(source=False, table=ranges))
        if rule.get("ip_is_private") is True:
            groups.destination_address.append(IPIsPrivateItem(source=False))

        if geo := as_list(rule.get("source_geoip")):
            groups.source_address.append(self._geoip(geo, (*path, "source_geoip"), source=True))
        src_path = (*path, "source_ip_cidr")
        if cidrs := self._prefixes(as_list(rule.get("source_ip_cidr")), src_path):
            groups.source_address.append(IPCIDRItem(cidrs, source=True))
        if isinstance(ranges := rule.get(PACKED_CIDRS["source_ip_cidr"]), IPRangeSet):
            groups.source_address.append(IPCIDRItem(source=True, table=ranges))
        if rule.get("source_ip_is_private") is True:
            groups.source_address.append(IPIsPrivateItem(source=True))

        if item := self._ports(rule, "", path):
            groups.destination_port.append(item)
        if item := self._ports(rule, "source_", path):
            groups.source_port.append(item)

        self._other_items(rule, path, groups, headless=headless)
        return groups

    def _other_items(
        self, rule: Mapping[str, Any], path: ConfigPath, groups: ItemGroups, *, headless: bool
    ) -> None:
        if networks := as_list(rule.get("network")):
            for i, n in enumerate(networks):
                if n not in VALID_NETWORKS:
                    self.error(f"'{n}' is not a network (tcp, udp or icmp)", (*path, "network", i))
            groups.other.append(FieldInItem("network", "network", networks))
        if self.dns and (tags := as_list(rule.get("outbound"))):
            groups.other.append(OutboundItem(str(t) for t in tags))
        for name, attr in (("inbound", "inbound"), ("protocol", "protocol"),
                           ("auth_user", "user")):  # fmt: skip
            if values := as_list(rule.get(name)):
                groups.other.append(FieldInItem(name, attr, [str(v) for v in values]))
        if isinstance(mode := rule.get("clash_mode"), str) and mode and not headless:
            self.mode.add(mode)
            groups.other.append(ClashModeItem(mode, self.mode))
        self._owner_items(rule, path, groups)
        if "ip_version" in rule:
            version = rule["ip_version"]
            if version not in (4, 6):
                self.error(f"'{version}' is not an IP version (4 or 6)", (*path, "ip_version"))
            groups.other.append(FieldInItem("ip_version", "ip_version", [version]))
        if query_types := as_list(rule.get("query_type")):
            codes = []
            for i, q in enumerate(query_types):
                code = q if isinstance(q, int) else QUERY_TYPES.get(str(q).upper())
                if code is None:
                    self.error(f"'{q}' is not a DNS query type", (*path, "query_type", i))
                else:
                    codes.append(code)
            groups.other.append(FieldInItem("query_type", "query_type", codes))
        if tags := as_list(rule.get("rule_set")):
            if headless:
                self.error("a rule inside a rule set cannot name another rule set",
                           (*path, "rule_set"))  # fmt: skip
            sets = []
            tags = [str(t) for t in tags]
            for i, tag in enumerate(tags):
                if tag in self.rule_sets:
                    sets.append(self.rule_sets[tag])
                else:
                    sets.append([])
                    if self.report_references:
                        self.error(f"unknown rule set '{tag}'", (*path, "rule_set", i))
            match_source = rule.get("rule_set_ip_cidr_match_source") is True
            groups.other.append(RuleSetItem(tags, sets, match_source=match_source))
            if self.owner_sets.intersection(tags):
                self.owner_items += 1

    def _reads_owner(self, need: str) -> None:
        """An item on the flow's owner was compiled: what the router must look up, and one
        more owner item (which marks the rule being compiled, see `_rule_list`)."""
        self.owner_needs.add(need)
        self.owner_items += 1

    def _owner_items(self, rule: Mapping[str, Any], path: ConfigPath, groups: ItemGroups) -> None:
        """`process_name`, `process_path`, `process_path_regex`, `user`, `user_id`: sing-box's
        items on the local process that owns the flow's source socket (AND with the rest)."""
        for name, attr in (("process_name", "process_name"), ("process_path", "process_path"),
                           ("user", "process_user")):  # fmt: skip
            if values := as_list(rule.get(name)):
                groups.other.append(FieldInItem(name, attr, [str(v) for v in values]))
                self._reads_owner("user" if name == "user" else "process")
        key = "process_path_regex"
        if values := as_list(rule.get(key)):
            if patterns := self._regexes(values, (*path, key)):
                groups.other.append(ProcessPathRegexItem(patterns))
            self._reads_owner("process")
        if values := as_list(rule.get("user_id")):
            ids = []
            for i, v in enumerate(values):
                if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 0xFFFFFFFF:
                    ids.append(v)
                else:
                    self.error(f"'{v}' is not a user id (0 to 4294967295)", (*path, "user_id", i))
            groups.other.append(FieldInItem("user_id", "process_user_id", ids))
            self._reads_owner("user")

    # -- rules --------------------------------------------------------------------------------

    def rule(
        self, rule: Any, path: ConfigPath, *, headless: bool, top: bool
    ) -> DefaultRule | LogicalRule | None:
        if not isinstance(rule, Mapping):
            self.error("a rule must be a mapping of fields", path)
            return None
        action: Action | DnsAction | None = None
        if top:
            action = self.dns_action(rule, path) if self.dns else self.action(rule, path)
        invert = rule.get("invert") is True
        if rule.get("type") == "logical":
            subs = []
            for i, sub in enumerate(as_list(rule.get("rules"))):
                compiled = self.rule(sub, (*path, "rules", i), headless=headless, top=False)
                if compiled is not None:
                    subs.append(compiled)
            if not as_list(rule.get("rules")):
                self.error("a logical rule needs at least one rule in 'rules'", path)
            mode = rule.get("mode")
            if mode not in ("and", "or"):
                self.error(f"'{mode}' is not a logical mode (and or or)", (*path, "mode"))
                mode = "and"
            return LogicalRule(str(mode), subs, invert=invert, action=action)
        return DefaultRule(self.items(rule, path, headless=headless), invert=invert, action=action)

    def action(self, rule: Mapping[str, Any], path: ConfigPath) -> Action | None:
        kind = rule.get("action", "route")
        options = self.route_options(rule, path)
        if kind == "route":
            outbound = rule.get("outbound")
            if not outbound:
                where = (*path, "outbound") if "action" in rule else path
                self.error("this rule has no outbound: add 'outbound: <tag>' "
                           "(or an action such as 'action: reject')", where)  # fmt: skip
                return None
            return Route(str(outbound), options)
        if kind == "reject":
            method = rule.get("method", "default")
            if method not in ("default", "drop", "reply"):
                self.error(f"'{method}' is not a reject method (default, drop or reply)",
                           (*path, "method"))  # fmt: skip
                method = "default"
            return Reject(method, rule.get("no_drop") is True)
        if kind == "hijack-dns":
            return HijackDNS()
        if kind == "sniff":
            timeout_ms = 300
            if "timeout" in rule:
                try:
                    timeout_ms = round(parse_duration(rule["timeout"]) * 1000)
                except ValueError as exc:
                    self.error(str(exc), (*path, "timeout"))
            return Sniff(tuple(str(s) for s in as_list(rule.get("sniffer"))), timeout_ms,
                         rule.get("override_destination") is True)  # fmt: skip
        if kind == "route-options":
            return RouteOptionsAction(options)
        self.error(f"'{kind}' is not an action (route, reject, hijack-dns, sniff, "
                   "route-options)", (*path, "action"))  # fmt: skip
        return None

    def dns_action(self, rule: Mapping[str, Any], path: ConfigPath) -> DnsAction | None:
        kind = rule.get("action", "route")
        if kind in ("route", "route-options"):
            disable_cache = rule.get("disable_cache") is True
            rewrite_ttl = rule.get("rewrite_ttl")
            if rewrite_ttl is not None and not (
                isinstance(rewrite_ttl, int) and not isinstance(rewrite_ttl, bool)
                and 0 <= rewrite_ttl <= 0x7FFFFFFF
            ):  # fmt: skip
                self.error(f"'{rewrite_ttl}' is not a TTL (seconds, 0 or more)",
                           (*path, "rewrite_ttl"))  # fmt: skip
                rewrite_ttl = None
            strategy = rule.get("strategy")
            if strategy is not None and strategy not in STRATEGIES:
                self.error(f"'{strategy}' is not a strategy ({', '.join(STRATEGIES)})",
                           (*path, "strategy"))  # fmt: skip
                strategy = None
            if kind == "route-options":
                return DnsRouteOptions(disable_cache, rewrite_ttl, strategy)
            server = rule.get("server")
            if not server:
                where = (*path, "server") if "action" in rule else path
                self.error("this DNS rule has no server: add 'server: <tag>' "
                           "(or an action such as 'action: reject')", where)  # fmt: skip
                return None
            return DnsRoute(str(server), disable_cache, rewrite_ttl, strategy)
        if kind == "reject":
            method = rule.get("method", "default")
            if method not in ("default", "drop"):
                self.error(f"'{method}' is not a DNS reject method (default answers REFUSED, "
                           "drop answers nothing)", (*path, "method"))  # fmt: skip
                method = "default"
            return Reject(method, rule.get("no_drop") is True)
        if kind == "predefined":
            # here, not at the top: dnspython stays out of configs without predefined answers
            from ztun.dns.message import RCODES, parse_record

            rcode = str(rule.get("rcode", "NOERROR")).upper()
            if rcode not in RCODES:
                self.error(f"'{rule.get('rcode')}' is not a response code ({', '.join(RCODES)})",
                           (*path, "rcode"))  # fmt: skip
            sections = []
            for name in ("answer", "ns", "extra"):
                value = rule.get(name)
                texts = [str(v) for v in as_list(value)]
                for i, text in enumerate(texts):
                    try:
                        parse_record(text)
                    except ValueError as exc:
                        where = (*path, name, i) if isinstance(value, list) else (*path, name)
                        self.error(f"'{text}' is not a DNS record in zone-file form "
                                   f"('example.com. IN A 192.0.2.1'): {exc}", where)  # fmt: skip
                sections.append(tuple(texts))
            return Predefined(rcode, *sections)
        self.error(f"'{kind}' is not a DNS rule action (route, route-options, reject, "
                   "predefined)", (*path, "action"))  # fmt: skip
        return None

    def route_options(self, rule: Mapping[str, Any], path: ConfigPath) -> tuple[
            tuple[str, object], ...]:  # fmt: skip
        options: list[tuple[str, object]] = []
        for name in ROUTE_OPTION_FIELDS:
            if name not in rule:
                continue
            value = rule[name]
            if name == "udp_timeout":
                try:
                    value = parse_duration(value)
                except ValueError as exc:
                    self.error(str(exc), (*path, name))
                    continue
            options.append((name, value))
        return tuple(options)


def compile_headless_rules(
    rules: Sequence[Any], *, geoip: GeoIPDatabase | None = None, path: ConfigPath = ()
) -> HeadlessMatcher:
    """A rule set's headless rules → a matcher (any rule matching means the set matches)."""
    compiler = _Compiler({}, geoip, report_references=True)
    compiled = []
    for i, rule in enumerate(rules):
        c = compiler.rule(rule, (*path, i), headless=True, top=False)
        if c is not None:
            compiled.append(c)
    errors = [d for d in compiler.diagnostics if d.severity == "error"]
    if errors:
        raise ConfigError(errors)
    return HeadlessMatcher(compiled)


class HeadlessMatcher:
    """Matches a flow against a list of headless rules the way a sing-box rule set does."""

    def __init__(self, rules: Sequence[HeadlessRule]) -> None:
        self.rules = list(rules)

    def match(self, meta: FlowMeta) -> bool:
        # Each rule alone, on fresh state, as `sing-box rule-set match` evaluates a set.
        state = MatchState()
        for rule in self.rules:
            state.reset()
            if rule.match(meta, state):
                return True
        return False


def _compile_sets(
    compiler: _Compiler, route: Mapping[str, Any], rule_sets: Mapping[str, Sequence[Any]] | None
) -> dict[str, list[HeadlessRule]]:
    """Each loaded rule set's headless rules, compiled; their mistakes carry the set's path."""
    compiled_sets: dict[str, list[HeadlessRule]] = {}
    entries = {
        str(entry.get("tag")): (i, entry)
        for i, entry in enumerate(as_list(route.get("rule_set")))
        if isinstance(entry, Mapping)
    }
    for tag, rules in (rule_sets or {}).items():
        index, entry = entries.get(tag, (0, {}))
        base: ConfigPath = ("route", "rule_set", index, "rules")
        compiled = []
        owner_items = compiler.owner_items
        for i, rule in enumerate(as_list(rules)):
            before = len(compiler.diagnostics)
            c = compiler.rule(rule, (*base, i), headless=True, top=False)
            if c is not None:
                compiled.append(c)
            _name_file_rule(compiler.diagnostics, before, tag, entry, i)
        compiled_sets[tag] = compiled
        if compiler.owner_items > owner_items:
            compiler.owner_sets.add(tag)
    return compiled_sets


def _name_file_rule(
    diagnostics: list[Diagnostic], start: int, tag: str, entry: Mapping[str, Any], index: int
) -> None:
    """Say which file and which of its rules a finding is in, when the rules are not in the config.

    A local or remote set's rules have no line in the config: the finding is placed at the
    set's entry, and its message names the set's tag, its path or URL, and the rule's index.
    """
    location = entry.get("path") if entry.get("type") == "local" else entry.get("url")
    if entry.get("type") not in ("local", "remote"):
        return
    where = f"in rule set '{tag}' ({location}), rule {index}"
    for k in range(start, len(diagnostics)):
        d = diagnostics[k]
        diagnostics[k] = Diagnostic(f"{where}: {d.message}", d.path, d.mark, d.severity)


def compile_router(
    data: Mapping[str, Any],
    *,
    rule_sets: Mapping[str, Sequence[Any]] | None = None,
    geoip: GeoIPDatabase | None = None,
    report_references: bool = True,
    geoip_failed: bool = False,
) -> tuple[Router | None, list[Diagnostic]]:
    """Compile `data['route']` into a Router.

    `rule_sets` maps each rule-set tag to its headless rules (already loaded). Returns the router
    (None when there were errors) and every diagnostic found, with paths but no marks.
    With `report_references=False`, unknown tags are left to the validator to report.
    """
    route = data.get("route") or {}
    if not isinstance(route, Mapping):
        return None, [Diagnostic("'route' must be a mapping", ("route",))]
    compiler = _Compiler({}, geoip, report_references, geoip_failed)
    compiler.mode = ClashMode(_default_mode(data))
    compiler.rule_sets = _compile_sets(compiler, route, rule_sets)

    outbounds = [o for o in as_list(data.get("outbounds")) if isinstance(o, Mapping)]
    outbound_types = {str(o.get("tag")): str(o.get("type")) for o in outbounds}
    final = route.get("final")
    if final is None:
        final = str(outbounds[0].get("tag")) if outbounds else "direct"
    elif report_references and str(final) not in outbound_types:
        compiler.error(f"route.final names unknown outbound '{final}'", ("route", "final"))

    def unknown_outbound(action: object) -> tuple[str, str] | None:
        if (
            isinstance(action, Route)
            and report_references
            and action.outbound not in outbound_types
        ):
            return f"unknown outbound '{action.outbound}'", "outbound"
        return None

    rules, catch_all, first_owner_rule = _rule_list(
        compiler, route.get("rules"), ("route", "rules"), noun="flow",
        unknown=unknown_outbound, final=(Route, Reject, HijackDNS),
    )  # fmt: skip
    if catch_all is not None and route.get("final") is not None:
        compiler.warn(f"route.final is never used: rule {catch_all} matches every flow",
                      ("route", "final"))  # fmt: skip

    errors = [d for d in compiler.diagnostics if d.severity == "error"]
    router = None if errors else Router(rules, str(final), outbound_types, compiler.mode)
    if router is not None:
        router.owner_needs = frozenset(compiler.owner_needs)
        router.first_owner_rule = first_owner_rule
    return router, compiler.diagnostics


def _default_mode(data: Mapping[str, Any]) -> str:
    """experimental.clash_api.default_mode, "Rule" (sing-box's default) when absent."""
    experimental = data.get("experimental")
    api = experimental.get("clash_api") if isinstance(experimental, Mapping) else None
    mode = api.get("default_mode") if isinstance(api, Mapping) else None
    return mode if isinstance(mode, str) and mode else "Rule"


def compile_dns_router(
    data: Mapping[str, Any],
    *,
    rule_sets: Mapping[str, Sequence[Any]] | None = None,
    geoip: GeoIPDatabase | None = None,
    report_references: bool = True,
    geoip_failed: bool = False,
    mode: ClashMode | None = None,
) -> tuple[DnsRouter | None, list[Diagnostic]]:
    """Compile `data['dns']` into a DnsRouter, as `compile_router` does `route`.

    `mode`: the Clash API's mode cell of the route router, which the DNS rules' `clash_mode`
    items read too (one switch moves both, as in sing-box); a cell of their own without it.

    The router is None when there were errors, and also when the config has no DNS servers
    (nothing to route to). `dns.final` defaults to the first server's tag. DNS rules use
    `route.rule_set` sets, as in sing-box.
    """
    dns = data.get("dns")
    if dns is None:
        return None, []
    if not isinstance(dns, Mapping):
        return None, [Diagnostic("'dns' must be a mapping", ("dns",))]
    route = data.get("route")
    route = route if isinstance(route, Mapping) else {}
    compiler = _Compiler({}, geoip, report_references, geoip_failed)
    compiler.mode = mode if mode is not None else ClashMode(_default_mode(data))
    compiler.rule_sets = _compile_sets(compiler, route, rule_sets)
    compiler.dns = True

    servers = [s for s in as_list(dns.get("servers")) if isinstance(s, Mapping)]
    server_types = {str(s.get("tag")): _server_type(s) for s in servers}
    final = dns.get("final")
    if final is None:
        final = str(servers[0].get("tag")) if servers else None
    elif report_references and str(final) not in server_types:
        compiler.error(f"dns.final names unknown DNS server '{final}'", ("dns", "final"))

    def unknown_server(action: object) -> tuple[str, str] | None:
        if isinstance(action, DnsRoute) and report_references and action.server not in server_types:
            return f"unknown DNS server '{action.server}'", "server"
        return None

    rules, catch_all, _ = _rule_list(
        compiler, dns.get("rules"), ("dns", "rules"), noun="query",
        unknown=unknown_server, final=(DnsRoute, Reject, Predefined),
    )  # fmt: skip
    if catch_all is not None and dns.get("final") is not None:
        compiler.warn(f"dns.final is never used: rule {catch_all} matches every query",
                      ("dns", "final"))  # fmt: skip

    errors = [d for d in compiler.diagnostics if d.severity == "error"]
    router = None
    if not errors and final is not None:
        router = DnsRouter(rules, str(final), server_types)
        router.owner_needs = frozenset(compiler.owner_needs)
    return router, compiler.diagnostics


def _server_type(server: Mapping[str, Any]) -> str:
    """A server's type, reading the legacy `address:` form as it converts."""
    if is_legacy_server(server):
        try:
            return str(legacy_server(server).get("type"))
        except ValueError:
            return "unknown"
    return str(server.get("type"))


def _rule_list(
    compiler: _Compiler,
    raw: object,
    base: ConfigPath,
    *,
    noun: str,
    unknown: Callable[[object], tuple[str, str] | None],
    final: tuple[type, ...],
) -> tuple[list[Any], int | None, int]:
    """Compile a list of top-level rules (route or DNS): the rules, the index of the first
    catch-all with a final action (rules after it are warned about: they never match), and
    the index of the first rule that reads the flow's owner (the rules' count: none does)."""
    rules = []
    catch_all: int | None = None
    first_owner: int | None = None
    for i, raw_rule in enumerate(as_list(raw)):
        path: ConfigPath = (*base, i)
        errors_before = sum(d.severity == "error" for d in compiler.diagnostics)
        owner_items = compiler.owner_items
        rule = compiler.rule(raw_rule, path, headless=False, top=True)
        if rule is None:
            continue
        if first_owner is None and compiler.owner_items > owner_items:
            first_owner = len(rules)
        # A rule whose fields failed to compile lost items; it must not pass for a catch-all.
        broken = sum(d.severity == "error" for d in compiler.diagnostics) > errors_before
        if catch_all is not None:
            compiler.warn(f"this rule can never match: rule {catch_all} before it matches "
                          f"every {noun}", path)  # fmt: skip
        problem = unknown(rule.action)
        if problem is not None:
            compiler.error(problem[0], (*path, problem[1]))
        decides = isinstance(rule.action, final)
        if rule.is_catch_all and decides and catch_all is None and not broken:
            catch_all = i
        rules.append(rule)
    return rules, catch_all, len(rules) if first_owner is None else first_owner
