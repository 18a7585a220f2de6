"""System-stack TCP NAT and the UDP session table."""

from __future__ import annotations

import struct
import time

from hypothesis import given
from hypothesis import strategies as st

from ztun.nat.tcp import FORWARD, NEW, TcpNat
from ztun.nat.udp import UdpTable
from ztun.packet.checksum import checksum, pseudo_header_sum
from ztun.packet.ip import Drop, IPHeader, Proto, build_ip, ip_header_ok, parse_ip
from ztun.packet.tcp import ACK, FIN, RST, SYN, tcp_checksum_ok

A4, B4 = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
A6 = bytes.fromhex("fdfedcba987600000000000000000001")
B6 = bytes.fromhex("fdfedcba987600000000000000000002")
P = 40000


def segment(src: bytes, dst: bytes, sp: int, dp: int, flags: int, payload: bytes = b"") -> bytes:
    seg = bytearray(struct.pack("!HHIIBBHHH", sp, dp, 7, 9, 5 << 4, flags, 1000, 0, 0)) + payload
    c = checksum(seg, pseudo_header_sum(src, dst, Proto.TCP, len(seg)))
    seg[16:18] = c.to_bytes(2, "big")
    return bytes(build_ip(src, dst, Proto.TCP, len(seg))) + bytes(seg)


def ports(pkt: bytes | bytearray, h: IPHeader) -> tuple[int, int]:
    return struct.unpack("!HH", pkt[h.l4 : h.l4 + 4])


def check_ok(pkt: bytes | bytearray) -> IPHeader:
    h = parse_ip(bytes(pkt))
    assert isinstance(h, IPHeader)
    assert tcp_checksum_ok(bytes(pkt), h)
    if h.version == 4:
        assert ip_header_ok(bytes(pkt))
    return h


addr_pairs = st.one_of(
    st.tuples(st.just(4), st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4)),
    st.tuples(st.just(6), st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16)),
)


@given(addr_pairs, st.integers(1, 65535), st.integers(1, 65535), st.binary(max_size=300),
       st.sampled_from([ACK, ACK | 0x08, ACK | FIN]))  # fmt: skip
def test_round_trip(fam: tuple[int, bytes, bytes], sp: int, dp: int, payload: bytes,
                    flags: int) -> None:  # fmt: skip
    version, s, d = fam
    a, b = (A4, B4) if version == 4 else (A6, B6)
    if (s, d) == (a, b):
        return
    nat = TcpNat(a, b, P)
    syn = bytearray(segment(s, d, sp, dp, SYN))
    assert nat.translate(syn, len(syn), 0.0) == NEW
    n = nat.add(s, sp, d, dp, 0.0, ctx="flow")
    assert isinstance(n, int) and not isinstance(n, Drop)
    assert nat.translate(syn, len(syn), 0.0) == FORWARD
    h = check_ok(syn)
    assert (h.src, h.dst, ports(syn, h)) == (b, a, (n, P))
    # a data segment of the same flow
    pkt = bytearray(segment(s, d, sp, dp, flags, payload))
    assert nat.translate(pkt, len(pkt), 1.0) == FORWARD
    h = check_ok(pkt)
    assert (h.src, h.dst, ports(pkt, h)) == (b, a, (n, P))
    assert pkt[h.l4 + 20 :] == payload
    # the listener's answer goes back to the original peer
    reply = bytearray(segment(a, b, P, n, ACK | SYN, payload))
    assert nat.translate(reply, len(reply), 1.0) == FORWARD
    h = check_ok(reply)
    assert (h.src, h.dst, ports(reply, h)) == (d, s, (dp, sp))
    f = nat.lookup(n)
    assert f is not None and (f.src, f.sport, f.dst, f.dport, f.ctx) == (s, sp, d, dp, "flow")


def test_unknown_segments() -> None:
    nat = TcpNat(A4, B4, P)
    s, d = bytes([198, 18, 0, 1]), bytes([203, 0, 113, 5])
    for flags in (ACK, SYN | ACK, RST):
        pkt = bytearray(segment(s, d, 1234, 80, flags))
        assert nat.translate(pkt, len(pkt), 0.0) == Drop.NO_FLOW
    reply = bytearray(segment(A4, B4, P, 10000, ACK))
    assert nat.translate(reply, len(reply), 0.0) == Drop.NO_FLOW


def test_expiry_and_bounds() -> None:
    nat = TcpNat(A4, B4, P, first_port=10000, last_port=10002, timeout=10, closing_timeout=1)
    d = bytes([203, 0, 113, 5])
    got = [nat.add(A4, 2000 + i, d, 80, 0.0, ctx=i) for i in range(3)]
    assert got == [10000, 10001, 10002]
    for n in got:
        assert nat.lookup(n) is not None  # accepted: the handshakes are complete
    assert nat.add(A4, 3000, d, 80, 1.0) is Drop.NAT_FULL  # nothing half-open to evict
    assert nat.add(A4, 2001, d, 80, 1.0) == 10001  # the same flow keeps its port
    # both FINs seen on flow 0: it goes after the short timeout
    fin_out = bytearray(segment(A4, d, 2000, 80, FIN | ACK))
    assert nat.translate(fin_out, len(fin_out), 2.0) == FORWARD
    fin_in = bytearray(segment(A4, B4, P, 10000, FIN | ACK))
    assert nat.translate(fin_in, len(fin_in), 2.0) == FORWARD
    assert nat.expire(2.5) == []
    assert nat.expire(3.5) == [0]
    assert nat.add(A4, 3000, d, 80, 4.0) == 10000  # the freed port is reused
    assert len(nat.expire(20.0)) == 3
    assert len(nat) == 0


@given(st.binary(max_size=120), st.sampled_from([0x45, 0x60, 0x4F, 0x00]))
def test_translate_never_raises(data: bytes, first: int) -> None:
    for a, b in ((A4, B4), (A6, B6)):
        nat = TcpNat(a, b, P)
        buf = bytearray([first]) + bytearray(data)
        r = nat.translate(buf, len(buf), 0.0)
        assert r in (FORWARD, NEW) or isinstance(r, Drop)


def test_udp_table_lru_and_expiry() -> None:
    t: UdpTable[str] = UdpTable(timeout=10, max_sessions=2)
    assert t.put("a", "A", 0.0) == []
    assert t.put("b", "B", 1.0) == []
    assert t.get("a", 2.0) == "A"  # a is now the most recent
    assert t.put("c", "C", 3.0) == ["B"]  # so b is evicted
    assert t.evicted == 1
    assert t.get("b", 3.0) is None
    assert t.expire(12.5) == ["A"]  # a was last used at 2.0
    assert t.get("c", 13.5) is None  # idle too long
    assert t.expire(13.5) == ["C"]
    assert len(t) == 0
    assert t.put("x", "X", 0.0) == [] and t.put("x", "Y", 0.0) == ["X"]
    assert t.clear() == ["Y"]


def test_reused_four_tuple_gets_a_fresh_port() -> None:
    nat = TcpNat(A4, B4, P)
    d = bytes([203, 0, 113, 5])
    n = nat.add(A4, 2000, d, 80, 0.0)
    fin = bytearray(segment(A4, d, 2000, 80, FIN | ACK))
    assert nat.translate(fin, len(fin), 1.0) == FORWARD
    syn = bytearray(segment(A4, d, 2000, 80, SYN))
    assert nat.translate(syn, len(syn), 2.0) == NEW  # not the closing flow's port
    assert nat.lookup(n) is None
    assert nat.add(A4, 2000, d, 80, 2.0) != n
    # a retransmitted SYN of an open flow keeps its port
    syn2 = bytearray(segment(A4, d, 2000, 80, SYN))
    assert nat.translate(syn2, len(syn2), 2.5) == FORWARD


def test_half_open_flows_expire_in_seconds() -> None:
    nat = TcpNat(A4, B4, P, timeout=330, handshake_timeout=10)
    d = bytes([203, 0, 113, 5])
    half = nat.add(A4, 2000, d, 80, 0.0, ctx="half")
    done = nat.add(A4, 2001, d, 80, 0.0, ctx="done")
    assert isinstance(done, int) and nat.lookup(done) is not None
    # SYN retransmissions keep their port meanwhile
    syn = bytearray(segment(A4, d, 2000, 80, SYN))
    assert nat.translate(syn, len(syn), 5.0) == FORWARD
    assert nat.expire(9.0) == []
    assert nat.expire(10.5) == ["half"]
    assert nat.handshake_expired == 1 and nat.lookup(half) is None
    assert nat.lookup(done) is not None  # an accepted flow lives by the idle timeout
    assert nat.expire(300.0) == []


def test_syn_flood_on_a_full_table_costs_o1_per_syn() -> None:
    """A full table of half-open flows: every new SYN evicts the oldest one, and the work per
    SYN does not grow with the table (no scan): counted by the entries looked at."""
    cap = 16384
    nat = TcpNat(A4, B4, P, max_flows=cap, handshake_timeout=10)
    d = bytes([203, 0, 113, 5])
    good = nat.add(A4, 1, d, 443, 0.0, ctx="good")
    assert isinstance(good, int) and nat.lookup(good) is not None  # an accepted connection
    scanned = 0
    real_expire = nat.expire

    def counting_expire(now: float) -> list[object]:
        nonlocal scanned
        scanned += len(nat)
        return real_expire(now)

    nat.expire = counting_expire  # type: ignore[method-assign]
    flood = 3 * cap
    t0 = time.perf_counter()
    for i in range(flood):
        src = bytes([198, 51, 100, i & 0xFF])
        n = nat.add(src, 1024 + (i >> 8), d, 80, 1.0 + i * 1e-5)
        assert isinstance(n, int) and not isinstance(n, Drop)
    elapsed = time.perf_counter() - t0
    assert len(nat) == cap  # the cap holds
    assert nat.evicted == flood - (cap - 1)  # one eviction per SYN once full
    assert scanned == 0  # never a full scan on the SYN path
    assert nat.lookup(good) is not None  # the accepted connection survives the flood
    # Generous: about 0.15 s here; a scan per SYN would take minutes.
    assert elapsed < 10.0
    # and an accepted flow still gets a slot at once
    ok = nat.add(A4, 9, d, 443, 2.0)
    assert isinstance(ok, int) and not isinstance(ok, Drop)
