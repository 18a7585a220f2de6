"""Echo peers for the TUN tests, run inside the server namespace: TCP and UDP echo on port 7
(IPv4 and IPv6). TCP echo answers each connection's bytes back until EOF.

UDP sockets are bound to each test address rather than the wildcard, so that a reply leaves
from the address the request went to (a wildcard socket answers from the primary address).
"""

from __future__ import annotations

import asyncio
import socket

UDP_ADDRESSES = ["127.0.0.1", "203.0.113.10", "203.0.113.20", "203.0.113.30",
                 "2001:db8:2::10", "2001:db8:2::20", "2001:db8:2::30"]  # fmt: skip


async def tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.t.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]


async def main() -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        servers.append(await asyncio.start_server(tcp_echo, host, 7, family=fam, backlog=4096,
                                                  reuse_address=True))  # fmt: skip
    for host in UDP_ADDRESSES:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.bind((host, 7))
        await loop.create_datagram_endpoint(UdpEcho, sock=s)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(main())
