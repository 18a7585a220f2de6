"""The workers' supervisor: a process with one thread and no event loop that forks the
workers, waits for them, starts a dead one again after a backoff, relays messages between the
main process and the workers, and stops them when the main process says so.

A reload of the main process (box.py) reaches it as a "reload" message: it compiles the config
file again itself (it is the one process that may fork, so the new rules must be built here),
starts a new generation of workers on the listeners the main process has now, and tells each
worker of the old generation to retire: stop accepting and end once its open flows have ended
(by `RETIRE_LIMIT` at the latest), so a reload cuts no flow. A config that does not compile here
leaves the workers as they were, and the main process logs why.

Why a process of its own: forking the main process once it runs its event loop, the network
monitor's thread or the rule-set refresher's would copy their locks and file descriptors in
whatever state they are in. This process was forked before any of them existed and starts
none, so each fork gives a clean worker with the compiled rules already in memory.

It ignores SIGINT, SIGTERM and SIGHUP (a terminal's Ctrl-C and systemd's stop reach every
process of the group, and the main process decides when to stop) and dies with the main process
(PR_SET_PDEATHSIG); its workers die with it. Every wait is bounded: `select` wakes at least
every `TICK` seconds to reap children and start the ones whose backoff is over.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field, replace
from typing import Any

from ztun.stack.workers import RestartBackoff, decode, encode

log = logging.getLogger("ztun.workers")

#: The longest the supervisor sleeps between looks at its children.
TICK = 0.1
#: How long a stop waits for the workers past their grace period before SIGKILL.
KILL_MARGIN = 2.0
#: The longest a worker of the config before a reload goes on with its open flows.
RETIRE_LIMIT = 3600.0
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> bool:
    """SIGKILL this process when its parent ends; False when the parent is already gone (the
    fork raced with its exit) and the caller should exit."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the pipes' EOF still ends the process
    return os.getppid() == parent


@dataclass
class Slot:
    """One worker's place: its process while it runs, its restart time while it does not."""

    index: int
    pid: int | None = None
    sock: socket.socket | None = None
    started: float = 0.0
    restart_at: float | None = None
    backoff: RestartBackoff = field(default_factory=RestartBackoff)


def supervise(ctrl: socket.socket, context: Any, *, parent: int) -> int:
    """The supervisor's life; the exit code."""
    if not die_with_parent(parent):
        return 0
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    ctrl.setblocking(True)
    while True:  # nothing to do before the main process's listeners exist
        data = ctrl.recv(65536)
        if not data:
            return 0
        message = decode(data)
        if message is None:
            continue
        if message.get("op") == "stop":
            _send(ctrl, {"op": "stopped"})
            return 0
        if message.get("op") == "start":
            return Supervisor(ctrl, context, message).run()


def _send(sock: socket.socket | None, message: dict[str, Any]) -> bool:
    if sock is None:
        return False
    try:
        sock.send(encode(message), socket.MSG_DONTWAIT)
        return True
    except (OSError, ValueError):
        return False


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    return f"exited with code {os.WEXITSTATUS(status)}"


@dataclass
class Retiring:
    """A worker of the config before a reload: no longer accepting, ending with its flows."""

    index: int
    pid: int
    sock: socket.socket | None


class Supervisor:
    def __init__(self, ctrl: socket.socket, context: Any, start: dict[str, Any]) -> None:
        self.ctrl = ctrl
        self.context = context
        self.start = start
        self.slots = [Slot(i) for i in range(1, context.plan.count)]
        #: workers of an earlier config, draining (by pid)
        self.retiring: dict[int, Retiring] = {}
        self.stopping = False
        self.kill_at = 0.0
        #: the last network and mode messages, for a worker started after them
        self.state: dict[str, dict[str, Any]] = {}

    def run(self) -> int:
        # Totals go up with a blocking send (not dropped), bounded by this timeout.
        self.ctrl.settimeout(1.0)
        for slot in self.slots:
            self.spawn(slot)
        while True:
            socks = [self.ctrl] + [s.sock for s in self.slots if s.sock is not None]
            socks += [r.sock for r in self.retiring.values() if r.sock is not None]
            try:
                ready, _, _ = select.select(socks, [], [], TICK)
            except InterruptedError:
                ready = []
            for sock in ready:
                if sock is self.ctrl:
                    if not self.from_main():
                        self.kill_all()
                        return 0
                else:
                    self.from_worker(sock)
            self.reap()
            now = time.monotonic()
            if self.stopping:
                if not any(s.pid for s in self.slots) and not self.retiring:
                    _send(self.ctrl, {"op": "stopped"})
                    return 0
                if now >= self.kill_at:
                    self.kill_all()
                continue
            for slot in self.slots:
                if slot.pid is None and slot.restart_at is not None and now >= slot.restart_at:
                    self.spawn(slot)

    # -- children -------------------------------------------------------------------------

    def spawn(self, slot: Slot) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        me = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                ours.close()
                self.ctrl.close()
                for other in self.slots:
                    if other.sock is not None:
                        other.sock.close()
                for old in self.retiring.values():
                    if old.sock is not None:
                        old.sock.close()
                from ztun.runtime.worker import run_worker

                code = run_worker(theirs, slot.index, self.context, self.start, parent=me)
            except BaseException as e:
                with contextlib.suppress(Exception):
                    log.error("worker %d: %s", slot.index, e)
            finally:
                with contextlib.suppress(Exception):
                    logging.shutdown()
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        slot.pid, slot.sock, slot.started, slot.restart_at = pid, ours, time.monotonic(), None
        for message in self.state.values():
            _send(ours, message)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            gone = self.retiring.pop(pid, None)
            if gone is not None:
                if gone.sock is not None:
                    gone.sock.close()
                _send(self.ctrl, {"op": "retired", "worker": gone.index, "pid": pid})
                continue
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is None:
                continue
            if slot.sock is not None:
                slot.sock.close()
            slot.pid, slot.sock = None, None
            if self.stopping:
                continue
            now = time.monotonic()
            delay = slot.backoff.delay(now - slot.started)
            slot.restart_at = now + delay
            _send(self.ctrl, {"op": "exited", "worker": slot.index, "pid": pid,
                              "how": _how(status), "restart_in": delay})  # fmt: skip

    def kill_all(self) -> None:
        pids = [s.pid for s in self.slots if s.pid is not None] + list(self.retiring)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while ((any(s.pid for s in self.slots) or self.retiring)
               and time.monotonic() < deadline):  # fmt: skip
            self.reap()
            time.sleep(0.01)

    # -- messages -------------------------------------------------------------------------

    def from_main(self) -> bool:
        """False when the main process is gone."""
        try:
            data = self.ctrl.recv(65536)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data = b""
        if not data:
            return False
        message = decode(data)
        if message is None:
            return True
        op = message.get("op")
        if op == "stop":
            self.stopping = True
            grace = message.get("grace", self.context.grace)
            grace = float(grace) if isinstance(grace, int | float) else self.context.grace
            self.kill_at = time.monotonic() + max(0.0, grace) + KILL_MARGIN
            for slot in self.slots:
                slot.restart_at = None
                # A message, not SIGTERM: a worker counts signals as `ztun run` does (the
                # second one exits at once), and systemd or a terminal may already have sent it
                # one; a worker without its pipe gets the signal.
                if slot.pid is not None and not _send(slot.sock, {"op": "stop"}):
                    with contextlib.suppress(OSError):
                        os.kill(slot.pid, signal.SIGTERM)
            for old in self.retiring.values():  # their flows get the same grace period
                if not _send(old.sock, {"op": "stop"}):
                    with contextlib.suppress(OSError):
                        os.kill(old.pid, signal.SIGTERM)
        elif op == "reload" and not self.stopping:
            self.reload(message)
        elif op in ("network", "mode", "selected"):
            self.state[op] = message
            for slot in self.slots:
                _send(slot.sock, message)
        return True

    def reload(self, message: dict[str, Any]) -> None:
        """Compile the config again and replace the workers (the module's docstring)."""
        path = self.context.config_path
        if path is None:
            return
        try:
            from ztun.check import load_and_compile

            # offline: the main process has just fetched what a remote rule set needed
            compiled = load_and_compile(path, offline=True)
        except Exception as e:  # ConfigError or a bug: the workers stay as they are
            _send(self.ctrl, {"op": "reload-failed", "error": str(e)[:2000]})
            return
        router = compiled.router
        mode = message.get("mode")
        cell = getattr(router, "mode", None)
        if cell is not None and isinstance(mode, str):
            cell.set(mode)
        # The new rules start in the main process's mode, the selectors with its members.
        self.state.pop("mode", None)
        selected = message.get("selected")
        if isinstance(selected, dict):
            self.state["selected"] = {"op": "selected", "now": selected}
        self.context = replace(self.context, options=compiled.options, router=router,
                               dns_router=compiled.dns_router,
                               base_dir=compiled.loaded.base_dir)  # fmt: skip
        listeners = message.get("listeners")
        if isinstance(listeners, list):
            self.start = {**self.start, "listeners": listeners}
        # What lives now lives until the next reload: frozen, the new workers share its pages.
        gc.collect()
        gc.freeze()
        for slot in self.slots:
            if slot.pid is not None:
                old = Retiring(slot.index, slot.pid, slot.sock)
                self.retiring[old.pid] = old
                if not _send(old.sock, {"op": "retire", "limit": RETIRE_LIMIT}):
                    with contextlib.suppress(OSError):
                        os.kill(old.pid, signal.SIGTERM)
                slot.pid, slot.sock = None, None
            slot.backoff = RestartBackoff()
            self.spawn(slot)
        _send(self.ctrl, {"op": "reloaded"})

    def from_worker(self, sock: socket.socket) -> None:
        slot = next((s for s in self.slots if s.sock is sock), None)
        old = next((r for r in self.retiring.values() if r.sock is sock), None)
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if slot is None and old is None:
            return
        if not data:  # the worker is ending; reap() sees it go
            sock.close()
            if slot is not None:
                slot.sock = None
            elif old is not None:
                old.sock = None
            return
        message = decode(data)
        if message is None:
            return
        if old is not None:  # only its totals still matter
            if message.get("op") != "totals":
                return
            message["worker"] = old.index
        else:
            assert slot is not None
            message["worker"] = slot.index
        if message.get("op") == "started":
            message["pid"] = slot.pid if slot is not None else None
        with contextlib.suppress(OSError, ValueError):
            self.ctrl.send(encode(message))  # blocking: totals are not dropped
