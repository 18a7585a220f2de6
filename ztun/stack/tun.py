"""Every per-packet decision of the TUN inbound (`stack: system`), without I/O.

`TunStack` takes a packet read from the TUN and `now`, and either returns `FORWARD` (the buffer
was rewritten in place by the TCP NAT: write it back as it is) or `HANDLED`, having appended to
`out` whatever else must happen: packets to write (RST, ICMP replies, UDP replies), UDP sessions
to open, send on or close, and flow log lines. Drops are counted in `drops` by reason.

TCP never leaves the kernel: a new flow's SYN is routed here (`decide`), given a NAT port and
forwarded to the kernel listener on the TUN address; when the I/O layer accepts that connection
it asks `tcp_flow(nat, port)` for the flow and its outbound, and connects and relays it. A
refused SYN gets its RST at once, before any handshake. UDP flows and their outbound sessions
live in `ztun.nat.udp.UdpSessions`; `udp_mapping` says which flows of one client port share a
session (one per flow by default), `udp_filtering` which datagrams that arrive on a session
reach the client (by default only from an address the client sent to: a third host cannot
inject one). ICMP echo is answered here.

DNS hijack and sniffing need no change to the I/O loop: a hijacked flow's outbound is ztun's
DNS module, whose UDP sessions answer in-process (commands stay `OpenUdpSession` /
`SendDatagram`, replies come back through `udp_reply`). A UDP flow whose rules ask to sniff is
sniffed here on its first datagram (`decide_datagram`); a TCP flow's first bytes arrive on the
accepted socket, so its NAT entry carries `SniffFirst` for the I/O layer to sniff and route
again before it connects.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Hashable
from functools import lru_cache
from typing import Any

from ztun.address import Address, IPAddress
from ztun.nat.tcp import FORWARD, NEW, TcpNat
from ztun.nat.udp import (
    ADDRESS_AND_PORT_DEPENDENT,
    ADDRESS_DEPENDENT,
    ENDPOINT_INDEPENDENT,
    UdpFlow,
    UdpSessions,
    mapped_session,
)
from ztun.packet.fragment import Reassembler
from ztun.packet.gso import build_udp_super, runs, split
from ztun.packet.icmp import build_echo_reply, build_port_unreachable, is_echo_request
from ztun.packet.ip import Drop, IPHeader, Proto, is_unicast, parse_ip
from ztun.packet.tcp import build_rst
from ztun.packet.udp import build_udp, parse_udp
from ztun.packet.virtio import (
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP_L4,
    PLAIN,
    parse_header,
)
from ztun.route.metadata import FlowMeta
from ztun.stack.commands import Command, FlowEnded, WriteDatagram, WritePacket
from ztun.stack.flow import Decide, Flow, LookupFirst, Refused, SniffFirst, decide_datagram

__all__ = ["FORWARD", "HANDLED", "TunStack"]

#: `receive`: the packet was handled (or dropped); whatever it needs is in `out`.
HANDLED = 1

MAX_UDP_SESSIONS = 4096

_TCP_GSO = (GSO_TCPV4, GSO_TCPV6)

#: A UDP flow's key: (source address, source port, destination address, destination port),
#: addresses as packed bytes.
UdpKey = tuple[bytes, int, bytes, int]


class TunStack:
    """The per-packet core of one TUN inbound. `nat4`/`nat6`: the TCP NAT of each family that
    has a TUN address (None: that family's TCP is dropped)."""

    def __init__(
        self,
        tag: str,
        decide: Decide,
        *,
        nat4: TcpNat | None,
        nat6: TcpNat | None,
        udp_timeout: float,
        icmp: str = "reply",
        max_udp_sessions: int = MAX_UDP_SESSIONS,
        udp_mapping: str = ADDRESS_AND_PORT_DEPENDENT,
        udp_filtering: str = ADDRESS_DEPENDENT,
    ) -> None:
        self.tag = tag
        self.decide = decide
        self.nat4, self.nat6 = nat4, nat6
        self.icmp = icmp
        self.out: list[Command] = []
        self.udp = UdpSessions(
            self.out,
            timeout=udp_timeout,
            max_flows=max_udp_sessions,
        )
        self.frags = Reassembler()
        self.drops: Counter[Drop] = Counter()
        self.accepting = True
        self.packets = 0
        #: replies that came back after their UDP flow ended, written back all the same
        self.late_replies = 0
        self.udp_mapping = udp_mapping
        self.udp_filtering = udp_filtering
        #: datagrams `udp_filtering` kept from the client (or that no packet can carry)
        self.udp_filtered = 0
        #: datagrams from a host the client never sent to, delivered (`endpoint_independent`)
        self.udp_unsolicited = 0
        #: the TUN takes and gives UDP super-packets (USO): replies become `WriteDatagram`s,
        #: and a read may carry many datagrams of one flow
        self.uso = False

    # -- packets in -----------------------------------------------------------------------

    def receive(self, buf: bytearray, n: int, now: float) -> int:
        """One packet `buf[:n]` of a plain TUN: FORWARD or HANDLED."""
        self.packets += 1
        if n < 20:
            self.drops[Drop.TRUNCATED] += 1
            return HANDLED
        v = buf[0] >> 4
        if v == 4:
            proto, nat = buf[9], self.nat4
        elif v == 6:
            proto, nat = buf[6], self.nat6
        else:
            self.drops[Drop.BAD_VERSION] += 1
            return HANDLED
        if proto == 6 and nat is not None:
            r = nat.translate(buf, n, now)
            if r == FORWARD:
                return FORWARD
            return self._tcp_not_forwarded(r, nat, buf, n, now, 0)
        self._not_tcp(proto, buf, n, now)
        return HANDLED

    def receive_vnet(self, buf: bytearray, n: int, hdr: bytes | bytearray, now: float) -> int:
        """`receive` for a device with virtio-net headers: `hdr` is the packet's header. TCP
        super-packets (TSO) and unfinished checksums (NEEDS_CSUM) go through the NAT whole, to
        be written back with the same header. Its first lines repeat `receive`'s on purpose:
        they run for every packet, and a shared helper would cost a call per packet."""
        self.packets += 1
        if n < 20:
            self.drops[Drop.TRUNCATED] += 1
            return HANDLED
        v = buf[0] >> 4
        if v == 4:
            proto, nat = buf[9], self.nat4
        elif v == 6:
            proto, nat = buf[6], self.nat6
        else:
            self.drops[Drop.BAD_VERSION] += 1
            return HANDLED
        gso = hdr[1]
        if proto == 6 and nat is not None:
            if gso and gso & ~GSO_ECN not in _TCP_GSO:
                self.drops[Drop.GSO] += 1
                return HANDLED
            partial = hdr[0] & F_NEEDS_CSUM
            r = nat.translate(buf, n, now, partial)
            if r == FORWARD:
                return FORWARD
            return self._tcp_not_forwarded(r, nat, buf, n, now, partial)
        if gso:
            if proto == Proto.UDP and gso & ~GSO_ECN == GSO_UDP_L4:
                # An application's UDP_SEGMENT burst, uncut (USO): one flow, many datagrams.
                h = parse_header(hdr)
                self._udp(bytes(buf[:n]), now, 0 if isinstance(h, Drop) else h.gso_size)
                return HANDLED
            self.drops[Drop.GSO] += 1
            return HANDLED
        self._not_tcp(proto, buf, n, now)
        return HANDLED

    # -- TCP ------------------------------------------------------------------------------

    def _tcp_not_forwarded(
        self, r: int, nat: TcpNat, buf: bytearray, n: int, now: float, partial: int
    ) -> int:
        if r == NEW:
            return self._new_tcp(nat, buf, n, now, partial)
        self.drops[Drop(r)] += 1
        if r == Drop.NO_FLOW:
            pkt = bytes(buf[:n])
            h = parse_ip(pkt)
            if isinstance(h, IPHeader) and h.proto == Proto.TCP:
                self._rst(pkt, h)
        return HANDLED

    def _new_tcp(self, nat: TcpNat, buf: bytearray, n: int, now: float, partial: int) -> int:
        """A SYN of an unknown flow: route it, then forward it to the listener, or RST it."""
        pkt = bytes(buf[:n])
        h = parse_ip(pkt)
        if not isinstance(h, IPHeader) or h.end - h.l4 < 20:
            self.drops[h if isinstance(h, Drop) else Drop.TRUNCATED] += 1
            return HANDLED
        if not self.accepting or not is_unicast(h.dst):
            self.drops[Drop.STOPPING if not self.accepting else Drop.NOT_UNICAST] += 1
            self._rst(pkt, h)
            return HANDLED
        sport = (pkt[h.l4] << 8) | pkt[h.l4 + 1]
        dport = (pkt[h.l4 + 2] << 8) | pkt[h.l4 + 3]
        flow = self._flow("tcp", h, sport, dport, now)
        verdict = self.decide(flow, "tcp")
        if isinstance(verdict, Refused):
            # Decided before the handshake, so a refused flow gets its RST at once.
            self._refuse(flow, verdict)
            if not verdict.drop:
                self._rst(pkt, h)
            return HANDLED
        port = nat.add(h.src, sport, h.dst, dport, now, (flow, verdict))
        if isinstance(port, Drop):
            self.drops[port] += 1
            flow.end, flow.error = "failed", "the TCP NAT table is full"
            self.out.append(FlowEnded(flow))
            self._rst(pkt, h)
            return HANDLED
        r = nat.translate(buf, n, now, partial)
        if r == FORWARD:
            return FORWARD  # straight from the read buffer, as every forwarded segment goes
        self.drops[Drop(r) if r > 0 else Drop.NO_FLOW] += 1
        return HANDLED

    def tcp_flow(self, nat: TcpNat, port: int) -> tuple[Flow, Any | SniffFirst] | None:
        """The flow and outbound behind a connection the kernel listener accepted from the
        NAT's peer port `port` — or `SniffFirst`: read the first bytes, sniff, and route the
        flow again (`decide`) before connecting. None: unknown or stopping (reset it)."""
        entry = nat.lookup(port)
        if entry is None or entry.ctx is None or not self.accepting:
            return None
        flow, outbound = entry.ctx
        return flow, outbound

    def _rst(self, pkt: bytes, h: IPHeader) -> None:
        rst = build_rst(pkt, h)
        if isinstance(rst, bytes):
            self.out.append(WritePacket(rst))

    def _refuse(self, flow: Flow, refused: Refused) -> None:
        flow.end, flow.error = "blocked", refused.reason
        self.out.append(FlowEnded(flow))
        self.drops[Drop.REJECTED] += 1

    # -- UDP and ICMP ---------------------------------------------------------------------

    def _not_tcp(self, proto: int, buf: bytearray, n: int, now: float) -> None:
        """UDP and ICMP are handled here; any other transport is dropped and counted."""
        if proto == Proto.UDP:
            self._udp(bytes(buf[:n]), now)
        elif proto in (Proto.ICMP, Proto.ICMPV6):
            self._icmp(bytes(buf[:n]))
        else:
            self.drops[Drop.PROTOCOL] += 1

    def _udp(self, pkt: bytes, now: float, segment: int = 0) -> None:
        """One UDP packet; `segment`: the datagram size of a super-packet (USO), else 0."""
        h = parse_ip(pkt)
        if isinstance(h, Drop):
            self.drops[h] += 1
            return
        if h.frag:
            whole = self.frags.push(pkt, h, now)
            if whole is None:
                return
            if isinstance(whole, Drop):
                self.drops[whole] += 1
                return
            pkt = whole
            h = parse_ip(pkt)
            if isinstance(h, Drop):
                self.drops[h] += 1
                return
        u = parse_udp(pkt, h)
        if isinstance(u, Drop):
            self.drops[u] += 1
            return
        key: UdpKey = (h.src, u.sport, h.dst, u.dport)
        payload = pkt[u.start : u.end]
        datagrams = split(payload, len(payload), segment) if segment else None
        uf = self.udp.get(key, now)
        if uf is None:
            if not self.accepting or not is_unicast(h.dst):
                self.drops[Drop.STOPPING if not self.accepting else Drop.NOT_UNICAST] += 1
                return
            flow = self._flow("udp", h, u.sport, u.dport, now)
            first = payload if datagrams is None else datagrams[0]
            verdict = decide_datagram(self.decide, flow, "udp", first)
            sk = key
            # A flow routed once its owner is known has a session of its own: its outbound,
            # which other mappings name in the session key, is not known yet.
            if self.udp_mapping != ADDRESS_AND_PORT_DEPENDENT and not isinstance(
                verdict, LookupFirst
            ):
                sk = mapped_session(self.udp_mapping, key, flow.outbound)  # type: ignore[assignment]
            uf = self.udp.add(key, flow, verdict, sk, now)
        if uf.refused is not None:
            self.drops[Drop.REJECTED] += 1
            if not uf.refused.drop:
                self.out.append(WritePacket(build_port_unreachable(pkt, h)))
            return
        if datagrams is None:
            self.udp.send(uf, payload, now)
        else:
            for d in datagrams:
                self.udp.send(uf, d, now)

    def udp_reply(self, key: Hashable, src: Address, payload: bytes, now: float) -> None:
        """A datagram from `src` came back through session `key`. From a flow's destination
        it goes back as from the flow's original destination (whatever address the outbound
        saw); from anywhere else only if `udp_filtering` allows, as from `src`."""
        if self.udp_mapping == ADDRESS_AND_PORT_DEPENDENT:
            # One flow per session: its key is the flow's.
            uf = self.udp.flow_of(key)
            if uf is not None:
                d = uf.flow.dest
                if d.port == src.port and (d.host == src.host or _name_matches(uf, src)):
                    self.udp.reply(key, payload, now)
                    self._write_reply(key, payload)
                    return
            elif _same_host(key[2], src) and key[3] == src.port:  # type: ignore[index]
                # The flow ended (idle) while an answer was on its way: a hijacked DNS query
                # the DNS module answered late, say. It still goes back.
                self.late_replies += 1
                self._write_reply(key, payload)
                return
            self._unmatched(key, key[0], key[1], src, payload)  # type: ignore[index]
            return
        client, cport = key[0], key[1]  # type: ignore[index]
        packed = _packed(src.host)
        if packed is not None:
            fkey = (client, cport, packed, src.port)
            uf = self.udp.flow_of(fkey)
            if uf is not None and uf.session_key == key:
                self.udp.reply(fkey, payload, now)
                self._write_reply(fkey, payload)
                return
        for uf in self.udp.members(key):
            d = uf.flow.dest
            if d.port == src.port and (d.host == src.host or _name_matches(uf, src)):
                self.udp.reply(uf.key, payload, now)
                self._write_reply(uf.key, payload)
                return
        self._unmatched(key, client, cport, src, payload)

    def _unmatched(
        self, key: Hashable, client: bytes, cport: int, src: Address, payload: bytes
    ) -> None:
        """A datagram from no flow's destination: `udp_filtering` decides. Delivered ones go
        back as from `src` itself, so the client sees who sent them."""
        f = self.udp_filtering
        if f != ENDPOINT_INDEPENDENT and not (
            f == ADDRESS_DEPENDENT and self.udp.sent_to(key, src.host)
        ):
            self.udp_filtered += 1
            return
        packed = _packed(src.host)
        if packed is None or len(packed) != len(client):
            self.udp_filtered += 1  # a name, or the other family: no packet can carry it
            return
        self.udp_unsolicited += 1
        self._write_reply((client, cport, packed, src.port), payload)

    def _write_reply(self, key: Hashable, payload: bytes) -> None:
        if self.uso:
            self.out.append(WriteDatagram(key, payload))  # type: ignore[arg-type]
            return
        src, sport, dst, dport = key  # type: ignore[misc]
        pkt = build_udp(dst, dport, src, sport, payload)
        if isinstance(pkt, Drop):
            self.drops[pkt] += 1
            return
        self.out.append(WritePacket(pkt))

    def reply_packets(
        self, key: UdpKey, payloads: list[bytes]
    ) -> list[tuple[bytes, bytes, int]]:
        """The writes that carry a flow's `WriteDatagram`s, in order: (virtio-net header,
        packet, how many of `payloads` are done after it). With `uso`, a run of equal-sized
        ones is one UDP super-packet that the TUN cuts (neither a write nor a checksum per
        datagram in Python); any other goes alone."""
        src, sport, dst, dport = key
        out: list[tuple[bytes, bytes, int]] = []
        cuts = runs(payloads) if self.uso else [(i, i + 1, 0) for i in range(len(payloads))]
        for start, end, size in cuts:
            if size:
                built = build_udp_super(dst, dport, src, sport, payloads[start:end], size)
                if not isinstance(built, Drop):
                    out.append((*built, end))
                    continue
            for i in range(start, end):
                pkt = build_udp(dst, dport, src, sport, payloads[i])
                if isinstance(pkt, Drop):
                    self.drops[pkt] += 1
                else:
                    out.append((PLAIN, pkt, i + 1))
        return out

    def _icmp(self, pkt: bytes) -> None:
        h = parse_ip(pkt)
        if isinstance(h, Drop):
            self.drops[h] += 1
            return
        if self.icmp != "reply" or h.frag or not is_echo_request(pkt, h) or not is_unicast(h.dst):
            self.drops[Drop.ICMP_TYPE] += 1
            return
        reply = build_echo_reply(pkt, h)
        if isinstance(reply, Drop):
            self.drops[reply] += 1
            return
        self.out.append(WritePacket(reply))

    # -- flows ----------------------------------------------------------------------------

    def _flow(self, network: str, h: IPHeader, sport: int, dport: int, now: float) -> Flow:
        dst_ip, dst_text = _ip(h.dst)
        meta = FlowMeta(
            network=network,  # type: ignore[arg-type]
            destination=dst_ip,
            destination_port=dport,
            source=_ip(h.src)[0],
            source_port=sport,
            inbound=self.tag,
        )
        return Flow(meta, Address(dst_text, dport), now)

    # -- time and shutdown ----------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Forget idle TCP NAT entries, end idle UDP flows, drop stale fragments."""
        for nat in (self.nat4, self.nat6):
            if nat is not None:
                nat.expire(now)
        self.udp.expire(now)
        n = self.frags.expire(now)
        if n:
            self.drops[Drop.FRAGMENT_TIMEOUT] += n

    def stop(self) -> None:
        """No new flows from now on; every UDP flow ends (its session closes)."""
        self.accepting = False
        self.udp.clear("closed")


def _name_matches(uf: UdpFlow, src: Address) -> bool:
    """A flow to a name (FakeIP, a sniffed domain) through an outbound that resolves it far
    away and reports the address it got (a SOCKS5 proxy): ztun cannot tell that address from
    another, so such a reply is matched by its port alone (docs/security.md says so). An
    outbound that resolves here (direct) reports its replies as from the name itself."""
    return (uf.flow.dest.is_domain and not src.is_domain
            and getattr(uf.outbound, "resolves_remotely", True))  # fmt: skip


def _same_host(packed: bytes, src: Address) -> bool:
    return _packed(src.host) == packed


@lru_cache(maxsize=4096)
def _packed(host: str) -> bytes | None:
    """An IP literal as packed bytes (IPv4-mapped IPv6 as IPv4); None for a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.packed
    return ip.packed


@lru_cache(maxsize=4096)
def _ip(packed: bytes) -> tuple[IPAddress, str]:
    """A packed address as an IP object and its text. Cached: addresses repeat from flow to
    flow, and building both cost about 2 µs per new flow (IP objects are immutable)."""
    ip = ipaddress.ip_address(packed)
    return ip, str(ip)
