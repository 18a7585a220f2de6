"""What ztun does on a network change (runtime/network.py) and what the outbounds offer for it:
the default interface on outgoing sockets (runtime/dial.py), failing at once without an
egress, SOCKS5 associations and direct UDP sessions ended by `reset_network`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from tests.support import need
from ztun.address import Address
from ztun.config.options import DirectOutboundOptions, SocksOutboundOptions, build
from ztun.outbound.base import ErrorKind, OutboundError
from ztun.outbound.direct import DirectOutbound
from ztun.outbound.socks import SocksOutbound
from ztun.proto.socks5 import Reply
from ztun.route.metadata import FlowMeta
from ztun.route.network import Decision, Egress
from ztun.runtime import dial
from ztun.runtime.network import RESET_REASON, NetworkFollower


@pytest.fixture(autouse=True)
def no_default_interface() -> Iterator[None]:
    dial.set_default_interface(None)
    yield
    dial.set_default_interface(None)


def _meta() -> FlowMeta:
    return FlowMeta(network="tcp")


# -- dial ------------------------------------------------------------------------------------


def test_which_interface_a_socket_gets() -> None:
    assert dial.OWN.interface() is None
    dial.set_default_interface("eth1")
    assert dial.OWN.interface() == "eth1"
    assert dial.DialOptions(routing_mark=0x51).interface() == "eth1"
    assert dial.DialOptions(bind_interface="wg0").interface() == "wg0"  # its own wins
    assert dial.LOCAL.interface() is None  # what ztun listens on is never bound
    # bound to the default interface, a socket still carries the own mark (rule 9000)
    dial.set_own_mark(0x2024)
    try:
        assert dial.OWN.mark() == 0x2024
    finally:
        dial.set_own_mark(0)


def test_no_egress_fails_outgoing_sockets_only() -> None:
    dial.set_default_interface(None, detected=True)
    with pytest.raises(dial.NoEgressError, match="no network"):
        dial.OWN.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(OSError, match="no network"):  # rule-set downloads see an OSError
        dial.OWN.create_connection(("127.0.0.1", 9), 1)
    with socket.socket() as s:
        dial.LOCAL.apply(s)  # a listener is not an egress
    dial.set_default_interface(None)  # not detected: None means "not bound"
    dial.check_egress()


def test_outgoing_sockets_are_bound_to_the_default_interface() -> None:
    need("root" if os.geteuid() == 0 else None, "root (SO_BINDTODEVICE)")
    dial.set_default_interface("lo", detected=True)
    with dial.OWN.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        bound = s.getsockopt(socket.SOL_SOCKET, dial.SO_BINDTODEVICE, 16)
        assert bound.rstrip(b"\0") == b"lo"
    with socket.socket() as s:
        dial.LOCAL.apply(s)
        assert s.getsockopt(socket.SOL_SOCKET, dial.SO_BINDTODEVICE, 16).rstrip(b"\0") == b""


# -- no egress: new flows fail at once ------------------------------------------------------


def test_direct_fails_at_once_without_egress() -> None:
    async def main() -> None:
        ob = DirectOutbound(build(DirectOutboundOptions, {"tag": "d"}))
        dial.set_default_interface(None, detected=True)
        t0 = time.monotonic()
        with pytest.raises(OutboundError) as tcp:
            await ob.connect_tcp(Address("203.0.113.10", 80), _meta())
        with pytest.raises(OutboundError) as udp:
            await ob.open_udp(_meta(), lambda a, p: None, lambda why: None)
        assert time.monotonic() - t0 < 0.5
        for e in (tcp.value, udp.value):
            assert e.kind is ErrorKind.NO_EGRESS and "no network" in str(e)
            assert e.socks_reply == Reply.NETWORK_UNREACHABLE and e.http_status == 503
        # its own bind_interface: not ztun's egress to find
        own = DirectOutbound(build(DirectOutboundOptions, {"tag": "o", "bind_interface": "lo"}))
        (await own.open_udp(_meta(), lambda a, p: None, lambda why: None)).close()

    asyncio.run(main())


async def _socks5_server() -> tuple[asyncio.Server, socket.socket, list[str]]:
    """A SOCKS5 server on 127.0.0.1 whose UDP ASSOCIATE answers with a relay; `events` says
    when a control connection ended."""
    relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay.bind(("127.0.0.1", 0))
    events: list[str] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await r.readexactly(3)
            w.write(b"\x05\x00")
            head = await r.readexactly(4)
            await r.readexactly(6 if head[3] == 1 else (await r.readexactly(1))[0] + 2)
            host, port = relay.getsockname()
            w.write(b"\x05\x00\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port))
            await w.drain()
            await r.read()  # until the client closes the control connection
            events.append("control closed")
        w.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0), relay, events


def test_socks_fails_at_once_without_egress() -> None:
    async def main() -> None:
        server, relay, _ = await _socks5_server()
        port = server.sockets[0].getsockname()[1]
        ob = SocksOutbound(build(SocksOutboundOptions, {"tag": "s", "server": "127.0.0.1",
                                                        "server_port": port}))  # fmt: skip
        dial.set_default_interface(None, detected=True)
        for attempt in (ob.connect_tcp(Address("example.test", 443), _meta()),
                        ob.open_udp(_meta(), lambda a, p: None, lambda why: None)):  # fmt: skip
            with pytest.raises(OutboundError) as e:
                await attempt
            assert e.value.kind is ErrorKind.NO_EGRESS
        server.close()
        relay.close()

    asyncio.run(main())


# -- reset_network -------------------------------------------------------------------------


def test_socks_reset_closes_every_association_and_its_control_connection() -> None:
    async def main() -> None:
        server, relay, events = await _socks5_server()
        port = server.sockets[0].getsockname()[1]
        ob = SocksOutbound(build(SocksOutboundOptions, {"tag": "s", "server": "127.0.0.1",
                                                        "server_port": port}))  # fmt: skip
        ended: list[str] = []
        sessions = [await ob.open_udp(_meta(), lambda a, p: None, ended.append)
                    for _ in range(3)]  # fmt: skip
        sessions[2].close()  # already closed: not counted, not told again
        assert ob.reset_network(RESET_REASON) == 2
        assert ended == [RESET_REASON, RESET_REASON]
        assert all(s.closed for s in sessions)
        for _ in range(100):
            if len(events) == 3:
                break
            await asyncio.sleep(0.01)
        assert events == ["control closed"] * 3  # the server saw each one end
        assert ob.reset_network(RESET_REASON) == 0
        # the next datagram's association is a new one
        again = await ob.open_udp(_meta(), lambda a, p: None, ended.append)
        assert not again.closed
        again.close()
        server.close()
        relay.close()

    asyncio.run(main())


def test_direct_reset_ends_its_udp_sessions() -> None:
    async def main() -> None:
        ob = DirectOutbound(build(DirectOutboundOptions, {"tag": "d"}))
        ended: list[str] = []
        a = await ob.open_udp(_meta(), lambda a, p: None, ended.append)
        b = await ob.open_udp(_meta(), lambda a, p: None, ended.append)
        b.close()
        assert ob.reset_network(RESET_REASON) == 1
        assert a.closed and ended == [RESET_REASON]
        assert ob.reset_network(RESET_REASON) == 0

    asyncio.run(main())


# -- the follower --------------------------------------------------------------------------


class FakeOutbound:
    tag = "fake"

    def __init__(self) -> None:
        self.resets: list[str] = []

    def reset_network(self, why: str) -> int:
        self.resets.append(why)
        return 2


class FakeInbound:
    tag = "tun-in"

    def __init__(self) -> None:
        self.resets: list[str] = []

    def reset_udp(self, why: str) -> int:
        self.resets.append(why)
        return 3


ETH0 = Egress(2, "eth0", 4, "198.51.100.2")
WLAN0 = Egress(3, "wlan0", 4, "198.51.100.66")


def test_follower_binds_resets_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    out, inb, plain = FakeOutbound(), FakeInbound(), object()
    follow = NetworkFollower({"fake": out, "block": plain}, [inb, plain], auto_detect=True)
    with caplog.at_level(logging.INFO, logger="ztun.monitor"):
        follow(Decision(None, ETH0, (), rebind=True, reset=False, initial=True))
        assert dial.default_interface() == "eth0" and not out.resets
        follow(Decision(ETH0, WLAN0, ("link eth0 down",), rebind=True, reset=True))
        assert dial.default_interface() == "wlan0"
        assert out.resets == [RESET_REASON] and inb.resets == [RESET_REASON]
        follow(Decision(WLAN0, None, ("default route removed",), rebind=True, reset=True))
        with pytest.raises(dial.NoEgressError):
            dial.check_egress()
        follow(Decision(None, None, ("link docker0 up",), rebind=False, reset=False))
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "network: egress eth0 via 198.51.100.2"
    assert lines[1].startswith("network: link eth0 down; egress eth0 via 198.51.100.2 → "
                               "wlan0 via 198.51.100.66; new connections bound to wlan0; "
                               "UDP: 2 outbound session(s) closed")  # fmt: skip
    assert "3 more flow(s) reset" in lines[1]
    assert caplog.records[2].levelno == logging.WARNING
    assert "→ none; new connections fail at once (no egress)" in lines[2]
    assert len(lines) == 3  # nothing done: debug only
    assert follow.changes == 2


def test_follower_without_auto_detect_only_resets() -> None:
    out = FakeOutbound()
    dial.set_default_interface("eth9")  # route.default_interface
    follow = NetworkFollower({"fake": out}, [], auto_detect=False)
    follow(Decision(ETH0, WLAN0, (), rebind=True, reset=True))
    assert dial.default_interface() == "eth9" and out.resets == [RESET_REASON]


def test_no_egress_at_start_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    follow = NetworkFollower({}, [], auto_detect=True)
    with caplog.at_level(logging.INFO, logger="ztun.monitor"):
        follow(Decision(None, None, (), rebind=True, reset=False, initial=True))
    assert caplog.records[0].levelno == logging.WARNING
    assert "no egress" in caplog.records[0].getMessage()
    with pytest.raises(dial.NoEgressError):
        dial.check_egress()
