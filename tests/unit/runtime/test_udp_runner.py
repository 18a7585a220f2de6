"""UdpSessionRunner: the I/O side of a UdpSessions core, with fake outbounds (no sockets)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Hashable

import pytest

from ztun import log as ztun_log
from ztun.address import Address
from ztun.log import RateLimiter
from ztun.nat.udp import UdpSessions
from ztun.outbound.base import CloseHandler, DatagramHandler
from ztun.route.metadata import FlowMeta
from ztun.runtime import udp as udp_runner
from ztun.runtime.udp import UdpSessionRunner
from ztun.stack.commands import Command, FlowEnded
from ztun.stack.flow import Flow

DEST = Address("203.0.113.7", 53)


class FakeSession:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = False
        self.sent: list[bytes] = []

    def send(self, dest: Address, payload: bytes) -> None:
        self.sent.append(payload)

    def close(self) -> None:
        self.closed = True


class SlowThenFastOutbound:
    """The first open waits for `release`; every later one returns at once."""

    tag = "proxy"

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.opened: list[FakeSession] = []

    async def open_udp(
        self, meta: FlowMeta, on_datagram: DatagramHandler, on_close: CloseHandler
    ) -> FakeSession:
        session = FakeSession(f"session{len(self.opened) + 1}")
        self.opened.append(session)
        if len(self.opened) == 1:
            await self.release.wait()
        return session


def flow(now: float) -> Flow:
    meta = FlowMeta(network="udp", destination=ipaddress.ip_address(DEST.host),
                    destination_port=DEST.port)  # fmt: skip
    return Flow(meta, DEST, now)


async def _late_open_does_not_replace_the_live_session() -> None:
    loop = asyncio.get_running_loop()
    out: list[Command] = []
    core = UdpSessions(out, timeout=60.0, max_flows=16)
    tasks: set[asyncio.Task[None]] = set()
    replies: list[tuple[Hashable, bytes]] = []

    def drain() -> None:
        commands = out[:]
        out.clear()
        for c in commands:
            runner.execute(c)

    runner = UdpSessionRunner(core, loop, tasks, lambda k, s, p: replies.append((k, p)), drain)
    outbound = SlowThenFastOutbound()
    # A first flow asks for the session; its open hangs.
    a = core.add("a", flow(0.0), outbound, "proxy", 0.0)
    core.send(a, b"one", 0.0)
    drain()
    await asyncio.sleep(0)
    # The flow ends while the session is still opening; a new flow asks again and gets one.
    core.end("a", "closed")
    b = core.add("b", flow(1.0), outbound, "proxy", 1.0)
    core.send(b, b"two", 1.0)
    drain()
    await asyncio.sleep(0.01)
    live = outbound.opened[1]
    assert runner.sessions["proxy"][1] is live and live.sent == [b"two"]
    # Now the first open completes, late: it is closed and the live session stays.
    outbound.release.set()
    await asyncio.sleep(0.01)
    late = outbound.opened[0]
    assert late.closed and not live.closed
    assert runner.sessions["proxy"][1] is live
    core.send(b, b"three", 2.0)
    drain()
    assert live.sent == [b"two", b"three"]
    # The last flow ends: the live session closes.
    core.end("b", "closed")
    drain()
    assert live.closed and "proxy" not in runner.sessions


def test_a_late_open_does_not_replace_the_live_session() -> None:
    asyncio.run(_late_open_does_not_replace_the_live_session())


def test_eviction_flood_logs_a_line_a_second(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full table evicting flow after flow: the table stays at its cap, every eviction is
    counted, and the log gets one line per interval instead of one per flow."""
    now = [0.0]
    monkeypatch.setattr(ztun_log, "LIMITER", RateLimiter(clock=lambda: now[0]))
    monkeypatch.setattr(udp_runner, "LIMITER", ztun_log.LIMITER)

    async def main() -> None:
        out: list[Command] = []
        core = UdpSessions(out, timeout=60.0, max_flows=100)
        runner = UdpSessionRunner(core, asyncio.get_running_loop(), set(), lambda *a: None,
                                  lambda: None)  # fmt: skip
        t0 = time.perf_counter()
        ended = 0
        for i in range(10_000):
            dest = Address(str(ipaddress.ip_address(0xCB007100 + (i % 250))), 1000 + i)
            meta = FlowMeta(network="udp", inbound="tun-in")
            core.add(i, Flow(meta, dest, 0.0), "direct", i, 0.0)
            for c in out:
                if isinstance(c, FlowEnded) and c.flow.end == "evicted":
                    ended += 1
                    runner.execute(c)
            out.clear()
        assert len(core) == 100  # the cap
        assert core.flows.evicted == ended == 10_000 - 100
        assert time.perf_counter() - t0 < 10.0  # generous: about 0.1 s here

    with caplog.at_level(logging.INFO, logger="ztun"):
        asyncio.run(main())
    lines = [r for r in caplog.records if "end=evicted" in r.getMessage()]
    assert len(lines) == 1  # the clock never moved: one line for 9900 evictions


class BurstSession(FakeSession):
    """A session that takes bursts (`send_many`), as the socket outbounds do."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.bursts: list[list[bytes]] = []

    def send_many(self, items: list[tuple[Address, bytes]]) -> None:
        self.bursts.append([p for _, p in items])
        self.sent += [p for _, p in items]


K1 = (b"\xc6\x12\x00\x01", 1000, b"\xcb\x00\x71\x14", 53)
K2 = (b"\xc6\x12\x00\x01", 1001, b"\xcb\x00\x71\x14", 53)


def test_a_sessions_datagrams_go_as_one_burst() -> None:
    """Issue 13: the commands of one TUN read batch reach each session as bursts, in order
    within the session and before a close that follows them."""
    from ztun.stack.commands import CloseUdpSession, SendDatagram, WriteDatagram, WritePacket

    loop = asyncio.new_event_loop()
    try:
        runner = UdpSessionRunner(UdpSessions([], timeout=60.0, max_flows=16), loop, set(),
                                  lambda *a: None, lambda: None)  # fmt: skip
    finally:
        loop.close()
    a, b, plain = BurstSession("a"), BurstSession("b"), FakeSession("plain")
    runner.sessions.update({"a": (1, a), "b": (2, b), "p": (3, plain)})
    written: list[bytes] = []

    def send(key: str, payload: bytes) -> SendDatagram:
        return SendDatagram(key, DEST, payload)

    commands: list[Command] = [send("a", b"1"), send("a", b"2"), send("b", b"x"), send("a", b"3"),
                               WritePacket(b"pkt"), CloseUdpSession("b", 2), send("b", b"late"),
                               send("a", b"4"), send("a", b"5"), send("p", b"i"),
                               send("p", b"j"), send("gone", b"?"),
                               WriteDatagram(K1, b"r1"), WriteDatagram(K1, b"r2"),
                               WriteDatagram(K2, b"s"), WriteDatagram(K1, b"r3")]  # fmt: skip
    replies: list[tuple[Hashable, list[bytes]]] = []
    runner.execute_all(commands, written.append, lambda k, p: replies.append((k, p)))
    assert a.bursts == [[b"1", b"2", b"3"], [b"4", b"5"]]
    assert a.sent == [b"1", b"2", b"3", b"4", b"5"]
    assert b.sent == [b"x"] and b.bursts == [] and b.closed  # sent before it closed, alone
    assert plain.sent == [b"i", b"j"]  # no send_many: one by one
    assert written == [b"pkt"]
    # A flow's consecutive replies together; the order across flows kept.
    assert replies == [(K1, [b"r1", b"r2"]), (K2, [b"s"]), (K1, [b"r3"])]
