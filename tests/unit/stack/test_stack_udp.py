"""TunStack UDP playbooks: one outbound session per flow, opened on the first datagram."""

from __future__ import annotations

import ipaddress

import pytest
from playbook import (
    DIRECT,
    FAMILIES,
    PROXY,
    TAG,
    check_icmp,
    check_udp,
    feed,
    fragments_v4,
    make_stack,
    router_of,
    take,
    udp,
)

from ztun.address import Address
from ztun.nat.udp import MAX_PENDING as MAX_UDP_PENDING
from ztun.nat.udp import RETRY_DELAY as UDP_RETRY_DELAY
from ztun.packet.icmp import (
    PORT_UNREACHABLE_V4,
    PORT_UNREACHABLE_V6,
    UNREACHABLE_V4,
    UNREACHABLE_V6,
)
from ztun.packet.ip import Drop, Proto, build_ip
from ztun.packet.virtio import GSO_UDP_L4, PLAIN, VnetHeader, parse_header
from ztun.stack.commands import (
    CloseUdpSession,
    FlowEnded,
    OpenUdpSession,
    SendDatagram,
    WriteDatagram,
    WritePacket,
)
from ztun.stack.tun import HANDLED, TunStack

VERSIONS = pytest.mark.parametrize("v", [4, 6])
SPORT, DPORT = 5353, 53


def dest_of(addr: bytes, port: int = DPORT) -> Address:
    return Address(str(ipaddress.ip_address(addr)), port)


UdpKey = tuple[bytes, int, bytes, int]


def open_flow(
    stack: TunStack, v: int, dest: str = "ok", now: float = 0.0, sport: int = SPORT
) -> tuple[UdpKey, OpenUdpSession]:
    """Send the first datagram of a flow; its key and the OpenUdpSession it asked for."""
    f = FAMILIES[v]
    r, _ = feed(stack, udp(f["app"], sport, f[dest], DPORT, b"first"), now)
    assert r == HANDLED
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], OpenUdpSession), out
    return (f["app"], sport, f[dest], DPORT), out[0]


@VERSIONS
def test_session_opens_queues_and_sends(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    key, op = open_flow(stack, v, now=1.0)
    assert op.key == key and op.outbound is DIRECT
    flow = op.flow
    m = flow.meta
    assert m.network == "udp" and m.inbound == TAG
    assert m.destination == ipaddress.ip_address(f["ok"]) and m.destination_port == DPORT
    assert m.source == ipaddress.ip_address(f["app"]) and m.source_port == SPORT
    assert flow.dest == dest_of(f["ok"]) and flow.outbound == "direct"
    assert router_of(stack).calls == [(flow, "udp")]

    # While the session opens, datagrams wait (up to MAX_UDP_PENDING with the first).
    extra = MAX_UDP_PENDING + 5
    for i in range(extra):
        r, _ = feed(stack, udp(f["app"], SPORT, f["ok"], DPORT, b"q%d" % i), now=1.1)
        assert r == HANDLED
    assert take(stack) == []
    assert stack.udp.dropped == extra - (MAX_UDP_PENDING - 1)
    assert len(router_of(stack).calls) == 1

    stack.udp.opened(key, op.ident)
    out = take(stack)
    want = [b"first"] + [b"q%d" % i for i in range(MAX_UDP_PENDING - 1)]
    assert out == [SendDatagram(key, dest_of(f["ok"]), p) for p in want]

    # Once open, each datagram is sent at once.
    feed(stack, udp(f["app"], SPORT, f["ok"], DPORT, b"later"), now=2.0)
    assert take(stack) == [SendDatagram(key, dest_of(f["ok"]), b"later")]

    # A reply is written back as from the original destination.
    stack.udp_reply(key, dest_of(f["ok"]), b"answer", 2.5)
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], WritePacket)
    h, sp, dp, payload = check_udp(out[0].packet)
    assert (h.src, h.dst, sp, dp, payload) == (f["ok"], f["app"], DPORT, SPORT, b"answer")
    assert flow.down == len(b"answer")
    assert flow.up >= len(b"first") + len(b"later")
    assert sum(stack.drops.values()) == 0

    # A reply for a flow that ended meanwhile (a DNS answer that outlived the idle timeout)
    # still goes back: only ztun's own sessions call udp_reply, with their own flow's key.
    stack.udp_reply((f["app"], 1, f["ok"], 2), dest_of(f["ok"], 2), b"late", 3.0)
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], WritePacket) and out[0].packet.endswith(b"late")
    assert stack.late_replies == 1


@VERSIONS
def test_each_flow_gets_its_own_session(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    k1, op1 = open_flow(stack, v, "ok")
    k2, op2 = open_flow(stack, v, "other")
    k3, op3 = open_flow(stack, v, "ok", sport=SPORT + 1)
    assert len({k1, k2, k3}) == 3 and len({op1.ident, op2.ident, op3.ident}) == 3
    assert (op1.outbound, op2.outbound, op3.outbound) == (DIRECT, PROXY, DIRECT)
    stack.udp.opened(k2, op2.ident)
    assert take(stack) == [SendDatagram(k2, dest_of(f["other"]), b"first")]


@VERSIONS
def test_open_failed_then_retry(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    key, op = open_flow(stack, v, now=10.0)
    feed(stack, udp(f["app"], SPORT, f["ok"], DPORT, b"waiting"), now=10.1)
    assert stack.udp.open_failed(key, op.ident, "connection refused", 10.2) == 2
    out = take(stack)
    assert out == [FlowEnded(op.flow)]
    assert op.flow.end == "failed" and op.flow.error == "connection refused"
    assert len(stack.udp) == 0
    dropped = stack.udp.dropped

    # Inside the retry delay: datagrams are dropped, no session is asked for.
    t = 10.2 + UDP_RETRY_DELAY / 2
    for _ in range(3):
        feed(stack, udp(f["app"], SPORT, f["ok"], DPORT, b"too soon"), now=t)
    assert take(stack) == []
    assert stack.udp.dropped == dropped + 3

    # After it: a new session, with a new ident.
    feed(stack, udp(f["app"], SPORT, f["ok"], DPORT, b"again"), now=10.2 + UDP_RETRY_DELAY)
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], OpenUdpSession)
    assert out[0].key == key and out[0].ident != op.ident

    # The failed attempt answering late is closed; so is a failure report for it ignored.
    stack.udp.opened(key, op.ident)
    assert take(stack) == [CloseUdpSession(key, op.ident)]
    assert stack.udp.open_failed(key, op.ident, "late", 12.0) == 0
    assert take(stack) == []
    stack.udp.opened(key, out[0].ident)
    assert take(stack) == [SendDatagram(key, dest_of(f["ok"]), b"again")]


@VERSIONS
def test_session_ended_resets_flow(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    key, op = open_flow(stack, v)
    stack.udp.opened(key, op.ident)
    take(stack)
    stack.udp.ended(key, op.ident + 100, "stale")  # another attempt's end: ignored
    assert take(stack) == []
    stack.udp.ended(key, op.ident, "connection reset by peer")
    assert take(stack) == [FlowEnded(op.flow)]
    assert op.flow.end == "reset" and op.flow.error == "connection reset by peer"
    assert len(stack.udp) == 0
    # The next datagram is a new flow, with a new session.
    feed(stack, udp(f["app"], SPORT, f["ok"], DPORT, b"next"), now=1.0)
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], OpenUdpSession)
    assert out[0].flow is not op.flow and out[0].ident != op.ident


@VERSIONS
def test_session_ended_idle_is_quiet(v: int) -> None:
    stack = make_stack()
    key, op = open_flow(stack, v)
    stack.udp.opened(key, op.ident)
    take(stack)
    stack.udp.ended(key, op.ident, "idle")
    assert take(stack) == [FlowEnded(op.flow, quiet=True)]
    assert op.flow.end == "idle" and op.flow.error is None


@VERSIONS
def test_flow_ended_while_opening_closes_late_session(v: int) -> None:
    stack = make_stack(udp_timeout=5.0)
    key, op = open_flow(stack, v, now=0.0)
    stack.expire(6.0)
    assert take(stack) == [FlowEnded(op.flow, quiet=True), CloseUdpSession(key, op.ident)]
    stack.udp.opened(key, op.ident)
    assert take(stack) == [CloseUdpSession(key, op.ident)]


@VERSIONS
def test_idle_expiry(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack(udp_timeout=30.0)
    key, op = open_flow(stack, v, now=0.0)
    stack.udp.opened(key, op.ident)
    take(stack)
    feed(stack, udp(f["app"], SPORT, f["ok"], DPORT, b"x"), now=20.0)
    take(stack)
    stack.expire(45.0)  # used at 20: not idle yet
    assert take(stack) == []
    stack.udp_reply(key, dest_of(f["ok"]), b"y", 40.0)  # a reply keeps it alive too
    take(stack)
    stack.expire(69.0)
    assert take(stack) == []
    stack.expire(70.5)
    assert take(stack) == [FlowEnded(op.flow, quiet=True), CloseUdpSession(key, op.ident)]
    assert op.flow.end == "idle"
    assert len(stack.udp) == 0


@VERSIONS
def test_eviction_when_full(v: int) -> None:
    stack = make_stack(max_udp_sessions=2)
    k1, op1 = open_flow(stack, v, "ok", sport=1001, now=0.0)
    k2, op2 = open_flow(stack, v, "ok", sport=1002, now=1.0)
    for k, op in ((k1, op1), (k2, op2)):
        stack.udp.opened(k, op.ident)
    take(stack)
    f = FAMILIES[v]
    feed(stack, udp(f["app"], 1003, f["ok"], DPORT, b"third"), now=2.0)
    out = take(stack)
    assert out[:2] == [FlowEnded(op1.flow), CloseUdpSession(k1, op1.ident)]
    assert not out[0].quiet  # type: ignore[union-attr]
    assert op1.flow.end == "evicted"
    assert len(out) == 3 and isinstance(out[2], OpenUdpSession)
    assert stack.udp.flows.evicted == 1
    assert len(stack.udp) == 2


@VERSIONS
def test_stop_ends_every_flow(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    k1, op1 = open_flow(stack, v, "ok")
    stack.udp.opened(k1, op1.ident)
    take(stack)
    k2, op2 = open_flow(stack, v, "other")
    stack.stop()
    out = take(stack)
    assert out == [FlowEnded(op1.flow, quiet=True), CloseUdpSession(k1, op1.ident),
                   FlowEnded(op2.flow, quiet=True), CloseUdpSession(k2, op2.ident)]  # fmt: skip
    assert op1.flow.end == op2.flow.end == "closed"
    r, _ = feed(stack, udp(f["app"], SPORT, f["ok"], DPORT, b"after"), now=1.0)
    assert r == HANDLED
    assert take(stack) == []
    assert stack.drops == {Drop.STOPPING: 1}


@VERSIONS
def test_blocked_udp_gets_port_unreachable(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    sent = []
    for i in range(3):
        pkt = udp(f["app"], SPORT, f["block"], DPORT, b"query %d" % i)
        sent.append(pkt)
        r, _ = feed(stack, pkt, now=float(i))
        assert r == HANDLED
        out = take(stack)
        if i == 0:
            assert isinstance(out[0], FlowEnded)
            assert out[0].flow.end == "blocked" and out[0].flow.error == "blocked by rule"
            out = out[1:]
        assert len(out) == 1 and isinstance(out[0], WritePacket)
        h, typ, code, quote = check_icmp(out[0].packet)
        assert (h.src, h.dst) == (f["block"], f["app"])
        if v == 4:
            want = (UNREACHABLE_V4, PORT_UNREACHABLE_V4)
        else:
            want = (UNREACHABLE_V6, PORT_UNREACHABLE_V6)
        assert (typ, code) == want
        assert quote == pkt  # the whole offending packet is quoted
    assert len(router_of(stack).calls) == 1  # routed once; the verdict is kept
    assert stack.drops == {Drop.REJECTED: 3}


@VERSIONS
def test_dropped_udp_gets_nothing(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    feed(stack, udp(f["app"], SPORT, f["drop"], DPORT, b"a"))
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], FlowEnded) and out[0].flow.end == "blocked"
    feed(stack, udp(f["app"], SPORT, f["drop"], DPORT, b"b"))
    assert take(stack) == []
    assert stack.drops == {Drop.REJECTED: 2}
    # The refused flow expires quietly: no second log line, no session to close.
    stack.expire(1000.0)
    assert take(stack) == []
    assert len(stack.udp) == 0


@VERSIONS
def test_udp_to_non_unicast_is_dropped(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    group = bytes([239, 255, 255, 250]) if v == 4 else ipaddress.IPv6Address("ff02::fb").packed
    r, _ = feed(stack, udp(f["app"], 5353, group, 5353, b"mdns"))
    assert r == HANDLED
    assert take(stack) == []
    assert stack.drops == {Drop.NOT_UNICAST: 1}
    assert router_of(stack).calls == []


@VERSIONS
def test_bad_udp_length_is_dropped(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    pkt = bytearray(udp(f["app"], SPORT, f["ok"], DPORT, b"payload"))
    l4 = 20 if v == 4 else 40
    pkt[l4 + 4 : l4 + 6] = (200).to_bytes(2, "big")  # longer than the packet
    feed(stack, pkt)
    short = bytes(build_ip(f["app"], f["ok"], Proto.UDP, 4)) + b"\0\1\0\2"
    feed(stack, short)
    assert take(stack) == []
    assert stack.drops == {Drop.BAD_LENGTH: 1, Drop.TRUNCATED: 1}


def test_fragments_reassembled_into_one_flow() -> None:
    f = FAMILIES[4]
    stack = make_stack()
    payload = bytes(range(256)) * 3
    pkt = udp(f["app"], SPORT, f["ok"], DPORT, payload)
    frags = fragments_v4(pkt, 128)
    assert len(frags) > 3
    # Out of order: the last one first, the first one last.
    order = [frags[-1], *frags[1:-1], frags[0]]
    for frag in order[:-1]:
        r, _ = feed(stack, frag, now=1.0)
        assert r == HANDLED
    assert take(stack) == []
    feed(stack, order[-1], now=1.5)
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], OpenUdpSession)
    op = out[0]
    assert op.key == (f["app"], SPORT, f["ok"], DPORT)
    assert op.flow.up == len(payload)
    stack.udp.opened(op.key, op.ident)
    assert take(stack) == [SendDatagram(op.key, dest_of(f["ok"]), payload)]
    assert len(stack.frags) == 0
    assert sum(stack.drops.values()) == 0


def test_incomplete_fragments_expire() -> None:
    f = FAMILIES[4]
    stack = make_stack()
    frags = fragments_v4(udp(f["app"], SPORT, f["ok"], DPORT, bytes(300)), 64)
    for frag in frags[:-1]:
        feed(stack, frag, now=0.0)
    other = fragments_v4(udp(f["app"], SPORT + 1, f["ok"], DPORT, bytes(300)), 64, ident=99)
    feed(stack, other[0], now=5.0)
    assert take(stack) == [] and len(stack.frags) == 2
    stack.expire(9.0)
    assert stack.drops == {}
    stack.expire(10.5)  # the first datagram is older than the reassembly timeout
    assert stack.drops == {Drop.FRAGMENT_TIMEOUT: 1} and len(stack.frags) == 1
    # Its last fragment, arriving now, starts a new datagram that never completes.
    feed(stack, frags[-1], now=10.6)
    assert take(stack) == []
    stack.expire(30.0)
    assert stack.drops == {Drop.FRAGMENT_TIMEOUT: 3}
    assert router_of(stack).calls == []


def test_overlapping_fragments_dropped() -> None:
    f = FAMILIES[4]
    stack = make_stack()
    frags = fragments_v4(udp(f["app"], SPORT, f["ok"], DPORT, bytes(100)), 64)
    feed(stack, frags[0])
    feed(stack, frags[0])  # the same offset twice
    assert take(stack) == []
    assert stack.drops == {Drop.FRAGMENT: 1}
    assert len(stack.frags) == 0


@VERSIONS
def test_replies_as_udp_super_packets(v: int) -> None:
    """Issue 13: on a TUN with USO a reply is a `WriteDatagram`, and a flow's replies of one
    batch become as few writes as the kernel takes: equal-sized ones one super-packet (the
    kernel cuts it: tests/unit/packet/test_gso.py), others plain packets, each write saying
    how many replies are done after it (for the fallback to plain packets)."""
    f = FAMILIES[v]
    stack = make_stack()
    stack.uso = True
    key, op = open_flow(stack, v)
    stack.udp.opened(key, op.ident)
    take(stack)
    stack.udp_reply(key, dest_of(f["ok"]), b"answer", 1.0)
    assert take(stack) == [WriteDatagram(key, b"answer")]
    assert op.flow.down == len(b"answer")
    replies = [b"a" * 1400] * 5 + [b"short", b"b" * 70000, b"c" * 10]
    writes = stack.reply_packets(key, replies)
    assert [(hdr == PLAIN, end) for hdr, _, end in writes] == [(False, 6), (True, 8)]
    super_hdr = parse_header(writes[0][0])
    assert isinstance(super_hdr, VnetHeader)
    assert (super_hdr.gso_type, super_hdr.gso_size) == (GSO_UDP_L4, 1400)
    h, sp, dp, payload = check_udp(writes[1][1])
    assert (h.src, h.dst, sp, dp, payload) == (f["ok"], f["app"], DPORT, SPORT, b"c" * 10)
    assert stack.drops == {Drop.BAD_LENGTH: 1}  # 70000 bytes: no packet carries that
    # Without USO (a kernel that refused one): each reply its own plain packet.
    stack.uso = False
    plain = stack.reply_packets(key, [b"a" * 1400] * 3)
    assert [(hdr == PLAIN, end) for hdr, _, end in plain] == [(True, 1), (True, 2), (True, 3)]
