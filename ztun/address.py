"""Addresses as every layer sees them: `Address` (host and port of a flow's destination),
`IPAddress`, and the one check of a host name a peer sent. Pure: no I/O.

`host` is an IP literal (no brackets) or a domain name, as a SOCKS5 request, an HTTP proxy
request or a TUN packet names it.

Names from peers (`name_problem`, `peer_host`): every parser that takes a host name from the
network (SOCKS5, SOCKS4a, the HTTP proxy's target and Host, the sniffers; DNS questions,
bounded by their wire format, are checked in `ztun.dns.message`) refuses, before anything
else looks at it, a name that no DNS name can be: longer than 253 bytes (one trailing root
dot not counted), an empty label (`a..b`, a leading dot), a label longer than 63 bytes, and
any byte that is not printable ASCII or is a space. Non-ASCII names are refused, not
converted: a client sends IDNA A-labels (`xn--…`, as curl and browsers do), which pass as
they are and are not decoded.
(sing-box hands the bytes on as a string and leaves them to its resolver or the next proxy;
registered names are A-labels, so raw UTF-8 finds no host: ztun answers at once, and counts it.)
Other characters (`_`, `*`, …) are allowed: the resolver or the proxy behind decides.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from ztun.errors import BadNameError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: RFC 1035 §2.3.4: 255 bytes in wire form, so 253 in text without the root dot.
MAX_NAME = 253
MAX_LABEL = 63
#: No IP literal a peer can use is longer: 45 for the longest IPv6 form, then "%" and a
#: scope (an interface name is at most 15 bytes on Linux). Longer text is never an IP and is
#: never a cache key (the caches of IP parsing hold keys of at most this length).
MAX_IP_TEXT = 64
_NOT_PRINTABLE = re.compile(rb"[^\x21-\x7e]")

#: Host names refused, by where they came from ("socks5", "socks4a", "http", "dns-query",
#: "sniff-tls", …; docs/security.md lists them): one process-wide tally, read by tests (and,
#: later, an API).
NAME_REFUSALS: Counter[str] = Counter()


def name_problem(name: bytes | str) -> str | None:
    """Why `name` cannot be a host name, in a few words, or None when it can (see the module
    doc). Never raises; linear in the input and stops at the first 255 bytes' worth."""
    if isinstance(name, str):
        if len(name) > MAX_NAME + 1:  # before any work proportional to the input
            return f"longer than {MAX_NAME} bytes"
        if not name.isascii():
            return "not ASCII (IDNA names go as xn-- A-labels)"
        raw = name.encode("ascii")
    elif isinstance(name, bytes | bytearray | memoryview):
        raw = bytes(name[: MAX_NAME + 2])
        if len(name) > MAX_NAME + 1:
            return f"longer than {MAX_NAME} bytes"
        if not raw.isascii():
            return "not ASCII (IDNA names go as xn-- A-labels)"
    else:
        return "not text"
    if raw.endswith(b"."):
        raw = raw[:-1]  # the root label: "example.com." is absolute, and fine
    if not raw:
        return "empty"
    if len(raw) > MAX_NAME:
        return f"longer than {MAX_NAME} bytes"
    bad = _NOT_PRINTABLE.search(raw)
    if bad is not None:
        return "has a space" if bad.group() == b" " else f"has the byte {raw[bad.start()]:#04x}"
    for label in raw.split(b"."):
        if not label:
            return "has an empty label"
        if len(label) > MAX_LABEL:
            return f"has a label longer than {MAX_LABEL} bytes"
    return None


def peer_host(raw: bytes | str, where: str) -> str:
    """`raw` as a host (name or IP literal text), or BadNameError (counted in NAME_REFUSALS
    under `where`) when `name_problem` finds one."""
    problem = name_problem(raw)
    if problem is not None:
        NAME_REFUSALS[where] += 1
        raise BadNameError(f"{where}: host name {problem}")
    return raw if isinstance(raw, str) else bytes(raw).decode("ascii")


def clip(text: object, limit: int = 256) -> str:
    """`text` for a log line or message, at most `limit` characters: what a peer sent (names,
    HTTP lines, user names) can be 64 KiB long, and a log line must not be."""
    s = text if isinstance(text, str) else str(text)
    if len(s) <= limit:
        return s
    return f"{s[: limit - 20]}…(+{len(s) - limit + 20} chars)"


def ip_or_none(text: str) -> IPAddress | None:
    """`text` as an IP address, or None for a domain. Cached for short text only: every flow
    builds or checks an address, and the same hosts come back (IP objects are immutable, so
    sharing is safe); a long host is never an IP and must not become a cache key."""
    if len(text) > MAX_IP_TEXT:
        return None
    return _ip_or_none(text)


@lru_cache(maxsize=4096)
def _ip_or_none(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback IP literal (an IPv4-mapped IPv6 one too): a listener
    there is reachable from this host only. A name, `localhost` included, is not."""
    ip = ip_or_none(host)
    if ip is None:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


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
