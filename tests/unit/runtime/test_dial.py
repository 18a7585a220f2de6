"""ztun's own mark (runtime/dial.py): which mark a socket gets, and that every socket factory
applies it: direct TCP and UDP, socks5 CONNECT, SOCKS4a through python-socks, the UDP ASSOCIATE
control and relay sockets, rule-set downloads direct and through a socks detour.

The marks are read back from the real sockets with getsockopt (SO_MARK needs root: these tests
skip without it, and fail under CI). The namespace test (tests/integration/test_own_marks.py)
shows what the mark is for: no ztun packet enters the TUN.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support import need
from ztun.address import Address
from ztun.config.options import DirectOutboundOptions, SocksOutboundOptions, build
from ztun.outbound.direct import DirectOutbound
from ztun.outbound.socks import SocksOutbound
from ztun.provider.ruleset import load_rule_sets
from ztun.route.metadata import FlowMeta
from ztun.runtime import dial

MARK = 0x2024


def test_which_mark_a_socket_gets() -> None:
    assert dial.own_mark() == 0
    assert dial.DialOptions().mark() == 0  # no auto_route: nothing is marked
    dial.set_own_mark(MARK)
    try:
        assert dial.OWN.mark() == MARK
        assert dial.DialOptions(routing_mark=0x51).mark() == 0x51
        assert dial.DialOptions(bind_interface="eth0").mark() == 0
        assert dial.DialOptions(routing_mark=0x51, bind_interface="eth0").mark() == 0x51
    finally:
        dial.set_own_mark(0)


@pytest.fixture
def marks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, int]]]:
    """Turns the own mark on and records (socket type, mark read back) for each socket that
    goes through DialOptions.apply."""
    need("root" if os.geteuid() == 0 else None, "root (SO_MARK)")
    seen: list[tuple[int, int]] = []
    original = dial.DialOptions.apply

    def apply(self: dial.DialOptions, sock: socket.socket) -> None:
        original(self, sock)
        seen.append((sock.type & 0xF, sock.getsockopt(socket.SOL_SOCKET, dial.SO_MARK)))

    monkeypatch.setattr(dial.DialOptions, "apply", apply)
    dial.set_own_mark(MARK)
    try:
        yield seen
    finally:
        dial.set_own_mark(0)


def _meta() -> FlowMeta:
    return FlowMeta(network="tcp")


def test_direct_tcp_and_udp_are_marked(marks: list[tuple[int, int]]) -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ob = DirectOutbound(build(DirectOutboundOptions, {"tag": "d"}))
        s = await ob.connect_tcp(Address("127.0.0.1", port), _meta())
        assert s.getsockopt(socket.SOL_SOCKET, dial.SO_MARK) == MARK
        s.close()
        session = await ob.open_udp(_meta(), lambda a, p: None, lambda why: None)
        session.send(Address("127.0.0.1", 9), b"x")
        session.close()
        server.close()

    asyncio.run(main())
    assert marks == [(socket.SOCK_STREAM, MARK), (socket.SOCK_DGRAM, MARK)]


def test_own_routing_mark_wins(marks: list[tuple[int, int]]) -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ob = DirectOutbound(build(DirectOutboundOptions, {"tag": "d", "routing_mark": 0x51}))
        (await ob.connect_tcp(Address("127.0.0.1", port), _meta())).close()
        server.close()

    asyncio.run(main())
    assert marks == [(socket.SOCK_STREAM, 0x51)]


async def _socks5_server(relay_host: str) -> tuple[asyncio.Server, socket.socket]:
    """A one-purpose SOCKS5 server on 127.0.0.1: CONNECT answers success; UDP ASSOCIATE
    answers with a relay on `relay_host`, another address than the server's."""
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay.bind((relay_host, 0))

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await r.readexactly(3)  # greeting: no authentication
            w.write(b"\x05\x00")
            head = await r.readexactly(4)
            atyp = head[3]
            if atyp == 1:
                await r.readexactly(6)
            elif atyp == 3:
                await r.readexactly((await r.readexactly(1))[0] + 2)
            if head[1] == 3:
                host, port = relay.getsockname()
                w.write(b"\x05\x00\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
            else:
                w.write(b"\x05\x00\x00\x01" + bytes(4) + bytes(2))
            await w.drain()
            await r.read()
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), relay


def test_socks_connect_and_udp_relay_are_marked(marks: list[tuple[int, int]]) -> None:
    async def main() -> None:
        server, relay = await _socks5_server("127.0.0.2")
        port = server.sockets[0].getsockname()[1]
        options = {"tag": "s", "server": "127.0.0.1", "server_port": port}
        ob = SocksOutbound(build(SocksOutboundOptions, options))
        (await ob.connect_tcp(Address("example.test", 443), _meta())).close()
        session = await ob.open_udp(_meta(), lambda a, p: None, lambda why: None)
        assert session.relay == Address("127.0.0.2", relay.getsockname()[1])
        assert session.udp is not None and session.control is not None
        assert session.udp.getsockopt(socket.SOL_SOCKET, dial.SO_MARK) == MARK
        assert session.control.getsockopt(socket.SOL_SOCKET, dial.SO_MARK) == MARK
        session.close()
        server.close()
        relay.close()

    asyncio.run(main())
    assert marks == [(socket.SOCK_STREAM, MARK), (socket.SOCK_STREAM, MARK),
                     (socket.SOCK_DGRAM, MARK)]  # fmt: skip


def test_socks4a_through_python_socks_is_marked(marks: list[tuple[int, int]]) -> None:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await r.readexactly(8)
            await r.readuntil(b"\0")  # user id
            await r.readuntil(b"\0")  # 4a: the name
            w.write(b"\x00\x5a" + bytes(6))
            await w.drain()
            await r.read()
        w.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ob = SocksOutbound(build(SocksOutboundOptions, {"tag": "s", "server": "127.0.0.1",
                                 "server_port": port, "version": "4a"}))  # fmt: skip
        s = await ob.connect_tcp(Address("example.test", 80), _meta())
        assert s.getsockopt(socket.SOL_SOCKET, dial.SO_MARK) == MARK
        s.close()
        server.close()

    asyncio.run(main())
    assert marks == [(socket.SOCK_STREAM, MARK)]


class _RuleSet(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"version": 1, "rules": [{"domain": ["example.test"]}]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _pipe(a: socket.socket, b: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := a.recv(65536):
            b.sendall(data)
    with contextlib.suppress(OSError):
        b.shutdown(socket.SHUT_WR)


def _threaded_socks5() -> socket.socket:
    """A blocking SOCKS5 CONNECT server on loopback (one thread per connection)."""
    ls = socket.create_server(("127.0.0.1", 0))

    def serve(c: socket.socket) -> None:
        with c, contextlib.suppress(OSError):
            c.recv(3)
            c.sendall(b"\x05\x00")
            head = c.recv(4)
            assert head[3] == 1, head  # the test connects to an IP
            host = socket.inet_ntoa(c.recv(4))
            (port,) = struct.unpack("!H", c.recv(2))
            with socket.create_connection((host, port), 5) as up:
                c.sendall(b"\x05\x00\x00\x01" + bytes(6))
                t = threading.Thread(target=_pipe, args=(up, c), daemon=True)
                t.start()
                _pipe(c, up)
                t.join(5)

    def loop() -> None:
        with contextlib.suppress(OSError):
            while True:
                c, _ = ls.accept()
                threading.Thread(target=serve, args=(c,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return ls


@pytest.mark.parametrize("detour", [None, "proxy"])
def test_rule_set_downloads_are_marked(
    marks: list[tuple[int, int]], tmp_path: Path, detour: str | None
) -> None:
    http = ThreadingHTTPServer(("127.0.0.1", 0), _RuleSet)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    proxy = _threaded_socks5()
    url = f"http://127.0.0.1:{http.server_address[1]}/r.json"
    entry: dict[str, Any] = {"type": "remote", "tag": "r", "format": "source", "url": url}
    outbounds = [{"type": "socks", "tag": "proxy", "server": "127.0.0.1",
                  "server_port": proxy.getsockname()[1]}]  # fmt: skip
    if detour:
        entry["download_detour"] = detour
    try:
        result = load_rule_sets([entry], base_dir=tmp_path, cache_dir=tmp_path / "cache",
                                timeout=5.0, outbounds=outbounds)
    finally:
        http.shutdown()
        proxy.close()
    assert result.sets["r"] and result.diagnostics == []
    assert marks == [(socket.SOCK_STREAM, MARK)]


def test_mixed_inbound_listener_is_marked(marks: list[tuple[int, int]]) -> None:
    """Accepted sockets inherit the listener's mark: replies to a client beyond the default
    route leave by the main table, not into the TUN."""
    from ztun.config.options import MixedInboundOptions
    from ztun.inbound.mixed import MixedInbound

    async def main() -> None:
        options = build(MixedInboundOptions, {"tag": "m", "listen": "127.0.0.1", "listen_port": 0})
        ib = MixedInbound(options, None)  # type: ignore[arg-type]
        await ib.start()
        assert ib.sock is not None
        _, port = ib.sock.getsockname()
        client = socket.create_connection(("127.0.0.1", port), 5)
        await asyncio.sleep(0.05)
        client.close()
        await ib.stop()

    asyncio.run(main())
    assert marks[0] == (socket.SOCK_STREAM, MARK)
