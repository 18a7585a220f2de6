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
from collections.abc import Mapping
from functools import lru_cache
from typing import Protocol

from ztun.address import Address
from ztun.outbound.base import ErrorKind, Outbound, OutboundError
from ztun.route.action import Decision, HijackDNS, Reject, Route
from ztun.route.metadata import FlowMeta, parse_ip
from ztun.runtime.netio import Handover, Waiter
from ztun.runtime.relay import RelayResult, relay
from ztun.stack.flow import Flow, Refused

log = logging.getLogger("ztun.flow")

TCP_IDLE_TIMEOUT = 300.0
UDP_IDLE_TIMEOUT = 60.0


class RouterLike(Protocol):
    final: str

    def decide_all(self, meta: FlowMeta) -> Decision: ...


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
    parts = [
        f"inbound={meta.inbound or '-'}",
        f"network={meta.network}",
        f"source={_fmt_source(meta)}",
        f"destination={flow.dest}",
        f"domain={meta.domain or '-'}",
        f"rule={flow.rule}",
        f"outbound={flow.outbound or '-'}",
        f"up={flow.up}",
        f"down={flow.down}",
        f"duration={time.monotonic() - flow.started:.3f}s",
        f"end={flow.end or '-'}",
    ]
    if meta.user:
        parts.insert(1, f"user={meta.user}")
    if flow.error:
        parts.append(f'error="{flow.error}"')
    log.log(level, "flow " + " ".join(parts))


class RejectedError(OutboundError):
    """The router's decision was reject (or something this inbound cannot do)."""

    def __init__(self, message: str, drop: bool = False) -> None:
        super().__init__(ErrorKind.BLOCKED, message)
        self.drop = drop


#: Sources and destinations repeat from flow to flow: parsing an IP string costs about 2 µs,
#: a cache hit a tenth of that (two per TCP flow). IP objects are immutable, so sharing is safe.
_parse_ip = lru_cache(maxsize=4096)(parse_ip)


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


class Dispatcher:
    def __init__(
        self,
        router: RouterLike,
        outbounds: Mapping[str, Outbound],
        *,
        tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
        udp_idle_timeout: float = UDP_IDLE_TIMEOUT,
    ) -> None:
        self.router = router
        self.outbounds = dict(outbounds)
        self.tcp_idle_timeout = tcp_idle_timeout
        self.udp_idle_timeout = udp_idle_timeout

    def decide(self, flow: Flow) -> Outbound:
        """Route `flow`: fills its decision and outbound tag; raises RejectedError."""
        decision = self.router.decide_all(flow.meta)
        flow.decision = decision
        action = decision.action
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
                raise RejectedError(f"no outbound tagged {action.outbound!r}")
            return outbound
        if isinstance(action, Reject):
            flow.outbound = str(action)
            raise RejectedError(f"rejected by rule {flow.rule}", drop=action.method == "drop")
        if isinstance(action, HijackDNS):
            flow.outbound = str(action)
            raise RejectedError("hijack-dns is not available on this inbound")
        raise RejectedError(f"unsupported action {action}")

    def route(self, flow: Flow, network: str) -> Outbound | Refused:
        """`decide`, as the inbound cores take it: the outbound, or `Refused` (a reject rule,
        an action this inbound cannot carry out, or an outbound that refuses `network`)."""
        try:
            outbound = self.decide(flow)
        except RejectedError as e:
            return Refused(str(e), e.drop)
        if network == "tcp" and outbound.refuses_tcp:
            outbound.counters.blocked_tcp += 1
            return Refused(f"blocked by outbound {outbound.tag!r}")
        if network == "udp" and outbound.drops_udp:
            outbound.counters.blocked_udp += 1
            return Refused(f"blocked by outbound {outbound.tag!r}")
        return outbound

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
            flow.up, flow.down = result.up, result.down
            flow.end = result.reason
            flow.error = result.error
            log_flow(flow)
        return result

    async def close(self) -> None:
        for ob in self.outbounds.values():
            await ob.close()


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
