"""Issue 13, UDP: the pure half of UDP segmentation offload (ztun.packet.gso): which datagrams
share one segmented send, and how a coalesced (GRO) receive is cut apart again."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.packet.gso import MAX_BYTES, MAX_SEGMENTS, runs, split

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
