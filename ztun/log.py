"""Rate-limited log lines, shared by every module that can log once per event of a flood.

Owns: `RateLimiter` (at most one line per key per interval, the rest counted) and `limited`,
the call sites use: `limited(log, WARNING, key, msg, *args)` writes the line unless one with the
same key was written less than `INTERVAL` seconds ago, and the next line written for the key
says how many were held back. Evictions from full tables, failed accepts and failed UDP
sessions go through it, so a flood of bad input costs a line a second, not a line a packet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable

#: Seconds between two lines of one key.
INTERVAL = 1.0
#: Keys remembered at once (the oldest is forgotten first).
MAX_KEYS = 1024


class RateLimiter:
    def __init__(
        self,
        interval: float = INTERVAL,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        #: key -> (when its last line was written, lines held back since)
        self._keys: dict[Hashable, tuple[float, int]] = {}
        self.suppressed = 0

    def allow(self, key: Hashable) -> int | None:
        """None: hold this line back (counted). Otherwise write it; the number returned is
        how many lines of this key were held back since the last one."""
        now = self.clock()
        seen = self._keys.get(key)
        if seen is not None and now - seen[0] < self.interval:
            self._keys[key] = (seen[0], seen[1] + 1)
            self.suppressed += 1
            return None
        if seen is None and len(self._keys) >= self.max_keys:
            del self._keys[next(iter(self._keys))]
        self._keys.pop(key, None)
        self._keys[key] = (now, 0)
        return 0 if seen is None else seen[1]


#: The limiter every module shares.
LIMITER = RateLimiter()


def limited(logger: logging.Logger, level: int, key: Hashable, msg: str, *args: object) -> bool:
    """Log `msg % args` unless a line with `key` was logged within the interval; True when
    the line was written."""
    if not logger.isEnabledFor(level):
        return False
    held = LIMITER.allow(key)
    if held is None:
        return False
    if held:
        msg += " (%d similar line(s) held back)"
        args = (*args, held)
    logger.log(level, msg, *args)
    return True
