"""The UDP session table of the TUN inbound: keyed by (source, destination), bounded, LRU.

A session is created on a flow's first datagram and lives until it has been idle for `timeout`
seconds or is evicted as the least recently used when the table is full. Pure: every call that
needs the time takes `now`, and what is dropped is handed back for the caller to close.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class UdpTable(Generic[V]):
    def __init__(self, *, timeout: float = 60.0, max_sessions: int = 4096) -> None:
        if max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        self.timeout = timeout
        self.max_sessions = max_sessions
        self._items: OrderedDict[Hashable, tuple[V, float]] = OrderedDict()
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable, now: float) -> V | None:
        """The live session for `key` (marked used at `now`), or None."""
        item = self._items.get(key)
        if item is None:
            return None
        if now - item[1] > self.timeout:
            return None  # expired; `expire` hands it back for closing
        self._items[key] = (item[0], now)
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: V, now: float) -> list[V]:
        """Add (or replace) a session; the sessions that had to go (replaced, expired, evicted)."""
        gone: list[V] = []
        old = self._items.pop(key, None)
        if old is not None:
            gone.append(old[0])
        if len(self._items) >= self.max_sessions:
            gone += self.expire(now)
        while len(self._items) >= self.max_sessions:
            _, (v, _) = self._items.popitem(last=False)
            self.evicted += 1
            gone.append(v)
        self._items[key] = (value, now)
        return gone

    def pop(self, key: Hashable) -> V | None:
        item = self._items.pop(key, None)
        return None if item is None else item[0]

    def expire(self, now: float) -> list[V]:
        """Remove sessions idle longer than the timeout (oldest first); hand them back."""
        gone: list[V] = []
        while self._items:
            key, (v, last) = next(iter(self._items.items()))
            if now - last <= self.timeout:
                break  # LRU order: every later one is younger
            del self._items[key]
            self.expired += 1
            gone.append(v)
        return gone

    def clear(self) -> list[V]:
        gone = [v for v, _ in self._items.values()]
        self._items.clear()
        return gone

    def keys(self) -> list[Hashable]:
        return list(self._items)
