"""Playbook helpers for the sans-I/O TUN core: packets in, commands out.

`make_stack` builds a `TunStack` with real TCP NATs for both families (local .1, peer .2,
listener port `P`) and a fake router (`Router`) that picks an outbound (or `Refused`) per
destination. The builders make TCP, UDP, ICMP echo packets and IPv4 fragments with correct
checksums; `check_*` parse a packet the stack produced and verify every checksum in it.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Any

from ztun.nat.tcp import TcpNat
from ztun.packet.checksum import checksum, pseudo_header_sum
from ztun.packet.icmp import ECHO_REQUEST_V4, ECHO_REQUEST_V6, icmp_checksum_ok
from ztun.packet.ip import IPHeader, Proto, build_ip, ip_header_ok, parse_ip
from ztun.packet.tcp import tcp_checksum_ok
from ztun.packet.udp import build_udp, udp_checksum_ok
from ztun.stack.commands import (
    CloseUdpSession,
    Command,
    FlowEnded,
    OpenUdpSession,
    SendDatagram,
    WriteDatagram,
    WritePacket,
)
from ztun.stack.flow import Flow, Refused
from ztun.stack.tun import TunStack

TAG = "tun-in"
P = 40000

# The TUN addresses (A: local, the listener's; B: the NAT's fake peer).
A4, B4 = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
A6 = ipaddress.IPv6Address("fdfe:dcba:9876::1").packed
B6 = ipaddress.IPv6Address("fdfe:dcba:9876::2").packed

# The applications' side: packets leave the host from the TUN address.
APP4, APP6 = A4, A6


def ip4(text: str) -> bytes:
    return ipaddress.IPv4Address(text).packed


def ip6(text: str) -> bytes:
    return ipaddress.IPv6Address(text).packed


# Destinations, routed by the fake router.
OK4, OK6 = ip4("203.0.113.5"), ip6("2001:db8::5")  # -> "direct"
OTHER4, OTHER6 = ip4("203.0.113.6"), ip6("2001:db8::6")  # -> "proxy"
BLOCK4, BLOCK6 = ip4("203.0.113.66"), ip6("2001:db8::66")  # -> Refused("blocked by rule")
DROP4, DROP6 = ip4("203.0.113.99"), ip6("2001:db8::99")  # -> Refused(drop=True)

FAMILIES = {
    4: {"app": APP4, "ok": OK4, "other": OTHER4, "block": BLOCK4, "drop": DROP4,
        "local": A4, "peer": B4},
    6: {"app": APP6, "ok": OK6, "other": OTHER6, "block": BLOCK6, "drop": DROP6,
        "local": A6, "peer": B6},
}  # fmt: skip

KNOWN_COMMANDS = (WritePacket, WriteDatagram, OpenUdpSession, SendDatagram, CloseUdpSession,
                  FlowEnded)  # fmt: skip


@dataclass(frozen=True)
class FakeOutbound:
    """What the router hands back: opaque to the core, recognised by identity in the tests."""

    tag: str


DIRECT = FakeOutbound("direct")
PROXY = FakeOutbound("proxy")


@dataclass
class Router:
    """A fake `Decide`: an outbound or `Refused` per destination address (packed bytes);
    anything else goes DIRECT. Records every call as (flow, network)."""

    table: dict[bytes, Any] = field(default_factory=dict)
    calls: list[tuple[Flow, str]] = field(default_factory=list)

    def __call__(self, flow: Flow, network: str) -> Any:
        self.calls.append((flow, network))
        dst = flow.meta.destination
        assert dst is not None
        verdict = self.table.get(dst.packed, DIRECT)
        if not isinstance(verdict, Refused):
            flow.outbound = verdict.tag
        return verdict


def default_router() -> Router:
    refused = Refused("blocked by rule")
    dropped = Refused("dropped by rule", drop=True)
    return Router({OK4: DIRECT, OK6: DIRECT, OTHER4: PROXY, OTHER6: PROXY,
                   BLOCK4: refused, BLOCK6: refused, DROP4: dropped, DROP6: dropped})  # fmt: skip


#: the TUN inbound's default UDP idle timeout
UDP_TIMEOUT = 60.0


def make_nat(version: int, **kw: Any) -> TcpNat:
    f = FAMILIES[version]
    return TcpNat(f["local"], f["peer"], P, **kw)


def make_stack(
    router: Router | None = None,
    *,
    nat4: TcpNat | None = None,
    nat6: TcpNat | None = None,
    **kw: Any,
) -> TunStack:
    return TunStack(
        TAG,
        router if router is not None else default_router(),
        nat4=nat4 if nat4 is not None else make_nat(4),
        nat6=nat6 if nat6 is not None else make_nat(6),
        **{"udp_timeout": UDP_TIMEOUT, **kw},
    )


def router_of(stack: TunStack) -> Router:
    assert isinstance(stack.decide, Router)
    return stack.decide


def nat_of(stack: TunStack, version: int) -> TcpNat:
    nat = stack.nat4 if version == 4 else stack.nat6
    assert nat is not None
    return nat


def take(stack: TunStack) -> list[Command]:
    """The commands the stack queued since the last call (and empties its queue)."""
    got = list(stack.out)
    stack.out.clear()
    return got


def feed(stack: TunStack, pkt: bytes | bytearray, now: float = 0.0) -> tuple[int, bytearray]:
    """`receive` one packet in a read buffer with room after it (as the I/O layer reads)."""
    buf = bytearray(pkt) + bytearray(64)
    r = stack.receive(buf, len(pkt), now)
    return r, buf[: len(pkt)]


# -- builders -------------------------------------------------------------------------------


def tcp(src: bytes, dst: bytes, sp: int, dp: int, flags: int, *, seq: int = 1000,
        ack: int = 0, payload: bytes = b"") -> bytes:  # fmt: skip
    seg = bytearray(struct.pack("!HHIIBBHHH", sp, dp, seq, ack, 5 << 4, flags, 65535, 0, 0))
    seg += payload
    c = checksum(seg, pseudo_header_sum(src, dst, Proto.TCP, len(seg)))
    seg[16:18] = c.to_bytes(2, "big")
    return bytes(build_ip(src, dst, Proto.TCP, len(seg))) + bytes(seg)


def udp(src: bytes, sp: int, dst: bytes, dp: int, payload: bytes) -> bytes:
    pkt = build_udp(src, sp, dst, dp, payload)
    assert isinstance(pkt, bytes)
    return pkt


def echo_request(src: bytes, dst: bytes, ident: int = 7, seq: int = 1,
                 payload: bytes = b"ping") -> bytes:  # fmt: skip
    v4 = len(src) == 4
    msg = bytearray(struct.pack("!BBHHH", ECHO_REQUEST_V4 if v4 else ECHO_REQUEST_V6, 0, 0,
                                ident, seq)) + payload  # fmt: skip
    proto = Proto.ICMP if v4 else Proto.ICMPV6
    initial = 0 if v4 else pseudo_header_sum(src, dst, Proto.ICMPV6, len(msg))
    c = checksum(msg, initial)
    msg[2:4] = c.to_bytes(2, "big")
    return bytes(build_ip(src, dst, proto, len(msg))) + bytes(msg)


def fragments_v4(pkt: bytes, size: int, ident: int = 0x1234) -> list[bytes]:
    """Cut the IPv4 packet `pkt` into fragments of `size` payload bytes (a multiple of 8)."""
    assert size % 8 == 0
    hl = (pkt[0] & 0x0F) * 4
    body = pkt[hl:]
    out = []
    for off in range(0, len(body), size):
        part = body[off : off + size]
        more = off + size < len(body)
        h = bytearray(pkt[:hl])
        total = hl + len(part)
        h[2:4] = total.to_bytes(2, "big")
        h[4:6] = ident.to_bytes(2, "big")
        h[6:8] = ((0x2000 if more else 0) | (off // 8)).to_bytes(2, "big")
        h[10:12] = b"\0\0"
        h[10:12] = checksum(h).to_bytes(2, "big")
        out.append(bytes(h) + part)
    return out


# -- checks ---------------------------------------------------------------------------------


def header(pkt: bytes | bytearray) -> IPHeader:
    h = parse_ip(bytes(pkt))
    assert isinstance(h, IPHeader), h
    if h.version == 4:
        assert ip_header_ok(bytes(pkt)), "bad IPv4 header checksum"
    return h


def check_tcp(pkt: bytes | bytearray) -> tuple[IPHeader, int, int, int, int, int]:
    """Header, ports, seq, ack and flags of a TCP packet whose checksums all verify."""
    h = header(pkt)
    assert h.proto == Proto.TCP
    assert tcp_checksum_ok(bytes(pkt), h), "bad TCP checksum"
    sp, dp, seq, ack, _off, flags = struct.unpack("!HHIIBB", bytes(pkt[h.l4 : h.l4 + 14]))
    return h, sp, dp, seq, ack, flags


def check_udp(pkt: bytes | bytearray) -> tuple[IPHeader, int, int, bytes]:
    """Header, ports and payload of a UDP packet whose checksums all verify."""
    h = header(pkt)
    assert h.proto == Proto.UDP
    assert udp_checksum_ok(bytes(pkt), h), "bad UDP checksum"
    sp, dp, length = struct.unpack("!HHH", bytes(pkt[h.l4 : h.l4 + 6]))
    return h, sp, dp, bytes(pkt[h.l4 + 8 : h.l4 + length])


def check_icmp(pkt: bytes | bytearray) -> tuple[IPHeader, int, int, bytes]:
    """Header, type, code and body (after the 8-byte ICMP header) of a verified ICMP packet."""
    h = header(pkt)
    assert h.proto in (Proto.ICMP, Proto.ICMPV6)
    assert icmp_checksum_ok(bytes(pkt), h), "bad ICMP checksum"
    return h, pkt[h.l4], pkt[h.l4 + 1], bytes(pkt[h.l4 + 8 : h.end])
