"""Peers for the Clash API tests: a slow HTTP server that counts what it moves, and a small
synchronous front to aiohttp's client (HTTP, chunked streams, WebSockets)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Transfer:
    """One connection the slow server served: bytes it received and sent, whether it ended."""

    received: int = 0
    sent: int = 0
    done: bool = False


@dataclass
class SlowServer:
    """GET /<chunks>/<milliseconds>: a 200 with `chunks` chunks of 1000 bytes, one every
    `milliseconds`, then close. Every connection's byte counts are kept in `transfers`."""

    port: int
    transfers: list[Transfer] = field(default_factory=list)

    def url(self, chunks: int, ms: int) -> str:
        return f"http://127.0.0.1:{self.port}/{chunks}/{ms}"


@contextlib.contextmanager
def slow_server() -> Iterator[SlowServer]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(64)
    ls.settimeout(0.2)
    server = SlowServer(ls.getsockname()[1])
    stop = threading.Event()

    def serve(conn: socket.socket, t: Transfer) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    got = conn.recv(4096)
                    if not got:
                        return
                    data += got
                    t.received += len(got)
                path = data.split(b" ", 2)[1].decode()
                chunks, ms = (int(x) for x in path.strip("/").split("/"))
                head = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                head += f"Content-Length: {chunks * 1000}\r\nConnection: close\r\n\r\n".encode()
                conn.sendall(head)
                t.sent += len(head)
                for _ in range(chunks):
                    if stop.is_set():
                        return
                    conn.sendall(b"z" * 1000)
                    t.sent += 1000
                    time.sleep(ms / 1000)
                conn.shutdown(socket.SHUT_WR)
                while conn.recv(4096):
                    pass
            except (OSError, ValueError):
                pass
            finally:
                t.done = True

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = Transfer()
            server.transfers.append(t)
            threading.Thread(target=serve, args=(conn, t), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(2)
        ls.close()


class Api:
    """Synchronous calls to a Clash API through aiohttp's client (one session per call)."""

    def __init__(self, port: int, secret: str = "") -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.secret = secret

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.secret}"} if self.secret else {}
        headers.update(extra or {})
        return headers

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:  # fmt: skip
        async def go() -> tuple[int, Any]:
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.request(
                method, self.base + path, json=body, headers=self._headers(headers)
            ) as response:
                raw = await response.read()
                try:
                    return response.status, json.loads(raw) if raw else None
                except ValueError:
                    return response.status, raw.decode(errors="replace")

        return asyncio.run(go())

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        assert status == 200, (path, status, body)
        return body

    def chunked(self, path: str, count: int) -> list[Any]:
        """The first `count` lines of a chunked stream, each a JSON object."""

        async def go() -> list[Any]:
            timeout = aiohttp.ClientTimeout(total=15)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
                self.base + path, headers=self._headers()
            ) as response:
                assert response.status == 200
                assert response.headers.get("Transfer-Encoding") == "chunked"
                out = []
                while len(out) < count:
                    line = await response.content.readline()
                    assert line.endswith(b"\n")
                    out.append(json.loads(line))
                return out

        return asyncio.run(go())

    def websocket(self, path: str, count: int, query_token: bool = False) -> list[Any]:
        """The first `count` messages of a WebSocket stream, each a JSON object."""

        async def go() -> list[Any]:
            timeout = aiohttp.ClientTimeout(total=15)
            url = self.base.replace("http://", "ws://") + path
            headers = self._headers()
            if query_token:
                url += ("&" if "?" in url else "?") + f"token={self.secret}"
                headers = {}
            async with aiohttp.ClientSession(timeout=timeout) as session, session.ws_connect(
                url, headers=headers
            ) as ws:
                out = []
                while len(out) < count:
                    msg = await ws.receive(timeout=10)
                    assert msg.type == aiohttp.WSMsgType.TEXT, msg
                    out.append(json.loads(msg.data))
                return out

        return asyncio.run(go())
