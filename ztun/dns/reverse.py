"""The reverse map (sing-box's `reverse_mapping`): which name an answered address came from,
so a connection made to that address can be routed by domain.

Bounded LRU; an entry lives for the TTL of its answer, and at least MIN_LIFETIME: a client
connects right after its lookup, even when the answer said TTL 0. Pure: time is `now`.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict

import dns.message

from ztun.address import IPAddress
from ztun.dns.message import addresses, question

#: Seconds an entry lives at least, whatever the TTL of its answer.
MIN_LIFETIME = 10.0


def _plain(ip: IPAddress) -> IPAddress:
    # A v4-mapped v6 address is the v4 host, as FlowMeta sees it.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class ReverseMap:
    """address → (domain, expiry), most recently recorded or used last."""

    __slots__ = ("_entries", "capacity")

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = max(1, int(capacity))
        self._entries: OrderedDict[IPAddress, tuple[str, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, ip: IPAddress, domain: str, ttl: int, now: float) -> None:
        domain = domain.lower().rstrip(".")
        if not domain:
            return
        ip = _plain(ip)
        self._entries[ip] = (domain, now + max(float(ttl), MIN_LIFETIME))
        self._entries.move_to_end(ip)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def lookup(self, ip: IPAddress, now: float) -> str | None:
        """The name `ip` was last answered for, or None (unknown, or its TTL ran out)."""
        ip = _plain(ip)
        entry = self._entries.get(ip)
        if entry is None:
            return None
        if now >= entry[1]:
            del self._entries[ip]
            return None
        self._entries.move_to_end(ip)
        return entry[0]

    def record_response(self, response: dns.message.Message, now: float) -> int:
        """Record every A/AAAA answer to the asked name (through CNAMEs) under that name;
        how many were recorded."""
        if not response.question:
            return 0
        name = question(response)[0]
        found = addresses(response)
        for ip, ttl in found:
            self.record(ip, name, ttl, now)
        return len(found) if name else 0
