"""DNS servers behind a socks detour, with sing-box as the SOCKS5 server: TCP and DoT queries
go through CONNECT, UDP queries through UDP ASSOCIATE, and the answers come back whole."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import dns.message
import pytest

from tests.unit.dns.dns_peers import dns_peer, dot_peer, make_cert
from ztun.config.options import (
    DNSOptions,
    DNSServerTLSOptions,
    SocksOutboundOptions,
    TCPDNSServerOptions,
    TLSDNSServerOptions,
    UDPDNSServerOptions,
)
from ztun.dns.client import DnsClient
from ztun.outbound.socks import SocksOutbound
from ztun.route.metadata import FlowMeta

from .peers import free_port, start_singbox

pytestmark = pytest.mark.singbox
RECORDS = {"a.test": [("A", 300, ["203.0.113.1"]), ("AAAA", 300, ["2001:db8::1"])]}


@pytest.fixture
def socks_port(tmp_path: Path) -> Iterator[int]:
    port = free_port()
    proc = start_singbox(tmp_path, port)
    try:
        yield port
    finally:
        proc.stop()


def ask(
    server: object, socks_port: int, names: list[tuple[str, str]]
) -> tuple[list[str], SocksOutbound]:
    proxy = SocksOutbound(
        SocksOutboundOptions(tag="proxy", server="127.0.0.1", server_port=socks_port)
    )

    async def main() -> list[str]:
        client = DnsClient(DNSOptions(servers=(server,)), None, {"proxy": proxy})  # type: ignore[arg-type]
        out = []
        try:
            for name, qtype in names:
                wire = await client.exchange(
                    dns.message.make_query(name, qtype).to_wire(), FlowMeta(network="udp")
                )
                assert wire is not None
                msg = dns.message.from_wire(wire)
                out += [r.to_text() for rr in msg.answer for r in rr] or [msg.rcode().name]
        finally:
            await client.close()
        return out

    return asyncio.run(main()), proxy


def test_tcp_dns_through_connect(socks_port: int) -> None:
    with dns_peer(RECORDS) as peer:
        server = TCPDNSServerOptions(
            tag="t", server="127.0.0.1", server_port=peer.port, detour="proxy"
        )
        answers, proxy = ask(server, socks_port, [("a.test", "A"), ("a.test", "AAAA")])
        assert answers == ["203.0.113.1", "2001:db8::1"]
        assert peer.count("tcp") == 2 and peer.tcp_connections == 1
        assert proxy.counters.tcp_flows == 1 and proxy.counters.errors == 0


def test_udp_dns_through_udp_associate(socks_port: int) -> None:
    with dns_peer(RECORDS) as peer:
        server = UDPDNSServerOptions(
            tag="u", server="127.0.0.1", server_port=peer.port, detour="proxy"
        )
        answers, proxy = ask(server, socks_port, [("a.test", "A"), ("nx.test", "A")])
        assert answers == ["203.0.113.1", "NXDOMAIN"]
        assert peer.count("udp") == 2 and peer.count("tcp") == 0
        assert proxy.counters.udp_sessions == 1 and proxy.counters.tcp_flows == 0


def test_dot_through_connect(socks_port: int, tmp_path: Path) -> None:
    cert = make_cert(tmp_path)
    with dot_peer(*cert, RECORDS) as peer:
        server = TLSDNSServerOptions(
            tag="dot", server="127.0.0.1", server_port=peer.port, detour="proxy",
            tls=DNSServerTLSOptions(insecure=True),
        )  # fmt: skip
        answers, proxy = ask(server, socks_port, [("a.test", "A")])
        assert answers == ["203.0.113.1"] and peer.count("tls") == 1
        assert proxy.counters.tcp_flows == 1
