"""sing-box's binary rule-set format: round trips, the trie, and hostile bytes.

The real sing-box (compile, decompile, match) is in tests/integration/test_srs_singbox.py.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.route import srs
from ztun.route.compile import compile_headless_rules
from ztun.route.metadata import FlowMeta
from ztun.route.ruleset import RuleSetError
from ztun.route.srs import (
    SrsError,
    parse_binary,
    read_srs,
    source_json,
    write_srs,
)


def body(data: bytes) -> bytes:
    return srs.MAGIC + bytes([2]) + zlib.compress(data)


def roundtrip(rules: list[dict[str, Any]], version: int = 2) -> list[dict[str, Any]]:
    return read_srs(write_srs(rules, version)).rules


# -- round trips ---------------------------------------------------------------------------------


def test_every_field_ztun_writes_comes_back() -> None:
    rule = {
        "query_type": ["A", 28, "HTTPS"],
        "network": ["tcp", "udp"],
        "domain": ["a.example.com", "b.example.org"],
        "domain_suffix": [".cdn.example.net", "example.org"],
        "domain_keyword": ["ads"],
        "domain_regex": ["^x", r"\.y$"],
        "source_ip_cidr": ["10.0.0.0/8"],
        "ip_cidr": ["198.51.100.0/25", "198.51.100.128/25", "203.0.113.7", "2001:db8::/32"],
        "source_port": [1],
        "source_port_range": [":10"],
        "port": [443, 80],
        "port_range": ["1000:2000"],
        "invert": True,
    }
    inner = {"type": "logical", "mode": "and", "rules": [{"port": [53]}, {"network": "udp"}]}
    logical = {"type": "logical", "mode": "or", "invert": True,
               "rules": [{"domain": ["x.com"]}, inner]}  # fmt: skip
    back = roundtrip([rule, logical])
    assert back[0] == {
        "query_type": ["A", "AAAA", "HTTPS"],
        "network": ["tcp", "udp"],
        # b.example.org is kept as a domain: the suffix example.org only covers it in matching
        "domain": ["a.example.com", "b.example.org"],
        "domain_suffix": [".cdn.example.net", "example.org"],
        "domain_keyword": ["ads"],
        "domain_regex": ["^x", r"\.y$"],
        "source_ip_cidr": ["10.0.0.0/8"],
        # adjacent prefixes merge into one range, as sing-box's writer merges them
        "ip_cidr": ["198.51.100.0/24", "203.0.113.7/32", "2001:db8::/32"],
        "source_port": [1],
        "source_port_range": [":10"],
        "port": [443, 80],
        "port_range": ["1000:2000"],
        "invert": True,
    }
    assert back[1] == {"type": "logical", "mode": "or", "invert": True,
                       "rules": [{"domain": ["x.com"]}, {"type": "logical", "mode": "and",
                                 "rules": [{"port": [53]}, {"network": ["udp"]}]}]}  # fmt: skip


def test_version_1_suffixes_read_back_as_written() -> None:
    # Version 1 stores `example.org` as the name plus `.example.org`; the reader joins them.
    rules = [{"domain": ["a.b", "example.org"], "domain_suffix": ["example.org", ".only.sub"]}]
    assert roundtrip(rules, 1) == [{"domain": ["a.b"],
                                    "domain_suffix": [".only.sub", "example.org"]}]  # fmt: skip
    assert read_srs(write_srs(rules, 1)).version == 1


def test_entries_are_written_the_way_ztun_matches_them() -> None:
    back = roundtrip([{"domain": ["Example.COM."], "domain_keyword": ["ADS"]}])
    assert back == [{"domain": ["example.com"], "domain_keyword": ["ads"]}]


def test_ztun_only_fields_cannot_be_written() -> None:
    for field in ("geoip", "ip_is_private", "protocol", "auth_user"):
        with pytest.raises(SrsError, match=f"rules\\[0\\].{field}: sing-box rule sets have no"):
            write_srs([{field: ["x"] if field != "ip_is_private" else True}])


def test_source_json_writes_single_values_bare() -> None:
    text = source_json([{"domain": ["a.com"], "port": [1, 2]}], 2)
    assert '"domain": "a.com"' in text and '"version": 2' in text


ASCII_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=6)
NAMES = st.lists(ASCII_LABEL, min_size=1, max_size=4).map(".".join)
UNICODE_NAMES = st.text(min_size=1, max_size=12).filter(
    lambda t: all(" " <= c != "\x7f" for c in t)
)


@settings(max_examples=150, deadline=None)
@given(st.lists(NAMES, max_size=30), st.lists(NAMES, max_size=30), st.lists(NAMES, max_size=10),
       st.sampled_from([1, 2]))  # fmt: skip
def test_domain_sets_round_trip_with_the_same_matches(
    domains: list[str], suffixes: list[str], dotted: list[str], version: int
) -> None:
    rule: dict[str, Any] = {}
    if domains:
        rule["domain"] = domains
    if suffixes or dotted:
        rule["domain_suffix"] = suffixes + ["." + d for d in dotted]
    if not rule:
        return
    back = roundtrip([rule], version)[0]
    before = compile_headless_rules([rule])
    after = compile_headless_rules([back])
    probes = {q for d in domains + suffixes + dotted
              for q in (d, "w." + d, "x" + d, d.split(".", 1)[-1])}  # fmt: skip
    for q in probes:
        meta = FlowMeta(domain=q)
        assert before.match(meta) == after.match(meta), q


@settings(max_examples=100, deadline=None)
@given(st.lists(UNICODE_NAMES, min_size=1, max_size=20))
def test_trie_keys_round_trip(keys: list[str]) -> None:
    encoded = sorted({k.encode("utf-8") for k in keys})
    reader = srs._Reader(srs._trie_bytes(encoded), 2)
    decoded = reader.trie_keys("t")
    assert sorted(k[::-1].encode("utf-8") for k in decoded) == encoded


CIDRS = st.one_of(
    st.builds(lambda a, n: f"{ipaddress.IPv4Address(a)}/{n}", st.integers(0, 2**32 - 1),
              st.integers(0, 32)),
    st.builds(lambda a, n: f"{ipaddress.IPv6Address(a)}/{n}", st.integers(0, 2**128 - 1),
              st.integers(0, 128)),
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(st.lists(CIDRS, min_size=1, max_size=25))
def test_ip_sets_round_trip_to_the_same_addresses(cidrs: list[str]) -> None:
    back = roundtrip([{"ip_cidr": cidrs}])[0]["ip_cidr"]

    def covered(prefixes: list[str]) -> list[tuple[int, int, int]]:
        nets = [ipaddress.ip_network(p, strict=False) for p in prefixes]
        ranges = sorted((n.version, int(n.network_address), int(n.broadcast_address)) for n in nets)
        merged: list[list[int]] = []
        for v, lo, hi in ranges:
            if merged and merged[-1][0] == v and lo <= merged[-1][2] + 1:
                merged[-1][2] = max(merged[-1][2], hi)
            else:
                merged.append([v, lo, hi])
        return [tuple(m) for m in merged]  # type: ignore[misc]

    assert covered(back) == covered(cidrs)


# -- AdGuard patterns ------------------------------------------------------------------------------


def test_adguard_patterns_become_source_entries() -> None:
    keys = ["\nads.example", "plain.example", "\rsub.example\b", "\nwild*.example",
            "\rexample.org", "|x\b"[1:]]  # fmt: skip
    domains, suffixes, regexes = srs._adguard_entries(keys, "p")
    assert domains == ["plain.example"]
    assert suffixes == ["ads.example"]
    assert regexes == [r"sub\.example", r"(?:^|\.)wild.*\.example$", r"example\.org$", "^x"]


# -- hostile bytes ---------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_the_readers_error(data: bytes) -> None:
    for candidate in (data, srs.MAGIC + data, body(data), body(b"\x01\x00" + data)):
        with contextlib.suppress(RuleSetError):
            parse_binary(candidate)


VALID = write_srs([
    {"domain": ["a.example.com"], "domain_suffix": ["example.org", ".x.net"],
     "ip_cidr": ["198.51.100.0/24", "2001:db8::/32"], "port": [443], "port_range": ["1:2"]},
    {"type": "logical", "mode": "and", "rules": [{"network": ["udp"]}, {"query_type": [1]}]},
])  # fmt: skip
VALID_BODY = zlib.decompress(VALID[4:])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(VALID_BODY) - 1), st.integers(0, 255)),
                min_size=1, max_size=4), st.integers(0, len(VALID_BODY)))  # fmt: skip
def test_damaged_valid_files_raise_only_the_readers_error(
    changes: list[tuple[int, int]], cut: int
) -> None:
    damaged = bytearray(VALID_BODY)
    for at, value in changes:
        damaged[at] = value
    for candidate in (body(bytes(damaged)), body(bytes(damaged[:cut]))):
        with contextlib.suppress(RuleSetError):
            parse_binary(candidate)


def test_clear_messages() -> None:
    cases = {
        b"JSON": "does not start with 'SRS'",
        b"SRS\x06" + zlib.compress(b"\x00"): "version 6 is newer than ztun reads",
        b"SRS\x02garbage": "compressed body is damaged",
        b"SRS\x02" + zlib.compress(b"\x01\x00")[:-3]: "cut short",
        body(b"\x01\x07\x00"): r"rules\[0\]: unknown rule kind 7",
        body(b"\x01\x00\x63"): r"rules\[0\]: unknown rule item type 99",
        body(b"\x01\x00\x06\x02"): r"rules\[0\].ip_cidr: unknown address-set layout",
        body(b"\x01\x00\x03\x01\x01\xff\xff\x00"): r"rules\[0\].domain_keyword: .*not UTF-8",
        body(b"\x01\x00\x03\x00\xff\x00"): "an empty list",
        body(b"\x01\x00\xff\x00"): "has no match fields",
        body(b"\x01\x00\x0d\x01\x01a\xff\x00"): "sing-box's 'package_name' is not supported",
        body(b"\x01\x00\x09\x01\x00\x50"): "ends in the middle of a rule",
    }
    for data, message in cases.items():
        # SrsError for the layout; RuleSetError (its base) for what the source form refuses too
        with pytest.raises(RuleSetError, match=message):
            parse_binary(data)


def test_counts_larger_than_the_file_are_refused_before_any_allocation() -> None:
    huge = bytearray()
    srs._put_uvarint(huge, 2**62)
    for data in (body(bytes(huge)), body(b"\x01\x00\x03" + bytes(huge)),
                 body(b"\x01\x00\x06\x01" + (2**63).to_bytes(8, "big")),
                 body(b"\x01\x00\x02\x00" + bytes(huge))):  # fmt: skip
        with pytest.raises(SrsError, match="more than the file holds"):
            read_srs(data)
    with pytest.raises(SrsError, match="does not fit in 64 bits"):
        read_srs(body(b"\xff" * 11))


def test_nesting_is_bounded() -> None:
    deep = b"\x01" + b"\x01\x00\x01" * 40 + b"\x00\x02\x01\x01a\xff\x00" + b"\x00" * 40
    with pytest.raises(SrsError, match="nested more than 32 deep"):
        read_srs(body(deep))


def test_zip_bomb_is_refused_at_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    assert srs.MAX_BODY_BYTES == 128 * 1024 * 1024
    monkeypatch.setattr(srs, "MAX_BODY_BYTES", 1 << 20)
    bomb = srs.MAGIC + b"\x02" + zlib.compress(b"\x00" * (64 << 20), 9)  # 64 MiB → 64 KiB
    assert len(bomb) < 100_000
    start = time.monotonic()
    with pytest.raises(SrsError, match="unpacks to more than 1 MiB"):
        read_srs(bomb)
    assert time.monotonic() - start < 2.0  # stops after the first MiB, not at 64


def test_trie_expansion_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # A chain of 2000 labels then 2000 leaves: 4 KB of labels that spell 4 MB of keys.
    chain = "a" * 2000
    keys = sorted((chain + c).encode() for c in map(chr, range(0x100, 0x100 + 700)))
    trie = srs._trie_bytes(keys)
    monkeypatch.setattr(srs, "MAX_DECODED_CHARS", 1 << 20)
    with pytest.raises(SrsError, match="expand to more than 1 MiB of text"):
        srs._Reader(trie, 2).trie_keys("domain")


def test_malformed_tries_are_refused() -> None:
    good = srs._trie_bytes([b"moc.a", b"moc.b"])
    reader = srs._Reader(good[:-1] + b"", 2)
    with pytest.raises(SrsError):
        reader.trie_keys("domain")
    # labels and bitmap that disagree
    with pytest.raises(SrsError, match="malformed"):
        srs._Reader(b"\x00\x00\x01" + (1).to_bytes(8, "big") + b"\x02ab", 2).trie_keys("d")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=3), st.lists(st.integers(0, 2**64 - 1),
       max_size=3), st.binary(max_size=200))  # fmt: skip
def test_arbitrary_trie_arrays_raise_only_the_readers_error(
    leaves: list[int], bitmap: list[int], labels: bytes
) -> None:
    raw = bytearray([0])
    for words in (leaves, bitmap):
        srs._put_uvarint(raw, len(words))
        raw += b"".join(w.to_bytes(8, "big") for w in words)
    srs._put_uvarint(raw, len(labels))
    raw += labels
    with contextlib.suppress(SrsError):
        for key in srs._Reader(bytes(raw), 2).trie_keys("domain"):
            assert isinstance(key, str)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="ab.*\r\n\b\x00é", min_size=1, max_size=6), min_size=1,
                max_size=8))  # fmt: skip
def test_any_trie_keys_become_entries_or_the_readers_error(keys: list[str]) -> None:
    for convert in (srs._domain_entries, srs._adguard_entries):
        with contextlib.suppress(SrsError):
            domains, suffixes, regexes = convert(keys, "domain")
            assert all(isinstance(e, str) and e for e in domains + suffixes + regexes)


def test_unchecked_ports_are_refused_by_the_writer() -> None:
    with pytest.raises(SrsError, match=r"rules\[0\].port: ports are integers 0 to 65535"):
        write_srs([{"port": [70000]}])
