"""The network monitor test's peers (tests/integration/test_network_monitor.py).

    whoami.py serve HOST...     in the server namespace: on port 9 of each HOST, TCP writes the
                                client's address and closes; UDP answers with it
    whoami.py tcp HOST          in the client namespace: one TCP exchange; prints the address
                                the server saw, or `error <name>`, then the seconds it took
    whoami.py udp HOST          one UDP socket for its whole life: for each line on stdin, one
                                datagram; prints the address the server saw, or `timeout`

The address the server sees tells which uplink a flow left by.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time


class _Udp(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(addr[0].encode(), addr)  # type: ignore[attr-defined]


async def _tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(str(writer.get_extra_info("peername")[0]).encode() + b"\n")
    await writer.drain()
    writer.close()


async def serve(hosts: list[str]) -> None:
    loop = asyncio.get_running_loop()
    for host in hosts:
        await asyncio.start_server(_tcp, host, 9, reuse_address=True)
        await loop.create_datagram_endpoint(_Udp, local_addr=(host, 9))
    print("ready", flush=True)
    await asyncio.Event().wait()


def tcp(host: str) -> None:
    t0 = time.monotonic()
    try:
        with socket.create_connection((host, 9), timeout=3) as s:
            s.settimeout(3)
            data = s.recv(100)
        out = data.decode().strip() or "error empty"
    except OSError as e:
        out = f"error {type(e).__name__}"
    print(out, f"{time.monotonic() - t0:.3f}")


def udp(host: str) -> None:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    print("ready", flush=True)
    for _ in sys.stdin:
        s.sendto(b"?", (host, 9))
        try:
            print(s.recv(100).decode(), flush=True)
        except OSError:
            print("timeout", flush=True)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "serve":
        asyncio.run(serve(args))
    elif mode == "tcp":
        tcp(args[0])
    else:
        udp(args[0])
