"""Rule items: one compiled matcher per sing-box rule field.

Each item answers `match(meta, state) -> bool` for one field of a rule (`domain_suffix`,
`ip_cidr`, `port_range`, ...), and `explain(meta, state)` names the entry that matched, in config
words, for `ztun route`. Items are built once at compile time into the fastest structure for
their field (hash sets, a label walk, an Aho-Corasick automaton, sorted integer ranges); a match
builds no objects.

`state` is the per-match scratch (see `rule.MatchState`); only `RuleSetItem` and the CIDR items
read it (sing-box's `rule_set_ip_cidr_match_source` switches an inner set's `ip_cidr` to the
source address).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from ztun.address import MAX_NAME
from ztun.route.compact import DOMAIN, DomainTable, IPRangeSet, parse_prefix
from ztun.route.metadata import FlowMeta, IPAddress
from ztun.route.regex import RegexSet

if TYPE_CHECKING:
    from ztun.route.geoip import GeoIPDatabase
    from ztun.route.rule import HeadlessRule, MatchState

#: How many keywords make an Aho-Corasick automaton worth building over plain `in` tests.
_AUTOMATON_MIN_KEYWORDS = 8


class RuleItem(Protocol):
    """What every compiled rule item offers."""

    def match(self, meta: FlowMeta, state: MatchState) -> bool: ...

    def explain(self, meta: FlowMeta, state: MatchState) -> str | None: ...

    def __str__(self) -> str: ...


def _preview(values: Sequence[object], limit: int = 3, *, total: int | None = None) -> str:
    """A short list for messages: a rule set of 100k entries must not flood the terminal.

    `total`: how many values there are when `values` holds only the first few."""
    shown = ", ".join(str(v) for v in values[:limit])
    more = (len(values) if total is None else total) - limit
    return f"[{shown}{f', …(+{more} more)' if more > 0 else ''}]"


# ---------------------------------------------------------------------------------------------
# Domains


class DomainItem:
    """`domain` and `domain_suffix` together, as sing-box compiles them into one matcher.

    `domain_suffix: a.com` matches `a.com` and any `*.a.com`; `domain_suffix: .a.com` matches
    subdomains only. Matching is by whole labels: `a.com` never matches `xa.com`.

    Small lists (a config's own rules) are two frozensets; a rule set's big lists arrive packed
    as a `DomainTable` (`ztun.route.compact`), a few bytes per name instead of ~200.
    """

    __slots__ = ("_domains", "_exact", "_suffixes", "_table", "_under")

    def __init__(
        self, domains: Iterable[str] = (), suffixes: Iterable[str] = (), *,
        table: DomainTable | None = None,
    ) -> None:  # fmt: skip
        self._table = table
        self._domains = [d.lower().rstrip(".") for d in domains]
        self._suffixes = [s.lower().rstrip(".") for s in suffixes]
        # `_exact`: names matched as a whole; `_under`: names whose subdomains all match.
        self._exact: frozenset[str] = frozenset(
            self._domains + [s for s in self._suffixes if not s.startswith(".")]
        )
        self._under: frozenset[str] = frozenset(s.lstrip(".") for s in self._suffixes)

    def _matched(self, domain: str) -> tuple[str, bool] | None:
        """The listed name that covers `domain`, and whether it came from `domain`."""
        if len(domain) > MAX_NAME:
            return None
        if self._table is not None:
            hit = self._table.matched(domain)
            return None if hit is None else (hit[0], bool(hit[1] & DOMAIN))
        if domain in self._exact:
            return domain, domain in self._domains
        under = self._under
        i = domain.find(".")
        while i >= 0:
            parent = domain[i + 1 :]
            if parent in under:
                return parent, False
            i = domain.find(".", i + 1)
        return None

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        domain = meta.domain
        # Each step of the walk slices the rest of the name: quadratic in its length, so a
        # name longer than any DNS name (which no parser lets through) matches nothing.
        if not domain or len(domain) > MAX_NAME:
            return False
        if self._table is not None:
            return self._table.match(domain)
        if domain in self._exact:
            return True
        under = self._under
        i = domain.find(".")
        while i >= 0:
            if domain[i + 1 :] in under:
                return True
            i = domain.find(".", i + 1)
        return False

    def explain(self, meta: FlowMeta, state: MatchState) -> str | None:
        if not meta.domain:
            return None
        found = self._matched(meta.domain)
        if found is None:
            return None
        hit, listed_as_domain = found
        if hit == meta.domain and listed_as_domain:
            return f"domain '{hit}'"
        if hit == meta.domain:
            return f"domain_suffix '{hit}'"
        return f"domain_suffix '{hit}' covers '{meta.domain}'"

    def __str__(self) -> str:
        domains, suffixes = self._domains, self._suffixes
        n_domains, n_suffixes = len(domains), len(suffixes)
        if self._table is not None:
            domains, suffixes = self._table.preview
            n_domains, n_suffixes = self._table.counts
        parts = []
        if n_domains:
            parts.append(f"domain={_preview(domains, total=n_domains)}")
        if n_suffixes:
            parts.append(f"domain_suffix={_preview(suffixes, total=n_suffixes)}")
        return " ".join(parts)


class _DomainSearchItem:
    """Shared shape of the items that search the domain for the first entry that hits."""

    __slots__ = ()
    #: how `explain` words a hit: "domain_keyword 'x' in 'name'"
    _field = ""
    _verb = ""

    def _first(self, domain: str) -> str | None:
        raise NotImplementedError

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        domain = meta.domain
        # Bounded input for every keyword and pattern: a name longer than any DNS name
        # (which no parser lets through) matches nothing.
        if not domain or len(domain) > MAX_NAME:
            return False
        return self._first(domain) is not None

    def explain(self, meta: FlowMeta, state: MatchState) -> str | None:
        domain = meta.domain
        hit = self._first(domain) if domain and len(domain) <= MAX_NAME else None
        return None if hit is None else f"{self._field} '{hit}' {self._verb} '{meta.domain}'"


class DomainKeywordItem(_DomainSearchItem):
    """`domain_keyword`: a substring anywhere in the domain (one automaton for many keywords)."""

    __slots__ = ("_automaton", "_keywords")
    _field, _verb = "domain_keyword", "in"

    def __init__(self, keywords: Iterable[str]) -> None:
        self._keywords = [k.lower() for k in keywords]
        self._automaton = None
        if len(self._keywords) >= _AUTOMATON_MIN_KEYWORDS:
            import ahocorasick  # only needed for large keyword lists

            automaton = ahocorasick.Automaton()
            for k in self._keywords:
                automaton.add_word(k, k)
            automaton.make_automaton()
            self._automaton = automaton

    def _first(self, domain: str) -> str | None:
        if self._automaton is not None:
            for _end, keyword in self._automaton.iter(domain):
                return str(keyword)
            return None
        for k in self._keywords:
            if k in domain:
                return k
        return None

    def __str__(self) -> str:
        return f"domain_keyword={_preview(self._keywords)}"


class DomainRegexItem(_DomainSearchItem):
    """`domain_regex`: unanchored search, like Go's `MatchString` that sing-box uses."""

    __slots__ = ("_patterns", "_sources")
    _field, _verb = "domain_regex", "matches"

    def __init__(self, patterns: Iterable[str]) -> None:
        self._sources = list(patterns)
        self._patterns = RegexSet(self._sources)  # RE2: linear time, Go's syntax

    def _first(self, domain: str) -> str | None:
        index = self._patterns.first(domain)
        return None if index is None else self._sources[index]

    def __str__(self) -> str:
        return f"domain_regex={_preview(self._sources)}"


# ---------------------------------------------------------------------------------------------
# Addresses


def _addresses(meta: FlowMeta, source: bool) -> tuple[IPAddress, ...]:
    if source:
        return (meta.source,) if meta.source is not None else ()
    if meta.destination is not None:
        return (meta.destination,)
    return meta.resolved


class IPCIDRItem:
    """`ip_cidr` / `source_ip_cidr`. Inside a rule set marked `rule_set_ip_cidr_match_source`,
    a destination item checks the source address instead (sing-box semantics)."""

    __slots__ = ("_count", "_ranges", "_source", "_texts")

    def __init__(
        self, prefixes: Sequence[str] = (), *, source: bool, table: IPRangeSet | None = None
    ) -> None:
        # A rule set's big list arrives packed (`table`): its texts are not kept, and `ztun
        # route` names the merged range that matched instead of the entry.
        self._texts = list(prefixes) if table is None else list(table.preview)
        self._count = len(prefixes) if table is None else None
        self._ranges = IPRangeSet(parse_prefix(p) for p in self._texts) if table is None else table
        self._source = source

    def _hit(self, meta: FlowMeta, state: MatchState) -> IPAddress | None:
        use_source = self._source or state.ip_cidr_match_source
        for ip in _addresses(meta, use_source):
            if ip in self._ranges:
                return ip
        return None

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        return self._hit(meta, state) is not None

    def explain(self, meta: FlowMeta, state: MatchState) -> str | None:
        ip = self._hit(meta, state)
        if ip is None:
            return None
        if self._count is None:
            return f"{self._name()} range '{self._ranges.covering(ip)}' contains {ip}"
        net = next(p for p in self._texts if ip in parse_prefix(p))
        return f"{self._name()} '{net}' contains {ip}"

    def _name(self) -> str:
        return "source_ip_cidr" if self._source else "ip_cidr"

    def __str__(self) -> str:
        if self._count is None:
            return f"{self._name()}={_preview(self._texts)} ({len(self._ranges)} merged ranges)"
        return f"{self._name()}={_preview(self._texts)}"


#: What sing-box treats as not public (its `IsPublicAddr` negated): private, loopback,
#: link-local, multicast, interface-local multicast and unspecified addresses.
PRIVATE_RANGES = IPRangeSet(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/32", "10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.168.0.0/16", "224.0.0.0/4",
        "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8",
    )
)  # fmt: skip


class IPIsPrivateItem:
    """`ip_is_private` / `source_ip_is_private`."""

    __slots__ = ("_source",)

    def __init__(self, *, source: bool) -> None:
        self._source = source

    def _hit(self, meta: FlowMeta) -> IPAddress | None:
        for ip in _addresses(meta, self._source):
            if ip in PRIVATE_RANGES:
                return ip
        return None

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        return self._hit(meta) is not None

    def explain(self, meta: FlowMeta, state: MatchState) -> str | None:
        ip = self._hit(meta)
        return None if ip is None else f"{self._name()}: {ip} is private"

    def _name(self) -> str:
        return "source_ip_is_private" if self._source else "ip_is_private"

    def __str__(self) -> str:
        return f"{self._name()}=true"


class GeoIPItem:
    """`geoip` / `source_geoip`: the address's country (from a MaxMind DB) is in the list.

    The code `private` matches private addresses, as sing-box's geoip did.
    """

    __slots__ = ("_codes", "_db", "_private", "_source")

    def __init__(self, codes: Iterable[str], db: GeoIPDatabase | None, *, source: bool) -> None:
        self._codes = frozenset(c.lower() for c in codes)
        self._private = "private" in self._codes
        self._db = db
        self._source = source

    def _hit(self, meta: FlowMeta) -> tuple[IPAddress, str] | None:
        for ip in _addresses(meta, self._source):
            if self._private and ip in PRIVATE_RANGES:
                return ip, "private"
            if self._db is not None:
                country = self._db.country(ip)
                if country is not None and country in self._codes:
                    return ip, country
        return None

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        return self._hit(meta) is not None

    def explain(self, meta: FlowMeta, state: MatchState) -> str | None:
        hit = self._hit(meta)
        return None if hit is None else f"{self._name()}: {hit[0]} is in '{hit[1]}'"

    def _name(self) -> str:
        return "source_geoip" if self._source else "geoip"

    def __str__(self) -> str:
        return f"{self._name()}={_preview(sorted(self._codes))}"


# ---------------------------------------------------------------------------------------------
# Ports


def parse_port_range(text: str) -> tuple[int, int]:
    """sing-box's `"A:B"`, `":B"` (from 0) or `"A:"` (to 65535)."""
    text = str(text).strip()
    if text.count(":") != 1:
        raise ValueError(f"'{text}' is not a port range like '1000:2000'")
    low_text, high_text = text.split(":")
    try:
        low = int(low_text) if low_text else 0
        high = int(high_text) if high_text else 65535
    except ValueError:
        raise ValueError(f"'{text}' is not a port range like '1000:2000'") from None
    if not (0 <= low <= 65535 and 0 <= high <= 65535):
        raise ValueError(f"'{text}': ports are 0 to 65535")
    if low > high:
        raise ValueError(f"'{text}': the range starts after it ends")
    return low, high


class PortItem:
    """`port`, `port_range` and their `source_` twins, merged into one set plus ranges."""

    __slots__ = ("_field", "_ports", "_ranges", "_source", "_texts")

    def __init__(
        self, ports: Iterable[int], ranges: Iterable[str], *, source: bool, field: str
    ) -> None:
        self._ports = frozenset(int(p) for p in ports)
        self._texts = list(ranges)
        self._ranges = [parse_port_range(r) for r in self._texts]
        self._source = source
        self._field = field

    def _port(self, meta: FlowMeta) -> int:
        return meta.source_port if self._source else meta.destination_port

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        port = meta.source_port if self._source else meta.destination_port
        if port in self._ports:
            return True
        return any(low <= port <= high for low, high in self._ranges)

    def explain(self, meta: FlowMeta, state: MatchState) -> str | None:
        port = self._port(meta)
        if port in self._ports:
            return f"{self._field} {port}"
        for text, (low, high) in zip(self._texts, self._ranges, strict=True):
            if low <= port <= high:
                return f"{self._field}_range '{text}' contains {port}"
        return None

    def __str__(self) -> str:
        parts = []
        if self._ports:
            parts.append(f"{self._field}={_preview(sorted(self._ports))}")
        if self._texts:
            parts.append(f"{self._field}_range={_preview(self._texts)}")
        return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Everything else: a field of the metadata compared against a set


class FieldInItem:
    """`network`, `inbound`, `protocol`, `auth_user`, `ip_version`, `process_name`,
    `process_path`, `user`, `user_id`: the value is in a set (None, unknown, is in none)."""

    __slots__ = ("_attr", "_name", "_values")

    def __init__(self, name: str, attr: str, values: Iterable[object]) -> None:
        self._name = name
        self._attr = attr
        self._values = frozenset(values)

    def _value(self, meta: FlowMeta) -> object:
        if self._attr == "ip_version":
            if meta.destination is not None:
                return meta.destination.version
            return meta.resolved[0].version if meta.resolved else None
        return getattr(meta, self._attr)

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        return self._value(meta) in self._values

    def explain(self, meta: FlowMeta, state: MatchState) -> str | None:
        value = self._value(meta)
        return f"{self._name} {value}" if value in self._values else None

    def __str__(self) -> str:
        return f"{self._name}={_preview(sorted(str(v) for v in self._values))}"


class ClashMode:
    """The Clash API's mode: one cell shared by a router's `clash_mode` items, set at run time
    (`PATCH /configs`). Modes compare case-insensitively, as in sing-box."""

    __slots__ = ("current", "known")

    def __init__(self, current: str = "Rule", known: Iterable[str] = ()) -> None:
        self.current = current
        #: the modes the rules name, after the default one (the API's "mode-list")
        self.known: list[str] = [current]
        for mode in known:
            self.add(mode)

    def add(self, mode: str) -> None:
        if all(mode.lower() != m.lower() for m in self.known):
            self.known.append(mode)

    def set(self, mode: str) -> str | None:
        """Switch to `mode` (spelled as the rules spell it); None when no rule names it."""
        for known in self.known:
            if known.lower() == mode.lower():
                self.current = known
                return known
        return None


class ClashModeItem:
    """`clash_mode`: the Clash API's current mode is this one."""

    __slots__ = ("_cell", "_mode")

    def __init__(self, mode: str, cell: ClashMode) -> None:
        self._mode = mode.lower()
        self._cell = cell

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        return self._cell.current.lower() == self._mode

    def explain(self, meta: FlowMeta, state: MatchState) -> str | None:
        return f"clash_mode {self._cell.current}" if self.match(meta, state) else None

    def __str__(self) -> str:
        return f"clash_mode={self._mode}"


class ProcessPathRegexItem:
    """`process_path_regex`: an unanchored RE2 search in the path of the flow's process (Go's
    `MatchString`, as sing-box); a flow whose process is unknown matches nothing."""

    __slots__ = ("_patterns", "_sources")

    def __init__(self, patterns: Iterable[str]) -> None:
        self._sources = list(patterns)
        self._patterns = RegexSet(self._sources)

    def _first(self, path: str | None) -> str | None:
        if not path:
            return None
        index = self._patterns.first(path)
        return None if index is None else self._sources[index]

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        return self._first(meta.process_path) is not None

    def explain(self, meta: FlowMeta, state: MatchState) -> str | None:
        hit = self._first(meta.process_path)
        return None if hit is None else f"process_path_regex '{hit}' matches '{meta.process_path}'"

    def __str__(self) -> str:
        return f"process_path_regex={_preview(self._sources)}"


class OutboundItem:
    """`outbound` of a DNS rule: the outbound the flow behind the query was routed to; the
    value `any` matches every query that has one (sing-box's meaning)."""

    __slots__ = ("_any", "_values")

    def __init__(self, values: Iterable[str]) -> None:
        self._values = frozenset(values)
        self._any = "any" in self._values

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        tag = meta.outbound
        return tag is not None and (self._any or tag in self._values)

    def explain(self, meta: FlowMeta, state: MatchState) -> str | None:
        return f"outbound {meta.outbound}" if self.match(meta, state) else None

    def __str__(self) -> str:
        return f"outbound={_preview(sorted(self._values))}"


class RuleSetItem:
    """`rule_set`: the flow matches any of the named sets.

    As sing-box 1.14.4 does it (pinned by tests/integration/test_singbox_oracle.py):
    - a set of exactly one plain rule is *merged* into the rule that names it, group by group:
      it shares the outer rule's match state, so `{port: 80, rule_set: [s]}` with
      `s = [{ip_cidr: 10/8, port: 443}]` means `ip_cidr 10/8 and port 80 or 443`;
    - any other set (two or more rules, or one logical rule) is one condition of its own: each of
      its rules is matched alone, on fresh state, and the set matches when one of them does.
    """

    __slots__ = ("_match_source", "_sets", "_tags")

    def __init__(
        self, tags: Sequence[str], sets: Sequence[Sequence[HeadlessRule]], *, match_source: bool
    ) -> None:
        from ztun.route.rule import DefaultRule

        self._tags = list(tags)
        #: per set: (merged rule or None, the set's rules)
        self._sets = [
            (s[0] if len(s) == 1 and isinstance(s[0], DefaultRule) else None, list(s)) for s in sets
        ]
        self._match_source = match_source

    def _match_set(
        self, merged: HeadlessRule | None, rules: list[HeadlessRule], meta: FlowMeta,
        state: MatchState,
    ) -> int | None:  # fmt: skip
        """Index of the rule of one set that matches, or None."""
        if merged is not None:
            state.ip_cidr_match_source = self._match_source
            return 0 if merged.match(meta, state) else None
        alone = type(state)()
        for index, rule in enumerate(rules):
            alone.reset()
            alone.ip_cidr_match_source = self._match_source
            if rule.match(meta, alone):
                return index
        return None

    def match(self, meta: FlowMeta, state: MatchState) -> bool:
        for merged, rules in self._sets:
            if self._match_set(merged, rules, meta, state) is not None:
                return True
        return False

    def explain(self, meta: FlowMeta, state: MatchState) -> str | None:
        for tag, (merged, rules) in zip(self._tags, self._sets, strict=True):
            index = self._match_set(merged, rules, meta, state)
            if index is not None:
                why = rules[index].explain(meta)
                return f"rule_set '{tag}' rule {index}" + (f" ({why})" if why else "")
        return None

    def __str__(self) -> str:
        return f"rule_set={_preview(self._tags)}"
