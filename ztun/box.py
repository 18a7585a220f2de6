"""`ztun run`: build inbounds, outbounds and the router from a config, run them, stop cleanly.

Owns: the lifecycle (start inbounds; on the first SIGINT/SIGTERM stop accepting, let open
flows finish with FIN for a bounded grace period, then close the rest and exit 0; on a second
signal put back what the inbounds changed on the host (`Inbound.abort`: auto_route's routes)
and exit at once), live reload (SIGHUP, `ztun reload`, `PUT /configs`: the config read,
checked and compiled again off the loop, then switched to, one reload at a time, within
bounds; see `Box.reload`), the event loop choice (uvloop when installed), and logging setup.

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
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ztun.config.changes import ReloadPlan, plan_reload
from ztun.config.options import InboundOptions, LogOptions, Options
from ztun.config.validate import DEFAULT_AUTO_ROUTE_MARK
from ztun.errors import ConfigError, ZtunError
from ztun.inbound.registry import Inbound, build_inbound
from ztun.outbound.base import Outbound
from ztun.outbound.registry import build_outbounds
from ztun.outbound.selector import SelectorOutbound
from ztun.outbound.urltest import URLTestOutbound
from ztun.platform.linux.memory import trim_heap
from ztun.route.action import HijackDNS
from ztun.runtime import dial
from ztun.runtime.cache_file import cache_path
from ztun.runtime.dispatch import Dispatcher, RouterLike, wait_closed
from ztun.runtime.tracker import Tracker

if TYPE_CHECKING:
    from ztun.api.server import ApiServer
    from ztun.check import Compiled
    from ztun.dns.module import DnsModule
    from ztun.runtime.workers import WorkerPool
from ztun.runtime.network import NetworkFollower

log = logging.getLogger("ztun")

#: Seconds open flows get to finish after the first signal.
GRACE_PERIOD = 5.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Reloads the config (docs/operations.md#reload), as sing-box and most daemons do.
RELOAD_SIGNAL = signal.SIGHUP
#: How long an inbound's stop may take when an exception is already on its way out.
ABORT_STOP_TIMEOUT = 5.0
#: Seconds reading, checking and compiling a config may take in a reload (rule-set downloads
#: included: each has its own deadline); past it the reload is refused.
RELOAD_COMPILE_TIMEOUT = 60.0
#: Seconds stopping one inbound and starting its successor may take in a reload (a TUN drains
#: its flows for up to 2 s and puts its routes back).
RELOAD_INBOUND_TIMEOUT = 15.0
#: Seconds the DNS module a reload replaced keeps answering what was asked of it before.
RETIRED_DNS_GRACE = 10.0

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


def _owner_needs(router: Any, dns_router: Any) -> frozenset[str]:
    return frozenset(getattr(router, "owner_needs", ())) | frozenset(
        getattr(dns_router, "owner_needs", ()))  # fmt: skip


def _owner_finder(router: Any, dns_router: Any) -> Any:
    """The owner lookup, only when a route or DNS rule has a process or user item: other
    configs never pay for it. Linux only; elsewhere such items match no flow."""
    needs = _owner_needs(router, dns_router)
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
        config_path: str | Path | None = None,
        refresher: Any = None,
        workers: WorkerPool | None = None,
    ) -> None:
        self.options = options
        #: the worker processes that share the mixed and auto_redirect listeners (or None)
        self.workers = workers
        self.grace = grace
        #: the config file a reload reads again (None: reloading is not offered)
        self.config_path = config_path
        self.base_dir = base_dir
        self.dns_router = dns_router
        #: the background revalidation of remote rule sets (replaced by a reload)
        self.refresher = refresher
        if any(getattr(o, "auto_route", False) for o in options.inbounds):
            # Before any inbound, outbound or DNS transport opens a socket: all of them carry
            # auto_route's mark from the first one on (runtime/dial.py).
            dial.set_own_mark(options.route.default_mark or DEFAULT_AUTO_ROUTE_MARK)
        # Both through their registries (type → options class, class): no if-chain on `type`.
        self.outbounds = outbounds = build_outbounds(
            options.outbounds, cache_path(options.experimental.cache_file, base_dir)
        )
        #: the DNS module, None without dns.servers or a hijack-dns rule
        self.dns: DnsModule | None = _build_dns(options, outbounds, dns_router, base_dir,
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
        self.dispatcher.dns_needs_owner = bool(getattr(dns_router, "owner_needs", ()))
        self.api: ApiServer | None = None
        if self.tracker is not None:
            # Imported here: aiohttp costs start-up time that a config without the API skips.
            from ztun.api.server import ApiContext, ApiServer

            context = ApiContext(options, router, self.tracker, self.dns,
                                 Path(base_dir) if base_dir is not None else None)  # fmt: skip
            context.outbounds = outbounds  # the groups' choices and probes (/proxies)
            if config_path is not None:
                context.reload = self.reload
            self.api = ApiServer(api, context)
        self.inbounds: list[Inbound] = [
            build_inbound(o, self.dispatcher, options.route) for o in options.inbounds
        ]
        if not self.inbounds:
            raise ZtunError("the config has no inbound to run")
        self.follower: NetworkFollower | None = None
        if workers is not None:
            workers.adopt(self.inbounds)  # their listeners join a reuseport group
        self.monitor = self._network_monitor(options, outbounds)
        self._stop = asyncio.Event()
        self._signals = 0
        #: one reload at a time; a reload waits for the one before it
        self._reload_lock = asyncio.Lock()
        #: held while a reload switches (stops and starts inbounds): the exit waits for it
        self._switching = asyncio.Lock()
        #: started (a SIGHUP before that is ignored: there is nothing to switch yet)
        self._running = False
        self._reload_tasks: set[asyncio.Task[Any]] = set()
        #: reloads done (applied or refused), and the last outcome, for `ztun reload`
        self.reloads = 0
        self.last_reload: dict[str, Any] | None = None
        #: inbounds a reload stopped whose flows go on (the mixed inbound's): waited for at exit
        self._retired_inbounds: list[Inbound] = []
        #: what a reload replaced, closed at exit (their open flows still use them)
        self._retired_outbounds: list[Outbound] = []
        self._retired_dns: set[asyncio.Task[None]] = set()

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
        self.follower = follower
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
        with contextlib.suppress(Exception):
            self._forget_run_file()
        logging.shutdown()
        os._exit(1)

    def _on_reload_signal(self) -> None:
        if self._stop.is_set():
            log.info("SIGHUP: ignored, ztun is stopping")
            return
        if not self._running:
            log.warning("SIGHUP: ignored, ztun is still starting (send it again once "
                        "\"ztun started\" is logged)")  # fmt: skip
            return
        task = asyncio.get_running_loop().create_task(self.reload("SIGHUP"))
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        router = self.dispatcher.router
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        # Until reloading is possible (inbounds started), a SIGHUP is only logged: its default
        # action would kill the process without putting the routes back.
        loop.add_signal_handler(RELOAD_SIGNAL, self._on_reload_signal)
        started: list[Inbound] = []
        try:
            for inbound in self.inbounds:
                await inbound.start()  # a start that fails undoes what it did itself
                started.append(inbound)
            if self.api is not None:
                await self.api.start()
            for outbound in self.dispatcher.outbounds.values():
                start = getattr(outbound, "start", None)
                if start is not None:
                    await start()  # urltest groups probe from start-up on
            if self.monitor is not None:
                # After the inbounds: a start that fails says so in one line, and the TUN is
                # already there to be left out (until the first decision, within
                # milliseconds, sockets leave as without the monitor: marked, not bound).
                await self.monitor.start()
            if self.workers is not None:
                self.workers.start(self.inbounds, tracker=self.tracker, router=router,
                                   auto_detect=self.options.route.auto_detect_interface,
                                   outbounds=self.dispatcher.outbounds)  # fmt: skip
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
            for sig in (*STOP_SIGNALS, RELOAD_SIGNAL):
                loop.remove_signal_handler(sig)
            for task in list(self._reload_tasks):
                task.cancel()
            if self.refresher is not None:
                self.refresher.stop()
            self._forget_run_file()

    async def _run(self) -> int:
        # Everything built so far (modules, config, compiled rules, GeoIP readers) lives until
        # exit: frozen, the collector stops walking it in every full collection, which
        # otherwise showed as multi-millisecond pauses in the p99 connection setup time.
        gc.collect()  # start-up's garbage in cycles (parsed YAML, schema checks) goes first
        gc.freeze()
        trim_heap()  # what parsing big rule sets freed goes back to the kernel
        log.info("ztun started: %d inbound(s), %d outbound(s)",
                 len(self.inbounds), len(self.dispatcher.outbounds))  # fmt: skip
        self._running = True
        self._write_run_file()
        await self._stop.wait()
        # A reload that is switching finishes (bounded) before the inbounds stop; one still
        # reading its config sees the stop afterwards and switches nothing.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._switching.acquire(), 2 * RELOAD_INBOUND_TIMEOUT)
        if self.workers is not None:
            self.workers.stop()  # they drain alongside the inbounds
        if self.monitor is not None:
            self.monitor.stop()  # no resets while the inbounds drain
        for inbound in self.inbounds:
            await inbound.stop()
        every = [*self.inbounds, *self._retired_inbounds]
        tasks = set().union(*(i.tasks for i in every))
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
        for outbound in self._retired_outbounds:
            with contextlib.suppress(Exception):
                await outbound.close()
        for task in list(self._retired_dns):
            task.cancel()  # each closes its module as it ends
        if self._retired_dns:
            await asyncio.wait(set(self._retired_dns), timeout=ABORT_STOP_TIMEOUT)
        if self.dns is not None:
            await self.dns.close()
        log.info("ztun stopped")
        return 0

    # -- reload ---------------------------------------------------------------------------

    def _compile(self) -> Compiled:
        """Read, check and compile the config file again (in a worker thread: big rule sets
        take seconds, and the loop keeps moving bytes meanwhile)."""
        from ztun.check import load_and_compile

        assert self.config_path is not None
        return load_and_compile(self.config_path)

    async def reload(self, source: str = "API") -> list[str]:
        """Switch to the config file as it is now; the problems that refused it ([] when it
        was applied). One at a time; ignored while ztun stops."""
        if self.config_path is None:
            return ["this ztun was not started from a config file"]
        if self._stop.is_set():
            log.info("reload (%s): ignored, ztun is stopping", source)
            return ["ztun is stopping"]
        if not self._running:
            return ["ztun is still starting"]
        # Its own task, shielded: a caller that goes away (an API client hanging up) does
        # not cut a reload in the middle of its switch.
        task = asyncio.get_running_loop().create_task(self._serialized_reload(source))
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)
        return await asyncio.shield(task)

    async def _serialized_reload(self, source: str) -> list[str]:
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            begun = loop.time()
            log.info("reload (%s): reading %s", source, self.config_path)
            try:
                problems = await self._reload(source)
            except Exception as e:  # a bug: said once, and the next reload may still work
                log.exception("reload (%s) failed", source)
                problems = [f"the reload failed: {e}"]
            if problems is None:  # stopping meanwhile
                return ["ztun is stopping"]
            took = loop.time() - begun
            if problems:
                log.error("reload (%s) refused after %.2fs, the running config stays:\n  %s",
                          source, took, "\n  ".join(problems))  # fmt: skip
            else:
                log.info("reload (%s): done in %.2fs", source, took)
            self.reloads += 1
            self.last_reload = {"source": source, "applied": not problems,
                                "problems": problems, "seconds": round(took, 3)}  # fmt: skip
            self._write_run_file()
            return problems

    async def _reload(self, source: str) -> list[str] | None:
        try:
            compiled = await asyncio.wait_for(asyncio.to_thread(self._compile),
                                              RELOAD_COMPILE_TIMEOUT)  # fmt: skip
        except ConfigError as e:
            return [str(d) for d in e.diagnostics] or [str(e)]
        except TimeoutError:
            return [f"reading and compiling {self.config_path} took more than "
                    f"{RELOAD_COMPILE_TIMEOUT:g}s"]  # fmt: skip
        except ZtunError as e:
            return [str(e)]
        except Exception as e:  # a bug: the running config stays, and the reason is said
            log.exception("reload: compiling the config failed")
            return [f"compiling the config failed: {e}"]
        if self._stop.is_set():
            log.info("reload (%s): ztun is stopping, not switching", source)
            return None
        for warning in compiled.warnings:
            log.warning("%s: %s", warning.mark or "<config>", warning.message)
        async with self._switching:
            if self._stop.is_set():
                return None
            return await self._switch(compiled)

    async def _switch(self, compiled: Compiled) -> list[str]:
        """Build what the new config needs (nothing running is touched until all of it is
        built: a failure here refuses the reload), then swap rules and outbounds for new
        flows, then restart the inbounds the plan names."""
        old_options, new, old_dns = self.options, compiled.options, self.dns
        old_router, router = self.dispatcher.router, compiled.router
        hijacks = _hijacks_dns(router)
        plan = plan_reload(old_options, new, old_hijacks=_hijacks_dns(old_router),
                           new_hijacks=hijacks)  # fmt: skip
        try:
            outbounds = build_outbounds(
                new.outbounds, cache_path(new.experimental.cache_file, self.base_dir)
            )
            _carry_choices(self.dispatcher.outbounds, outbounds)
            dns: DnsModule | None = self.dns
            if plan.rebuild_dns:
                if self.dns is not None:
                    self.dns.save()  # the new module reads the FakeIP table it wrote
                dns = _build_dns(new, outbounds, compiled.dns_router, self.base_dir,
                                 hijack=hijacks, previous=self.dns)  # fmt: skip
            fresh = {o.tag: build_inbound(o, self.dispatcher, new.route)
                     for o in new.inbounds if o.tag in plan.restart + plan.start}  # fmt: skip
        except ZtunError as e:
            return [str(e)]
        if self.workers is not None:
            self.workers.adopt(fresh.values())  # a restarted listener stays shared
        # -- from here on, new flows get the new config
        gc.unfreeze()  # the old router and outbounds may go once their flows end
        if any(getattr(o, "auto_route", False) for o in new.inbounds):
            dial.set_own_mark(new.route.default_mark or DEFAULT_AUTO_ROUTE_MARK)
        mode = old_router.mode.current if hasattr(old_router, "mode") else None
        if mode is not None and hasattr(router, "mode") and router.mode.set(mode) is None:
            log.info("reload: the new config has no clash mode %r; the mode is now %s",
                     mode, router.mode.current)  # fmt: skip
        retired = list(self.dispatcher.outbounds.values())
        self._retired_outbounds = (self._retired_outbounds + retired)[-64:]
        for outbound in retired:
            if isinstance(outbound, URLTestOutbound):
                await outbound.close()  # its probes; flows through it keep their member
        if not plan.rebuild_dns and dns is not None:
            dns.adopt(compiled.dns_router, outbounds)
        elif dns is not self.dns and self.dns is not None:
            self._retire_dns(self.dns)
        d = self.dispatcher
        d.router, d.outbounds, self.outbounds = router, dict(outbounds), outbounds
        d.dns_hijack = dns.hijack if dns is not None else None
        d.names = dns.names if dns is not None and dns.gives_names else None
        if _owner_needs(old_router, self.dns_router) != _owner_needs(router, compiled.dns_router):
            if d.owners is not None:
                d.owners.close()
            d.owners = _owner_finder(router, compiled.dns_router)
        d.dns_needs_owner = bool(getattr(compiled.dns_router, "owner_needs", ()))
        self.dns, self.dns_router, self.options = dns, compiled.dns_router, new
        if self.tracker is not None:
            self.tracker.inbound_types = {o.tag: o.type for o in new.inbounds}
        if self.api is not None:
            context = self.api.context
            context.options, context.router, context.dns = new, router, dns
            context.outbounds = outbounds
        for outbound in outbounds.values():
            start = getattr(outbound, "start", None)
            if start is not None:
                await start()  # urltest groups probe from now on
        if self.refresher is not None:
            self.refresher.stop()
        if compiled.rule_set_refresh:
            from ztun.provider.ruleset import RuleSetRefresher

            self.refresher = RuleSetRefresher(compiled.rule_set_refresh)
            self.refresher.start()
        else:
            self.refresher = None
        problems = await self._switch_inbounds(plan, fresh, old_options)
        if self.workers is not None:
            # They compile the same file in the supervisor and are replaced, their open flows
            # left to end (runtime/supervisor.py).
            self.workers.reload(self.inbounds, router, self.dispatcher.outbounds)
            if new.workers != old_options.workers:
                log.warning("reload: workers changed but is not applied by a reload: the "
                            "number of processes is set at start")  # fmt: skip
        if self.api is not None:
            self.api.context.options = self.options  # what runs, after any inbound put back
        await self._switch_monitor(plan, new)
        for what in plan.not_applied:
            log.warning("reload: %s changed but is not applied by a reload: %s",
                        what.split(" ", 1)[0], what.split(" ", 1)[1].strip("()"))  # fmt: skip
        log.info("reload: rules and outbounds switched for new flows (%d outbound(s)); "
                 "inbounds kept: %s; restarted: %s; stopped: %s; started: %s; DNS %s",
                 len(outbounds), ", ".join(plan.keep) or "none",
                 ", ".join(plan.restart) or "none", ", ".join(plan.stop) or "none",
                 ", ".join(plan.start) or "none",
                 "none" if dns is None else "rebuilt" if dns is not old_dns
                 else "kept (rules switched)")  # fmt: skip
        gc.collect()
        gc.freeze()
        trim_heap()
        return problems

    async def _switch_inbounds(self, plan: ReloadPlan, fresh: dict[str, Inbound],
                               old_options: Options) -> list[str]:  # fmt: skip
        """Stop what goes, then start what comes, in the new config's order. A restarted
        inbound whose successor cannot start (its port taken, say) is started again with its
        old options, and the problem is reported."""
        problems: list[str] = []
        running = {i.tag: i for i in self.inbounds}
        new_by_tag = {o.tag: o for o in self.options.inbounds}
        for tag in plan.retune:  # kept: only options it applies while it runs changed
            kept = running.get(tag)
            if kept is not None and tag in new_by_tag:
                kept.retune(new_by_tag[tag])  # type: ignore[attr-defined]
        for tag in (*plan.stop, *plan.restart):
            inbound = running.pop(tag, None)
            if inbound is None:  # an earlier reload could not start it
                continue
            try:
                await asyncio.wait_for(inbound.stop(), RELOAD_INBOUND_TIMEOUT)
            except Exception as e:
                log.error("reload: inbound %s did not stop cleanly: %s", tag, e)
            if inbound.tasks:  # its flows go on (the mixed inbound's): waited for at exit
                self._retired_inbounds.append(inbound)
        self._retired_inbounds = [i for i in self._retired_inbounds if i.tasks]
        old_by_tag = {o.tag: o for o in old_options.inbounds}
        #: what each running inbound really runs with, where that is not the new config
        ran_with: dict[str, InboundOptions | None] = {}
        for tag in (*plan.restart, *plan.start):
            inbound = fresh[tag]
            try:
                await asyncio.wait_for(inbound.start(), RELOAD_INBOUND_TIMEOUT)
                running[tag] = inbound
                continue
            except Exception as e:  # a start that fails undoes what it did itself
                why = str(e) or type(e).__name__
                problems.append(f"inbound {tag!r} could not start: {why}")
                log.error("reload: inbound %s could not start: %s", tag, why)
            ran_with[tag] = None
            if tag in plan.restart:  # put the one that ran back
                back = build_inbound(old_by_tag[tag], self.dispatcher, old_options.route)
                try:
                    await asyncio.wait_for(back.start(), RELOAD_INBOUND_TIMEOUT)
                    running[tag] = back
                    ran_with[tag] = old_by_tag[tag]
                    log.warning("reload: inbound %s runs with its previous options", tag)
                except Exception as e:
                    log.error("reload: inbound %s could not start again either: %s", tag, e)
        if ran_with:
            # The options of record say what runs, so the next reload of the same file
            # tries these inbounds again instead of taking them as unchanged.
            options = (ran_with.get(o.tag, o) for o in self.options.inbounds)
            self.options = replace(self.options,
                                   inbounds=tuple(o for o in options if o is not None))
        order = [o.tag for o in self.options.inbounds]
        self.inbounds = [running[t] for t in order if t in running]
        self.inbounds += [i for t, i in running.items() if t not in order]
        return problems

    async def _switch_monitor(self, plan: ReloadPlan, options: Options) -> None:
        if not plan.rebuild_monitor:
            if self.follower is not None:
                self.follower.outbounds = self.outbounds
                self.follower.inbounds = list(self.inbounds)
            return
        if self.monitor is not None:
            self.monitor.stop()
        self.follower = None
        self.monitor = self._network_monitor(options, self.outbounds)
        if self.monitor is not None:
            try:
                await self.monitor.start()
            except ZtunError as e:
                log.error("reload: the network monitor did not start: %s", e)
                self.monitor = None

    def _retire_dns(self, module: DnsModule) -> None:
        """Close a replaced DNS module once the queries asked of it have had their time."""

        async def later() -> None:
            try:
                await asyncio.sleep(RETIRED_DNS_GRACE)
            finally:
                with contextlib.suppress(Exception):
                    await module.close()

        task = asyncio.get_running_loop().create_task(later())
        self._retired_dns.add(task)
        task.add_done_callback(self._retired_dns.discard)

    def _write_run_file(self) -> None:
        """Tell `ztun reload` where this ztun is (platform/linux/runfile.py)."""
        if self.config_path is None or not sys.platform.startswith("linux"):
            return
        from ztun.platform.linux.runfile import remove_stale_run_files, write_run_file

        if self.reloads == 0:
            remove_stale_run_files()  # a killed run's (its pid and start time say so)
        api = self.options.experimental.clash_api.external_controller or None
        if self.api is not None and self.api.address is not None:
            host, port = self.api.address
            api = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            write_run_file(self.config_path, api, self.reloads, self.last_reload)
        except ZtunError as e:
            log.info("ztun reload cannot find this ztun (%s): send it SIGHUP instead", e)

    def _forget_run_file(self) -> None:
        if self.config_path is None or not sys.platform.startswith("linux"):
            return
        from ztun.platform.linux.runfile import remove_run_file

        remove_run_file(self.config_path)


def _carry_choices(old: dict[str, Outbound], new: dict[str, Outbound]) -> None:
    """A reload keeps what was picked by hand: a selector that is still there with the
    member it had in use keeps using it (without the cache file it would fall back to its
    `default`)."""
    for tag, group in new.items():
        before = old.get(tag)
        if (isinstance(group, SelectorOutbound) and isinstance(before, SelectorOutbound)
                and before.now in group.member_tags and before.now != group.now):  # fmt: skip
            group.select(before.now)


def _build_dns(
    options: Options,
    outbounds: dict[str, Outbound],
    dns_router: Any,
    base_dir: str | Path | None,
    *,
    hijack: bool,
    previous: DnsModule | None = None,
) -> DnsModule | None:
    """The DNS module, None without dns.servers or a hijack-dns rule. Imported only then:
    dnspython and the transports are ~3 MiB a config without DNS does not need."""
    if not (options.dns.servers or hijack):
        return None
    from ztun.dns.module import build_dns

    return build_dns(options, outbounds, dns_router, base_dir, hijack=hijack, previous=previous)


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
                     base_dir=compiled.loaded.base_dir, grace=grace,
                     config_path=path)  # fmt: skip
    refresher = RuleSetRefresher(compiled.rule_set_refresh)
    refresher.start()
    runner = asyncio.Runner() if os.environ.get("ZTUN_LOOP") == "asyncio" else _runner()
    try:
        with runner:
            return runner.run(
                _serve(options, router, grace, compiled.dns_router,
                       compiled.loaded.base_dir, path, refresher, pool)
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
    config_path: str | Path | None = None,
    refresher: Any = None,
    workers: WorkerPool | None = None,
) -> int:
    return await Box(options, router, grace=grace, dns_router=dns_router, base_dir=base_dir,
                     config_path=config_path, refresher=refresher,
                     workers=workers).serve()  # fmt: skip
