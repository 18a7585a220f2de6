"""Which member a `urltest` group uses now: probe results and flow failures in, a choice out.

Pure (times are the caller's monotonic `now`, in seconds; delays in milliseconds): the I/O
around it (ztun/outbound/urltest.py) runs the probes this asks for and reports what happened.

The rule, sing-box's plus one: among the members that are not down, the fastest probed one is
used, but the one in use is kept while its delay is within `tolerance` of the fastest's (so
two members of nearly equal speed do not flap). Beyond sing-box, a member is down at once when
a probe through it fails or a live flow through it fails (refused, reset, handshake timeout),
without waiting for the next interval; a down member is probed again after a backoff that
doubles from `backoff` up to `interval`. While every member is down, the first one in the
config's order is used (a flow that fails says so; one that refuses to try helps nobody).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: First wait before a down member is probed again (doubling up to the interval).
DOWN_BACKOFF = 1.0


@dataclass(slots=True)
class MemberState:
    """What is known of one member."""

    #: delay of the last successful probe (ms), None before one succeeded
    delay: int | None = None
    #: since when the member is down (None: it is up, or not known to be down)
    down_since: float | None = None
    #: failures in a row (probes or flows), for the backoff
    failures: int = 0
    #: when the member is to be probed next (0: at once)
    next_probe: float = 0.0


class UrlTestChoice:
    """The state of one urltest group's members and the choice made from it."""

    def __init__(self, members: Sequence[str], *, tolerance_ms: int, interval: float,
                 backoff: float = DOWN_BACKOFF) -> None:  # fmt: skip
        if not members:
            raise ValueError("a group needs at least one member")
        self.members = tuple(members)
        self.tolerance = tolerance_ms
        self.interval = interval
        self.backoff = backoff
        self.state = {m: MemberState() for m in self.members}
        #: the member in use
        self.now: str = self.members[0]

    # -- what happened --------------------------------------------------------------------

    def probed(self, member: str, delay_ms: int | None, now: float) -> bool:
        """A probe through `member` took `delay_ms` (None: it failed). True if `now` changed."""
        state = self.state[member]
        if delay_ms is None:
            self._down(state, now)
        else:
            state.delay = delay_ms
            state.down_since = None
            state.failures = 0
            state.next_probe = now + self.interval
        return self._choose()

    def flow_failed(self, member: str, now: float) -> bool:
        """A flow through `member` failed in a way that says the member is dead. True if
        `now` changed."""
        state = self.state[member]
        if state.down_since is None:
            self._down(state, now)
        return self._choose()

    def _down(self, state: MemberState, now: float) -> None:
        if state.down_since is None:
            state.down_since = now
            state.failures = 0
        state.failures += 1
        wait = min(self.backoff * 2 ** (state.failures - 1), self.interval)
        state.next_probe = now + wait

    # -- what to do -----------------------------------------------------------------------

    def is_down(self, member: str) -> bool:
        return self.state[member].down_since is not None

    def pick(self, exclude: frozenset[str] | set[str] = frozenset()) -> str | None:
        """The member for a new flow: `now`, or when it is in `exclude` (tried already for
        this flow) the best other live one; None when no live member is left to try."""
        if self.now not in exclude:
            return self.now
        live = [m for m in self.members if m not in exclude and not self.is_down(m)]
        if not live:
            return None
        return self._fastest(live) or live[0]

    def due(self, now: float) -> list[str]:
        """The members whose probe is due at `now`."""
        return [m for m in self.members if self.state[m].next_probe <= now]

    def next_due(self, now: float) -> float:
        """Seconds from `now` until the next probe is due (0: one is due already)."""
        return max(0.0, min(s.next_probe for s in self.state.values()) - now)

    def _fastest(self, candidates: Sequence[str]) -> str | None:
        best: str | None = None
        for member in candidates:
            delay = self.state[member].delay
            if delay is not None and (best is None or delay < self.state[best].delay):  # type: ignore[operator]
                best = member
        return best

    def _choose(self) -> bool:
        live = [m for m in self.members if not self.is_down(m)]
        if not live:
            chosen = self.members[0]
        else:
            fastest = self._fastest(live)
            current = self.state[self.now]
            if fastest is None:
                # nothing probed yet among the live ones: keep the current one if it is live
                chosen = self.now if self.now in live else live[0]
            elif (self.now in live and current.delay is not None
                  and current.delay <= self.state[fastest].delay + self.tolerance):  # type: ignore[operator]  # fmt: skip
                chosen = self.now
            else:
                chosen = fastest
        changed = chosen != self.now
        self.now = chosen
        return changed
