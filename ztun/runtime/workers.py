"""Worker processes for the mixed inbounds and auto_redirect: the main process's side.

A router that handles many new connections must not be one Python process on one core. With
`workers: N` (ztun/stack/workers.py decides N), N processes accept the connections of the mixed
inbounds and of auto_redirect's loopback listeners: the main process and N-1 workers, each with
its own listening socket on the same address and port (SO_REUSEPORT), so the kernel spreads new
connections over them by their addresses and ports, and a flow stays in the process that
accepted it. The main process alone owns the TUN, the routes, the nftables table, the network
monitor, the Clash API and the config.

Why SO_REUSEPORT and not one shared listening socket: with one socket every process is woken for
every connection (a thundering herd) and the busiest process takes most of them; the kernel's
reuseport group hands each connection to exactly one socket. Why the main process stays one of
the acceptors: its listener holds the port even while every worker is down, so a connection
is never queued on a socket nobody serves, and `workers: 1` is exactly the in-process ztun.

Three kinds of process:

    ztun run (main: loop, TUN, routes, API) ──pipe──► supervisor ──pipe──► worker 1..N-1
        forks the supervisor before any              forks, reaps and       own loop, own
        thread or event loop exists                  restarts workers;      listeners, the
                                                     relays messages        same rules

The supervisor (runtime/supervisor.py) is forked from the main process right after the config
is compiled, while the process still has one thread and no event loop: forking later would copy
the network monitor's and the rule-set refresher's threads' locks in whatever state they are
in. It never starts a thread or a loop itself, so it can fork a worker at any time, with the
compiled rules in memory (copy-on-write, `gc.freeze()` first so the collector does not touch
every page). A worker (runtime/worker.py) runs its own event loop with its own outbounds and
listeners.

Lifetimes: the supervisor and every worker die with their parent (PR_SET_PDEATHSIG, SIGKILL), so
a main process that is killed leaves no process behind. A worker that dies (a crash, SIGKILL)
takes its flows with it: the kernel closes their sockets, so their clients see a reset or EOF at
once; connections waiting in its accept queue are reset as the listener closes. The supervisor
starts it again after a bounded backoff (stack/workers.py `RestartBackoff`). On the first
SIGINT/SIGTERM of the main process, workers are told to stop: they stop accepting, give their open
flows the same grace period as the main process, and exit; the main process waits for them
(bounded) before it exits.

What workers share with the main process, over the pipes (JSON messages, stack/workers.py):
the network monitor's decisions (default interface, "reset UDP"), the Clash API's mode, and
back, every second, the byte totals per outbound of the flows that ended in a worker (the
Clash API's totals). The flow log lines of a worker carry `worker=N pid=P`. Not shared: the
Clash API's `/connections` lists, and closes, only the main process's flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztun.config.options import Options
from ztun.runtime import dial
from ztun.stack.workers import WorkerPlan, add_totals, decode, encode, plan_workers

log = logging.getLogger("ztun.workers")

#: How long past the grace period the main process waits for the workers to end.
STOP_MARGIN = 3.0
#: How often the Clash API's mode is compared with what the workers were told.
MODE_CHECK_INTERVAL = 1.0


@dataclass(frozen=True)
class WorkerContext:
    """What a worker needs to build the same outbounds, DNS and dispatcher as the main
    process: inherited by fork, never sent."""

    options: Options
    router: Any
    dns_router: Any
    base_dir: str | Path | None
    grace: float
    plan: WorkerPlan
    #: the config file, which the supervisor compiles again on a reload (None: no reloads)
    config_path: str | Path | None = None


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, as `taskset` and cgroups set it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def fork_pool(
    options: Options,
    router: Any,
    *,
    dns_router: Any = None,
    base_dir: str | Path | None = None,
    grace: float,
    config_path: str | Path | None = None,
) -> WorkerPool | None:
    """Fork the supervisor when the config gets workers; None when everything stays
    in-process. Call before any thread or event loop starts."""
    plan = plan_workers(options, usable_cores(), platform_ok=sys.platform.startswith("linux"))
    for level, text in plan.notes:
        log.log(logging.WARNING if level == "warning" else logging.INFO, "%s", text)
    if plan.count <= 1:
        return None
    if threading.active_count() > 1:
        # A fork copies only this thread; another thread's locks would stay held forever.
        log.warning("workers: a thread is already running; every connection is handled "
                    "in-process")  # fmt: skip
        return None
    context = WorkerContext(options, router, dns_router, base_dir, grace, plan, config_path)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # What exists now lives until exit: frozen, the collectors of the forked processes do not
    # write to every object's header, and the pages stay shared.
    gc.freeze()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    me = os.getpid()
    pid = os.fork()
    if pid == 0:  # the supervisor
        code = 1
        try:
            ours.close()
            from ztun.runtime.supervisor import supervise

            code = supervise(theirs, context, parent=me)
        except BaseException:
            with contextlib.suppress(Exception):
                log.exception("workers: the supervisor failed")
        finally:
            with contextlib.suppress(Exception):
                logging.shutdown()
            os._exit(code)
    theirs.close()
    return WorkerPool(pid, ours, plan, grace)


def _listeners(inbounds: Iterable[Any], tags: Iterable[str]) -> list[dict[str, Any]]:
    """What the workers listen on: each spread inbound's address and port as the main process
    bound them (port 0 in the config is the port the kernel chose)."""
    wanted = set(tags)
    out: list[dict[str, Any]] = []
    for inbound in inbounds:
        if inbound.tag not in wanted:
            continue
        if getattr(inbound, "sock", None) is not None and hasattr(inbound, "reuse_port"):
            out.append({"kind": "mixed", "tag": inbound.tag, "port": inbound.listen_port})
        listener = getattr(inbound, "redirect_listener", None)
        if listener is not None and listener.ports:
            out.append({"kind": "redirect", "tag": inbound.tag,
                        "ports": {str(v): p for v, p in listener.ports.items()}})  # fmt: skip
    return out


def read_messages(sock: socket.socket, limit: int) -> tuple[list[dict[str, Any]], bool]:
    """Up to `limit` messages waiting on a non-blocking pipe end (one per datagram; a bad one
    is skipped), and whether the other end has gone (EOF or an error)."""
    out: list[dict[str, Any]] = []
    for _ in range(limit):
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return out, False
        except OSError:
            data = b""
        if not data:
            return out, True
        message = decode(data)
        if message is not None:
            out.append(message)
    return out, False


class WorkerPool:
    """The main process's handle on the supervisor: start, messages, stop."""

    def __init__(self, pid: int, sock: socket.socket, plan: WorkerPlan, grace: float) -> None:
        self.pid = pid
        self.plan = plan
        self.grace = grace
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tracker: Any = None
        self._mode_cell: Any = None
        self._mode_sent: str | None = None
        self._mode_timer: asyncio.TimerHandle | None = None
        self._selectors: dict[str, Any] = {}
        self._selected_sent: dict[str, str] = {}
        self._stopped: asyncio.Event | None = None
        self._stopping = False
        self._reaped = False
        #: worker index → pid of the running worker
        self.pids: dict[int, int] = {}
        #: workers that died and were replaced (or are waiting for their restart)
        self.deaths = 0
        #: messages to the supervisor that could not be sent (its queue full)
        self.dropped = 0

    # -- set-up, in Box -------------------------------------------------------------------

    def adopt(self, inbounds: Iterable[Any]) -> None:
        """Before the inbounds start: their listeners join a reuseport group."""
        tags = set(self.plan.inbounds)
        for inbound in inbounds:
            if inbound.tag not in tags:
                continue
            if hasattr(inbound, "reuse_port"):
                inbound.reuse_port = True
            if hasattr(inbound, "redirect_reuse_port"):
                inbound.redirect_reuse_port = True

    def follow(self, follower: Callable[[Any], None]) -> Callable[[Any], None]:
        """The network monitor's callback: `follower` here, then the same in every worker."""

        def both(decision: Any) -> None:
            follower(decision)
            if decision.rebind or decision.reset:
                self._send({"op": "network", "interface": dial.default_interface(),
                            "reset": bool(decision.reset)})  # fmt: skip

        return both

    def start(self, inbounds: Iterable[Any], *, tracker: Any = None, router: Any = None,
              auto_detect: bool = False,
              outbounds: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        """Once the main process's inbounds listen: the workers start on the same ports."""
        loop = self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._tracker = tracker
        listeners = _listeners(inbounds, self.plan.inbounds)
        self._sock.setblocking(False)
        loop.add_reader(self._sock.fileno(), self._on_message)
        if not listeners:
            log.info("workers: no listener to share (auto_redirect is off); connections stay "
                     "in-process")  # fmt: skip
            self.stop()
            return
        self._send({"op": "start", "listeners": listeners, "mark": dial.own_mark(),
                    "interface": dial.default_interface(), "detected": auto_detect,
                    "track": tracker is not None})  # fmt: skip
        log.info("workers: %d process(es) accept connections of %s (the main one and %d "
                 "worker(s))", self.plan.count, ", ".join(sorted({x["tag"] for x in listeners})),
                 self.plan.forks)  # fmt: skip
        self._follow(router, outbounds)

    def _follow(self, router: Any, outbounds: Mapping[str, Any] | None) -> None:
        """What the workers copy from the main process once a second: the Clash mode and the
        member each selector group uses (both switched through the API)."""
        assert self._loop is not None
        self._mode_cell = getattr(router, "mode", None)
        self._mode_sent = self._mode_cell.current if self._mode_cell is not None else None
        self._selectors = {tag: o for tag, o in (outbounds or {}).items()
                           if getattr(o, "type", None) == "selector"}  # fmt: skip
        self._selected_sent = {tag: o.now for tag, o in self._selectors.items()}
        if self._mode_timer is None and (self._mode_cell is not None or self._selectors):
            self._mode_timer = self._loop.call_later(MODE_CHECK_INTERVAL, self._check_mode)

    def reload(self, inbounds: Iterable[Any], router: Any,
               outbounds: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        """The main process switched to a reloaded config: the supervisor compiles it too and
        replaces every worker with one that runs it (ztun.runtime.supervisor)."""
        if self._loop is None or self._stopping:
            return
        self._follow(router, outbounds)
        listeners = _listeners(inbounds, self.plan.inbounds)
        self._send({"op": "reload", "listeners": listeners, "mode": self._mode_sent,
                    "selected": self._selected_sent})  # fmt: skip

    # -- messages -------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self._sock.send(encode(message))
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
        except OSError:
            pass  # the supervisor is gone: _on_message sees the EOF

    def _check_mode(self) -> None:
        """The Clash API switched the mode (PATCH /configs) or a selector's member
        (PUT /proxies/{name}): the workers follow."""
        assert self._loop is not None
        cell = self._mode_cell
        if cell is None and not self._selectors:  # a reloaded config without either
            self._mode_timer = None
            return
        if cell is not None and cell.current != self._mode_sent:
            self._mode_sent = cell.current
            self._send({"op": "mode", "mode": cell.current})
        selected = {tag: o.now for tag, o in self._selectors.items()}
        if selected != self._selected_sent:
            self._selected_sent = selected
            self._send({"op": "selected", "now": selected})
        if not self._stopping:
            self._mode_timer = self._loop.call_later(MODE_CHECK_INTERVAL, self._check_mode)

    def _on_message(self) -> None:
        messages, gone = read_messages(self._sock, 64)
        for message in messages:
            self._handle(message)
        if gone:
            self._gone()

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        index, pid = message.get("worker"), message.get("pid")
        if op == "started" and isinstance(index, int) and isinstance(pid, int):
            self.pids[index] = pid
            log.info("worker %d started (pid %d)", index, pid)
        elif op == "exited" and isinstance(index, int):
            self.pids.pop(index, None)
            if not self._stopping:
                self.deaths += 1
                log.warning("worker %d (pid %s) %s; its flows were reset; started again in "
                            "%.1fs", index, pid, message.get("how", "exited"),
                            float(message.get("restart_in", 0)))  # fmt: skip
        elif op == "reloaded":
            log.info("workers: the supervisor compiled the reloaded config; new workers "
                     "start, the old ones end with their open flows")  # fmt: skip
        elif op == "reload-failed":
            log.error("workers: the reloaded config did not compile in the supervisor, the "
                      "workers keep the one before: %s", str(message.get("error", "?"))[:500])
        elif op == "retired" and isinstance(pid, int):
            log.info("worker %s (pid %d) of the config before the reload ended", index, pid)
        elif op == "failed" and isinstance(index, int):
            log.error("worker %d: %s", index, str(message.get("error", "?"))[:500])
        elif op == "totals":
            self._add_totals(message)
        elif op == "stopped":
            self._gone()

    def _add_totals(self, message: dict[str, Any]) -> None:
        tracker = self._tracker
        if tracker is None:
            return
        up, down = message.get("up"), message.get("down")
        if type(up) is int and type(down) is int and up >= 0 and down >= 0:
            tracker.closed_up += up
            tracker.closed_down += down
        flows = message.get("flows")
        if type(flows) is int and flows >= 0:
            tracker.started += flows  # the API's connectionsTotal counts every process's
        add_totals(tracker.by_outbound, message.get("by_outbound"))

    def _gone(self) -> None:
        """The supervisor said it is done, or its pipe closed."""
        if self._stopped is not None and not self._stopped.is_set():
            if not self._stopping:
                log.error("workers: the supervisor ended; connections are handled by the main "
                          "process only")  # fmt: skip
            self._stopped.set()
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._sock.fileno())
        self._reap(block=False)

    # -- stop -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Workers stop accepting and drain like the main process (no wait here)."""
        if self._stopping:
            return
        self._stopping = True
        if self._mode_timer is not None:
            self._mode_timer.cancel()
        self._send({"op": "stop", "grace": self.grace})

    async def wait_stopped(self, grace: float) -> None:
        """Wait until every worker ended (at most `grace` plus a margin), then for the
        supervisor; what is still there is killed."""
        self.stop()
        if self._stopped is not None:
            try:
                await asyncio.wait_for(self._stopped.wait(), grace + STOP_MARGIN)
                log.info("workers stopped")
            except TimeoutError:
                log.warning("workers: still running %gs after the stop; killed",
                            grace + STOP_MARGIN)  # fmt: skip
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while not self._reap(block=False) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self.kill()

    def kill(self) -> None:
        """The supervisor (and with it, by PR_SET_PDEATHSIG, every worker) ends now."""
        if self._reaped:
            return
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
        self._reap(block=True)
        with contextlib.suppress(Exception):
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def _reap(self, *, block: bool) -> bool:
        """True once the supervisor has exited and been waited for."""
        if self._reaped:
            return True
        try:
            pid, _ = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            pid = self.pid
        if pid == self.pid:
            self._reaped = True
        return self._reaped
