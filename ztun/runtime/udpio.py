"""The UDP socket calls of the outbound sessions: big buffers, and bursts in one system call.

Why (measured with `iperf3 -u -b 500M -l 1400` through the TUN to a sing-box SOCKS5 server in
a namespace on the 2-core machine, bench/README.md): nearly half of ztun's time went into one
`send` per datagram, and a socket's default 208 KiB holds about 92 such datagrams (2 ms at
500 Mbit/s, less than one pause of the loop) before the kernel drops what comes. A burst of
equal-sized datagrams to one destination now leaves as one `sendmsg` with `UDP_SEGMENT` (the
cuts are `ztun.packet.gso.runs`), and every session socket asks for `BUFFER` bytes each way.

Not used: `UDP_GRO` on the session sockets. A `recvmsg_into` with room for its control
message cost 3.5-4.5 µs per datagram against 1.2 µs for `recv` (loopback, 1400 bytes), and on
the measured path (veth; a proxy that sends one datagram at a time, as sing-box does) the
kernel coalesced nothing, even with GRO on the veth, so each receive still held one datagram.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from collections.abc import Sequence
from typing import Any

from ztun.packet.gso import runs

SOL_UDP = 17
UDP_SEGMENT = 103  # Linux 4.18; not in Python 3.11's socket module
#: Receive and send buffer of every UDP session socket: the kernel doubles it and counts a
#: 1400-byte datagram as about 2.3 KB, so about 3600 of them, 80 ms at 500 Mbit/s.
BUFFER = 4 << 20
_SEGMENT = struct.Struct("=H")
#: errors that say "not this way" to a segmented send (an old kernel, a datagram larger than
#: the path's MTU, a device without checksum offload): send the datagrams one by one instead
_NO_GSO = frozenset({errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP})


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

