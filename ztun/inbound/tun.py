"""The `tun` inbound (Linux, `stack: system`): the I/O around `ztun.stack.tun.TunStack`.

Owns: the TUN device and its read loop, the kernel listeners that terminate every TCP flow
(the system stack: see ztun.nat.tcp), the outbound sockets and UDP sessions the stack asks
for, auto_route (and auto_redirect: its nftables table and the loopback listener of
ztun.inbound.redirect, whose flows join the TUN's at `_serve`), and the orderly shutdown (no
new flows, FIN every TCP flow while the TUN still carries the FINs, end UDP sessions, remove
the table and the routes, close the TUN). Every per-packet
decision is the stack's: this module reads, writes back what the stack forwarded in place,
and carries out the commands it queued (ztun.stack.commands).

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
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Hashable
from typing import Any

from ztun.address import Address
from ztun.config.options import RouteOptions, TunInboundOptions
from ztun.errors import ZtunError
from ztun.log import limited
from ztun.nat.tcp import FORWARD, TcpNat, unfinished
from ztun.outbound.base import Outbound, OutboundError
from ztun.packet.ip import Drop
from ztun.packet.virtio import HEADER_LEN, PLAIN
from ztun.runtime import dial
from ztun.runtime.busy_poll import BusyPoll
from ztun.runtime.dispatch import Dispatcher, log_flow
from ztun.runtime.netio import Handover
from ztun.runtime.sniff import sniff_and_route
from ztun.runtime.udp import UdpSessionRunner
from ztun.stack.flow import Flow, LookupFirst, Refused, SniffFirst, decide_datagram
from ztun.stack.tun import MAX_UDP_SESSIONS, TunStack

log = logging.getLogger("ztun.inbound")

MAX_TCP_FLOWS = 16384
#: Packets handled per wake-up before other callbacks get a turn (the fd stays readable).
READ_BATCH = 512
#: Commands carried out together at most (see `_run_batch`): a UDP burst is one segmented
#: send of up to 46 datagrams of 1400 bytes, and sending the 512 of a whole read batch at once
#: overflowed the receive buffer of the SOCKS5 server's relay socket (208 KiB by default, about
#: 92 such datagrams) more often than it saved calls.
FLUSH = 64
SWEEP_INTERVAL = 2.0
#: ZTUN_TUN_OFFLOAD=0 opens the TUN without virtio-net offload (one packet per read), for
#: comparison and debugging.
OFFLOAD_ENV = "ZTUN_TUN_OFFLOAD"
#: How long shutdown keeps the TUN running so that the FINs reach the applications.
DRAIN_TIME = 1.0
#: Packets whose handling raised (a bug: parsers return Drop reasons) are logged at most once
#: per this many seconds, with how many there were since the last line.
ERROR_LOG_INTERVAL = 1.0


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
        self.auto_redirect = options.auto_redirect and options.auto_route
        self.udp_timeout = udp_timeout = options.udp_timeout
        self.icmp = options.icmp
        self.mark = route.default_mark
        self.v4 = _first_and_peer(self.address, 4, tag)
        self.v6 = _first_and_peer(self.address, 6, tag)
        self.tasks: set[asyncio.Task[None]] = set()
        self.device: Any = None
        self.routes: Any = None
        #: auto_redirect: the nftables table and its loopback listener (inbound/redirect.py)
        self.redirect: Any = None
        self.redirect_listener: Any = None
        #: SO_REUSEPORT on auto_redirect's listeners, for worker processes (runtime/workers.py)
        self.redirect_reuse_port = False
        # Every per-packet decision; its NATs are set in start(), once the listeners are bound.
        self.stack = TunStack(tag, dispatcher.route, nat4=None, nat6=None,
                              udp_timeout=udp_timeout, icmp=options.icmp,
                              max_udp_sessions=MAX_UDP_SESSIONS,
                              udp_mapping=options.udp_mapping,
                              udp_filtering=options.udp_filtering)  # fmt: skip
        self._listeners: list[tuple[socket.socket, TcpNat]] = []
        self._conns: set[socket.socket] = set()
        #: writes into the TUN that failed (the device going away, a full queue)
        self.write_errors = 0
        self._buf = bytearray(65536)
        self._view = memoryview(self._buf)
        self._hdr = bytearray(HEADER_LEN)  # the virtio-net header of the packet in _buf
        self._iov = [self._hdr, self._buf]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._flush_due = False  # a `_flush` of the replies' commands is scheduled
        self._replies_from = 0.0  # when the first reply of the scheduled `_flush` came
        #: polls the loop a moment after each burst (runtime/busy_poll.py); set in start()
        self.busy_poll: BusyPoll | None = None
        self._closed = False
        self._error_logged_at = float("-inf")
        self._errors_unlogged = 0
        self._evicted_logged = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        from ztun.platform.linux.tun_device import TunDevice

        loop = self._loop = asyncio.get_running_loop()
        self.busy_poll = BusyPoll(loop, self.options.busy_poll)
        self._udp = UdpSessionRunner(self.stack.udp, loop, self.tasks, self._udp_reply,
                                     self._run_commands,
                                     tracker=getattr(self.dispatcher, "tracker", None),
                                     resolve=self._route_identified)  # fmt: skip
        offload = os.environ.get(OFFLOAD_ENV, "1").strip().lower() not in ("0", "false", "off")
        self.device = TunDevice.open(self.interface_name, self.address, self.mtu, offload)
        self.stack.uso = self.device.uso
        atexit.register(self.abort)
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
                    self.stack.nat4 = nat
                else:
                    self.stack.nat6 = nat
                self._listeners.append((ls, nat))
                loop.add_reader(ls.fileno(), self._on_accept, ls, nat)
            if self.auto_route:
                await self._setup_routes()
            self._setup_redirect()
        except BaseException:
            self._teardown()
            raise
        vnet = self.device.vnet_hdr
        loop.add_reader(self.device.fd, self._on_tun_vnet if vnet else self._on_tun)
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        log.info("inbound %s (tun) on %s: %s, mtu %d, offload %s%s%s", self.tag,
                 self.device.name, ", ".join(map(str, self.address)), self.mtu,
                 ("on (TCP, UDP)" if self.device.uso else "on (TCP)") if vnet else "off",
                 ", auto_route" if self.auto_route else "",
                 ", auto_redirect" if self.redirect is not None else "")  # fmt: skip

    def retune(self, options: TunInboundOptions) -> None:
        """A reload changed only options this inbound applies while it runs
        (config/changes.py `LIVE_OPTIONS`): busy polling's limit."""
        self.options = options
        if self.busy_poll is not None:
            self.busy_poll.set_limit(options.busy_poll)
        log.info("inbound %s: busy_poll is now %.0f µs", self.tag, options.busy_poll * 1e6)

    async def _setup_routes(self) -> None:
        from ztun.platform.linux import routes

        mark = self.mark or routes.DEFAULT_MARK
        # Every socket ztun opens from now on carries the mark, which rule 9000 sends to
        # `main` (runtime/dial.py): set before the rules exist, so none is ever unmarked.
        dial.set_own_mark(mark)
        p = routes.plan(
            interface=self.device.name,
            index=self.device.index,
            tun_networks=[a.network for a in self.address],
            route_address=self.route_address,
            route_exclude_address=self.route_exclude_address,
            mark=mark,
            strict_route=self.strict_route,
        )
        self.routes = routes.AutoRoute(p)
        self.routes.apply()

    def _setup_redirect(self) -> None:
        """auto_redirect: TCP that the routes send into the TUN goes to a loopback listener
        instead; where nftables cannot do it, one warning and TCP stays on the TUN. A table a
        killed run left is deleted either way."""
        from ztun.inbound.redirect import RedirectListener
        from ztun.platform.linux import nftables

        if not self.auto_redirect:
            with contextlib.suppress(ZtunError):
                nftables.cleanup_leftovers()
            return
        versions = [v for v, pair in ((4, self.v4), (6, self.v6)) if pair is not None]
        listener = RedirectListener(self.tag, self.dispatcher.route, self._serve)
        try:
            ports = listener.open(versions, reuse_port=self.redirect_reuse_port)
            p = nftables.plan(interface=self.device.name, ports=ports, mark=dial.own_mark(),
                              route_exclude_address=self.route_exclude_address)  # fmt: skip
            self.redirect = nftables.AutoRedirect(p)
            self.redirect.apply()
        except (nftables.NftablesError, OSError) as e:
            listener.close()
            self.redirect = None
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            # A missing library is what `ztun check` (and so run's start) already warned about.
            level = logging.INFO if isinstance(e, nftables.NftablesUnavailable) else logging.WARNING
            log.log(level, "inbound %s: auto_redirect is off (%s); TCP goes through the TUN",
                    self.tag, why.removeprefix("auto_redirect: "))  # fmt: skip
            return
        self.redirect_listener = listener

    async def stop(self) -> None:
        """No new flows; FIN every TCP flow and drain; end UDP sessions; remove routes, TUN.
        The routes go whatever happens on the way (an error, a cancellation)."""
        if self._closed:
            return
        try:
            await self._drain()
        finally:
            self._teardown()
        drops = self.stack.drops
        counts = ", ".join(f"{d.name.lower()}={c}" for d, c in sorted(drops.items()) if c)
        log.info("inbound %s: %d packets read, dropped: %s, failed writes: %d, UDP datagrams "
                 "filtered: %d", self.tag, self.stack.packets, counts or "none",
                 self.write_errors, self.stack.udp_filtered)  # fmt: skip
        bp = self.busy_poll
        if bp is not None and bp.polls:
            log.info("inbound %s: busy polling: %d loop turns, %.1f ms in all", self.tag,
                     bp.polls, bp.polled * 1000)  # fmt: skip

    async def _drain(self) -> None:
        self.stack.accepting = False
        if self.busy_poll is not None:
            self.busy_poll.stop()
        if self.redirect_listener is not None:
            self.redirect_listener.close()
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
        self.stack.stop()
        self._run_commands()
        self._udp.close_all()
        # Keep translating for a moment so the FINs (and their ACKs) reach the applications.
        deadline = loop.time() + DRAIN_TIME
        nats = [n for n in (self.stack.nat4, self.stack.nat6) if n is not None]
        while loop.time() < deadline and any(unfinished(n) for n in nats):
            await asyncio.sleep(0.05)

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
        if self.redirect_listener is not None:
            self.redirect_listener.close()
        for c in list(self._conns):
            with contextlib.suppress(OSError):
                c.close()
        if self.device is not None and loop is not None:
            with contextlib.suppress(Exception):
                loop.remove_reader(self.device.fd)
        if self.redirect is not None:
            self.redirect.remove()
        if self.routes is not None:
            self.routes.remove()
        if self.device is not None:
            self.device.close()
        with contextlib.suppress(Exception):
            atexit.unregister(self.abort)
        log.info("inbound %s (tun): routes restored, device closed", self.tag)

    def abort(self) -> None:
        """Put the routes back and close the TUN now, without draining: for an exit that
        skips stop() (a second signal; the interpreter's exit, through atexit, if the loop
        died without stop()). Synchronous; safe at any point and more than once."""
        if self.redirect is not None:
            self.redirect.remove()
        if self.routes is not None:
            self.routes.remove()
        if self.device is not None:
            self.device.close()

    def _sweep(self) -> None:
        loop = self._loop
        assert loop is not None
        # Rescheduled first, so that an error below cannot end the sweeps for good.
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)
        self.stack.expire(loop.time())
        self._run_commands()
        evicted = sum(n.evicted for n in (self.stack.nat4, self.stack.nat6) if n is not None)
        if evicted > self._evicted_logged:
            # A full table (a SYN flood, say): one line now and then, with the count.
            self._evicted_logged = evicted
            limited(log, logging.WARNING, ("nat-evicted", self.tag),
                    "inbound %s: TCP NAT table full: %d half-open flow(s) evicted so far",
                    self.tag, evicted)  # fmt: skip

    # -- the TUN read loop ----------------------------------------------------------------
    # The stack decides; this loop only reads, writes back what the stack forwarded in place,
    # and carries out the commands it queued. The forward write stays inline here, since it
    # carries nearly every packet.

    def _on_tun(self) -> None:
        started = time.monotonic()
        fd = self.device.fd
        buf, view = self._buf, self._view
        readv, write = os.readv, os.write
        receive = self.stack.receive
        out = self.stack.out
        now = self._loop.time()  # type: ignore[union-attr]
        for _ in range(READ_BATCH):
            try:
                n = readv(fd, [buf])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # the device went away (shutdown)
            try:  # free until it catches (3.11's zero-cost try)
                if receive(buf, n, now) == FORWARD:
                    try:
                        write(fd, view[:n])
                    except OSError:
                        self.write_errors += 1
            except Exception as e:
                self._packet_failed(e)
            if len(out) >= FLUSH:
                self._run_batch()
        if out:
            self._run_batch()
        if self.busy_poll is not None:
            self.busy_poll.after(started)

    def _on_tun_vnet(self) -> None:
        """`_on_tun` for a device with virtio-net headers: a forwarded packet goes back with
        its header (only addresses, ports and checksums changed, so the header still fits)."""
        started = time.monotonic()
        fd = self.device.fd
        buf, view, hdr, iov = self._buf, self._view, self._hdr, self._iov
        readv, writev = os.readv, os.writev
        receive = self.stack.receive_vnet
        out = self.stack.out
        now = self._loop.time()  # type: ignore[union-attr]
        for _ in range(READ_BATCH):
            try:
                n = readv(fd, iov) - HEADER_LEN
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # the device went away (shutdown)
            try:  # as in _on_tun
                if receive(buf, n, hdr, now) == FORWARD:
                    try:
                        writev(fd, [hdr, view[:n]])
                    except OSError:
                        self.write_errors += 1
            except Exception as e:
                self._packet_failed(e)
            if len(out) >= FLUSH:
                self._run_batch()
        if out:
            self._run_batch()
        if self.busy_poll is not None:
            self.busy_poll.after(started)

    def _run_batch(self) -> None:
        """The commands of up to `FLUSH` packets (or replies), carried out together: a UDP
        flow's datagrams among them reach its session as one burst
        (`UdpSessionRunner.execute_all`), which with UDP_SEGMENT is one system call instead of
        one per datagram. At 500 Mbit/s of 1400-byte datagrams to a SOCKS5 proxy the
        per-datagram `send` took about half of ztun's time (py-spy; bench/README.md)."""
        try:
            self._run_commands()
        except Exception as e:
            self._packet_failed(e)

    def _packet_failed(self, e: Exception) -> None:
        """The guard of the read loop: a packet whose handling raised is a counted drop
        (`Drop.ERROR`), and one line a second at most says so, never a traceback per packet
        (the first one's traceback goes to the debug log)."""
        self.stack.drops[Drop.ERROR] += 1
        self._errors_unlogged += 1
        now = self._loop.time()  # type: ignore[union-attr]
        if now - self._error_logged_at < ERROR_LOG_INTERVAL:
            return
        first = self._error_logged_at == float("-inf")
        self._error_logged_at = now
        log.error("inbound %s: %d packet(s) dropped on an unexpected error (a ztun bug; "
                  "please report it), the last: %s: %s", self.tag, self._errors_unlogged,
                  type(e).__name__, e)  # fmt: skip
        self._errors_unlogged = 0
        if first:
            log.debug("inbound %s: the first packet error", self.tag, exc_info=e)

    def _run_commands(self) -> None:
        """Carry out what the stack asked for, in order."""
        out = self.stack.out
        commands = out[:]
        out.clear()
        self._udp.execute_all(commands, self._write, self._write_replies)

    def _write_replies(self, key: Hashable, payloads: list[bytes]) -> None:
        """Replies of one flow on a TUN with UDP super-packets, in as few writes as
        `TunStack.reply_packets` makes them."""
        fd = self.device.fd
        writev = os.writev
        done = 0
        for hdr, pkt, end in self.stack.reply_packets(key, payloads):  # type: ignore[arg-type]
            try:
                writev(fd, [hdr, pkt])
            except OSError as e:
                if hdr is not PLAIN and e.errno == errno.EINVAL and self.stack.uso:
                    # It offered USO, so it should not refuse: plain packets from now on.
                    self.stack.uso = False
                    log.warning("inbound %s: the TUN refused a UDP super-packet; replies go "
                                "one per write from now on", self.tag)  # fmt: skip
                    self._write_replies(key, payloads[done:])
                    return
                self.write_errors += 1
            done = end

    def _write(self, pkt: bytes) -> None:
        """Write one packet ztun built (with an all-zero virtio-net header where used)."""
        try:
            if self.device.vnet_hdr:
                os.writev(self.device.fd, [PLAIN, pkt])
            else:
                os.write(self.device.fd, pkt)
        except OSError:
            self.write_errors += 1

    # -- TCP ------------------------------------------------------------------------------

    def _on_accept(self, ls: socket.socket, nat: TcpNat) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(64):
            try:
                conn, addr = ls.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                limited(log, logging.WARNING, ("accept", self.tag),
                        "inbound %s: accept failed: %s", self.tag, e.strerror or e)  # fmt: skip
                return
            found = self.stack.tcp_flow(nat, int(addr[1]))
            if found is None:
                _reset(conn)
                continue
            self._serve(conn, *found)

    def _serve(self, conn: socket.socket, flow: Flow, outbound: Outbound | SniffFirst) -> None:
        """Connect and relay an accepted flow (the TUN's kernel listener or auto_redirect's)."""
        conn.setblocking(False)
        self._conns.add(conn)
        task = self._loop.create_task(self._tcp_flow(conn, flow, outbound))  # type: ignore[union-attr]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def serve_redirected(self) -> Any:
        """The flow handler for auto_redirect's listener in a worker process
        (runtime/worker.py): flows are served as in the main process, with no TUN, route or
        table of this process's own."""
        self._loop = asyncio.get_running_loop()
        return self._serve

    async def _route_identified(self, flow: Flow, ask: LookupFirst) -> Any:
        """A flow routed once its owner is known: look it up (bounded), route it again."""
        await self.dispatcher.identify(flow)
        return decide_datagram(self.dispatcher.route, flow, "udp", ask.payload)

    async def _tcp_flow(
        self, conn: socket.socket, flow: Flow, outbound: Outbound | SniffFirst | LookupFirst
    ) -> None:
        # The outbound's watch on its socket comes with it, for the relay to take over.
        handover = Handover()
        remote: socket.socket | None = None
        first_bytes = b""
        try:
            if isinstance(outbound, LookupFirst):
                # The rules need the owner: the application's socket still exists (it is
                # connected, to us), so it is looked up now, and the flow routed again; a
                # refusal is an RST after the handshake instead of on the SYN.
                await self.dispatcher.identify(flow)
                outbound = self.dispatcher.route(flow, "tcp")
                if isinstance(outbound, Refused | LookupFirst):
                    flow.end = "blocked"
                    flow.error = getattr(outbound, "reason", "no owner")
                    log_flow(flow)
                    if not getattr(outbound, "drop", False):
                        _reset(conn)
                    return
            if isinstance(outbound, SniffFirst):
                sniffed = await sniff_and_route(conn, flow, outbound, self.dispatcher.route,
                                                self.dispatcher.identify)  # fmt: skip
                if isinstance(sniffed.verdict, Refused):
                    flow.end, flow.error = "blocked", sniffed.verdict.reason
                    log_flow(flow)
                    _reset(conn)
                    return
                outbound, remote, first_bytes = sniffed.verdict, sniffed.remote, sniffed.first_bytes
            if remote is None:
                try:
                    remote = await outbound.connect_tcp(flow.dest, flow.meta, handover)
                except OutboundError as e:
                    flow.end = "failed"
                    flow.error = str(e)
                    log_flow(flow, logging.WARNING)
                    _reset(conn)  # the application sees RST, as from a refusing server
                    return
            try:
                await self.dispatcher.relay_tcp(
                    flow, conn, remote, first_bytes, remote_watch=handover.take()
                )
            finally:
                handover.release()  # still held only if the relay never got it
                remote.close()
        finally:
            self._conns.discard(conn)
            conn.close()

    # -- UDP ------------------------------------------------------------------------------

    def reset_udp(self, why: str) -> int:
        """End every UDP flow and close its session: the network changed, and their sockets
        belong to the old one. The next datagram of each opens a new session. How many."""
        if self._loop is None or self._closed:
            return 0
        n = len(self.stack.udp)
        self.stack.udp.clear("reset", why)
        self._run_commands()
        return n

    def _udp_reply(self, key: Hashable, src: Address, payload: bytes) -> None:
        if self.device is None or self.device.fd < 0:
            return
        loop = self._loop
        assert loop is not None
        self.stack.udp_reply(key, src, payload, loop.time())
        # Written once the loop's other ready callbacks (every session with datagrams) have
        # run, so that replies meet in one batch as the sends do (`_run_batch`).
        if len(self.stack.out) >= FLUSH:
            self._run_batch()
        elif not self._flush_due:
            self._flush_due = True
            self._replies_from = time.monotonic()
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        if self.stack.out and not self._closed:
            self._run_batch()
            if self.busy_poll is not None:
                self.busy_poll.after(self._replies_from)


def _reset(conn: socket.socket) -> None:
    """Close with RST rather than FIN."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
