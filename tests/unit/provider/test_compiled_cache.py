"""The compiled rule-set cache: round trip, damaged or foreign files ignored, the size bound."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztun.provider import compiled_cache
from ztun.provider import ruleset as ruleset_provider
from ztun.provider.compiled_cache import CompiledCache
from ztun.provider.ruleset import load_rule_sets
from ztun.route.compact import PACKED_CIDRS, PACKED_DOMAINS, DomainTable, IPRangeSet, pack_rules
from ztun.route.compile import compile_headless_rules
from ztun.route.compiled import CompiledFormatError, cache_key, decode, encode
from ztun.route.metadata import FlowMeta


def _rules(seed: int = 3, n: int = 2000) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    names = [f"h{rng.randrange(10**6)}.{rng.choice(['a', 'b', 'c'])}.example" for _ in range(n)]
    cidrs = [str(ipaddress.ip_network((rng.getrandbits(32), rng.randint(16, 32)), strict=False))
             for _ in range(n)] + ["2001:db8::/48"]  # fmt: skip
    return [
        {"domain": names[: n // 2], "domain_suffix": names[n // 2 :]},
        {"ip_cidr": cidrs, "port": [443]},
        {"type": "logical", "mode": "and", "invert": True,
         "rules": [{"source_ip_cidr": cidrs}, {"domain_keyword": ["x"]}]},
        {"domain_regex": ["^a+$"]},
    ]  # fmt: skip


def _blob(rules: list[dict[str, Any]], key: bytes, warnings: list[str] | None = None) -> bytes:
    return b"".join(bytes(c) for c in encode(key, rules, warnings or []))


KEY = cache_key(b"source", "source", "classical")


def _queries(rules: list[dict[str, Any]]) -> list[FlowMeta]:
    rng = random.Random(9)
    names = rules[0]["domain"] + rules[0]["domain_suffix"]
    cidrs = rules[1]["ip_cidr"]
    metas = []
    for _ in range(300):
        net = ipaddress.ip_network(rng.choice(cidrs), strict=False)
        ip = net.network_address + rng.randrange(net.num_addresses)
        metas += [FlowMeta(domain=rng.choice(names)), FlowMeta(domain="z." + rng.choice(names)),
                  FlowMeta(domain=f"miss{rng.randrange(99)}.example"),
                  FlowMeta(destination=ip, destination_port=443),
                  FlowMeta(destination=ipaddress.IPv4Address(rng.getrandbits(32))),
                  FlowMeta(source=ip, domain="q.example")]  # fmt: skip
    return metas


def test_round_trip_gives_the_same_answers() -> None:
    plain = _rules()
    packed = _rules()
    pack_rules(packed)
    rules, warnings = decode(memoryview(_blob(packed, KEY, ["w1"])), KEY)
    assert warnings == ["w1"]
    assert isinstance(rules[0][PACKED_DOMAINS], DomainTable)
    assert isinstance(rules[1][PACKED_CIDRS["ip_cidr"]], IPRangeSet)
    assert rules[1]["port"] == [443] and rules[3] == {"domain_regex": ["^a+$"]}
    a, b = compile_headless_rules(plain), compile_headless_rules(rules)
    for meta in _queries(plain):
        assert a.match(meta) is b.match(meta), meta


LABELS = st.sampled_from(["a", "b", "com", "cn", "x-y", "é"])
NAMES = st.lists(LABELS, min_size=1, max_size=4).map(".".join)


@settings(max_examples=200, deadline=None)
@given(st.lists(NAMES, max_size=8), st.lists(st.one_of(NAMES, NAMES.map("." .__add__)), max_size=8),
       st.lists(NAMES, max_size=8))  # fmt: skip
def test_any_table_round_trips(domains: list[str], suffixes: list[str], queries: list[str]) -> None:
    rules: list[dict[str, Any]] = [{"domain": domains, "domain_suffix": suffixes}]
    rules = [{k: v for k, v in rules[0].items() if v}] if domains or suffixes else []
    plain = [dict(r) for r in rules]
    pack_rules(rules, minimum=1)
    back, _ = decode(memoryview(_blob(rules, KEY)), KEY)
    if plain:
        a, b = compile_headless_rules(plain), compile_headless_rules(back)
        for q in [*queries, *domains, *suffixes]:
            meta = FlowMeta(domain=q)
            assert a.match(meta) is b.match(meta), q


def test_the_key_names_source_format_and_behavior() -> None:
    keys = {cache_key(b"a", "source", "classical"), cache_key(b"b", "source", "classical"),
            cache_key(b"a", "clash", "classical"), cache_key(b"a", "clash", "domain")}  # fmt: skip
    assert len(keys) == 4


def test_foreign_other_version_and_damaged_files_are_refused() -> None:
    packed = _rules(n=200)
    pack_rules(packed)
    good = _blob(packed, KEY)
    with pytest.raises(CompiledFormatError, match="another source"):
        decode(memoryview(good), cache_key(b"other", "source", "classical"))
    other_version = bytearray(good)
    other_version[8] ^= 0xFF
    with pytest.raises(CompiledFormatError, match="another version"):
        decode(memoryview(bytes(other_version)), KEY)
    with pytest.raises(CompiledFormatError, match="not a compiled"):
        decode(memoryview(b"{" + good[1:]), KEY)
    for cut in (0, 10, 60, len(good) // 2, len(good) - 1):
        with pytest.raises(CompiledFormatError):
            decode(memoryview(good[:cut]), KEY)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_damage_is_refused(data: st.DataObject) -> None:
    packed = _rules(n=100)
    pack_rules(packed)
    good = bytearray(_blob(packed, KEY))
    positions = st.integers(0, len(good) - 1)
    for i in data.draw(st.lists(positions, min_size=1, max_size=4, unique=True)):
        good[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(CompiledFormatError):
        decode(memoryview(bytes(good)), KEY)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_are_refused(blob: bytes) -> None:
    with pytest.raises(CompiledFormatError):
        decode(memoryview(blob), KEY)


def _digest_fixed(body: bytes) -> bytes:
    import hashlib

    return body + hashlib.blake2b(body, digest_size=16).digest()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_well_checksummed_nonsense_is_refused_or_harmless(data: st.DataObject) -> None:
    """Past the checksum (a file made to pass it): every field is still bounds-checked."""
    packed = _rules(n=70)
    pack_rules(packed)
    body = bytearray(_blob(packed, KEY)[:-16])
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(body)))
    try:
        rules, _ = decode(memoryview(_digest_fixed(bytes(body[:cut]))), KEY)
    except CompiledFormatError:
        return
    for rule in rules:  # whatever survived answers without raising
        for value in rule.values():
            if isinstance(value, DomainTable):
                value.match("h1.a.example")
                value.matched("x.y.b.example")
            elif isinstance(value, IPRangeSet):
                assert isinstance(ipaddress.IPv4Address("198.51.100.1") in value, bool)
                assert isinstance(ipaddress.IPv6Address("2001:db8::1") in value, bool)


# -- the cache directory ------------------------------------------------------------------------


def test_store_then_load(tmp_path: Path) -> None:
    cache = CompiledCache(tmp_path / "c")
    packed = _rules()
    pack_rules(packed)
    cache.store(KEY, packed, ["w"])
    path = cache.path(KEY)
    assert path.exists() and oct(path.parent.stat().st_mode & 0o777) == "0o700"
    rules, warnings = cache.load(KEY)  # type: ignore[misc]
    assert warnings == ["w"]
    a, b = compile_headless_rules(_rules()), compile_headless_rules(rules)
    for meta in _queries(_rules()):
        assert a.match(meta) is b.match(meta)
    assert cache.load(cache_key(b"x", "source", "classical")) is None


@pytest.mark.parametrize("damage", ["truncate", "garble", "empty", "foreign", "directory"])
def test_damaged_cache_file_is_ignored(tmp_path: Path, damage: str) -> None:
    cache = CompiledCache(tmp_path)
    packed = _rules(n=300)
    pack_rules(packed)
    cache.store(KEY, packed, [])
    path = cache.path(KEY)
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 3])
    elif damage == "garble":
        path.write_bytes(good[:200] + bytes(b ^ 0x5A for b in good[200:400]) + good[400:])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "foreign":
        other = _rules(seed=8, n=300)
        pack_rules(other)
        path.write_bytes(_blob(other, cache_key(b"another", "source", "classical")))
    else:
        path.unlink()
        path.mkdir()
    assert cache.load(KEY) is None


def _write_source(tmp_path: Path, n: int = 6000) -> Path:
    rng = random.Random(4)
    names = sorted({f"s{rng.randrange(10**7)}.example" for _ in range(n)})
    cidrs = sorted({f"198.{rng.randrange(256)}.{rng.randrange(256)}.0/24" for _ in range(n)})
    source = {"version": 3, "rules": [{"domain_suffix": names, "domain": ["Upper.Example"]},
                                      {"ip_cidr": cidrs}]}  # fmt: skip
    path = tmp_path / "big.json"
    path.write_text(json.dumps(source))
    assert path.stat().st_size >= compiled_cache.MIN_SOURCE_BYTES
    return path


def _load(tmp_path: Path) -> tuple[list[Any], list[str]]:
    result = load_rule_sets([{"tag": "big", "type": "local", "path": "big.json"}],
                            base_dir=tmp_path, cache_dir=tmp_path / "cache")  # fmt: skip
    warnings = [d.message for d in result.diagnostics if d.severity == "warning"]
    assert not [d for d in result.diagnostics if d.severity == "error"]
    return result.sets["big"], warnings


def test_loader_caches_big_sets_and_rebuilds_a_damaged_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_source(tmp_path)
    first, warnings = _load(tmp_path)
    assert any("upper-case" in w for w in warnings)
    files = list((tmp_path / "cache").glob("compiled-*.ztrs"))
    assert len(files) == 1

    def no_parsing(*args: object) -> None:
        raise AssertionError("parsed although cached")

    with monkeypatch.context() as patch:
        patch.setattr(ruleset_provider, "_parse_packed", no_parsing)
        second, warnings_again = _load(tmp_path)  # from the cache: same rules, same warnings
    assert warnings_again == warnings
    assert isinstance(second[0][PACKED_DOMAINS], DomainTable)
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated: ignored, parsed, rewritten
    third, _ = _load(tmp_path)
    assert len(files[0].read_bytes()) > 100
    matchers = [compile_headless_rules(r) for r in (first, second, third)]
    for meta in (FlowMeta(domain="upper.example"), FlowMeta(domain="x.upper.example"),
                 FlowMeta(destination=ipaddress.ip_address("198.51.100.1")),
                 FlowMeta(domain="s1.example.org")):  # fmt: skip
        assert len({m.match(meta) for m in matchers}) == 1


def test_a_changed_source_is_parsed_again(tmp_path: Path) -> None:
    path = _write_source(tmp_path)
    _load(tmp_path)
    data = json.loads(path.read_text())
    data["rules"][0]["domain"] = ["new.example"]
    path.write_text(json.dumps(data))
    rules, _ = _load(tmp_path)
    assert compile_headless_rules(rules).match(FlowMeta(domain="new.example"))
    assert len(list((tmp_path / "cache").glob("compiled-*.ztrs"))) == 2


def test_small_sources_are_not_cached(tmp_path: Path) -> None:
    (tmp_path / "big.json").write_text('{"version": 1, "rules": [{"domain": ["a.example"]}]}')
    _load(tmp_path)
    assert not list((tmp_path / "cache").glob("compiled-*"))


def test_size_bound_evicts_the_least_recently_used(tmp_path: Path) -> None:
    packed = _rules(n=400)
    pack_rules(packed)
    size = len(_blob(packed, KEY))
    cache = CompiledCache(tmp_path, max_bytes=int(size * 2.5))
    keys = [cache_key(bytes([i]), "source", "classical") for i in range(4)]
    past = time.time() - 1000
    for i, key in enumerate(keys[:2]):
        cache.store(key, packed, [])
        os.utime(cache.path(key), (past + i, past + i))
    assert cache.load(keys[0]) is not None  # a hit makes it the most recently used
    (tmp_path / "compiled-leftover.ztrs123.tmp").write_bytes(b"x")
    os.utime(tmp_path / "compiled-leftover.ztrs123.tmp", (past, past))
    cache.store(keys[2], packed, [])
    left = {p.name for p in tmp_path.iterdir()}
    assert cache.path(keys[0]).name in left and cache.path(keys[2]).name in left
    assert cache.path(keys[1]).name not in left
    assert "compiled-leftover.ztrs123.tmp" not in left
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= cache.max_bytes
    # One file over the bound on its own is not kept.
    tiny = CompiledCache(tmp_path / "tiny", max_bytes=size // 2)
    tiny.store(keys[3], packed, [])
    assert not list((tmp_path / "tiny").glob("*.ztrs"))


def test_unwritable_cache_costs_nothing_but_time(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    cache = CompiledCache(tmp_path / "file" / "sub")
    packed = _rules(n=100)
    pack_rules(packed)
    cache.store(KEY, packed, [])  # logged, not raised
    assert cache.load(KEY) is None


def test_loaded_tables_survive_the_file_changing(tmp_path: Path) -> None:
    cache = CompiledCache(tmp_path)
    packed = _rules(n=300)
    pack_rules(packed)
    cache.store(KEY, packed, [])
    rules, _ = cache.load(KEY)  # type: ignore[misc]
    with cache.path(KEY).open("r+b") as f:  # truncated in place: no SIGBUS, nothing mapped
        f.truncate(10)
    matcher = compile_headless_rules(rules)
    assert matcher.match(FlowMeta(domain=_rules(n=300)[0]["domain"][0]))
    assert cache.load(KEY) is None


def test_a_download_is_compiled_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The download is parsed to check it; that parse is what the cache keeps, so the loader
    does not parse it a second time."""
    body = _write_source(tmp_path).read_bytes()
    calls = []
    real_parse = ruleset_provider._parse_packed

    def counting_parse(*args: Any) -> Any:
        calls.append(1)
        return real_parse(*args)

    def download(url: str, **kw: Any) -> Any:
        return ruleset_provider._Response(200, body)

    monkeypatch.setattr(ruleset_provider, "_parse_packed", counting_parse)
    monkeypatch.setattr(ruleset_provider, "_download", download)
    result = load_rule_sets([{"tag": "r", "type": "remote", "url": "http://198.51.100.1/r.json"}],
                            base_dir=tmp_path, cache_dir=tmp_path / "cache")  # fmt: skip
    assert not [d for d in result.diagnostics if d.severity == "error"]
    assert len(calls) == 1
    assert isinstance(result.sets["r"][0][PACKED_DOMAINS], DomainTable)


def test_a_warm_start_lets_the_source_go_and_reads_it_again_only_for_a_bad_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source's bytes are freed before the compiled file is read (the warm start's peak);
    a compiled file that turns out unusable costs one more read of the source, nothing else."""
    _write_source(tmp_path)
    first, _ = _load(tmp_path)
    events: list[str] = []

    class Tracked(bytes):
        def __del__(self) -> None:
            events.append("source freed")

    real_read = ruleset_provider._RuleSetLoader._read_local
    real_load = CompiledCache.load

    def tracked_read(self: Any, *args: Any) -> Any:
        events.append("source read")
        data = real_read(self, *args)
        return None if data is None else Tracked(data)

    def logged_load(self: CompiledCache, key: bytes) -> Any:
        events.append("compiled read")
        return real_load(self, key)

    monkeypatch.setattr(ruleset_provider._RuleSetLoader, "_read_local", tracked_read)
    monkeypatch.setattr(CompiledCache, "load", logged_load)
    second, _ = _load(tmp_path)
    assert events == ["source read", "source freed", "compiled read"]
    [file] = (tmp_path / "cache").glob("compiled-*.ztrs")
    file.write_bytes(file.read_bytes()[:-1])  # damaged: the source is read again and parsed
    events.clear()
    third, _ = _load(tmp_path)
    assert events[:4] == ["source read", "source freed", "compiled read", "source read"]
    for meta in (FlowMeta(domain="upper.example"), FlowMeta(domain="x.s1.example")):
        answers = {compile_headless_rules(r).match(meta) for r in (first, second, third)}
        assert len(answers) == 1


def test_a_first_start_parses_a_big_set_in_a_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big source with no compiled file is parsed in a forked child that writes the
    compiled file; this process reads that back, with the same answers and warnings as a
    parse here. A source the child cannot parse is parsed here, so its error reads as before."""
    import threading

    monkeypatch.setattr(threading, "active_count", lambda: 1)  # pytest may run threads
    monkeypatch.setattr(ruleset_provider, "CHILD_PARSE_BYTES", 1)
    parsed_here: list[int] = []
    original = ruleset_provider._parse_packed

    def counted(*args: Any) -> Any:
        parsed_here.append(1)
        return original(*args)

    monkeypatch.setattr(ruleset_provider, "_parse_packed", counted)
    _write_source(tmp_path)
    child, warnings = _load(tmp_path)
    assert parsed_here == []  # the child parsed (its calls are not counted here)
    assert list((tmp_path / "cache").glob("compiled-*"))
    assert any("upper-case" in w for w in warnings)
    monkeypatch.setattr(ruleset_provider, "CHILD_PARSE_BYTES", 1 << 40)
    for f in (tmp_path / "cache").glob("compiled-*"):
        f.unlink()
    here, _ = _load(tmp_path)
    assert parsed_here == [1]
    for meta in _queries(_rules()):
        assert compile_headless_rules(child).match(meta) == compile_headless_rules(here).match(meta)
    (tmp_path / "big.json").write_text('{"version": 3, "rules": [{"domain": [1]}]}' + " " * 100)
    monkeypatch.setattr(ruleset_provider, "CHILD_PARSE_BYTES", 1)
    result = load_rule_sets([{"tag": "big", "type": "local", "path": "big.json"}],
                            base_dir=tmp_path, cache_dir=tmp_path / "cache")  # fmt: skip
    errors = [d.message for d in result.diagnostics if d.severity == "error"]
    assert errors and parsed_here == [1, 1]  # parsed here after the child failed
