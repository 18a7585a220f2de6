"""The connection tracker, the relay's live counts and close, and UDP flows in the tracker:
what the Clash API lists and closes, with counters that match the bytes moved."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from ztun.address import Address
from ztun.nat.udp import UdpSessions
from ztun.outbound.base import CloseHandler, DatagramHandler
from ztun.route.metadata import FlowMeta
from ztun.runtime import relay as relay_mod
from ztun.runtime.relay import RelayResult, relay
from ztun.runtime.tracker import Tracker
from ztun.runtime.udp import UdpSessionRunner
from ztun.stack.commands import Command
from ztun.stack.flow import Flow, Refused

MODES = [pytest.param(True, id="splice"), pytest.param(False, id="copy")]
if not relay_mod.HAVE_SPLICE:  # pragma: no cover
    MODES = [pytest.param(False, id="copy")]


def flow(outbound: str = "direct", network: str = "tcp") -> Flow:
    meta = FlowMeta(network=network, destination=ipaddress.ip_address("203.0.113.7"),  # type: ignore[arg-type]
                    destination_port=443, inbound="mixed-in")  # fmt: skip
    f = Flow(meta, Address("203.0.113.7", 443), 0.0)
    f.outbound = outbound
    return f


def test_add_remove_totals_and_per_outbound() -> None:
    tracker = Tracker(inbound_types={"mixed-in": "mixed"})
    counts = {"a": (10, 100), "b": (1, 2)}
    a = tracker.add(flow(), "tcp", lambda: counts["a"], lambda: None)
    b = tracker.add(flow("proxy"), "tcp", lambda: counts["b"], lambda: None)
    assert a is not None and b is not None and a.id != b.id
    assert a.inbound_type == "mixed" and tracker.open_count == 2
    assert tracker.totals() == (11, 102)
    counts["a"] = (20, 200)  # live: read when asked
    assert tracker.totals() == (21, 202)
    tracker.remove(a)
    tracker.remove(a)  # twice: counted once
    assert tracker.open_count == 1 and tracker.totals() == (21, 202)
    assert tracker.per_outbound() == {
        "direct": {"upload": 20, "download": 200, "connections": 0},
        "proxy": {"upload": 1, "download": 2, "connections": 1},
    }
    assert tracker.get(b.id) is b and tracker.get(a.id) is None


def test_the_table_is_bounded() -> None:
    tracker = Tracker(max_tracked=3)
    entries = [tracker.add(flow(), "tcp", lambda: (0, 0), lambda: None) for _ in range(5)]
    assert sum(e is not None for e in entries) == 3 and tracker.untracked == 2
    assert tracker.open_count == 3 and bool(tracker)  # an empty or full tracker is truthy


def test_close_calls_the_flow_once() -> None:
    tracker = Tracker()
    closed: list[int] = []
    e = tracker.add(flow(), "tcp", lambda: (0, 0), lambda: closed.append(1))
    assert e is not None
    assert tracker.close(e.id) and tracker.close(e.id)
    assert closed == [1] and e.closed and tracker.closed_by_api == 1
    assert not tracker.close("no-such-id")
    tracker.remove(e)
    assert tracker.close_all() == 0


def _pairs() -> tuple[socket.socket, ...]:
    a1, a2 = socket.socketpair()
    b1, b2 = socket.socketpair()
    for s in (a1, a2, b1, b2):
        s.setblocking(False)
    return a1, a2, b1, b2


@pytest.mark.parametrize("splice", MODES)
def test_relay_counts_live_and_close_ends_it(splice: bool) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        app, client, remote, server = _pairs()
        result = RelayResult()
        task = asyncio.ensure_future(relay(client, remote, initial_up=b"hello",
                                           use_splice=splice, result=result))  # fmt: skip
        await loop.sock_sendall(server, b"x" * 5000)
        got = 0
        while got < 5000:
            got += len(await loop.sock_recv(app, 65536))
        await asyncio.sleep(0.01)
        assert result.moved() == (5, 5000)  # initial bytes included
        assert (await loop.sock_recv(server, 100)) == b"hello"
        result.close()
        await asyncio.wait_for(task, 2)
        assert result.reason == "closed" and (result.up, result.down) == (5, 5000)
        assert result.moved() == (5, 5000) and result.live is None
        for s in (app, client, remote, server):
            s.close()

    asyncio.run(main())


def test_close_before_the_relay_starts() -> None:
    async def main() -> None:
        app, client, remote, server = _pairs()
        result = RelayResult()
        result.close()
        await asyncio.wait_for(relay(client, remote, result=result), 2)
        assert result.reason == "closed"
        for s in (app, client, remote, server):
            s.close()

    asyncio.run(main())


class EchoSession:
    def __init__(self, reply: DatagramHandler) -> None:
        self.reply = reply
        self.closed = False

    def send(self, dest: Address, payload: bytes) -> None:
        self.reply(dest, payload + b"!")

    def close(self) -> None:
        self.closed = True


class EchoOutbound:
    tag = "direct"

    def __init__(self) -> None:
        self.sessions: list[EchoSession] = []

    async def open_udp(self, meta: FlowMeta, on_datagram: DatagramHandler,
                       on_close: CloseHandler) -> EchoSession:  # fmt: skip
        session = EchoSession(on_datagram)
        self.sessions.append(session)
        return session


def test_udp_flows_are_tracked_counted_and_closed() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        out: list[Command] = []
        core = UdpSessions(out, timeout=60.0, max_flows=16)
        tracker = Tracker()

        def drain() -> None:
            commands = out[:]
            out.clear()
            for c in commands:
                runner.execute(c)

        def on_reply(key: object, src: Address, payload: bytes) -> None:
            core.reply(key, payload, loop.time())

        runner = UdpSessionRunner(core, loop, set(), on_reply, drain, tracker)
        outbound = EchoOutbound()
        f = flow(network="udp")
        now = loop.time()
        uf = core.add("k", f, outbound, "k", now)
        core.add("refused", flow(network="udp"), Refused("no"), "r", now)
        core.send(uf, b"ping", now)
        drain()
        await asyncio.sleep(0.01)
        (entry,) = list(tracker)  # the refused flow is not listed
        assert entry.network == "udp" and entry.moved() == (4, 5)
        assert tracker.close(entry.id)
        assert tracker.open_count == 0 and outbound.sessions[0].closed
        assert f.end == "closed" and tracker.totals() == (4, 5)
        # the runner's own table is empty again
        assert runner._tracked == {}

    asyncio.run(main())
