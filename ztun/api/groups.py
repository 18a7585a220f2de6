"""The Clash API's group endpoints: `/proxies` with the groups' choices, `PUT /proxies/{name}`
(switch a selector), `GET /proxies/{name}/delay` and `GET /group/{name}/delay` (URL tests).

Owns the requests' parameters (`url`, `timeout` in ms, bounded) and answers in Clash's shapes
and status codes; the server (ztun.api.server) routes here, the groups and the probe live in
ztun/outbound/. Kept apart from the server so that its routes stay one line each.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ztun.api import views
from ztun.config.options import DEFAULT_URLTEST_URL
from ztun.errors import ZtunError
from ztun.outbound import probe
from ztun.outbound.group import GroupOutbound
from ztun.outbound.selector import SelectorOutbound
from ztun.outbound.urltest import URLTestOutbound

#: the bounds of a delay request's `timeout` (ms)
MIN_TIMEOUT_MS = 100
MAX_TIMEOUT_MS = 30_000
#: A PUT body is a tag in a small JSON object.
MAX_BODY = 4096


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, separators=(",", ":")), status=status,
                        content_type="application/json")  # fmt: skip


def _error(message: str, status: int) -> web.Response:
    return _json({"message": message}, status)


def proxies_view(outbound_types: Mapping[str, str], final: str,
                 outbounds: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    groups = {tag: (o.now, list(o.member_tags)) for tag, o in outbounds.items()
              if isinstance(o, GroupOutbound)}  # fmt: skip
    return views.proxies(outbound_types, final, groups, probe.HISTORY)


async def put_proxy(request: web.Request, outbounds: Mapping[str, Any]) -> web.Response:
    """Clash's switch: body `{"name": member}`; 204, 400 (not a selector, no such member)
    or 404."""
    group = outbounds.get(request.match_info["name"])
    if group is None:
        return _error("Resource not found", 404)
    if not isinstance(group, SelectorOutbound):
        return _error("Must be a Selector", 400)
    body = await request.content.read(MAX_BODY + 1)
    try:
        member = json.loads(body).get("name") if len(body) <= MAX_BODY else None
    except (ValueError, AttributeError):
        member = None
    if not isinstance(member, str):
        return _error('expected {"name": "<member tag>"}', 400)
    try:
        group.select(member)
    except ZtunError as e:
        return _error(str(e), 400)
    return web.Response(status=204)


def _params(request: web.Request, default_url: str) -> tuple[str, float] | web.Response:
    url = request.query.get("url") or default_url
    try:
        probe.Target.parse(url)
    except probe.ProbeError as e:
        return _error(str(e), 400)
    text = request.query.get("timeout", "5000")
    if not text.isdigit():
        return _error("timeout: milliseconds, as a number", 400)
    timeout_ms = min(max(int(text), MIN_TIMEOUT_MS), MAX_TIMEOUT_MS)
    return url, timeout_ms / 1000


async def proxy_delay(request: web.Request, outbounds: Mapping[str, Any]) -> web.Response:
    """One URL test through outbound `name` (a group: through its choice): `{"delay": ms}`;
    504 when it timed out, 503 when it failed otherwise (Clash's codes)."""
    outbound = outbounds.get(request.match_info["name"])
    if outbound is None:
        return _error("Resource not found", 404)
    params = _params(request, getattr(outbound, "url", DEFAULT_URLTEST_URL))
    if isinstance(params, web.Response):
        return params
    url, timeout = params
    try:
        delay: int | None = await probe.url_delay(outbound, url, timeout)
    except probe.ProbeError as e:
        probe.record(outbound.tag, None)
        if "no answer within" in str(e):
            return _error("Timeout", 504)
        return _error(f"An error occurred in the delay test: {e}", 503)
    probe.record(outbound.tag, delay)
    return _json({"delay": delay})


async def group_delay(request: web.Request, outbounds: Mapping[str, Any]) -> web.Response:
    """A URL test of every member of group `name`, at once: `{member: ms}`, members that
    failed left out (as sing-box). A urltest group's own URL updates its choice too."""
    group = outbounds.get(request.match_info["name"])
    if not isinstance(group, GroupOutbound):
        return _error("Resource not found", 404)
    params = _params(request, getattr(group, "url", DEFAULT_URLTEST_URL))
    if isinstance(params, web.Response):
        return params
    url, timeout = params
    if isinstance(group, URLTestOutbound):
        results = await group.probe_all(url, timeout)
    else:

        async def one(tag: str) -> tuple[str, int]:
            try:
                delay: int | None = await probe.url_delay(group.members[tag], url, timeout)
            except probe.ProbeError:
                delay = None
            probe.record(tag, delay)
            return tag, delay or 0

        results = dict(await asyncio.gather(*(one(t) for t in group.member_tags)))
    return _json({tag: delay for tag, delay in results.items() if delay})
