"""Each compiled matcher agrees with a naive reference implementation (hypothesis)."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.route.items import (
    PRIVATE_RANGES,
    DomainItem,
    DomainKeywordItem,
    IPCIDRItem,
    IPRangeSet,
    PortItem,
    parse_port_range,
    parse_prefix,
)
from ztun.route.metadata import FlowMeta
from ztun.route.rule import MatchState

LABELS = st.sampled_from(["a", "b", "ab", "com", "x-y", "example", "cn", "ba"])
DOMAINS = st.lists(LABELS, min_size=1, max_size=4).map(".".join)
SUFFIXES = st.one_of(DOMAINS, DOMAINS.map(lambda d: "." + d))


def naive_domain(domain: str, domains: list[str], suffixes: list[str]) -> bool:
    if domain in domains:
        return True
    for s in suffixes:
        if s.startswith("."):
            if domain.endswith(s):
                return True
        elif domain == s or domain.endswith("." + s):
            return True
    return False


@given(st.lists(DOMAINS, max_size=5), st.lists(SUFFIXES, max_size=5), DOMAINS)
def test_domain_item_matches_naive(domains: list[str], suffixes: list[str], query: str) -> None:
    item = DomainItem(domains, suffixes)
    meta = FlowMeta(domain=query)
    expected = naive_domain(query, domains, suffixes)
    assert item.match(meta, MatchState()) is expected
    assert (item.explain(meta, MatchState()) is not None) is expected


def test_domain_suffix_is_label_aligned() -> None:
    item = DomainItem([], ["a.com", ".b.com"])
    state = MatchState()
    assert item.match(FlowMeta(domain="a.com"), state)
    assert item.match(FlowMeta(domain="x.a.com"), state)
    assert not item.match(FlowMeta(domain="xa.com"), state)
    assert not item.match(FlowMeta(domain="b.com"), state)
    assert item.match(FlowMeta(domain="x.b.com"), state)
    assert item.match(FlowMeta(domain="X.A.COM."), state)  # case and root dot do not matter
    assert not item.match(FlowMeta(destination=ipaddress.ip_address("198.51.100.1")), state)


@given(st.lists(st.text("abc.", min_size=1, max_size=3), max_size=12), st.text("abc.", max_size=10))
def test_keyword_item_matches_naive(keywords: list[str], domain: str) -> None:
    item = DomainKeywordItem(keywords)
    meta = FlowMeta(domain=domain or None)
    norm = meta.domain or ""
    expected = bool(norm) and any(k in norm for k in keywords)
    assert item.match(meta, MatchState()) is expected


def test_keyword_item_uses_automaton_for_many_keywords() -> None:
    item = DomainKeywordItem([f"kw{i}" for i in range(50)])
    assert item._automaton is not None
    assert item.match(FlowMeta(domain="xx.kw42.example"), MatchState())
    assert not item.match(FlowMeta(domain="kw.example"), MatchState())


V4_NETS = st.builds(
    lambda a, p: ipaddress.ip_network((a, p), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
V6_NETS = st.builds(
    lambda a, p: ipaddress.ip_network((a, p), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
V4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
V6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)


@settings(max_examples=300)
@given(st.lists(st.one_of(V4_NETS, V6_NETS), max_size=8), st.one_of(V4, V6))
def test_range_set_matches_naive(nets: list, ip: ipaddress.IPv4Address) -> None:
    expected = any(ip.version == n.version and ip in n for n in nets)
    assert (ip in IPRangeSet(nets)) is expected


@given(st.lists(V4_NETS, min_size=1, max_size=6))
def test_range_set_borders(nets: list) -> None:
    ranges = IPRangeSet(nets)
    for n in nets:
        assert n.network_address in ranges
        assert n.broadcast_address in ranges


def test_cidr_item_accepts_bare_ips_and_mapped_v6() -> None:
    item = IPCIDRItem(["198.51.100.7", "::ffff:203.0.113.0/120", "2001:db8::/32"], source=False)
    state = MatchState()
    assert item.match(FlowMeta(destination=ipaddress.ip_address("198.51.100.7")), state)
    assert not item.match(FlowMeta(destination=ipaddress.ip_address("198.51.100.8")), state)
    assert item.match(FlowMeta(destination=ipaddress.ip_address("203.0.113.9")), state)
    mapped = ipaddress.ip_address("::ffff:203.0.113.9")
    assert item.match(FlowMeta(destination=mapped), state)
    assert item.match(FlowMeta(destination=ipaddress.ip_address("2001:db8::1")), state)
    # A domain flow matches ip_cidr on its resolved addresses only.
    resolved = (ipaddress.ip_address("198.51.100.7"),)
    assert item.match(FlowMeta(domain="a.example", resolved=resolved), state)
    assert not item.match(FlowMeta(domain="a.example"), state)


def test_parse_prefix_rejects_garbage() -> None:
    for bad in ("", "1.2.3", "1.2.3.4/33", "example.com", "::1/129"):
        try:
            parse_prefix(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_private_ranges() -> None:
    for text in ("10.0.0.1", "172.16.0.1", "192.168.1.1", "127.0.0.1", "169.254.1.1",
                 "224.0.0.1", "0.0.0.0", "::1", "fc00::1", "fe80::1", "ff02::1", "::"):  # fmt: skip
        assert ipaddress.ip_address(text) in PRIVATE_RANGES, text
    for text in ("198.51.100.1", "203.0.113.1", "8.8.8.8", "2001:db8::1", "172.32.0.1"):
        assert ipaddress.ip_address(text) not in PRIVATE_RANGES, text


@given(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 65535))
def test_port_range_matches_naive(low: int, high: int, port: int) -> None:
    low, high = min(low, high), max(low, high)
    item = PortItem([], [f"{low}:{high}"], source=False, field="port")
    assert item.match(FlowMeta(destination_port=port), MatchState()) is (low <= port <= high)


def test_port_range_forms() -> None:
    assert parse_port_range(":80") == (0, 80)
    assert parse_port_range("8000:") == (8000, 65535)
    for bad in ("80", "90:80", "a:b", "1:2:3", "1:70000"):
        try:
            parse_port_range(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


@given(st.text(max_size=12))
def test_parse_port_range_never_crashes(text: str) -> None:
    try:
        low, high = parse_port_range(text)
    except ValueError:
        return
    assert 0 <= low <= high <= 65535
