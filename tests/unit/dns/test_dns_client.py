"""The DNS module end to end on loopback: rules → cache → one upstream query per identical
set in flight → strategy → answer; failures as SERVFAIL within the bound; `lookup` and the
direct outbound resolving through it."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from typing import Any

import dns.message
import dns.rcode
import pytest

from tests.unit.dns.dns_peers import DnsPeer, FakeRouter, dns_peer
from ztun.address import Address
from ztun.config.options import (
    DirectOutboundOptions,
    DNSOptions,
    FakeIPDNSServerOptions,
    HostsDNSServerOptions,
    UDPDNSServerOptions,
)
from ztun.dns.client import DnsClient
from ztun.dns.reverse import ReverseMap
from ztun.outbound.base import OutboundError
from ztun.outbound.direct import DirectOutbound
from ztun.route.metadata import FlowMeta

RECORDS = {
    "a.test": [("A", 300, ["203.0.113.1"]), ("AAAA", 300, ["2001:db8::1"])],
    "short.test": [("A", 1, ["203.0.113.9"])],
    "v6.test": [("AAAA", 300, ["2001:db8::6"])],
}
META = FlowMeta(network="udp", inbound="tun-in")


def query(name: str, qtype: str = "A", qid: int = 4242) -> bytes:
    q = dns.message.make_query(name, qtype)
    q.id = qid
    return q.to_wire()


def parse(wire: bytes | None) -> dns.message.Message:
    assert wire is not None
    return dns.message.from_wire(wire)


def addrs(wire: bytes | None) -> list[str]:
    return sorted(r.to_text() for rr in parse(wire).answer for r in rr)


def make_client(
    peer: DnsPeer, router: Any = None, *, strategy: str | None = None, **kw: Any
) -> DnsClient:
    servers = (
        UDPDNSServerOptions(tag="up", server="127.0.0.1", server_port=peer.port),
        HostsDNSServerOptions(tag="hosts", predefined={"router.lan": ("203.0.113.254",)}),
        FakeIPDNSServerOptions(tag="fake"),
    )
    opts = DNSOptions(
        servers=servers, final="up", strategy=strategy,  # type: ignore[arg-type]
        reverse_mapping=kw.pop("reverse_mapping", False),
        disable_cache=kw.pop("disable_cache", False),
    )  # fmt: skip
    direct = DirectOutbound(DirectOutboundOptions(tag="direct"))
    return DnsClient(opts, router or FakeRouter(), {"direct": direct}, **kw)


def run(peer: DnsPeer, body: Any, **kw: Any) -> Any:
    async def main() -> Any:
        client = make_client(peer, **kw)
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(main())


def test_answers_with_the_query_id_and_caches() -> None:
    async def body(c: DnsClient) -> None:
        first = await c.exchange(query("a.test", qid=1), META)
        second = await c.resolve(query("a.test", qid=2), META)
        assert parse(first).id == 1 and addrs(first) == ["203.0.113.1"]
        assert parse(second.wire).id == 2 and second.cached and second.server == "up"
        counters = c.counters["up"]
        assert (counters.queries, counters.answers, counters.cache_hits) == (2, 1, 1)

    with dns_peer(RECORDS) as peer:
        run(peer, body)
        assert peer.count() == 1  # the cache hit sent nothing upstream


def test_the_cache_honours_the_ttl() -> None:
    now = [1000.0]

    async def body(c: DnsClient) -> None:
        await c.exchange(query("short.test"), META)
        await c.exchange(query("short.test"), META)
        now[0] += 1.5
        again = await c.resolve(query("short.test"), META)
        assert not again.cached

    with dns_peer(RECORDS) as peer:
        run(peer, body, clock=lambda: now[0])
        assert peer.count() == 2


def test_disable_cache_asks_every_time() -> None:
    async def body(c: DnsClient) -> None:
        for _ in range(3):
            await c.exchange(query("a.test"), META)

    with dns_peer(RECORDS) as peer:
        run(peer, body, disable_cache=True)
        assert peer.count() == 3


def test_identical_queries_in_flight_share_one_upstream_query() -> None:
    async def body(c: DnsClient) -> None:
        outs = await asyncio.gather(*(c.exchange(query("a.test", qid=i), META) for i in range(50)))
        assert [parse(o).id for o in outs] == list(range(50))
        assert all(addrs(o) == ["203.0.113.1"] for o in outs)

    with dns_peer(RECORDS) as peer:
        peer.delay = 0.2
        run(peer, body, disable_cache=True)
        assert peer.count() == 1


def test_a_silent_server_is_servfail_within_the_bound() -> None:
    async def body(c: DnsClient) -> None:
        start = time.monotonic()
        outs = await asyncio.gather(*(c.resolve(query("a.test", qid=i), META) for i in range(5)))
        took = time.monotonic() - start
        assert all(parse(o.wire).rcode() == dns.rcode.SERVFAIL for o in outs)
        assert [parse(o.wire).id for o in outs] == list(range(5))
        assert 0.55 < took < 0.9, took
        assert "0.6s" in (outs[0].error or "")
        assert c.counters["up"].timeouts == 1

    with dns_peer(RECORDS) as peer:
        peer.silent = True
        run(peer, body, timeout=0.6)


def test_malformed_query_gets_formerr_or_nothing() -> None:
    async def body(c: DnsClient) -> None:
        formerr = await c.exchange(b"\x12\x34" + b"\x01\x00" + b"\x00\x05" + b"\x00" * 6, META)
        assert formerr is not None and formerr[:2] == b"\x12\x34" and formerr[3] & 0xF == 1
        assert await c.exchange(b"\x00", META) is None

    with dns_peer(RECORDS) as peer:
        run(peer, body)


def test_rules_route_reject_and_predefine() -> None:
    router = FakeRouter([
        ("lan", {"server": "hosts"}),
        ("ads.test", {"reject": "default"}),
        ("quiet.test", {"reject": "drop"}),
        ("fixed.test", {"predefined": type("P", (), {"rcode": "NOERROR", "answer": (
            "fixed.test. 60 IN A 203.0.113.77",), "ns": (), "extra": ()})()}),
        ("fake.test", {"server": "fake"}),
    ])  # fmt: skip

    async def body(c: DnsClient) -> None:
        lan = await c.resolve(query("router.lan"), META)
        assert lan.server == "hosts" and addrs(lan.wire) == ["203.0.113.254"]
        refused = await c.resolve(query("x.ads.test"), META)
        assert refused.response is not None and refused.response.rcode() == dns.rcode.REFUSED
        assert refused.server is None
        assert await c.exchange(query("quiet.test"), META) is None
        assert addrs(await c.exchange(query("fixed.test"), META)) == ["203.0.113.77"]
        [fake] = addrs(await c.exchange(query("fake.test"), META))
        assert ipaddress.ip_address(fake) in ipaddress.ip_network("198.18.0.0/15")
        assert c.fakeip.lookup(ipaddress.ip_address(fake)) == "fake.test"
        assert (router.seen[0].domain, router.seen[0].query_type) == ("router.lan", 1)
        assert router.seen[0].inbound == "tun-in"

    with dns_peer(RECORDS) as peer:
        run(peer, body, router=router)
        assert peer.count() == 0


def test_strategy_ipv4_only_answers_aaaa_empty_without_asking() -> None:
    async def body(c: DnsClient) -> None:
        out = await c.exchange(query("a.test", "AAAA"), META)
        assert parse(out).rcode() == dns.rcode.NOERROR and addrs(out) == []
        assert await c.lookup("a.test") == [ipaddress.ip_address("203.0.113.1")]

    with dns_peer(RECORDS) as peer:
        run(peer, body, strategy="ipv4_only")
        assert [t for _p, _n, t in peer.log] == [1]


def test_lookup_orders_by_strategy_and_fails_with_a_dns_error() -> None:
    v4, v6 = ipaddress.ip_address("203.0.113.1"), ipaddress.ip_address("2001:db8::1")

    async def body(c: DnsClient) -> None:
        assert await c.lookup("a.test") == [v4, v6]
        assert await c.lookup("a.test", strategy="prefer_ipv6") == [v6, v4]
        assert await c.lookup("a.test", strategy="ipv6_only") == [v6]
        assert await c.lookup("v6.test", strategy="prefer_ipv4") == [
            ipaddress.ip_address("2001:db8::6")
        ]
        assert await c.lookup("203.0.113.5") == [ipaddress.ip_address("203.0.113.5")]
        with pytest.raises(OutboundError) as e:
            await c.lookup("missing.test")
        assert e.value.kind.name == "DNS" and "NXDOMAIN" in str(e.value)

    with dns_peer(RECORDS) as peer:
        run(peer, body)


def test_reverse_mapping_records_answers() -> None:
    reverse = ReverseMap(64)

    async def body(c: DnsClient) -> None:
        await c.exchange(query("a.test"), META)
        assert reverse.lookup(ipaddress.ip_address("203.0.113.1"), time.monotonic()) == "a.test"

    with dns_peer(RECORDS) as peer:
        run(peer, body, reverse=reverse, reverse_mapping=True)


def test_in_flight_table_is_bounded() -> None:
    async def body(c: DnsClient) -> None:
        outs = await asyncio.gather(*(c.resolve(query(f"n{i}.test"), META) for i in range(4)))
        rcodes = sorted(parse(o.wire).rcode() for o in outs)
        assert rcodes.count(dns.rcode.SERVFAIL) == 2 and c.overloaded == 2

    with dns_peer(RECORDS) as peer:
        peer.delay = 0.1
        run(peer, body, max_in_flight=2)


def test_direct_outbound_resolves_through_the_module() -> None:
    """A direct outbound with the client's resolver connects to what the DNS rules say: here
    a hosts entry pointing a made-up name at a loopback listener."""

    async def main(peer: DnsPeer) -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        direct = DirectOutbound(DirectOutboundOptions(tag="direct"))
        opts = DNSOptions(servers=(
            HostsDNSServerOptions(tag="hosts", predefined={"svc.internal": ("127.0.0.1",)}),
            UDPDNSServerOptions(tag="up", server="127.0.0.1", server_port=peer.port),
        ), final="up")  # fmt: skip
        client = DnsClient(opts, FakeRouter([("internal", {"server": "hosts"})]),
                           {"direct": direct})  # fmt: skip
        direct.set_resolver(lambda name, strategy: client.lookup(name, strategy=strategy))
        try:
            sock = await direct.connect_tcp(Address("svc.internal", port), FlowMeta())
            assert sock.getpeername()[:2] == ("127.0.0.1", port)
            sock.close()
            with pytest.raises(OutboundError) as e:
                await direct.connect_tcp(Address("missing.test", port), FlowMeta())
            assert e.value.kind.name == "DNS"
        finally:
            await client.close()
            server.close()

    with dns_peer(RECORDS) as peer:
        asyncio.run(main(peer))
        assert [n for _p, n, _t in peer.log] == ["missing.test", "missing.test"]


def test_box_builds_the_module_for_a_dns_section_and_hands_it_to_direct_outbounds() -> None:
    from ztun.config.options import build_options
    from ztun.dns.module import build_dns
    from ztun.outbound.registry import build_outbound

    async def main(peer: DnsPeer) -> None:
        options = build_options({
            "outbounds": [{"type": "direct", "tag": "direct"}],
            "dns": {"servers": [
                {"type": "hosts", "tag": "hosts", "predefined": {"svc.internal": "127.0.0.1"}},
            ]},
        })  # fmt: skip
        outbounds = {o.tag: build_outbound(o) for o in options.outbounds}
        assert build_dns(build_options({}), outbounds, None) is None
        module = build_dns(options, outbounds, None)
        assert module is not None
        try:
            direct = outbounds["direct"]
            assert await direct.resolve("svc.internal") == ["127.0.0.1"]  # type: ignore[attr-defined]
            assert module.client.counters["hosts"].queries == 2  # A and AAAA
        finally:
            await module.close()

    with dns_peer(RECORDS) as peer:
        asyncio.run(main(peer))
