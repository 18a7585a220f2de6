"""Issue 12, exits: every way out of `Box.serve` stops (or aborts) every inbound that started,
so that the TUN inbound puts the routes back. Inbounds are stand-ins that record what was asked
of them; the netns tests (tests/integration/test_tun_exits.py) prove the same with real routes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import pytest

from ztun import box as box_module
from ztun.box import Box
from ztun.config.options import build_options


class Recorder:
    def __init__(self, tag: str, fail: BaseException | None = None, on_start: Any = None) -> None:
        self.tag = tag
        self.tasks: set[asyncio.Task[None]] = set()
        self.fail = fail
        self.on_start = on_start
        self.events: list[str] = []

    async def start(self) -> None:
        self.events.append("start")
        if self.on_start is not None:
            await self.on_start()
        if self.fail is not None:
            raise self.fail

    async def stop(self) -> None:
        self.events.append("stop")

    def abort(self) -> None:
        self.events.append("abort")


class _Router:
    rules: tuple[Any, ...] = ()


def make_box(*inbounds: Recorder) -> Box:
    options = build_options({
        "inbounds": [{"type": "mixed", "tag": "m", "listen": "127.0.0.1", "listen_port": 0}],
        "outbounds": [{"type": "direct", "tag": "direct"}],
    })  # fmt: skip
    b = Box(options, _Router(), grace=0.1)  # type: ignore[arg-type]
    b.inbounds = list(inbounds)  # type: ignore[arg-type]
    return b


def test_startup_exception_stops_the_inbounds_that_started() -> None:
    """Any exception, not only a ZtunError: the first inbound (the TUN, with its routes) stops."""
    tun, bad = Recorder("tun"), Recorder("mixed", fail=OSError(98, "Address already in use"))
    with pytest.raises(OSError):
        asyncio.run(make_box(tun, bad).serve())
    assert tun.events == ["start", "stop"]
    assert bad.events == ["start"]  # a start that fails undoes itself


def test_exception_while_running_stops_every_inbound() -> None:
    a, b = Recorder("a"), Recorder("b")
    bx = make_box(a, b)

    class Broken:
        async def wait(self) -> None:
            raise RuntimeError("the loop's work failed")

    bx._stop = Broken()  # type: ignore[assignment]
    with pytest.raises(RuntimeError):
        asyncio.run(bx.serve())
    assert a.events == ["start", "stop"] and b.events == ["start", "stop"]


def test_exception_while_stopping_still_stops_the_others() -> None:
    class FailsToStop(Recorder):
        async def stop(self) -> None:
            await super().stop()
            raise ValueError("stop failed")

    a, b = FailsToStop("a"), Recorder("b")
    bx = make_box(a, b)
    bx._stop.set()
    with pytest.raises(ValueError):
        asyncio.run(bx.serve())
    assert "stop" in b.events


def test_cancelled_serve_stops_the_inbounds() -> None:
    """What Ctrl-C does when it reaches the task (asyncio.Runner cancels the main task)."""
    a = Recorder("a")

    async def main() -> None:
        task = asyncio.create_task(make_box(a).serve())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert a.events == ["start", "stop"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_each_stop_signal_stops_cleanly(sig: int) -> None:
    a = Recorder("a")

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, os.kill, os.getpid(), sig)
        return await make_box(a).serve()

    assert asyncio.run(main()) == 0
    assert a.events == ["start", "stop"]


def test_signal_during_startup_stops_right_after_it() -> None:
    """The handlers are there before the first inbound starts: a SIGTERM while auto_route is
    being set up is not the default action (death, routes left behind)."""

    async def signal_myself() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)

    a, b = Recorder("a", on_start=signal_myself), Recorder("b")
    assert asyncio.run(make_box(a, b).serve()) == 0
    assert a.events == ["start", "stop"] and b.events == ["start", "stop"]


def test_second_signal_aborts_every_inbound_then_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    class Exited(BaseException):
        pass

    def fake_exit(code: int) -> None:
        raise Exited(code)

    class AbortFails(Recorder):
        def abort(self) -> None:
            super().abort()
            raise OSError("netlink is gone")

    monkeypatch.setattr(box_module.os, "_exit", fake_exit)
    monkeypatch.setattr(logging, "shutdown", lambda: None)
    a, b = AbortFails("a"), Recorder("b")
    bx = make_box(a, b)
    bx._on_signal(signal.SIGTERM)
    assert a.events == b.events == []
    with pytest.raises(Exited) as e:
        bx._on_signal(signal.SIGTERM)
    assert e.value.args == (1,)
    assert a.events == ["abort"] and b.events == ["abort"]  # b's routes go although a failed
