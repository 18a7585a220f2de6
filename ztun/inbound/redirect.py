"""The listener behind auto_redirect: TCP connections that nftables redirected from the TUN's
routes to loopback (ztun.platform.linux.nftables), accepted, given their original destination
(SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST) and routed like a TUN flow.

A redirected connection is handed to the same code as a flow the TUN's kernel listener
accepted (`serve`: sniffing when a rule asks, the outbound, the splice relay), so the two paths
differ only in how the flow's destination is learned. One difference the application can see:
the TUN routes a flow on its SYN, so a refused one gets its RST before the handshake
(ECONNREFUSED); a redirected flow is routed once the kernel accepted it, so a refused one is
reset just after (ECONNRESET, from connect() itself or the first read or write), as with
sing-box's auto_redirect.

A connection to the listener that nftables did not redirect (a local program connecting to the
port itself) is reset: conntrack gives it an "original destination" all the same, the
listener's own address, and routing that would connect the listener to itself again and again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from ztun.address import Address, IPAddress
from ztun.log import limited
from ztun.route.metadata import FlowMeta
from ztun.runtime.dispatch import log_flow
from ztun.stack.flow import Decide, Flow, Refused

log = logging.getLogger("ztun.inbound")

#: getsockopt names of <linux/netfilter_ipv4.h> and <linux/netfilter_ipv6/ip6_tables.h>.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
#: Connections accepted per wake-up before other callbacks get a turn.
ACCEPT_BATCH = 64
BACKLOG = 4096

#: What the inbound does with an accepted, routed flow (the tun inbound's `_serve`).
Serve = Callable[[socket.socket, Flow, Any], None]


def original_destination(conn: socket.socket, family: int) -> tuple[bytes, int] | None:
    """The packed address and port the application connected to before the redirect; None
    when the connection was not redirected."""
    try:
        if family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            return raw[4:8], struct.unpack_from("!H", raw, 2)[0]
        raw = conn.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        return raw[8:24], struct.unpack_from("!H", raw, 2)[0]
    except OSError:
        return None


@lru_cache(maxsize=4096)
def _ip(packed: bytes) -> tuple[IPAddress, str]:
    """A packed address as an IP object and its text (cached: addresses repeat)."""
    ip = ipaddress.ip_address(packed)
    return ip, str(ip)


@lru_cache(maxsize=4096)
def _source_ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text.partition("%")[0])


class RedirectListener:
    """Loopback listeners (127.0.0.1 and ::1, a free port each) for one tun inbound."""

    def __init__(self, tag: str, decide: Decide, serve: Serve) -> None:
        self.tag = tag
        self.decide = decide
        self.serve = serve
        self.accepting = True
        #: connections reset because nftables had not redirected them
        self.not_redirected = 0
        self._listeners: list[socket.socket] = []
        #: each listener's family and own address (what `_on_accept` takes)
        self._accept_args: dict[socket.socket, tuple[int, tuple[bytes, int]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        #: version → port, once open
        self.ports: dict[int, int] = {}

    def open(self, versions: list[int], *, ports: dict[int, int] | None = None,
             reuse_port: bool = False) -> dict[int, int]:  # fmt: skip
        """Bind and listen for these IP versions (on `ports`, else a free port each); returns
        version → port. `reuse_port`: SO_REUSEPORT, so that worker processes can listen on
        the same ports and the kernel spreads connections over them (runtime/workers.py).
        OSError if a family cannot listen (no ::1 without IPv6 on `lo`)."""
        loop = self._loop = asyncio.get_running_loop()
        ports = dict(ports or {})
        try:
            for version in versions:
                fam = socket.AF_INET if version == 4 else socket.AF_INET6
                ls = socket.socket(fam, socket.SOCK_STREAM)
                self._listeners.append(ls)
                if fam == socket.AF_INET6:
                    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if reuse_port:
                    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                ls.bind(("127.0.0.1" if version == 4 else "::1", ports.get(version, 0)))
                # Set once here: Linux copies it to every accepted socket.
                with contextlib.suppress(OSError):
                    ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                ls.listen(BACKLOG)
                ls.setblocking(False)
                ports[version] = ls.getsockname()[1]
                own = (socket.inet_pton(fam, ls.getsockname()[0]), ports[version])
                self._accept_args[ls] = (fam, own)
                loop.add_reader(ls.fileno(), self._on_accept, ls, fam, own)
        except BaseException:
            self.close()
            raise
        self.ports = ports
        return ports

    def close(self, serve_queued: bool = False) -> None:
        """No new connections (a redirected SYN now gets the kernel's RST). `serve_queued`:
        first accept and serve what waits in each listener's queue (a worker retiring after a
        reload: closing one socket of a SO_REUSEPORT group resets the connections queued on
        it), up to one full backlog each."""
        if serve_queued and self.accepting and self._loop is not None:
            for ls, (fam, own) in self._accept_args.items():
                for _ in range(BACKLOG // ACCEPT_BATCH):
                    if self._on_accept(ls, fam, own):
                        break
        self.accepting = False
        self._accept_args.clear()
        for ls in self._listeners:
            if self._loop is not None:
                with contextlib.suppress(ValueError, OSError, RuntimeError):
                    self._loop.remove_reader(ls.fileno())
            ls.close()
        self._listeners.clear()

    def _on_accept(self, ls: socket.socket, family: int, own: tuple[bytes, int]) -> bool:
        """Accept up to `ACCEPT_BATCH` connections; True once the queue is empty (or accept
        failed). `own`: the listener's packed address and port, what a connection that was
        not redirected reports as its original destination."""
        loop = self._loop
        assert loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = ls.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as e:
                limited(log, logging.WARNING, ("redirect-accept", self.tag),
                        "inbound %s: accept failed: %s", self.tag, e.strerror or e)  # fmt: skip
                return True
            if not self.accepting:
                reset(conn)
                continue
            dest = original_destination(conn, family)
            if dest is None or dest == own:
                self.not_redirected += 1
                reset(conn)
                continue
            dst_ip, dst_text = _ip(dest[0])
            meta = FlowMeta(network="tcp", destination=dst_ip, destination_port=dest[1],
                            source=_source_ip(addr[0]), source_port=addr[1],
                            inbound=self.tag)  # fmt: skip
            flow = Flow(meta, Address(dst_text, dest[1]), loop.time())
            verdict = self.decide(flow, "tcp")
            if isinstance(verdict, Refused):
                flow.end, flow.error = "blocked", verdict.reason
                log_flow(flow)
                if verdict.drop:
                    conn.close()  # nothing better after the handshake: a FIN, no reply
                else:
                    reset(conn)
                continue
            self.serve(conn, flow, verdict)
        return False


def reset(conn: socket.socket) -> None:
    """Close with RST rather than FIN."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
