"""The socks outbound's TCP CONNECT against scripted in-process proxies (loopback only).

Covers the pipelined SOCKS5 CONNECT (what goes out in which write, exact reads that leave the
relayed stream untouched) and every failure mapping: auth refused, proxy down, proxy silent,
the proxy's own reply codes, a proxy closing mid-handshake; and SOCKS4 through python-socks.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable

import pytest

from ztun.address import Address
from ztun.config.options import SocksOutboundOptions, build
from ztun.outbound.base import ErrorKind, OutboundError
from ztun.outbound.socks import SocksOutbound
from ztun.proto import socks5
from ztun.proto.socks5 import Reply

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[bytes]], Awaitable[None]]
DEST = Address("example.test", 443)
REQUEST = bytes((5, 1, 0)) + socks5.build_address(DEST)


def _socks(port: int, **config: object) -> SocksOutbound:
    """A socks outbound to 127.0.0.1:port, its options built as the config layer does."""
    data = {"tag": "p", "server": "127.0.0.1", "server_port": port, **config}
    return SocksOutbound(build(SocksOutboundOptions, data))


async def _with_proxy(script: Script, call: Callable[[int], Awaitable[object]]) -> list[bytes]:
    """Run `call(port)` against a one-connection proxy that follows `script`.

    Returns each chunk the proxy read, in order, so tests can check what came in one write.
    """
    chunks: list[bytes] = []
    done = asyncio.Event()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await script(r, w, chunks)
        finally:
            done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await call(port)
        await asyncio.wait_for(done.wait(), 5)
    finally:
        server.close()
    return chunks


async def _read(r: asyncio.StreamReader, chunks: list[bytes], n: int) -> bytes:
    """Read one chunk (whatever one write of the client delivered, up to n bytes)."""
    data = await asyncio.wait_for(r.read(n), 5)
    chunks.append(data)
    return data


def _run(coro: Awaitable[object]) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bound",
    [Address("127.0.0.1", 1080), Address("2001:db8::1", 1080), Address("b.test", 9)],
    ids=["ipv4", "ipv6", "domain"],
)
@pytest.mark.parametrize("bytewise", [False, True], ids=["one-write", "byte-at-a-time"])
def test_no_auth_is_pipelined_and_reads_exactly(bound: Address, bytewise: bool) -> None:
    answer = b"\x05\x00" + socks5.build_reply(Reply.SUCCEEDED, bound)
    banner = b"SSH-2.0-server-speaks-first\r\n"

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, ch: list[bytes]) -> None:
        # Greeting (offering only "no auth") and request must arrive before we answer anything.
        got = b""
        while len(got) < 3 + len(REQUEST):
            got += await _read(r, ch, 4096)
        assert got == b"\x05\x01\x00" + REQUEST
        if bytewise:
            for i in range(len(answer)):
                w.write(answer[i : i + 1])
                await w.drain()
                await asyncio.sleep(0.001)
            w.write(banner)
        else:
            w.write(answer + banner)  # the reply and the target's first bytes in one segment
        await w.drain()
        await _read(r, ch, 100)  # until the client closes

    got: list[bytes] = []

    async def call(port: int) -> None:
        ob = _socks(port, pipeline=True)
        sock = await ob.connect_tcp(DEST, None)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        data = b""
        with contextlib.suppress(TimeoutError):
            while len(data) < len(banner):
                data += await asyncio.wait_for(loop.sock_recv(sock, 4096), 2)
        got.append(data)
        sock.close()

    _run(_with_proxy(script, call))
    assert got == [banner]  # nothing of the stream was swallowed by the handshake


def test_auth_sends_credentials_and_request_together() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, ch: list[bytes]) -> None:
        assert await _read(r, ch, 4096) == b"\x05\x02\x00\x02"
        w.write(b"\x05\x02")
        await w.drain()
        got = b""
        want = b"\x01\x05alice\x06secret" + REQUEST
        while len(got) < len(want):
            got += await _read(r, ch, 4096)
        assert got == want
        w.write(b"\x01\x00" + socks5.build_reply(Reply.SUCCEEDED))
        await w.drain()
        await _read(r, ch, 100)

    async def call(port: int) -> None:
        ob = _socks(port, username="alice", password="secret", pipeline=True)
        (await ob.connect_tcp(DEST, None)).close()  # type: ignore[arg-type]

    _run(_with_proxy(script, call))


def test_by_default_the_request_waits_for_the_greetings_answer() -> None:
    """A server that reads the greeting with one read and drops the rest (microsocks) gets
    the request only after it answered: nothing follows the greeting until then."""

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, ch: list[bytes]) -> None:
        assert await _read(r, ch, 4096) == b"\x05\x01\x00"
        with contextlib.suppress(TimeoutError):  # nothing more before the answer
            early = await asyncio.wait_for(r.read(1), 0.2)
            raise AssertionError(f"request sent before the answer: {early!r}")
        w.write(b"\x05\x00")
        await w.drain()
        got = b""
        while len(got) < len(REQUEST):
            got += await _read(r, ch, 4096)
        assert got == REQUEST
        w.write(socks5.build_reply(Reply.SUCCEEDED))
        await w.drain()
        await _read(r, ch, 100)

    async def call(port: int) -> None:
        (await _socks(port).connect_tcp(DEST, None)).close()  # type: ignore[arg-type]

    _run(_with_proxy(script, call))


def _failure(script: Script, **kw: object) -> OutboundError:
    err: list[OutboundError] = []

    async def call(port: int) -> None:
        ob = _socks(port, **kw)
        with pytest.raises(OutboundError) as ei:
            await ob.connect_tcp(DEST, None)  # type: ignore[arg-type]
        assert ob.counters.errors == 1
        err.append(ei.value)

    _run(_with_proxy(script, call))
    return err[0]


def test_auth_refused() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, ch: list[bytes]) -> None:
        await _read(r, ch, 4096)
        w.write(b"\x05\x02")
        await w.drain()
        await _read(r, ch, 4096)
        w.write(b"\x01\x01")  # refused, then a close with the request unread (RST, like sing-box)
        await w.drain()
        w.transport.abort()

    e = _failure(script, username="alice", password="wrong")
    assert e.kind is ErrorKind.AUTH and "auth" in str(e).lower()
    assert (e.socks_reply, e.http_status) == (Reply.GENERAL_FAILURE, 502)


def test_no_acceptable_method_is_an_auth_failure() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, ch: list[bytes]) -> None:
        await _read(r, ch, 4096)
        w.write(b"\x05\xff")
        await w.drain()
        w.close()

    e = _failure(script)
    assert e.kind is ErrorKind.AUTH


@pytest.mark.parametrize(
    ("code", "kind", "socks_reply"),
    [
        (Reply.HOST_UNREACHABLE, ErrorKind.HOST_UNREACHABLE, Reply.HOST_UNREACHABLE),
        (Reply.CONNECTION_REFUSED, ErrorKind.REFUSED, Reply.CONNECTION_REFUSED),
        (Reply.NETWORK_UNREACHABLE, ErrorKind.NETWORK_UNREACHABLE, Reply.NETWORK_UNREACHABLE),
        (Reply.NOT_ALLOWED, ErrorKind.BLOCKED, Reply.NOT_ALLOWED),
        (Reply.GENERAL_FAILURE, ErrorKind.GENERAL, Reply.GENERAL_FAILURE),
        (0x42, ErrorKind.GENERAL, Reply.GENERAL_FAILURE),
    ],
)
@pytest.mark.parametrize("short", [False, True], ids=["full-reply", "two-bytes-then-close"])
def test_proxy_reply_codes_are_passed_on(
    code: int, kind: ErrorKind, socks_reply: int, short: bool
) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, ch: list[bytes]) -> None:
        await _read(r, ch, 4096)
        reply = socks5.build_reply(code)
        w.write(b"\x05\x00" + (reply[:2] if short else reply))
        await w.drain()
        w.close()

    e = _failure(script)
    assert e.kind is kind and e.socks_reply == socks_reply
    assert e.http_status == (403 if kind is ErrorKind.BLOCKED else 502)


def test_proxy_closes_mid_handshake() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, ch: list[bytes]) -> None:
        await _read(r, ch, 4096)
        w.write(b"\x05\x00\x05")
        await w.drain()
        w.close()

    e = _failure(script)
    assert e.kind is ErrorKind.GENERAL and e.http_status == 502


def test_proxy_silent_times_out() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, ch: list[bytes]) -> None:
        await _read(r, ch, 4096)
        await asyncio.sleep(0.5)  # never answers within connect_timeout
        w.close()

    e = _failure(script, connect_timeout=0.2)
    assert e.kind is ErrorKind.TIMEOUT and "0.2s" in str(e)
    assert (e.socks_reply, e.http_status) == (Reply.HOST_UNREACHABLE, 504)


def test_proxy_down() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused

        async def call() -> OutboundError:
            ob = _socks(port)
            with pytest.raises(OutboundError) as ei:
                await ob.connect_tcp(DEST, None)  # type: ignore[arg-type]
            assert ob.counters.errors == 1
            return ei.value

        e = asyncio.run(call())
    assert e.kind is ErrorKind.PROXY_DOWN and "cannot reach the proxy" in str(e)
    assert (e.socks_reply, e.http_status) == (Reply.GENERAL_FAILURE, 502)


def test_cancel_is_not_an_error() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, ch: list[bytes]) -> None:
        await _read(r, ch, 4096)
        await _read(r, ch, 100)  # until the client goes away

    async def call(port: int) -> None:
        ob = _socks(port)
        task = asyncio.ensure_future(ob.connect_tcp(DEST, None))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ob.counters.errors == 0

    _run(_with_proxy(script, call))


@pytest.mark.parametrize("granted", [True, False])
def test_socks4a_goes_through_python_socks(granted: bool) -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter, ch: list[bytes]) -> None:
        got = b""
        while not got.endswith(b"example.test\x00"):
            got += await _read(r, ch, 4096)
        assert got[:2] == b"\x04\x01" and got[4:8] == b"\x00\x00\x00\x01"
        w.write(socks5.build_socks4_reply(granted))
        await w.drain()
        await _read(r, ch, 100)

    async def call(port: int) -> None:
        ob = _socks(port, version="4a")
        if granted:
            (await ob.connect_tcp(DEST, None)).close()  # type: ignore[arg-type]
        else:
            with pytest.raises(OutboundError) as ei:
                await ob.connect_tcp(DEST, None)  # type: ignore[arg-type]
            assert ei.value.socks_reply == Reply.GENERAL_FAILURE

    _run(_with_proxy(script, call))
