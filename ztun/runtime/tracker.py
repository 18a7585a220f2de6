"""The connection tracker: every open flow, its counters, and a way to close it.

Owns: the table of open flows the Clash API lists (`/connections`) and closes, the byte totals
(all flows since start, and per outbound), and the bound on the table. Flows register where
their bytes move: the TCP relay (`Dispatcher.relay_tcp`, for the mixed and tun inbounds) and
the UDP session runner (`runtime/udp.py`). Each registers two callables instead of counters:
`counts` reads the byte counts the relay or the UDP core keeps anyway (the tracker adds no
work per byte or per datagram), `close` ends the flow in its own layer.

No sockets or loop here: a table, a clock read per flow start, and the callables it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ztun.stack.flow import Flow

#: Open flows the table holds; more still run but are not listed (counted in `untracked`).
MAX_TRACKED = 16384

Counts = Callable[[], "tuple[int, int]"]


@dataclass(slots=True, eq=False)
class Tracked:
    """One open flow as the API shows it."""

    id: str
    flow: Flow
    network: str
    #: the inbound's type ("mixed", "tun"), for the Clash metadata's `type`
    inbound_type: str
    #: wall-clock start (seconds since the epoch)
    start: float
    counts: Counts
    close: Callable[[], None]
    closed: bool = field(default=False)

    def moved(self) -> tuple[int, int]:
        """(upload, download) bytes so far."""
        return self.counts()


class Tracker:
    """The open flows, bounded, plus totals that survive the flows."""

    def __init__(self, max_tracked: int = MAX_TRACKED,
                 inbound_types: dict[str, str] | None = None) -> None:  # fmt: skip
        self.max_tracked = max_tracked
        #: inbound tag → type, for the Clash metadata
        self.inbound_types = dict(inbound_types or {})
        self._open: dict[str, Tracked] = {}
        #: bytes of flows that ended, in total and by outbound tag
        self.closed_up = 0
        self.closed_down = 0
        self.by_outbound: dict[str, list[int]] = {}
        #: flows that ran untracked because the table was full
        self.untracked = 0
        #: flows ended through `close` (the API)
        self.closed_by_api = 0
        #: flows ever tracked
        self.started = 0

    @property
    def open_count(self) -> int:
        """Flows open now (no `__len__`: an empty tracker must not be falsy)."""
        return len(self._open)

    def __iter__(self) -> Iterator[Tracked]:
        return iter(list(self._open.values()))

    def get(self, ident: str) -> Tracked | None:
        return self._open.get(ident)

    def add(self, flow: Flow, network: str, counts: Counts,
            close: Callable[[], None]) -> Tracked | None:  # fmt: skip
        """Register an open flow; None when the table is full (the flow runs on, unlisted)."""
        if len(self._open) >= self.max_tracked:
            self.untracked += 1
            return None
        inbound = flow.meta.inbound or ""
        import uuid  # only with the Clash API (0.3 MiB a router without one never needs)

        entry = Tracked(str(uuid.uuid4()), flow, network,
                        self.inbound_types.get(inbound, inbound), time.time(), counts,
                        close)  # fmt: skip
        self._open[entry.id] = entry
        self.started += 1
        return entry

    def remove(self, entry: Tracked | None) -> None:
        """The flow ended: its final counts go into the totals."""
        if entry is None or self._open.pop(entry.id, None) is None:
            return
        up, down = entry.counts()
        self.closed_up += up
        self.closed_down += down
        per = self.by_outbound.setdefault(entry.flow.outbound or "-", [0, 0])
        per[0] += up
        per[1] += down

    def close(self, ident: str) -> bool:
        """End flow `ident` (False when it is not open). Its own layer ends it and then
        removes it; until then it stays listed, marked closed."""
        entry = self._open.get(ident)
        if entry is None:
            return False
        if not entry.closed:
            entry.closed = True
            self.closed_by_api += 1
            entry.close()
        return True

    def close_all(self) -> int:
        count = 0
        for entry in list(self._open.values()):
            if self.close(entry.id):
                count += 1
        return count

    def totals(self) -> tuple[int, int]:
        """(upload, download) bytes of every flow since start, open ones included."""
        up, down = self.closed_up, self.closed_down
        for entry in self._open.values():
            u, d = entry.counts()
            up += u
            down += d
        return up, down

    def per_outbound(self) -> dict[str, dict[str, int]]:
        """Bytes and open flows by outbound tag, ended flows included."""
        out: dict[str, dict[str, int]] = {
            tag: {"upload": up, "download": down, "connections": 0}
            for tag, (up, down) in self.by_outbound.items()
        }
        for entry in self._open.values():
            u, d = entry.counts()
            row = out.setdefault(entry.flow.outbound or "-",
                                 {"upload": 0, "download": 0, "connections": 0})  # fmt: skip
            row["upload"] += u
            row["download"] += d
            row["connections"] += 1
        return out
