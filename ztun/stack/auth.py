"""The mixed inbound's users: constant-time checks and failed attempts throttled per source.

Pure (takes `now`), so the bounds are tested without sockets; `inbound/mixed.py` asks it for
every SOCKS5 username/password and HTTP Basic attempt.

Why per source, and what a source is: a guesser works from its own addresses, so failures are
counted per IPv4 address and per IPv6 /64 (one host usually has a whole /64 to pick from).
After `max_failures` failures within `window` seconds a source is refused for `block` seconds
without its guesses being checked, so a right password from it fails too until then; other
sources are not affected. The table holds at most `max_sources` entries: when full, the source
whose last failure is oldest is forgotten (a guesser with more addresses than that can only
make each of them start again from zero failures, never get more than `max_failures` guesses
per address and window).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

#: Failures within WINDOW that block a source.
MAX_FAILURES = 5
WINDOW = 60.0
#: How long a blocked source is refused.
BLOCK = 60.0
#: Sources remembered at once.
MAX_SOURCES = 4096


@dataclass(slots=True)
class _Record:
    failures: int
    first: float
    blocked_until: float = 0.0


def source_key(ip: str) -> str:
    """The unit a guesser is counted in: the IPv4 address, or the IPv6 /64."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if addr.version == 6:
        mapped = addr.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return str(addr)


class UserAuth:
    """Users of one inbound and the failures of the sources that tried them."""

    def __init__(
        self,
        users: Iterable[tuple[str, str]],
        *,
        max_failures: int = MAX_FAILURES,
        window: float = WINDOW,
        block: float = BLOCK,
        max_sources: int = MAX_SOURCES,
    ) -> None:
        self._users = [(u.encode(), p.encode()) for u, p in users]
        self.max_failures = max_failures
        self.window = window
        self.block = block
        self.max_sources = max_sources
        self._sources: OrderedDict[str, _Record] = OrderedDict()
        #: attempts refused unchecked because their source was blocked
        self.throttled = 0
        #: sources forgotten because the table was full
        self.evicted = 0

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    def __len__(self) -> int:
        return len(self._sources)

    def blocked_for(self, ip: str, now: float) -> float:
        """Seconds `ip`'s source stays refused (0: it may try)."""
        rec = self._sources.get(source_key(ip))
        if rec is None or rec.blocked_until <= now:
            return 0.0
        return rec.blocked_until - now

    def check(self, ip: str, username: str, password: str, now: float) -> bool:
        """True when the credentials are right and the source is not blocked; a failure is
        counted. Compares against every user in constant time per user, so neither a user
        name nor a password prefix can be told apart by timing."""
        key = source_key(ip)
        rec = self._sources.get(key)
        if rec is not None and rec.blocked_until > now:
            self.throttled += 1
            return False
        if self._matches(username, password):
            if rec is not None:
                del self._sources[key]
            return True
        self._fail(key, rec, now)
        return False

    def _matches(self, username: str, password: str) -> bool:
        u = username.encode("utf-8", "surrogatepass")
        p = password.encode("utf-8", "surrogatepass")
        found = False
        for name, secret in self._users:
            # `&`, not `and`: both comparisons run for every user.
            found |= hmac.compare_digest(name, u) & hmac.compare_digest(secret, p)
        return found

    def _fail(self, key: str, rec: _Record | None, now: float) -> None:
        if rec is None or now - rec.first > self.window:
            rec = _Record(0, now)
            self._sources[key] = rec
        rec.failures += 1
        self._sources.move_to_end(key)
        if rec.failures >= self.max_failures:
            rec.blocked_until = now + self.block
            rec.failures = 0
            rec.first = now
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
            self.evicted += 1

    def just_blocked(self, ip: str, now: float) -> bool:
        """True right after the failure that blocked `ip` (to log it once)."""
        rec = self._sources.get(source_key(ip))
        return rec is not None and rec.blocked_until == now + self.block
