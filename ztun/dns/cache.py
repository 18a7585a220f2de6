"""The DNS answer cache: bounded, LRU, with TTLs aged by the time an answer spent here.

Keys are (server, name, qtype, qclass); the server part is "" unless the cache is
`independent` (sing-box's `independent_cache`: each server keeps its own answers, so a name
answered by one server is never served for a rule that chose another).

Two bounds: `capacity` entries in all, and `per_server` entries stored by any one server, so a
server flooded with unique names (a client walking random subdomains) evicts its own entries
and not everyone else's. Without an explicit `per_server` the share is `capacity` divided by
the number of servers that have entries, recomputed as servers come and go.

Entries are wire bytes. The fast path (`put_wire`/`get_wire`) keeps an upstream answer's own
bytes and where its TTLs sit, so a hit is a copy with the id and TTLs patched (no dnspython);
`get` parses a fresh Message, so callers may change what they get (its id, TTLs) without
touching the cache. Either kind of entry serves either kind of lookup. Pure: time comes in as
`now` (seconds, any epoch).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.rcode

from ztun.dns import wire as dnswire
from ztun.dns.message import min_ttl

CacheKey = tuple[str, str, int, int]

_CACHEABLE_RCODES = frozenset({dns.rcode.NOERROR, dns.rcode.NXDOMAIN})


@dataclass(slots=True)
class _Entry:
    wire: bytes
    server: str
    stored_at: float
    expires: float
    #: where the TTLs are in `wire` (put_wire), None for a rendered Message (put)
    ttl_offsets: tuple[int, ...] | None = None


class DnsCache:
    """Answers by (server, name, qtype, qclass) until their TTL runs out."""

    __slots__ = (
        "_by_server", "_entries", "capacity", "evicted", "hits", "independent", "misses",
        "per_server",
    )  # fmt: skip

    def __init__(
        self, capacity: int, *, independent: bool = False, per_server: int | None = None
    ) -> None:
        self.capacity = max(0, int(capacity))
        self.independent = independent
        #: fixed per-server bound, or None for an even share among the servers present
        self.per_server = None if per_server is None else max(1, int(per_server))
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        #: per server, its keys in LRU order (the values are unused)
        self._by_server: dict[str, OrderedDict[CacheKey, None]] = {}
        self.hits = 0
        self.misses = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _key(self, server: str, name: str, qtype: int, qclass: int) -> CacheKey:
        return (server if self.independent else "", name.lower().rstrip("."), qtype, qclass)

    def _remove(self, key: CacheKey) -> None:
        entry = self._entries.pop(key)
        owned = self._by_server[entry.server]
        del owned[key]
        if not owned:
            del self._by_server[entry.server]

    def _share(self, server: str) -> int:
        if self.per_server is not None:
            return self.per_server
        servers = len(self._by_server) + (server not in self._by_server)
        return max(1, self.capacity // max(1, servers))

    def get(
        self, server: str, name: str, qtype: int, qclass: int, now: float
    ) -> dns.message.Message | None:
        """A copy of the cached answer with every TTL lowered by its age, or None.

        The copy's id is 0: the caller sets the id of the query it answers.
        """
        entry = self._hit(self._key(server, name, qtype, qclass), now)
        if entry is None:
            return None
        msg = dns.message.from_wire(entry.wire)
        msg.id = 0
        age = max(0, int(now - entry.stored_at))
        for section in (msg.answer, msg.authority, msg.additional):
            for rrset in section:
                rrset.ttl = max(0, rrset.ttl - age)
        return msg

    def get_wire(
        self, server: str, name: str, qtype: int, qclass: int, now: float, qid: int
    ) -> bytes | None:
        """`get` as wire bytes with id `qid`: the stored bytes with their TTLs aged in place."""
        entry = self._hit(self._key(server, name, qtype, qclass), now)
        if entry is None:
            return None
        age = max(0, int(now - entry.stored_at))
        if entry.ttl_offsets is None:  # stored by `put`: age it the dnspython way
            msg = dns.message.from_wire(entry.wire)
            msg.id = qid
            for section in (msg.answer, msg.authority, msg.additional):
                for rrset in section:
                    rrset.ttl = max(0, rrset.ttl - age)
            return bytes(msg.to_wire())
        return dnswire.aged(entry.wire, entry.ttl_offsets, age, qid)

    def _hit(self, key: CacheKey, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if now >= entry.expires:
            self._remove(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self._by_server[entry.server].move_to_end(key)
        self.hits += 1
        return entry

    def put(
        self,
        server: str,
        name: str,
        qtype: int,
        qclass: int,
        response: dns.message.Message,
        now: float,
    ) -> bool:
        """Store `response` for its smallest TTL; True when stored.

        Not stored: a zero TTL, a failure (SERVFAIL, REFUSED, ...), a truncated answer, or a
        cache of capacity 0. Negative answers live for their SOA's negative TTL (capped).
        """
        if self.capacity == 0 or response.rcode() not in _CACHEABLE_RCODES:
            return False
        if response.flags & dns.flags.TC:
            return False
        ttl = min_ttl(response)
        if ttl <= 0:
            return False
        try:
            saved_id = response.id
            response.id = 0
            try:
                wire = bytes(response.to_wire())
            finally:
                response.id = saved_id
        except Exception:  # a message that does not render is not worth keeping
            return False
        self._store(
            server, self._key(server, name, qtype, qclass), _Entry(wire, server, now, now + ttl)
        )
        return True

    def put_wire(
        self,
        server: str,
        name: str,
        qtype: int,
        qclass: int,
        wire: bytes,
        scan: dnswire.Scan,
        now: float,
    ) -> bool:
        """`put` for an answer as it came (`scan` is what `wire.scan_response` read of it):
        the same rules, the bytes kept as they are."""
        if self.capacity == 0 or scan.rcode not in _CACHEABLE_RCODES or scan.truncated:
            return False
        if scan.min_ttl <= 0:
            return False
        entry = _Entry(bytes(wire), server, now, now + scan.min_ttl, scan.ttl_offsets)
        self._store(server, self._key(server, name, qtype, qclass), entry)
        return True

    def _store(self, server: str, key: CacheKey, entry: _Entry) -> None:
        if key in self._entries:
            self._remove(key)
        self._entries[key] = entry
        self._by_server.setdefault(server, OrderedDict())[key] = None
        owned = self._by_server[server]
        share = self._share(server)
        while len(owned) > share:
            self._remove(next(iter(owned)))
            self.evicted += 1
        while len(self._entries) > self.capacity:
            self._remove(next(iter(self._entries)))
            self.evicted += 1

    def purge(self, now: float) -> int:
        """Drop every expired entry; how many went (an LRU walk keeps memory honest between
        hits, which alone only drop the expired entries they touch)."""
        stale = [k for k, e in self._entries.items() if now >= e.expires]
        for key in stale:
            self._remove(key)
        return len(stale)

    def clear(self) -> None:
        self._entries.clear()
        self._by_server.clear()
