"""sing-box source rule sets read as a stream of JSON events, big lists packed as they come.

`json.loads` of a 1.8M-entry source set (40 MB) needs the text as a `str` (40 MB more) and then
holds every entry as an object in a list (~140 MB) until `compact.pack_rules` has built its
tables from them: the parse peaked at 275 MiB, `ztun run` at 342 MiB. Here ijson's C backend
(yajl) reads the file's bytes one event at a time; a `domain`/`domain_suffix`/`ip_cidr`/
`source_ip_cidr` list goes into the compact builders (`DomainTableBuilder`,
`IPRangeSetBuilder`) once it reaches `PACK_MIN_ENTRIES`, so what is held is the bytes and the
packed tables. ijson is a well-kept library with wheels for every platform ztun runs on; its
`basic_parse` reads the 40 MB file in ~0.35 s, as fast as `json.loads`.

The rest of the file is decoded into plain objects, and a packed list leaves a one-entry stand-in
(its first entry, or its first upper-case one) so `ruleset.source_from_data` checks and warns
exactly as for a decoded file; the tables are then put in place of the checked lists. Whatever
this reader does not handle itself (comments and trailing commas, which sing-box accepts and
yajl does not; a key given twice; a bad entry in a big list; any error) makes `parse_source_bytes`
answer None, and the caller parses the text as before, which names the mistake: both ways give
the same rules, warnings and messages.

Pure: bytes in, rules out.
"""

from __future__ import annotations

import io
from typing import Any

from ztun.route.compact import (
    PACK_MIN_ENTRIES,
    PACKED_CIDRS,
    PACKED_DOMAINS,
    DomainTableBuilder,
    IPRangeSetBuilder,
)
from ztun.route.ruleset import ParsedRuleSet, RuleSetError, source_from_data

_BOM = b"\xef\xbb\xbf"
_DOMAIN_FIELDS = ("domain", "domain_suffix")
_PACKED_FIELDS = frozenset((*_DOMAIN_FIELDS, *PACKED_CIDRS))
#: Entries handed to a builder at once (its loop is cheaper than a call per entry).
_BATCH = 4096


class _Fallback(Exception):
    """Something this reader leaves to the text parser."""


class _RuleLists:
    """The big lists of one rule while it is read: buffered until they are big enough to pack,
    then streamed into the builders."""

    __slots__ = ("buffered", "cidrs", "domains", "first")

    def __init__(self) -> None:
        self.buffered: dict[str, list[str]] = {}
        self.domains: DomainTableBuilder | None = None
        self.cidrs: dict[str, IPRangeSetBuilder] = {}
        #: per field: the entry its stand-in list keeps
        self.first: dict[str, str] = {}

    def add(self, field: str, entries: list[str]) -> None:
        for entry in entries:
            if not isinstance(entry, str) or not entry:
                raise _Fallback  # the text parser names the entry
        if field in _DOMAIN_FIELDS:
            first = self.first.get(field)
            if first is None or first == first.lower():
                upper = next((e for e in entries if e != e.lower()), None)
                self.first[field] = upper or first or entries[0]
            if self.domains is None:
                buffered = self.buffered.setdefault(field, [])
                buffered += entries
                if sum(len(self.buffered.get(f, ())) for f in _DOMAIN_FIELDS) < PACK_MIN_ENTRIES:
                    return
                self.domains = DomainTableBuilder()
                entries = []
                for f in _DOMAIN_FIELDS:  # `domain` first, as `DomainTable.build` adds them
                    self._add_domains(f, self.buffered.pop(f, []))
            self._add_domains(field, entries)
            return
        self.first.setdefault(field, entries[0])
        builder = self.cidrs.get(field)
        if builder is None:
            buffered = self.buffered.setdefault(field, [])
            buffered += entries
            if len(buffered) < PACK_MIN_ENTRIES:
                return
            builder = self.cidrs[field] = IPRangeSetBuilder()
            entries = self.buffered.pop(field)
        for entry in entries:
            if entry != entry.strip():
                raise _Fallback  # read by ipaddress in the text parser's path
        try:
            builder.add(entries)
        except ValueError:
            raise _Fallback from None

    def _add_domains(self, field: str, entries: list[str]) -> None:
        assert self.domains is not None
        if field == "domain":
            self.domains.add_domains(entries)
        else:
            self.domains.add_suffixes(entries)

    def finish(self, rule: dict[str, Any]) -> dict[str, Any]:
        """Put the buffered lists and the stand-ins into `rule`; the packed tables by key."""
        packed: dict[str, Any] = {}
        for field, entries in self.buffered.items():
            rule[field] = entries
        if self.domains is not None:
            for field in _DOMAIN_FIELDS:
                value = rule.get(field)
                if value is not None and not isinstance(value, list):
                    raise _Fallback  # a lone name beside a packed list: the text path packs it
            packed[PACKED_DOMAINS] = self.domains.build()
        for field, builder in self.cidrs.items():
            packed[PACKED_CIDRS[field]] = builder.build()
        for field in self.first:
            if field not in self.buffered:
                rule[field] = [self.first[field]]
        return packed


def parse_source_bytes(data: bytes) -> ParsedRuleSet | None:
    """A source rule set's bytes → headless rules with big lists packed, or None when the text
    parser must read it (see the module's docstring)."""
    if b"//" in data or b"/*" in data or b"#" in data:
        return None  # comments: yajl reads none of sing-box's three kinds
    import ijson  # here: a config without a source set never loads it (~0.3 MiB)

    source = io.BytesIO(data)
    if data.startswith(_BOM):
        source.seek(len(_BOM))
    try:
        document, packed = _decode(ijson.basic_parse(source, use_float=True))
        parsed = source_from_data(document)
    except (_Fallback, ijson.JSONError, RuleSetError, ValueError, RecursionError):
        return None
    if isinstance(document, dict) and isinstance(document.get("rules"), list):
        _attach(document["rules"], parsed.rules, packed)
    return parsed


def _decode(events: Any) -> tuple[Any, dict[int, dict[str, Any]]]:
    """JSON events → (the document, packed tables by `id` of the rule dict they belong to).

    A rule is a map in a list under `rules` (the top level's, or a logical rule's)."""
    packed: dict[int, dict[str, Any]] = {}
    # frames: [container, key of a map / None, is a rule's map or a rules list, the rule's lists]
    stack: list[list[Any]] = []
    root: Any = None
    batch: list[str] | None = None  # the entries of a big list being read
    batch_field = ""

    def put(value: Any) -> None:
        nonlocal root
        if not stack:
            root = value
            return
        frame = stack[-1]
        container = frame[0]
        if isinstance(container, list):
            container.append(value)
        else:
            if frame[1] in container:
                raise _Fallback  # a key twice: json.loads keeps the last one
            container[frame[1]] = value

    for event, value in events:
        if batch is not None:
            if event == "string":
                batch.append(value)
                if len(batch) >= _BATCH:
                    stack[-1][3].add(batch_field, batch)
                    batch = []
                continue
            if event != "end_array":
                raise _Fallback  # not a list of names: the text parser says so
            lists = stack[-1][3]
            if batch:
                lists.add(batch_field, batch)
            elif batch_field not in lists.first:
                stack[-1][0][batch_field] = []  # an empty list stays what it was
            batch = None
            continue
        if event == "map_key":
            stack[-1][1] = value
        elif event == "start_map":
            parent = stack[-1] if stack else None
            is_rule = parent is not None and parent[2] and isinstance(parent[0], list)
            stack.append([{}, None, is_rule, _RuleLists() if is_rule else None])
        elif event == "start_array":
            parent = stack[-1] if stack else None
            in_map = parent is not None and isinstance(parent[0], dict)
            key = parent[1] if in_map else None
            if parent is not None and parent[2] and key in _PACKED_FIELDS:
                if key in parent[0]:
                    raise _Fallback  # a key twice
                parent[0][key] = None  # its place among the keys, filled by `finish`
                batch, batch_field = [], key
                continue
            # a rules list: the top level's `rules`, or a rule's (a logical rule's)
            rules_list = in_map and key == "rules" and (len(stack) == 1 or parent[2])
            stack.append([[], None, rules_list, None])
        elif event in ("end_map", "end_array"):
            container, _, is_rule, lists = stack.pop()
            if is_rule and lists is not None:
                tables = lists.finish(container)
                if tables:
                    packed[id(container)] = tables
            put(container)
        else:
            put(value)
    return root, packed


def _attach(raw: list[Any], rules: list[dict[str, Any]], packed: dict[int, dict[str, Any]]) -> None:
    """Put each rule's packed tables in place of its checked stand-in lists. `rules` are
    `source_from_data`'s copies of `raw`, one for one, logical rules' sub-rules too."""
    for source, rule in zip(raw, rules, strict=True):
        if rule.get("type") == "logical":
            _attach(source["rules"], rule["rules"], packed)
            continue
        tables = packed.get(id(source))
        if not tables:
            continue
        if PACKED_DOMAINS in tables:
            rule.pop("domain", None)
            rule.pop("domain_suffix", None)
        for field, key in PACKED_CIDRS.items():
            if key in tables:
                rule.pop(field, None)
        rule.update(tables)
