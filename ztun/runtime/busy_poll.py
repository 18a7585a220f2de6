"""Busy polling: after a burst of packets, keep the event loop polling for a moment before it
sleeps, so that the next packet (a reply, the application's next request) is taken without a
wake-up.

Why: on a virtual machine whose idle CPUs halt at once (this project's machines: the
`haltpoll` cpuidle driver with `guest_halt_poll_ns` 0), a sleeping process is woken through
the hypervisor, which costs tens of microseconds per wake-up. A UDP round trip through the TUN
wakes ztun twice. Measured with `bench/bench_tun.py` (64-byte UDP echoes through the TUN,
direct, 2 cores): p50 193-202 µs without busy polling, 105-116 µs with it, sing-box 133-169
µs (Go's scheduler spins before it parks a thread). The kernel offers the same trade for NIC
queues as `net.core.busy_poll`; a TUN has no such knob, so ztun polls its own loop.

What it costs is bounded by three pure rules (`PollWindow`, tested without a loop):
- *When*: the window follows the gaps between bursts, as the kernel's `haltpoll` governor does
  for idle CPUs. A gap shorter than `limit` that came after the window had ended doubles the
  window (from `GROW_START`); a gap longer than `limit` halves it, down to nothing. Traffic
  sparser than one burst per `limit` never polls; an idle ztun never polls.
- *How much*: polling is paid for by work. Each burst earns three times the time it took to
  handle (up to `CREDIT_CAP`), and polling spends it: whatever the traffic, ztun polls at
  most three times as long as it spent handling packets. Where the poll catches the next
  packet it costs about what the wake-up it saves would have: 113-120 µs of CPU per UDP
  echo with it, 107-115 µs without (docs/tun.md has the table).
- *Whether it helps*: a poll that ends before the next burst comes (it came later, or the
  credit ran out first) saved nothing. While the window is still growing towards the gap
  such a miss is expected and not counted. After `MISSES_BEFORE_PAUSE` counted misses in a
  row, the next `FIRST_PAUSE` bursts get no poll (and earn no credit); each pause in a row
  doubles, up to `MAX_PAUSE` bursts, and one poll that catches its burst ends the pauses.
  A stream whose packets come too far apart for the credit (a download of 100 Mbit/s: a
  datagram each ~120 µs, 10 µs of work each) so costs a few polls in hundreds of bursts, not
  a poll each.

`BusyPoll` is the thin layer on the loop: while a window is open it keeps one callback
scheduled with `call_soon`, which makes asyncio's and uvloop's loops poll their file
descriptors without blocking.
"""

from __future__ import annotations

import asyncio
import time

from ztun.config.options import DEFAULT_BUSY_POLL

#: The first window after a quiet spell (seconds); it doubles while bursts keep coming.
GROW_START = 10e-6
#: Most polling credit kept (seconds): a long burst of work buys no more than this.
CREDIT_CAP = 2e-3
#: Polling time each second of work earns. Measured on the UDP echo: 1 gave p50 136 µs (the
#: window ran out before the reply came, and ztun slept all the same), 2 gave 117, 3 gave 104,
#: as much as unbounded polling.
CREDIT_PER_WORK = 3.0
#: Polls in a row that catch nothing before polling pauses.
MISSES_BEFORE_PAUSE = 4
#: Bursts without a poll in the first pause; each pause in a row doubles, up to MAX_PAUSE.
FIRST_PAUSE = 16
MAX_PAUSE = 256
#: The tun inbound's default `busy_poll`: the longest window, and the gap beyond which bursts
#: are too sparse to poll for.
DEFAULT_LIMIT = DEFAULT_BUSY_POLL


class PollWindow:
    """How long to poll after each burst of work (pure: takes the times, returns a deadline).
    `limit` 0 turns busy polling off."""

    __slots__ = ("credit", "deadline", "idle_since", "limit", "misses", "next_pause", "pause",
                 "window")  # fmt: skip

    def __init__(self, limit: float = DEFAULT_LIMIT) -> None:
        self.limit = max(0.0, limit)
        self.window = 0.0
        self.credit = 0.0
        self.idle_since: float | None = None
        #: the deadline handed out after the last burst (0: none)
        self.deadline = 0.0
        #: polls in a row that ended before their burst came
        self.misses = 0
        #: bursts left that get no poll, and the length of the next pause
        self.pause = 0
        self.next_pause = FIRST_PAUSE

    def work(self, start: float, end: float) -> float:
        """A burst of work ran from `start` to `end`: the time until which to poll, or 0."""
        if self.limit <= 0:
            return 0.0
        gap = float("inf") if self.idle_since is None else start - self.idle_since
        self.idle_since = end
        w = before = self.window
        if gap > w:  # the burst came after the window had ended (or there was none)
            if gap <= self.limit:
                w = min(self.limit, w * 2 if w else GROW_START)
            else:
                w = w / 2 if w > GROW_START else 0.0
            self.window = w
        if self.deadline:
            if start <= self.deadline:  # the poll caught this burst
                self.misses, self.next_pause = 0, FIRST_PAUSE
            elif w <= before:  # missed, and a longer window is not what would help
                self.misses += 1
                if self.misses >= MISSES_BEFORE_PAUSE:
                    self.misses, self.pause = 0, self.next_pause
                    self.next_pause = min(MAX_PAUSE, self.next_pause * 2)
            self.deadline = 0.0
        if self.pause:  # a pause earns no credit: it would buy the polls after it
            self.pause -= 1
            return 0.0
        self.credit = min(CREDIT_CAP, self.credit + CREDIT_PER_WORK * max(0.0, end - start))
        if w <= 0 or self.credit <= 0:
            return 0.0
        self.deadline = end + min(w, self.credit)
        return self.deadline

    def polled(self, seconds: float) -> None:
        """`seconds` were spent polling: they are paid from the credit."""
        self.credit -= seconds


class BusyPoll:
    """Polls the loop until the deadline `PollWindow` gives after each burst (`after`).
    `polls` counts the loop turns spent polling, `polled` their time in seconds."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float = DEFAULT_LIMIT) -> None:
        self.loop = loop
        self.window = PollWindow(limit)
        self.until = 0.0
        self.polls = 0
        self.polled = 0.0
        self._last = 0.0
        self._scheduled = False

    def after(self, started: float) -> None:
        """A burst of work that began at `started` (time.monotonic()) has just ended."""
        now = time.monotonic()
        until = self.window.work(started, now)
        if until <= now:
            return
        self.until = until
        self._last = now
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._poll)

    def _poll(self) -> None:
        now = time.monotonic()
        spent = now - self._last
        self._last = now
        self.window.polled(spent)
        self.polled += spent
        if now < self.until and self.window.credit > 0:
            self.polls += 1
            self.loop.call_soon(self._poll)
        else:
            self._scheduled = False

    def set_limit(self, limit: float) -> None:
        """A new `busy_poll` (a reload); 0 or less turns polling off."""
        self.window.limit = max(0.0, limit)

    def stop(self) -> None:
        """No more polling (the inbound is closing); a scheduled turn ends at once."""
        self.set_limit(0.0)
        self.until = 0.0
