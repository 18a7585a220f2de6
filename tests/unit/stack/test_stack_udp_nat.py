"""TunStack UDP mapping and filtering (RFC 4787, sing-box's `udp_mapping` / `udp_filtering`):
which flows of one client port share an outbound session, and which datagrams arriving on a
session reach the client. Every combination, both families."""

from __future__ import annotations

import ipaddress
import itertools

import pytest
from playbook import DIRECT, FAMILIES, Router, check_udp, feed, make_stack, take, udp

from ztun.address import Address
from ztun.nat.udp import BEHAVIOURS
from ztun.stack.commands import OpenUdpSession, SendDatagram, WritePacket
from ztun.stack.flow import Flow
from ztun.stack.tun import TunStack

SPORT = 40000
#: a second destination routed `direct`, and a third host the client never sent to
SECOND = {4: "203.0.113.7", 6: "2001:db8::7"}
THIRD = {4: "198.51.100.9", 6: "2001:db8:1::9"}
COMBOS = pytest.mark.parametrize(
    ("v", "mapping", "filtering"), list(itertools.product((4, 6), BEHAVIOURS, BEHAVIOURS))
)


def packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def text(b: bytes) -> str:
    return str(ipaddress.ip_address(b))


def send(stack: TunStack, v: int, dst: bytes, dport: int, now: float = 0.0) -> list[object]:
    f = FAMILIES[v]
    feed(stack, udp(f["app"], SPORT, dst, dport, b"q"), now)
    out = take(stack)
    for c in out:
        if isinstance(c, OpenUdpSession):
            stack.udp.opened(c.key, c.ident)
            out += take(stack)
    return out


def session_of(stack: TunStack, v: int, dst: bytes, dport: int) -> object:
    uf = stack.udp.flow_of((FAMILIES[v]["app"], SPORT, dst, dport))
    assert uf is not None
    return uf.session_key


@COMBOS
def test_mapping_decides_which_flows_share_a_session(v: int, mapping: str, filtering: str) -> None:
    f = FAMILIES[v]
    stack = make_stack(udp_mapping=mapping, udp_filtering=filtering)
    second = packed(SECOND[v])
    opens = 0
    for dst, dport in ((f["ok"], 53), (f["ok"], 54), (second, 53), (f["other"], 53)):
        out = send(stack, v, dst, dport)
        opens += sum(isinstance(c, OpenUdpSession) for c in out)
        sent = [c for c in out if isinstance(c, SendDatagram)]
        assert sent and sent[-1].dest == Address(text(dst), dport)
    a = session_of(stack, v, f["ok"], 53)
    b = session_of(stack, v, f["ok"], 54)
    c = session_of(stack, v, second, 53)
    d = session_of(stack, v, f["other"], 53)  # routed to another outbound: never shared
    expected = {"endpoint_independent": 2, "address_dependent": 3,
                "address_and_port_dependent": 4}[mapping]  # fmt: skip
    assert opens == len({a, b, c, d}) == expected
    assert (a == b) == (mapping != "address_and_port_dependent")
    assert (a == c) == (mapping == "endpoint_independent")
    assert d not in (a, b, c)


def delivered(stack: TunStack) -> list[tuple[str, int, str, int, bytes]]:
    got = []
    for c in take(stack):
        assert isinstance(c, WritePacket)
        h, sp, dp, payload = check_udp(c.packet)
        got.append((text(h.src), sp, text(h.dst), dp, payload))
    return got


@COMBOS
def test_filtering_decides_which_datagrams_reach_the_client(
    v: int, mapping: str, filtering: str
) -> None:
    f = FAMILIES[v]
    app, ok = text(f["app"]), text(f["ok"])
    stack = make_stack(udp_mapping=mapping, udp_filtering=filtering)
    send(stack, v, f["ok"], 53)
    sk = session_of(stack, v, f["ok"], 53)

    # From the destination itself: always delivered, as from it.
    stack.udp_reply(sk, Address(ok, 53), b"answer", 1.0)
    assert delivered(stack) == [(ok, 53, app, SPORT, b"answer")]

    # From the destination's address, another port.
    stack.udp_reply(sk, Address(ok, 5353), b"other port", 1.0)
    got = delivered(stack)
    if filtering in ("endpoint_independent", "address_dependent"):
        assert got == [(ok, 5353, app, SPORT, b"other port")]
    else:
        assert got == []

    # From a third host the client never sent to (a forged DNS answer, say).
    third = THIRD[v]
    for _ in range(100):
        stack.udp_reply(sk, Address(third, 53), b"forged", 1.0)
    got = delivered(stack)
    if filtering == "endpoint_independent":
        assert got == [(third, 53, app, SPORT, b"forged")] * 100
        assert stack.udp_unsolicited == 100 + 1  # with the other port's
    else:
        assert got == []
    filtered = {"endpoint_independent": 0, "address_dependent": 100,
                "address_and_port_dependent": 101}[filtering]  # fmt: skip
    assert stack.udp_filtered == filtered
    # the flow's own counters saw only what came from its destination
    uf = stack.udp.flow_of((f["app"], SPORT, f["ok"], 53))
    assert uf is not None and uf.flow.down == len(b"answer")


@pytest.mark.parametrize("v", [4, 6])
def test_default_is_address_dependent_filtering(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack()
    assert (stack.udp_mapping, stack.udp_filtering) == (
        "address_and_port_dependent",
        "address_dependent",
    )
    send(stack, v, f["ok"], 53)
    stack.udp_reply(session_of(stack, v, f["ok"], 53), Address(THIRD[v], 53), b"x", 1.0)
    assert take(stack) == [] and stack.udp_filtered == 1


@pytest.mark.parametrize("v", [4, 6])
def test_other_family_or_a_name_is_never_written(v: int) -> None:
    f = FAMILIES[v]
    stack = make_stack(udp_mapping="endpoint_independent", udp_filtering="endpoint_independent")
    send(stack, v, f["ok"], 53)
    sk = session_of(stack, v, f["ok"], 53)
    stack.udp_reply(sk, Address(THIRD[10 - v], 53), b"x", 1.0)
    stack.udp_reply(sk, Address("example.com", 53), b"x", 1.0)
    assert take(stack) == [] and stack.udp_filtered == 2


@pytest.mark.parametrize("filtering", BEHAVIOURS)
@pytest.mark.parametrize("mapping", BEHAVIOURS)
def test_flow_to_a_name_is_matched_by_port(mapping: str, filtering: str) -> None:
    """FakeIP or a sniffed name: the outbound gets a name, and a proxy reports the resolved
    address. The reply goes back as from the address the client sent to."""
    f = FAMILIES[4]

    class Named(Router):
        def __call__(self, flow: Flow, network: str) -> object:
            flow.dest = Address("example.com", flow.dest.port)
            flow.outbound = "direct"
            return DIRECT

    stack = make_stack(Named(), udp_mapping=mapping, udp_filtering=filtering)
    out = send(stack, 4, f["ok"], 53)
    assert [c.dest for c in out if isinstance(c, SendDatagram)] == [Address("example.com", 53)]
    sk = session_of(stack, 4, f["ok"], 53)
    stack.udp_reply(sk, Address("198.51.100.20", 53), b"via proxy", 1.0)
    assert delivered(stack) == [(text(f["ok"]), 53, text(f["app"]), SPORT, b"via proxy")]
    stack.udp_reply(sk, Address("example.com", 53), b"via direct", 1.0)
    assert delivered(stack) == [(text(f["ok"]), 53, text(f["app"]), SPORT, b"via direct")]


def test_flow_to_a_name_through_a_local_resolver_checks_the_address() -> None:
    """The direct outbound resolves names itself and reports replies from the resolved address
    as from the name: so an address reply to a name flow comes from someone else."""
    f = FAMILIES[4]

    class LocalResolving:
        tag = "direct"
        resolves_remotely = False

    local = LocalResolving()

    class Named(Router):
        def __call__(self, flow: Flow, network: str) -> object:
            flow.dest = Address("example.com", flow.dest.port)
            flow.outbound = "direct"
            return local

    stack = make_stack(Named())
    send(stack, 4, f["ok"], 53)
    sk = session_of(stack, 4, f["ok"], 53)
    stack.udp_reply(sk, Address("198.51.100.20", 53), b"forged", 1.0)
    assert take(stack) == [] and stack.udp_filtered == 1
    stack.udp_reply(sk, Address("example.com", 53), b"answer", 1.0)
    assert delivered(stack) == [(text(f["ok"]), 53, text(f["app"]), SPORT, b"answer")]
