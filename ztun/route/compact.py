"""Compact forms of a rule set's big lists: names and CIDRs in packed arrays, no object per entry.

A geosite category or a country's CIDRs runs to hundreds of thousands of entries. Held as a
`frozenset` of `str` each name costs ~100 bytes (a str object and a set slot), and the lists the
parser made cost as much again; at 1.8M entries ztun sat at 393 MiB against sing-box's 81 MiB.
Here every entry is a few bytes in a packed array:

- `DomainTable` (`domain` + `domain_suffix` of one rule): the names, lower case, as one UTF-8
  blob; per name a 32-bit start offset whose top 3 bits are its flags (an exact `domain`, a
  suffix that matches itself, a suffix whose subdomains match); and an open-addressing hash
  table of 32-bit slots (entry index in the low bits, the top bits of the name's CRC-32 as a
  tag) at half load. A probe compares the tag, then the name's bytes in the blob, so an
  answer is exact: no false positives, whatever the hash. 12 bytes per entry plus the name.
- `IPRangeSet` (`ip_cidr`, `source_ip_cidr`): merged, sorted start/end ranges in `array('I')`
  for IPv4 and `array('Q')` pairs (high and low 64 bits) for IPv6; lookup by bisect.

The options of the issue, measured with a short script on the shared 2-core development
machine (Python 3.11, 200k generated names of ~20 bytes, one run each, 2026-11-30):

| exact-name structure | bytes per entry (incl. the name) | one probe |
| --- | --- | --- |
| `frozenset` of `bytes` | 98 | 0.05 µs |
| sorted `array('Q')` of blake2b-64 hashes, offsets | 8 + 4 + name | 0.6 µs hash + 1.1 µs bisect |
| this table (CRC-32 tag in the slot, offset) | 8 + 4 + name | 0.07 µs hash + ~0.3 µs probe |

blake2b costs 0.58 µs per call (the hashlib object), CRC-32 0.07 µs; bisect over an array
boxes an int per step (21 steps at 1.8M), and a suffix walk probes once per label, so a hash
table wins. CRC-32's weakness costs only probe length, never correctness (the name is always
compared). At a load of 2/3 the slots cost 6 bytes instead of 8, but a miss probes ~5 slots
instead of ~2.5: a four-label lookup measured 2.5 µs against 2.15 µs at half load, and the
engine's budget is 5 µs (the whole `DomainItem`: ~2 µs, the frozensets ~1 µs). Every structure
is written as raw sections and read back with one copy (`ztun.route.compiled`), so a cached set
is used without rebuilding it.

Pure: no I/O.
"""

from __future__ import annotations

import heapq
import ipaddress
import re
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ztun.address import MAX_NAME

#: The array type codes of unsigned 32- and 64-bit integers on this machine.
U32 = next(code for code in "IL" if array(code).itemsize == 4)
U64 = next(code for code in "LQ" if array(code).itemsize == 8)

#: Flags of one name in a DomainTable.
DOMAIN = 1  # listed in `domain`: the name itself matches
SELF = 2  # listed in `domain_suffix` without a leading dot: the name itself matches
UNDER = 4  # listed in `domain_suffix`: every subdomain matches
_EXACT = DOMAIN | SELF
_ANY = DOMAIN | SELF | UNDER
_FLAG_SHIFT = 29
_POSITION = (1 << _FLAG_SHIFT) - 1
#: The name blob is addressed by 29-bit offsets (512 MiB; rule-set files stop at 64 MiB).
MAX_BLOB = _POSITION
#: Lists shorter than this stay as they are: a few entries gain nothing from packing, and the
#: plain items name the exact CIDR text that matched in `ztun route`.
PACK_MIN_ENTRIES = 64
#: Reserved keys a packed rule carries instead of its lists (the parsers refuse any field that
#: is not sing-box's, so no file can spell them).
PACKED_DOMAINS = "$domains"
PACKED_CIDRS = {"ip_cidr": "$ip_cidr", "source_ip_cidr": "$source_ip_cidr"}
PREVIEW = 3


def _encode(name: str) -> bytes:
    # surrogatepass: every str has one encoding, so byte equality is str equality.
    return name.encode("utf-8", "surrogatepass")


class DomainTable:
    """A rule's `domain` and `domain_suffix` lists, packed (see the module's docstring)."""

    __slots__ = ("_blob", "_dots", "_parts", "_slots", "_starts", "counts", "preview")

    def __init__(
        self, blob: bytes, starts: array[int], slots: array[int], *,
        counts: tuple[int, int], preview: tuple[list[str], list[str]], dots: tuple[int, int],
    ) -> None:  # fmt: skip
        n = len(starts) - 1
        if n < 0 or len(slots) <= n or len(blob) > MAX_BLOB:
            raise ValueError("inconsistent domain table")
        self._blob = blob
        self._starts = starts
        self._slots = slots
        #: the fewest and most dots of a name listed with UNDER (none: fewest > most)
        self._dots = dots
        ibits = (n + 1).bit_length()
        self._parts = (slots, len(slots), ibits, (1 << ibits) - 1, starts, blob, *dots)
        #: how many `domain` and `domain_suffix` entries the lists had
        self.counts = counts
        #: the first few of each list, as written, for messages
        self.preview = preview

    @classmethod
    def build(cls, domains: Iterable[str], suffixes: Iterable[str]) -> DomainTable:
        """Pack the lists; names fold to lower case and lose a root dot, as sing-box's do."""
        builder = DomainTableBuilder()
        builder.add_domains(domains)
        builder.add_suffixes(suffixes)
        return builder.build()

    def __len__(self) -> int:
        return len(self._starts) - 1

    def flags(self, name: bytes) -> int:
        """The flags of `name` (0: not in the table)."""
        return self._walk(name, -1)

    def _walk(self, name: bytes, first: int) -> int:
        """With `first` >= 0: probe `name` as a whole (DOMAIN or SELF), then each parent after a
        dot (UNDER): the flags of the first hit (UNDER alone for a parent), else 0. With
        `first` < 0: the flags `name` is listed with, else 0.

        One function with everything in locals: a method call or an attribute read per probe
        cost more than the probe itself (measured 3.3 µs → 2.0 µs p50 for a 4-label name).
        Parents with fewer or more dots than any listed suffix are not probed (`_dots`): a
        list without bare top-level domains never costs a probe for `com`.
        """
        slots, size, ibits, imask, starts, blob, fewest, most = self._parts
        crc32 = zlib.crc32
        want = _EXACT if first >= 0 else _ANY
        i = -1
        part = name
        dots = name.count(b".") if first >= 0 else 0
        try:
            while True:
                h = crc32(part)
                tag = h >> ibits
                length = len(part)
                j = h % size
                while slot := slots[j]:  # a table always has empty slots (checked when read)
                    if slot >> ibits == tag:
                        # A negative index (slot index bits 0) reads the blob's end: no match.
                        e = (slot & imask) - 1
                        start = starts[e]
                        position = start & _POSITION
                        if (starts[e + 1] & _POSITION) - position == length and (
                            blob.startswith(part, position)
                        ):
                            if start >> _FLAG_SHIFT & want:
                                return UNDER if want == UNDER else start >> _FLAG_SHIFT
                            break
                    j += 1
                    if j == size:
                        j = 0
                # The next parent: the longest one no longer than the longest listed suffix.
                while True:
                    dots -= 1
                    if dots < fewest:
                        return 0
                    i = name.find(b".", i + 1)
                    if dots <= most:
                        break
                part = name[i + 1 :]
                want = UNDER
        except IndexError:  # only a damaged table indexes outside its arrays
            return 0

    def matched(self, domain: str) -> tuple[str, int] | None:
        """The listed name that covers `domain` and its flags, or None."""
        if not domain or len(domain) > MAX_NAME:
            return None
        name = _encode(domain)
        flag = self._walk(name, -1)
        if flag & _EXACT:
            return domain, flag
        i = name.find(b".")
        while i >= 0:
            parent = name[i + 1 :]
            if self._walk(parent, -1) & UNDER:
                return parent.decode("utf-8", "surrogatepass"), UNDER
            i = name.find(b".", i + 1)
        return None

    def match(self, domain: str) -> bool:
        # A name longer than any DNS name (which no parser lets through) matches nothing.
        if not domain or len(domain) > MAX_NAME:
            return False
        return self._walk(domain.encode("utf-8", "surrogatepass"), 0) != 0

    def lists(self) -> tuple[list[str], list[str]]:
        """(`domain`, `domain_suffix`) lists that mean the same as this table: lower case, no
        root dot, each name once, in the order first seen."""
        domains: list[str] = []
        suffixes: list[str] = []
        starts, blob = self._starts, self._blob
        for i in range(len(starts) - 1):
            start = starts[i]
            name = blob[start & _POSITION : starts[i + 1] & _POSITION].decode(
                "utf-8", "surrogatepass"
            )
            flags = start >> _FLAG_SHIFT
            if flags & DOMAIN:
                domains.append(name)
            if flags & SELF:
                suffixes.append(name)
            elif flags & UNDER:
                suffixes.append("." + name)
        return domains, suffixes

    def sections(self) -> list[bytes | memoryview]:
        """The raw sections `from_sections` reads back."""
        return [memoryview(self._starts).cast("B"), memoryview(self._slots).cast("B"),
                self._blob]  # fmt: skip

    def meta(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "preview": [list(p) for p in self.preview],
                "dots": list(self._dots)}  # fmt: skip

    @classmethod
    def from_sections(cls, sections: Sequence[memoryview], meta: Any) -> DomainTable:
        """Over buffers (a cached file): raises ValueError when they do not fit together."""
        if len(sections) != 3 or not isinstance(meta, dict):
            raise ValueError("a domain table has three sections")
        starts, slots = (_ints(s, 4) for s in sections[:2])
        blob = bytes(sections[2])  # `bytes.startswith` compares in place
        counts, preview, dots = meta.get("counts"), meta.get("preview"), meta.get("dots")
        if not (_int_pair(counts) and _int_pair(dots) and isinstance(preview, list)
                and len(preview) == 2 and all(isinstance(p, list) for p in preview)
                and all(isinstance(s, str) for p in preview for s in p)):  # fmt: skip
            raise ValueError("bad domain table description")
        n = len(starts) - 1
        if n < 0 or (starts[n] & _POSITION) != len(blob) or len(slots) != _table_size(n):
            raise ValueError("domain table sections do not fit together")
        if 0 not in slots:  # a probe ends at an empty slot: a table without one would never end
            raise ValueError("domain table without empty slots")
        return cls(blob, starts, slots, counts=(counts[0], counts[1]),
                   preview=(list(preview[0]), list(preview[1])),
                   dots=(dots[0], dots[1]))  # fmt: skip


class DomainTableBuilder:
    """A `DomainTable` filled one name at a time (a streamed rule set, `route.source_stream`).

    Each new name goes straight into the blob and the offsets; a duplicate is found through a
    growing open-addressing index over the same blob, so no set, dict or list of the names is
    held while building: ~17 bytes per name besides the name itself, where a dict of `bytes`
    keys costs ~90 and the parser's list of `str` ~80 more. `build` then lays out the table
    exactly as it always was (entries in the order first seen, the same slots).
    """

    __slots__ = ("_blob", "_dots", "_hashes", "_index", "_starts", "counts", "preview")

    def __init__(self) -> None:
        self._blob = bytearray()
        #: per name: its start in the blob with its flags in the top bits
        self._starts: array[int] = array(U32)
        #: per name: its CRC-32, to grow the index and lay out the table without rehashing
        self._hashes: array[int] = array(U32)
        #: entry + 1 per slot (0: empty), at most half full
        self._index: array[int] = array(U32, bytes(4 * 64))
        #: the fewest and most dots of a name listed with UNDER (none: fewest > most)
        self._dots = [MAX_NAME, 0]
        self.counts = [0, 0]
        self.preview: tuple[list[str], list[str]] = ([], [])

    def add_domains(self, names: Iterable[str]) -> None:
        self._extend(names, suffixes=False)

    def add_suffixes(self, names: Iterable[str]) -> None:
        self._extend(names, suffixes=True)

    def _extend(self, names: Iterable[str], *, suffixes: bool) -> None:
        # One loop with everything in locals: a call per name made building ~2x slower.
        blob, starts, hashes, index = self._blob, self._starts, self._hashes, self._index
        preview = self.preview[suffixes]
        crc32 = zlib.crc32
        size = len(index)
        fewest, most = self._dots
        count = 0
        flag = DOMAIN << _FLAG_SHIFT
        for name in names:
            count += 1
            if len(preview) < PREVIEW:
                preview.append(name)
            name = name.lower().rstrip(".")
            if suffixes:
                flag = (UNDER if name.startswith(".") else UNDER | SELF) << _FLAG_SHIFT
                name = name.lstrip(".")
            key = name.encode("utf-8", "surrogatepass")  # as _encode
            if suffixes:
                dots = key.count(b".")
                fewest, most = min(fewest, dots), max(most, dots)
            h = crc32(key)
            j = h % size
            last = len(starts) - 1
            while slot := index[j]:
                e = slot - 1
                start = starts[e] & _POSITION
                end = len(blob) if e == last else starts[e + 1] & _POSITION
                if end - start == len(key) and blob.startswith(key, start):
                    starts[e] |= flag
                    break
                j = j + 1 if j + 1 < size else 0
            else:
                if len(blob) + len(key) > MAX_BLOB:
                    raise ValueError("too many names for one domain table")
                index[j] = len(starts) + 1
                starts.append(len(blob) | flag)
                hashes.append(h)
                blob += key
                if 2 * len(starts) >= size:
                    size *= 2
                    index = self._index = self._reindex(size)
        self._dots = [fewest, most]
        self.counts[suffixes] += count

    def _reindex(self, size: int) -> array[int]:
        index = array(U32, bytes(4 * size))
        for i, h in enumerate(self._hashes):
            j = h % size
            while index[j]:
                j = j + 1 if j + 1 < size else 0
            index[j] = i + 1
        return index

    def build(self) -> DomainTable:
        """The table; the builder is spent (its buffers move into it)."""
        n = len(self._starts)
        ibits = (n + 1).bit_length()
        if ibits > 24:  # 16M names; rule-set files stop far below
            raise ValueError("too many names for one domain table")
        self._index = array(U32)  # the building index goes before the table's slots come
        starts = self._starts
        starts.append(len(self._blob))
        blob = bytes(self._blob)
        self._blob = bytearray()
        size = _table_size(n)
        slots = array(U32, bytes(4 * size))
        shift = 32 - ibits
        for i, h in enumerate(self._hashes):
            j = h % size
            while slots[j]:
                j = j + 1 if j + 1 < size else 0
            slots[j] = (i + 1) | (h >> ibits << ibits if shift else 0)
        self._hashes = array(U32)
        return DomainTable(blob, starts, slots, counts=(self.counts[0], self.counts[1]),
                           preview=self.preview, dots=(self._dots[0], self._dots[1]))  # fmt: skip


def _int_pair(value: Any) -> bool:
    if not isinstance(value, list) or len(value) != 2:
        return False
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _ints(buffer: memoryview, size: int) -> array[int]:
    """A copy of a section as an array (the file's buffer is not kept: see compiled_cache)."""
    if len(buffer) % size:
        raise ValueError("section length is not a whole number of integers")
    values = array(U32 if size == 4 else U64)
    values.frombytes(buffer)
    return values


# ---------------------------------------------------------------------------------------------
# Addresses

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_LOW = (1 << 64) - 1


class IPRangeSet:
    """A set of IP prefixes as sorted, merged integer ranges per family; lookup by bisect.

    IPv4 ranges are `array('I')` starts and ends; IPv6 ones `array('Q')` pairs (the high and the
    low 64 bits of each start and end): 8 bytes per IPv4 range and 32 per IPv6 one, where
    lists of Python ints cost ~80.
    """

    __slots__ = ("_e4", "_e6h", "_e6l", "_s4", "_s6h", "_s6l", "preview")

    def __init__(self, networks: Iterable[_Network] = (), preview: Sequence[str] = ()) -> None:
        self._fill((_span_of(net) for net in networks), preview)

    @classmethod
    def from_texts(cls, texts: Iterable[str], preview: Sequence[str] = ()) -> IPRangeSet:
        """From CIDR texts as `parse_prefix` reads them; ValueError names a bad one."""
        table = cls.__new__(cls)
        table._fill((prefix_span(t) for t in texts), preview)
        return table

    def _fill(self, spans: Iterable[tuple[int, int, int]], preview: Sequence[str]) -> None:
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        for version, first, last in spans:
            (v4 if version == 4 else v6).append((first, last))
        starts4, ends4 = _merge(v4)
        starts6, ends6 = _merge(v6)
        self._s4: array[int] = array(U32, starts4)
        self._e4: array[int] = array(U32, ends4)
        self._s6h: array[int] = array(U64, (s >> 64 for s in starts6))
        self._s6l: array[int] = array(U64, (s & _LOW for s in starts6))
        self._e6h: array[int] = array(U64, (e >> 64 for e in ends6))
        self._e6l: array[int] = array(U64, (e & _LOW for e in ends6))
        #: the first few prefixes as written, for messages
        self.preview = list(preview)

    def _index(self, ip: Any) -> tuple[int, int] | None:
        """(family, index) of the range holding `ip`, or None."""
        value = int(ip)
        if ip.version == 4:
            i = bisect_right(self._s4, value) - 1
            return (4, i) if i >= 0 and value <= self._e4[i] else None
        high, low = value >> 64, value & _LOW
        starts_high = self._s6h
        first = bisect_left(starts_high, high)
        end = bisect_right(starts_high, high, first)
        # Among the ranges starting in this /64 the low halves are sorted too.
        i = bisect_right(self._s6l, low, first, end) - 1 if end > first else first - 1
        if i < first:
            i = first - 1
        if i < 0:
            return None
        end_high = self._e6h[i]
        if high < end_high or (high == end_high and low <= self._e6l[i]):
            return 6, i
        return None

    def __contains__(self, ip: Any) -> bool:
        return self._index(ip) is not None

    def covering(self, ip: Any) -> str | None:
        """The prefix of the merged ranges that holds `ip` (for `ztun route`), or None."""
        found = self._index(ip)
        if found is None:
            return None
        family, i = found
        if family == 4:
            first = ipaddress.IPv4Address(self._s4[i])
            last = ipaddress.IPv4Address(self._e4[i])
        else:
            first = ipaddress.IPv6Address(self._s6h[i] << 64 | self._s6l[i])
            last = ipaddress.IPv6Address(self._e6h[i] << 64 | self._e6l[i])
        for net in ipaddress.summarize_address_range(first, last):  # type: ignore[type-var]
            if ip in net:
                return str(net)
        return None  # pragma: no cover - the range holds ip

    def __len__(self) -> int:
        return len(self._s4) + len(self._s6h)

    def prefixes(self) -> list[str]:
        """CIDRs covering exactly these ranges (the merged ranges, not the texts listed)."""
        out: list[str] = []
        spans = [(ipaddress.IPv4Address(a), ipaddress.IPv4Address(b))
                 for a, b in zip(self._s4, self._e4, strict=True)]  # fmt: skip
        spans6 = [(ipaddress.IPv6Address(sh << 64 | sl), ipaddress.IPv6Address(eh << 64 | el))
                  for sh, sl, eh, el in zip(self._s6h, self._s6l, self._e6h, self._e6l,
                                            strict=True)]  # fmt: skip
        for first, last in [*spans, *spans6]:
            out += (str(n) for n in ipaddress.summarize_address_range(first, last))  # type: ignore[type-var]
        return out

    def sections(self) -> list[memoryview]:
        return [memoryview(a).cast("B") for a in (self._s4, self._e4, self._s6h, self._s6l,
                                                  self._e6h, self._e6l)]  # fmt: skip

    def meta(self) -> dict[str, Any]:
        return {"preview": list(self.preview)}

    @classmethod
    def from_sections(cls, sections: Sequence[memoryview], meta: Any) -> IPRangeSet:
        """Over buffers (a cached file): raises ValueError when they do not fit together."""
        if len(sections) != 6 or not isinstance(meta, dict):
            raise ValueError("a CIDR table has six sections")
        preview = meta.get("preview")
        if not isinstance(preview, list) or not all(isinstance(p, str) for p in preview):
            raise ValueError("bad CIDR table description")
        s4, e4 = (_ints(s, 4) for s in sections[:2])
        s6h, s6l, e6h, e6l = (_ints(s, 8) for s in sections[2:])
        if len(s4) != len(e4) or not len(s6h) == len(s6l) == len(e6h) == len(e6l):
            raise ValueError("CIDR table sections do not fit together")
        table = cls.__new__(cls)
        table._s4, table._e4, table._s6h, table._s6l, table._e6h, table._e6l = (
            s4, e4, s6h, s6l, e6h, e6l)  # fmt: skip
        table.preview = list(preview)
        return table


class IPRangeSetBuilder:
    """An `IPRangeSet` filled one prefix at a time (a streamed rule set).

    Each prefix becomes one integer (first address above last: sorting those sorts the ranges);
    every `CHUNK` of them is sorted into a run, IPv4 runs packed 8 bytes a range, and `build`
    merges the runs. No list of the texts or of per-range tuples is held: ~10 bytes per IPv4
    prefix while building, where the parser's list of `str` and `_fill`'s tuples cost ~150.
    """

    CHUNK = 1 << 15

    __slots__ = ("_pending4", "_pending6", "_runs4", "_runs6", "preview")

    def __init__(self) -> None:
        self._pending4: list[int] = []
        self._pending6: list[int] = []
        self._runs4: list[array[int]] = []
        self._runs6: list[list[int]] = []
        self.preview: list[str] = []

    def add(self, texts: Iterable[str]) -> None:
        """Add CIDR texts as `parse_prefix` reads them; ValueError names a bad one."""
        pending4, pending6 = self._pending4, self._pending6
        for text in texts:
            if len(self.preview) < PREVIEW:
                self.preview.append(text)
            version, first, last = prefix_span(text)
            if version == 4:
                pending4.append(first << 32 | last)
                if len(pending4) >= self.CHUNK:
                    pending4.sort()
                    self._runs4.append(array(U64, pending4))
                    pending4.clear()
            else:
                pending6.append(first << 128 | last)
                if len(pending6) >= self.CHUNK:
                    pending6.sort()
                    self._runs6.append(pending6[:])
                    pending6.clear()

    def build(self) -> IPRangeSet:
        self._pending4.sort()
        self._pending6.sort()
        table = IPRangeSet.__new__(IPRangeSet)
        table._s4, table._e4 = array(U32), array(U32)
        mask4 = (1 << 32) - 1
        for first, last in _merge_sorted(
            (v >> 32, v & mask4) for v in heapq.merge(*self._runs4, self._pending4)
        ):
            table._s4.append(first)
            table._e4.append(last)
        table._s6h, table._s6l, table._e6h, table._e6l = (array(U64) for _ in range(4))
        mask6 = (1 << 128) - 1
        for first, last in _merge_sorted(
            (v >> 128, v & mask6) for v in heapq.merge(*self._runs6, self._pending6)
        ):
            table._s6h.append(first >> 64)
            table._s6l.append(first & _LOW)
            table._e6h.append(last >> 64)
            table._e6l.append(last & _LOW)
        table.preview = list(self.preview)
        self._runs4, self._runs6, self._pending4, self._pending6 = [], [], [], []
        return table


def _merge_sorted(spans: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """Sorted (first, last) ranges → the same addresses as disjoint, non-adjacent ranges."""
    current: tuple[int, int] | None = None
    for first, last in spans:
        if current is not None and first <= current[1] + 1:
            if last > current[1]:
                current = (current[0], last)
        else:
            if current is not None:
                yield current
            current = (first, last)
    if current is not None:
        yield current


def _merge(spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    starts: list[int] = []
    ends: list[int] = []
    for start, end in sorted(spans):
        if ends and start <= ends[-1] + 1:
            if end > ends[-1]:
                ends[-1] = end
        else:
            starts.append(start)
            ends.append(end)
    return starts, ends


_DIGITS = frozenset("0123456789")
#: Dotted quads without leading zeros (which ipaddress refuses), an optional prefix length.
_OCTET = r"(0|[1-9][0-9]{0,2})"
_PLAIN_V4 = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?:/([0-9]{{1,3}}))?")


def prefix_span(text: str) -> tuple[int, int, int]:
    """(IP version, first, last address as ints) of what `parse_prefix` reads from `text`.

    The plain forms (`a.b.c.d`, `a.b.c.d/n`, IPv6 without a dotted or mapped part) are read
    here without `ipaddress` objects: a country list is hundreds of thousands of CIDRs, and
    `ip_network` costs ~8 µs each (this: ~1.5 µs). Anything else goes through `parse_prefix`.
    Raises ValueError as it does.
    """
    v4 = _PLAIN_V4.fullmatch(text)
    if v4 is not None:
        a, b, c, d, length = v4.groups()
        a, b, c, d = int(a), int(b), int(c), int(d)
        if a > 255 or b > 255 or c > 255 or d > 255:
            raise ValueError(f"'{text}' is not an IPv4 address")
        value = a << 24 | b << 16 | c << 8 | d
        bits = int(length) if length is not None else 32
        if bits > 32:
            raise ValueError(f"'{text}': an IPv4 prefix is at most 32 bits")
        host = (1 << (32 - bits)) - 1
        return 4, value & ~host, value | host
    address, slash, length = text.partition("/")
    if slash and not (0 < len(length) <= 3 and _DIGITS.issuperset(length)):
        return _span_of(parse_prefix(text))
    if (
        ":" in address
        and "." not in address
        and "%" not in address
        and not (address.lower().startswith("::ffff:"))
    ):
        value = int(ipaddress.IPv6Address(address))
        bits = int(length) if slash else 128
        if bits > 128:
            raise ValueError(f"'{text}': an IPv6 prefix is at most 128 bits")
        host = (1 << (128 - bits)) - 1
        return 6, value & ~host, value | host
    return _span_of(parse_prefix(text))


def _span_of(net: _Network) -> tuple[int, int, int]:
    return net.version, int(net.network_address), int(net.broadcast_address)


def parse_prefix(text: str) -> _Network:
    """A CIDR, or a bare IP as a single-host prefix (sing-box accepts both); host bits allowed."""
    text = str(text).strip()
    if "/" not in text:
        ip = ipaddress.ip_address(text)
        return ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}")
    net = ipaddress.ip_network(text, strict=False)
    if net.version == 6 and net.prefixlen >= 96:
        mapped = net.network_address.ipv4_mapped
        if mapped is not None:  # ::ffff:a.b.c.d/N is the IPv4 range the kernel would see
            return ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
    return net


# ---------------------------------------------------------------------------------------------
# Packing a parsed rule set


def unpack_rules(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of packed rules with plain lists again (for tools that print or convert a set):
    names lower case and each once, CIDRs as the merged ranges' prefixes."""
    out = []
    for rule in rules:
        plain: dict[str, Any] = {}
        for key, value in rule.items():
            if isinstance(value, DomainTable):
                domains, suffixes = value.lists()
                if domains:
                    plain["domain"] = domains
                if suffixes:
                    plain["domain_suffix"] = suffixes
            elif isinstance(value, IPRangeSet):
                field = next(k for k, v in PACKED_CIDRS.items() if v == key)
                plain[field] = value.prefixes()
            elif key == "rules" and isinstance(value, list):
                plain[key] = unpack_rules([r for r in value if isinstance(r, dict)])
            else:
                plain[key] = value
        out.append(plain)
    return out


def pack_rules(rules: list[dict[str, Any]], minimum: int = PACK_MIN_ENTRIES) -> None:
    """Replace, in place, every big `domain`/`domain_suffix`/`ip_cidr`/`source_ip_cidr` list
    of these headless rules (logical ones too) by its packed form under a reserved key.

    The lists are dropped as soon as each table is built, so a set's plain and packed forms
    are never both held for long. A CIDR list with an entry that does not parse stays a list:
    the compiler names the entry.
    """
    for rule in rules:
        if rule.get("type") == "logical":
            subs = rule.get("rules")
            if isinstance(subs, list):
                pack_rules([s for s in subs if isinstance(s, dict)], minimum)
            continue
        domains = rule.get("domain") or []
        suffixes = rule.get("domain_suffix") or []
        if isinstance(domains, list) and isinstance(suffixes, list) and (
            len(domains) + len(suffixes) >= minimum
        ) and all(isinstance(v, str) for v in domains) and all(
            isinstance(v, str) for v in suffixes
        ):  # fmt: skip
            rule[PACKED_DOMAINS] = DomainTable.build(domains, suffixes)
            rule.pop("domain", None)
            rule.pop("domain_suffix", None)
        for key, packed in PACKED_CIDRS.items():
            values = rule.get(key)
            if isinstance(values, list) and len(values) >= minimum:
                try:
                    table = IPRangeSet.from_texts(values, values[:PREVIEW])
                except (ValueError, TypeError, AttributeError):
                    continue
                rule[packed] = table
                del rule[key]


def _table_size(n: int) -> int:
    return n * 2 + 1
