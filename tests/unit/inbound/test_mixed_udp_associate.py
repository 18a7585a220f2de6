"""A SOCKS5 UDP ASSOCIATE of the mixed inbound ends with its control connection, with real
sockets on loopback: the client closes it, or the association stays idle (no datagram either
way for the UDP idle timeout) and ztun closes it. Either way the relay socket is closed within
a bound (a datagram to it is then refused by the kernel)."""

from __future__ import annotations

import asyncio
import socket
import time

from mixed_to_block import mixed_to_block

from ztun.address import Address
from ztun.inbound import mixed
from ztun.inbound.mixed import MixedInbound
from ztun.proto import socks5
from ztun.proto.socks5 import Reply


def _inbound(udp_idle_timeout: float) -> MixedInbound:
    return mixed_to_block(udp_idle_timeout=udp_idle_timeout)


async def _associate(port: int) -> tuple[socket.socket, socket.socket]:
    """A control connection with its association, and a UDP socket connected to the relay."""
    loop = asyncio.get_running_loop()
    ctl = socket.socket()
    ctl.setblocking(False)
    await loop.sock_connect(ctl, ("127.0.0.1", port))
    await loop.sock_sendall(ctl, b"\x05\x01\x00")
    assert await asyncio.wait_for(loop.sock_recv(ctl, 2), 5) == b"\x05\x00"
    req = bytes((5, 3, 0)) + socks5.build_address(Address("0.0.0.0", 0))
    await loop.sock_sendall(ctl, req)
    reply = await asyncio.wait_for(loop.sock_recv(ctl, 64), 5)
    assert reply[1] == Reply.SUCCEEDED, reply
    relay_port = int.from_bytes(reply[-2:], "big")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setblocking(False)
    udp.connect(("127.0.0.1", relay_port))
    return ctl, udp


def _relay_open(udp: socket.socket) -> bool:
    """Whether the relay still has a socket: a datagram to a closed port comes back as an ICMP
    port unreachable, which the next call on the connected socket reports."""
    try:
        udp.recv(100)
    except ConnectionRefusedError:
        return False
    except BlockingIOError:
        pass
    try:
        udp.send(socks5.build_udp_datagram(Address("203.0.113.5", 9), b"x"))
    except ConnectionRefusedError:
        return False
    return True


async def _closed_within(udp: socket.socket, bound: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound:
        if not _relay_open(udp):
            return time.monotonic() - t0
        await asyncio.sleep(0.02)
    raise AssertionError(f"the relay socket is still open after {bound}s")


def test_closing_the_control_connection_closes_the_relay() -> None:
    async def main() -> None:
        ib = _inbound(udp_idle_timeout=60.0)
        await ib.start()
        try:
            ctl, udp = await _associate(ib.listen_port)
            await asyncio.sleep(0.1)
            assert _relay_open(udp)
            ctl.close()
            took = await _closed_within(udp, 5.0)
            assert took < 1.0, took  # generous: about 50 ms here
            udp.close()
        finally:
            await ib.stop()

    asyncio.run(main())


def test_idle_association_is_ended_by_ztun() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ib = _inbound(udp_idle_timeout=0.3)
        await ib.start()
        try:
            # Busy: datagrams every 0.1 s keep it for well past the idle timeout.
            ctl, udp = await _associate(ib.listen_port)
            for _ in range(12):
                assert _relay_open(udp)
                await asyncio.sleep(0.1)
            # Then silent: ztun closes the control connection, and the relay with it.
            t0 = time.monotonic()
            assert await asyncio.wait_for(loop.sock_recv(ctl, 100), 5) == b""
            took = time.monotonic() - t0
            assert 0.2 < took < 3.0, took  # the idle timeout (0.3 s) plus a sweep or so
            await _closed_within(udp, 2.0)
            ctl.close()
            udp.close()
        finally:
            await ib.stop()

    asyncio.run(main())


def test_control_connection_has_keepalive() -> None:
    """A client that vanishes without a FIN is found by TCP keepalive in about a minute."""

    async def main() -> None:
        ib = _inbound(udp_idle_timeout=60.0)
        seen: list[socket.socket] = []
        real = mixed._keepalive

        def spy(conn: socket.socket) -> None:
            real(conn)
            seen.append(conn)

        mixed._keepalive = spy  # type: ignore[assignment]
        await ib.start()
        try:
            ctl, udp = await _associate(ib.listen_port)
            await asyncio.sleep(0.05)
            conn = seen[0]
            assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            idle = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            intvl = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
            cnt = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            assert idle + intvl * cnt <= 60
            ctl.close()
            udp.close()
        finally:
            mixed._keepalive = real  # type: ignore[assignment]
            await ib.stop()

    asyncio.run(main())
