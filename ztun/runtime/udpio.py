"""The UDP socket calls of the outbound sessions: big buffers, and bursts in one system call.

Why (measured with `iperf3 -u -b 500M -l 1400` through the TUN to a sing-box SOCKS5 server in
a namespace on the 2-core machine, bench/README.md): nearly half of ztun's time went into one
`send` per datagram, and the default 208 KiB buffers overflowed at every burst. A burst of
equal-sized datagrams to one destination now leaves as one `sendmsg` with `UDP_SEGMENT` (the
cuts are `ztun.packet.gso.runs`), and every session socket asks for `BUFFER` bytes each way.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from collections.abc import Sequence
from typing import Any

from ztun.packet.gso import runs, split

SOL_UDP = 17
UDP_SEGMENT = 103  # Linux 4.18; not in Python 3.11's socket module
UDP_GRO = 104  # Linux 5.0
#: Receive and send buffer of every UDP session socket: about 1400 datagrams of 1400 bytes
#: (the kernel counts each datagram at about twice its size), 20 ms at 500 Mbit/s of slack.
BUFFER = 4 << 20
_SEGMENT = struct.Struct("=H")
_GRO = struct.Struct("=i")
#: errors that say "not this way" to a segmented send (an old kernel, a datagram larger than
#: the path's MTU, a device without checksum offload): send the datagrams one by one instead
_NO_GSO = frozenset({errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
_GRO_SPACE = socket.CMSG_SPACE(_GRO.size)


def tune(sock: socket.socket) -> None:
    """Ask for `BUFFER` bytes of receive and send buffer: past the `net.core.[rw]mem_max`
    limit as root (SO_*BUFFORCE), up to it otherwise. Never fails: the defaults still work."""
    for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF),
                         (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF)):  # fmt: skip
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, BUFFER)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, plain, BUFFER)


def enable_gro(sock: socket.socket) -> bool:
    """Let the kernel hand over several datagrams of one sender in one receive (`recv_gro`)."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


class BatchSender:
    """Sends bursts on one UDP socket, segmented while the kernel takes it. `dropped` counts
    datagrams a full buffer refused, `errors` those another error refused."""

    __slots__ = ("dropped", "errors", "gso", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.gso = True
        self.dropped = 0
        self.errors = 0

    def send(self, datagrams: Sequence[bytes], addr: Any = None) -> None:
        """Send `datagrams` in order to `addr` (None: the connected peer)."""
        if not self.gso or len(datagrams) < 2:
            self._one_by_one(datagrams, addr)
            return
        sock = self.sock
        for start, end, size in runs(datagrams):
            if size and self.gso:
                cmsg = [(SOL_UDP, UDP_SEGMENT, _SEGMENT.pack(size))]
                buf = b"".join(datagrams[start:end])
                try:
                    if addr is None:
                        sock.sendmsg([buf], cmsg)
                    else:
                        sock.sendmsg([buf], cmsg, 0, addr)
                    continue
                except (BlockingIOError, InterruptedError):
                    self.dropped += end - start
                    continue
                except OSError as e:
                    if e.errno not in _NO_GSO:
                        self.errors += end - start
                        continue
                    self.gso = False  # and these go one by one
            self._one_by_one(datagrams[start:end], addr)

    def _one_by_one(self, datagrams: Sequence[bytes], addr: Any) -> None:
        sock = self.sock
        for d in datagrams:
            try:
                if addr is None:
                    sock.send(d)
                else:
                    sock.sendto(d, addr)
            except (BlockingIOError, InterruptedError):
                self.dropped += 1
            except OSError:
                self.errors += 1


def recv_gro(sock: socket.socket, buf: bytearray) -> tuple[list[bytes], Any]:
    """One receive on a socket with `enable_gro`: the datagrams it returned, and the sender.
    Raises what `recvmsg_into` raises (BlockingIOError when nothing is waiting)."""
    n, anc, _flags, addr = sock.recvmsg_into([buf], _GRO_SPACE)
    size = 0
    for level, kind, data in anc:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= _GRO.size:
            size = _GRO.unpack_from(data)[0]
    return split(buf, n, size), addr
