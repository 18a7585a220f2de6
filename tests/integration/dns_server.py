"""Targets for the DNS and sniffing tests, run inside the server namespace.

    dns_server.py EVENTS CERT KEY UDP_ADDRESS...

Every connection and datagram is one JSON line in EVENTS ({"kind", "port", "peer", "local",
…}), so a test can tell which way a flow came: from the client's uplink (direct) or from the
SOCKS5 proxy's address (through the proxy).

TCP, every address of the namespace:
  7777  whoami: reads one line, answers "peer=IP local=IP\\n", closes
  80    HTTP/1.1: answers 200 with the whoami line as the body (the Host header is logged)
  443   TLS (CERT/KEY; the SNI is logged), then whoami
  22    server speaks first: "SSH-2.0-test\\r\\n" at accept, then echoes until EOF
UDP, on each UDP_ADDRESS (bound one by one, so replies leave from the asked address; port 7
is left to tun_server.py, which bench_dns.py runs alongside):
  443     every datagram logged (size, first byte) and echoed back with the prefix "echo:"
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import sys
import time

from tun_server import tcp_echo  # the sibling script: run from this folder

BANNER = b"SSH-2.0-test\r\n"


class Events:
    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def __call__(self, **fields: object) -> None:
        fields["t"] = round(time.time(), 6)
        self.f.write(json.dumps(fields) + "\n")


def _ends(writer: asyncio.StreamWriter) -> tuple[str, str]:
    peer = writer.get_extra_info("peername")[0]
    local = writer.get_extra_info("sockname")[0]
    return peer, local


async def main(events_path: str, cert: str, key: str, udp_addresses: list[str]) -> None:
    ev = Events(events_path)
    loop = asyncio.get_running_loop()

    async def whoami(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, local = _ends(writer)
        ssl_obj = writer.get_extra_info("ssl_object")
        sni = getattr(ssl_obj, "sni", None) if ssl_obj is not None else None
        port = writer.get_extra_info("sockname")[1]
        ev(kind="tls" if ssl_obj is not None else "tcp", port=port, peer=peer, local=local,
           sni=sni)  # fmt: skip
        try:
            await asyncio.wait_for(reader.readline(), 10)
            writer.write(f"peer={peer} local={local}\n".encode())
            await writer.drain()
        except (OSError, TimeoutError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, local = _ends(writer)
        host = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            for line in head.decode("latin-1").split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "host":
                    host = value.strip()
            ev(kind="http", port=80, peer=peer, local=local, host=host)
            body = f"peer={peer} local={local}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            ev(kind="http", port=80, peer=peer, local=local, host=host, error=True)
        finally:
            writer.close()

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, local = _ends(writer)
        ev(kind="banner", port=22, peer=peer, local=local)
        try:
            writer.write(BANNER)
            await writer.drain()
        except OSError:
            writer.close()
            return
        await tcp_echo(reader, writer)  # then an echo, as the TUN tests' target

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)

    def remember_sni(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.sni = name  # type: ignore[attr-defined]

    tls.sni_callback = remember_sni  # type: ignore[assignment]

    servers = [
        await asyncio.start_server(whoami, "0.0.0.0", 7777, reuse_address=True, backlog=1024),
        await asyncio.start_server(http, "0.0.0.0", 80, reuse_address=True, backlog=1024),
        await asyncio.start_server(
            whoami, "0.0.0.0", 443, ssl=tls, reuse_address=True, backlog=1024
        ),
        await asyncio.start_server(banner, "0.0.0.0", 22, reuse_address=True, backlog=4096),
    ]

    class Udp(asyncio.DatagramProtocol):
        def __init__(self, local: str, port: int) -> None:
            self.local, self.port = local, port

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            ev(kind="udp", port=self.port, peer=addr[0], local=self.local, size=len(data),
               first=data[0] if data else None)  # fmt: skip
            self.t.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]

    for host in udp_addresses:
        for port in (443,):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                              socket.SOCK_DGRAM)  # fmt: skip
            s.bind((host, port))
            await loop.create_datagram_endpoint(lambda h=host, p=port: Udp(h, p), sock=s)
    ev(kind="ready", servers=len(servers))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
