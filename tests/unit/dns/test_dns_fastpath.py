"""The DNS client's fast path (ztun.dns.wire instead of dnspython) on loopback: cache hits are
synchronous and dnspython-free, and the answers read the same as the slow path's."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.message
import dns.name
import pytest

from tests.unit.dns.dns_peers import dns_peer
from tests.unit.dns.test_dns_client import META, RECORDS, parse, query
from tests.unit.dns.test_dns_client import run as run_with
from ztun.address import Address
from ztun.dns.client import DnsClient, FastMiss
from ztun.dns.hijack import DnsHijack


def run(body: Any, **kw: Any) -> Any:
    """test_dns_client's `run` against a fresh peer: the body's result and the peer's count."""
    with dns_peer(RECORDS) as peer:
        return run_with(peer, body, **kw), peer.count()


def test_a_hit_is_synchronous_aged_and_needs_no_dnspython(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]

    async def body(c: DnsClient) -> None:
        miss = c.answer_cached(query("a.test", qid=1), META)
        assert isinstance(miss, FastMiss)
        first = await c.fetch(miss)
        assert parse(first).id == 1 and parse(first).answer[0].ttl == 300
        now[0] += 7.5

        def refuse(*_a: Any, **_k: Any) -> None:
            raise AssertionError("dnspython on the fast path")

        second = query("A.TEST", qid=2)
        with monkeypatch.context() as m:
            m.setattr(dns.message, "from_wire", refuse)
            m.setattr(dns.message.Message, "to_wire", refuse)
            hit = c.answer_cached(second, META)
        assert isinstance(hit, bytes)
        assert parse(hit).id == 2 and parse(hit).answer[0].ttl == 293
        assert (c.counters["up"].queries, c.counters["up"].cache_hits) == (2, 1)

    _, upstream = run(body, clock=lambda: now[0])
    assert upstream == 1


def test_fast_and_slow_paths_share_the_cache_both_ways() -> None:
    async def body(c: DnsClient) -> None:
        slow = await c.resolve(query("a.test", qid=3), META)  # stored by the dnspython path
        fast = c.answer_cached(query("a.test", qid=4), META)
        assert isinstance(fast, bytes) and parse(fast).id == 4
        assert parse(fast).answer == parse(slow.wire).answer
        await c.exchange(query("a.test", "AAAA", qid=5), META)  # stored as wire
        again = await c.resolve(query("a.test", "AAAA", qid=6), META)
        assert again.cached and parse(again.wire).id == 6
        assert [r.to_text() for r in parse(again.wire).answer[0]] == ["2001:db8::1"]

    _, upstream = run(body)
    assert upstream == 2


def test_the_slow_path_still_answers_what_the_fast_path_refuses() -> None:
    async def body(c: DnsClient) -> None:
        two = dns.message.make_query("a.test", "A")
        two.find_rrset(two.question, dns.name.from_text("b.test"), 1, 1, create=True)
        assert c.answer_cached(two.to_wire(), META) is None
        assert c.answer_cached(query("a.test", "AAAA"), META) is None  # ipv4_only filters
        out = await c.exchange(query("a.test", "AAAA", qid=9), META)
        assert parse(out).id == 9 and parse(out).answer == []

    run(body, strategy="ipv4_only")


def test_hijack_answers_a_hit_inside_send_and_a_miss_without_a_task() -> None:
    async def body(c: DnsClient) -> None:
        await c.exchange(query("a.test", qid=1), META)
        hijack = DnsHijack(c)
        got: list[bytes] = []
        session = await hijack.open_udp(META, lambda _src, p: got.append(p), lambda _w: None)
        session.send(Address("198.51.100.53", 53), query("a.test", qid=77))
        assert len(got) == 1 and parse(got[0]).id == 77 and not hijack.tasks
        session.send(Address("198.51.100.53", 53), query("short.test", qid=78))
        # A miss waits for the module's callback: no task of the hijack's, none of the module's.
        assert not hijack.tasks and not c._tasks and session.waiting == 1
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        assert parse(got[1]).id == 78 and hijack.queries == 2 and session.waiting == 0

    run(body)
