"""Issue 14: `ztun run` starts the network monitor when the config asks for it, once the
inbounds run, and stops it first; a monitor that cannot start stops the inbounds again (the
TUN puts its routes back) and ztun exits with its one-line reason."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from ztun.box import Box
from ztun.config.options import build_options
from ztun.platform.linux import monitor as monitor_module
from ztun.platform.linux.monitor import MonitorError
from ztun.runtime import dial
from ztun.runtime.network import NetworkFollower

EVENTS: list[str] = []


class FakeMonitor:
    fail: BaseException | None = None

    def __init__(self, on_decision: Any, *, ignore: Any = ()) -> None:
        self.on_decision = on_decision
        self.ignore = list(ignore)

    async def start(self) -> None:
        EVENTS.append("monitor start")
        if self.fail is not None:
            raise self.fail

    def stop(self) -> None:
        EVENTS.append("monitor stop")


class Inbound:
    tag = "in"

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        EVENTS.append("inbound start")

    async def stop(self) -> None:
        EVENTS.append("inbound stop")

    def abort(self) -> None:
        EVENTS.append("inbound abort")


@pytest.fixture(autouse=True)
def fake_monitor(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    EVENTS.clear()
    FakeMonitor.fail = None
    monkeypatch.setattr(monitor_module, "NetworkMonitor", FakeMonitor)
    yield
    dial.set_default_interface(None)


class _Router:
    rules: tuple[Any, ...] = ()


def make_box(route: dict[str, Any]) -> Box:
    options = build_options({
        "inbounds": [{"type": "mixed", "tag": "m", "listen": "127.0.0.1", "listen_port": 0}],
        "outbounds": [{"type": "direct", "tag": "direct"}],
        "route": route,
    })  # fmt: skip
    b = Box(options, _Router(), grace=0.1)  # type: ignore[arg-type]
    b.inbounds = [Inbound()]  # type: ignore[list-item]
    return b


def test_monitor_runs_after_the_inbounds_start_and_stops_first() -> None:
    b = make_box({"auto_detect_interface": True})
    assert isinstance(b.monitor, FakeMonitor)
    assert isinstance(b.monitor.on_decision, NetworkFollower)
    assert b.monitor.on_decision.auto_detect

    async def main() -> int:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGTERM)
        return await b.serve()

    assert asyncio.run(main()) == 0
    assert EVENTS[:4] == ["inbound start", "monitor start", "monitor stop", "inbound stop"]


def test_a_monitor_that_cannot_start_stops_the_inbounds_again() -> None:
    FakeMonitor.fail = MonitorError("network monitor: cannot read the network state: EPERM")
    b = make_box({"auto_detect_interface": True})
    with pytest.raises(MonitorError, match="cannot read the network state"):
        asyncio.run(b.serve())
    assert EVENTS[:3] == ["inbound start", "monitor start", "inbound stop"]


def test_no_monitor_without_auto_detect_or_auto_route() -> None:
    assert make_box({}).monitor is None
    assert dial.default_interface() is None
    b = make_box({"default_interface": "eth7"})
    assert b.monitor is None and dial.default_interface() == "eth7"
    dial.check_egress()  # a fixed interface is never "no egress"
    # auto_detect_interface wins over default_interface
    b = make_box({"default_interface": "eth7", "auto_detect_interface": True})
    assert b.monitor is not None and dial.default_interface() is None
