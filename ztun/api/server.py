"""The Clash API (`experimental.clash_api`) and the status page, served with aiohttp.

Owns: the routes Clash dashboards and clients use (`/version`, `/configs`, `/proxies`,
`/rules`, `/connections`, `/traffic`, `/memory`, `/logs`, each stream as a WebSocket or as
chunked HTTP with one JSON object per line, as Clash serves them), ztun's own `/ztun/status`
(totals per outbound, DNS counters), the page at `/ui` (built in, or `external_ui`), and the
guard in front of them: the bearer secret (`Authorization: Bearer`, or `?token=` where a
browser cannot set a header), and without a secret (loopback only: `check` refuses the
rest) a Host and Origin check, so a web page cannot reach the API through DNS rebinding or a
cross-site WebSocket.

The JSON shapes are in `ztun.api.views`; the flows and their counters in the tracker
(`ztun.runtime.tracker`). `PUT /configs` reloads the config file through the box's
`ApiContext.reload` (204, or 400 with the problems; 501 when ztun runs without a file).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from ztun import __version__
from ztun.api import groups, views
from ztun.api.logs import CLASH_LEVELS, LogBroker
from ztun.config.options import ClashApiOptions, Options
from ztun.config.validate import split_controller
from ztun.errors import ZtunError
from ztun.resources import UI_DIR
from ztun.runtime.tracker import Tracker

log = logging.getLogger("ztun.api")

#: Streams (WebSocket or chunked) open at once; more are answered 503.
MAX_STREAMS = 64
#: How long one streamed item may wait for a slow reader before the stream is ended.
SEND_TIMEOUT = 5.0
#: Request bodies (PATCH /configs) are small.
MAX_BODY = 64 * 1024
#: Bounds of a `/connections` stream's `interval` (milliseconds).
MIN_INTERVAL_MS, MAX_INTERVAL_MS = 100, 60_000
#: Names of this host a browser sends as Host for a loopback API.
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})

_LOG_LEVEL_NAMES = {"warn": "warning", "fatal": "error", "panic": "error", "trace": "debug"}


@dataclass
class ApiContext:
    """What the API reads and acts on."""

    options: Options
    router: Any
    tracker: Tracker
    #: the DNS module (`ztun.dns.module.DnsModule`), None when it does not run
    dns: Any = None
    #: the config file's directory, for `external_ui`
    base_dir: Path | None = None
    #: `PUT /configs`: read, check and switch to the config file again; the problems that
    #: refused it, [] when applied (None: ztun runs without a config file)
    reload: Callable[[], Awaitable[list[str]]] | None = None
    started: float = field(default_factory=time.time)
    #: every outbound by tag (the groups: `/proxies`' now/all, PUT, the delay probes)
    outbounds: dict[str, Any] = field(default_factory=dict)


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_compact)


def _error(message: str, status: int) -> web.Response:
    return _json({"message": message}, status)


def _memory_in_use() -> int:
    """Resident set size in bytes (what Clash reports as `inuse`)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _hostname(host: str) -> str:
    """The host part of a Host header or an origin's netloc."""
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class ApiServer:
    def __init__(self, options: ClashApiOptions, context: ApiContext) -> None:
        self.options = options
        self.context = context
        parsed = split_controller(options.external_controller)
        if parsed is None:
            raise ZtunError(f"experimental.clash_api.external_controller: "
                            f"{options.external_controller!r} is not host:port")  # fmt: skip
        self.host, self.port = parsed
        self.secret = options.secret
        self.ui_root = self._ui_root()
        self.closing = asyncio.Event()
        self.streams = 0
        self.sockets: set[web.WebSocketResponse] = set()
        self.broker: LogBroker | None = None
        self.runner: web.AppRunner | None = None
        #: where it listens, once started: (host, port) of the first socket
        self.address: tuple[str, int] | None = None

    def _ui_root(self) -> Path:
        if not self.options.external_ui:
            return UI_DIR
        root = Path(self.options.external_ui)
        if not root.is_absolute() and self.context.base_dir is not None:
            root = Path(self.context.base_dir) / root
        return root.resolve()

    # -- lifecycle ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/", self.hello)
        r.add_get("/version", self.version)
        r.add_get("/configs", self.get_configs)
        r.add_patch("/configs", self.patch_configs)
        r.add_put("/configs", self.put_configs)
        r.add_get("/proxies", self.get_proxies)
        r.add_get("/proxies/{name}", self.get_proxy)
        r.add_put("/proxies/{name}", self.put_proxy)
        r.add_get("/proxies/{name}/delay", self.proxy_delay)
        r.add_get("/group/{name}/delay", self.group_delay)
        r.add_get("/rules", self.get_rules)
        r.add_get("/connections", self.get_connections)
        r.add_delete("/connections", self.close_connections)
        r.add_delete("/connections/{id}", self.close_connection)
        r.add_get("/traffic", self.traffic)
        r.add_get("/memory", self.memory)
        r.add_get("/logs", self.logs)
        r.add_get("/ztun/status", self.status)
        r.add_get("/ui", self.ui_redirect)
        r.add_get("/ui/{path:.*}", self.ui)
        return app

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.broker = LogBroker(loop)
        logging.getLogger("ztun").addHandler(self.broker)
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                    shutdown_timeout=1.0)  # fmt: skip
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host or None, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self.stop()
            raise ZtunError(f"experimental.clash_api: cannot listen on "
                            f"{self.options.external_controller}: {e.strerror or e}") from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.address = sockets[0].getsockname()[:2]
        log.info("clash api: listening on %s (status page at /ui)",
                 self.options.external_controller)  # fmt: skip

    async def stop(self) -> None:
        self.closing.set()
        for ws in list(self.sockets):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1.0)
        if self.broker is not None:
            logging.getLogger("ztun").removeHandler(self.broker)
            self.broker = None
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()

    # -- the guard ----------------------------------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        public = request.path == "/ui" or request.path.startswith("/ui/")
        if request.method == "OPTIONS" and self.secret:
            return self._cors(web.Response(status=204), request)
        if self.secret:
            if not public and not self._authorized(request):
                return self._cors(_error("Unauthorized", 401), request)
        elif not self._local(request):
            return _error("Forbidden: without a secret the API answers only loopback pages "
                          "and clients", 403)  # fmt: skip
        response = await handler(request)
        return self._cors(response, request) if self.secret else response

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else request.query.get("token", "")
        return hmac.compare_digest(token.encode("utf-8", "replace"),
                                   self.secret.encode("utf-8", "replace"))  # fmt: skip

    @staticmethod
    def _local(request: web.Request) -> bool:
        """No secret: the Host must name loopback (no DNS rebinding) and a browser's Origin,
        when there is one, must be a loopback page (no cross-site requests or WebSockets)."""
        if _hostname(request.host or "").lower() not in _LOOPBACK_NAMES:
            return False
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        netloc = origin.split("://", 1)[-1]
        return _hostname(netloc).lower() in _LOOPBACK_NAMES

    @staticmethod
    def _cors(response: web.StreamResponse, request: web.Request) -> web.StreamResponse:
        # With a secret, a dashboard on another origin may call the API (it must know it).
        if not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = request.headers.get("Origin", "*")
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Allow-Methods"] = "GET, PUT, PATCH, DELETE, OPTIONS"
        return response

    # -- plain requests -----------------------------------------------------------------------

    async def hello(self, request: web.Request) -> web.Response:
        return _json({"hello": "ztun"})

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": f"ztun {__version__}", "premium": False, "meta": False})

    def _configs(self) -> dict[str, Any]:
        options = self.context.options
        mixed = [i for i in options.inbounds if getattr(i, "type", "") == "mixed"]
        port = int(getattr(mixed[0], "listen_port", 0) or 0) if mixed else 0
        allow_lan = any(getattr(i, "listen", "127.0.0.1") not in ("127.0.0.1", "::1", "localhost")
                        for i in mixed)  # fmt: skip
        level = options.log.level.lower()
        mode = self.context.router.mode
        return views.configs(mode.current, list(mode.known), _LOG_LEVEL_NAMES.get(level, level),
                             port, allow_lan)  # fmt: skip

    async def get_configs(self, request: web.Request) -> web.Response:
        return _json(self._configs())

    async def patch_configs(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _error("the body is not JSON", 400)
        if not isinstance(body, dict):
            return _error("the body must be a JSON object", 400)
        mode = body.get("mode")
        if mode is not None:
            if not isinstance(mode, str):
                return _error("mode must be a string", 400)
            cell = self.context.router.mode
            switched = cell.set(mode)
            if switched is None:
                return _error(f"unknown mode {mode!r}: the modes are "
                              f"{', '.join(cell.known)}", 400)  # fmt: skip
            log.info("clash api: mode is now %s", switched)
        return web.Response(status=204)

    async def put_configs(self, request: web.Request) -> web.Response:
        if self.context.reload is None:
            return _error("this ztun runs without a config file to reload", 501)
        problems = await self.context.reload()
        if problems:
            return _json({"message": "the config was refused", "errors": problems}, 400)
        return web.Response(status=204)

    def _router_final(self) -> str:
        return str(self.context.router.final)

    def _proxies(self) -> dict[str, Any]:
        return groups.proxies_view(self.context.router.outbound_types, self._router_final(),
                                   self.context.outbounds)  # fmt: skip

    async def get_proxies(self, request: web.Request) -> web.Response:
        return _json(self._proxies())

    async def get_proxy(self, request: web.Request) -> web.Response:
        proxy = self._proxies()["proxies"].get(request.match_info["name"])
        return _json(proxy) if proxy is not None else _error("Resource not found", 404)

    async def put_proxy(self, request: web.Request) -> web.Response:
        return await groups.put_proxy(request, self.context.outbounds)

    async def proxy_delay(self, request: web.Request) -> web.Response:
        return await groups.proxy_delay(request, self.context.outbounds)

    async def group_delay(self, request: web.Request) -> web.Response:
        return await groups.group_delay(request, self.context.outbounds)

    async def get_rules(self, request: web.Request) -> web.Response:
        return _json(views.rules(self.context.router.rules, self._router_final()))

    async def get_connections(self, request: web.Request) -> web.StreamResponse:
        tracker = self.context.tracker
        if not _wants_websocket(request):
            return _json(views.connections(tracker))
        try:
            interval = int(request.query.get("interval", "1000"))
        except ValueError:
            interval = 1000
        interval = min(max(interval, MIN_INTERVAL_MS), MAX_INTERVAL_MS) / 1000

        async def snapshots() -> AsyncIterator[Any]:
            while True:
                yield views.connections(tracker)
                if not await self._pause(interval):
                    return

        return await self._stream(request, snapshots())

    async def close_connections(self, request: web.Request) -> web.Response:
        count = self.context.tracker.close_all()
        log.info("clash api: closed %d connection(s)", count)
        return web.Response(status=204)

    async def close_connection(self, request: web.Request) -> web.Response:
        if not self.context.tracker.close(request.match_info["id"]):
            return _error("Resource not found", 404)
        return web.Response(status=204)

    async def status(self, request: web.Request) -> web.Response:
        """ztun's own: what `ztun status`, `ztun top` and the page show besides Clash's."""
        tracker = self.context.tracker
        up, down = tracker.totals()
        dns: dict[str, Any] = {}
        module = self.context.dns
        if module is not None:
            client = getattr(module, "client", None)
            for tag, counters in getattr(client, "counters", {}).items():
                dns[tag] = {k: int(v) for k, v in vars(counters).items()}
        return _json({
            "version": __version__,
            "uptime": round(time.time() - self.context.started, 3),
            "mode": self.context.router.mode.current,
            "connections": tracker.open_count,
            "connectionsTotal": tracker.started,
            "closedByApi": tracker.closed_by_api,
            "untracked": tracker.untracked,
            "uploadTotal": up,
            "downloadTotal": down,
            "outbounds": tracker.per_outbound(),
            "dns": dns,
        })  # fmt: skip

    # -- streams ------------------------------------------------------------------------------

    async def traffic(self, request: web.Request) -> web.StreamResponse:
        tracker = self.context.tracker

        async def rates() -> AsyncIterator[Any]:
            last = tracker.totals()
            while True:
                if not await self._pause(1.0):
                    return
                now = tracker.totals()
                yield {"up": max(now[0] - last[0], 0), "down": max(now[1] - last[1], 0)}
                last = now

        return await self._stream(request, rates())

    async def memory(self, request: web.Request) -> web.StreamResponse:
        async def samples() -> AsyncIterator[Any]:
            while True:
                yield {"inuse": _memory_in_use(), "oslimit": 0}
                if not await self._pause(1.0):
                    return

        return await self._stream(request, samples())

    async def logs(self, request: web.Request) -> web.StreamResponse:
        broker = self.broker
        if broker is None:
            return _error("not running", 503)
        level = CLASH_LEVELS.get(request.query.get("level", "info").lower(), logging.INFO)
        queue = broker.subscribe(level)

        async def lines() -> AsyncIterator[Any]:
            try:
                while not self.closing.is_set():
                    try:
                        yield await asyncio.wait_for(queue.get(), 1.0)
                    except TimeoutError:
                        continue
            finally:
                broker.unsubscribe(queue)

        return await self._stream(request, lines())

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds`; False when the server is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closing.wait(), seconds)
        return not self.closing.is_set()

    async def _stream(self, request: web.Request, items: AsyncIterator[Any]) -> web.StreamResponse:
        """Serve `items` as a WebSocket (one text message each) or as chunked HTTP (one JSON
        object per line), the two ways Clash streams."""
        if self.streams >= MAX_STREAMS:
            return _error(f"too many streams open (at most {MAX_STREAMS})", 503)
        self.streams += 1
        try:
            if _wants_websocket(request):
                return await self._websocket(request, items)
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            if self.secret:
                self._cors(response, request)
            await response.prepare(request)
            async for item in items:
                data = json.dumps(item, separators=(",", ":")).encode() + b"\n"
                try:
                    await asyncio.wait_for(response.write(data), SEND_TIMEOUT)
                except (ConnectionError, TimeoutError, RuntimeError):
                    break
            return response
        finally:
            self.streams -= 1
            with contextlib.suppress(Exception):
                await items.aclose()  # type: ignore[attr-defined]

    async def _websocket(
        self, request: web.Request, items: AsyncIterator[Any]
    ) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=MAX_BODY)
        await ws.prepare(request)
        self.sockets.add(ws)

        async def reader() -> None:
            # Reading keeps control frames (ping, close) answered; nothing else is expected.
            async for msg in ws:
                if msg.type is WSMsgType.CLOSE or msg.type is WSMsgType.ERROR:
                    break

        reading = asyncio.ensure_future(reader())
        try:
            async for item in items:
                if ws.closed or reading.done():
                    break
                try:
                    await asyncio.wait_for(ws.send_str(json.dumps(item, separators=(",", ":"))),
                                           SEND_TIMEOUT)  # fmt: skip
                except (ConnectionError, TimeoutError, RuntimeError):
                    break
        finally:
            reading.cancel()
            self.sockets.discard(ws)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1.0)
        return ws

    # -- the page -----------------------------------------------------------------------------

    async def ui_redirect(self, request: web.Request) -> web.StreamResponse:
        target = "/ui/" + (f"?{request.query_string}" if request.query_string else "")
        raise web.HTTPFound(target)

    async def ui(self, request: web.Request) -> web.StreamResponse:
        root = self.ui_root
        wanted = request.match_info["path"] or "index.html"
        try:
            path = (root / wanted).resolve()
            path.relative_to(root)  # nothing outside the directory, symlinks included
        except (ValueError, OSError):
            return _error("Resource not found", 404)
        if path.is_dir():
            path = path / "index.html"
        if not path.is_file():
            return _error("Resource not found", 404)
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


def _wants_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"
