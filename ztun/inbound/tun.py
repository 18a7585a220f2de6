"""The `tun` inbound (Linux, `stack: system`): every flow of the host enters through a TUN device.

Owns: the TUN read loop, the system-stack TCP path (NAT rewrite to a kernel listener on the
TUN address, so the kernel's TCP terminates every flow; see ztun.nat.tcp), UDP sessions in
user space (one outbound session per (source, destination), replies built back into IP
packets), ICMP echo replies, RST and "port unreachable" for refused flows, auto_route, and
the orderly shutdown (no new flows, FIN every TCP flow while the TUN still carries the FINs,
drop UDP sessions, remove routes, close the TUN).

A packet's way (TCP, flow S:sp → D:dp, TUN address A, fake peer B = A+1, listener A:P):

    app ──S:sp→D:dp──▶ TUN ──read──▶ NAT: B:n→A:P ──write──▶ TUN ──▶ kernel TCP ──▶ listener
    app ◀──D:dp→S:sp── TUN ◀─write── NAT: back    ◀──read─── TUN ◀── A:P→B:n (kernel replies)
    accept() → peer port n → (S:sp, D:dp) → router → outbound socket → relay (splice)

With TUN offload (the default; see ztun.packet.virtio) each read may be a TCP super-packet of
up to 64 KiB with an unfinished checksum, rewritten and written back whole with its header.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ipaddress
import logging
import os
import socket
import struct
from collections import Counter
from functools import lru_cache
from typing import Any

from ztun.address import Address
from ztun.config.options import RouteOptions, TunInboundOptions
from ztun.errors import ZtunError
from ztun.nat.tcp import FORWARD, NEW, TcpNat, unfinished
from ztun.nat.udp import UdpTable
from ztun.outbound.base import Outbound, OutboundError, UdpSession
from ztun.packet.fragment import Reassembler
from ztun.packet.icmp import build_echo_reply, build_port_unreachable, is_echo_request
from ztun.packet.ip import Drop, IPHeader, Proto, is_unicast, parse_ip
from ztun.packet.tcp import build_rst
from ztun.packet.udp import build_udp, parse_udp
from ztun.packet.virtio import F_NEEDS_CSUM, GSO_ECN, GSO_TCPV4, GSO_TCPV6, HEADER_LEN, PLAIN
from ztun.route.metadata import FlowMeta
from ztun.runtime.dispatch import Dispatcher, Flow, RejectedError, log_flow
from ztun.runtime.netio import Handover

log = logging.getLogger("ztun.inbound")

DEFAULT_MTU = 9000
DEFAULT_UDP_TIMEOUT = 60.0
MAX_TCP_FLOWS = 16384
MAX_UDP_SESSIONS = 4096
#: Datagrams kept per UDP session while its outbound session is being opened.
MAX_UDP_PENDING = 64
#: After a UDP session failed to open, its datagrams are dropped this long before a retry.
UDP_RETRY_DELAY = 1.0
#: Packets handled per wake-up before other callbacks get a turn (the fd stays readable).
READ_BATCH = 512
SWEEP_INTERVAL = 2.0
#: ZTUN_TUN_OFFLOAD=0 opens the TUN without virtio-net offload (one packet per read), for
#: comparison and debugging.
OFFLOAD_ENV = "ZTUN_TUN_OFFLOAD"
#: How long shutdown keeps the TUN running so that the FINs reach the applications.
DRAIN_TIME = 1.0


class TunOptionError(ZtunError):
    """A tun inbound option that cannot work; the message names it."""


def _first_and_peer(
    nets: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface], version: int, tag: str
) -> tuple[bytes, bytes] | None:
    """The first TUN address of a family and its fake peer (the next address in the prefix)."""
    for iface in nets:
        if iface.version != version:
            continue
        peer = iface.ip + 1
        net = iface.network
        last_usable = net.broadcast_address if version == 6 else net.broadcast_address - 1
        if peer not in net or peer > last_usable:
            raise TunOptionError(
                f"inbound {tag!r}: the system stack needs one more IPv{version} address in the "
                f"first prefix ({iface}): use a shorter prefix, e.g. /30 or /126"
            )
        return iface.ip.packed, peer.packed
    return None


class _UdpFlow:
    __slots__ = ("blocked", "closed", "dport", "dst", "flow", "pending", "retry_at", "session",
                 "sport", "src")  # fmt: skip

    def __init__(self, src: bytes, sport: int, dst: bytes, dport: int, flow: Flow) -> None:
        self.src, self.sport, self.dst, self.dport = src, sport, dst, dport
        self.flow = flow
        self.session: UdpSession | None = None
        self.pending: list[bytes] | None = None
        self.blocked: str | None = None  # "reject" or "drop"
        self.retry_at = 0.0
        self.closed = False


class TunInbound:
    type = "tun"

    def __init__(
        self, options: TunInboundOptions, dispatcher: Dispatcher, route: RouteOptions
    ) -> None:
        tag = options.tag
        if options.stack != "system":
            raise TunOptionError(
                f"inbound {tag!r}: stack {options.stack!r} is not available (use system)"
            )
        if not options.address:
            raise TunOptionError(f"inbound {tag!r}: `address` needs at least one prefix")
        self.options = options
        self.tag = tag
        self.dispatcher = dispatcher
        self.interface_name = options.interface_name
        self.address = list(options.address)
        self.mtu = options.mtu
        self.auto_route = options.auto_route
        self.strict_route = options.strict_route
        self.route_address = list(options.route_address)
        self.route_exclude_address = list(options.route_exclude_address)
        self.udp_timeout = udp_timeout = options.udp_timeout
        self.icmp = options.icmp
        self.mark = route.default_mark
        self.v4 = _first_and_peer(self.address, 4, tag)
        self.v6 = _first_and_peer(self.address, 6, tag)
        self.tasks: set[asyncio.Task[None]] = set()
        self.drops: Counter[Drop] = Counter()
        self.device: Any = None
        self.routes: Any = None
        self.nat4: TcpNat | None = None
        self.nat6: TcpNat | None = None
        self._listeners: list[tuple[socket.socket, TcpNat]] = []
        self._conns: set[socket.socket] = set()
        self.udp: UdpTable[_UdpFlow] = UdpTable(timeout=udp_timeout, max_sessions=MAX_UDP_SESSIONS)
        self.frags = Reassembler()
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        self._hdr = bytearray(HEADER_LEN)  # the virtio-net header of the packet in _buf
        self._iov = [self._hdr, self._buf]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.accepting = False
        self.packets = 0
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        from ztun.platform.linux.tun_device import TunDevice

        loop = self._loop = asyncio.get_running_loop()
        offload = os.environ.get(OFFLOAD_ENV, "1").strip().lower() not in ("0", "false", "off")
        self.device = TunDevice.open(self.interface_name, self.address, self.mtu, offload)
        atexit.register(self._emergency_cleanup)
        try:
            for fam, pair in ((socket.AF_INET, self.v4), (socket.AF_INET6, self.v6)):
                if pair is None:
                    continue
                local, peer = pair
                ls = socket.socket(fam, socket.SOCK_STREAM)
                if fam == socket.AF_INET6:
                    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                ls.bind((socket.inet_ntop(fam, local), 0))
                # Set once here: Linux copies it to every accepted socket (a syscall per flow).
                with contextlib.suppress(OSError):
                    ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                ls.listen(4096)
                ls.setblocking(False)
                nat = TcpNat(local, peer, ls.getsockname()[1], max_flows=MAX_TCP_FLOWS)
                if fam == socket.AF_INET:
                    self.nat4 = nat
                else:
                    self.nat6 = nat
                self._listeners.append((ls, nat))
                loop.add_reader(ls.fileno(), self._on_accept, ls, nat)
            if self.auto_route:
                await self._setup_routes()
        except BaseException:
            self._teardown()
            raise
        self.accepting = True
        vnet = self.device.vnet_hdr
        loop.add_reader(self.device.fd, self._on_tun_vnet if vnet else self._on_tun)
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        log.info("inbound %s (tun) on %s: %s, mtu %d, offload %s%s", self.tag, self.device.name,
                 ", ".join(map(str, self.address)), self.mtu, "on" if vnet else "off",
                 ", auto_route" if self.auto_route else "")  # fmt: skip

    async def _setup_routes(self) -> None:
        from ztun.platform.linux import routes

        mark = self.mark or routes.DEFAULT_MARK
        bypass: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for ob in self.dispatcher.outbounds.values():
            # ztun's own sockets carry the mark, which rule 9000 sends to `main`.
            ob.use_default_mark(mark)
            try:
                bypass += await ob.bypass_addresses()
            except ZtunError as e:
                raise TunOptionError(f"auto_route: {e}: it must be kept out of the TUN") from None
        p = routes.plan(
            interface=self.device.name,
            index=self.device.index,
            tun_networks=[a.network for a in self.address],
            route_address=self.route_address,
            route_exclude_address=self.route_exclude_address,
            bypass=bypass,
            mark=mark,
            strict_route=self.strict_route,
        )
        self.routes = routes.AutoRoute(p)
        self.routes.apply()

    async def stop(self) -> None:
        """No new flows; FIN every TCP flow and drain; end UDP sessions; remove routes, TUN."""
        if self._closed:
            return
        self.accepting = False
        loop = asyncio.get_running_loop()
        for ls, _ in self._listeners:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(ls.fileno())
            ls.close()
        self._listeners.clear()
        tasks = list(self.tasks)
        for t in tasks:
            t.cancel()  # the relay ends; the flow's sockets close, which sends FIN both ways
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for uf in self.udp.clear():
            self._end_udp(uf, "closed")
        # Keep translating for a moment so the FINs (and their ACKs) reach the applications.
        deadline = loop.time() + DRAIN_TIME
        while loop.time() < deadline and any(
            unfinished(n) for n in (self.nat4, self.nat6) if n is not None
        ):
            await asyncio.sleep(0.05)
        self._teardown()
        if self.drops:
            counts = ", ".join(f"{d.name.lower()}={c}" for d, c in sorted(self.drops.items()))
            log.info("inbound %s: dropped packets: %s", self.tag, counts)

    def _teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if self._sweeper is not None:
            self._sweeper.cancel()
        for ls, _ in self._listeners:
            with contextlib.suppress(Exception):
                if loop is not None:
                    loop.remove_reader(ls.fileno())
            ls.close()
        self._listeners.clear()
        for c in list(self._conns):
            with contextlib.suppress(OSError):
                c.close()
        if self.device is not None and loop is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.device.fd)
        if self.routes is not None:
            self.routes.remove()
        if self.device is not None:
            self.device.close()
        with contextlib.suppress(Exception):
            atexit.unregister(self._emergency_cleanup)
        log.info("inbound %s (tun): routes restored, device closed", self.tag)

    def _emergency_cleanup(self) -> None:
        # The loop died without stop(): still put the routes back before the process ends.
        if self.routes is not None:
            self.routes.remove()
        if self.device is not None:
            self.device.close()

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for nat in (self.nat4, self.nat6):
            if nat is not None:
                nat.expire(now)
        for uf in self.udp.expire(now):
            self._end_udp(uf, "idle")
        n = self.frags.expire(now)
        if n:
            self.drops[Drop.FRAGMENT_TIMEOUT] += n
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    # -- the TUN read loop ----------------------------------------------------------------

    def _on_tun(self) -> None:
        fd = self.device.fd
        buf, view = self._buf, self._view
        readv, write = os.readv, os.write
        nat4, nat6 = self.nat4, self.nat6
        now = self._loop.time()  # type: ignore[union-attr]
        drops = self.drops
        for _ in range(READ_BATCH):
            try:
                n = readv(fd, [buf])
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the device went away (shutdown)
            self.packets += 1
            if n < 20:
                drops[Drop.TRUNCATED] += 1
                continue
            v = buf[0] >> 4
            if v == 4:
                proto, nat = buf[9], nat4
            elif v == 6:
                proto, nat = buf[6], nat6
            else:
                drops[Drop.BAD_VERSION] += 1
                continue
            if proto == 6 and nat is not None:
                r = nat.translate(buf, n, now)
                if r == FORWARD:
                    try:
                        write(fd, view[:n])
                    except OSError:
                        drops[Drop.BAD_HEADER] += 1
                    continue
                self._on_tcp_verdict(r, nat, n, now)
                continue
            self._on_not_tcp(proto, n, now)

    def _on_tun_vnet(self) -> None:
        """`_on_tun` for a device with virtio-net headers: TCP super-packets (TSO) and
        unfinished checksums (NEEDS_CSUM) pass through the NAT and go back with their header."""
        fd = self.device.fd
        buf, view, hdr, iov = self._buf, self._view, self._hdr, self._iov
        readv, writev = os.readv, os.writev
        nat4, nat6 = self.nat4, self.nat6
        now = self._loop.time()  # type: ignore[union-attr]
        drops = self.drops
        tcp_gso = (GSO_TCPV4, GSO_TCPV6)
        for _ in range(READ_BATCH):
            try:
                n = readv(fd, iov) - HEADER_LEN
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # the device went away (shutdown)
            self.packets += 1
            if n < 20:
                drops[Drop.TRUNCATED] += 1
                continue
            v = buf[0] >> 4
            if v == 4:
                proto, nat = buf[9], nat4
            elif v == 6:
                proto, nat = buf[6], nat6
            else:
                drops[Drop.BAD_VERSION] += 1
                continue
            gso = hdr[1]
            if proto == 6 and nat is not None:
                if gso and gso & ~GSO_ECN not in tcp_gso:
                    drops[Drop.GSO] += 1
                    continue
                r = nat.translate(buf, n, now, hdr[0] & F_NEEDS_CSUM)
                if r == FORWARD:
                    try:
                        # The header still fits: only addresses, ports and checksums changed.
                        writev(fd, [hdr, view[:n]])
                    except OSError:
                        drops[Drop.BAD_HEADER] += 1
                    continue
                self._on_tcp_verdict(r, nat, n, now)
                continue
            if gso:
                drops[Drop.GSO] += 1  # UDP GSO (USO) is never negotiated
                continue
            self._on_not_tcp(proto, n, now)

    # Both read loops share what follows a packet that is not a plain forward; only the
    # forward path stays inline in each loop, since it carries nearly every packet.

    def _on_tcp_verdict(self, r: int, nat: Any, n: int, now: float) -> None:
        """A TCP packet the NAT did not forward: a new flow's SYN, or a counted drop."""
        if r == NEW:
            self._new_tcp(nat, n, now)
            return
        self.drops[Drop(r)] += 1
        if r == Drop.NO_FLOW:
            self._answer_rst(n)

    def _on_not_tcp(self, proto: int, n: int, now: float) -> None:
        """UDP and ICMP go to user space; anything else is dropped and counted."""
        pkt = bytes(self._view[:n])
        if proto == Proto.UDP:
            self._on_udp(pkt, now)
        elif proto in (Proto.ICMP, Proto.ICMPV6):
            self._on_icmp(pkt)
        else:
            self.drops[Drop.PROTOCOL] += 1

    def _write(self, pkt: bytes, hdr: bytes = PLAIN) -> None:
        """Write one packet; `hdr` is its virtio-net header when the device uses them (all
        zero for a packet ztun built, with every checksum complete)."""
        try:
            if self.device.vnet_hdr:
                os.writev(self.device.fd, [hdr, pkt])
            else:
                os.write(self.device.fd, pkt)
        except OSError:
            self.drops[Drop.BAD_HEADER] += 1

    def _answer_rst(self, n: int) -> None:
        pkt = bytes(self._view[:n])
        h = parse_ip(pkt)
        if isinstance(h, IPHeader) and h.proto == Proto.TCP:
            rst = build_rst(pkt, h)
            if isinstance(rst, bytes):
                self._write(rst)

    # -- TCP ------------------------------------------------------------------------------

    def _new_tcp(self, nat: TcpNat, n: int, now: float) -> None:
        pkt = bytes(self._view[:n])
        h = parse_ip(pkt)
        if not isinstance(h, IPHeader) or h.end - h.l4 < 20:
            self.drops[h if isinstance(h, Drop) else Drop.TRUNCATED] += 1
            return
        if not self.accepting or not is_unicast(h.dst):
            self.drops[Drop.STOPPING if not self.accepting else Drop.NOT_UNICAST] += 1
            self._write_rst(pkt, h)
            return
        sport, dport = struct.unpack_from("!HH", pkt, h.l4)
        dst_ip, dst_text = _ip(h.dst)
        meta = FlowMeta(
            network="tcp",
            destination=dst_ip,
            destination_port=dport,
            source=_ip(h.src)[0],
            source_port=sport,
            inbound=self.tag,
        )
        flow = Flow(meta, Address(dst_text, dport))
        try:
            outbound = self.dispatcher.decide(flow)
        except RejectedError as e:
            # Decided before the handshake, so a refused flow gets its RST at once.
            flow.end, flow.error = "blocked", str(e)
            log_flow(flow)
            if not e.drop:
                self._write_rst(pkt, h)
            self.drops[Drop.REJECTED] += 1
            return
        if outbound.refuses_tcp:
            outbound.counters.blocked_tcp += 1
            flow.end, flow.error = "blocked", f"blocked by outbound {outbound.tag!r}"
            log_flow(flow)
            self._write_rst(pkt, h)
            self.drops[Drop.REJECTED] += 1
            return
        port = nat.add(h.src, sport, h.dst, dport, now, (flow, outbound))
        if isinstance(port, Drop):
            self.drops[port] += 1
            self._write_rst(pkt, h)
            return
        vnet = self.device.vnet_hdr
        r = nat.translate(self._buf, n, now, vnet and self._hdr[0] & F_NEEDS_CSUM)
        if r == FORWARD:
            # Straight from the read buffer, as the read loop forwards: no copies.
            try:
                if vnet:
                    os.writev(self.device.fd, [self._hdr, self._view[:n]])
                else:
                    os.write(self.device.fd, self._view[:n])
            except OSError:
                self.drops[Drop.BAD_HEADER] += 1
        else:
            self.drops[Drop(r) if r > 0 else Drop.NO_FLOW] += 1

    def _write_rst(self, pkt: bytes, h: IPHeader) -> None:
        rst = build_rst(pkt, h)
        if isinstance(rst, bytes):
            self._write(rst)

    def _on_accept(self, ls: socket.socket, nat: TcpNat) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(64):
            try:
                conn, addr = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("inbound %s: accept failed: %s", self.tag, e.strerror or e)
                return
            f = nat.lookup(int(addr[1]))
            if f is None or f.ctx is None or not self.accepting:
                _reset(conn)
                continue
            flow, outbound = f.ctx
            conn.setblocking(False)
            self._conns.add(conn)
            task = loop.create_task(self._tcp_flow(conn, flow, outbound))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _tcp_flow(self, conn: socket.socket, flow: Flow, outbound: Outbound) -> None:
        # The outbound's watch on its socket comes with it, for the relay to take over.
        handover = Handover()
        try:
            try:
                remote = await outbound.connect_tcp(flow.dest, flow.meta, handover)
            except OutboundError as e:
                flow.end = "failed"
                flow.error = str(e)
                log_flow(flow, logging.WARNING)
                _reset(conn)  # the application sees RST, as from a refusing server
                return
            try:
                await self.dispatcher.relay_tcp(flow, conn, remote, remote_watch=handover.take())
            finally:
                handover.release()  # still held only if the relay never got it
                remote.close()
        finally:
            self._conns.discard(conn)
            conn.close()

    # -- UDP ------------------------------------------------------------------------------

    def _on_udp(self, pkt: bytes, now: float) -> None:
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
        key = (h.src, u.sport, h.dst, u.dport)
        uf = self.udp.get(key, now)
        if uf is None:
            if not self.accepting or not is_unicast(h.dst):
                self.drops[Drop.STOPPING if not self.accepting else Drop.NOT_UNICAST] += 1
                return
            uf = self._new_udp(h, u.sport, u.dport, now)
        if uf.blocked is not None:
            self.drops[Drop.REJECTED] += 1
            if uf.blocked == "reject":
                self._write(build_port_unreachable(pkt, h))
            return
        payload = pkt[u.start : u.end]
        uf.flow.up += len(payload)
        if uf.session is not None and not uf.session.closed:
            uf.session.send(uf.flow.dest, payload)
        elif uf.pending is not None:
            if len(uf.pending) < MAX_UDP_PENDING:
                uf.pending.append(payload)
        elif now >= uf.retry_at:
            uf.pending = [payload]
            task = self._loop.create_task(self._open_udp(uf))  # type: ignore[union-attr]
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _new_udp(self, h: IPHeader, sport: int, dport: int, now: float) -> _UdpFlow:
        dst_ip, dst_text = _ip(h.dst)
        meta = FlowMeta(
            network="udp",
            destination=dst_ip,
            destination_port=dport,
            source=_ip(h.src)[0],
            source_port=sport,
            inbound=self.tag,
        )
        flow = Flow(meta, Address(dst_text, dport))
        uf = _UdpFlow(h.src, sport, h.dst, dport, flow)
        try:
            outbound = self.dispatcher.decide(flow)
            if outbound.drops_udp:
                outbound.counters.blocked_udp += 1
                uf.blocked = "reject"
        except RejectedError as e:
            uf.blocked = "drop" if e.drop else "reject"
            flow.error = str(e)
        if uf.blocked:
            flow.end = "blocked"
            log_flow(flow)
        for gone in self.udp.put((h.src, sport, h.dst, dport), uf, now):
            self._end_udp(gone, "evicted")
        return uf

    async def _open_udp(self, uf: _UdpFlow) -> None:
        assert uf.flow.outbound is not None
        outbound = self.dispatcher.outbounds[uf.flow.outbound]
        try:
            session = await outbound.open_udp(
                uf.flow.meta,
                lambda src, payload, uf=uf: self._udp_reply(uf, payload),
                lambda why, uf=uf: self._udp_session_ended(uf, why),
            )
        except OutboundError as e:
            dropped = len(uf.pending or ())
            uf.pending = None
            uf.retry_at = (self._loop.time() if self._loop else 0.0) + UDP_RETRY_DELAY
            log.warning("udp %s via %s: %s (%d datagram(s) dropped)",
                        uf.flow.dest, outbound.tag, e, dropped)  # fmt: skip
            return
        if uf.closed:
            session.close()
            return
        uf.session = session
        pending, uf.pending = uf.pending or [], None
        for payload in pending:
            session.send(uf.flow.dest, payload)

    def _udp_reply(self, uf: _UdpFlow, payload: bytes) -> None:
        if uf.closed or self.device is None or self.device.fd < 0:
            return
        # Replies always come from the original destination, whatever the outbound saw.
        pkt = build_udp(uf.dst, uf.dport, uf.src, uf.sport, payload)
        if isinstance(pkt, Drop):
            self.drops[pkt] += 1
            return
        uf.flow.down += len(payload)
        self._write(pkt)

    def _udp_session_ended(self, uf: _UdpFlow, why: str) -> None:
        if self.udp.pop((uf.src, uf.sport, uf.dst, uf.dport)) is not None:
            self._end_udp(uf, "idle" if why == "idle" else "reset", None if why == "idle" else why)

    def _end_udp(self, uf: _UdpFlow, end: str, error: str | None = None) -> None:
        if uf.closed:
            return
        uf.closed = True
        if uf.session is not None:
            uf.session.close()
        if uf.blocked is None:
            uf.flow.end = end
            uf.flow.error = error
            log_flow(uf.flow, logging.DEBUG if end in ("idle", "closed") else logging.INFO)

    # -- ICMP -----------------------------------------------------------------------------

    def _on_icmp(self, pkt: bytes) -> None:
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
        self._write(reply)


@lru_cache(maxsize=4096)
def _ip(packed: bytes) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, str]:
    """A packed address as an IP object and its text. Cached: addresses repeat from flow to
    flow, and building both cost about 2 µs per new flow (IP objects are immutable)."""
    ip = ipaddress.ip_address(packed)
    return ip, str(ip)


def _reset(conn: socket.socket) -> None:
    """Close with RST rather than FIN."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
