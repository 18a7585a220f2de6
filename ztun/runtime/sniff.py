"""Sniffing a TCP flow's first bytes before it is routed again, without making a server that
speaks first wait.

sing-box waits for the client's first bytes up to its sniff timeout (300 ms) before it even
connects; a protocol where the server speaks first (SSH, SMTP, FTP, most databases) pays that
wait on every connection. ztun instead connects the flow's likely outbound ("what the rules
say if sniffing finds nothing") a few milliseconds after accepting it, while it waits:
- the client's bytes arrive first (TLS, HTTP, almost everything): they are sniffed and the flow
  is routed again; if the route is still the likely one the early connection is used, else it
  is dropped and the flow connects where it now belongs;
- the server's first bytes arrive first on the early connection (a banner): the flow keeps it
  at once, so the banner waits only for the short hold below;
- neither before the sniff timeout: the flow keeps the early connection.

Why the short hold before connecting early: a client that speaks first has sent its bytes
within a millisecond or two of its handshake through the TUN, so by the time the early
connection would start the flow is usually sniffed already. Connecting early only then keeps a
flow that sniffing sends through a proxy from first touching its server directly, while a
banner protocol waits only the hold (`EARLY_CONNECT_AFTER`).

Bounds: the sniff timeout of the rule, and at most `MAX_SNIFF_BYTES` read before routing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from ztun.outbound.base import Outbound, OutboundError
from ztun.sniff import ALL as ALL_SNIFFERS
from ztun.sniff import NEED_MORE, sniff_stream
from ztun.stack.flow import Flow, LookupFirst, Refused, SniffFirst, apply_sniffed

#: How long after accepting a sniffed flow its likely outbound is connected (see above).
EARLY_CONNECT_AFTER = 0.005
#: What is read from the client before routing at most (a ClientHello across segments fits).
MAX_SNIFF_BYTES = 16384 + 1024

Route = Callable[[Flow, str], "Outbound | Refused | SniffFirst | LookupFirst"]
#: Looks a flow's local owner up (the dispatcher's `identify`), for rules after the sniff.
Identify = Callable[[Flow], Awaitable[None]]


@dataclass(slots=True)
class Sniffed:
    """How a sniffed flow goes on: its outbound (or `Refused`), the connection to use when one
    was made early and is still right (else None: connect now), and the bytes read from the
    client, which the relay sends first."""

    verdict: Outbound | Refused
    remote: socket.socket | None
    first_bytes: bytes


async def sniff_and_route(
    conn: socket.socket, flow: Flow, ask: SniffFirst, route: Route, identify: Identify
) -> Sniffed:
    """Wait for the first bytes of `flow` (accepted as `conn`), sniff them, route it again
    (looking its owner up first when the rules after the sniff read it)."""
    loop = asyncio.get_running_loop()
    sniffers = ask.sniffers or ALL_SNIFFERS
    deadline = loop.time() + ask.timeout
    # What the flow gets if sniffing finds nothing, worked out on a copy of the flow.
    likely = replace(flow)
    apply_sniffed(likely, None)
    guess = route(likely, "tcp")
    early: asyncio.Task[socket.socket] | None = None
    banner: asyncio.Future[None] | None = None
    if not isinstance(guess, Refused | SniffFirst | LookupFirst):
        early = loop.create_task(_connect_later(guess, likely))
    buf = bytearray()
    found: Any = None
    reading: asyncio.Task[bytes] | None = None
    try:
        while len(buf) < MAX_SNIFF_BYTES:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            if reading is None:
                reading = loop.create_task(loop.sock_recv(conn, MAX_SNIFF_BYTES - len(buf)))
            waits: set[asyncio.Future[Any]] = {reading}
            if early is not None:
                if banner is None and _connected(early):
                    banner = _readable(loop, early.result())
                waits.add(banner if banner is not None else early)
            done, _ = await asyncio.wait(
                waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            if reading in done:
                data = reading.result() if not reading.exception() else b""
                reading = None
                if not data:
                    break  # the client closed or failed: route with what there is
                buf += data
                found = sniff_stream(bytes(buf), sniffers)
                if found is not NEED_MORE:
                    break
                found = None
                continue
            if banner is not None and banner in done:
                break  # the server spoke first: keep the early connection
            if early is not None and early in done and early.exception() is not None:
                early = None  # the early connection failed: routing decides again below
    finally:
        if reading is not None:
            reading.cancel()
        if banner is not None:
            banner.cancel()
    apply_sniffed(flow, found if found is not NEED_MORE else None, ask.override_destination)
    verdict = route(flow, "tcp")
    if isinstance(verdict, LookupFirst):  # a rule after the sniff reads the owner
        await identify(flow)
        verdict = route(flow, "tcp")
    assert not isinstance(verdict, SniffFirst | LookupFirst)  # sniffed and identified now
    remote: socket.socket | None = None
    if early is not None:
        keep = verdict is guess and flow.dest == likely.dest and not isinstance(verdict, Refused)
        if keep:
            try:
                remote = await early
            except OutboundError:
                remote = None  # connect again below, and report that attempt's error
        else:
            _discard(early)
    return Sniffed(verdict, remote, bytes(buf))


def _connected(task: asyncio.Task[socket.socket]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


async def _connect_later(outbound: Outbound, flow: Flow) -> socket.socket:
    await asyncio.sleep(EARLY_CONNECT_AFTER)
    return await outbound.connect_tcp(flow.dest, flow.meta)


def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> asyncio.Future[None]:
    """A future done when `sock` has something to read (its peer spoke, or closed)."""
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        loop.remove_reader(fd)
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    fut.add_done_callback(lambda _f: _quiet_remove(loop, fd))
    return fut


def _quiet_remove(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    with contextlib.suppress(ValueError, OSError):
        loop.remove_reader(fd)


def _discard(task: asyncio.Task[socket.socket]) -> None:
    """Drop an early connection that sniffing made wrong: close it, or whatever it yields."""

    def close(t: asyncio.Task[socket.socket]) -> None:
        if not t.cancelled() and t.exception() is None:
            t.result().close()

    if task.done():
        close(task)
    else:
        task.cancel()
        task.add_done_callback(close)
