"""Busy polling's window and credit (pure), and its loop layer on a real asyncio loop."""

from __future__ import annotations

import asyncio
import time

from hypothesis import given
from hypothesis import strategies as st

from ztun.runtime.busy_poll import (
    CREDIT_CAP,
    CREDIT_PER_WORK,
    FIRST_PAUSE,
    GROW_START,
    MAX_PAUSE,
    MISSES_BEFORE_PAUSE,
    BusyPoll,
    PollWindow,
)

US = 1e-6


def burst_every(
    w: PollWindow, gap: float, work: float, count: int, t: float = 1.0
) -> tuple[float, float]:
    """`count` bursts of `work` seconds, `gap` seconds apart from `t` on: the last deadline,
    and when the next burst would start."""
    until = 0.0
    for _ in range(count):
        until = w.work(t, t + work)
        t += work + gap
    return until, t


def test_off_never_polls() -> None:
    w = PollWindow(0.0)
    assert burst_every(w, 1 * US, 50 * US, 100)[0] == 0.0
    assert w.window == 0.0


def test_the_first_burst_after_quiet_does_not_poll() -> None:
    w = PollWindow(200 * US)
    assert w.work(1.0, 1.0 + 20 * US) == 0.0  # nothing before it: no gap to learn from


def test_dense_bursts_open_the_window_until_it_spans_the_gap() -> None:
    w = PollWindow(200 * US)
    until, _ = burst_every(w, 150 * US, 40 * US, 20)
    assert w.window == 16 * GROW_START  # 10, 20, 40, 80, 160 µs: the first that spans 150
    assert until > 0
    # the deadline is the window or the credit, whichever ends first
    assert until - w.idle_since <= min(w.window, CREDIT_CAP) + 1e-12  # type: ignore[operator]
    burst_every(w, 190 * US, 40 * US, 20)
    assert w.window == 200 * US  # never past the limit


def test_the_window_grows_by_doubling_from_grow_start() -> None:
    w = PollWindow(200 * US)
    windows = []
    t = 1.0
    for _ in range(6):
        w.work(t, t + 10 * US)
        windows.append(w.window)
        t += 10 * US + 190 * US  # each gap is longer than any window so far
    assert windows[:5] == [0.0, GROW_START, 2 * GROW_START, 4 * GROW_START, 8 * GROW_START]


def test_sparse_bursts_close_the_window() -> None:
    w = PollWindow(200 * US)
    burst_every(w, 100 * US, 40 * US, 20)
    assert w.window > 0
    burst_every(w, 5e-3, 40 * US, 10, t=10.0)  # one burst per 5 ms: too sparse
    assert w.window == 0.0
    assert w.work(20.0, 20.0 + 40 * US) == 0.0


def test_a_burst_caught_by_the_window_keeps_it() -> None:
    w = PollWindow(200 * US)
    _, t = burst_every(w, 150 * US, 40 * US, 20)
    before = w.window
    burst_every(w, 30 * US, 40 * US, 5, t=t - 120 * US)  # each caught inside the window
    assert w.window == before


def test_polling_is_paid_by_work() -> None:
    w = PollWindow(200 * US)
    _, t = burst_every(w, 150 * US, 40 * US, 20)  # the window is open (160 µs)
    w.polled(w.credit)  # the loop spent every bit of credit polling
    start = t - 140 * US  # the next burst, 10 µs after the last one ended: inside the window
    until = w.work(start, start + 2 * US)
    # 2 µs of work buy 6 µs of polling, not the 200 µs window
    assert abs(until - (start + 2 * US + CREDIT_PER_WORK * 2 * US)) < 1e-9


def polled_stream(w: PollWindow, gap: float, work: float, count: int) -> list[bool]:
    """Bursts `gap` apart, each polled for as long as the window says (the credit spent):
    whether each burst was followed by a poll."""
    t, polled = 1.0, []
    for _ in range(count):
        until = w.work(t, t + work)
        t += work
        polled.append(until > t)
        if until > t:
            w.polled(until - t)
        t += gap
    return polled


def test_polls_that_never_catch_their_burst_pause_polling() -> None:
    """A download's datagrams 120 µs apart, 10 µs of work each: the credit (30 µs) never
    reaches the next one. After the window has grown, a few misses pause polling, and the
    pauses double up to MAX_PAUSE: a handful of polls in thousands of bursts."""
    w = PollWindow(200 * US)
    polled = polled_stream(w, 120 * US, 10 * US, 4000)
    # growing (10 to 160 µs), the first misses, the first pause, the misses after it
    assert sum(polled[:30]) <= 4 + 2 * MISSES_BEFORE_PAUSE
    assert sum(polled[1000:]) <= (3000 // MAX_PAUSE + 1) * MISSES_BEFORE_PAUSE
    assert w.next_pause == MAX_PAUSE


def test_a_caught_burst_ends_the_pauses() -> None:
    w = PollWindow(200 * US)
    polled_stream(w, 120 * US, 10 * US, 1000)  # paused for long stretches now
    assert w.next_pause > FIRST_PAUSE
    # request and answer: 40 µs of work, the next burst 60 µs later, well inside the credit
    polled = polled_stream(w, 60 * US, 40 * US, MAX_PAUSE + 50)
    assert all(polled[-40:])
    assert w.next_pause == FIRST_PAUSE and w.pause == 0


@given(st.lists(st.tuples(st.floats(0, 2e-3), st.floats(0, 1e-3)), max_size=200),
       st.floats(0, 1e-3))  # fmt: skip
def test_bounds_hold_for_any_traffic(bursts: list[tuple[float, float]], limit: float) -> None:
    """Whatever the gaps and the work: the window stays within [0, limit], the credit within
    its cap, and no deadline lies further than the window or the credit from the burst's end."""
    w = PollWindow(limit)
    t = 1.0
    for gap, work in bursts:
        t += gap
        credit_before = w.credit
        until = w.work(t, t + work)
        t += work
        assert 0.0 <= w.window <= limit
        assert w.credit <= CREDIT_CAP
        if until:
            assert until - t <= min(w.window, credit_before + CREDIT_PER_WORK * work) + 1e-12
        # the loop polls for part of what it may
        w.polled(min(until - t, w.credit) / 2 if until else 0.0)


def test_the_loop_polls_until_the_deadline_then_sleeps() -> None:
    async def main() -> tuple[int, float, float]:
        loop = asyncio.get_running_loop()
        poll = BusyPoll(loop, 200 * US)
        t = time.monotonic()
        for _ in range(20):  # dense bursts open the window
            poll.after(t)
            t = time.monotonic()
            await asyncio.sleep(0)
        poll.after(time.monotonic() - 100 * US)  # 100 µs of work: the window's worth of credit
        await asyncio.sleep(0.05)  # the poll ends within its window, long before this
        polls, polled = poll.polls, poll.polled
        await asyncio.sleep(0.05)
        return polls - poll.polls, polled, poll.polled

    more_polls, polled, polled_later = asyncio.run(main())
    assert more_polls == 0  # it stopped polling: a quiet loop sleeps
    assert 0 < polled < 0.02
    assert polled_later == polled


def test_stop_ends_polling_at_once() -> None:
    async def main() -> int:
        loop = asyncio.get_running_loop()
        poll = BusyPoll(loop, 200 * US)
        t = time.monotonic()
        for _ in range(20):
            poll.after(t)
            t = time.monotonic()
        poll.stop()
        await asyncio.sleep(0.01)
        n = poll.polls
        poll.after(time.monotonic() - 100 * US)
        await asyncio.sleep(0.01)
        return poll.polls - n

    assert asyncio.run(main()) == 0
    loop = asyncio.new_event_loop()
    try:
        assert BusyPoll(loop, 0.0).window.limit == 0.0
        retuned = BusyPoll(loop, 200 * US)
        retuned.set_limit(-1.0)  # what a reload can hand it: off, never negative
        assert retuned.window.limit == 0.0 and retuned.window.work(1.0, 1.1) == 0.0
    finally:
        loop.close()
