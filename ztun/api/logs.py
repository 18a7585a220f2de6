"""ztun's log lines for the API's `/logs` stream.

Owns a logging handler on the `ztun` logger that hands each record to every subscriber's
bounded queue (a slow reader loses lines, counted, and never holds up ztun), from the loop's
thread or, for lines logged by other threads (the rule-set refresher), through the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

#: Lines a subscriber may have waiting; more are dropped for it.
QUEUE_SIZE = 1024
#: Clash's level names, most verbose first.
CLASH_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
                "error": logging.ERROR, "silent": logging.CRITICAL + 10}  # fmt: skip


def clash_level(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "error"
    if levelno >= logging.WARNING:
        return "warning"
    if levelno >= logging.INFO:
        return "info"
    return "debug"


class LogBroker(logging.Handler):
    """Fans log records out to subscribers: (level, queue) pairs of the API's streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.DEBUG)
        self.loop = loop
        self.thread = threading.get_ident()
        self.subscribers: dict[asyncio.Queue[dict[str, str]], int] = {}
        self.dropped = 0

    def subscribe(self, level: int) -> asyncio.Queue[dict[str, str]]:
        queue: asyncio.Queue[dict[str, str]] = asyncio.Queue(QUEUE_SIZE)
        self.subscribers[queue] = level
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, str]]) -> None:
        self.subscribers.pop(queue, None)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.subscribers:
            return
        try:
            line = {"type": clash_level(record.levelno), "payload": record.getMessage()}
        except Exception:  # a bad format argument must not break logging
            return
        if threading.get_ident() == self.thread:
            self._deliver(record.levelno, line)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                self.loop.call_soon_threadsafe(self._deliver, record.levelno, line)

    def _deliver(self, levelno: int, line: dict[str, str]) -> None:
        for queue, level in list(self.subscribers.items()):
            if levelno < level:
                continue
            try:
                queue.put_nowait(line)
            except asyncio.QueueFull:
                self.dropped += 1
