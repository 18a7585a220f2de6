"""`ztun run`: build inbounds, outbounds and the router from a config, run them, stop cleanly.

Owns: the lifecycle (start inbounds; on the first SIGINT/SIGTERM/SIGHUP stop accepting, let
open flows finish with FIN for a bounded grace period, then close the rest and exit 0; on a
second signal put back what the inbounds changed on the host (`Inbound.abort`: auto_route's
routes) and exit at once), the event loop choice (uvloop when installed), and logging setup.

With `experimental.clash_api`, the Clash API (ztun.api.server) starts after the inbounds and
stops after the flows' grace period, and a tracker lists the flows for it; without it, nothing
is tracked.

Every way out restores the host: the signals are handled from before the first inbound starts
(a signal during start-up stops ztun as soon as start-up ends), an exception in start-up or
while running stops every inbound that started before it goes on, and what still escapes is
caught by the TUN inbound's atexit hook. Only SIGKILL leaves routes behind; the next start
removes them (ztun.platform.linux.routes).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import logging.handlers
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ztun.config.options import LogOptions, Options
from ztun.config.validate import DEFAULT_AUTO_ROUTE_MARK
from ztun.dns.module import build_dns
from ztun.errors import ZtunError
from ztun.inbound.registry import Inbound, build_inbound
from ztun.outbound.base import Outbound
from ztun.outbound.registry import build_outbound
from ztun.platform.linux.memory import trim_heap
from ztun.route.action import HijackDNS
from ztun.runtime import dial
from ztun.runtime.dispatch import Dispatcher, RouterLike, wait_closed
from ztun.runtime.tracker import Tracker

if TYPE_CHECKING:
    from ztun.api.server import ApiServer
    from ztun.runtime.workers import WorkerPool
from ztun.runtime.network import NetworkFollower

log = logging.getLogger("ztun")

#: Seconds open flows get to finish after the first signal.
GRACE_PERIOD = 5.0
#: SIGHUP stops ztun like SIGTERM (there is no reload): its default action would kill the
#: process without putting the routes back.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: How long an inbound's stop may take when an exception is already on its way out.
ABORT_STOP_TIMEOUT = 5.0

_LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}


def setup_logging(options: LogOptions | None = None, override: str | None = None) -> None:
    """Configure the `ztun` logger from the config's `log` block; `override` is --log-level."""
    opts = options or LogOptions()
    name = (override or opts.level).lower()
    if name not in _LEVELS:
        raise ZtunError(f"unknown log level {name!r} (use one of {', '.join(_LEVELS)})")
    root = logging.getLogger("ztun")
    root.handlers.clear()
    root.propagate = False
    if opts.disabled and override is None:
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.CRITICAL + 1)
        return
    output = opts.output
    handler: logging.Handler
    if output:
        try:
            # Reopened when the file is moved or deleted, so logrotate needs no copytruncate
            # and no signal to ztun (docs/security.md).
            handler = logging.handlers.WatchedFileHandler(output, encoding="utf-8")
        except OSError as e:
            raise ZtunError(f"log.output: cannot open {output}: {e.strerror}") from None
    else:
        handler = logging.StreamHandler(sys.stderr)
    fmt = "%(levelname)s %(message)s"
    if opts.timestamp:
        fmt = "%(asctime)s " + fmt
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(_LEVELS[name])


def _owner_finder(router: Any, dns_router: Any) -> Any:
    """The owner lookup, only when a route or DNS rule has a process or user item: other
    configs never pay for it. Linux only; elsewhere such items match no flow."""
    needs = set(getattr(router, "owner_needs", ())) | set(getattr(dns_router, "owner_needs", ()))
    if not needs or not sys.platform.startswith("linux"):
        return None
    from ztun.platform.linux.owner import owner_finder

    return owner_finder(needs)


class Box:
    def __init__(
        self,
        options: Options,
        router: RouterLike,
        *,
        grace: float = GRACE_PERIOD,
        dns_router: Any = None,
        base_dir: str | Path | None = None,
        workers: WorkerPool | None = None,
    ) -> None:
        self.options = options
        #: the worker processes that share the mixed and auto_redirect listeners (or None)
        self.workers = workers
        self.grace = grace
        if any(getattr(o, "auto_route", False) for o in options.inbounds):
            # Before any inbound, outbound or DNS transport opens a socket: all of them carry
            # auto_route's mark from the first one on (runtime/dial.py).
            dial.set_own_mark(options.route.default_mark or DEFAULT_AUTO_ROUTE_MARK)
        # Both through their registries (type → options class, class): no if-chain on `type`.
        outbounds: dict[str, Outbound] = {o.tag: build_outbound(o) for o in options.outbounds}
        #: the DNS module, None without dns.servers or a hijack-dns rule
        self.dns = build_dns(options, outbounds, dns_router, base_dir,
                             hijack=_hijacks_dns(router))  # fmt: skip
        api = options.experimental.clash_api
        #: the open flows, tracked only when the Clash API is there to show them
        self.tracker: Tracker | None = None
        if api.external_controller:
            self.tracker = Tracker(inbound_types={o.tag: o.type for o in options.inbounds})
        self.dispatcher = Dispatcher(
            router,
            outbounds,
            dns_hijack=self.dns.hijack if self.dns is not None else None,
            names=self.dns.names if self.dns is not None and self.dns.gives_names else None,
            tracker=self.tracker,
            owners=_owner_finder(router, dns_router),
        )
        self.api: ApiServer | None = None
        if self.tracker is not None:
            # Imported here: aiohttp costs start-up time that a config without the API skips.
            from ztun.api.server import ApiContext, ApiServer

            context = ApiContext(options, router, self.tracker, self.dns,
                                 Path(base_dir) if base_dir is not None else None)  # fmt: skip
            self.api = ApiServer(api, context)
        self.inbounds: list[Inbound] = [
            build_inbound(o, self.dispatcher, options.route) for o in options.inbounds
        ]
        if not self.inbounds:
            raise ZtunError("the config has no inbound to run")
        if workers is not None:
            workers.adopt(self.inbounds)  # their listeners join a reuseport group
        self.monitor = self._network_monitor(options, outbounds)
        self._stop = asyncio.Event()
        self._signals = 0

    def _network_monitor(self, options: Options, outbounds: dict[str, Outbound]) -> Any:
        """The network monitor (docs/operations.md), when something follows the uplink:
        auto_detect_interface, or a TUN's auto_route (whose UDP sessions must move along)."""
        route = options.route
        fixed = route.default_interface if not route.auto_detect_interface else None
        dial.set_default_interface(fixed)
        if not (route.auto_detect_interface or any(getattr(o, "auto_route", False)
                                                   for o in options.inbounds)):  # fmt: skip
            return None
        from ztun.platform.linux.monitor import NetworkMonitor

        follower = NetworkFollower(outbounds, self.inbounds,
                                   auto_detect=route.auto_detect_interface)  # fmt: skip
        tuns = [n for o in options.inbounds if (n := getattr(o, "interface_name", None))]
        if self.workers is not None:
            follower = self.workers.follow(follower)  # type: ignore[assignment]
        return NetworkMonitor(follower, ignore=tuns)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: stopping (again to exit at once)", signal.Signals(signum).name)
            self._stop.set()
            return
        log.warning("%s again: exiting now", signal.Signals(signum).name)
        for inbound in self.inbounds:
            try:
                inbound.abort()
            except Exception as e:  # the others' routes still go, and the exit still happens
                log.error("inbound %s: %s", inbound.tag, e)
        logging.shutdown()
        os._exit(1)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        router = self.dispatcher.router
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        started: list[Inbound] = []
        try:
            for inbound in self.inbounds:
                await inbound.start()  # a start that fails undoes what it did itself
                started.append(inbound)
            if self.api is not None:
                await self.api.start()
            if self.monitor is not None:
                # After the inbounds: a start that fails says so in one line, and the TUN is
                # already there to be left out (until the first decision, within
                # milliseconds, sockets leave as without the monitor: marked, not bound).
                await self.monitor.start()
            if self.workers is not None:
                self.workers.start(self.inbounds, tracker=self.tracker, router=router,
                                   auto_detect=self.options.route.auto_detect_interface)
            return await self._run()
        except GeneratorExit:
            raise  # the coroutine is being closed: nothing may be awaited any more
        except BaseException:
            # Start-up failed, or something escaped while running or stopping: every inbound
            # that started puts back what it changed before the error goes on.
            if self.api is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.api.stop(), ABORT_STOP_TIMEOUT)
            for inbound in reversed(started):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(inbound.stop(), ABORT_STOP_TIMEOUT)
            if self.dns is not None:
                with contextlib.suppress(Exception):
                    await self.dns.close()
            raise
        finally:
            if self.monitor is not None:
                self.monitor.stop()
            if self.workers is not None:
                self.workers.kill()  # a no-op after a clean stop
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    async def _run(self) -> int:
        # Everything built so far (modules, config, compiled rules, GeoIP readers) lives until
        # exit: frozen, the collector stops walking it in every full collection, which
        # otherwise showed as multi-millisecond pauses in the p99 connection setup time.
        gc.freeze()
        trim_heap()  # what parsing big rule sets freed goes back to the kernel
        log.info("ztun started: %d inbound(s), %d outbound(s)",
                 len(self.inbounds), len(self.dispatcher.outbounds))  # fmt: skip
        await self._stop.wait()
        if self.workers is not None:
            self.workers.stop()  # they drain alongside the inbounds
        if self.monitor is not None:
            self.monitor.stop()  # no resets while the inbounds drain
        for inbound in self.inbounds:
            await inbound.stop()
        tasks = set().union(*(i.tasks for i in self.inbounds))
        if tasks:
            log.info("waiting up to %gs for %d open flow(s)", self.grace, len(tasks))
        clean = await wait_closed(tasks, self.grace)
        if not clean:
            log.info("grace period over: closed the remaining flows")
        if self.workers is not None:
            await self.workers.wait_stopped(self.grace)
        if self.api is not None:
            await self.api.stop()
        await self.dispatcher.close()
        if self.dns is not None:
            await self.dns.close()
        log.info("ztun stopped")
        return 0


def _hijacks_dns(router: Any) -> bool:
    return any(isinstance(r.action, HijackDNS) for r in getattr(router, "rules", ()))


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _raise_fd_limit() -> None:
    """Each flow holds two sockets (plus pipes while data moves): lift the soft open-file
    limit to the hard one, as Go programs such as sing-box do at start."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def run(path: str | Path, log_level: str | None = None, *, grace: float = GRACE_PERIOD) -> int:
    """Run the config at `path` until a signal; the exit code."""
    from ztun.check import load_and_compile

    compiled = load_and_compile(path)
    options, router, warnings = compiled.options, compiled.router, compiled.warnings
    setup_logging(options.log, log_level)
    # What `ztun check` warns about (features accepted but not executed, stale rule sets, ...)
    # is said once here too: a config run without checking should not fail silently.
    for warning in warnings:
        log.warning("%s: %s", warning.mark or "<config>", warning.message)
    _raise_fd_limit()
    # Remote rule sets started from their cached copy; revalidating them never delays start-up.
    from ztun.provider.ruleset import RuleSetRefresher

    # Before any thread or event loop exists (runtime/workers.py says why).
    from ztun.runtime.workers import fork_pool

    pool = fork_pool(options, router, dns_router=compiled.dns_router,
                     base_dir=compiled.loaded.base_dir, grace=grace)  # fmt: skip
    refresher = RuleSetRefresher(compiled.rule_set_refresh)
    refresher.start()
    runner = asyncio.Runner() if os.environ.get("ZTUN_LOOP") == "asyncio" else _runner()
    try:
        with runner:
            return runner.run(
                _serve(options, router, grace, compiled.dns_router,
                       compiled.loaded.base_dir, pool)
            )  # fmt: skip
    finally:
        refresher.stop()
        if pool is not None:
            pool.kill()


async def _serve(
    options: Options,
    router: RouterLike,
    grace: float,
    dns_router: Any = None,
    base_dir: str | Path | None = None,
    workers: WorkerPool | None = None,
) -> int:
    return await Box(options, router, grace=grace, dns_router=dns_router,
                     base_dir=base_dir, workers=workers).serve()  # fmt: skip
