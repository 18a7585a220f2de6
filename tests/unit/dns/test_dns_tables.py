"""The DNS cache, the reverse map and the FakeIP pool: TTLs, bounds, persistence."""

from __future__ import annotations

import ipaddress
import json

import dns.message
import dns.rcode
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.dns import message as m
from ztun.dns.cache import DnsCache
from ztun.dns.fakeip import MAX_PER_FAMILY, FakeIPPool
from ztun.dns.reverse import MIN_LIFETIME, ReverseMap

IP = ipaddress.ip_address
SOA = "example. 900 IN SOA ns.example. host.example. 1 7200 900 1209600 60"


def answer(name: str, *records: str, qtype: str = "A", rcode: int = 0) -> dns.message.Message:
    q = dns.message.make_query(name, qtype)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for text in records:
        rrset = m.parse_record(text)
        (r.authority if rrset.rdtype == 6 else r.answer).append(rrset)
    return m.parse_response(r.to_wire())


def a(name: str, ttl: int = 60, ip: str = "198.51.100.1") -> dns.message.Message:
    return answer(name, f"{name}. {ttl} IN A {ip}")


# -- cache -------------------------------------------------------------------------------------


def test_cache_ages_ttls_and_expires() -> None:
    cache = DnsCache(10)
    assert cache.put("s", "a.example", 1, 1, a("a.example", 60), now=100.0)
    hit = cache.get("s", "A.Example.", 1, 1, now=130.5)
    assert hit is not None and hit.answer[0].ttl == 30 and hit.id == 0
    hit.answer[0].ttl = 1  # a caller's change stays in its copy
    again = cache.get("s", "a.example", 1, 1, now=131.0)
    assert again is not None and again.answer[0].ttl == 29
    assert cache.get("s", "a.example", 1, 1, now=160.0) is None
    assert (cache.hits, cache.misses, len(cache)) == (2, 1, 0)


def test_cache_refuses_what_it_must_not_keep() -> None:
    cache = DnsCache(10)
    assert not cache.put("s", "z.example", 1, 1, a("z.example", 0), now=0)
    fail = answer("f.example", rcode=dns.rcode.SERVFAIL)
    assert not cache.put("s", "f.example", 1, 1, fail, now=0)
    bare_nx = answer("n.example", rcode=dns.rcode.NXDOMAIN)
    assert not cache.put("s", "n.example", 1, 1, bare_nx, now=0)  # no SOA: no negative TTL
    assert not DnsCache(0).put("s", "a.example", 1, 1, a("a.example"), now=0)


def test_cache_keeps_negative_answers_for_soa_minimum() -> None:
    cache = DnsCache(10)
    nx = answer("nx.example", SOA, rcode=dns.rcode.NXDOMAIN)
    assert cache.put("s", "nx.example", 1, 1, nx, now=0)
    hit = cache.get("s", "nx.example", 1, 1, now=59)
    assert hit is not None and hit.rcode() == dns.rcode.NXDOMAIN
    assert cache.get("s", "nx.example", 1, 1, now=60) is None


def test_cache_shared_or_independent() -> None:
    shared = DnsCache(10)
    shared.put("one", "a.example", 1, 1, a("a.example"), now=0)
    assert shared.get("two", "a.example", 1, 1, now=1) is not None
    own = DnsCache(10, independent=True)
    own.put("one", "a.example", 1, 1, a("a.example"), now=0)
    assert own.get("two", "a.example", 1, 1, now=1) is None
    assert own.get("one", "a.example", 1, 1, now=1) is not None
    assert own.get("one", "a.example", 28, 1, now=1) is None  # qtype is part of the key


def test_cache_lru_bound() -> None:
    cache = DnsCache(3, per_server=3)
    for i in range(3):
        cache.put("s", f"{i}.example", 1, 1, a(f"{i}.example"), now=0)
    cache.get("s", "0.example", 1, 1, now=1)  # 0 is now the most recent
    cache.put("s", "3.example", 1, 1, a("3.example"), now=2)
    assert len(cache) == 3 and cache.evicted == 1
    assert cache.get("s", "1.example", 1, 1, now=3) is None
    assert cache.get("s", "0.example", 1, 1, now=3) is not None


@pytest.mark.parametrize("per_server", [None, 4])
def test_cache_flooding_server_evicts_only_its_own(per_server: int | None) -> None:
    cache = DnsCache(8, independent=True, per_server=per_server)
    for i in range(3):
        cache.put("home", f"{i}.home.example", 1, 1, a(f"{i}.home.example"), now=0)
    for i in range(1000):
        cache.put("flood", f"{i}.rnd.example", 1, 1, a(f"{i}.rnd.example"), now=1)
    assert len(cache) <= 8
    for i in range(3):
        assert cache.get("home", f"{i}.home.example", 1, 1, now=2) is not None


def test_cache_purge() -> None:
    cache = DnsCache(10)
    cache.put("s", "short.example", 1, 1, a("short.example", 5), now=0)
    cache.put("s", "long.example", 1, 1, a("long.example", 500), now=0)
    assert cache.purge(now=10) == 1 and len(cache) == 1


# -- reverse map -------------------------------------------------------------------------------


def test_reverse_map_ttl_and_floor() -> None:
    rmap = ReverseMap()
    rmap.record(IP("198.51.100.1"), "WWW.Example.com.", 100, now=0)
    assert rmap.lookup(IP("198.51.100.1"), now=99) == "www.example.com"
    assert rmap.lookup(IP("198.51.100.1"), now=100) is None
    rmap.record(IP("198.51.100.2"), "zero.example", 0, now=0)
    assert rmap.lookup(IP("198.51.100.2"), now=MIN_LIFETIME - 1) == "zero.example"
    rmap.record(IP("198.51.100.3"), "v4.example", 60, now=0)
    assert rmap.lookup(IP("::ffff:198.51.100.3"), now=1) == "v4.example"


def test_reverse_map_bound_is_lru() -> None:
    rmap = ReverseMap(capacity=2)
    rmap.record(IP("203.0.113.1"), "one.example", 60, now=0)
    rmap.record(IP("203.0.113.2"), "two.example", 60, now=0)
    assert rmap.lookup(IP("203.0.113.1"), now=1) == "one.example"
    rmap.record(IP("203.0.113.3"), "three.example", 60, now=1)
    assert len(rmap) == 2 and rmap.lookup(IP("203.0.113.2"), now=2) is None


def test_reverse_map_records_responses_through_cnames() -> None:
    rmap = ReverseMap()
    r = answer("www.example.com", "www.example.com. 30 IN CNAME edge.example.net.",
               "edge.example.net. 300 IN A 198.51.100.9")  # fmt: skip
    assert rmap.record_response(r, now=0) == 1
    assert rmap.lookup(IP("198.51.100.9"), now=29) == "www.example.com"
    assert rmap.lookup(IP("198.51.100.9"), now=31) is None  # the CNAME's TTL bounds it


# -- FakeIP ------------------------------------------------------------------------------------


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def test_fakeip_same_domain_same_address() -> None:
    pool = FakeIPPool(net("198.18.0.0/15"), net("fc00::/18"))  # type: ignore[arg-type]
    first = pool.allocate("Example.com.", 4)
    assert first == IP("198.18.0.1")  # the network address is skipped
    assert pool.allocate("example.com", 4) == first
    assert pool.allocate("other.example", 4) == IP("198.18.0.2")
    six = pool.allocate("example.com", 6)
    assert six == IP("fc00::1") and pool.lookup(six) == "example.com"
    assert pool.lookup(first) == "example.com" and pool.lookup(IP("198.18.9.9")) is None
    assert pool.contains(IP("198.19.255.255")) and not pool.contains(IP("198.20.0.0"))
    assert not pool.contains(IP("2001:db8::1"))


def test_fakeip_reuses_least_recently_used_when_full() -> None:
    pool = FakeIPPool(net("10.0.0.0/29"), None)  # type: ignore[arg-type]
    names = [f"n{i}.example" for i in range(6)]  # six usable: .1 to .6
    ips = [pool.allocate(n, 4) for n in names]
    assert IP("10.0.0.0") not in ips and IP("10.0.0.7") not in ips
    pool.lookup(ips[0])  # n0 is used again: n1 is the oldest now
    new = pool.allocate("late.example", 4)
    assert new == ips[1] and pool.lookup(new) == "late.example"
    assert pool.allocate("n0.example", 4) == ips[0]
    assert len(pool) == 6
    with pytest.raises(ValueError):
        pool.allocate("x.example", 6)
    assert pool.supports(4) and not pool.supports(6)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=200))
def test_fakeip_table_is_a_bijection(picks: list[int]) -> None:
    pool = FakeIPPool(net("10.0.0.0/28"), None)  # type: ignore[arg-type]
    for p in picks:
        ip = pool.allocate(f"d{p}.example", 4)
        assert pool.lookup(ip) == f"d{p}.example"
    assert len(pool) <= 14
    state = pool.dump()
    seen = [d for _, d in state["inet4"]["entries"]]
    assert len(seen) == len(set(seen))


def test_fakeip_hard_cap() -> None:
    pool = FakeIPPool(net("10.0.0.0/8"), None)  # type: ignore[arg-type]
    family = pool._families[4]
    assert family.size == MAX_PER_FAMILY


def test_fakeip_dump_and_load() -> None:
    r4, r6 = net("198.18.0.0/15"), net("fc00::/18")
    pool = FakeIPPool(r4, r6)  # type: ignore[arg-type]
    one = pool.allocate("one.example", 4)
    two = pool.allocate("two.example", 6)
    state = json.loads(json.dumps(pool.dump()))
    back = FakeIPPool.load(state, r4, r6)  # type: ignore[arg-type]
    assert back.lookup(one) == "one.example" and back.lookup(two) == "two.example"
    assert back.allocate("three.example", 4) == IP("198.18.0.2")  # goes on after the last
    moved = FakeIPPool.load(state, net("100.64.0.0/10"), r6)  # type: ignore[arg-type]
    assert moved.lookup(one) is None and moved.lookup(two) == "two.example"
    assert moved.allocate("one.example", 4) == IP("100.64.0.1")


@pytest.mark.parametrize(
    "state",
    [None, [], {"version": 99}, {"version": 1, "inet4": "x"},
     {"version": 1, "inet4": {"range": "198.18.0.0/15", "next": 1, "entries": [["1.2.3.4", "a"]]}},
     {"version": 1, "inet4": {"range": "198.18.0.0/15", "next": "1", "entries": []}},
     {"version": 1, "inet4": {"range": "198.18.0.0/15", "next": 2,
                              "entries": [["198.18.0.1", "a"], ["198.18.0.2", "a"]]}},
     {"version": 1, "inet4": {"range": "198.18.0.0/15", "next": 1, "entries": [[1, 2]]}}],
)  # fmt: skip
def test_fakeip_load_ignores_damaged_state(state: object) -> None:
    pool = FakeIPPool.load(state, net("198.18.0.0/15"), None)  # type: ignore[arg-type]
    assert len(pool) == 0 and pool.allocate("a", 4) == IP("198.18.0.1")
