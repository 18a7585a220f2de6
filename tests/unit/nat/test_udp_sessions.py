"""UdpSessions as the mixed inbound's UDP ASSOCIATE uses it: flow key = destination, session
key = outbound tag, so every destination routed to one outbound shares one session."""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.address import Address
from ztun.nat.udp import UdpFlow, UdpSessions, UdpTable
from ztun.route.metadata import FlowMeta
from ztun.stack.commands import (
    CloseUdpSession,
    Command,
    FlowEnded,
    OpenUdpSession,
    SendDatagram,
)
from ztun.stack.flow import Flow, Refused

PROXY, DIRECT = "proxy", "direct"
A = Address("203.0.113.5", 53)
B = Address("198.51.100.7", 443)
C = Address("2001:db8::9", 123)
D = Address("203.0.113.1", 9)


class Outbound:
    def __init__(self, tag: str) -> None:
        self.tag = tag


OUTBOUNDS = {PROXY: Outbound(PROXY), DIRECT: Outbound(DIRECT)}


class Assoc:
    """The mixed inbound's use of the core, without sockets: one association's flows."""

    def __init__(self, routes: dict[Address, str | Refused] | None = None, *,
                 timeout: float = 60.0, max_flows: int = 16, max_pending: int = 4,
                 retry_delay: float = 1.0) -> None:  # fmt: skip
        self.out: list[Command] = []
        self.core = UdpSessions(self.out, timeout=timeout, max_flows=max_flows,
                                max_pending=max_pending, retry_delay=retry_delay)  # fmt: skip
        self.routes = routes if routes is not None else {A: PROXY, B: PROXY, C: DIRECT}
        self.routed: list[Address] = []

    def send(self, dest: Address, payload: bytes, now: float) -> UdpFlow:
        key = (dest.host, dest.port)
        uf = self.core.get(key, now)
        if uf is None:
            meta = FlowMeta(network="udp", destination=ipaddress.ip_address(dest.host),
                            destination_port=dest.port, inbound="mixed-in")  # fmt: skip
            flow = Flow(meta, dest, now)
            self.routed.append(dest)
            route = self.routes.get(dest, DIRECT)
            if isinstance(route, Refused):
                verdict: object = route
            else:
                flow.outbound = route
                verdict = OUTBOUNDS[route]
            uf = self.core.add(key, flow, verdict, flow.outbound, now)
        if uf.refused is None:
            self.core.send(uf, payload, now)
        return uf

    def take(self) -> list[Command]:
        got = list(self.out)
        self.out.clear()
        return got


def key(a: Address) -> tuple[str, int]:
    return (a.host, a.port)


def either_order(got: list[Command], want: list[Command]) -> bool:
    """The flows of one session end in no particular order (they are kept in a set)."""
    return len(got) == len(want) and all(c in want for c in got) and all(c in got for c in want)


def test_destinations_share_one_session_per_outbound() -> None:
    s = Assoc()
    fa = s.send(A, b"a1", 0.0)
    out = s.take()
    assert out == [OpenUdpSession(PROXY, 1, fa.flow, OUTBOUNDS[PROXY])]
    fb = s.send(B, b"b1", 0.1)
    s.send(A, b"a2", 0.2)
    assert s.take() == []  # queued behind the session being opened
    fc = s.send(C, b"c1", 0.3)
    assert s.take() == [OpenUdpSession(DIRECT, 2, fc.flow, OUTBOUNDS[DIRECT])]
    assert fa.session_key == fb.session_key == PROXY

    s.core.opened(PROXY, 1)
    assert s.take() == [SendDatagram(PROXY, A, b"a1"), SendDatagram(PROXY, B, b"b1"),
                        SendDatagram(PROXY, A, b"a2")]  # fmt: skip
    s.send(B, b"b2", 1.0)
    assert s.take() == [SendDatagram(PROXY, B, b"b2")]
    assert s.routed == [A, B, C]

    # Replies come back per destination and are counted on that flow.
    assert s.core.reply(key(B), b"xyz", 1.1) is fb
    assert (fb.flow.up, fb.flow.down, fa.flow.up) == (4, 3, 4)
    assert s.core.reply(("203.0.113.200", 1), b"?", 1.1) is None

    # The shared session closes only with its last flow.
    s.core.end(key(A), "closed")
    assert s.take() == [FlowEnded(fa.flow, quiet=True)]
    s.core.end(key(A), "closed")  # already gone
    assert s.take() == []
    s.core.end(key(B), "closed")
    assert s.take() == [FlowEnded(fb.flow, quiet=True), CloseUdpSession(PROXY, 1)]
    # The direct session is untouched; a new proxy flow opens a new proxy session.
    fd = s.send(A, b"a3", 2.0)
    assert s.take() == [OpenUdpSession(PROXY, 3, fd.flow, OUTBOUNDS[PROXY])]


def test_shared_session_queue_is_bounded() -> None:
    s = Assoc(max_pending=3)
    s.send(A, b"1", 0.0)
    s.send(B, b"2", 0.0)
    s.send(A, b"3", 0.0)
    s.send(B, b"4", 0.0)
    s.send(A, b"5", 0.0)
    assert s.core.dropped == 2
    s.take()
    s.core.opened(PROXY, 1)
    assert [c.payload for c in s.take() if isinstance(c, SendDatagram)] == [b"1", b"2", b"3"]


def test_shared_session_failure_ends_every_flow() -> None:
    s = Assoc(retry_delay=2.0)
    fa = s.send(A, b"a", 0.0)
    fb = s.send(B, b"b", 0.0)
    s.take()
    assert s.core.open_failed(PROXY, 1, "proxy unreachable", 0.5) == 2
    assert either_order(s.take(), [FlowEnded(fa.flow), FlowEnded(fb.flow)])
    assert fa.flow.end == fb.flow.end == "failed"
    assert fa.flow.error == "proxy unreachable"
    assert len(s.core) == 0
    # Inside the delay: a new flow is routed but its datagrams are dropped.
    dropped = s.core.dropped
    fa2 = s.send(A, b"a", 1.0)
    s.send(A, b"a", 1.5)
    assert s.take() == []
    assert s.core.dropped == dropped + 2
    # Expiry forgets the failure once the delay is over; then a new session is asked for.
    s.core.expire(2.6)
    s.send(A, b"again", 2.6)
    assert s.take() == [OpenUdpSession(PROXY, 2, fa2.flow, OUTBOUNDS[PROXY])]
    s.core.opened(PROXY, 2)
    assert s.take() == [SendDatagram(PROXY, A, b"again")]


def test_failed_session_retried_on_send_after_delay() -> None:
    s = Assoc(retry_delay=1.0)
    s.send(A, b"a", 0.0)
    s.take()
    s.core.open_failed(PROXY, 1, "boom", 0.0)
    s.take()
    fb = s.send(B, b"b", 1.0)  # no expire in between: send itself sees the delay is over
    assert s.take() == [OpenUdpSession(PROXY, 2, fb.flow, OUTBOUNDS[PROXY])]


def test_shared_session_ended_resets_every_flow() -> None:
    s = Assoc()
    fa = s.send(A, b"a", 0.0)
    fb = s.send(B, b"b", 0.0)
    fc = s.send(C, b"c", 0.0)
    s.core.opened(PROXY, 1)
    s.core.opened(DIRECT, 2)
    s.take()
    s.core.ended(PROXY, 2, "wrong ident")
    s.core.ended("nonexistent", 1, "x")
    assert s.take() == []
    s.core.ended(PROXY, 1, "control connection lost")
    assert either_order(s.take(), [FlowEnded(fa.flow), FlowEnded(fb.flow)])
    assert fa.flow.end == "reset" and fa.flow.error == "control connection lost"
    assert fc.flow.end == ""
    # The next datagram opens a fresh session for a fresh flow.
    fa2 = s.send(A, b"a", 1.0)
    assert s.take() == [OpenUdpSession(PROXY, 3, fa2.flow, OUTBOUNDS[PROXY])]


def test_idle_flows_expire_one_by_one() -> None:
    s = Assoc(timeout=10.0)
    fa = s.send(A, b"a", 0.0)
    fb = s.send(B, b"b", 5.0)
    s.core.opened(PROXY, 1)
    s.take()
    s.core.expire(12.0)
    assert s.take() == [FlowEnded(fa.flow, quiet=True)]
    assert fa.flow.end == "idle"
    s.core.reply(key(B), b"r", 14.0)  # keeps B alive
    s.core.expire(20.0)
    assert s.take() == []
    s.core.expire(24.5)
    assert s.take() == [FlowEnded(fb.flow, quiet=True), CloseUdpSession(PROXY, 1)]


def test_eviction_of_a_shared_member_keeps_the_session() -> None:
    s = Assoc(max_flows=2, routes={A: PROXY, B: PROXY, D: PROXY})
    fa = s.send(A, b"a", 0.0)
    s.send(B, b"b", 1.0)
    s.core.opened(PROXY, 1)
    s.take()
    s.send(D, b"d", 2.0)
    assert s.take() == [FlowEnded(fa.flow), SendDatagram(PROXY, D, b"d")]
    assert fa.flow.end == "evicted"
    assert s.core.flows.evicted == 1


def test_eviction_of_the_last_member_closes_its_session() -> None:
    s = Assoc(max_flows=1)
    fa = s.send(A, b"a", 0.0)
    s.core.opened(PROXY, 1)
    s.take()
    fc = s.send(C, b"c", 1.0)
    assert s.take() == [FlowEnded(fa.flow), CloseUdpSession(PROXY, 1),
                        OpenUdpSession(DIRECT, 2, fc.flow, OUTBOUNDS[DIRECT])]  # fmt: skip


def test_refused_flows() -> None:
    s = Assoc({A: Refused("blocked by rule"), B: Refused("dropped", drop=True), C: DIRECT})
    fa = s.send(A, b"a", 0.0)
    assert fa.refused == Refused("blocked by rule") and fa.outbound is None
    assert s.take() == [FlowEnded(fa.flow)]
    assert fa.flow.end == "blocked" and fa.flow.error == "blocked by rule"
    s.send(A, b"again", 0.5)  # the verdict is kept: not routed again, nothing asked
    assert s.take() == []
    fb = s.send(B, b"b", 0.0)
    assert fb.refused is not None and fb.refused.drop
    s.take()
    assert s.routed == [A, B]
    # Refused flows end silently (logged once already) and hold no session.
    s.core.expire(1000.0)
    s.core.end(key(A), "closed")
    assert s.take() == []


def test_session_opened_after_its_flows_ended_is_closed() -> None:
    s = Assoc(timeout=5.0)
    fa = s.send(A, b"a", 0.0)
    s.take()
    s.core.expire(6.0)
    assert s.take() == [FlowEnded(fa.flow, quiet=True), CloseUdpSession(PROXY, 1)]
    s.core.opened(PROXY, 1)
    assert s.take() == [CloseUdpSession(PROXY, 1)]
    # And a failure answer for it is ignored.
    assert s.core.open_failed(PROXY, 1, "late", 7.0) == 0
    assert s.take() == []


def test_clear_closes_each_session_once() -> None:
    s = Assoc()
    fa = s.send(A, b"a", 0.0)
    fb = s.send(B, b"b", 0.0)
    fc = s.send(C, b"c", 0.0)
    s.core.opened(PROXY, 1)
    s.take()
    s.core.clear("closed")
    out = s.take()
    assert [c for c in out if isinstance(c, FlowEnded)] == [
        FlowEnded(fa.flow, quiet=True), FlowEnded(fb.flow, quiet=True),
        FlowEnded(fc.flow, quiet=True)]  # fmt: skip
    assert [c for c in out if isinstance(c, CloseUdpSession)] == [
        CloseUdpSession(PROXY, 1), CloseUdpSession(DIRECT, 2)]  # fmt: skip
    assert len(s.core) == 0
    # The direct session was still opening: its late answer is closed.
    s.core.opened(DIRECT, 2)
    assert s.take() == [CloseUdpSession(DIRECT, 2)]


def test_tun_style_session_per_flow() -> None:
    """The TUN's use: session key = flow key, so flows never share."""
    out: list[Command] = []
    core = UdpSessions(out, timeout=60.0, max_flows=8)
    flows = []
    for port in (1, 2):
        k = (b"\x01\x02\x03\x04", port, b"\x05\x06\x07\x08", 53)
        meta = FlowMeta(network="udp", destination=ipaddress.ip_address("5.6.7.8"),
                        destination_port=53)  # fmt: skip
        uf = core.add(k, Flow(meta, Address("5.6.7.8", 53), 0.0), OUTBOUNDS[DIRECT], k, 0.0)
        core.send(uf, b"q", 0.0)
        flows.append(uf)
    assert [type(c) for c in out] == [OpenUdpSession, OpenUdpSession]
    assert [c.key for c in out if isinstance(c, OpenUdpSession)] == [f.key for f in flows]


def test_udp_table_needs_room() -> None:
    with pytest.raises(ValueError):
        UdpTable(max_sessions=0)


# -- property: no session leaks, no flow logged twice ---------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.sampled_from([A, B, C, D])),
        st.tuples(st.just("opened"), st.sampled_from([PROXY, DIRECT])),
        st.tuples(st.just("failed"), st.sampled_from([PROXY, DIRECT])),
        st.tuples(
            st.just("ended"), st.sampled_from([PROXY, DIRECT]), st.sampled_from(["idle", "reset"])
        ),
        st.tuples(st.just("end"), st.sampled_from([A, B, C, D])),
        st.tuples(st.just("tick"), st.floats(0.0, 8.0)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops, st.integers(1, 4))
def test_random_runs_leak_no_session(steps: list[tuple[object, ...]], max_flows: int) -> None:
    s = Assoc({A: PROXY, B: PROXY, C: DIRECT, D: Refused("no")}, timeout=5.0,
              max_flows=max_flows, max_pending=2, retry_delay=1.0)  # fmt: skip
    now = 0.0
    asked: dict[Hashable, int] = {}  # session key -> ident of the last open asked for
    live: dict[Hashable, int] = {}  # what a runner would hold open
    ended_flows: list[Flow] = []  # kept alive, so that identity means the same flow

    def apply(commands: list[Command]) -> None:
        for c in commands:
            if isinstance(c, OpenUdpSession):
                asked[c.key] = c.ident
            elif isinstance(c, CloseUdpSession):
                if live.get(c.key) == c.ident:
                    del live[c.key]
            elif isinstance(c, SendDatagram):
                assert c.key in live, "sent on a session that is not open"
            elif isinstance(c, FlowEnded):
                assert not any(f is c.flow for f in ended_flows), "a flow logged twice"
                ended_flows.append(c.flow)

    def answer_open(sk: Hashable) -> None:
        ident = asked.pop(sk, None)
        if ident is None:
            return
        live[sk] = ident  # the runner holds it until told to close it
        s.core.opened(sk, ident)

    for step in steps:
        op = step[0]
        if op == "send":
            dest = step[1]
            assert isinstance(dest, Address)
            s.send(dest, b"x", now)
        elif op == "opened":
            answer_open(step[1])  # type: ignore[arg-type]
        elif op == "failed":
            ident = asked.pop(step[1], None)  # type: ignore[arg-type]
            if ident is not None:
                s.core.open_failed(step[1], ident, "boom", now)  # type: ignore[arg-type]
        elif op == "ended":
            sk = step[1]
            ident = live.pop(sk, None)  # type: ignore[arg-type]
            if ident is not None:
                s.core.ended(sk, ident, str(step[2]))  # type: ignore[arg-type]
        elif op == "end":
            dest = step[1]
            assert isinstance(dest, Address)
            s.core.end(key(dest), "closed")
        else:
            now += float(step[1])  # type: ignore[arg-type]
            s.core.expire(now)
        apply(s.take())
    s.core.clear("closed")
    apply(s.take())
    # Opens still outstanding are answered late: each is closed at once.
    for sk in list(asked):
        answer_open(sk)
        apply(s.take())
    assert live == {}, "a session stayed open after every flow ended"
    assert len(s.core) == 0


def test_a_session_waits_for_its_flow_to_be_routed_by_owner() -> None:
    """A flow routed only once its owner is known (`LookupFirst`): its datagrams wait in the
    opening session; then it opens through the outbound found, or ends blocked."""
    from ztun.stack.flow import LookupFirst

    for verdict in (OUTBOUNDS[PROXY], Refused("rejected by rule 0")):
        out: list[Command] = []
        core = UdpSessions(out, timeout=60.0, max_flows=8)
        meta = FlowMeta(network="udp", destination=ipaddress.ip_address(A.host),
                        destination_port=A.port)  # fmt: skip
        flow = Flow(meta, A, 0.0)
        ask = LookupFirst(b"q1")
        uf = core.add(key(A), flow, ask, key(A), 0.0)
        core.send(uf, b"q1", 0.0)
        core.send(uf, b"q2", 0.1)
        assert out == [OpenUdpSession(key(A), 1, flow, ask)]
        out.clear()
        assert core.routed(key(A), 2, verdict) is False  # not this attempt
        if isinstance(verdict, Refused):
            assert core.routed(key(A), 1, verdict) is False
            assert out == [FlowEnded(flow)] and flow.end == "blocked"
            assert uf.refused is verdict and core.dropped == 2
            continue
        assert core.routed(key(A), 1, verdict) is True and uf.outbound is verdict
        assert core.opened(key(A), 1)
        assert out == [SendDatagram(key(A), A, b"q1"), SendDatagram(key(A), A, b"q2")]
        assert core.sent_to(key(A), A.host) or core.sent_to(key(A), "203.0.113.99")
        out.clear()
        core.end(key(A), "closed")
        assert out == [FlowEnded(flow, quiet=True), CloseUdpSession(key(A), 1)]


def test_a_network_reset_ends_every_flow_with_its_reason_and_forgets_failures() -> None:
    """What the tun inbound's reset_udp asks after a network change: every flow ends `reset`
    with the reason, every session closes, and a session that failed on the old network is
    tried again at once on the next datagram (no retry delay)."""
    a = Assoc(retry_delay=10.0)
    a.send(A, b"1", 0.0)  # proxy session: opens, then fails
    a.send(C, b"2", 0.0)  # direct session: opens
    opens = [c for c in a.take() if isinstance(c, OpenUdpSession)]
    by_key = {c.key: c.ident for c in opens}
    a.core.open_failed(PROXY, by_key[PROXY], "proxy unreachable", 0.1)
    assert a.core.opened(DIRECT, by_key[DIRECT])
    a.take()
    a.send(C, b"3", 0.2)
    a.take()
    a.core.clear("reset", "network changed")
    out = a.take()
    ended = [c for c in out if isinstance(c, FlowEnded)]
    assert [(c.flow.dest, c.flow.end, c.flow.error) for c in ended] == [
        (C, "reset", "network changed")
    ]
    assert not ended[0].quiet  # a reset is worth a line
    assert [c.key for c in out if isinstance(c, CloseUdpSession)] == [DIRECT]
    assert len(a.core) == 0
    a.send(A, b"4", 0.3)  # within the old retry delay, yet opened again
    assert [c.key for c in a.take() if isinstance(c, OpenUdpSession)] == [PROXY]
