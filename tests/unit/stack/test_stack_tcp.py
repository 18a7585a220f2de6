"""TunStack TCP playbooks: SYNs routed, forwarded to the listener or refused with a RST."""

from __future__ import annotations

import ipaddress

import pytest
from playbook import (
    DIRECT,
    FAMILIES,
    PROXY,
    TAG,
    FakeOutbound,
    P,
    check_tcp,
    feed,
    make_nat,
    make_stack,
    nat_of,
    router_of,
    take,
    tcp,
)

from ztun.address import Address
from ztun.nat.tcp import FORWARD
from ztun.packet.ip import Drop
from ztun.packet.tcp import ACK, FIN, PSH, RST, SYN
from ztun.stack.commands import FlowEnded, WritePacket
from ztun.stack.tun import HANDLED, TunStack

VERSIONS = pytest.mark.parametrize("v", [4, 6])
MULTICAST = {4: bytes([224, 0, 0, 1]), 6: ipaddress.IPv6Address("ff02::1").packed}


@VERSIONS
@pytest.mark.parametrize(("dest", "outbound"), [("ok", DIRECT), ("other", PROXY)])
def test_syn_forwarded_to_listener(v: int, dest: str, outbound: FakeOutbound) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    app, dst, local, peer = f["app"], f[dest], f["local"], f["peer"]
    r, buf = feed(stack, tcp(app, dst, 51000, 443, SYN, seq=777), now=1.0)
    assert r == FORWARD
    assert take(stack) == []
    h, sp, dp, seq, ack, flags = check_tcp(buf)
    assert (h.src, h.dst, dp, seq, flags) == (peer, local, P, 777, SYN)
    n = sp
    nat = nat_of(stack, v)
    assert nat.ports() == [n]

    got = stack.tcp_flow(nat, n)
    assert got is not None
    flow, ob = got
    assert ob is outbound
    m = flow.meta
    assert m.network == "tcp" and m.inbound == TAG
    assert m.destination == ipaddress.ip_address(dst) and m.destination_port == 443
    assert m.source == ipaddress.ip_address(app) and m.source_port == 51000
    assert flow.dest == Address(str(ipaddress.ip_address(dst)), 443)
    assert flow.outbound == outbound.tag and flow.started == 1.0
    assert stack.tcp_flow(nat, n + 1) is None

    # The listener's SYN-ACK goes back as from the original destination.
    r, back = feed(stack, tcp(local, peer, P, n, SYN | ACK, seq=5000, ack=778), now=1.1)
    assert r == FORWARD
    h, sp, dp, seq, ack, flags = check_tcp(back)
    assert (h.src, h.dst, sp, dp, seq, ack, flags) == (dst, app, 443, 51000, 5000, 778,
                                                       SYN | ACK)  # fmt: skip

    # The app's next segments and a retransmitted SYN take the same port, routed once.
    for flags_in, payload in ((ACK, b""), (ACK | PSH, b"hello"), (SYN, b"")):
        r, buf = feed(stack, tcp(app, dst, 51000, 443, flags_in, seq=778, ack=5001,
                                 payload=payload), now=1.2)  # fmt: skip
        assert r == FORWARD
        h, sp, dp, _, _, flags = check_tcp(buf)
        assert (h.src, h.dst, sp, dp, flags) == (peer, local, n, P, flags_in)
        assert bytes(buf[h.l4 + 20 :]) == payload
    assert len(router_of(stack).calls) == 1
    assert router_of(stack).calls[0][1] == "tcp"
    assert sum(stack.drops.values()) == 0
    assert stack.packets == 5


@VERSIONS
def test_two_flows_get_two_ports(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    ports = []
    for sp in (1111, 2222):
        r, buf = feed(stack, tcp(f["app"], f["ok"], sp, 80, SYN))
        assert r == FORWARD
        ports.append(check_tcp(buf)[1])
    assert len(set(ports)) == 2
    nat = nat_of(stack, v)
    flows = [stack.tcp_flow(nat, n) for n in ports]
    assert [got[0].meta.source_port for got in flows if got] == [1111, 2222]


@VERSIONS
def test_blocked_syn_gets_rst(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    app, dst = f["app"], f["block"]
    r, _ = feed(stack, tcp(app, dst, 51000, 443, SYN, seq=0xFFFFFFFF), now=2.0)
    assert r == HANDLED
    out = take(stack)
    assert [type(c) for c in out] == [FlowEnded, WritePacket]
    ended = out[0]
    assert isinstance(ended, FlowEnded) and not ended.quiet
    assert ended.flow.end == "blocked" and ended.flow.error == "blocked by rule"
    assert ended.flow.meta.destination == ipaddress.ip_address(dst)
    rst = out[1]
    assert isinstance(rst, WritePacket)
    h, sp, dp, seq, ack, flags = check_tcp(rst.packet)
    # No ACK on the SYN: the RST acknowledges it (seq + 1, wrapping) and has seq 0.
    assert (h.src, h.dst, sp, dp, seq, ack, flags) == (dst, app, 443, 51000, 0, 0, RST | ACK)
    assert stack.drops == {Drop.REJECTED: 1}
    assert len(nat_of(stack, v)) == 0

    # A SYN with data (TFO): the RST acknowledges the data as well.
    feed(stack, tcp(app, dst, 51001, 443, SYN, seq=100, payload=b"abc"))
    rst = take(stack)[1]
    assert isinstance(rst, WritePacket)
    assert check_tcp(rst.packet)[4] == 104
    assert stack.drops == {Drop.REJECTED: 2}


@VERSIONS
def test_dropped_syn_gets_nothing(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    r, _ = feed(stack, tcp(f["app"], f["drop"], 51000, 443, SYN))
    assert r == HANDLED
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], FlowEnded)
    assert out[0].flow.end == "blocked" and out[0].flow.error == "dropped by rule"
    assert stack.drops == {Drop.REJECTED: 1}
    assert len(nat_of(stack, v)) == 0


@VERSIONS
def test_segment_of_unknown_flow_gets_rst(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    app, dst = f["app"], f["ok"]
    # With ACK: the RST takes its seq from the segment's ack, and carries no ACK.
    r, _ = feed(stack, tcp(app, dst, 51000, 443, ACK | PSH, seq=10, ack=5555, payload=b"x"))
    assert r == HANDLED
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], WritePacket)
    h, sp, dp, seq, ack, flags = check_tcp(out[0].packet)
    assert (h.src, h.dst, sp, dp, seq, ack, flags) == (dst, app, 443, 51000, 5555, 0, RST)
    # Without ACK (a FIN alone): the RST acknowledges the segment, FIN counting one.
    feed(stack, tcp(app, dst, 51000, 443, FIN, seq=10, payload=b"xy"))
    out = take(stack)
    assert isinstance(out[0], WritePacket)
    _, _, _, seq, ack, flags = check_tcp(out[0].packet)
    assert (seq, ack, flags) == (0, 13, RST | ACK)
    # A RST is never answered.
    feed(stack, tcp(app, dst, 51000, 443, RST, seq=10))
    assert take(stack) == []
    # The listener's segment for a port the NAT does not know: reset towards the kernel.
    feed(stack, tcp(f["local"], f["peer"], P, 12345, ACK, seq=1, ack=99))
    out = take(stack)
    assert isinstance(out[0], WritePacket)
    h, sp, dp, seq, _, flags = check_tcp(out[0].packet)
    assert (h.src, h.dst, sp, dp, seq, flags) == (f["peer"], f["local"], 12345, P, 99, RST)
    assert stack.drops == {Drop.NO_FLOW: 4}
    assert router_of(stack).calls == []


@VERSIONS
def test_syn_to_non_unicast_gets_rst(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    r, _ = feed(stack, tcp(f["app"], MULTICAST[v], 51000, 443, SYN))
    assert r == HANDLED
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], WritePacket)
    h, sp, dp, _, _, flags = check_tcp(out[0].packet)
    assert (h.dst, sp, dp, flags) == (f["app"], 443, 51000, RST | ACK)
    assert stack.drops == {Drop.NOT_UNICAST: 1}
    assert router_of(stack).calls == []


@VERSIONS
def test_stop_refuses_new_syns_and_forgets_flows(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    r, buf = feed(stack, tcp(f["app"], f["ok"], 51000, 443, SYN))
    assert r == FORWARD
    n = check_tcp(buf)[1]
    nat = nat_of(stack, v)
    assert stack.tcp_flow(nat, n) is not None
    stack.stop()
    assert not stack.accepting
    assert stack.tcp_flow(nat, n) is None
    r, _ = feed(stack, tcp(f["app"], f["ok"], 51001, 443, SYN))
    assert r == HANDLED
    out = take(stack)
    assert len(out) == 1 and isinstance(out[0], WritePacket)
    h, sp, dp, _, _, flags = check_tcp(out[0].packet)
    assert (h.src, h.dst, sp, dp, flags) == (f["ok"], f["app"], 443, 51001, RST | ACK)
    assert stack.drops == {Drop.STOPPING: 1}
    assert len(router_of(stack).calls) == 1
    # Established flows still go through the NAT while the stack drains.
    r, _ = feed(stack, tcp(f["app"], f["ok"], 51000, 443, ACK | FIN, seq=1001, ack=1))
    assert r == FORWARD


@VERSIONS
def test_nat_full_gets_rst(v: int) -> None:
    f = FAMILIES[v]
    nat = make_nat(v, max_flows=1)
    stack = make_stack(**{f"nat{v}": nat})
    r, _ = feed(stack, tcp(f["app"], f["ok"], 1111, 80, SYN))
    assert r == FORWARD
    # accepted (so not a half-open flow that a new SYN would evict)
    assert stack.tcp_flow(nat, nat.ports()[0]) is not None
    r, _ = feed(stack, tcp(f["app"], f["ok"], 2222, 80, SYN, seq=41))
    assert r == HANDLED
    out = take(stack)
    # The routed flow gets its log line (it failed), and the app its RST.
    assert len(out) == 2 and isinstance(out[0], FlowEnded) and isinstance(out[1], WritePacket)
    assert out[0].flow.end == "failed" and "NAT table is full" in (out[0].flow.error or "")
    h, sp, dp, seq, ack, flags = check_tcp(out[1].packet)
    assert (h.src, h.dst, sp, dp, seq, ack, flags) == (f["ok"], f["app"], 80, 2222, 0, 42,
                                                       RST | ACK)  # fmt: skip
    assert stack.drops == {Drop.NAT_FULL: 1}
    assert len(nat) == 1


@VERSIONS
def test_tcp_without_a_nat_is_dropped(v: int) -> None:
    f = FAMILIES[v]
    stack = TunStack(TAG, lambda flow, network: DIRECT, nat4=None, nat6=None, udp_timeout=60.0)
    r, _ = feed(stack, tcp(f["app"], f["ok"], 1111, 80, SYN))
    assert r == HANDLED
    assert take(stack) == []
    assert stack.drops == {Drop.PROTOCOL: 1}


def test_tcp_fragment_is_dropped() -> None:
    f = FAMILIES[4]
    stack = make_stack()
    pkt = bytearray(tcp(f["app"], f["ok"], 1111, 80, SYN))
    pkt[6] |= 0x20  # MF
    r, _ = feed(stack, pkt)
    assert r == HANDLED
    assert take(stack) == []
    assert stack.drops == {Drop.FRAGMENT: 1}


@VERSIONS
def test_short_tcp_syn_is_dropped(v: int) -> None:
    """A SYN whose IP length leaves no room for a TCP header is counted, not answered."""
    f = FAMILIES[v]
    stack = make_stack()
    pkt = bytearray(tcp(f["app"], f["ok"], 1111, 80, SYN))
    if v == 4:
        pkt[2:4] = (30).to_bytes(2, "big")  # total length: 10 bytes of TCP
        pkt[10:12] = b"\0\0"
    else:
        pkt[4:6] = (10).to_bytes(2, "big")
    r, _ = feed(stack, pkt)
    assert r == HANDLED
    assert take(stack) == []
    assert stack.drops == {Drop.TRUNCATED: 1}
    assert router_of(stack).calls == []
