"""Live reload in `Box` (issue 14): one at a time, refused configs change nothing, a restarted
inbound that cannot start is put back with its old options, a reload while stopping is
ignored. A mixed inbound on 127.0.0.1 is the only socket; the namespace tests
(tests/integration/test_reload*.py) move real traffic through reloads."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ztun.box import Box
from ztun.check import load_and_compile

CONFIG = """\
inbounds: [{{type: mixed, tag: m, listen: 127.0.0.1, listen_port: {port}}}]
outbounds: [{{type: direct, tag: direct}}, {{type: block, tag: block}}]
route: {{final: {final}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: each config's port, kept from one write to the next unless a test changes it
_PORTS: dict[Path, int] = {}


def write(path: Path, final: str = "direct", port: int | None = None) -> None:
    port = _PORTS.setdefault(path, free_port()) if port is None else port
    path.write_text(CONFIG.format(port=port, final=final))


async def running_box(path: Path) -> tuple[Box, asyncio.Task[int]]:
    compiled = load_and_compile(path, offline=True)
    box = Box(compiled.options, compiled.router, grace=0.1, dns_router=compiled.dns_router,
              config_path=path)  # fmt: skip
    task = asyncio.create_task(box.serve())
    for _ in range(200):
        if box._running:
            break
        await asyncio.sleep(0.01)
    assert box._running
    return box, task


def run(path: Path, body: Callable[[Box], Awaitable[None]]) -> None:
    async def main() -> None:
        box, task = await running_box(path)
        try:
            await body(box)
        finally:
            box._stop.set()
            assert await asyncio.wait_for(task, 10) == 0

    asyncio.run(main())


def final_of(box: Box) -> str:
    return str(box.dispatcher.router.final)


def test_a_good_config_switches_the_router_and_keeps_the_inbound(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write(path)

    async def body(box: Box) -> None:
        inbound = box.inbounds[0]
        write(path, "block")
        assert await box.reload() == []
        assert final_of(box) == "block" and box.inbounds[0] is inbound
        assert box.reloads == 1 and box.last_reload is not None
        assert box.last_reload["applied"] is True

    run(path, body)


def test_a_refused_config_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write(path)

    async def body(box: Box) -> None:
        router, outbounds = box.dispatcher.router, box.dispatcher.outbounds
        write(path, "nowhere")
        problems = await box.reload()
        assert len(problems) == 1 and "c.yaml:3:" in problems[0] and "nowhere" in problems[0]
        assert box.dispatcher.router is router and box.dispatcher.outbounds is outbounds

    run(path, body)


def test_sighup_reloads(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write(path)

    async def body(box: Box) -> None:
        write(path, "block")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(500):
            if box.reloads:
                break
            await asyncio.sleep(0.01)
        assert final_of(box) == "block"
        assert not box._stop.is_set()

    run(path, body)


def test_reloads_run_one_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write(path)
    spans: list[tuple[float, float]] = []

    async def body(box: Box) -> None:
        original = box._compile

        def slow() -> Any:
            begun = time.monotonic()
            time.sleep(0.2)
            found = original()
            spans.append((begun, time.monotonic()))
            return found

        box._compile = slow  # type: ignore[method-assign]
        results = await asyncio.gather(*(box.reload(str(i)) for i in range(3)))
        assert results == [[], [], []] and box.reloads == 3
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))

    run(path, body)


def test_an_inbound_that_cannot_start_is_put_back_with_its_old_options(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        port = free_port()
        write(path, port=port)

        async def body(box: Box) -> None:
            write(path, "block", port=busy)
            problems = await box.reload()
            assert len(problems) == 1 and "inbound 'm' could not start" in problems[0]
            # the rules switched; the inbound listens where it did
            assert final_of(box) == "block"
            assert [i.tag for i in box.inbounds] == ["m"]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            # what runs is on record: once the port is free, the same file restarts it
            assert box.options.inbounds[0].listen_port == port
            taken.close()
            assert await box.reload() == []
            _, writer = await asyncio.open_connection("127.0.0.1", busy)
            writer.close()

        run(path, body)


def test_a_reload_while_stopping_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    write(path)

    async def body(box: Box) -> None:
        box._stop.set()
        write(path, "block")
        assert await box.reload() == ["ztun is stopping"]
        assert final_of(box) == "direct"

    run(path, body)


GROUPS = """\
inbounds: [{{type: mixed, tag: m, listen: 127.0.0.1, listen_port: {port}}}]
outbounds:
  - {{type: selector, tag: pick, outbounds: [direct, block]}}
  - {{type: urltest, tag: auto, outbounds: [direct, block], url: "http://127.0.0.1:9/",
     interval: 10m}}
  - {{type: direct, tag: direct}}
  - {{type: block, tag: block}}
route: {{final: {final}}}
"""


def test_groups_across_a_reload(tmp_path: Path) -> None:
    """A selector keeps the member picked by hand; the old urltest stops probing and the new
    one probes (a reload must not leave one probe loop per reload behind)."""
    path = tmp_path / "c.yaml"
    port = free_port()
    path.write_text(GROUPS.format(port=port, final="pick"))

    async def body(box: Box) -> None:
        from ztun.outbound.selector import SelectorOutbound
        from ztun.outbound.urltest import URLTestOutbound

        pick = box.dispatcher.outbounds["pick"]
        old_auto = box.dispatcher.outbounds["auto"]
        assert isinstance(pick, SelectorOutbound) and isinstance(old_auto, URLTestOutbound)
        pick.select("block")
        path.write_text(GROUPS.format(port=port, final="auto"))
        assert await box.reload() == []
        new_pick = box.dispatcher.outbounds["pick"]
        new_auto = box.dispatcher.outbounds["auto"]
        assert isinstance(new_pick, SelectorOutbound) and new_pick is not pick
        assert new_pick.now == "block"
        assert isinstance(new_auto, URLTestOutbound) and new_auto is not old_auto
        assert old_auto._task is None or old_auto._task.done()
        assert new_auto._task is not None and not new_auto._task.done()

    run(path, body)
