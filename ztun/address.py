"""Addresses as every layer sees them: `Address` (host and port of a flow's destination) and
`IPAddress`. Pure: no I/O.

`host` is an IP literal (no brackets) or a domain name, as a SOCKS5 request, an HTTP proxy
request or a TUN packet names it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@lru_cache(maxsize=4096)
def ip_or_none(text: str) -> IPAddress | None:
    """`text` as an IP address, or None for a domain. Cached: every flow builds or checks an
    address, and the same hosts come back (IP objects are immutable, so sharing is safe)."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Address:
    """Where a flow goes: `host` is an IP literal (no brackets) or a domain name."""

    host: str
    port: int

    @property
    def is_domain(self) -> bool:
        return ip_or_none(self.host) is None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
