"""Sniffers: the protocol and domain of a new flow from its first bytes, without I/O.

Owns: the common API the inbounds call once per new flow when a `sniff` rule action asks.

- `sniff_stream(data, sniffers)`: a TCP client's first bytes, everything received so far.
  Answers `Sniffed`, `NEED_MORE` (the bytes are a valid prefix of a ClientHello, an HTTP
  request head or a DNS query: read more and call again with all of them), or None (no enabled
  sniffer can match: stop waiting at once). A verdict never changes as more bytes arrive:
  once `Sniffed` or None, every longer input answers the same. Each sniffer has a hard length
  limit (TLS 16 KiB plus record headers, HTTP 8 KiB, DNS 4 KiB) after which it answers None.
- `sniff_datagram(data, sniffers)`: a UDP flow's first datagram → `Sniffed` or None.
- `DatagramSniffer`: the same over a flow's first few datagrams, for a QUIC ClientHello that
  spans several Initial packets (its `feed` may answer `NEED_MORE`).

`sniffers` holds sing-box sniffer names; the ones ztun does not implement (stun, bittorrent,
…) are ignored, so they simply never match. Nothing here raises on any input bytes.

Cost: a first byte that rules out every enabled sniffer is answered in about 0.2 µs (one
dispatch on that byte), a datagram that is neither an Initial nor a query in about 1 µs; the
per-protocol figures are in each module's docstring.
"""

from __future__ import annotations

from collections.abc import Collection

from ztun.sniff import dns, http, quic, tls
from ztun.sniff.result import NEED_MORE, NeedMore, Sniffed, StreamResult

__all__ = [
    "ALL",
    "NEED_MORE",
    "DatagramSniffer",
    "NeedMore",
    "Sniffed",
    "StreamResult",
    "sniff_datagram",
    "sniff_stream",
]

ALL: frozenset[str] = frozenset({"tls", "http", "quic", "dns"})


def sniff_stream(data: bytes, sniffers: Collection[str] = ALL) -> StreamResult:
    """A TCP client's first bytes → `Sniffed`, `NEED_MORE` or None (see the module doc)."""
    if not data:
        return NEED_MORE if any(s in sniffers for s in ("tls", "http", "dns")) else None
    # The first byte picks at most one candidate: TLS 0x16, an HTTP method's letter, or the
    # high byte (< 0x10) of a DNS length, so one sniffer runs and the rest cost nothing.
    first = data[0]
    if first == tls.CONTENT_HANDSHAKE:
        return tls.sniff_stream(data) if "tls" in sniffers else None
    if first in http.FIRST_BYTES:
        return http.sniff_stream(data) if "http" in sniffers else None
    if first < dns.MAX_TCP_QUERY >> 8:
        return dns.sniff_stream(data) if "dns" in sniffers else None
    return None


def sniff_datagram(data: bytes, sniffers: Collection[str] = ALL) -> Sniffed | None:
    """A UDP flow's first datagram → `Sniffed` or None. A QUIC Initial whose ClientHello goes
    on in the next datagram is `Sniffed("quic", None)`: use `DatagramSniffer` for its SNI."""
    if "quic" in sniffers:
        found = quic.sniff_datagram(data)
        if found is not None:
            return found
    if "dns" in sniffers:
        return dns.sniff_datagram(data)
    return None


class DatagramSniffer:
    """One UDP flow's first datagrams → `Sniffed`, `NEED_MORE` (feed the next datagram) or None.

    DNS is decided on the first datagram; QUIC may take up to `quic.MAX_DATAGRAMS`. After a
    final answer, `feed` returns it again."""

    __slots__ = ("_dns", "_done", "_first", "_quic")

    def __init__(self, sniffers: Collection[str] = ALL) -> None:
        self._quic = quic.QuicSniffer() if "quic" in sniffers else None
        self._dns = "dns" in sniffers
        self._done: StreamResult = NEED_MORE
        self._first = True

    def feed(self, datagram: bytes) -> StreamResult:
        if self._done is not NEED_MORE:
            return self._done
        result: StreamResult = None
        if self._quic is not None:
            result = self._quic.feed(datagram)
        if result is None and self._dns and self._first:
            result = dns.sniff_datagram(datagram)
        self._first = False
        self._done = result
        return result
