"""ztun's own sockets: the one place that gives them their fwmark (and interface).

Owns: the process-wide *own mark* and `DialOptions`, which every socket factory of ztun applies
to a socket before it connects or sends: the direct outbound (TCP and UDP), the socks outbound
(CONNECT, SOCKS4/4a through python-socks, the UDP ASSOCIATE control and relay sockets), rule-set
downloads (`provider/ruleset.py`, direct and through a socks detour) and, since every DNS
transport takes its sockets from an outbound, DNS.

Why one process-wide mark rather than a list of excluded addresses: a tun inbound's auto_route
sends exactly one fwmark to the main table (rule 9000, `platform/linux/routes.py`). A socket that
carries it never enters the TUN, whatever address it goes to: a SOCKS5 server whose UDP relay
has another address than its TCP port, or a server name that resolves to a new address, cannot
loop. The tun inbound sets the mark before it adds its rules and clears it after removing them;
without auto_route it is 0 and no socket is marked (so `ztun check` and a proxy-only `ztun run`
need no CAP_NET_ADMIN).

The *default interface* is sing-box's `route.default_interface`, or, with
`route.auto_detect_interface`, the egress the network monitor chose
(`platform/linux/monitor.py`, `route/network.py`): every outgoing socket without a
`bind_interface` of its own is bound to it (and still carries the own mark), so a change of
uplink moves new flows at once. While auto-detection finds no egress, every outgoing socket
fails at once with `NoEgressError` instead of hanging in a connect that cannot work (or, under
auto_route, looping back into the TUN). Sockets ztun listens on (`LOCAL`) are never bound.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from ztun.errors import ZtunError

SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)

_own_mark = 0
#: the interface outgoing sockets are bound to (None: not bound)
_default_interface: str | None = None
#: auto_detect_interface is on: no default interface means no egress
_detect = False


def set_own_mark(mark: int) -> None:
    """The fwmark auto_route sends to the main table (0: auto_route is off)."""
    global _own_mark
    _own_mark = mark


def own_mark() -> int:
    return _own_mark


def set_default_interface(name: str | None, *, detected: bool = False) -> None:
    """Bind outgoing sockets to `name` from now on. `detected`: the name comes from
    auto_detect_interface, so None means "no egress" (new sockets fail at once) rather than
    "not bound"."""
    global _default_interface, _detect
    _default_interface, _detect = name, detected


def default_interface() -> str | None:
    return _default_interface


def check_egress() -> None:
    """NoEgressError while auto-detection has found no egress interface."""
    if _detect and _default_interface is None:
        raise NoEgressError(
            "no network: auto_detect_interface finds no default route on an interface that is up"
        )


class DialError(ZtunError):
    """A dial option could not be set on a socket (SO_MARK needs CAP_NET_ADMIN)."""


class NoEgressError(DialError):
    """auto_detect_interface has no interface to send by (no default route on a link that is
    up): the flow fails at once with this reason."""


@dataclass(frozen=True)
class DialOptions:
    """How one outbound's sockets leave: `routing_mark` and `bind_interface` as configured.

    The mark a socket gets: its own `routing_mark` when set; none when it is bound to an
    interface of its own (it goes where the user said); else the own mark (auto_route's).
    The interface: its own `bind_interface`, else (`egress`: an outgoing socket) the default
    interface, when there is one."""

    routing_mark: int | None = None
    bind_interface: str | None = None
    #: an outgoing socket: bound to the default interface; False for sockets ztun listens on
    egress: bool = True

    def mark(self) -> int:
        if self.routing_mark:
            return self.routing_mark
        if self.bind_interface:
            return 0
        return _own_mark

    def interface(self) -> str | None:
        if self.bind_interface:
            return self.bind_interface
        return _default_interface if self.egress else None

    def apply(self, sock: socket.socket) -> None:
        """Set the interface and the mark on `sock`; DialError says which failed and why
        (NoEgressError: auto-detection has no interface to give it)."""
        if self.egress and not self.bind_interface:
            check_egress()
        interface = self.interface()
        if interface:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode())
            except OSError as e:
                raise DialError(f"cannot bind to interface {interface!r}: {_why(e)}") from None
        mark = self.mark()
        if mark:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            except OSError as e:
                raise DialError(
                    f"cannot set routing mark {mark:#x} (needs CAP_NET_ADMIN): {_why(e)}"
                ) from None

    def socket(self, family: int, kind: int) -> socket.socket:
        """A new socket with the options applied (closed again if they cannot be)."""
        sock = socket.socket(family, kind)
        try:
            self.apply(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def create_connection(
        self, address: tuple[str, int], timeout: float | None = None, *_: Any
    ) -> socket.socket:
        """`socket.create_connection` (blocking) with the options applied to every attempt;
        for synchronous start-up code (rule-set downloads through http.client)."""
        host, port = address
        last: OSError | None = None
        for family, kind, proto, _name, addr in socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM
        ):
            sock = socket.socket(family, kind, proto)
            try:
                self.apply(sock)
                sock.settimeout(timeout)
                sock.connect(addr)
                return sock
            except DialError as e:
                sock.close()
                raise OSError(str(e)) from None
            except OSError as e:
                sock.close()
                last = e
        raise last or OSError(f"cannot resolve {host}")


def _why(e: OSError) -> str:
    return e.strerror or str(e)


#: For outgoing sockets that have no outbound of their own (the socks outbound, rule-set
#: downloads): the own mark and the default interface.
OWN = DialOptions()
#: For sockets ztun listens or answers on (the mixed inbound's listener and UDP relay): the
#: own mark only, never bound to the uplink.
LOCAL = DialOptions(egress=False)
