"""The group outbounds (selector, urltest) with stand-in members: the choice, retries, the
cache file, interrupt_exist_connections, chains, and the probe against a loopback HTTP server.
The namespace tests (tests/integration/test_groups.py) run them against real SOCKS5 servers."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from ztun.address import Address
from ztun.config.options import (
    DirectOutboundOptions,
    SelectorOutboundOptions,
    URLTestOutboundOptions,
)
from ztun.errors import ZtunError
from ztun.nat.udp import UdpSessions
from ztun.outbound import probe
from ztun.outbound.base import Counters, ErrorKind, OutboundError
from ztun.outbound.registry import build_outbounds
from ztun.outbound.selector import SelectorOutbound
from ztun.outbound.urltest import URLTestOutbound
from ztun.route.metadata import FlowMeta
from ztun.runtime.udp import UdpSessionRunner
from ztun.stack.commands import Command
from ztun.stack.flow import Flow

T = TypeVar("T")
META = FlowMeta(network="tcp", domain="example.com", destination_port=80)
DEST = Address("example.com", 80)


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


class Member:
    """A stand-in outbound: connects to `target` (a loopback listener), or fails with `fail`."""

    type = "direct"
    refuses_tcp = False
    drops_udp = False
    resolves_remotely = False

    def __init__(self, tag: str, target: tuple[str, int] | None = None) -> None:
        self.tag = tag
        self.target = target
        self.fail: ErrorKind | None = None
        self.counters = Counters()
        self.connects = 0
        self.sessions: list[Any] = []

    async def connect_tcp(
        self, dest: Address, meta: FlowMeta, handover: Any = None
    ) -> socket.socket:
        self.connects += 1
        if self.fail is not None:
            raise OutboundError(self.fail, f"{self.tag}: {self.fail.value}")
        sock = socket.socket()
        sock.setblocking(False)
        if self.target is not None:
            await asyncio.get_running_loop().sock_connect(sock, self.target)
        return sock

    async def open_udp(self, meta: FlowMeta, on_datagram: Any, on_close: Any) -> Any:
        member = self

        class Session:
            def __init__(self) -> None:
                self.closed = False
                self.sent: list[tuple[Address, bytes]] = []

            def send(self, dest: Address, payload: bytes) -> None:
                self.sent.append((dest, payload))

            def close(self) -> None:
                self.closed = True

        session = Session()
        member.sessions.append(session)
        return session

    async def close(self) -> None:
        return None


def group_with(cls: Any, options: Any, members: list[Member]) -> Any:
    group = cls(options)
    group.bind({m.tag: m for m in members})
    return group


def test_selector_default_select_and_capabilities() -> None:
    a, b = Member("a"), Member("b")
    b.refuses_tcp = True
    sel = group_with(SelectorOutbound, SelectorOutboundOptions(tag="s", outbounds=("a", "b"),
                                                               default="b"), [a, b])  # fmt: skip
    assert sel.now == "b" and sel.refuses_tcp is True and sel.now_chain() == ("s", "b")
    sel.select("a")
    assert sel.now == "a" and sel.refuses_tcp is False
    with pytest.raises(ZtunError, match="not a member"):
        sel.select("c")

    async def go() -> None:
        sock = await sel.connect_tcp(DEST, META)
        sock.close()

    run(go())
    assert (a.connects, b.connects) == (1, 0)


def test_selector_choice_survives_a_restart_in_the_cache_file(tmp_path: Path) -> None:
    path = tmp_path / "cache.json"
    path.write_text(json.dumps({"fakeip": {"kept": True}}))
    options = SelectorOutboundOptions(tag="s", outbounds=("a", "b"))
    members = [Member("a"), Member("b")]
    first = SelectorOutbound(options, path)
    first.bind({m.tag: m for m in members})
    assert first.now == "a"
    first.select("b")
    assert json.loads(path.read_text()) == {"fakeip": {"kept": True}, "selected": {"s": "b"}}
    assert SelectorOutbound(options, path).now == "b"
    # a choice that is no member any more falls back to the default
    other = SelectorOutboundOptions(tag="s", outbounds=("a", "c"), default="c")
    assert SelectorOutbound(other, path).now == "c"
    # no cache file: the default
    assert SelectorOutbound(options, None).now == "a"
    # through the registry, bound to the members (a missing one said in words)
    built = build_outbounds([DirectOutboundOptions(tag="a"), DirectOutboundOptions(tag="b"),
                             options], path)  # fmt: skip
    assert built["s"].now == "b" and built["s"].member() is built["b"]
    with pytest.raises(ZtunError, match="group 's': no outbound tagged 'b'"):
        build_outbounds([DirectOutboundOptions(tag="a"), options], path)


def nested_groups() -> tuple[Member, Member, SelectorOutbound]:
    """Members a and b; selector `inner` over a and b (b chosen); selector `outer` over inner
    and a (inner chosen). Returns a, b and outer."""
    a, b = Member("a"), Member("b")
    outbounds: dict[str, Any] = {"a": a, "b": b}
    inner = SelectorOutbound(SelectorOutboundOptions(tag="inner", outbounds=("a", "b"),
                                                     default="b"))  # fmt: skip
    outer = SelectorOutbound(SelectorOutboundOptions(tag="outer", outbounds=("inner", "a")))
    outbounds.update(inner=inner, outer=outer)
    inner.bind(outbounds)
    outer.bind(outbounds)
    return a, b, outer


def test_nested_groups_chain_and_attach() -> None:
    _, _, outer = nested_groups()
    assert outer.now_chain() == ("outer", "inner", "b")

    async def go() -> tuple[str, ...]:
        sock = await outer.connect_tcp(DEST, META)
        try:
            return outer.attach(sock, lambda: None)
        finally:
            sock.close()

    assert run(go()) == ("outer", "inner", "b")


def test_interrupt_ends_the_old_members_flows_only_when_asked() -> None:
    async def go(interrupt: bool) -> tuple[list[str], list[bool]]:
        server = socket.create_server(("127.0.0.1", 0))
        target = server.getsockname()
        a, b = Member("a", target), Member("b", target)
        sel = group_with(SelectorOutbound, SelectorOutboundOptions(
            tag="s", outbounds=("a", "b"), interrupt_exist_connections=interrupt), [a, b])
        closed: list[str] = []
        relayed = await sel.connect_tcp(DEST, META)
        sel.attach(relayed, lambda: closed.append("relayed"))
        bare = await sel.connect_tcp(DEST, META)  # no relay took it: the group cuts it
        udp_ends: list[str] = []
        session = await sel.open_udp(META, lambda *_: None, udp_ends.append)
        sel.select("b")
        kept = await sel.connect_tcp(DEST, META)
        sel.select("a")  # b's flow is left alone, it was opened through b
        peer, _ = server.accept()
        await asyncio.sleep(0)
        bare_cut = False
        try:
            bare.send(b"x")
        except OSError:
            bare_cut = True
        for s in (relayed, bare, kept, peer, server):
            s.close()
        return closed + udp_ends, [bare_cut, session.closed]

    ended, flags = run(go(True))
    assert ended[0] == "relayed" and ended[1] == "group 's' switched to 'b'" and len(ended) == 2
    assert flags == [True, True]
    assert run(go(False)) == ([], [False, False])


def urltest(members: list[Member], **kw: Any) -> URLTestOutbound:
    options = URLTestOutboundOptions(tag="u", outbounds=tuple(m.tag for m in members), **kw)
    return group_with(URLTestOutbound, options, members)


def test_urltest_dead_member_retried_through_the_next_at_once() -> None:
    a, b, c = Member("a"), Member("b"), Member("c")
    u = urltest([a, b, c])
    u._closed = True  # no probe task in this test: the flows alone move the group
    a.fail = ErrorKind.PROXY_DOWN

    async def go() -> None:
        sock = await u.connect_tcp(DEST, META)
        sock.close()

    run(go())
    assert (a.connects, b.connects) == (1, 1) and u.now == "b" and u.choice.is_down("a")
    run(go())
    assert (a.connects, b.connects) == (1, 2)  # the next flow goes straight to b


def test_urltest_errors_about_the_destination_change_nothing() -> None:
    a, b = Member("a"), Member("b")
    u = urltest([a, b])
    u._closed = True
    a.fail = ErrorKind.REFUSED  # the proxy says the destination refused: a is fine

    with pytest.raises(OutboundError):
        run(u.connect_tcp(DEST, META))
    assert u.now == "a" and not u.choice.is_down("a") and b.connects == 0


def test_urltest_timeout_marks_down_without_a_retry() -> None:
    a, b = Member("a"), Member("b")
    u = urltest([a, b])
    u._closed = True
    a.fail = ErrorKind.TIMEOUT
    with pytest.raises(OutboundError):
        run(u.connect_tcp(DEST, META))
    assert u.now == "b" and b.connects == 0


def test_urltest_every_member_dead_fails_with_the_last_error() -> None:
    a, b = Member("a"), Member("b")
    u = urltest([a, b])
    u._closed = True
    a.fail = b.fail = ErrorKind.PROXY_DOWN
    with pytest.raises(OutboundError, match="b: proxy unreachable"):
        run(u.connect_tcp(DEST, META))
    assert (a.connects, b.connects) == (1, 1)


class Http:
    """A loopback HTTP server answering 204 after `delay` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.hits = 0

    async def start(self) -> tuple[str, int]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.hits += 1
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(self.delay)
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]


def test_probe_times_an_http_answer_through_the_member_and_bounds_it() -> None:
    async def go() -> tuple[int, str, int]:
        fast, slow = Http(0.0), Http(1.0)
        fast_addr, slow_addr = await fast.start(), await slow.start()
        delay = await probe.url_delay(Member("a", fast_addr), "http://probe.example/gen")
        with pytest.raises(probe.ProbeError) as info:
            await probe.url_delay(Member("b", slow_addr), "http://probe.example/", 0.2)
        dead = Member("c")
        dead.fail = ErrorKind.PROXY_DOWN
        with pytest.raises(probe.ProbeError, match="proxy unreachable"):
            await probe.url_delay(dead, "http://probe.example/")
        return delay, str(info.value), fast.hits

    delay, timeout_message, hits = run(go())
    assert 1 <= delay < 1000 and hits == 1
    assert timeout_message == "no answer within 0.2s"
    with pytest.raises(probe.ProbeError):
        probe.Target.parse("ftp://x/")
    assert probe.Target.parse("https://h:8443/a?b=1") == probe.Target("https", "h", 8443, "/a?b=1")


def test_urltest_probes_pick_the_fastest_and_stop_when_idle() -> None:
    async def go() -> tuple[str, str, bool]:
        slow, fast = Http(0.3), Http(0.0)
        a = Member("a", await slow.start())
        b = Member("b", await fast.start())
        u = urltest([a, b], url="http://probe.example/", idle_timeout=0.8, interval=60.0)
        await u.start()
        for _ in range(100):
            await asyncio.sleep(0.05)
            if u.choice.state["a"].delay is not None and u.choice.state["b"].delay is not None:
                break
        chosen = u.now
        history = [d.delay for d in probe.HISTORY["b"]]
        await asyncio.sleep(1.2)
        stopped = u._task is not None and u._task.done()
        await u.close()
        return chosen, str(history[-1] > 0), stopped

    assert run(go()) == ("b", "True", True)


def test_udp_through_a_group_reaches_the_member_and_its_end_reaches_the_owner() -> None:
    async def go() -> tuple[list[Any], list[str], bool]:
        a = Member("a")
        sel = group_with(SelectorOutbound, SelectorOutboundOptions(tag="s", outbounds=("a",)),
                         [a])  # fmt: skip
        ends: list[str] = []
        session = await sel.open_udp(META, lambda *_: None, ends.append)
        session.send(DEST, b"one")
        session.send_many([(DEST, b"two"), (DEST, b"three")])
        inner = a.sessions[0]
        session.closed_by_member("proxy gone")  # the member's own end, heard once
        session.closed_by_member("again")
        return [p for _, p in inner.sent], ends, session.closed

    sent, ends, closed = run(go())
    assert sent == [b"one", b"two", b"three"] and ends == ["proxy gone"] and closed


def test_udp_flows_through_groups_name_the_member_that_carries_them() -> None:
    """The UDP runner gives each flow of a group's session the session's chain (down through
    inner groups), also a flow that joins the session once it is open (a SOCKS5 association's
    next destination), as a TCP flow gets it from `attach`."""
    _, b, outer = nested_groups()

    async def go() -> tuple[tuple[str, ...], tuple[str, ...]]:
        loop = asyncio.get_running_loop()
        out: list[Command] = []
        core = UdpSessions(out, timeout=60.0, max_flows=16)
        tasks: set[asyncio.Task[None]] = set()

        def drain() -> None:
            commands = out[:]
            out.clear()
            runner.execute_all(commands, lambda _p: None)

        runner = UdpSessionRunner(core, loop, tasks, lambda *_: None, drain)
        first = Flow(META, DEST, 0.0)
        # one session for the association, as the mixed inbound keys it (by outbound)
        core.send(core.add("f1", first, outer, "outer", 0.0), b"q1", 0.0)
        drain()
        await asyncio.gather(*tasks)
        second = Flow(META, Address("203.0.113.8", 53), 0.0)
        core.send(core.add("f2", second, outer, "outer", 0.0), b"q2", 0.0)
        drain()
        return first.chain, second.chain

    assert run(go()) == (("outer", "inner", "b"), ("outer", "inner", "b"))
    assert [p for _, p in b.sessions[0].sent] == [b"q1", b"q2"]
