"""What the main process and a worker do with each other's messages (runtime/workers.py,
runtime/worker.py), over a real socket pair but without processes; the processes themselves
are tested in tests/integration/test_workers.py."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from ztun.runtime import dial
from ztun.runtime.tracker import Tracker
from ztun.runtime.worker import Worker
from ztun.runtime.workers import WorkerPool
from ztun.stack.workers import WorkerPlan, decode, encode


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.settimeout(1)
    yield a, b
    a.close()
    b.close()


def pool(sock: socket.socket, tracker: Any = None) -> WorkerPool:
    p = WorkerPool(-1, sock, WorkerPlan(3, ("m",)), grace=5.0)
    p._tracker = tracker
    p._reaped = True  # no process behind it: nothing to wait for or kill
    return p


def test_network_decisions_are_passed_on_after_the_main_process_applied_them(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    seen: list[Any] = []
    follow = pool(a).follow(seen.append)
    dial.set_default_interface("eth7")
    try:
        follow(SimpleNamespace(rebind=True, reset=True))
        assert seen and decode(b.recv(65536)) == {"op": "network", "interface": "eth7",
                                                  "reset": True}  # fmt: skip
        follow(SimpleNamespace(rebind=False, reset=False))  # nothing changed: nothing sent
        with pytest.raises(TimeoutError):
            b.settimeout(0.05)
            b.recv(65536)
    finally:
        dial.set_default_interface(None)


def test_totals_from_a_worker_join_the_trackers(pair: tuple[socket.socket, socket.socket]) -> None:
    tracker = Tracker()
    p = pool(pair[0], tracker)
    p._handle({"op": "totals", "worker": 1, "up": 10, "down": 20, "flows": 2,
               "by_outbound": {"direct": [10, 20]}})  # fmt: skip
    p._handle({"op": "totals", "worker": 2, "up": -5, "down": "x", "flows": -1,
               "by_outbound": {"direct": [1, -1]}})  # fmt: skip
    assert (tracker.closed_up, tracker.closed_down, tracker.started) == (10, 20, 2)
    assert tracker.per_outbound() == {"direct": {"upload": 10, "download": 20, "connections": 0}}
    assert tracker.totals() == (10, 20)


def test_starts_and_deaths_are_followed(pair: tuple[socket.socket, socket.socket],
                                        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    p = pool(pair[0])
    p._handle({"op": "started", "worker": 1, "pid": 4242})
    assert p.pids == {1: 4242}
    with caplog.at_level("WARNING", logger="ztun.workers"):
        p._handle({"op": "exited", "worker": 1, "pid": 4242, "how": "was killed by SIGKILL",
                   "restart_in": 0.1})  # fmt: skip
    assert p.pids == {} and p.deaths == 1
    assert "worker 1 (pid 4242) was killed by SIGKILL" in caplog.text
    p._stopping = True
    p._handle({"op": "exited", "worker": 2, "pid": 4243, "how": "exited with code 0"})
    assert p.deaths == 1  # a stop is not a death


def test_a_stop_is_sent_once(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    p = pool(a)
    p.stop()
    p.stop()
    assert decode(b.recv(65536)) == {"op": "stop", "grace": 5.0}
    b.settimeout(0.05)
    with pytest.raises(TimeoutError):
        b.recv(65536)


class _Outbound:
    def __init__(self) -> None:
        self.resets: list[str] = []

    def reset_network(self, why: str) -> int:
        self.resets.append(why)
        return 1


def worker(sock: socket.socket, tracker: Any = None) -> tuple[Worker, _Outbound, Any]:
    outbound = _Outbound()
    router = SimpleNamespace(mode=SimpleNamespace(current="Rule"))
    router.mode.set = lambda m: setattr(router.mode, "current", m)
    box = SimpleNamespace(dispatcher=SimpleNamespace(outbounds={"direct": outbound},
                                                     router=router), tracker=tracker)  # fmt: skip
    w = Worker(sock, 1, SimpleNamespace(grace=5.0), {"detected": True})
    w.box = box
    return w, outbound, router


def test_a_worker_follows_the_network_and_the_mode(pair: tuple[socket.socket, socket.socket],
                                                   ) -> None:  # fmt: skip
    w, outbound, router = worker(pair[0])
    try:
        w._handle({"op": "network", "interface": "wlan0", "reset": True})
        assert dial.default_interface() == "wlan0" and outbound.resets == ["network changed"]
        w._handle({"op": "network", "interface": None, "reset": False})
        with pytest.raises(dial.NoEgressError):  # auto_detect_interface: no egress, fail fast
            dial.check_egress()
        w._handle({"op": "mode", "mode": "Global"})
        assert router.mode.current == "Global"
    finally:
        dial.set_default_interface(None)


def test_a_worker_sends_what_ended_since_the_last_report(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    tracker = Tracker()
    w, _, _ = worker(a, tracker)
    tracker.closed_up, tracker.closed_down, tracker.started = 100, 200, 3
    tracker.by_outbound["direct"] = [100, 200]
    w._totals()
    assert decode(b.recv(65536)) == {"op": "totals", "up": 100, "down": 200, "flows": 3,
                                     "by_outbound": {"direct": [100, 200]}}  # fmt: skip
    w._totals()  # nothing new: nothing sent
    tracker.closed_up, tracker.started = 150, 4
    tracker.by_outbound["direct"][0] = 150
    w._totals()
    assert decode(b.recv(65536)) == {"op": "totals", "up": 50, "down": 0, "flows": 1,
                                     "by_outbound": {"direct": [50, 0]}}  # fmt: skip
    b.settimeout(0.05)
    with pytest.raises(TimeoutError):
        b.recv(65536)


def test_garbage_from_the_other_side_is_ignored(pair: tuple[socket.socket, socket.socket],
                                                ) -> None:  # fmt: skip
    a, b = pair
    p = pool(a, Tracker())
    for data in (b"\xff", b"[]", encode({"op": "nonsense"}), encode({"op": "started"}),
                 encode({"op": "totals", "by_outbound": "x"})):  # fmt: skip
        b.send(data)
    p._on_message()
    assert p.pids == {} and p._tracker.totals() == (0, 0)
