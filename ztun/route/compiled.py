"""The compiled rule-set file: a parsed, packed rule set as ztun reads it back without parsing.

Layout (header fields little-endian; the sections are the packed arrays in this machine's own
byte order, which the header records, so reading one is a copy, not a conversion):

    magic "ZTUNRSC\\0" | version u32 | byte order u8 | 3 zero bytes | key (32 bytes)
    | description length u32 | section count u32
    | per section: offset u64, length u64 (from the start of the file)
    | description (UTF-8 JSON) | sections, each at a multiple of 8
    | BLAKE2b-128 of everything before it

The description holds the headless rules with each packed table replaced by
`{"$table": index}`, every table's kind, section range and metadata, and the parser's warnings.
`key` is `cache_key(source bytes, format, behavior)`: a file copied or renamed from another
source, written by another version of this format or on a machine of the other byte order, or
damaged anywhere, is refused with `CompiledFormatError`, and the caller parses the source again.
Every length is checked before it is used, so no input makes `decode` read outside its buffer.

Pure: bytes in, rules out (ztun.provider.compiled_cache does the files).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from typing import Any

from ztun.route.compact import PACKED_CIDRS, PACKED_DOMAINS, DomainTable, IPRangeSet

MAGIC = b"ZTUNRSC\0"
#: Bumped whenever the layout or a packed structure changes: older files are then rebuilt.
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIB3x32sII")
_SECTION = struct.Struct("<QQ")
_DIGEST = 16
_BYTE_ORDER = 1 if sys.byteorder == "little" else 2
#: Bounds on what a file may declare (a compiled set is smaller than its 64 MiB source).
MAX_SECTIONS = 1 << 16
MAX_DESCRIPTION = 64 * 1024 * 1024
_PACKED_KEYS = {PACKED_DOMAINS: "domains", **{v: "cidrs" for v in PACKED_CIDRS.values()}}
_KINDS: dict[str, Any] = {"domains": DomainTable, "cidrs": IPRangeSet}
_SECTIONS_PER_KIND = {"domains": 3, "cidrs": 6}


class CompiledFormatError(ValueError):
    """A compiled rule-set file that cannot be used (damaged, foreign, or another version)."""


def cache_key(source: bytes, fmt: str, behavior: str) -> bytes:
    """What a compiled file is valid for: the source's bytes, how they are read, this format."""
    digest = hashlib.sha256()
    digest.update(f"ztun-compiled/{FORMAT_VERSION}/{fmt}/{behavior}\n".encode())
    digest.update(source)
    return digest.digest()


def encode(
    key: bytes, rules: list[dict[str, Any]], warnings: list[str]
) -> list[bytes | memoryview]:
    """The file for `rules` (packed by `compact.pack_rules`), as buffers to write in order."""
    if len(key) != 32:
        raise ValueError("a cache key is 32 bytes")
    tables: list[dict[str, Any]] = []
    sections: list[bytes | memoryview] = []

    def skeleton(value: Any) -> Any:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if k in _PACKED_KEYS and isinstance(v, DomainTable | IPRangeSet):
                    kind = "domains" if isinstance(v, DomainTable) else "cidrs"
                    own = v.sections()
                    tables.append({"kind": kind, "first": len(sections), "meta": v.meta()})
                    sections.extend(own)
                    out[k] = {"$table": len(tables) - 1}
                else:
                    out[k] = skeleton(v)
            return out
        if isinstance(value, list):
            return [skeleton(v) for v in value]
        return value

    description = json.dumps(
        {"rules": skeleton(rules), "warnings": list(warnings), "tables": tables},
        separators=(",", ":"), ensure_ascii=False,
    ).encode("utf-8", "surrogatepass")  # fmt: skip
    if len(description) > MAX_DESCRIPTION or len(sections) > MAX_SECTIONS:
        raise ValueError("rule set too large to cache")
    offset = _HEADER.size + _SECTION.size * len(sections) + len(description)
    table = bytearray()
    chunks: list[bytes | memoryview] = [b"", b"", description]
    for section in sections:
        padding = -offset % 8
        if padding:
            chunks.append(bytes(padding))
            offset += padding
        length = len(section) if isinstance(section, bytes) else section.nbytes
        table += _SECTION.pack(offset, length)
        chunks.append(section)
        offset += length
    chunks[0] = _HEADER.pack(MAGIC, FORMAT_VERSION, _BYTE_ORDER, key, len(description),
                             len(sections))  # fmt: skip
    chunks[1] = bytes(table)
    digest = hashlib.blake2b(digest_size=_DIGEST)
    for chunk in chunks:
        digest.update(chunk)
    chunks.append(digest.digest())
    return chunks


def decode(buffer: memoryview, key: bytes) -> tuple[list[dict[str, Any]], list[str]]:
    """(rules, warnings) from a compiled file held in `buffer`.

    The tables copy what they need: `buffer` may be dropped afterwards. Raises
    CompiledFormatError for anything but an intact file of this format for `key`.
    """
    buffer = buffer.cast("B") if buffer.format != "B" else buffer
    size = len(buffer)
    if size < _HEADER.size + _DIGEST:
        raise CompiledFormatError("too short")
    magic, version, order, file_key, desc_len, count = _HEADER.unpack_from(buffer)
    if magic != MAGIC:
        raise CompiledFormatError("not a compiled rule set")
    if version != FORMAT_VERSION or order != _BYTE_ORDER:
        raise CompiledFormatError("written by another version or machine")
    if file_key != key:
        raise CompiledFormatError("compiled from another source")
    body = size - _DIGEST
    digest = hashlib.blake2b(buffer[:body], digest_size=_DIGEST).digest()
    if digest != bytes(buffer[body:]):
        raise CompiledFormatError("damaged (checksum)")
    table_end = _HEADER.size + _SECTION.size * count
    if count > MAX_SECTIONS or desc_len > MAX_DESCRIPTION or table_end + desc_len > body:
        raise CompiledFormatError("bad lengths")
    sections = []
    for i in range(count):
        offset, length = _SECTION.unpack_from(buffer, _HEADER.size + _SECTION.size * i)
        if offset < table_end + desc_len or offset + length > body or offset % 8:
            raise CompiledFormatError("section outside the file")
        sections.append(buffer[offset : offset + length])
    try:
        text = bytes(buffer[table_end : table_end + desc_len]).decode("utf-8", "surrogatepass")
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CompiledFormatError(f"bad description: {exc}") from None
    if not isinstance(data, dict):
        raise CompiledFormatError("bad description")
    rules, warnings, tables = data.get("rules"), data.get("warnings"), data.get("tables")
    if not (isinstance(rules, list) and all(isinstance(r, dict) for r in rules)
            and isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)
            and isinstance(tables, list)):  # fmt: skip
        raise CompiledFormatError("bad description")
    built = [_table(t, sections) for t in tables]
    try:
        return [_restore(r, built) for r in rules], warnings
    except RecursionError:
        raise CompiledFormatError("rules nested too deeply") from None


def _table(entry: Any, sections: list[memoryview]) -> DomainTable | IPRangeSet:
    if not isinstance(entry, dict):
        raise CompiledFormatError("bad table")
    kind, first = entry.get("kind"), entry.get("first")
    if kind not in _KINDS or isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise CompiledFormatError("bad table")
    own = sections[first : first + _SECTIONS_PER_KIND[kind]]
    try:
        return _KINDS[kind].from_sections(own, entry.get("meta"))  # type: ignore[no-any-return]
    except (ValueError, TypeError) as exc:
        raise CompiledFormatError(f"bad table: {exc}") from None


def _restore(value: Any, tables: list[DomainTable | IPRangeSet]) -> Any:
    if isinstance(value, list):
        return [_restore(v, tables) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        if k in _PACKED_KEYS:
            index = v.get("$table") if isinstance(v, dict) else None
            if isinstance(index, bool) or not isinstance(index, int):
                raise CompiledFormatError("bad table reference")
            if not 0 <= index < len(tables):
                raise CompiledFormatError("bad table reference")
            table = tables[index]
            expected = DomainTable if _PACKED_KEYS[k] == "domains" else IPRangeSet
            if not isinstance(table, expected):
                raise CompiledFormatError("table of the wrong kind")
            out[k] = table
        else:
            out[k] = _restore(v, tables)
    return out
