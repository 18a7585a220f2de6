"""Issue 12, packets: the TUN read loop's guard. A packet whose handling raises is a counted
drop (`Drop.ERROR`), logged at most once a second with a count, never a traceback per packet.

The loop reads from a SOCK_SEQPACKET socket pair standing in for the TUN (one read, one
packet); time comes from a fake loop clock, so "a second" is exact and the test is quick."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest

from ztun.config.options import RouteOptions, TunInboundOptions, build
from ztun.inbound.tun import READ_BATCH, TunInbound
from ztun.packet.ip import Drop
from ztun.packet.virtio import HEADER_LEN
from ztun.runtime.udp import UdpSessionRunner
from ztun.stack.commands import WritePacket


class _Dispatcher:
    def __init__(self) -> None:
        self.outbounds: dict[str, object] = {}

    def route(self, flow: object, network: str) -> object:
        raise AssertionError("no flow is routed here")


class _Device:
    def __init__(self, fd: int, vnet_hdr: bool) -> None:
        self.fd, self.vnet_hdr, self.name, self.index = fd, vnet_hdr, "fake0", 0


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def inbound(fd: int, vnet: bool) -> tuple[TunInbound, _Clock]:
    options = build(TunInboundOptions, {"tag": "tun-in", "address": ["198.18.0.1/30"]})
    t = TunInbound(options, _Dispatcher(), RouteOptions())  # type: ignore[arg-type]
    t.device = _Device(fd, vnet)
    clock = _Clock()
    t._loop = clock  # type: ignore[assignment]
    # What start() builds: every command of a read batch goes through it.
    t._udp = UdpSessionRunner(t.stack.udp, clock, t.tasks, t._udp_reply,  # type: ignore[arg-type]
                              t._run_commands)  # fmt: skip
    return t, clock


def boom(*args: object) -> int:
    raise ValueError("forced for the test")


def error_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("vnet", [False, True])
def test_unexpected_errors_counted_and_logged_once_a_second(
    pair: tuple[socket.socket, socket.socket], vnet: bool, caplog: pytest.LogCaptureFixture
) -> None:
    app, tun_end = pair
    t, clock = inbound(tun_end.fileno(), vnet)
    if vnet:
        t.stack.receive_vnet = boom  # type: ignore[method-assign]
    else:
        t.stack.receive = boom  # type: ignore[method-assign]
    packet = (bytes(HEADER_LEN) if vnet else b"") + b"\x45" + bytes(39)
    caplog.set_level(logging.INFO, logger="ztun")
    per_wakeup, wakeups, step = 40, 100, 0.1  # 4000 bad packets over 10 seconds
    for _ in range(wakeups):
        for _ in range(per_wakeup):
            app.send(packet)
        (t._on_tun_vnet if vnet else t._on_tun)()
        clock.now += step
    assert t.stack.drops[Drop.ERROR] == per_wakeup * wakeups
    lines = error_lines(caplog)
    seconds = wakeups * step
    assert seconds <= len(lines) <= seconds + 1, [r.getMessage() for r in lines]
    assert all(r.exc_info is None for r in lines)  # no traceback in the lines that are shown
    assert "ValueError: forced for the test" in lines[0].getMessage()
    counted = [int(r.getMessage().split(": ")[1].split()[0]) for r in lines]
    assert counted[0] == 1 and sum(counted) <= per_wakeup * wakeups


def test_the_loop_goes_on_after_an_error(
    pair: tuple[socket.socket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """One bad packet in a batch costs that packet only: the good ones after it are handled,
    and a command that raised does not stop the next packets' commands."""
    app, tun_end = pair
    t, _ = inbound(tun_end.fileno(), False)
    real = t.stack.receive
    seen: list[int] = []

    def every_other(buf: bytearray, n: int, now: float) -> int:
        seen.append(n)
        if len(seen) % 2:
            raise KeyError("odd")
        t.stack.out.append(WritePacket(b"x"))
        return real(buf, n, now)

    written: list[bytes] = []
    t.stack.receive = every_other  # type: ignore[method-assign]
    t._write = written.append  # type: ignore[method-assign]
    for _ in range(10):
        app.send(b"\x45" + bytes(39))
    t._on_tun()
    assert len(seen) == 10
    assert t.stack.drops[Drop.ERROR] == 5
    assert written == [b"x"] * 5


def test_read_batch_bound_still_holds(pair: tuple[socket.socket, socket.socket]) -> None:
    app, tun_end = pair
    t, _ = inbound(tun_end.fileno(), False)
    t.stack.receive = boom  # type: ignore[method-assign]
    sent = 0
    while sent < READ_BATCH + 10:
        try:
            app.send(b"\x45" + bytes(39))
        except BlockingIOError:
            break
        sent += 1
    t._on_tun()
    assert t.stack.drops[Drop.ERROR] == min(sent, READ_BATCH)  # then other callbacks' turn
