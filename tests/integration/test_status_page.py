"""The status page at /ui in a real headless browser (Debian's chromium), driven over the
DevTools protocol with aiohttp's WebSocket client: the page loads, shows a live flow (curl
through the mixed inbound) with its rule and outbound, and its close button ends that flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import need

from .api_peers import slow_server
from .peers import curl_path, free_port, start_ztun, wait_for
from .test_clash_api import CONFIG, _listening


def chromium_path() -> str:
    return need(shutil.which("chromium") or shutil.which("chromium-browser"), "chromium")


@contextlib.contextmanager
def chromium(tmp: Path) -> Iterator[str]:
    """A headless chromium; yields its browser DevTools WebSocket URL."""
    args = [chromium_path(), "--headless", "--no-sandbox", "--disable-gpu",
            "--no-first-run", "--disable-extensions", "--disable-background-networking",
            f"--user-data-dir={tmp / 'chromium'}", "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1", "about:blank"]  # fmt: skip
    log = open(tmp / "chromium.log", "w+b")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, stdout=log, stderr=log)
    try:
        def url() -> str | None:
            log.flush()
            found = re.search(rb"DevTools listening on (ws://\S+)",
                              (tmp / "chromium.log").read_bytes())  # fmt: skip
            return found.group(1).decode() if found else None

        ws = wait_for(url, 30)
        assert ws, (tmp / "chromium.log").read_text(errors="replace")[-2000:]
        yield ws
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


class Page:
    """One tab, through the browser's DevTools WebSocket (flat sessions)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: str) -> None:
        self.ws = ws
        self.session = session
        self.next_id = 100

    async def send(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return await command(self.ws, method, params, self.session, self._id())

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression,
                                 "returnByValue": True, "awaitPromise": True})  # fmt: skip
        return result["result"].get("value")

    async def wait(self, expression: str, timeout: float = 15.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        raise AssertionError(f"the page never had {expression}")


async def command(ws: aiohttp.ClientWebSocketResponse, method: str,
                  params: dict[str, Any] | None = None, session: str | None = None,
                  ident: int = 1) -> Any:  # fmt: skip
    message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
    if session:
        message["sessionId"] = session
    await ws.send_str(json.dumps(message))
    while True:
        reply = json.loads((await ws.receive(timeout=20)).data)
        if reply.get("id") == ident:
            assert "error" not in reply, reply
            return reply["result"]


def test_the_page_shows_a_live_flow_and_closes_it(tmp_path: Path) -> None:
    curl = curl_path()
    mixed, api = free_port(), free_port()
    with slow_server() as server:
        ztun = start_ztun(tmp_path, CONFIG.format(mixed=mixed, api=api, extra=""), mixed)
        transfer = None
        flow: subprocess.Popen[bytes] | None = None
        try:
            assert wait_for(lambda: _listening(api), 10)
            flow = subprocess.Popen([curl, "-s", "-o", str(tmp_path / "page.bin"), "-x",
                                     f"http://127.0.0.1:{mixed}", server.url(600, 50)])  # fmt: skip
            assert wait_for(lambda: server.transfers, 10)
            transfer = server.transfers[0]
            with chromium(tmp_path) as browser:
                asyncio.run(_drive(browser, f"http://127.0.0.1:{api}/ui", server.port))
            flow.wait(5)
            assert flow.returncode != 0, "curl finished as if nothing had closed its flow"
            assert wait_for(lambda: transfer.done, 5), "the server side stayed open"
            assert "end=closed" in ztun.text()
        finally:
            if flow is not None and flow.poll() is None:
                flow.kill()
                flow.wait()
            ztun.stop()


@contextlib.asynccontextmanager
async def status_page(browser: str, url: str) -> AsyncIterator[Page]:
    """A new tab of the headless browser on `url`, once the status page has loaded."""
    timeout = aiohttp.ClientTimeout(total=90)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.ws_connect(
        browser, max_msg_size=0
    ) as ws:
        target = await command(ws, "Target.createTarget", {"url": "about:blank"}, ident=1)
        attach = {"targetId": target["targetId"], "flatten": True}
        attached = await command(ws, "Target.attachToTarget", attach, ident=2)
        page = Page(ws, attached["sessionId"])
        await page.send("Page.enable")
        await page.send("Page.navigate", {"url": url})
        await page.wait("document.title === 'ztun status'")
        yield page


async def _drive(browser: str, url: str, server_port: int) -> None:
    async with status_page(browser, url) as page:
        # the live flow, with its rule and outbound
        row = await page.wait("""(() => { const r = document.querySelector('#connections tr');
            return r && r.innerText; })()""")  # fmt: skip
        assert f"127.0.0.1:{server_port}" in row and "final" in row and "direct" in row, row
        assert await page.wait("document.querySelector('#mode').options.length === 2")
        assert await page.evaluate("document.querySelector('#chart polyline') !== null")
        assert "direct" in await page.evaluate("document.querySelector('#outbounds').innerText")
        # the close button ends it, and the page sees it gone
        await page.evaluate("document.querySelector('button.close').click()")
        await page.wait("document.querySelectorAll('#connections tr').length === 0", 10)
        assert await page.evaluate("document.querySelector('#error').textContent") == ""
        # the mode switch
        await page.evaluate("""(() => { const s = document.querySelector('#mode');
            s.value = 'Block'; s.dispatchEvent(new Event('change')); return true; })()""")
        await page.wait("fetch('/configs').then(r => r.json()).then(c => c.mode === 'Block')")


@pytest.fixture(autouse=True)
def _needs_chromium() -> None:
    chromium_path()


GROUP_CONFIG = """\
log: {{level: info}}
inbounds:
  - {{type: mixed, tag: mixed-in, listen: 127.0.0.1, listen_port: {mixed}}}
outbounds:
  - {{type: direct, tag: direct}}
  - {{type: block, tag: block}}
  - {{type: selector, tag: pick, outbounds: [direct, block]}}
route: {{final: pick}}
experimental:
  clash_api: {{external_controller: "127.0.0.1:{api}"}}
"""


def test_the_page_switches_a_selector(tmp_path: Path) -> None:
    mixed, api = free_port(), free_port()
    ztun = start_ztun(tmp_path, GROUP_CONFIG.format(mixed=mixed, api=api), mixed)
    try:
        assert wait_for(lambda: _listening(api), 10)
        with chromium(tmp_path) as browser:
            asyncio.run(_switch(browser, f"http://127.0.0.1:{api}/ui"))
        assert "group pick: direct → block (selected)" in ztun.text()
    finally:
        ztun.stop()


async def _switch(browser: str, url: str) -> None:
    async with status_page(browser, url) as page:
        row = await page.wait("""(() => { const r = document.querySelector('#groups tr');
            return r && r.innerText; })()""")  # fmt: skip
        assert "pick" in row and "Selector" in row, row
        assert await page.evaluate("document.querySelector('select.group').value") == "direct"
        await page.evaluate("""(() => { const s = document.querySelector('select.group');
            s.value = 'block'; s.dispatchEvent(new Event('change')); return true; })()""")
        await page.wait("fetch('/proxies/pick').then(r => r.json()).then(p => p.now === 'block')")
        await page.wait("document.querySelector('select.group').value === 'block'")
        assert await page.evaluate("document.querySelector('#error').textContent") == ""
