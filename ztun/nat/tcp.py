"""The system-stack TCP NAT: lets the kernel's own TCP stack terminate every flow of the TUN.

With TUN address A, a second address B (= A+1, "the fake peer") and a kernel listener on A:P,
a flow S:sp → D:dp seen on the TUN is given a port n, and each of its segments is rewritten to
B:n → A:P and written back into the TUN. The kernel answers from A:P to B:n, which routes
into the TUN again; those segments are rewritten back to D:dp → S:sp. The listener's accepted
socket has peer B:n, and `lookup(n)` gives back the original four-tuple.

Only addresses, ports and checksums change. The checksum adjustments (RFC 1624) are the same
for every segment of a flow, so they are computed once per flow; the per-segment work is two
slice assignments and two 16-bit adds. Time comes in as `now`.

Bounds: a flow whose handshake never completes (the kernel never accepted it: `lookup` was
never asked for its port) is forgotten after `handshake_timeout` seconds, an idle open one after
`timeout`. Half-open entries are also kept in creation order, so that a full table (a SYN flood)
costs O(1) per new SYN: the oldest half-open entry is evicted, never a scan of the table.

With TUN offload a segment may carry an unfinished checksum (`partial`, virtio-net
NEEDS_CSUM): its TCP checksum field then holds the non-complemented pseudo-header sum, which
moves by the address adjustment alone (see ztun.packet.virtio); the ports are summed later.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ztun.packet.checksum import delta, words
from ztun.packet.ip import Drop

FORWARD = 0
"""`translate`: the buffer was rewritten in place; write it back into the TUN."""
NEW = -1
"""`translate`: a SYN of an unknown flow; decide, then `add` it and translate again."""

_SYN, _RST, _FIN, _ACK = 0x02, 0x04, 0x01, 0x10

# Indexes into a flow entry (a list, so the hot path indexes instead of attribute lookups).
_PORT, _FWD_ADDRS, _FWD_PORTS, _FWD_IP, _FWD_TCP = 0, 1, 2, 3, 4
_REV_ADDRS, _REV_PORTS, _REV_IP, _REV_TCP, _LAST, _KEY, _CTX, _FINS = 5, 6, 7, 8, 9, 10, 11, 12


class NatEntry:
    """What `lookup` returns: the original four-tuple of an accepted connection."""

    __slots__ = ("ctx", "dport", "dst", "sport", "src")

    def __init__(self, src: bytes, sport: int, dst: bytes, dport: int, ctx: Any) -> None:
        self.src, self.sport, self.dst, self.dport, self.ctx = src, sport, dst, dport, ctx


class TcpNat:
    """One address family's NAT between the TUN and a kernel listener on `local`:`port`."""

    def __init__(
        self,
        local: bytes,
        peer: bytes,
        port: int,
        *,
        first_port: int = 10000,
        last_port: int = 65535,
        timeout: float = 330.0,
        closing_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        max_flows: int | None = None,
    ) -> None:
        if len(local) not in (4, 16) or len(peer) != len(local):
            raise ValueError("local and peer must be two addresses of one family")
        self.local, self.peer, self.port = bytes(local), bytes(peer), port
        self.v4 = len(local) == 4
        self.first_port, self.last_port = first_port, last_port
        self.timeout = timeout
        self.closing_timeout = closing_timeout
        self.handshake_timeout = handshake_timeout
        capacity = last_port - first_port + 1
        self.max_flows = min(max_flows or capacity, capacity)
        self._next = first_port
        self._flows: dict[bytes, list[Any]] = {}  # src+dst+sport+dport bytes -> entry
        self._ports: dict[int, list[Any]] = {}  # n -> entry
        self._port_bytes = port.to_bytes(2, "big")
        #: half-open flows (not yet accepted by the kernel listener), oldest first: port ->
        #: creation time. Same timeout for all, so the front is always the next to expire.
        self._half_open: OrderedDict[int, float] = OrderedDict()
        #: flows evicted from a full table, and half-open ones whose handshake timed out
        self.evicted = 0
        self.handshake_expired = 0

    def __len__(self) -> int:
        return len(self._flows)

    # -- the per-packet path --------------------------------------------------------------

    def translate(self, buf: bytearray, size: int, now: float, partial: int = 0) -> int:
        """Rewrite the TCP packet `buf[:size]` in place: FORWARD, NEW, or a Drop reason.
        `partial` (non-zero): the TCP checksum field holds a partial sum (virtio NEEDS_CSUM)."""
        if self.v4:
            if size < 40:
                return Drop.TRUNCATED
            ihl = (buf[0] & 0x0F) << 2
            if ihl < 20 or ((buf[2] << 8) | buf[3]) > size or size < ihl + 20:
                return Drop.BAD_HEADER
            if ((buf[6] << 8) | buf[7]) & 0x3FFF:
                return Drop.FRAGMENT
            t = ihl
            a0, a1 = 12, 20
        else:
            if size < 60:
                return Drop.TRUNCATED
            if 40 + ((buf[4] << 8) | buf[5]) > size:
                return Drop.BAD_LENGTH
            t = 40
            a0, a1 = 8, 40
        ports = buf[t : t + 4]
        if (
            buf[a1 - len(self.local) : a1] == self.peer
            and ports[:2] == self._port_bytes
            and (buf[a0 : a0 + len(self.local)] == self.local)
        ):
            # The listener's side: back to the original peer.
            e = self._ports.get((ports[2] << 8) | ports[3])
            if e is None:
                return Drop.NO_FLOW
            buf[a0:a1] = e[_REV_ADDRS]
            buf[t : t + 4] = e[_REV_PORTS]
            d_ip, d_tcp = e[_REV_IP], e[_REV_TCP]
            fin_bit = 2
        else:
            key = bytes(buf[a0:a1]) + ports
            e = self._flows.get(key)
            if e is None or (e[_FINS] and buf[t + 13] & (_SYN | _ACK | _RST) == _SYN):
                if e is not None:
                    # The four-tuple is reused after a close: a fresh port, so the new SYN
                    # never meets the old connection's state in the kernel.
                    self.remove(e[_PORT])
                flags = buf[t + 13]
                if flags & (_SYN | _ACK | _RST) == _SYN:
                    return NEW
                return Drop.NO_FLOW
            buf[a0:a1] = e[_FWD_ADDRS]
            buf[t : t + 4] = e[_FWD_PORTS]
            d_ip, d_tcp = e[_FWD_IP], e[_FWD_TCP]
            fin_bit = 1
        e[_LAST] = now
        if self.v4:
            c = (~((buf[10] << 8) | buf[11]) & 0xFFFF) + d_ip
            c = (c & 0xFFFF) + (c >> 16)
            c = ~((c & 0xFFFF) + (c >> 16)) & 0xFFFF
            buf[10] = c >> 8
            buf[11] = c & 0xFF
        o = t + 16
        if partial:
            c = ((buf[o] << 8) | buf[o + 1]) + d_ip
            c = (c & 0xFFFF) + (c >> 16)
            c = (c & 0xFFFF) + (c >> 16)
        else:
            c = (~((buf[o] << 8) | buf[o + 1]) & 0xFFFF) + d_tcp
            c = (c & 0xFFFF) + (c >> 16)
            c = ~((c & 0xFFFF) + (c >> 16)) & 0xFFFF
        buf[o] = c >> 8
        buf[o + 1] = c & 0xFF
        flags = buf[t + 13]
        if flags & (_FIN | _RST):
            # Keep a closing flow a little for the last ACKs and retransmissions.
            e[_FINS] |= 3 if flags & _RST else fin_bit
        return FORWARD

    # -- flows ----------------------------------------------------------------------------

    def add(
        self, src: bytes, sport: int, dst: bytes, dport: int, now: float, ctx: Any = None
    ) -> int | Drop:
        """Give the flow src:sport → dst:dport a port; the port, or Drop.NAT_FULL."""
        key = src + dst + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
        old = self._flows.get(key)
        if old is not None:
            return int(old[_PORT])
        if len(self._flows) >= self.max_flows and not self._make_room(now):
            return Drop.NAT_FULL
        n = self._free_port()
        if n is None:
            return Drop.NAT_FULL
        nb = n.to_bytes(2, "big")
        fwd_addrs = self.peer + self.local
        fwd_ports = nb + self._port_bytes
        rev_addrs = dst + src
        rev_ports = key[-2:] + key[-4:-2]
        old_addrs = words(src + dst)
        new_addrs = words(fwd_addrs)
        old_ports = [sport, dport]
        new_ports = [n, self.port]
        listener_addrs = words(self.local + self.peer)  # what the listener's replies carry
        e: list[Any] = [
            n,
            fwd_addrs,
            fwd_ports,
            delta(old_addrs, new_addrs),
            delta(old_addrs + old_ports, new_addrs + new_ports),
            rev_addrs,
            rev_ports,
            delta(listener_addrs, words(rev_addrs)),
            delta([*listener_addrs, self.port, n], [*words(rev_addrs), dport, sport]),
            now,
            key,
            ctx,
            0,
        ]
        self._flows[key] = e
        self._ports[n] = e
        self._half_open[n] = now
        return n

    def _make_room(self, now: float) -> bool:
        """Free one slot without scanning the table: half-open flows past their handshake
        timeout go first, else the oldest half-open one is evicted. False: every flow is an
        accepted connection (those are only ever dropped by `expire`)."""
        self._expire_half_open(now)
        if len(self._flows) < self.max_flows:
            return True
        if not self._half_open:
            return False
        n, _ = self._half_open.popitem(last=False)
        self._drop(n)
        self.evicted += 1
        self._next = n  # so that `_free_port` finds the freed port without a walk
        return True

    def _expire_half_open(self, now: float) -> list[Any]:
        gone = []
        limit = now - self.handshake_timeout
        half = self._half_open
        while half:
            n, created = next(iter(half.items()))
            if created > limit:
                break
            del half[n]
            e = self._drop(n)
            if e is not None:
                self.handshake_expired += 1
                gone.append(e[_CTX])
        return gone

    def _drop(self, port: int) -> list[Any] | None:
        e = self._ports.pop(port, None)
        if e is not None:
            self._flows.pop(e[_KEY], None)
        return e

    def _free_port(self) -> int | None:
        span = self.last_port - self.first_port + 1
        for _ in range(span):
            n = self._next
            self._next = n + 1 if n < self.last_port else self.first_port
            if n not in self._ports:
                return n
        return None

    def lookup(self, port: int) -> NatEntry | None:
        """The original flow behind the listener's peer port `port`. Asked when the listener
        accepted it, so the flow's handshake is complete: from now on only `timeout` applies."""
        e = self._ports.get(port)
        if e is None:
            return None
        self._half_open.pop(port, None)
        key: bytes = e[_KEY]
        k = len(self.local)
        return NatEntry(
            key[:k],
            int.from_bytes(key[2 * k : 2 * k + 2], "big"),
            key[k : 2 * k],
            int.from_bytes(key[2 * k + 2 :], "big"),
            e[_CTX],
        )

    def remove(self, port: int) -> None:
        self._half_open.pop(port, None)
        self._drop(port)

    def expire(self, now: float) -> list[Any]:
        """Forget idle flows (closed ones sooner, half-open ones after `handshake_timeout`);
        the contexts of those forgotten. A scan of the table: the I/O layer's sweep timer
        calls it every few seconds, never the per-packet path."""
        gone = self._expire_half_open(now)
        for n, e in list(self._ports.items()):
            idle = now - e[_LAST]
            if idle > self.timeout or (e[_FINS] == 3 and idle > self.closing_timeout):
                del self._ports[n]
                self._flows.pop(e[_KEY], None)
                self._half_open.pop(n, None)
                gone.append(e[_CTX])
        return gone

    def ports(self) -> list[int]:
        return list(self._ports)


def unfinished(nat: TcpNat) -> int:
    """How many flows have not yet seen both FINs (or a RST): used to drain at shutdown."""
    return sum(1 for e in nat._ports.values() if e[_FINS] != 3)
