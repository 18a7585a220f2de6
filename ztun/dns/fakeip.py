"""The FakeIP pool: a private address per domain, handed out instead of the real ones, and
the way back from that address to the domain when a connection arrives.

Each family has its own table, bounded by its range and by MAX_PER_FAMILY. New domains take
the next never-used address (the network address, and IPv4's broadcast, are skipped); once
every address is taken, the least recently used domain gives its address up. Allocating or
looking up a domain marks it used. `dump`/`load` carry the tables across restarts.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any

from ztun.address import IPAddress

#: Addresses per family at most, whatever the range: a /15 of IPv4 or a /18 of IPv6 would
#: otherwise allow a table of millions of domains.
MAX_PER_FAMILY = 65536
STATE_VERSION = 1

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Family:
    """One range and its domain ↔ address table."""

    __slots__ = ("by_domain", "by_ip", "first", "next_offset", "range", "size")

    def __init__(self, network: IPNetwork) -> None:
        self.range = network
        hosts = network.num_addresses
        first = int(network.network_address)
        if network.version == 4 and network.prefixlen < 31:
            first, hosts = first + 1, hosts - 2  # no network, no broadcast address
        elif network.version == 6 and network.prefixlen < 127:
            first, hosts = first + 1, hosts - 1  # no subnet-router anycast address
        self.first = first
        self.size = max(0, min(hosts, MAX_PER_FAMILY))
        #: address → domain, least recently used first
        self.by_ip: OrderedDict[IPAddress, str] = OrderedDict()
        self.by_domain: dict[str, IPAddress] = {}
        #: offset of the next address never handed out
        self.next_offset = 0

    def address(self, offset: int) -> IPAddress:
        value = self.first + offset
        if self.range.version == 4:
            return ipaddress.IPv4Address(value)
        return ipaddress.IPv6Address(value)

    def usable(self, ip: IPAddress) -> bool:
        return ip.version == self.range.version and 0 <= int(ip) - self.first < self.size

    def allocate(self, domain: str) -> IPAddress:
        ip = self.by_domain.get(domain)
        if ip is not None:
            self.by_ip.move_to_end(ip)
            return ip
        if self.size == 0:
            raise ValueError(f"the FakeIP range {self.range} has no usable address")
        ip = None
        while self.next_offset < self.size:
            candidate = self.address(self.next_offset)
            self.next_offset += 1
            if candidate not in self.by_ip:  # taken only after a load()
                ip = candidate
                break
        if ip is None:
            ip, old = self.by_ip.popitem(last=False)
            del self.by_domain[old]
        self.by_ip[ip] = domain
        self.by_domain[domain] = ip
        return ip

    def lookup(self, ip: IPAddress) -> str | None:
        domain = self.by_ip.get(ip)
        if domain is not None:
            self.by_ip.move_to_end(ip)
        return domain

    def dump(self) -> dict[str, Any]:
        return {
            "range": str(self.range),
            "next": self.next_offset,
            "entries": [[str(ip), d] for ip, d in self.by_ip.items()],
        }

    def load(self, state: Any) -> bool:
        """Take the tables of `state` if it was made for this range and holds only
        addresses of it; False (and nothing taken) otherwise."""
        if not isinstance(state, dict) or state.get("range") != str(self.range):
            return False
        entries, nxt = state.get("entries"), state.get("next")
        if not isinstance(entries, list) or not isinstance(nxt, int) or isinstance(nxt, bool):
            return False
        by_ip: OrderedDict[IPAddress, str] = OrderedDict()
        by_domain: dict[str, IPAddress] = {}
        for entry in entries[: self.size]:
            if not (isinstance(entry, list) and len(entry) == 2):
                return False
            text, domain = entry
            if not isinstance(text, str) or not isinstance(domain, str) or not domain:
                return False
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                return False
            if not self.usable(ip) or ip in by_ip or domain in by_domain:
                return False
            by_ip[ip] = domain
            by_domain[domain] = ip
        self.by_ip, self.by_domain = by_ip, by_domain
        self.next_offset = max(0, min(nxt, self.size))
        return True


def _normal(domain: str) -> str:
    return domain.lower().rstrip(".")


class FakeIPPool:
    """sing-box's `fakeip` server state: inet4_range and inet6_range (either may be None)."""

    __slots__ = ("_families",)

    def __init__(
        self,
        inet4_range: ipaddress.IPv4Network | None,
        inet6_range: ipaddress.IPv6Network | None,
    ) -> None:
        self._families: dict[int, _Family] = {}
        for version, network in ((4, inet4_range), (6, inet6_range)):
            if network is not None:
                if network.version != version:
                    raise ValueError(f"{network} is not an IPv{version} range")
                self._families[version] = _Family(network)

    @property
    def ranges(self) -> tuple[IPNetwork | None, IPNetwork | None]:
        """(inet4_range, inet6_range), as built."""
        v4, v6 = self._families.get(4), self._families.get(6)
        return (v4.range if v4 else None, v6.range if v6 else None)

    def supports(self, version: int) -> bool:
        """The pool has a range of this IP version (4 or 6) with an address in it."""
        family = self._families.get(version)
        return family is not None and family.size > 0

    def allocate(self, domain: str, version: int) -> IPAddress:
        """The address of `domain` in the family `version`: the same one while the domain
        keeps it, else a new one. ValueError when the pool has no range of that version."""
        family = self._families.get(version)
        if family is None:
            raise ValueError(f"no inet{version}_range for FakeIP addresses")
        return family.allocate(_normal(domain))

    def lookup(self, ip: IPAddress) -> str | None:
        """The domain `ip` was handed out for, or None."""
        family = self._families.get(ip.version)
        return None if family is None else family.lookup(ip)

    def contains(self, ip: IPAddress) -> bool:
        """`ip` lies in one of the pool's ranges (handed out or not): such a destination is
        fake, and must never be connected to as it is."""
        family = self._families.get(ip.version)
        return family is not None and ip in family.range

    def __len__(self) -> int:
        return sum(len(f.by_ip) for f in self._families.values())

    def dump(self) -> dict[str, Any]:
        """The tables as JSON-able data, for `load` after a restart."""
        state: dict[str, Any] = {"version": STATE_VERSION}
        for version, family in self._families.items():
            state[f"inet{version}"] = family.dump()
        return state

    @classmethod
    def load(
        cls,
        state: Any,
        inet4_range: ipaddress.IPv4Network | None,
        inet6_range: ipaddress.IPv6Network | None,
    ) -> FakeIPPool:
        """A pool over these ranges with the tables of `state` where they fit: a family whose
        saved range differs, or whose saved data is damaged, starts empty. Never raises on
        `state` (it comes from a file)."""
        pool = cls(inet4_range, inet6_range)
        if isinstance(state, dict) and state.get("version") == STATE_VERSION:
            for version, family in pool._families.items():
                family.load(state.get(f"inet{version}"))
        return pool
