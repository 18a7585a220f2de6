"""sing-box's binary rule-set format (`format: binary`, `.srs` files): bytes ↔ headless rules.

The layout, as sing-box 1.14 writes it (versions 1 to 5; described here from sing-box's
behaviour and its public sources, in ztun's words):

- A header of four plain bytes: the magic `SRS` and a version number. Everything after it is
  one zlib stream (sing-box compresses at the best level).
- Inside: the number of rules as an unsigned LEB128 varint ("uvarint", at most ten bytes),
  then the rules. A rule starts with its kind: 0 for a default rule, 1 for a logical one.
- A logical rule is a mode byte (0 = and, 1 = or), a uvarint count of sub-rules, the sub-rules
  (each again starting with its kind), and an invert byte (non-zero = true).
- A default rule is a run of items, each a type byte and a payload, closed by the byte 0xFF
  and an invert byte. The payload depends on the type:
  * lists of strings (network, domain_keyword, domain_regex, port ranges, process and Wi-Fi
    fields, package_name_regex): a uvarint count, then each string as a uvarint length and
    its UTF-8 bytes;
  * lists of 16-bit numbers (query_type, port, source_port): a uvarint count, then each
    number as two big-endian bytes; network_type is the same with one byte per number;
  * domain and domain_suffix together are one item, a set of keys stored as a succinct trie
    (see below); AdGuard-style patterns (written by `sing-box rule-set convert`) are a second
    trie with the same layout;
  * ip_cidr and source_ip_cidr: a set of address ranges — a byte 1, the range count as eight
    big-endian bytes, then each range as its first and last address, each a uvarint length
    (4 or 16) followed by that many address bytes. sing-box merges the prefixes it is given
    into the fewest ranges, IPv4 before IPv6;
  * network_is_expensive and network_is_constrained have no payload; the interface-address
    items hold prefixes (a uvarint address length, the address, a prefix-length byte).
  Item numbers: 0 query_type, 1 network, 2 domain set, 3 domain_keyword, 4 domain_regex,
  5 source_ip_cidr, 6 ip_cidr, 7 source_port, 8 source_port_range, 9 port, 10 port_range,
  11 process_name, 12 process_path, 13 package_name, 14 wifi_ssid, 15 wifi_bssid, 16 AdGuard
  set, 17 process_path_regex, 18 network_type, 19 network_is_expensive, 20
  network_is_constrained, 21 network_interface_address, 22 default_interface_address, 23
  package_name_regex. When an item type repeats inside a rule, the later one counts.
- The domain trie. Each entry is stored as a key: the entry written backwards (so names that
  share a parent domain share a path from the root), with a marker at the end of the key
  (the front of the entry): `\\r` before a `domain_suffix` that starts with a dot (subdomains
  only), `\\n` before one without a dot (the name and its subdomains; version 1 files
  instead store such a suffix twice, as the exact name and as the dotted form), and no marker
  for an exact `domain`. The sorted keys form a trie, laid out level by level (LOUDS): a
  version byte (0), then three arrays, each a uvarint length and its elements — `leaves`
  (64-bit big-endian words; bit n, counted from the low bit of the first word, says node n
  ends a key), `label bitmap` (the same kind of words: for each node in breadth-first order,
  one 0 bit per child followed by a 1 bit) and `labels` (one byte per child edge, in the same
  order). The root is node 0 and the k-th label leads to node k + 1.
- The AdGuard trie stores converted filter lines the same way: `\\n` in front for `||`,
  `\\r` for an unanchored start, nothing for `|`; `*` is a wildcard for any run of
  characters, and a trailing `\\b` stands for a line without the closing `^` (the pattern
  may be followed by anything).

Reading turns every item back into sing-box's source fields (`domain`, `domain_suffix`,
`ip_cidr` as prefixes, ...), so a binary set matches exactly as its source form does. AdGuard
patterns have no source field: each becomes the `domain` or `domain_suffix` entry it equals,
or an RE2 `domain_regex` with the same matches.

The bytes are untrusted: the compressed file is limited by the loader (64 MiB), the
decompressed body by `MAX_BODY_BYTES`, every count by the bytes left to hold it, logical
nesting by `MAX_DEPTH`, and the text a trie may expand into by `MAX_DECODED_CHARS` (a trie
shares the ends of its keys, so a small one can stand for a great deal of text). Anything
malformed raises `SrsError`; nothing else escapes the reader. Pure: bytes in, data out.
"""

from __future__ import annotations

import ipaddress
import json
import re
import zlib
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from operator import add, itemgetter
from typing import Any

from ztun.route.ruleset import MAX_DEPTH, ParsedRuleSet, RuleSetError, normalize_headless_rules

MAGIC = b"SRS"
#: The newest version sing-box 1.14 writes (5 added package_name_regex).
MAX_VERSION = 5
#: Decompressed bodies larger than this are refused (a zip bomb stops here). Real sets are far
#: smaller: a million domains and suffixes take about 15 MiB.
MAX_BODY_BYTES = 128 * 1024 * 1024
#: Characters all tries of one file may expand into (the keys built while walking them).
MAX_DECODED_CHARS = 256 * 1024 * 1024

_QUERY_TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT",
                     28: "AAAA", 33: "SRV", 64: "SVCB", 65: "HTTPS", 255: "ANY"}  # fmt: skip
_QUERY_TYPE_NUMBERS = {name: number for number, name in _QUERY_TYPE_NAMES.items()}
_INTERFACE_TYPES = ("wifi", "cellular", "ethernet", "other")

# Item numbers (see the module docstring).
_QUERY_TYPE, _NETWORK, _DOMAIN, _KEYWORD, _REGEX = 0, 1, 2, 3, 4
_SOURCE_IP_CIDR, _IP_CIDR, _SOURCE_PORT, _SOURCE_PORT_RANGE, _PORT, _PORT_RANGE = 5, 6, 7, 8, 9, 10
_ADGUARD, _NETWORK_TYPE, _EXPENSIVE, _CONSTRAINED = 16, 18, 19, 20
_INTERFACE_ADDRESS, _DEFAULT_INTERFACE_ADDRESS = 21, 22
_FINAL = 0xFF
#: Items whose payload is a list of strings, by number → source field.
_STRING_ITEMS = {
    _NETWORK: "network", _KEYWORD: "domain_keyword", _REGEX: "domain_regex",
    _SOURCE_PORT_RANGE: "source_port_range", _PORT_RANGE: "port_range", 11: "process_name",
    12: "process_path", 13: "package_name", 14: "wifi_ssid", 15: "wifi_bssid",
    17: "process_path_regex", 23: "package_name_regex",
}  # fmt: skip
_UINT16_ITEMS = {_QUERY_TYPE: "query_type", _SOURCE_PORT: "source_port", _PORT: "port"}

# Trie markers (the first character of an entry, the last of its stored key).
_SUBDOMAINS = "\r"  # a dotted domain_suffix; in an AdGuard pattern: any start
_AND_SUBDOMAINS = "\n"  # a domain_suffix without the dot; AdGuard: `||`
_OPEN_END = "\b"  # AdGuard: no closing `^`
_REGEX_SPECIAL = frozenset("\\.^$|?*+()[]{}")
#: Control bytes other than the three markers never occur in a trie's labels.
_BAD_LABEL = re.compile(rb"[\x00-\x07\x09\x0b\x0c\x0e-\x1f\x7f]")
_BIT_BYTES = bytes.maketrans(b"01", b"\x00\x01")
_MARKER = re.compile("[\r\n\b]")
_BACKWARDS = itemgetter(slice(None, None, -1))
_AFTER_MARKER = itemgetter(slice(1, None))


class SrsError(RuleSetError):
    """A binary rule set that cannot be read or written."""


@dataclass
class BinaryRuleSet:
    """What a .srs file holds: its version and its rules in sing-box's source form."""

    version: int
    rules: list[dict[str, Any]] = field(default_factory=list)
    #: AdGuard patterns were read (and turned into domain, domain_suffix and domain_regex)
    adguard: bool = False


# ---------------------------------------------------------------------------------------------
# Reading


def is_binary(data: bytes) -> bool:
    """True when `data` starts like a .srs file."""
    return data[:3] == MAGIC


def parse_binary(data: bytes) -> ParsedRuleSet:
    """A .srs file → checked headless rules (what the loader uses), with warnings."""
    decoded = read_srs(data)
    warnings: list[str] = []
    rules = normalize_headless_rules(decoded.rules, warnings=warnings)
    if not rules:
        warnings.append("the rule set has no rules; it matches nothing")
    return ParsedRuleSet(rules, warnings)


def read_srs(data: bytes) -> BinaryRuleSet:
    """A .srs file → its version and rules in source form (not yet checked for ztun)."""
    if len(data) < 4 or data[:3] != MAGIC:
        raise SrsError("not a sing-box binary rule set (it does not start with 'SRS')")
    version = data[3]
    if version > MAX_VERSION:
        raise SrsError(f"binary rule-set version {version} is newer than ztun reads "
                       f"(1 to {MAX_VERSION})")  # fmt: skip
    body = _inflate(data[4:])
    reader = _Reader(body, version)
    count = reader.count("rules", 2)
    rules = []
    for i in range(count):
        rules.append(reader.rule(f"rules[{i}]", 0))
    # sing-box stops reading after the last rule; bytes after it are ignored there too.
    return BinaryRuleSet(version, rules, reader.adguard)


def _inflate(compressed: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(compressed, MAX_BODY_BYTES + 1)
    except zlib.error as exc:
        raise SrsError(f"the compressed body is damaged ({exc})") from None
    if len(body) > MAX_BODY_BYTES:
        raise SrsError(f"the rule set unpacks to more than {MAX_BODY_BYTES >> 20} MiB; refused")
    if not inflater.eof:
        raise SrsError("the compressed body is cut short")
    return body


class _Reader:
    """A cursor over the decompressed body; every read checks the bytes left."""

    def __init__(self, data: bytes, version: int) -> None:
        self.data = data
        self.pos = 0
        self.version = version
        self.decoded = 0  # characters the tries have expanded into so far
        self.adguard = False

    def fail(self, where: str, message: str) -> SrsError:
        return SrsError(f"{where}: {message}")

    def byte(self, where: str) -> int:
        if self.pos >= len(self.data):
            raise self.fail(where, "the file ends in the middle of a rule")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def take(self, n: int, where: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail(where, "the file ends in the middle of a rule")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uvarint(self, where: str) -> int:
        value = 0
        for shift in range(0, 70, 7):
            b = self.byte(where)
            if shift == 63 and b > 1:
                break
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
        raise self.fail(where, "a length does not fit in 64 bits")

    def count(self, where: str, min_size: int) -> int:
        """A uvarint count of elements that take at least `min_size` bytes each."""
        n = self.uvarint(where)
        if n * min_size > len(self.data) - self.pos:
            raise self.fail(where, f"claims {n} entries, more than the file holds")
        return n

    def text(self, where: str) -> str:
        raw = self.take(self.count(where, 1), where)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(where, "a string is not UTF-8") from None

    # -- rules ----------------------------------------------------------------------------------

    def rule(self, where: str, depth: int) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise self.fail(where, f"logical rules nested more than {MAX_DEPTH} deep")
        kind = self.byte(where)
        if kind == 0:
            return self.default_rule(where)
        if kind == 1:
            return self.logical_rule(where, depth)
        raise self.fail(where, f"unknown rule kind {kind} (0 default, 1 logical)")

    def logical_rule(self, where: str, depth: int) -> dict[str, Any]:
        mode = self.byte(where)
        if mode not in (0, 1):
            raise self.fail(where, f"unknown logical mode {mode} (0 and, 1 or)")
        count = self.count(f"{where}.rules", 2)
        subs = [self.rule(f"{where}.rules[{i}]", depth + 1) for i in range(count)]
        rule: dict[str, Any] = {"type": "logical", "mode": "or" if mode else "and", "rules": subs}
        if self.byte(where):
            rule["invert"] = True
        return rule

    def default_rule(self, where: str) -> dict[str, Any]:
        items: dict[int, Any] = {}
        while True:
            item = self.byte(where)
            if item == _FINAL:
                break
            name = _ITEM_NAMES.get(item)
            if name is None:
                raise self.fail(where, f"unknown rule item type {item} (from a newer sing-box "
                                       "than ztun knows, or a damaged file)")  # fmt: skip
            # A later item of the same type replaces an earlier one, as in sing-box.
            items[item] = self.item(item, f"{where}.{name}")
        invert = self.byte(where) != 0
        return self.assemble(items, invert, where)

    def item(self, item: int, path: str) -> Any:
        if item in _STRING_ITEMS:
            values = [self.text(path) for _ in range(self.count(path, 1))]
        elif item in _UINT16_ITEMS:
            n = self.count(path, 2)
            raw = self.take(2 * n, path)
            values = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, 2 * n, 2)]
            if item == _QUERY_TYPE:
                values = [_QUERY_TYPE_NAMES.get(v, v) for v in values]
        elif item in (_DOMAIN, _ADGUARD):
            return self.trie_keys(path)
        elif item in (_IP_CIDR, _SOURCE_IP_CIDR):
            values = self.ip_set(path)
        elif item == _NETWORK_TYPE:
            raw = self.take(self.count(path, 1), path)
            values = [_INTERFACE_TYPES[v] if v < len(_INTERFACE_TYPES) else v for v in raw]
        elif item in (_EXPENSIVE, _CONSTRAINED):
            return True
        elif item == _INTERFACE_ADDRESS:
            addresses: dict[str, list[str]] = {}
            for _ in range(self.count(path, 2)):
                kind = self.byte(path)
                name = _INTERFACE_TYPES[kind] if kind < len(_INTERFACE_TYPES) else str(kind)
                addresses[name] = [self.prefix(path) for _ in range(self.count(path, 3))]
            return addresses
        elif item == _DEFAULT_INTERFACE_ADDRESS:
            values = [self.prefix(path) for _ in range(self.count(path, 3))]
        else:  # pragma: no cover - default_rule refused it already
            raise self.fail(path, f"unknown item type {item}")
        if not values:
            raise self.fail(path, "an empty list (sing-box never writes one)")
        return values

    def assemble(self, items: dict[int, Any], invert: bool, where: str) -> dict[str, Any]:
        rule: dict[str, Any] = {}
        domains: list[str] = []
        suffixes: list[str] = []
        regexes: list[str] = []
        if _DOMAIN in items:
            d, s, r = _domain_entries(items[_DOMAIN], f"{where}.domain")
            domains += d
            suffixes += s
            regexes += r
        if _ADGUARD in items:
            self.adguard = True
            d, s, r = _adguard_entries(items[_ADGUARD], f"{where}.adguard_domain")
            domains += d
            suffixes += s
            regexes += r
        for item, value in items.items():
            if item in (_DOMAIN, _ADGUARD):
                continue
            name = _ITEM_NAMES[item]
            if item == _REGEX:
                regexes = list(value) + regexes
            else:
                rule[name] = value
        # Field order as sing-box's decompile writes it.
        ordered: dict[str, Any] = {}
        for name in ("query_type", "network"):
            if name in rule:
                ordered[name] = rule.pop(name)
        if domains:
            ordered["domain"] = domains
        if suffixes:
            ordered["domain_suffix"] = suffixes
        if "domain_keyword" in rule:
            ordered["domain_keyword"] = rule.pop("domain_keyword")
        if regexes:
            ordered["domain_regex"] = regexes
        ordered.update(rule)
        if invert:
            ordered["invert"] = True
        return ordered

    # -- payloads -------------------------------------------------------------------------------

    def prefix(self, path: str) -> str:
        raw = self.take(self.count(path, 1), path)
        if len(raw) not in (4, 16):
            raise self.fail(path, f"an address of {len(raw)} bytes (expected 4 or 16)")
        address = _address(int.from_bytes(raw, "big"), len(raw))
        bits = self.byte(path)
        if bits > address.max_prefixlen:
            raise self.fail(path, f"prefix length {bits} is too long for {address}")
        return str(ipaddress.ip_network(f"{address}/{bits}", strict=False))

    def ip_set(self, path: str) -> list[str]:
        if self.byte(path) != 1:
            raise self.fail(path, "unknown address-set layout (expected 1)")
        n = int.from_bytes(self.take(8, path), "big")
        data, pos, end = self.data, self.pos, len(self.data)
        if n * 10 > end - pos:  # each range holds at least 2 × (1 + 4) bytes
            raise self.fail(path, f"claims {n} address ranges, more than the file holds")
        prefixes: list[str] = []
        # Inlined (no method call per address): a country's set has tens of thousands of ranges.
        # Each address is its length as a one-byte uvarint (4 or 16) and its bytes.
        for _ in range(n):
            size = data[pos] if pos < end else 0
            if size not in (4, 16) or pos + 2 + 2 * size > end or data[pos + 1 + size] != size:
                if size in (4, 16) and pos + 2 + 2 * size > end:
                    raise self.fail(path, "the file ends in the middle of a rule")
                raise self.fail(path, "an address range must be two IPv4 or two IPv6 addresses")
            lo = int.from_bytes(data[pos + 1 : pos + 1 + size], "big")
            pos += 2 + size
            hi = int.from_bytes(data[pos : pos + size], "big")
            pos += size
            if lo > hi:
                raise self.fail(path, f"address range {_address(lo, size)}–"
                                      f"{_address(hi, size)} runs backwards")  # fmt: skip
            prefixes += _range_prefixes(lo, hi, size * 8)
        self.pos = pos
        if not prefixes:
            raise self.fail(path, "an empty address set (sing-box never writes one)")
        return prefixes

    def trie_keys(self, path: str) -> list[str]:
        """A succinct trie → its keys, each turned back to front (entries with their marker).

        Level by level: the keys of one level all have the same length, and the next level's
        are this level's, each repeated once per child, plus the children's labels — built
        with map/zip over whole levels instead of a Python step per node (three times faster
        on a 120 000-entry set).
        """
        self.byte(path)  # the trie's own version byte: sing-box ignores it
        leaves = self.take(8 * self.count(path, 8), path)
        bitmap = self.take(8 * self.count(path, 8), path)
        labels = self.take(self.count(path, 1), path)
        bits = _bit_string(bitmap)
        runs = bits.split("1")  # runs[n]: one "0" per child of node n; the last is padding
        nodes = len(runs) - 1
        if nodes < 1 or nodes != len(labels) + 1 or len(bits) - nodes != len(labels):
            raise self.fail(path, "the domain set is malformed (its bitmap and labels disagree)")
        if _BAD_LABEL.search(labels):
            raise self.fail(path, "the domain set holds control characters")
        counts = list(map(len, runs[:nodes]))
        leaf_flags = _bit_string(leaves)[:nodes].encode("ascii").translate(_BIT_BYTES)
        text = labels.decode("latin-1")  # byte n is character n; UTF-8 is decoded per key
        found: list[str] = []
        level = [""]
        start = at = 0
        decoded = self.decoded
        depth = 0
        while level:
            end = start + len(level)
            found += compress(level, leaf_flags[start:end])
            children = counts[start:end]
            total = sum(children)
            if total > len(text) - at:
                raise self.fail(path, "the domain set is malformed (a node has no parent)")
            depth += 1
            decoded += total * depth
            if decoded > MAX_DECODED_CHARS:
                raise self.fail(path, "the domain sets expand to more than "
                                      f"{MAX_DECODED_CHARS >> 20} MiB of text")  # fmt: skip
            parents = chain.from_iterable(map(repeat, level, children))
            level = list(map(add, parents, text[at : at + total]))
            at += total
            start = end
        if start != nodes:
            raise self.fail(path, "the domain set is malformed (unreachable nodes)")
        self.decoded = decoded
        if not found:
            raise self.fail(path, "an empty domain set (sing-box never writes one)")
        if found[0] == "":  # only the root, the first node, can spell the empty key
            raise self.fail(path, "the domain set holds an empty entry")
        if not text.isascii():
            try:
                found = [key.encode("latin-1").decode("utf-8") for key in found]
            except UnicodeDecodeError:
                raise self.fail(path, "a domain entry is not UTF-8") from None
        return list(map(_BACKWARDS, found))


_ITEM_NAMES: dict[int, str] = {
    **_STRING_ITEMS, **_UINT16_ITEMS, _DOMAIN: "domain", _ADGUARD: "adguard_domain",
    _IP_CIDR: "ip_cidr", _SOURCE_IP_CIDR: "source_ip_cidr", _NETWORK_TYPE: "network_type",
    _EXPENSIVE: "network_is_expensive", _CONSTRAINED: "network_is_constrained",
    _INTERFACE_ADDRESS: "network_interface_address",
    _DEFAULT_INTERFACE_ADDRESS: "default_interface_address",
}  # fmt: skip


def _bit_string(words: bytes) -> str:
    """Big-endian 64-bit words → '0'/'1' characters, bit 0 (the low bit of word 0) first.
    Trailing zeros are dropped (they are padding)."""
    if not words:
        return ""
    little = bytearray(len(words))
    for k in range(8):  # each word's bytes reversed: the whole array becomes one LE integer
        little[k::8] = words[7 - k :: 8]
    value = int.from_bytes(little, "little")
    return format(value, "b")[::-1] if value else ""


def _address(value: int, size: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.IPv4Address(value) if size == 4 else ipaddress.IPv6Address(value)


def _range_prefixes(lo: int, hi: int, width: int) -> list[str]:
    """The fewest prefixes covering lo..hi (ipaddress.summarize_address_range, with plain ints:
    it is several times faster on the tens of thousands of ranges of a country's set)."""
    out = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << width
        while size > hi - lo + 1:
            size >>= 1
        bits = width - (size.bit_length() - 1)
        if width == 32:
            out.append(f"{lo >> 24}.{(lo >> 16) & 255}.{(lo >> 8) & 255}.{lo & 255}/{bits}")
        else:
            out.append(f"{ipaddress.IPv6Address(lo)}/{bits}")
        lo += size
    return out


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in text)


def _domain_entries(keys: list[str], path: str) -> tuple[list[str], list[str], list[str]]:
    """Domain-set entries → (domain, domain_suffix, domain_regex) lists.

    Sorted, the entries fall into runs by their first character: `\\n` (suffix), `\\r`
    (subdomains only), then exact names; slicing the runs avoids a Python step per entry.
    """
    keys = sorted(keys)
    with_suffix = bisect_left(keys, _AND_SUBDOMAINS)
    subdomains = bisect_left(keys, _SUBDOMAINS)
    names = bisect_left(keys, chr(ord(_SUBDOMAINS) + 1))
    if with_suffix or subdomains != bisect_left(keys, chr(ord(_AND_SUBDOMAINS) + 1)):
        raise SrsError(f"{path}: a domain entry starts with a control character")
    suffixes = list(map(_AFTER_MARKER, keys[with_suffix:subdomains]))
    under = list(map(_AFTER_MARKER, keys[subdomains:names]))
    exact = keys[names:]
    marked = suffixes + under
    if "" in marked or _MARKER.search("\0".join(marked)):
        raise SrsError(f"{path}: a malformed domain entry (a marker inside a name, or nothing "
                       "after it)")  # fmt: skip
    if _MARKER.search("\0".join(exact)):
        raise SrsError(f"{path}: a malformed domain entry (a marker inside a name)")
    # Never written by sing-box: `\\r` before a name without a dot means "ends with it".
    regexes = [f"{_regex_escape(rest)}$" for rest in under if rest[0] != "."]
    dotted = [rest for rest in under if rest[0] == "."] if regexes else under
    # A version-1 file stores `domain_suffix: x` as `x` plus `.x`: put it back together.
    names_set = set(exact)
    joined = {rest[1:] for rest in dotted if rest[1:] in names_set}
    if joined:
        exact = [name for name in exact if name not in joined]
        dotted = [rest for rest in dotted if rest[1:] not in joined]
        suffixes = sorted(suffixes + list(joined))
    return exact, sorted(suffixes + dotted) if dotted else suffixes, regexes


def _adguard_entries(keys: list[str], path: str) -> tuple[list[str], list[str], list[str]]:
    """AdGuard patterns → the domain, domain_suffix and RE2 domain_regex entries matching the
    same names as sing-box's AdGuard matcher."""
    domains: list[str] = []
    suffixes: list[str] = []
    regexes: list[str] = []
    for key in keys:
        start, body = "|", key
        if key[0] in (_SUBDOMAINS, _AND_SUBDOMAINS):
            start, body = key[0], key[1:]
        open_end = body.endswith(_OPEN_END)
        if open_end:
            body = body[:-1]
        if not body or "\r" in body or "\n" in body or "\b" in body:
            # (nothing left but markers would be a pattern matching every name)
            raise SrsError(f"{path}: a malformed AdGuard pattern {json.dumps(key)}")
        if body and "*" not in body and not open_end and start != _SUBDOMAINS:
            (suffixes if start == _AND_SUBDOMAINS else domains).append(body)
            continue
        head = {"|": "^", _AND_SUBDOMAINS: r"(?:^|\.)", _SUBDOMAINS: ""}[start]
        middle = ".*".join(_regex_escape(part) for part in body.split("*"))
        regexes.append(f"{head}{middle}{'' if open_end else '$'}")
    return domains, suffixes, regexes


# ---------------------------------------------------------------------------------------------
# Writing

#: Fields ztun reads in a rule set that sing-box's binary format has no item for.
_ZTUN_ONLY = ("ip_is_private", "source_ip_is_private", "geoip", "source_geoip", "protocol",
              "ip_version", "auth_user")  # fmt: skip


def write_srs(rules: Sequence[Mapping[str, Any]], version: int = 2) -> bytes:
    """Checked headless rules (source form) → a .srs file sing-box reads.

    `version` 1 writes `domain_suffix` the old way (for sing-box before 1.10); 2, the default,
    is what sing-box writes for every set ztun can express.
    """
    if version not in (1, 2):
        raise SrsError(f"ztun writes binary versions 1 and 2, not {version}")
    out = bytearray()
    _put_uvarint(out, len(rules))
    for i, rule in enumerate(rules):
        _write_rule(out, rule, version, f"rules[{i}]")
    return MAGIC + bytes([version]) + zlib.compress(bytes(out), 9)


def _put_uvarint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_strings(out: bytearray, item: int, values: Iterable[str]) -> None:
    values = list(values)
    out.append(item)
    _put_uvarint(out, len(values))
    for value in values:
        raw = value.encode("utf-8")
        _put_uvarint(out, len(raw))
        out += raw


def _put_uint16s(out: bytearray, item: int, values: list[int]) -> None:
    out.append(item)
    _put_uvarint(out, len(values))
    for value in values:
        out += value.to_bytes(2, "big")


def _listed(rule: Mapping[str, Any], name: str) -> list[Any]:
    value = rule.get(name)
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _write_rule(out: bytearray, rule: Mapping[str, Any], version: int, where: str) -> None:
    if rule.get("type") == "logical":
        out.append(1)
        out.append(1 if rule.get("mode") == "or" else 0)
        subs = _listed(rule, "rules")
        _put_uvarint(out, len(subs))
        for i, sub in enumerate(subs):
            _write_rule(out, sub, version, f"{where}.rules[{i}]")
        out.append(1 if rule.get("invert") else 0)
        return
    for name in _ZTUN_ONLY:
        if name in rule:
            raise SrsError(f"{where}.{name}: sing-box rule sets have no '{name}', so the binary "
                           "format cannot hold it")  # fmt: skip
    for name in rule:
        if name not in _WRITABLE:
            raise SrsError(f"{where}.{name}: ztun cannot write '{name}' to a binary rule set")
    out.append(0)
    if types := _listed(rule, "query_type"):
        numbers = []
        for q in types:
            number = q if isinstance(q, int) else _QUERY_TYPE_NUMBERS.get(str(q).upper())
            if number is None or not 0 <= number <= 65535:
                raise SrsError(f"{where}.query_type: '{q}' is not a DNS query type")
            numbers.append(number)
        _put_uint16s(out, _QUERY_TYPE, numbers)
    if networks := _listed(rule, "network"):
        _put_strings(out, _NETWORK, networks)
    domains = [_fold(d) for d in _listed(rule, "domain")]
    suffixes = [_fold(s) for s in _listed(rule, "domain_suffix")]
    if domains or suffixes:
        out.append(_DOMAIN)
        out += _trie_bytes(_domain_keys(domains, suffixes, version))
    if keywords := _listed(rule, "domain_keyword"):
        _put_strings(out, _KEYWORD, [k.lower() for k in keywords])
    if regexes := _listed(rule, "domain_regex"):
        _put_strings(out, _REGEX, regexes)
    for name, item in (("source_ip_cidr", _SOURCE_IP_CIDR), ("ip_cidr", _IP_CIDR)):
        if prefixes := _listed(rule, name):
            out.append(item)
            out += _ip_set_bytes(prefixes, f"{where}.{name}")
    for name, item in (("source_port", _SOURCE_PORT), ("source_port_range", _SOURCE_PORT_RANGE),
                       ("port", _PORT), ("port_range", _PORT_RANGE)):  # fmt: skip
        if values := _listed(rule, name):
            if item in (_SOURCE_PORT, _PORT):
                if not all(isinstance(v, int) and 0 <= v <= 65535 for v in values):
                    raise SrsError(f"{where}.{name}: ports are integers 0 to 65535")
                _put_uint16s(out, item, values)
            else:
                _put_strings(out, item, values)
    out.append(_FINAL)
    out.append(1 if rule.get("invert") else 0)


_WRITABLE = frozenset({
    "type", "query_type", "network", "domain", "domain_suffix", "domain_keyword", "domain_regex",
    "source_ip_cidr", "ip_cidr", "source_port", "source_port_range", "port", "port_range",
    "invert",
})  # fmt: skip


def _fold(entry: str) -> str:
    # ztun compares names in lower case and without the root dot; sing-box compares entries
    # as written, so the file gets them the way ztun matches them.
    entry = entry.lower()
    return entry[:-1] if entry.endswith(".") and len(entry) > 1 else entry


def _domain_keys(domains: list[str], suffixes: list[str], version: int) -> list[bytes]:
    seen: set[str] = set()
    entries: list[str] = []
    for suffix in suffixes:
        if suffix in seen:
            continue
        seen.add(suffix)
        if suffix.startswith("."):
            entries.append(_SUBDOMAINS + suffix)
        elif version == 1:
            entries.append(suffix)
            if "." + suffix not in seen:
                seen.add("." + suffix)
                entries.append(_SUBDOMAINS + "." + suffix)
        else:
            entries.append(_AND_SUBDOMAINS + suffix)
    for domain in domains:
        if domain not in seen:  # a suffix of the same name already covers it
            seen.add(domain)
            entries.append(domain)
    return sorted({entry[::-1].encode("utf-8") for entry in entries})


def _trie_bytes(keys: list[bytes]) -> bytes:
    """Sorted, distinct keys → the succinct trie layout (breadth first, as described above).

    Built a level at a time: in breadth-first order the nodes of one level are the distinct
    prefixes of that length in sorted order, so each level is a few map/dict passes over the
    keys still long enough (about ten times faster than grouping keys node by node).
    """
    keyset = set(keys)
    leaves: list[int] = []
    bits: list[str] = []
    labels = bytearray()
    level: list[bytes] = [b""]
    alive = [k for k in keys if k]
    node = 0
    depth = 0
    while level:
        leaves += compress(range(node, node + len(level)), map(keyset.__contains__, level))
        node += len(level)
        depth += 1
        following = list(dict.fromkeys(map(itemgetter(slice(0, depth)), alive)))
        children = Counter(map(itemgetter(slice(0, depth - 1)), following))
        bits += ["0" * children.get(p, 0) + "1" for p in level]
        labels += bytes(map(itemgetter(-1), following))
        alive = [k for k in alive if len(k) > depth]
        level = following
    out = bytearray([0])
    leaf_bits = bytearray(b"0" * (leaves[-1] + 1 if leaves else 0))
    for n in leaves:
        leaf_bits[n] = 0x31  # "1"
    out += _words(leaf_bits.decode("ascii"))
    out += _words("".join(bits))
    _put_uvarint(out, len(labels))
    out += labels
    return bytes(out)


def _words(bits: str) -> bytes:
    """'0'/'1' characters (bit 0 first) as a uvarint word count and big-endian 64-bit words."""
    count = (len(bits) + 63) // 64
    little = (int(bits[::-1], 2) if bits else 0).to_bytes(8 * count, "little")
    big = bytearray(len(little))
    for k in range(8):
        big[k::8] = little[7 - k :: 8]
    out = bytearray()
    _put_uvarint(out, count)
    return bytes(out + big)


_IPV4_PREFIX = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?:/(\d{1,2}))?")


def _ip_set_bytes(prefixes: list[str], where: str) -> bytes:
    ranges: dict[int, list[list[int]]] = {4: [], 6: []}
    for text in prefixes:
        text = str(text)
        # IPv4 without ipaddress objects: ten times faster for a country's list.
        m = _IPV4_PREFIX.fullmatch(text)
        if m is not None:
            a, b, c, d, bits = m.groups()
            length = 32 if bits is None else int(bits)
            octets = (int(a), int(b), int(c), int(d))
            if max(octets) <= 255 and length <= 32 and (len(a) == 1 or a[0] != "0"):
                value = (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]
                host = (1 << (32 - length)) - 1
                ranges[4].append([value & ~host, value | host])
                continue
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise SrsError(f"{where}: '{text}' is not an IP address or CIDR prefix") from None
        ranges[net.version].append([int(net.network_address), int(net.broadcast_address)])
    out = bytearray([1])
    merged: list[tuple[int, list[int]]] = []
    for family in (4, 6):
        current: list[list[int]] = []
        for lo, hi in sorted(ranges[family]):
            if current and lo <= current[-1][1] + 1:
                current[-1][1] = max(current[-1][1], hi)
            else:
                current.append([lo, hi])
        merged += [(family, r) for r in current]
    out += len(merged).to_bytes(8, "big")
    for family, (lo, hi) in merged:
        size = 4 if family == 4 else 16
        for value in (lo, hi):
            _put_uvarint(out, size)
            out += value.to_bytes(size, "big")
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# Source JSON


def source_json(rules: Sequence[Mapping[str, Any]], version: int) -> str:
    """Headless rules → sing-box source JSON, one-item lists written as the bare value (as
    sing-box's decompile writes them)."""

    def compact(rule: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in rule.items():
            if key == "rules":
                out[key] = [compact(sub) for sub in value]
            elif isinstance(value, list) and len(value) == 1:
                out[key] = value[0]
            else:
                out[key] = value
        return out

    return json.dumps({"version": max(1, min(version, MAX_VERSION)),
                       "rules": [compact(r) for r in rules]}, indent=2,
                      ensure_ascii=False) + "\n"  # fmt: skip
