"""IPv4 fragment reassembly, bounded in datagrams, fragments per datagram, bytes and time.

A set that would reassemble to more than 65535 bytes (the IPv4 total length field's limit,
with the first fragment's header counted) is dropped as soon as a fragment shows it, and its
bytes are forgotten at once (`Drop.FRAGMENT_OVERSIZE`).

Overlapping fragments drop the whole datagram (as RFC 5722 asks for IPv6; the classic overlap
attacks make the same the safe choice for IPv4). Time comes in as `now` (seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ztun.packet.checksum import Buffer, checksum
from ztun.packet.ip import Drop, IPHeader

MF = 0x2000


@dataclass(slots=True)
class _Partial:
    started: float
    header: bytes | None = None  # the first fragment's IP header
    parts: dict[int, bytes] = field(default_factory=dict)  # offset -> data
    total: int | None = None  # payload length, known once the last fragment came
    size: int = 0
    high: int = 0  # where the furthest fragment so far ends


class Reassembler:
    def __init__(
        self,
        *,
        max_datagrams: int = 64,
        max_fragments: int = 64,
        max_bytes: int = 4 * 1024 * 1024,
        timeout: float = 10.0,
    ) -> None:
        self.max_datagrams = max_datagrams
        self.max_fragments = max_fragments
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.bytes = 0
        self._pending: dict[tuple[bytes, bytes, int, int], _Partial] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def expire(self, now: float) -> int:
        """Forget datagrams older than the timeout; how many were dropped."""
        old = [k for k, p in self._pending.items() if now - p.started > self.timeout]
        for k in old:
            self._forget(k)
        return len(old)

    def _forget(self, key: tuple[bytes, bytes, int, int]) -> None:
        p = self._pending.pop(key, None)
        if p is not None:
            self.bytes -= p.size

    def push(self, buf: Buffer, h: IPHeader, now: float) -> bytes | Drop | None:
        """Add one fragment; the whole packet once complete, None while waiting, or Drop."""
        if h.version != 4 or not h.frag:
            return Drop.FRAGMENT
        ident = (buf[4] << 8) | buf[5]
        key = (h.src, h.dst, h.proto, ident)
        offset = (h.frag & 0x1FFF) * 8
        more = bool(h.frag & MF)
        data = bytes(buf[h.l4 : h.end])
        if (more and len(data) % 8) or not data:
            self._forget(key)
            return Drop.FRAGMENT
        end = offset + len(data)
        p = self._pending.get(key)
        # The datagram gets the first fragment's header: until that came, at least 20 bytes.
        if offset == 0:
            header_len = h.l4
        else:
            header_len = len(p.header) if p is not None and p.header is not None else 20
        if end > 65535 - header_len or (offset == 0 and p is not None and p.high > 65535 - h.l4):
            # Could never be a valid IP packet: drop the whole set now rather than hold its
            # bytes until the timeout.
            self._forget(key)
            return Drop.FRAGMENT_OVERSIZE
        if p is None:
            if len(self._pending) >= self.max_datagrams:
                self.expire(now)
                if len(self._pending) >= self.max_datagrams:
                    return Drop.FRAGMENT_LIMIT
            p = self._pending[key] = _Partial(now)
        elif now - p.started > self.timeout:
            self._forget(key)
            return Drop.FRAGMENT_TIMEOUT
        if len(p.parts) >= self.max_fragments or self.bytes + len(data) > self.max_bytes:
            self._forget(key)
            return Drop.FRAGMENT_LIMIT
        if offset in p.parts or (not more and p.total is not None):
            self._forget(key)
            return Drop.FRAGMENT
        p.parts[offset] = data
        p.size += len(data)
        if end > p.high:
            p.high = end
        self.bytes += len(data)
        if offset == 0:
            p.header = bytes(buf[: h.l4])
        if not more:
            p.total = offset + len(data)
        if p.total is None or p.header is None:
            return None
        return self._assemble(key, p)

    def _assemble(self, key: tuple[bytes, bytes, int, int], p: _Partial) -> bytes | Drop | None:
        assert p.total is not None and p.header is not None
        if any(off + len(d) > p.total for off, d in p.parts.items()):
            self._forget(key)
            return Drop.FRAGMENT  # data beyond the last fragment
        pos = 0
        chunks = []
        for off in sorted(p.parts):
            if off > pos:
                return None  # a gap: wait for more
            if off < pos:
                self._forget(key)
                return Drop.FRAGMENT  # overlap
            chunks.append(p.parts[off])
            pos = off + len(p.parts[off])
        if pos != p.total:
            self._forget(key)
            return Drop.FRAGMENT
        self._forget(key)
        hdr = bytearray(p.header)
        total = len(hdr) + pos
        if total > 0xFFFF:  # push() refuses such sets early; kept as the last word
            return Drop.FRAGMENT_OVERSIZE
        hdr[2], hdr[3] = total >> 8, total & 0xFF
        hdr[6] &= 0x40  # keep DF, clear MF and the offset
        hdr[7] = 0
        hdr[10] = hdr[11] = 0
        c = checksum(hdr)
        hdr[10], hdr[11] = c >> 8, c & 0xFF
        return bytes(hdr) + b"".join(chunks)
