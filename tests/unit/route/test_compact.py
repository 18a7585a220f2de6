"""The packed forms of big lists answer exactly as plain sets do (hypothesis), and stay small."""

from __future__ import annotations

import ipaddress
import random
import time
import tracemalloc
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.route.compact import (
    DOMAIN,
    PACKED_CIDRS,
    PACKED_DOMAINS,
    SELF,
    UNDER,
    DomainTable,
    IPRangeSet,
    pack_rules,
    parse_prefix,
    prefix_span,
    unpack_rules,
)
from ztun.route.compile import compile_headless_rules
from ztun.route.items import DomainItem, IPCIDRItem
from ztun.route.metadata import FlowMeta
from ztun.route.rule import MatchState

LABELS = st.sampled_from(["a", "b", "ab", "com", "x-y", "example", "cn", "ba", "é", "xn--p1ai"])
NAMES = st.lists(LABELS, min_size=1, max_size=5).map(".".join)
SUFFIXES = st.one_of(NAMES, NAMES.map(lambda d: "." + d), NAMES.map(lambda d: d.upper() + "."))


def reference(domain: str, domains: list[str], suffixes: list[str]) -> bool:
    """sing-box's meaning, spelled out over plain sets."""
    exact = {d.lower().rstrip(".") for d in domains}
    exact |= {s.lower().rstrip(".") for s in suffixes if not s.startswith(".")}
    under = {s.lower().rstrip(".").lstrip(".") for s in suffixes}
    if domain in exact:
        return True
    labels = domain.split(".")
    return any(".".join(labels[i:]) in under for i in range(1, len(labels)))


@settings(max_examples=200, deadline=None)
@given(st.lists(NAMES, max_size=12), st.lists(SUFFIXES, max_size=12), st.lists(NAMES, max_size=6))
def test_domain_table_answers_as_plain_sets(
    domains: list[str], suffixes: list[str], queries: list[str]
) -> None:
    table = DomainTable.build(domains, suffixes)
    plain = DomainItem(domains, suffixes)
    packed = DomainItem(table=table)
    state = MatchState()
    for query in [*queries, *domains, *(s.lstrip(".") for s in suffixes)]:
        meta = FlowMeta(domain=query)
        expected = reference(meta.domain or "", domains, suffixes)
        assert table.match(meta.domain or "") is expected, query
        assert packed.match(meta, state) is expected
        assert plain.match(meta, state) is expected
        assert packed.explain(meta, state) == plain.explain(meta, state)


def test_domain_table_flags_and_labels() -> None:
    table = DomainTable.build(["a.com", "x.b.com"], ["b.com", ".c.com", "a.com"])
    assert table.flags(b"a.com") == DOMAIN | SELF | UNDER
    assert table.flags(b"b.com") == SELF | UNDER
    assert table.flags(b"c.com") == UNDER
    assert table.flags(b"x.b.com") == DOMAIN
    assert table.flags(b"com") == 0
    assert table.match("a.com") and table.match("q.a.com") and table.match("x.c.com")
    assert not table.match("c.com") and not table.match("xa.com") and not table.match("com")
    assert not table.match("") and not table.match("a" * 300 + ".a.com")
    assert table.matched("q.r.c.com") == ("c.com", UNDER)
    assert len(table) == 4 and table.counts == (2, 3)


def test_empty_domain_table() -> None:
    table = DomainTable.build([], [])
    assert not table.match("a.com") and table.flags(b"") == 0


@st.composite
def networks(draw: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if draw(st.booleans()):
        return ipaddress.ip_network((draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 32))),
                                    strict=False)  # fmt: skip
    # Few distinct /64s, so that many ranges share their high half.
    high = draw(st.sampled_from([0, 1, 0x20010DB8 << 32, 2**64 - 1]))
    low = draw(st.integers(0, 2**64 - 1))
    prefix = draw(st.integers(0, 128))
    return ipaddress.ip_network((high << 64 | low, prefix), strict=False)


ADDRESSES = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.builds(lambda h, lo: ipaddress.IPv6Address(h << 64 | lo),
              st.sampled_from([0, 1, 0x20010DB8 << 32, 2**64 - 1]), st.integers(0, 2**64 - 1)),
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(st.lists(networks(), max_size=20), st.lists(ADDRESSES, max_size=8))
def test_range_set_answers_as_plain_networks(nets: list[Any], ips: list[Any]) -> None:
    ranges = IPRangeSet(nets)
    probes = [*ips]
    for n in nets:
        probes += [n.network_address, n.broadcast_address]
        if int(n.network_address) > 0:
            probes.append(n.network_address - 1)
        if int(n.broadcast_address) < 2**n.max_prefixlen - 1:
            probes.append(n.broadcast_address + 1)
    for ip in probes:
        expected = any(ip.version == n.version and ip in n for n in nets)
        assert (ip in ranges) is expected, ip
        if expected:
            covering = ipaddress.ip_network(ranges.covering(ip))
            assert ip in covering


def _big_rules(rng: random.Random, n: int) -> list[dict[str, Any]]:
    names = [f"n{rng.randrange(10**6)}.{rng.choice(['a', 'b'])}.example" for _ in range(n)]
    cidrs = [str(ipaddress.ip_network((rng.getrandbits(32), rng.randint(16, 32)), strict=False))
             for _ in range(n)]  # fmt: skip
    cidrs += ["2001:db8::/48", "2001:db8:1::1"]
    return [
        {"domain": names[: n // 2], "domain_suffix": names[n // 2 :], "port": [443]},
        {"ip_cidr": cidrs},
        {"type": "logical", "mode": "or",
         "rules": [{"source_ip_cidr": cidrs}, {"domain_keyword": ["kw"]}]},
    ]  # fmt: skip


def test_packed_rules_compile_to_the_same_answers() -> None:
    rng = random.Random(5)
    plain = _big_rules(rng, 300)
    packed = _big_rules(random.Random(5), 300)
    pack_rules(packed)
    assert PACKED_DOMAINS in packed[0] and "domain" not in packed[0] and packed[0]["port"] == [443]
    assert PACKED_CIDRS["ip_cidr"] in packed[1]
    assert PACKED_CIDRS["source_ip_cidr"] in packed[2]["rules"][0]
    a, b = compile_headless_rules(plain), compile_headless_rules(packed)
    names = plain[0]["domain"] + plain[0]["domain_suffix"]
    cidrs = plain[1]["ip_cidr"]
    for _ in range(500):
        name = rng.choice(names)
        net = ipaddress.ip_network(rng.choice(cidrs), strict=False)
        ip = net.network_address + rng.randrange(net.num_addresses)
        other = ipaddress.IPv4Address(rng.getrandbits(32))
        for meta in (FlowMeta(domain=name, destination_port=443),
                     FlowMeta(domain="x." + name, destination_port=443),
                     FlowMeta(domain="x." + name, destination_port=80),
                     FlowMeta(destination=ip), FlowMeta(destination=other),
                     FlowMeta(source=ip, destination=other)):  # fmt: skip
            assert a.match(meta) is b.match(meta), meta


def test_small_and_odd_lists_stay_plain() -> None:
    rules: list[dict[str, Any]] = [{"domain": ["a.com"], "ip_cidr": ["198.51.100.0/24"]},
                                   {"ip_cidr": ["198.51.100.0/24"] * 63 + ["bad"]}]  # fmt: skip
    pack_rules(rules)
    assert rules[0] == {"domain": ["a.com"], "ip_cidr": ["198.51.100.0/24"]}
    assert "ip_cidr" in rules[1]


def test_packed_cidr_item_explains_the_merged_range() -> None:
    halves = [ipaddress.ip_network("198.51.100.0/25"), ipaddress.ip_network("198.51.100.128/25")]
    item = IPCIDRItem(source=False, table=IPRangeSet(halves, ["198.51.100.0/25"]))
    meta = FlowMeta(destination=ipaddress.ip_address("198.51.100.200"))
    explained = item.explain(meta, MatchState())
    assert explained == "ip_cidr range '198.51.100.0/24' contains 198.51.100.200"
    assert "1 merged ranges" in str(item)


# -- the bounds, with generous margins (figures: bench/bench_ruleset_scale.py) ----------


def test_memory_per_entry_is_a_few_bytes_plus_the_name() -> None:
    rng = random.Random(1)
    names = [f"w{rng.randrange(10**7)}.example{rng.randrange(100)}.com" for _ in range(100_000)]
    name_bytes = sum(len(n) for n in set(names))
    cidrs = [str(ipaddress.IPv4Address(rng.getrandbits(32))) + "/24" for _ in range(100_000)]
    tracemalloc.start()
    try:
        table = DomainTable.build(names[:50_000], names[50_000:])
        table_bytes = tracemalloc.get_traced_memory()[0]
        ranges = IPRangeSet(parse_prefix(c) for c in cidrs)
        ranges_bytes = tracemalloc.get_traced_memory()[0] - table_bytes
    finally:
        tracemalloc.stop()
    # Measured: 10 bytes per name beside the name (a frozenset of str costs ~100).
    assert table_bytes < name_bytes + 20 * len(table)
    # Measured: 8 bytes per merged IPv4 range (a list of ints costs ~70).
    assert ranges_bytes < 16 * len(ranges) + 4096


def test_lookup_stays_fast() -> None:
    rng = random.Random(2)
    names = [f"w{rng.randrange(10**7)}.example{rng.randrange(100)}.com" for _ in range(100_000)]
    table = DomainTable.build(names[:50_000], names[50_000:])
    queries = [("x." if rng.random() < 0.5 else "") + rng.choice(names) for _ in range(2000)]
    queries += [f"miss{i}.a.b.example.org" for i in range(2000)]
    timings = []
    for q in queries:
        started = time.perf_counter()
        table.match(q)
        timings.append(time.perf_counter() - started)
    timings.sort()
    # The issue asks for < 5 µs p50 in the whole engine; this table alone measures ~2 µs on
    # a loaded 2-core machine. 50 µs leaves room for any CI machine.
    assert timings[len(timings) // 2] < 50e-6


V4_ODD = st.lists(st.sampled_from(["0", "1", "01", "255", "256", "10", "009", "1a", "", "+1"]),
                 min_size=3, max_size=5).map(".".join)  # fmt: skip


@st.composite
def prefix_texts(draw: Any) -> str:
    address = draw(st.one_of(
        V4_ODD,
        st.integers(0, 2**32 - 1).map(lambda v: str(ipaddress.IPv4Address(v))),
        st.integers(0, 2**128 - 1).map(lambda v: str(ipaddress.IPv6Address(v))),
        st.sampled_from(["::ffff:198.51.100.1", "::FFFF:c633:6401", "2001:db8::1%eth0",
                         "::198.51.100.1", "2001:DB8::", "::", " 198.51.100.1", "x"]),
    ))  # fmt: skip
    suffix = draw(st.sampled_from(["", "/0", "/8", "/08", "/24", "/32", "/33", "/64", "/96",
                                   "/120", "/128", "/129", "/", "/-1", "/1a", "/ 8"]))  # fmt: skip
    return address + suffix


@settings(max_examples=500, deadline=None)
@given(prefix_texts())
def test_prefix_span_reads_as_parse_prefix(text: str) -> None:
    try:
        net = parse_prefix(text)
    except ValueError:
        net = None
    try:
        span = prefix_span(text)
    except ValueError:
        span = None
    expected = None if net is None else (net.version, int(net.network_address),
                                         int(net.broadcast_address))  # fmt: skip
    assert span == expected, text


@settings(max_examples=150, deadline=None)
@given(st.lists(NAMES, max_size=10), st.lists(SUFFIXES, max_size=10), st.lists(networks(),
       max_size=10), st.lists(NAMES, max_size=5), st.lists(ADDRESSES, max_size=5))  # fmt: skip
def test_unpacked_rules_mean_the_same(
    domains: list[str], suffixes: list[str], nets: list[Any], names: list[str], ips: list[Any]
) -> None:
    rule: dict[str, Any] = {"domain": domains, "domain_suffix": suffixes,
                            "ip_cidr": [str(n) for n in nets], "port": [443]}  # fmt: skip
    rule = {k: v for k, v in rule.items() if v}
    packed = [dict(rule)]
    pack_rules(packed, minimum=1)
    plain = unpack_rules(packed)
    assert not any(k.startswith("$") for k in plain[0])
    a, b = compile_headless_rules([rule]), compile_headless_rules(plain)
    for meta in [*(FlowMeta(domain=n, destination_port=443) for n in [*names, *domains]),
                 *(FlowMeta(destination=ip, destination_port=443) for ip in ips)]:  # fmt: skip
        assert a.match(meta) is b.match(meta)
