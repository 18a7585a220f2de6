"""Issue 13, UDP: the pure half of UDP segmentation offload (ztun.packet.gso): which datagrams
share one segmented send, how datagrams that came as one are cut apart again, and the UDP
super-packets written into the TUN, checked against what the kernel makes of them."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.packet.checksum import fold
from ztun.packet.gso import MAX_BYTES, MAX_SEGMENTS, build_udp_super, runs, split
from ztun.packet.ip import Drop, IPHeader, Proto, build_ip, parse_ip
from ztun.packet.udp import build_udp
from ztun.packet.virtio import F_NEEDS_CSUM, GSO_UDP_L4, VnetHeader, finish_partial, parse_header

_datagrams = st.lists(
    st.one_of(st.sampled_from([0, 1, 1400, 1410, 9000, 40000]), st.integers(0, 2000)).map(
        lambda n: bytes([n % 251]) * n
    ),
    max_size=300,
)


def check_runs(datagrams: list[bytes], cuts: list[tuple[int, int, int]],
               max_segments: int, max_bytes: int) -> None:  # fmt: skip
    # In order, every datagram exactly once.
    assert [i for start, end, _ in cuts for i in range(start, end)] == list(range(len(datagrams)))
    for start, end, size in cuts:
        part = datagrams[start:end]
        if size == 0:
            assert len(part) == 1  # sent as it is
            continue
        # What UDP_SEGMENT takes: all `size` bytes but the last, which may be shorter.
        assert len(part) >= 2 and size == len(part[0]) > 0
        assert all(len(d) == size for d in part[:-1]) and 0 < len(part[-1]) <= size
        assert len(part) <= max_segments and sum(map(len, part)) <= max_bytes


@settings(max_examples=300)
@given(_datagrams, st.integers(2, 130), st.integers(1, 70000))
def test_runs_keep_order_and_the_kernel_rules(
    datagrams: list[bytes], max_segments: int, max_bytes: int
) -> None:
    check_runs(datagrams, runs(datagrams, max_segments, max_bytes), max_segments, max_bytes)


def test_a_burst_of_equal_datagrams_is_few_sends() -> None:
    burst = [b"x" * 1410] * 200
    cuts = runs(burst)
    check_runs(burst, cuts, MAX_SEGMENTS, MAX_BYTES)
    per_send = MAX_BYTES // 1410  # 46: the byte limit binds before the count
    assert [end - start for start, end, _ in cuts] == [per_send] * 4 + [200 - 4 * per_send]
    assert {size for *_, size in cuts} == {1410}


def test_a_shorter_datagram_ends_a_run_and_a_longer_starts_one() -> None:
    d = [b"a" * 100, b"b" * 100, b"c" * 50, b"d" * 100, b"e" * 200, b"f"]
    assert runs(d) == [(0, 3, 100), (3, 4, 0), (4, 6, 200)]


def test_empty_datagrams_go_alone() -> None:
    assert runs([b"", b"", b"x", b"x", b""]) == [(0, 1, 0), (1, 2, 0), (2, 4, 1), (4, 5, 0)]
    assert runs([]) == []


@given(st.binary(max_size=5000), st.integers(-1, 6000))
def test_split_cuts_what_the_kernel_glued(data: bytes, size: int) -> None:
    buf = bytearray(data + b"garbage after n")
    parts = split(buf, len(data), size)
    assert b"".join(parts) == data
    if 0 < size < len(data):
        assert all(len(p) == size for p in parts[:-1]) and 0 < len(parts[-1]) <= size
    else:
        assert parts == [data]


# -- UDP super-packets written into the TUN (USO) ---------------------------------------------

V4 = (bytes([203, 0, 113, 20]), bytes([198, 18, 0, 2]))
V6 = (bytes.fromhex("20010db8000200000000000000000020"),
      bytes.fromhex("fdfedcba987600000000000000000002"))


def kernel_cut(hdr: bytes, pkt: bytes) -> list[bytes]:
    """What the kernel makes of a GSO_UDP_L4 write (__udp_gso_segment and inet/ipv6 GSO): one
    packet per `gso_size` bytes of payload, each with its own lengths, IPv4 header checksum,
    and the UDP checksum completed from the partial field moved to the piece's length."""
    h = parse_header(hdr)
    assert isinstance(h, VnetHeader)
    assert h.flags == F_NEEDS_CSUM and h.gso_type == GSO_UDP_L4 and h.csum_offset == 6
    ip = parse_ip(pkt)
    assert isinstance(ip, IPHeader) and ip.end == len(pkt) and ip.proto == Proto.UDP
    l4 = h.csum_start
    assert l4 == ip.l4 and h.hdr_len == l4 + 8
    old_len = int.from_bytes(pkt[l4 + 4 : l4 + 6], "big")
    assert old_len == len(pkt) - l4
    field = int.from_bytes(pkt[l4 + 6 : l4 + 8], "big")
    payload = pkt[l4 + 8 :]
    out = []
    for i in range(0, len(payload), h.gso_size):
        piece = payload[i : i + h.gso_size]
        new_len = 8 + len(piece)
        head = bytearray(build_ip(ip.src, ip.dst, Proto.UDP, new_len))
        udp = bytearray(pkt[l4 : l4 + 8])
        udp[4:6] = new_len.to_bytes(2, "big")
        moved = fold(field + (~old_len & 0xFFFF) + new_len)  # csum16_sub old, csum16_add new
        udp[6:8] = moved.to_bytes(2, "big")
        seg = head + udp + piece
        assert finish_partial(seg, len(seg), len(head), 6)
        if seg[len(head) + 6 : len(head) + 8] == b"\0\0":
            seg[len(head) + 6 : len(head) + 8] = b"\xff\xff"  # CSUM_MANGLED_0
        out.append(bytes(seg))
    return out


@settings(max_examples=200)
@given(st.sampled_from([V4, V6]), st.integers(1, 65535), st.integers(1, 65535),
       st.integers(1, 3000), st.integers(2, 64), st.integers(0, 2999),
       st.binary(max_size=64))  # fmt: skip
def test_a_super_packet_is_cut_into_exactly_the_plain_packets(
    addrs: tuple[bytes, bytes], sport: int, dport: int, size: int, count: int, last: int,
    seed: bytes,
) -> None:  # fmt: skip
    src, dst = addrs
    payloads = [(bytes([i]) + seed).ljust(size, b"Z")[:size] for i in range(count - 1)]
    payloads.append((b"L" + seed).ljust(size, b"z")[: 1 + last % size])
    cuts = runs(payloads)
    for start, end, seg in cuts:
        part = payloads[start:end]
        built = build_udp_super(src, sport, dst, dport, part, seg)
        if seg == 0:
            assert isinstance(built, Drop)  # one datagram: a plain packet's job
            continue
        assert not isinstance(built, Drop)
        # Exactly what ztun would have written one by one.
        assert kernel_cut(*built) == [build_udp(src, sport, dst, dport, p) for p in part]


def test_super_packet_refuses_what_the_kernel_would() -> None:
    src, dst = V4
    assert build_udp_super(src, 1, dst, 2, [b"x" * 100], 100) == Drop.BAD_LENGTH  # one only
    assert build_udp_super(src, 1, dst, 2, [b"x" * 40000] * 2, 40000) == Drop.BAD_LENGTH
    assert build_udp_super(src, 1, dst, 2, [b"x", b"y"], 0) == Drop.BAD_LENGTH
