"""The direct outbound's name lookups and UDP caches stay bounded: one lookup per name, a
bounded number running and waiting, refusals counted, flows to IP addresses unaffected."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable

import pytest

from ztun.address import Address, IPAddress
from ztun.config.options import DirectOutboundOptions
from ztun.outbound import direct
from ztun.outbound.base import OutboundError
from ztun.outbound.direct import MAX_LOOKUPS, MAX_QUEUED_LOOKUPS, DirectOutbound
from ztun.route.metadata import FlowMeta


class SlowResolver:
    """A resolver that answers 127.0.0.1 after `delay`, counting calls and concurrency."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0
        self.running = 0
        self.peak = 0

    async def __call__(self, name: str, strategy: str | None) -> list[IPAddress]:
        self.calls += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.running -= 1
        # n<i>.example: a loopback address of its own, so reply addresses differ too
        i = int(name[1:].split(".")[0]) if name[1:2].isdigit() else 0
        return [ipaddress.ip_address(f"127.0.{i // 250}.{i % 250 + 1}")]


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


def outbound(resolver: SlowResolver, connect_timeout: float = 10.0) -> DirectOutbound:
    ob = DirectOutbound(DirectOutboundOptions(tag="direct", connect_timeout=connect_timeout))
    ob.set_resolver(resolver)
    return ob


def test_one_lookup_in_flight_per_name() -> None:
    async def main() -> None:
        r = SlowResolver(0.2)
        ob = outbound(r)
        got = await asyncio.gather(*(ob.resolve("one.example") for _ in range(500)))
        assert r.calls == 1 and all(g == ["127.0.0.1"] for g in got)
        assert ob._lookups == {}  # the table empties once answered
        # a waiter that gives up cancels nothing for the others
        waiters = [asyncio.ensure_future(ob.resolve("two.example")) for _ in range(3)]
        await asyncio.sleep(0.05)
        waiters[0].cancel()
        assert await waiters[1] == ["127.0.0.1"] and r.calls == 2

    asyncio.run(main())


def test_flood_of_unique_names_does_not_starve_tcp_flows() -> None:
    """10k flows to unique names against a resolver that takes 5 s: at most MAX_LOOKUPS run,
    MAX_QUEUED_LOOKUPS wait, the rest are refused at once (counted); meanwhile a TCP flow to
    an IP address connects as fast as ever."""
    flood = 10_000

    async def main() -> None:
        r = SlowResolver(5.0)
        ob = outbound(r)
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        meta = FlowMeta(network="tcp")
        t0 = time.perf_counter()
        tasks = [asyncio.ensure_future(ob.connect_tcp(Address(f"n{i}.example", 80), meta))
                 for i in range(flood)]  # fmt: skip
        await asyncio.sleep(0.1)  # the flood is under way: every task has asked
        t1 = time.perf_counter()
        sock = await ob.connect_tcp(Address("127.0.0.1", port), meta)
        connect_time = time.perf_counter() - t1
        sock.close()
        refused = sum(1 for t in tasks if t.done() and isinstance(t.exception(), OutboundError))
        assert len(ob._lookups) == MAX_LOOKUPS + MAX_QUEUED_LOOKUPS  # the table's cap
        assert r.running == MAX_LOOKUPS
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        flood_time = time.perf_counter() - t0
        server.close()
        assert refused == flood - MAX_LOOKUPS - MAX_QUEUED_LOOKUPS
        assert ob.lookups_refused == refused
        assert r.peak == MAX_LOOKUPS
        # Generous bounds: about 2 ms and 0.5 s here.
        assert connect_time < 1.0, connect_time
        assert flood_time < 20.0, flood_time

    asyncio.run(main())


def test_udp_session_caches_and_queues_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct, "MAX_UDP_NAMES", 50)
    monkeypatch.setattr(direct, "MAX_UDP_REVERSE", 60)

    async def main() -> None:
        port = 9  # discard: nothing listens, and nothing needs to
        r = SlowResolver(0.0)
        ob = outbound(r)
        s = await ob.open_udp(FlowMeta(network="udp"), lambda a, p: None, lambda why: None)
        for i in range(500):
            s.send(Address(f"n{i}.example", port), b"x")
            if i % 100 == 99:
                await until(lambda: not s._resolving)
        await until(lambda: not s._resolving)
        assert s.dropped == 0
        assert len(s._resolved) == 50 and len(s._reverse) == 60
        # one name, a slow lookup: one lookup, MAX_UDP_PENDING datagrams held, the rest dropped
        r.delay = 0.3
        calls = r.calls
        for _ in range(100):
            s.send(Address("slow.example", port), b"z")
        assert len(s._resolving["slow.example"]) == direct.MAX_UDP_PENDING
        assert s.dropped == 100 - direct.MAX_UDP_PENDING
        await until(lambda: not s._resolving)
        assert r.calls == calls + 1
        # many names resolving at once: bounded too
        for i in range(direct.MAX_UDP_RESOLVING + 10):
            s.send(Address(f"slow{i}.example", port), b"z")
        assert len(s._resolving) == direct.MAX_UDP_RESOLVING
        s.close()

    asyncio.run(main())
