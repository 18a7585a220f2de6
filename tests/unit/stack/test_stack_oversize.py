"""Issue 12, packets: a fragment set that would reassemble past 65535 bytes is a counted drop
that keeps no memory, and `TunStack` survives arbitrary bytes of any length."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from playbook import FAMILIES, feed, make_stack, take

from ztun.nat.tcp import FORWARD
from ztun.packet.checksum import checksum
from ztun.packet.fragment import Reassembler
from ztun.packet.ip import Drop, IPHeader, Proto, parse_ip
from ztun.stack.tun import HANDLED

APP, OK = FAMILIES[4]["app"], FAMILIES[4]["ok"]


def frag(offset: int, data: bytes, more: bool, ihl: int = 20, ident: int = 0x4242) -> bytes:
    """One IPv4 UDP fragment at `offset` (bytes, a multiple of 8) carrying `data`."""
    h = bytearray(ihl)
    h[0] = 0x40 | (ihl // 4)
    h[2:4] = (ihl + len(data)).to_bytes(2, "big")
    h[4:6] = ident.to_bytes(2, "big")
    h[6:8] = ((0x2000 if more else 0) | offset // 8).to_bytes(2, "big")
    h[8], h[9] = 64, Proto.UDP
    h[12:16], h[16:20] = APP, OK
    h[20:] = b"\x01" * (ihl - 20)  # NOP options
    h[10:12] = checksum(h).to_bytes(2, "big")
    return bytes(h) + data


def push(r: Reassembler, pkt: bytes, now: float = 0.0) -> bytes | Drop | None:
    h = parse_ip(pkt)
    assert isinstance(h, IPHeader) and h.frag
    return r.push(pkt, h, now)


# The largest offset a fragment can have is 8191 * 8 = 65528.
CASES = {
    # 20-byte headers throughout; the last fragment ends 1 byte past 65515 (65535 - 20).
    "last fragment one byte too far": [frag(0, bytes(1480), True), frag(65512, bytes(4), False)],
    # At the largest offset there is: no header fits in front of it.
    "fragment at offset 65528": [frag(65528, bytes(8), True)],
    # Fits a 20-byte header (ends at 65512), not the first fragment's 60-byte one; the gap
    # between them stays open, so without an early check the set would wait for its timeout.
    "first header longer, gap": [frag(65504, bytes(8), False), frag(0, bytes(8), True, ihl=60)],
    "first header longer, then far": [
        frag(0, bytes(8), True, ihl=60),
        frag(65496, bytes(24), False),
    ],
}


def test_oversize_sets_dropped_at_once_and_forgotten() -> None:
    for name, frags in CASES.items():
        r = Reassembler()
        results = [push(r, f) for f in frags]
        assert results[:-1] == [None] * (len(frags) - 1), name
        assert results[-1] is Drop.FRAGMENT_OVERSIZE, name
        assert len(r) == 0 and r.bytes == 0, name  # no memory kept


def test_largest_valid_set_still_reassembles() -> None:
    """The bound is exact: 20 + 65515 = 65535 bytes is a datagram, one byte more is not."""
    r = Reassembler(max_fragments=64)
    body = bytes(65515)
    step = 1480 // 8 * 8
    out: object = None
    for off in range(0, len(body), step):
        part = body[off : off + step]
        out = push(r, frag(off, part, off + step < len(body)))
    assert isinstance(out, bytes) and len(out) == 65535
    assert len(r) == 0 and r.bytes == 0


def test_stack_counts_the_drop_and_keeps_nothing() -> None:
    stack = make_stack()
    for i, frags in enumerate(CASES.values()):
        for f in frags:
            b = bytearray(f)
            b[4:6] = (0x1000 + i).to_bytes(2, "big")  # one datagram per case
            b[10:12] = b"\0\0"
            b[10:12] = checksum(b[:20] if b[0] == 0x45 else b[:60]).to_bytes(2, "big")
            assert feed(stack, bytes(b))[0] == HANDLED
    assert take(stack) == []
    assert stack.drops == {Drop.FRAGMENT_OVERSIZE: len(CASES)}
    assert len(stack.frags) == 0 and stack.frags.bytes == 0


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.binary(max_size=1600), st.binary(min_size=10, max_size=10),
                          st.booleans()), min_size=1, max_size=8))  # fmt: skip
def test_receive_survives_arbitrary_bytes(items: list[tuple[bytes, bytes, bool]]) -> None:
    """Any bytes at all, with or without a virtio-net header: FORWARD or HANDLED, never an
    exception (the TUN loop's guard is for bugs, not for input)."""
    stack = make_stack(max_udp_sessions=2)
    for i, (pkt, hdr, use_vnet) in enumerate(items):
        buf = bytearray(65536)
        buf[: len(pkt)] = pkt
        if use_vnet:
            r = stack.receive_vnet(buf, len(pkt), hdr, i * 0.5)
        else:
            r = stack.receive(buf, len(pkt), i * 0.5)
        assert r in (FORWARD, HANDLED)
        for c in take(stack):
            if type(c).__name__ == "OpenUdpSession":
                stack.udp.opened(c.key, c.ident)  # type: ignore[attr-defined]
    stack.expire(1000.0)
    assert all(isinstance(k, Drop) for k in stack.drops)
    assert Drop.ERROR not in stack.drops
