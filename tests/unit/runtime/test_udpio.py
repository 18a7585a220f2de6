"""Issue 13, UDP: the socket half of batched UDP (ztun.runtime.udpio) on loopback sockets:
a burst leaves segmented and arrives whole and in order, and a kernel that refuses
segmentation gets the datagrams one by one."""

from __future__ import annotations

import errno
import hashlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from ztun.runtime import udpio


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    for s in (rx, tx):
        udpio.tune(s)
        s.setblocking(False)
    yield rx, tx
    rx.close()
    tx.close()


def burst(n: int, size: int = 1400) -> list[bytes]:
    """Datagrams that say which they are: a sequence number, then a hash of it."""
    out = []
    for i in range(n):
        head = i.to_bytes(4, "big") + hashlib.sha256(i.to_bytes(4, "big")).digest()
        out.append((head * (size // len(head) + 1))[:size])
    return out


def drain(rx: socket.socket) -> list[bytes]:
    got = []
    while True:
        try:
            got.append(rx.recv(65535))
        except BlockingIOError:
            return got


def test_buffers_are_asked_for(pair: tuple[socket.socket, socket.socket]) -> None:
    rx, _ = pair
    # Linux reports twice what was set; without root the rmem_max limit applies.
    assert rx.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 200_000


@pytest.mark.parametrize("connected", [True, False])
def test_a_burst_arrives_whole_and_in_order(
    pair: tuple[socket.socket, socket.socket], connected: bool
) -> None:
    rx, tx = pair
    addr = rx.getsockname()
    sender = udpio.BatchSender(tx)
    data = [*burst(300), b"short", b"", b"x" * 1400]
    if connected:
        tx.connect(addr)
        sender.send(data)
    else:
        sender.send(data, addr)
    assert drain(rx) == data
    assert sender.gso and sender.dropped == sender.errors == 0


class _RefusingSocket:
    """Refuses segmented sends as an old kernel or a too-small MTU does."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.segmented = 0

    def sendmsg(self, buffers: list[bytes], cmsg: Any, *args: Any) -> int:
        self.segmented += 1
        raise OSError(errno.EINVAL, "Invalid argument")

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)


def test_refused_segmentation_falls_back_one_by_one() -> None:
    s = _RefusingSocket()
    sender = udpio.BatchSender(s)  # type: ignore[arg-type]
    data = burst(100)
    sender.send(data)
    sender.send(data)
    assert s.sent == data + data
    assert s.segmented == 1 and not sender.gso  # asked once, then never again
    assert sender.errors == sender.dropped == 0


def test_a_full_buffer_is_counted_not_raised() -> None:
    class Full(_RefusingSocket):
        def sendmsg(self, buffers: list[bytes], cmsg: Any, *args: Any) -> int:
            raise BlockingIOError(errno.EAGAIN, "full")

        def send(self, data: bytes) -> int:
            raise BlockingIOError(errno.EAGAIN, "full")

    sender = udpio.BatchSender(Full())  # type: ignore[arg-type]
    sender.send([*burst(10), b"odd"])
    assert sender.dropped == 11 and sender.gso
