"""DNS transports against loopback servers: UDP (resend, TC → TCP), TCP (framing, reuse,
pipelining), DoT and DoH on a self-signed certificate, and the in-process servers."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import ssl
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import pytest

from tests.unit.dns.dns_peers import DnsPeer, dns_peer, doh_peer, dot_peer, make_cert
from ztun.config.options import (
    DirectOutboundOptions,
    DNSServerTLSOptions,
    FakeIPDNSServerOptions,
    HostsDNSServerOptions,
    HTTPSDNSServerOptions,
    LocalDNSServerOptions,
    TCPDNSServerOptions,
    TLSDNSServerOptions,
    UDPDNSServerOptions,
)
from ztun.dns import transport as tr
from ztun.dns.fakeip import FakeIPPool
from ztun.outbound.direct import DirectOutbound

RECORDS = {
    "a.test": [("A", 300, ["203.0.113.1"]), ("AAAA", 300, ["2001:db8::1"])],
    "big.test": [("A", 60, [f"203.0.113.{i}" for i in range(1, 60)])],
}


def direct() -> DirectOutbound:
    return DirectOutbound(DirectOutboundOptions(tag="direct"))


def query(name: str, qtype: str = "A", qid: int = 4242) -> bytes:
    q = dns.message.make_query(name, qtype)
    q.id = qid
    return q.to_wire()


def parse(wire: bytes) -> dns.message.Message:
    return dns.message.from_wire(wire)


def addrs(wire: bytes) -> list[str]:
    return sorted(r.to_text() for rr in parse(wire).answer for r in rr)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("cert"))


# -- UDP -------------------------------------------------------------------------------------


def test_udp_exchange_keeps_the_query_id_and_reuses_its_session() -> None:
    async def main(peer: DnsPeer) -> None:
        t = tr.UdpTransport(
            UDPDNSServerOptions(tag="u", server="127.0.0.1", server_port=peer.port), direct()
        )
        try:
            one = await t.exchange(query("a.test", qid=7), 2)
            two = await t.exchange(query("a.test", "AAAA", qid=8), 2)
        finally:
            await t.close()
        assert parse(one).id == 7 and addrs(one) == ["203.0.113.1"]
        assert parse(two).id == 8 and addrs(two) == ["2001:db8::1"]
        assert t.dialer.outbound.counters.udp_sessions == 1

    with dns_peer(RECORDS) as peer:
        asyncio.run(main(peer))


def test_udp_sends_once_more_when_the_first_datagram_is_lost() -> None:
    async def main(peer: DnsPeer) -> None:
        t = tr.UdpTransport(
            UDPDNSServerOptions(tag="u", server="127.0.0.1", server_port=peer.port), direct()
        )
        try:
            start = time.monotonic()
            out = await t.exchange(query("a.test"), 1.0)
            took = time.monotonic() - start
        finally:
            await t.close()
        assert addrs(out) == ["203.0.113.1"]
        assert peer.count("udp") == 2 and 0.4 < took < 0.9

    with dns_peer(RECORDS) as peer:
        peer.drop_udp = 1
        asyncio.run(main(peer))


def test_udp_truncated_answer_is_asked_again_over_tcp() -> None:
    async def main(peer: DnsPeer) -> None:
        t = tr.UdpTransport(
            UDPDNSServerOptions(tag="u", server="127.0.0.1", server_port=peer.port), direct()
        )
        try:
            out = await t.exchange(query("big.test"), 2)
        finally:
            await t.close()
        assert len(addrs(out)) == 59 and not parse(out).flags & dns.flags.TC
        assert (peer.count("udp"), peer.count("tcp")) == (1, 1)

    with dns_peer(RECORDS) as peer:
        peer.truncate_udp = True
        asyncio.run(main(peer))


def test_udp_silence_is_a_timeout_error_within_the_bound() -> None:
    async def main(peer: DnsPeer) -> None:
        t = tr.UdpTransport(
            UDPDNSServerOptions(tag="u", server="127.0.0.1", server_port=peer.port), direct()
        )
        start = time.monotonic()
        with pytest.raises(tr.DnsTimeoutError) as e:
            await t.exchange(query("a.test"), 0.5)
        took = time.monotonic() - start
        await t.close()
        assert 0.45 < took < 0.8 and "0.5s" in e.value.reason

    with dns_peer(RECORDS) as peer:
        peer.silent = True
        asyncio.run(main(peer))


# -- TCP -------------------------------------------------------------------------------------


def test_udp_queries_in_flight_leave_every_table_and_timer_when_answered_or_expired() -> None:
    """The transport's bookkeeping is bounded by what is in flight: answered queries leave
    both timer tables at once (no item lingers until its time), a silent one is sent twice
    (once more halfway) and then expires, and with nothing in flight no timer is armed."""

    async def main(peer: DnsPeer) -> None:
        t = tr.UdpTransport(
            UDPDNSServerOptions(tag="u", server="127.0.0.1", server_port=peer.port), direct()
        )
        try:
            outs = await asyncio.gather(*(t.exchange(query("a.test"), 2.0) for _ in range(200)))
            assert len(outs) == 200 and all(parse(o).rcode() == dns.rcode.NOERROR for o in outs)
            assert not t._pending and not t._to_resend and not t._to_expire
            await asyncio.sleep(0)  # the timer, if any, sees empty tables and stays unarmed
            peer.silent = True
            before = peer.count("udp")
            start = time.monotonic()
            with pytest.raises(tr.DnsTimeoutError):
                await t.exchange(query("a.test"), 0.4)
            assert 0.35 < time.monotonic() - start < 0.8
            assert peer.count("udp") - before == 2  # the first send and the one halfway
            assert not t._pending and not t._to_resend and not t._to_expire
            assert t._timer is None
        finally:
            await t.close()

    with dns_peer(RECORDS) as peer:
        asyncio.run(main(peer))


def test_tcp_pipelines_concurrent_queries_on_one_connection() -> None:
    async def main(peer: DnsPeer) -> None:
        t = tr.TcpTransport(
            TCPDNSServerOptions(tag="t", server="127.0.0.1", server_port=peer.port), direct()
        )
        try:
            outs = await asyncio.gather(*(t.exchange(query("a.test", qid=i), 2) for i in range(20)))
            later = await t.exchange(query("a.test", "AAAA", qid=99), 2)
        finally:
            await t.close()
        assert [parse(o).id for o in outs] == list(range(20))
        assert all(addrs(o) == ["203.0.113.1"] for o in outs)
        assert addrs(later) == ["2001:db8::1"]
        assert peer.tcp_connections == 1 and peer.count("tcp") == 21

    with dns_peer(RECORDS) as peer:
        asyncio.run(main(peer))


def test_tcp_reconnects_after_the_server_closed_the_connection() -> None:
    async def main(peer: DnsPeer) -> None:
        t = tr.TcpTransport(
            TCPDNSServerOptions(tag="t", server="127.0.0.1", server_port=peer.port), direct()
        )
        try:
            await t.exchange(query("a.test"), 2)
            assert t._conn is not None
            t._conn.writer.transport.abort()  # as if the server had dropped it while idle
            await asyncio.sleep(0.05)
            out = await t.exchange(query("a.test"), 2)
        finally:
            await t.close()
        assert addrs(out) == ["203.0.113.1"] and peer.tcp_connections == 2

    with dns_peer(RECORDS) as peer:
        asyncio.run(main(peer))


def test_tcp_to_a_closed_port_fails_with_the_reason() -> None:
    async def main() -> None:
        t = tr.TcpTransport(
            TCPDNSServerOptions(tag="t", server="127.0.0.1", server_port=1), direct()
        )
        with pytest.raises(tr.DnsTransportError) as e:
            await t.exchange(query("a.test"), 2)
        await t.close()
        assert "refused" in e.value.reason.lower()

    asyncio.run(main())


# -- DoT and DoH -----------------------------------------------------------------------------


def trust(monkeypatch: pytest.MonkeyPatch, cert_path: Path) -> None:
    """Make the test certificate a trusted CA for the transports' TLS contexts."""
    monkeypatch.setattr(
        tr.ssl, "create_default_context",
        functools.partial(ssl.create_default_context, cafile=str(cert_path)),
    )  # fmt: skip


def test_dot_with_insecure_answers(cert: tuple[Path, Path]) -> None:
    async def main(port: int) -> None:
        opts = TLSDNSServerOptions(
            tag="dot", server="127.0.0.1", server_port=port,
            tls=DNSServerTLSOptions(insecure=True),
        )  # fmt: skip
        t = tr.build_transport(opts, lambda _d: direct())
        try:
            outs = await asyncio.gather(*(t.exchange(query("a.test", qid=i), 3) for i in range(5)))
        finally:
            await t.close()
        assert [parse(o).id for o in outs] == list(range(5))
        assert all(addrs(o) == ["203.0.113.1"] for o in outs)

    with dot_peer(*cert, RECORDS) as peer:
        asyncio.run(main(peer.port))
        assert peer.count("tls") == 5 and peer.tcp_connections == 1


def test_dot_verifies_the_server_name(
    cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    trust(monkeypatch, cert[0])

    async def main(port: int, server_name: str | None) -> bytes:
        opts = TLSDNSServerOptions(
            tag="dot", server="127.0.0.1", server_port=port,
            tls=DNSServerTLSOptions(server_name=server_name),
        )  # fmt: skip
        t = tr.build_transport(opts, lambda _d: direct())
        try:
            return await t.exchange(query("a.test"), 3)
        finally:
            await t.close()

    with dot_peer(*cert, RECORDS) as peer:
        assert addrs(asyncio.run(main(peer.port, "dns.test"))) == ["203.0.113.1"]
        assert addrs(asyncio.run(main(peer.port, None))) == ["203.0.113.1"]  # IP SAN
        with pytest.raises(tr.DnsTransportError) as e:
            asyncio.run(main(peer.port, "other.test"))
        assert "TLS" in e.value.reason


def test_dot_untrusted_certificate_fails(cert: tuple[Path, Path]) -> None:
    async def main(port: int) -> None:
        opts = TLSDNSServerOptions(tag="dot", server="127.0.0.1", server_port=port)
        t = tr.build_transport(opts, lambda _d: direct())
        with pytest.raises(tr.DnsTransportError) as e:
            await t.exchange(query("a.test"), 3)
        await t.close()
        assert "certificate" in e.value.reason.lower()

    with dot_peer(*cert, RECORDS) as peer:
        asyncio.run(main(peer.port))


def test_doh_posts_and_keeps_the_connection(
    cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    trust(monkeypatch, cert[0])

    async def main(port: int) -> list[bytes]:
        opts = HTTPSDNSServerOptions(
            tag="doh", server="127.0.0.1", server_port=port, path="/q",
            tls=DNSServerTLSOptions(server_name="dns.test"),
        )  # fmt: skip
        t = tr.build_transport(opts, lambda _d: direct())
        try:
            return [await t.exchange(query("a.test", qtype, qid=i), 3)
                    for i, qtype in enumerate(["A", "AAAA", "A"])]  # fmt: skip
        finally:
            await t.close()

    with doh_peer(*cert, RECORDS) as doh:
        outs = asyncio.run(main(doh.port))
        assert [parse(o).id for o in outs] == [0, 1, 2]
        assert [addrs(o) for o in outs] == [["203.0.113.1"], ["2001:db8::1"], ["203.0.113.1"]]
        assert doh.paths == ["/q"] * 3 and doh.server.connections == 1


def test_doh_server_that_hangs_up_is_a_transport_error(cert: tuple[Path, Path]) -> None:
    async def main(port: int) -> None:
        opts = HTTPSDNSServerOptions(
            tag="doh", server="127.0.0.1", server_port=port,
            tls=DNSServerTLSOptions(insecure=True),
        )  # fmt: skip
        t = tr.build_transport(opts, lambda _d: direct())
        with pytest.raises(tr.DnsTransportError) as e:
            # Bytes the server cannot parse: it drops the connection without an answer.
            await t.exchange(b"\x00\x01" + b"\x00" * 4, 3)
        await t.close()
        assert e.value.reason

    with doh_peer(*cert, RECORDS) as doh:
        doh.peer.silent = True
        asyncio.run(main(doh.port))


# -- in-process servers ----------------------------------------------------------------------


def test_hosts_answers_from_files_and_predefined(tmp_path: Path) -> None:
    (tmp_path / "hosts").write_text(
        "# comment\n127.0.0.1 localhost\n203.0.113.7 Printer.LAN printer # inline\n"
        "2001:db8::7 printer.lan\nbogus line\n"
    )
    opts = HostsDNSServerOptions(
        tag="h", path=("hosts",), predefined={"router.lan": ("203.0.113.1", "2001:db8::1")}
    )
    t = tr.HostsTransport(opts, tmp_path)

    async def main() -> list[bytes]:
        return [
            await t.exchange(query(n, q), 1)
            for n, q in [("printer.lan", "A"), ("printer.lan", "AAAA"), ("router.lan", "AAAA"),
                         ("router.lan", "MX"), ("nowhere.lan", "A")]
        ]  # fmt: skip

    p4, p6, r6, rmx, none = asyncio.run(main())
    assert addrs(p4) == ["203.0.113.7"] and addrs(p6) == ["2001:db8::7"]
    assert addrs(r6) == ["2001:db8::1"] and addrs(rmx) == []
    assert parse(rmx).rcode() == dns.rcode.NOERROR
    assert parse(none).rcode() == dns.rcode.NXDOMAIN


def test_hosts_missing_file_is_a_config_mistake(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="cannot read"):
        tr.HostsTransport(HostsDNSServerOptions(tag="h", path=("nope",)), tmp_path)


def test_local_uses_the_system_resolver() -> None:
    t = tr.LocalTransport(LocalDNSServerOptions(tag="local"))

    async def main() -> tuple[bytes, bytes]:
        return (await t.exchange(query("localhost", "A"), 3),
                await t.exchange(query("localhost", "TXT"), 3))  # fmt: skip

    a, txt = asyncio.run(main())
    assert "127.0.0.1" in addrs(a) and parse(a).answer[0].ttl == tr.LOCAL_TTL
    assert parse(txt).rcode() == dns.rcode.NOERROR and not parse(txt).answer


def test_fakeip_hands_out_pool_addresses() -> None:
    opts = FakeIPDNSServerOptions(tag="fake")
    pool = FakeIPPool(opts.inet4_range, opts.inet6_range)  # type: ignore[arg-type]
    t = tr.FakeIPTransport(opts, pool)

    async def main() -> list[bytes]:
        return [await t.exchange(query("x.test", q), 1) for q in ("A", "AAAA", "A", "MX")]

    a, aaaa, again, mx = asyncio.run(main())
    [ip4], [ip6] = addrs(a), addrs(aaaa)
    assert ipaddress.ip_address(ip4) in opts.inet4_range
    assert ipaddress.ip_address(ip6) in opts.inet6_range
    assert addrs(again) == [ip4] and pool.lookup(ipaddress.ip_address(ip4)) == "x.test"
    assert not parse(mx).answer and parse(mx).rcode() == dns.rcode.NOERROR
