"""One worker process: the same outbounds, DNS and dispatcher as the main process (built by
`Box` from the config the fork left in memory), listening with SO_REUSEPORT on the ports of the
main process's mixed inbounds and auto_redirect listeners (runtime/workers.py).

Stops like `ztun run` (box.py): when the main process stops (a "stop" message from the
supervisor), or on the first SIGTERM or SIGINT of its own (systemd's stop and a terminal's
Ctrl-C reach every process of the group), no new connections; mixed flows get the grace period
to finish, redirected flows are closed with FIN as the tun inbound closes its own; a second
signal exits at once. It owns nothing on the host: no TUN, route, table or state file.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from typing import Any

from ztun.errors import ZtunError
from ztun.platform.linux.memory import trim_heap
from ztun.runtime import dial
from ztun.runtime.dispatch import wait_closed
from ztun.runtime.network import RESET_REASON
from ztun.runtime.supervisor import die_with_parent
from ztun.runtime.workers import read_messages
from ztun.stack.workers import encode

log = logging.getLogger("ztun.workers")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: A hangup (a closed terminal's, a `kill -HUP` of the group) is the main process's to act
#: on: there it reloads the config, and the supervisor then replaces the workers.
IGNORED_SIGNALS = (signal.SIGHUP,)
#: How often the totals of ended flows go to the main process (the Clash API's totals).
TOTALS_INTERVAL = 1.0


class _Tag(logging.Filter):
    """`worker=N pid=P ` before each line of this process, so the flow log says where a flow
    ran (and tests can tell the processes apart)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_ztun_tagged", False):
            record.msg = self.prefix + str(record.msg)
            record._ztun_tagged = True
        return True


def run_worker(sock: socket.socket, index: int, context: Any, start: dict[str, Any], *,
               parent: int) -> int:  # fmt: skip
    """The worker's life; the exit code."""
    if not die_with_parent(parent):
        return 0
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    for sig in IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    tag = _Tag(f"worker={index} pid={os.getpid()} ")
    for handler in logging.getLogger("ztun").handlers:
        handler.addFilter(tag)
    from ztun.box import _runner

    runner = asyncio.Runner() if os.environ.get("ZTUN_LOOP") == "asyncio" else _runner()
    with runner:
        return runner.run(Worker(sock, index, context, start).serve())


class Worker:
    def __init__(self, sock: socket.socket, index: int, context: Any,
                 start: dict[str, Any]) -> None:  # fmt: skip
        self.sock = sock
        self.index = index
        self.context = context
        self.start = start
        self.box: Any = None
        self.mixed: list[Any] = []
        self.redirect: list[tuple[Any, Any]] = []  # (listener, tun inbound)
        self._stop = asyncio.Event()
        #: set by "retire": a reload replaced this worker; it ends with its open flows
        self._retire = asyncio.Event()
        self._retire_limit = 0.0
        self._signals = 0
        #: totals already sent: up, down, flows, per outbound
        self._sent: tuple[int, int, int, dict[str, tuple[int, int]]] = (0, 0, 0, {})

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals == 1:
            self._stop.set()
            return
        logging.shutdown()
        os._exit(1)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        from ztun.box import Box

        ctx = self.context
        start = self.start
        try:
            self.box = box = Box(ctx.options, ctx.router, grace=ctx.grace,
                                 dns_router=ctx.dns_router, base_dir=ctx.base_dir)  # fmt: skip
            # The main process's values, not the config's: the mark auto_route chose, the
            # interface the monitor found so far (updates come as "network" messages).
            dial.set_own_mark(int(start.get("mark") or 0))
            dial.set_default_interface(start.get("interface"),
                                       detected=bool(start.get("detected")))  # fmt: skip
            await self._listen(box, start.get("listeners") or [])
        except (ZtunError, OSError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self._send({"op": "failed", "error": why})
            await self._close()
            return 1
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._on_message)
        self._send({"op": "started"})
        gc.freeze()
        trim_heap()
        totals = loop.create_task(self._send_totals()) if box.tracker is not None else None
        await self._first(self._stop, self._retire)
        if not self._stop.is_set():
            await self._retire_now()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(self.sock.fileno())
        await self._drain()
        if totals is not None:
            totals.cancel()
            self._totals()
        await self._close()
        return 0

    async def _listen(self, box: Any, listeners: list[dict[str, Any]]) -> None:
        from ztun.inbound.redirect import RedirectListener

        inbounds = {i.tag: i for i in box.inbounds}
        for spec in listeners:
            inbound = inbounds.get(spec.get("tag"))
            if inbound is None:
                continue
            if spec.get("kind") == "mixed":
                inbound.listen_port = int(spec["port"])
                inbound.reuse_port = True
                await inbound.start()
                self.mixed.append(inbound)
            elif spec.get("kind") == "redirect":
                ports = {int(v): int(p) for v, p in dict(spec["ports"]).items()}
                listener = RedirectListener(inbound.tag, box.dispatcher.route,
                                            inbound.serve_redirected())  # fmt: skip
                listener.open(sorted(ports), ports=ports, reuse_port=True)
                self.redirect.append((listener, inbound))

    @staticmethod
    async def _first(*events: asyncio.Event) -> None:
        waits = [asyncio.ensure_future(e.wait()) for e in events]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _retire_now(self) -> None:
        """A reload replaced this worker: no new connections, and the open flows, mixed and
        redirected alike, run to their end (at most `_retire_limit` seconds, or until the main
        process stops, when `_drain` takes over)."""
        # What is queued on this worker's listeners is served here: closing a SO_REUSEPORT
        # socket would reset it, and the new workers' sockets never see it.
        for inbound in self.mixed:
            await inbound.stop(serve_queued=True)
        for listener, _inbound in self.redirect:
            listener.close(serve_queued=True)
        tasks = set().union(*(i.tasks for i in self.mixed), *(i.tasks for _l, i in self.redirect))
        open_tasks = {t for t in tasks if not t.done()}
        log.info("retiring after a reload: %d open flow(s) go on", len(open_tasks))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retire_limit
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            while open_tasks and not stop.done() and (left := deadline - loop.time()) > 0:
                await asyncio.wait({*open_tasks, stop}, timeout=left,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                open_tasks = {t for t in open_tasks if not t.done()}
        finally:
            stop.cancel()

    async def _drain(self) -> None:
        """As box.py and the tun inbound: no new flows; mixed flows get the grace period,
        redirected ones end now with FIN."""
        for inbound in self.mixed:
            await inbound.stop()
        redirected: list[asyncio.Task[None]] = []
        for listener, inbound in self.redirect:
            listener.close()
            redirected += list(inbound.tasks)
        for task in redirected:
            task.cancel()
        if redirected:
            await asyncio.wait(redirected, timeout=2.0)
        tasks = set().union(*(i.tasks for i in self.mixed)) if self.mixed else set()
        await wait_closed(tasks, self.context.grace)

    async def _close(self) -> None:
        box = self.box
        if box is None:
            return
        with contextlib.suppress(Exception):
            await box.dispatcher.close()
        if box.dns is not None:
            with contextlib.suppress(Exception):
                await box.dns.close()

    # -- messages -------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.sock.send(encode(message))

    def _on_message(self) -> None:
        messages, gone = read_messages(self.sock, 16)
        for message in messages:
            self._handle(message)
        if gone:  # the supervisor is gone (PR_SET_PDEATHSIG is on its way)
            self._stop.set()

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        box = self.box
        if op == "network":
            interface = message.get("interface")
            dial.set_default_interface(interface if isinstance(interface, str) else None,
                                       detected=bool(self.start.get("detected")))  # fmt: skip
            if message.get("reset"):
                for outbound in box.dispatcher.outbounds.values():
                    reset = getattr(outbound, "reset_network", None)
                    if reset is not None:
                        with contextlib.suppress(Exception):
                            reset(RESET_REASON)
        elif op == "stop":  # the main process stops (a signal of its own is counted apart)
            self._stop.set()
        elif op == "selected":
            now = message.get("now")
            for tag, member in (now.items() if isinstance(now, dict) else ()):
                group = box.dispatcher.outbounds.get(tag)
                follow = getattr(group, "follow", None)
                if follow is not None and isinstance(member, str):
                    follow(member)
        elif op == "retire":
            limit = message.get("limit")
            self._retire_limit = float(limit) if isinstance(limit, int | float) else 0.0
            self._retire.set()
        elif op == "mode":
            cell = getattr(box.dispatcher.router, "mode", None)
            mode = message.get("mode")
            if cell is not None and isinstance(mode, str):
                cell.set(mode)

    def _totals(self) -> None:
        """The bytes of flows that ended here since the last call, to the main process."""
        tracker = self.box.tracker
        sent_up, sent_down, sent_flows, sent_per = self._sent
        per = {tag: [up - sent_per.get(tag, (0, 0))[0], down - sent_per.get(tag, (0, 0))[1]]
               for tag, (up, down) in tracker.by_outbound.items()}  # fmt: skip
        per = {tag: pair for tag, pair in per.items() if pair != [0, 0]}
        up, down = tracker.closed_up - sent_up, tracker.closed_down - sent_down
        flows = tracker.started - sent_flows
        if not per and not up and not down and not flows:
            return
        self._send({"op": "totals", "up": up, "down": down, "flows": flows, "by_outbound": per})
        self._sent = (tracker.closed_up, tracker.closed_down, tracker.started,
                      {tag: (pair[0], pair[1]) for tag, pair in tracker.by_outbound.items()})

    async def _send_totals(self) -> None:
        while True:
            await asyncio.sleep(TOTALS_INTERVAL)
            self._totals()
