"""The network monitor's decisions (sans-I/O): netlink events and `now` in, what to do out.

Owns: the host's links, addresses and default routes as rtnetlink reports them, the debounce
(a burst of events is one change), which interface is the egress (`auto_detect_interface`), and
what a change asks for: bind new sockets elsewhere, close the proxy's UDP associations and the
UDP NAT sessions, or nothing. sing-box keeps this in its `route/network.go` (the network
manager) with the netlink part in `tun/monitor_linux.go`; ztun splits it the same way:
`platform/linux/monitor.py` reads netlink and carries out a `Decision`.

The egress is the interface of the best default route (`0.0.0.0/0`, else `::/0`) of the main
table whose link is up, leaving out ztun's own TUN interfaces and loopback: the lowest metric,
then the lowest interface index. auto_route puts the TUN's routes in their own table, so the
main table's default route names the uplink the kernel itself would use without ztun.

Why a settle step: the kernel does not announce every route it removes (IPv4 routes flushed
when a link goes down come without RTM_DELROUTE on some kernels), so incremental events only
say *that* something changed. When the burst is over the I/O layer reads the tables again and
hands them to `settle`; the decision comes from that fresh copy (or, when the read failed,
from what the events said).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

#: A burst of events is over after this many quiet seconds ...
DEBOUNCE = 0.3
#: ... or this long after its first event, whatever keeps coming (a flapping link).
MAX_DELAY = 2.0
#: Bounds of the tables (a host with more links is not a laptop; extra ones are ignored).
MAX_LINKS = 1024
MAX_ROUTES = 1024
MAX_ADDRESSES = 64  # per link
#: Changes remembered for the log line of one settle; more are counted.
MAX_NOTES = 16

MAIN_TABLE = 254
LOOPBACK = "lo"


# -- events (what the I/O layer parses each netlink message into) ----------------------------


@dataclass(frozen=True, slots=True)
class LinkEvent:
    index: int
    name: str
    #: administratively up and the carrier there (IFF_UP and IFF_RUNNING / IFF_LOWER_UP)
    up: bool
    removed: bool = False


@dataclass(frozen=True, slots=True)
class AddressEvent:
    index: int
    #: the address as text ("198.51.100.1", "2001:db8::1")
    address: str
    removed: bool = False


@dataclass(frozen=True, slots=True)
class RouteEvent:
    #: 4 or 6
    family: int
    #: the output interface (the first hop's, for a multipath route); 0 when it has none
    index: int
    table: int = MAIN_TABLE
    dst_len: int = 0
    metric: int = 0
    gateway: str | None = None
    removed: bool = False

    @property
    def is_default(self) -> bool:
        return self.dst_len == 0 and self.table == MAIN_TABLE and self.index > 0


Event = LinkEvent | AddressEvent | RouteEvent


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The tables read again at settle time (a dump of links, addresses and routes)."""

    links: tuple[LinkEvent, ...] = ()
    addresses: tuple[AddressEvent, ...] = ()
    routes: tuple[RouteEvent, ...] = ()


# -- the decision --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Egress:
    """The interface new sockets leave by, and what identifies "the same network" on it."""

    index: int
    name: str
    family: int
    gateway: str | None
    addresses: frozenset[str] = frozenset()

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway else ""
        return f"{self.name}{via}"


@dataclass(frozen=True, slots=True)
class Decision:
    """What a settled change asks for. `rebind`: new sockets go out by `egress` (None: there
    is no egress, and new flows fail at once); `reset`: close the proxy's UDP associations and
    the UDP NAT sessions, whose sockets belong to the network that went away."""

    before: Egress | None
    egress: Egress | None
    #: what the events said, for the log line ("link eth0 down", ...)
    changes: tuple[str, ...]
    rebind: bool
    reset: bool
    #: the first decision, at start: nothing to reset
    initial: bool = False

    @property
    def acts(self) -> bool:
        return self.rebind or self.reset


@dataclass
class _Link:
    name: str
    up: bool
    addresses: set[str] = field(default_factory=set)


class NetworkState:
    """The monitor's state: feed it events, ask `deadline()` when to settle, then `settle`.

    `ignore` names interfaces never chosen as egress (the TUN interfaces ztun made)."""

    def __init__(
        self,
        *,
        ignore: Iterable[str] = (),
        debounce: float = DEBOUNCE,
        max_delay: float = MAX_DELAY,
    ) -> None:
        self.ignore = frozenset(ignore) | {LOOPBACK}
        self.debounce = debounce
        self.max_delay = max_delay
        self.links: dict[int, _Link] = {}
        #: the default routes of the main table, keyed by (family, index, metric, gateway)
        self.routes: set[tuple[int, int, int, str | None]] = set()
        self.egress: Egress | None = None
        self._settled = False
        self._first_at: float | None = None
        self._last_at = 0.0
        self._notes: list[str] = []
        self._more_notes = 0
        #: events dropped because a table was full
        self.overflow = 0

    # -- input ----------------------------------------------------------------------------

    def event(self, ev: Event, now: float) -> None:
        """One netlink event; an event that changes nothing starts no settle."""
        note = self._apply(ev)
        if note is not None:
            self._note(note, now)

    def changed(self, note: str, now: float) -> None:
        """Something may have changed that no event described (netlink messages were lost):
        settle as after an event, from the tables read again."""
        self._note(note, now)

    def _note(self, note: str, now: float) -> None:
        if len(self._notes) < MAX_NOTES:
            self._notes.append(note)
        else:
            self._more_notes += 1
        if self._first_at is None:
            self._first_at = now
        self._last_at = now

    def deadline(self) -> float | None:
        """When to settle: `debounce` after the last event, at most `max_delay` after the
        first; None while nothing waits (or before the first settle, which is immediate)."""
        if self._first_at is None:
            return None
        return min(self._last_at + self.debounce, self._first_at + self.max_delay)

    def pending(self) -> bool:
        return self._first_at is not None or not self._settled

    def settle(self, snapshot: Snapshot | None, now: float) -> Decision:
        """The change is over: take the tables read again (if the read worked), choose the
        egress, and say what to do."""
        del now  # the deadline was the caller's to keep; nothing here waits
        if snapshot is not None:
            self._replace(snapshot)
        before, initial = self.egress, not self._settled
        after = self.choose()
        changes = tuple(self._notes)
        if self._more_notes:
            changes += (f"and {self._more_notes} more",)
        self._notes, self._more_notes, self._first_at = [], 0, None
        self._settled = True
        self.egress = after
        moved = _identity(before) != _identity(after)
        # Same interface, but another address or gateway: sockets of the old network are
        # as stale as after a move (a new DHCP lease, another Wi-Fi behind the same name).
        renumbered = (
            not moved
            and before is not None
            and after is not None
            and (before.addresses != after.addresses or before.gateway != after.gateway)
        )
        return Decision(
            before=before,
            egress=after,
            changes=changes,
            rebind=moved or initial,
            reset=not initial and (moved or renumbered),
            initial=initial,
        )

    def choose(self) -> Egress | None:
        """The egress by the tables as they are: the best usable default route's interface."""
        usable = [r for r in self.routes if self._usable(r[1])]
        if not usable:
            return None
        # IPv4 first (as the kernel lists them), then the lowest metric, then the lowest index.
        family, index, _, gateway = min(usable, key=lambda r: (r[0], r[2], r[1], r[3] or ""))
        link = self.links[index]
        # Only the addresses of the route's family say "the same network": IPv6 temporary
        # addresses come and go every few hours and must not reset an IPv4 egress.
        same = frozenset(a for a in link.addresses if (":" in a) == (family == 6))
        return Egress(index, link.name, family, gateway, same)

    def _usable(self, index: int) -> bool:
        link = self.links.get(index)
        return link is not None and link.up and link.name not in self.ignore

    # -- tables ---------------------------------------------------------------------------

    def _apply(self, ev: Event) -> str | None:
        """Update the tables; a note for the log when the event changed something that can
        matter: what happens on an ignored link (ztun's own TUN coming up, its addresses)
        never starts a settle."""
        if isinstance(ev, LinkEvent):
            note = self._link(ev)
            ignored = ev.name in self.ignore
        elif isinstance(ev, AddressEvent):
            note = self._address(ev)
            ignored = self._ignored(ev.index)
        else:
            note = self._route(ev)
            ignored = self._ignored(ev.index)
        return None if ignored else note

    def _ignored(self, index: int) -> bool:
        link = self.links.get(index)
        return link is not None and link.name in self.ignore

    def _link(self, ev: LinkEvent) -> str | None:
        link = self.links.get(ev.index)
        if ev.removed:
            if link is None:
                return None
            del self.links[ev.index]
            self.routes = {r for r in self.routes if r[1] != ev.index}
            return f"link {link.name} removed"
        if link is None:
            if len(self.links) >= MAX_LINKS:
                self.overflow += 1
                return None
            self.links[ev.index] = _Link(ev.name, ev.up)
            return f"link {ev.name} added ({'up' if ev.up else 'down'})"
        if link.name == ev.name and link.up == ev.up:
            return None  # statistics, flags that do not matter here
        old_name = link.name
        link.name, link.up = ev.name, ev.up
        if old_name != ev.name:
            return f"link {old_name} renamed {ev.name}"
        return f"link {ev.name} {'up' if ev.up else 'down'}"

    def _address(self, ev: AddressEvent) -> str | None:
        link = self.links.get(ev.index)
        if link is None or not _matters(ev.address):
            return None  # its link comes first; a dump at settle catches up anyway
        if ev.removed:
            if ev.address not in link.addresses:
                return None
            link.addresses.discard(ev.address)
            return f"address {ev.address} removed from {link.name}"
        if ev.address in link.addresses:
            return None
        if len(link.addresses) >= MAX_ADDRESSES:
            self.overflow += 1
            return None
        link.addresses.add(ev.address)
        return f"address {ev.address} added to {link.name}"

    def _route(self, ev: RouteEvent) -> str | None:
        if not ev.is_default or ev.family not in (4, 6):
            return None
        key = (ev.family, ev.index, ev.metric, ev.gateway)
        link = self.links.get(ev.index)
        name = link.name if link is not None else f"#{ev.index}"
        what = "default route" if ev.family == 4 else "IPv6 default route"
        via = f" via {ev.gateway}" if ev.gateway else ""
        via += f" dev {name}" + (f" metric {ev.metric}" if ev.metric else "")
        if ev.removed:
            if key not in self.routes:
                return None
            self.routes.discard(key)
            return f"{what}{via} removed"
        if key in self.routes:
            return None
        if len(self.routes) >= MAX_ROUTES:
            self.overflow += 1
            return None
        self.routes.add(key)
        return f"{what}{via} added"

    def _replace(self, snap: Snapshot) -> None:
        links: dict[int, _Link] = {}
        for ev in snap.links[:MAX_LINKS]:
            if not ev.removed:
                links[ev.index] = _Link(ev.name, ev.up)
        for a in snap.addresses:
            link = links.get(a.index)
            if (
                link is not None
                and not a.removed
                and _matters(a.address)
                and len(link.addresses) < MAX_ADDRESSES
            ):
                link.addresses.add(a.address)
        routes = {
            (r.family, r.index, r.metric, r.gateway)
            for r in snap.routes
            if r.is_default and r.family in (4, 6) and not r.removed
        }
        self.links = links
        self.routes = set(sorted(routes, key=repr)[:MAX_ROUTES])


def _identity(e: Egress | None) -> tuple[int, str] | None:
    return None if e is None else (e.index, e.name)


def _matters(address: str) -> bool:
    """Whether an address can tell networks apart: not an IPv6 link-local one (every link has
    one, made from its MAC address, whatever network it is on)."""
    return not address.lower().startswith("fe80:")
