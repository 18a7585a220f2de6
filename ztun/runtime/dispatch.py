"""The dispatcher: between inbounds and outbounds. Every flow of every inbound passes here.

Owns: asking the router for a flow's decision, applying route options (override address/port),
picking the outbound by tag, the TCP relay with its limits, and the one log line per flow
(inbound, source, destination, domain, rule, outbound, bytes, duration, how it ended).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol

from ztun.address import MAX_IP_TEXT, Address, IPAddress, clip
from ztun.log import limited
from ztun.outbound.base import ErrorKind, Outbound, OutboundError
from ztun.route.action import Decision, HijackDNS, NeedOwner, Reject, Route, Sniff
from ztun.route.metadata import FlowMeta, parse_ip
from ztun.runtime.netio import Handover, Waiter
from ztun.runtime.relay import RelayResult, relay
from ztun.runtime.tracker import Tracker
from ztun.stack.flow import Flow, LookupFirst, Refused, SniffFirst

if TYPE_CHECKING:
    from ztun.platform.linux.owner import Owner, OwnerFinder

log = logging.getLogger("ztun.flow")

TCP_IDLE_TIMEOUT = 300.0
UDP_IDLE_TIMEOUT = 60.0


class RouterLike(Protocol):
    final: str

    def decide(
        self, meta: FlowMeta, start: int = 0, options: dict[str, object] | None = None,
        owner_known: bool = True,
    ) -> Decision: ...


def _fmt_source(meta: FlowMeta) -> str:
    if meta.source is None:
        return "-"
    host = f"[{meta.source}]" if meta.source.version == 6 else str(meta.source)
    return f"{host}:{meta.source_port}"


def log_flow(flow: Flow, level: int = logging.INFO) -> None:
    """The one line per flow: key=value pairs, so it greps and parses."""
    if not log.isEnabledFor(level):
        return
    meta = flow.meta
    # `destination` is what the application asked for; `target`, when it differs, where ztun
    # sent the flow (a route-options override, or a name for a FakeIP or reverse-mapped IP).
    asked = flow.dest
    if meta.destination is not None:
        asked = Address(str(meta.destination), meta.destination_port)
    # Names, users and errors may come from a peer: each is clipped (`clip`), so one line
    # stays bounded whatever a client sent.
    parts = [
        f"inbound={meta.inbound or '-'}",
        f"network={meta.network}",
        f"source={_fmt_source(meta)}",
        f"destination={clip(asked)}",
        f"domain={clip(meta.domain or '-')}",
        f"rule={flow.rule}",
        # through a group: the group, then the member that carried it (pick/auto/proxy-a)
        f"outbound={'/'.join(flow.chain) if flow.chain else flow.outbound or '-'}",
        f"up={flow.up}",
        f"down={flow.down}",
        f"duration={time.monotonic() - flow.started:.3f}s",
        f"end={flow.end or '-'}",
    ]
    if meta.user:
        parts.insert(1, f"user={clip(meta.user, 64)}")
    if asked != flow.dest:
        parts.insert(5 if meta.user else 4, f"target={clip(flow.dest)}")
    if meta.process_user_id is not None:
        # The flow's local owner (rules with process or user items): its uid, and its
        # executable when known; a path is the local system's, clipped like the rest.
        parts.append(f"uid={meta.process_user_id}")
        if meta.process_path:
            parts.append(f"process={clip(meta.process_name or '-', 64)}")
            parts.append(f"process_path={clip(meta.process_path, 256)}")
    if flow.error:
        parts.append(f'error="{clip(flow.error, 512)}"')
    log.log(level, "flow " + " ".join(parts))


class RejectedError(OutboundError):
    """The router's decision was reject (or something this inbound cannot do)."""

    def __init__(self, message: str, drop: bool = False) -> None:
        super().__init__(ErrorKind.BLOCKED, message)
        self.drop = drop


#: Sources and destinations repeat from flow to flow: parsing an IP string costs about 2 µs,
#: a cache hit a tenth of that (two per TCP flow). IP objects are immutable, so sharing is safe.
_parse_ip_cached = lru_cache(maxsize=4096)(parse_ip)


def _parse_ip(text: str) -> IPAddress | None:
    # Text longer than any IP literal (brackets allowed) is a name: never a cache key.
    return _parse_ip_cached(text) if len(text) <= MAX_IP_TEXT + 2 else None


def meta_for(
    network: str,
    dest: Address,
    source: tuple[str, int] | None,
    inbound: str,
    user: str | None = None,
) -> FlowMeta:
    ip = _parse_ip(dest.host)
    src = _parse_ip(source[0]) if source else None
    return FlowMeta(
        network=network,  # type: ignore[arg-type]
        destination=ip,
        destination_port=dest.port,
        domain=None if ip is not None else dest.host,
        source=src,
        source_port=source[1] if source else 0,
        inbound=inbound,
        user=user,
    )


#: Gives the domain an earlier DNS answer (reverse mapping) or the FakeIP pool holds for an
#: IP destination, and whether it is a FakeIP address; None when there is none.
NameLookup = Callable[[IPAddress], "tuple[str, bool] | None"]


class Dispatcher:
    def __init__(
        self,
        router: RouterLike,
        outbounds: Mapping[str, Outbound],
        *,
        tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
        udp_idle_timeout: float = UDP_IDLE_TIMEOUT,
        dns_hijack: Outbound | None = None,
        names: NameLookup | None = None,
        tracker: Tracker | None = None,
        owners: OwnerFinder | None = None,
    ) -> None:
        self.router = router
        #: the open flows the API lists and closes (None: nothing tracks them)
        self.tracker = tracker
        self.outbounds = dict(outbounds)
        self.tcp_idle_timeout = tcp_idle_timeout
        self.udp_idle_timeout = udp_idle_timeout
        #: where `hijack-dns` flows go: ztun's DNS module, as an outbound
        self.dns_hijack = dns_hijack
        self.names = names
        #: finds a flow's local owner; set only when some rule has a process or user item
        self.owners = owners
        #: DNS rules read the owner: a flow hijacked to the DNS module is looked up first,
        #: as its queries are matched with its metadata (box.py sets it)
        self.dns_needs_owner = False

    def verdict(
        self, flow: Flow, *, sniffing: bool = True
    ) -> Outbound | Refused | SniffFirst | LookupFirst:
        """Route `flow`: fills its decision and outbound tag (and its destination, after route
        options or a FakeIP address). `SniffFirst` when a `sniff` rule matched and the flow
        was not sniffed yet (with `sniffing=False` the walk goes on as if nothing was found);
        `LookupFirst` when the walk reached a rule on the flow's owner (or hijacks DNS to rules
        that read it) and `identify` has not run: a flow decided before that rule is never
        looked up."""
        owner_known = self.owners is None or flow.identified
        if flow.walked_by is not self.router:
            if flow.walked_by is not None:
                # A reload came between the sniff or lookup and this step: resume_at counts
                # the old rules, so walk the new ones from the start (what was sniffed or
                # looked up stays known).
                flow.resume_at, flow.gathered = 0, None
            flow.walked_by = self.router
        meta = flow.meta
        if self.names is not None and meta.domain is None and meta.destination is not None:
            refused = self._name_of(flow, meta.destination)
            if refused is not None:
                return refused
        while True:
            decision = self.router.decide(flow.meta, flow.resume_at, flow.gathered, owner_known)
            action = decision.action
            if isinstance(action, NeedOwner) or (
                not owner_known and self.dns_needs_owner and isinstance(action, HijackDNS)
            ):
                # look the owner up, then walk on from this rule (it reads the owner, or it
                # hijacks DNS to rules that do)
                flow.resume_at = decision.rule_index or 0
                flow.gathered = dict(decision.options)
                return LookupFirst()
            if not isinstance(action, Sniff):
                break
            flow.resume_at, flow.gathered = decision.resume_at, dict(decision.options)
            if sniffing and not flow.sniffed:
                flow.decision = decision
                return SniffFirst(
                    action.sniffers, action.timeout_ms / 1000, action.override_destination
                )
        flow.decision = decision
        if isinstance(action, Route):
            opts = decision.options
            if "override_address" in opts or "override_port" in opts:
                flow.dest = Address(
                    str(opts.get("override_address", flow.dest.host)),
                    int(opts.get("override_port", flow.dest.port)),  # type: ignore[call-overload]
                )
            flow.outbound = action.outbound
            outbound = self.outbounds.get(action.outbound)
            if outbound is None:  # the checker rejects this; guard anyway
                return Refused(f"no outbound tagged {action.outbound!r}")
            if flow.domain_from == "reverse" and outbound.resolves_remotely:
                # The proxy gets the name the application asked for, not ztun's answer for it.
                flow.dest = Address(str(flow.meta.domain), flow.dest.port)
            return outbound
        flow.outbound = str(action)
        if isinstance(action, Reject):
            return Refused(f"rejected by rule {flow.rule}", action.method == "drop")
        if isinstance(action, HijackDNS):
            if self.dns_hijack is None:
                return Refused("hijack-dns: ztun's DNS module is not running")
            return self.dns_hijack
        return Refused(f"unsupported action {action}")

    def _name_of(self, flow: Flow, ip: IPAddress) -> Refused | None:
        assert self.names is not None
        found = self.names(ip)
        if found is None:
            return None
        domain, fake = found
        if not domain:
            # A FakeIP address nobody was given (ztun restarted without a cache file, or
            # the pool reused it): there is nowhere real to send the flow.
            flow.outbound = "fakeip"
            return Refused(f"{ip} is a FakeIP address with no name (any more)")
        flow.meta = replace(flow.meta, domain=domain)
        if fake:
            # A FakeIP address means nothing outside ztun: every outbound gets the name.
            flow.domain_from = "fakeip"
            flow.dest = Address(domain, flow.dest.port)
        else:
            flow.domain_from = "reverse"
        return None

    async def identify(self, flow: Flow) -> None:
        """Look up the local owner of the flow's source socket (the TUN: the application's
        socket, its source and original destination in `flow.meta`), once per flow."""
        if flow.identified:
            return
        meta = flow.meta
        if self.owners is not None and meta.source is not None and meta.destination is not None:
            try:
                owner = await self.owners.find(meta.network, meta.source, meta.source_port,
                                               meta.destination, meta.destination_port)  # fmt: skip
            except Exception as e:  # a bug: the flow goes on with an unknown owner
                limited(log, logging.WARNING, "owner-lookup", "owner lookup failed: %s", e)
                owner = None
            adopt_owner(flow, owner)
        flow.identified = True

    async def owner_of_peer(
        self, network: str, peer: tuple[str, int], local: tuple[str, int]
    ) -> Owner | None:
        """The owner of a client connected to ztun from this host (the mixed inbound): its
        socket is `peer` talking to ztun's `local`. None when no rule needs owners."""
        if self.owners is None:
            return None
        try:
            return await self.owners.find(network, peer[0], peer[1], local[0], local[1])
        except Exception as e:  # a bug: the client goes on with an unknown owner
            limited(log, logging.WARNING, "owner-lookup", "owner lookup failed: %s", e)
            return None

    def decide(self, flow: Flow) -> Outbound:
        """`verdict` for a flow whose request already names its destination (the mixed
        inbound's TCP): no sniffing; raises RejectedError instead of returning `Refused`."""
        verdict = self.verdict(flow, sniffing=False)
        if isinstance(verdict, Refused):
            raise RejectedError(verdict.reason, verdict.drop)
        assert not isinstance(verdict, SniffFirst | LookupFirst)  # see identify
        return verdict

    def route(self, flow: Flow, network: str) -> Outbound | Refused | SniffFirst | LookupFirst:
        """`verdict`, as the inbound cores take it (`stack.flow.Decide`): an outbound that
        refuses `network` (block) gives `Refused` too."""
        verdict = self.verdict(flow)
        if isinstance(verdict, Refused | SniffFirst | LookupFirst):
            return verdict
        if network == "tcp" and verdict.refuses_tcp:
            verdict.counters.blocked_tcp += 1
            return Refused(f"blocked by outbound {verdict.tag!r}")
        if network == "udp" and verdict.drops_udp:
            verdict.counters.blocked_udp += 1
            return Refused(f"blocked by outbound {verdict.tag!r}")
        return verdict

    async def open_tcp(self, flow: Flow, handover: Handover | None = None) -> socket.socket:
        """Decide and connect; raises OutboundError (RejectedError included), logged here.
        `handover`: see `Outbound.connect_tcp` (the caller then owns the socket's watch)."""
        try:
            outbound = self.decide(flow)
            return await outbound.connect_tcp(flow.dest, flow.meta, handover)
        except OutboundError as e:
            flow.end = "blocked" if e.kind is ErrorKind.BLOCKED else "failed"
            flow.error = str(e)
            log_flow(flow, logging.INFO if e.kind is ErrorKind.BLOCKED else logging.WARNING)
            raise

    async def relay_tcp(
        self,
        flow: Flow,
        client: socket.socket,
        remote: socket.socket,
        initial_up: bytes = b"",
        client_watch: Waiter | None = None,
        remote_watch: Waiter | None = None,
    ) -> RelayResult:
        """Relay until both sides end (or idle, or cancel); logs the flow line. The watches
        are handshake Waiters for the relay to take over (see `relay`)."""
        result = RelayResult()
        # A group outbound learns how to end this flow (interrupt_exist_connections) and
        # tells which member carries it.
        attach = getattr(self.outbounds.get(flow.outbound or ""), "attach", None)
        if attach is not None:
            flow.chain = attach(remote, result.close)
        tracker = self.tracker
        entry = (tracker.add(flow, "tcp", result.moved, result.close)
                 if tracker is not None else None)  # fmt: skip
        try:
            await relay(
                client,
                remote,
                idle_timeout=self.tcp_idle_timeout,
                initial_up=initial_up,
                result=result,
                client_watch=client_watch,
                remote_watch=remote_watch,
            )
        finally:
            if tracker is not None:
                tracker.remove(entry)
            flow.up, flow.down = result.up, result.down
            flow.end = result.reason
            flow.error = result.error
            log_flow(flow)
        return result

    async def close(self) -> None:
        if self.owners is not None:
            o = self.owners
            log.debug("owner lookups: %d found, %d unknown, %d cut short by their bound",
                      o.found, o.unknown, o.timeouts)  # fmt: skip
            o.close()
        for ob in self.outbounds.values():
            await ob.close()


def adopt_owner(flow: Flow, owner: Owner | None) -> None:
    """Put what is known of the flow's owner into its metadata; the flow is identified."""
    flow.identified = True
    if owner is None or owner.user_id is None:
        return
    flow.meta = flow.meta.with_owner(owner.name, owner.path, owner.user, owner.user_id)


async def wait_closed(tasks: set[asyncio.Task[None]], grace: float) -> bool:
    """Wait up to `grace` seconds for `tasks`; cancel the rest. True if all ended on their own."""
    if not tasks:
        return True
    _, pending = await asyncio.wait(set(tasks), timeout=grace)
    for t in pending:
        t.cancel()
    if pending:
        await asyncio.wait(pending, timeout=2.0)
    return not pending
