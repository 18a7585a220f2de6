"""The `urltest` outbound: a group that uses its fastest live member.

Owns the probing around `ztun.outbound.choice.UrlTestChoice` (which decides): a background
task probes each member through itself (`ztun.outbound.probe.url_delay`) when the choice says
it is due (every `interval`; a down member after a doubling backoff), and stops once the group
carried no flow for `idle_timeout` (the next flow starts it again). Flows never wait for a
probe: they take the member chosen so far.

Beyond sing-box: a connection through the member in use that fails in a way that says the
member is dead (its proxy refused or reset the connection, the proxy's handshake timed out)
marks it down at once, and a connection that failed fast (not a timeout) is tried once more
through the next live member, so the first flow after a proxy dies already goes through a
live one. Errors about the destination (a SOCKS5 "connection refused" reply, a direct
member's refused connection) say nothing about the member and change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from ztun.address import Address
from ztun.config.options import URLTestOutboundOptions
from ztun.outbound.base import ErrorKind, OutboundError
from ztun.outbound.choice import UrlTestChoice
from ztun.outbound.group import GroupOutbound
from ztun.outbound.probe import DEFAULT_TIMEOUT, ProbeError, record, url_delay
from ztun.route.metadata import FlowMeta
from ztun.runtime.netio import Handover

log = logging.getLogger("ztun")

#: Errors through a member that mean the member itself is dead.
MEMBER_DOWN = frozenset({ErrorKind.PROXY_DOWN, ErrorKind.TIMEOUT, ErrorKind.AUTH})
#: Of those, the ones that come fast enough to try the flow again through another member
#: (a timeout already cost the flow its connect_timeout).
RETRY = frozenset({ErrorKind.PROXY_DOWN, ErrorKind.AUTH})


class URLTestOutbound(GroupOutbound):
    type = "urltest"
    clash_type = "URLTest"

    def __init__(self, options: URLTestOutboundOptions) -> None:
        super().__init__(options.tag, options.outbounds, options.interrupt_exist_connections)
        self.options = options
        self.url = options.url
        self.idle_timeout = options.idle_timeout
        self.probe_timeout = min(DEFAULT_TIMEOUT, options.interval)
        self.choice = UrlTestChoice(options.outbounds, tolerance_ms=options.tolerance,
                                    interval=options.interval)  # fmt: skip
        self._task: asyncio.Task[None] | None = None
        self._last_used = 0.0
        #: set when the choice wants a probe sooner than the loop is sleeping for
        self._wake: asyncio.Event | None = None
        self._closed = False

    @property
    def now(self) -> str:
        return self.choice.now

    # -- probing --------------------------------------------------------------------------

    def touch(self) -> None:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        self._last_used = loop.time()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._probe_loop(), name=f"urltest {self.tag}")

    async def start(self) -> None:
        """Probe from start-up on, so the first flows already get the fastest member."""
        self.touch()

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while loop.time() - self._last_used < self.idle_timeout:
            due = self.choice.due(loop.time())
            if due:
                await asyncio.gather(*(self._probe(tag) for tag in due))
                continue
            idle_left = self.idle_timeout - (loop.time() - self._last_used)
            wait = min(self.choice.next_due(loop.time()), max(idle_left, 0.0))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
        log.debug("group %s: idle for %gs, probing stops", self.tag, self.idle_timeout)

    async def _probe(self, tag: str) -> None:
        delay: int | None
        try:
            delay = await url_delay(self.members[tag], self.url, self.probe_timeout)
        except ProbeError as e:
            # a line when a member goes down; its backoff probes while down only at debug
            level = logging.DEBUG if self.choice.is_down(tag) else logging.INFO
            log.log(level, "group %s: %s: probe failed: %s", self.tag, tag, e)
            delay = None
        self._result(tag, delay)

    def _result(self, tag: str, delay: int | None) -> None:
        record(tag, delay)
        old = self.choice.now
        changed = self.choice.probed(tag, delay, asyncio.get_running_loop().time())
        self._update(old, changed, f"probe: {tag} {'down' if delay is None else f'{delay} ms'}")

    async def probe_all(
        self, url: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, int]:
        """Probe every member now (the Clash API's `/group/{tag}/delay`): member → delay in
        ms, 0 for a member that failed. With the group's own URL the results count."""
        url = url or self.url

        async def one(tag: str) -> tuple[str, int]:
            try:
                delay: int | None = await url_delay(self.members[tag], url, timeout)
            except ProbeError:
                delay = None
            if url == self.url:
                self._result(tag, delay)
            else:
                record(tag, delay)
            return tag, delay or 0

        return dict(await asyncio.gather(*(one(t) for t in self.member_tags)))

    def _update(self, old: str, changed: bool, why: str) -> None:
        if changed:
            self.switched(old, self.choice.now, why)

    # -- flows ----------------------------------------------------------------------------

    async def _connect(
        self, dest: Address, meta: FlowMeta, handover: Handover | None
    ) -> tuple[str, socket.socket]:
        tried: set[str] = set()
        last: OutboundError | None = None
        while True:
            tag = self.choice.pick(tried)
            if tag is None:  # every live member failed for this flow: the last error stands
                assert last is not None  # `tried` is not empty
                raise last
            try:
                return tag, await self.members[tag].connect_tcp(dest, meta, handover)
            except OutboundError as e:
                if e.kind not in MEMBER_DOWN:
                    raise
                old = self.choice.now
                now = asyncio.get_running_loop().time()
                self._update(old, self.choice.flow_failed(tag, now), f"{tag} failed: {e}")
                if self._wake is not None:
                    self._wake.set()  # its backoff probe is due sooner than the loop sleeps
                if e.kind not in RETRY:
                    raise
                tried.add(tag)
                last = e

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
