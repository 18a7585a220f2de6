"""The network monitor on Linux: rtnetlink events in, `route.network` decisions out.

Owns: a netlink socket subscribed to link, IPv4/IPv6 address and IPv4/IPv6 route changes; the
parse of each message into a `route.network` event; the dump of links, addresses and routes
that a settle reads; the debounce timer; and handing each `Decision` to the event loop of
`ztun run` (`runtime/network.py` carries it out). Every decision is the pure state's.

Why pyroute2's `AsyncIPRoute` on a thread of its own: it is the asyncio API pyroute2 0.9
keeps (the synchronous `IPRoute` of 0.9 is a wrapper that drives the same code on a private
loop, and refuses to run inside a running one), but it opens its socket with
`create_datagram_endpoint`, which uvloop refuses for a netlink socket ("invalid family 16").
So the monitor runs a plain asyncio loop on a daemon thread; only a decision crosses over,
by `call_soon_threadsafe`, a few times per network change.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from ztun.errors import ZtunError
from ztun.route.network import (
    AddressEvent,
    Decision,
    Event,
    LinkEvent,
    NetworkState,
    RouteEvent,
    Snapshot,
)

log = logging.getLogger("ztun.monitor")

# rtnetlink multicast groups (linux/rtnetlink.h RTMGRP_*)
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = (
    RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
)

IFF_UP = 0x1
IFF_RUNNING = 0x40
RTN_UNICAST = 1
#: Seconds a dump (at start and at every settle) may take.
DUMP_TIMEOUT = 5.0
#: Seconds `start` waits for the first decision, and `stop` for the thread.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 3.0
#: Reading netlink failed this often in a row: the monitor gives up (and says so).
MAX_READ_ERRORS = 20
#: Events queued between the reader and the settle loop; beyond, a resync is forced.
MAX_QUEUED = 4096


class MonitorError(ZtunError):
    """The network monitor could not start (no netlink, a dump that never answered)."""


def parse(msg: Any) -> Event | None:
    """A `route.network` event from one pyroute2 rtnetlink message, or None (not one we
    follow, or one missing what it should carry: never an exception into the reader)."""
    try:
        return _parse(msg)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError):
        return None


def _parse(msg: Any) -> Event | None:
    event = str(msg.get("event", ""))
    removed = event.startswith("RTM_DEL")
    if event in ("RTM_NEWLINK", "RTM_DELLINK"):
        flags = int(msg.get("flags", 0))
        name = msg.get("IFLA_IFNAME") or f"#{msg['index']}"
        up = bool(flags & IFF_UP) and bool(flags & IFF_RUNNING)
        return LinkEvent(int(msg["index"]), str(name), up, removed)
    if event in ("RTM_NEWADDR", "RTM_DELADDR"):
        address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if not address:
            return None
        return AddressEvent(int(msg["index"]), str(address), removed)
    if event in ("RTM_NEWROUTE", "RTM_DELROUTE"):
        family = {socket.AF_INET: 4, socket.AF_INET6: 6}.get(msg.get("family"))
        if family is None or msg.get("type", RTN_UNICAST) != RTN_UNICAST:
            return None
        oif = msg.get("RTA_OIF")
        gateway = msg.get("RTA_GATEWAY")
        if oif is None:
            hops = msg.get("RTA_MULTIPATH") or []
            first = hops[0] if hops else None
            if first is not None:
                oif = first.get("oif")
                gateway = gateway or first.get("RTA_GATEWAY")
        return RouteEvent(
            family=family,
            index=int(oif or 0),
            table=int(msg.get("RTA_TABLE") or msg.get("table") or 0),
            dst_len=int(msg.get("dst_len", 0)),
            metric=int(msg.get("RTA_PRIORITY") or 0),
            gateway=str(gateway) if gateway else None,
            removed=removed,
        )
    return None


class NetworkMonitor:
    """Follows the host's network on a thread; `on_decision` runs in the caller's loop."""

    def __init__(
        self,
        on_decision: Callable[[Decision], None],
        *,
        ignore: Iterable[str] = (),
        debounce: float | None = None,
        max_delay: float | None = None,
    ) -> None:
        kwargs: dict[str, float] = {}
        if debounce is not None:
            kwargs["debounce"] = debounce
        if max_delay is not None:
            kwargs["max_delay"] = max_delay
        self.state = NetworkState(ignore=ignore, **kwargs)
        self.on_decision = on_decision
        self._loop: asyncio.AbstractEventLoop | None = None  # the caller's
        self._tloop: asyncio.AbstractEventLoop | None = None  # the thread's
        self._thread: threading.Thread | None = None
        self._first: concurrent.futures.Future[Decision] = concurrent.futures.Future()
        self._stop: asyncio.Event | None = None
        #: settles whose dump failed (the decision then came from the events alone)
        self.dump_failures = 0

    async def start(self) -> Decision:
        """Subscribe, read the tables, settle once; the first decision (also handed to
        `on_decision` before this returns). MonitorError when netlink cannot be read."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._main, name="ztun-monitor", daemon=True)
        self._thread.start()
        try:
            first = await asyncio.wait_for(asyncio.wrap_future(self._first), START_TIMEOUT)
        except TimeoutError:
            self.stop()
            raise MonitorError("network monitor: no answer from netlink in time") from None
        except MonitorError:
            self.stop()
            raise
        self.on_decision(first)
        return first

    def stop(self) -> None:
        """End the thread (bounded: it is a daemon, so a stuck one never delays the exit)."""
        tloop, stop = self._tloop, self._stop
        if tloop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed
                tloop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT)
            self._thread = None

    # -- the thread -----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            asyncio.run(self._watch())
        except BaseException as e:  # the thread's end must reach the log, not stderr
            if not self._first.done():
                error = e if isinstance(e, MonitorError) else MonitorError(f"network monitor: {e}")
                self._first.set_exception(error)
            else:
                log.error("network monitor stopped: %s", e)

    async def _watch(self) -> None:
        from pyroute2 import AsyncIPRoute

        loop = self._tloop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        events = AsyncIPRoute()
        queries = AsyncIPRoute()
        queue: asyncio.Queue[Event | str] = asyncio.Queue(MAX_QUEUED)
        reader: asyncio.Task[None] | None = None
        try:
            try:
                # Subscribed before the first dump: no change can fall between the two.
                await events.bind(groups=GROUPS)
                snapshot = await asyncio.wait_for(self._dump(queries), DUMP_TIMEOUT)
            except (OSError, TimeoutError) as e:
                why = "no answer in time" if isinstance(e, TimeoutError) else e
                raise MonitorError(f"network monitor: cannot read the network state: {why}") \
                    from None  # fmt: skip
            self._first.set_result(self.state.settle(snapshot, loop.time()))
            reader = loop.create_task(self._read(events, queue))
            stopping = loop.create_task(self._stop.wait())
            while not self._stop.is_set():
                deadline = self.state.deadline()
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                getter = loop.create_task(queue.get())
                done, _ = await asyncio.wait({getter, stopping}, timeout=timeout,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if getter in done:
                    item = getter.result()
                    if isinstance(item, str):
                        self.state.changed(item, loop.time())
                    else:
                        self.state.event(item, loop.time())
                    continue
                getter.cancel()
                if stopping in done:
                    break
                deadline = self.state.deadline()
                if deadline is not None and loop.time() >= deadline:
                    await self._settle(queries)
            stopping.cancel()
        finally:
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
            for ipr in (events, queries):
                with contextlib.suppress(Exception):
                    ipr.close()

    async def _settle(self, queries: Any) -> None:
        loop = asyncio.get_running_loop()
        snapshot: Snapshot | None
        try:
            snapshot = await asyncio.wait_for(self._dump(queries), DUMP_TIMEOUT)
        except (OSError, TimeoutError) as e:
            self.dump_failures += 1
            log.warning("network monitor: cannot read the tables again (%s): deciding from "
                        "the events", e or "no answer in time")  # fmt: skip
            snapshot = None
        decision = self.state.settle(snapshot, loop.time())
        caller = self._loop
        if caller is not None:
            with contextlib.suppress(RuntimeError):  # ztun's loop is closing
                caller.call_soon_threadsafe(self.on_decision, decision)

    async def _read(self, events: Any, queue: asyncio.Queue[Event | str]) -> None:
        """Parse every message into the queue. A failed read (ENOBUFS: the kernel dropped
        messages) forces a resync; too many in a row end the monitor, said in the log."""
        errors = 0
        while True:
            try:
                async for msg in events.get():
                    errors = 0
                    ev = parse(msg)
                    if ev is None:
                        continue
                    if queue.full():
                        # Safe to drop: the queued events already lead to a settle, which
                        # reads the tables again; only a note for the log line is lost.
                        continue
                    queue.put_nowait(ev)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                errors += 1
                if errors >= MAX_READ_ERRORS:
                    log.error("network monitor: netlink keeps failing (%s): it stops; the "
                              "egress stays %s", e, self.state.egress or "none")  # fmt: skip
                    return
                await asyncio.sleep(0.1)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(f"netlink messages lost ({e})")

    async def _dump(self, ipr: Any) -> Snapshot:
        links: list[LinkEvent] = []
        addresses: list[AddressEvent] = []
        routes: list[RouteEvent] = []
        for msg in [m async for m in await ipr.get_links()]:
            ev = parse(msg)
            if isinstance(ev, LinkEvent):
                links.append(ev)
        for msg in [m async for m in await ipr.get_addr()]:
            ev = parse(msg)
            if isinstance(ev, AddressEvent):
                addresses.append(ev)
        for family in (socket.AF_INET, socket.AF_INET6):
            async for msg in await ipr.get_routes(family=family):
                ev = parse(msg)
                if isinstance(ev, RouteEvent) and ev.is_default:
                    routes.append(ev)
        return Snapshot(tuple(links), tuple(addresses), tuple(routes))
