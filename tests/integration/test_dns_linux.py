"""DNS (servers, rules, cache, FakeIP, reverse mapping), hijack-dns and sniffing, in namespaces.

The topology is netns.py's; the peers are dns_peers.py's: two dnsmasq in the server namespace
(A 203.0.113.53 answered directly, B 203.0.113.54 only through the SOCKS5 proxy at
203.0.113.2, whose direct outbound binds to that address), dns_server.py's targets, and ztun
(tun with auto_route + strict_route, and a mixed inbound on 127.0.0.1:2080) in the client
namespace. Applications ask 198.51.100.200 / 2001:db8:1::200 on port 53, where nothing
listens: an answer can only come from ztun's hijack.

The `test_fixture_*` tests run without ztun and check the peers themselves (they pass without
the DNS module); every other test needs issue 11's DNS module, hijack-dns and sniffing.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .dns_peers import (
    A_TEST,
    A_TEST_FROM_B,
    ASKED4,
    ASKED6,
    B_TEST,
    B_TEST_FROM_A,
    CLIENT4,
    DNS_A,
    DNS_B,
    FAKE4,
    FAKE6,
    FAKE_REAL_IP,
    MIXED_PORT,
    PROXY,
    PROXY_PORT,
    SNIFF_IP,
    VIA_PROXY_IP,
    Capture,
    World,
    require_dns_environment,
    start_ztun,
    world,
    ztun_config,
)
from .netns import in_ns, require_tun_environment, topology, wait_until
from .peers import Proc, flow_lines, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.singbox]

#: How long ztun waits for an upstream DNS server before it answers SERVFAIL (ztun's default;
#: keep in step with the DNS module), and the margin the test allows on top of it.
UPSTREAM_TIMEOUT = 5.0
MARGIN = 1.0
#: The longest a server-speaks-first connection may wait for sniffing (sing-box waits 300 ms).
BANNER_EXTRA_MS = 50.0


@dataclass
class Env:
    w: World
    ztun: Proc

    def flows(self) -> list[dict[str, str]]:
        return flow_lines(self.ztun.text())

    def new_flow(self, before: int, pred: Callable[[dict[str, str]], bool],
                 timeout: float = 10.0) -> dict[str, str]:  # fmt: skip
        """The first flow line logged after the `before`-th that satisfies `pred` (TCP flows
        are logged when they end, UDP flows when their session expires: udp_timeout 3s)."""
        got = wait_for(lambda: [f for f in self.flows()[before:] if pred(f)], timeout)
        assert got, f"no such flow line after #{before}:\n{self.ztun.text()[-4000:]}"
        return got[0]  # type: ignore[no-any-return]


def _requirements() -> None:
    require_tun_environment()
    require_dns_environment()


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The peers in a topology of their own, without ztun."""
    _requirements()
    tmp = tmp_path_factory.mktemp("dns-bare")
    with topology() as t, world(t, tmp) as w:
        yield w


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    _requirements()
    tmp = tmp_path_factory.mktemp("dns")
    with topology() as t, world(t, tmp) as w:
        z = start_ztun(t, tmp, ztun_config())
        try:
            yield Env(w, z)
        finally:
            z.stop()


# -- the peers themselves (no ztun) -----------------------------------------------------------


def test_fixture_dnsmasq_answers_and_logs(bare: World) -> None:
    for proto in ("udp", "tcp"):
        r = bare.dns("query", proto, DNS_A, f"fx-{proto}.a.test")
        assert r["rcode"] == "NOERROR" and r["answers"] == [A_TEST], r
        r = bare.dns("query", proto, DNS_B, f"fx-{proto}.b.test")
        assert r["rcode"] == "NOERROR" and r["answers"] == [B_TEST], r
    assert bare.dns("query", "udp", DNS_A, "fx.b.test")["answers"] == [B_TEST_FROM_A]
    assert bare.dns("query", "udp", DNS_B, "fx.a.test")["answers"] == [A_TEST_FROM_B]
    r = bare.dns("query", "udp", DNS_A, "fx.a.test", "AAAA")
    assert r["rcode"] == "NOERROR" and r["answers"] == [], r  # NODATA, not REFUSED
    assert ("A", "fx-tcp.a.test", CLIENT4) in bare.queries("A")  # TCP queries are logged too
    assert ("A", "fx-udp.b.test", CLIENT4) in bare.queries("B")
    # nothing answers where the applications ask
    r = bare.dns("query", "udp", ASKED4, "fx.a.test", "A", "1")
    assert r["rcode"] == "timeout", r


def test_fixture_targets_and_proxy(bare: World) -> None:
    assert bare.dns("whoami", SNIFF_IP, "7777") == {"peer": CLIENT4, "local": SNIFF_IP}
    r = bare.dns("tls", SNIFF_IP, "443", "via-proxy.test", str(bare.cert))
    assert r == {"peer": CLIENT4, "local": SNIFF_IP}
    assert bare.events("tls")[-1]["sni"] == "via-proxy.test"
    r = bare.dns("http", SNIFF_IP, "80", "www.via-proxy.test")
    assert r["status"] == "HTTP/1.1 200 OK" and r["peer"] == CLIENT4, r
    assert bare.events("http")[-1]["host"] == "www.via-proxy.test"
    r = bare.dns("banner", A_TEST, "22", "3")
    assert len(r["times_ms"]) == 3, r  # type: ignore[arg-type]
    # a real QUIC client: one long-header (0b11xxxxxx) version-1 Initial, padded to 1200 bytes
    r = bare.dns("quic", SNIFF_IP, "443", "quic.test")
    assert r["first"] & 0xC0 == 0xC0 and r["version"] == "00000001", r  # type: ignore[operator]
    assert min(r["sent"]) >= 1200, r  # type: ignore[type-var]
    assert any(e["size"] >= 1200 and e["peer"] == CLIENT4 for e in bare.events("udp"))  # type: ignore[operator]
    # through the SOCKS5 proxy a target sees the proxy's address
    r = in_ns(bare.t.client, "curl", "-sS", "--max-time", "5", "--socks5",
              f"{PROXY}:{PROXY_PORT}", f"http://{SNIFF_IP}/")  # fmt: skip
    assert r.stdout.strip() == f"peer={PROXY} local={SNIFF_IP}", r


def test_fixture_capture_sees_a_leak(bare: World, tmp_path: Path) -> None:
    """Without ztun, the query to 198.51.100.200 leaves on eth0 (as ARP: it is on-link), and
    a query to dnsmasq A is seen both ways: the capture and its parser would catch a leak."""
    # A neighbour entry left FAILED by an earlier test would hold back the ARP request.
    in_ns(bare.t.client, "ip", "neigh", "flush", "all")
    with Capture(bare.t.client, "eth0", tmp_path / "bare.pcap") as cap:
        bare.dns("query", "udp", DNS_A, "cap.a.test")
        bare.dns("query", "udp", ASKED4, "cap.a.test", "A", "1")
        # tcpdump writes each packet as it comes (-U): wait until the ARP for ASKED4 is in.
        wait_until(lambda: any(ASKED4 in (p.src, p.dst) for p in cap.packets()), 3)
    pkts = cap.packets()
    assert any(p.kind == "udp" and p.dst == DNS_A and p.dport == 53 for p in pkts), pkts
    assert any(p.kind == "udp" and p.src == DNS_A and p.sport == 53 for p in pkts), pkts
    assert any(ASKED4 in (p.src, p.dst) for p in pkts), pkts


# -- hijacked queries -------------------------------------------------------------------------


@pytest.mark.parametrize("asked", [ASKED4, ASKED6])
@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_hijacked_query_answered_from_dnsmasq_a(env: Env, proto: str, asked: str) -> None:
    name = f"hijack-{proto}-v{ipaddress.ip_address(asked).version}.a.test"
    r = env.w.dns("query", proto, asked, name)
    assert r["rcode"] == "NOERROR" and r["answers"] == [A_TEST], r
    # ztun asked dnsmasq A itself, from the client's uplink
    got = [q for q in env.w.queries("A") if q[1] == name]
    assert ("A", name, CLIENT4) in got and {q[2] for q in got} == {CLIENT4}, got
    assert not [q for q in env.w.queries("B") if q[1] == name]


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_rule_sends_b_test_to_dnsmasq_b_through_the_proxy(env: Env, proto: str) -> None:
    name = f"split-{proto}.b.test"
    r = env.w.dns("query", proto, ASKED4, name)
    assert r["rcode"] == "NOERROR" and r["answers"] == [B_TEST], r  # B's answer, not A's
    # dnsmasq B saw it come from the proxy (dns-b has detour: proxy), never from the client
    # (sing-box, run in ztun's place, asked B more than once: only the source is asserted)
    got = [q for q in env.w.queries("B") if q[1] == name]
    assert ("A", name, PROXY) in got and {q[2] for q in got} == {PROXY}, env.w.queries("B")
    assert not [q for q in env.w.queries("A") if q[1] == name], env.w.queries("A")


def test_cache_hit_sends_nothing_upstream(env: Env) -> None:
    name = "cached.a.test"
    first = env.w.dns("query", "udp", ASKED4, name)
    second = env.w.dns("query", "udp", ASKED4, name)
    assert first["answers"] == second["answers"] == [A_TEST], (first, second)
    assert [q for q in env.w.queries("A") if q[1] == name] == [("A", name, CLIENT4)]


def test_mixed_inbound_udp_associate_hijacked(env: Env) -> None:
    """A SOCKS5 UDP ASSOCIATE client's query to 198.51.100.200:53 ({port: 53, action:
    hijack-dns}) is answered by ztun, as if from the address it asked."""
    name = "mixed.a.test"
    r = env.w.dns("socks-dns", str(MIXED_PORT), ASKED4, name)
    assert r["rcode"] == "NOERROR" and r["answers"] == [A_TEST] and r["id_ok"], r
    assert r["from"] == f"{ASKED4}:53", r
    assert ("A", name, CLIENT4) in env.w.queries("A")


# -- domains for TUN flows ----------------------------------------------------------------------


def test_reverse_mapping_routes_by_domain(env: Env) -> None:
    r = env.w.dns("query", "udp", ASKED4, "via.via-proxy.test")
    assert r["answers"] == [VIA_PROXY_IP], r
    n = len(env.flows())
    # by IP, as any application does after resolving: the domain comes back from the mapping
    assert env.w.dns("whoami", VIA_PROXY_IP, "7777") == {"peer": PROXY, "local": VIA_PROXY_IP}
    f = env.new_flow(n, lambda f: f.get("destination", "").startswith(f"{VIA_PROXY_IP}:"))
    assert f["domain"] == "via.via-proxy.test" and f["outbound"] == "proxy", f
    # an address no answer gave stays direct
    assert env.w.dns("whoami", SNIFF_IP, "7777") == {"peer": CLIENT4, "local": SNIFF_IP}


def test_fakeip_reaches_the_real_server(env: Env) -> None:
    name = "x.fake.test"
    r = env.w.dns("query", "udp", ASKED4, name)
    assert r["rcode"] == "NOERROR" and len(r["answers"]) == 1, r  # type: ignore[arg-type]
    fake = r["answers"][0]  # type: ignore[index]
    assert ipaddress.ip_address(fake) in ipaddress.ip_network(FAKE4), r
    r6 = env.w.dns("query", "udp", ASKED4, name, "AAAA")
    assert len(r6["answers"]) == 1, r6  # type: ignore[arg-type]
    assert ipaddress.ip_address(r6["answers"][0]) in ipaddress.ip_network(FAKE6), r6  # type: ignore[index]
    assert not [q for q in env.w.queries("A") if q[1] == name]  # answered without upstream
    assert env.w.dns("query", "udp", ASKED4, name)["answers"] == [fake]  # stable
    n = len(env.flows())
    # the connection to the FakeIP reaches the real address (dnsmasq A's answer), direct
    assert env.w.dns("whoami", str(fake), "7777") == {"peer": CLIENT4, "local": FAKE_REAL_IP}
    f = env.new_flow(n, lambda f: f.get("domain") == name)
    assert f["outbound"] == "direct", f


@pytest.mark.parametrize("sni,via", [("via-proxy.test", PROXY), ("other.test", CLIENT4)])
def test_tls_sni_routes(env: Env, sni: str, via: str) -> None:
    """By IP (an address no DNS answer gave), with server_hostname: the SNI decides."""
    n = len(env.flows())
    r = env.w.dns("tls", SNIFF_IP, "443", sni, str(env.w.cert))
    assert r == {"peer": via, "local": SNIFF_IP}, r
    assert env.w.events("tls")[-1]["sni"] == sni
    f = env.new_flow(n, lambda f: f.get("destination") == f"{SNIFF_IP}:443")
    assert f["domain"] == sni, f
    assert f["outbound"] == ("proxy" if via == PROXY else "direct"), f


@pytest.mark.parametrize("host,via", [("www.via-proxy.test", PROXY), ("other.test", CLIENT4)])
def test_http_host_routes(env: Env, host: str, via: str) -> None:
    n = len(env.flows())
    r = env.w.dns("http", SNIFF_IP, "80", host)
    assert r["status"] == "HTTP/1.1 200 OK" and r["peer"] == via, r
    f = env.new_flow(n, lambda f: f.get("destination") == f"{SNIFF_IP}:80")
    assert f["domain"] == host, f
    assert f["outbound"] == ("proxy" if via == PROXY else "direct"), f


@pytest.mark.parametrize("sni,via", [("quic.test", PROXY), ("other.test", CLIENT4)])
def test_quic_initial_sni_routes(env: Env, sni: str, via: str) -> None:
    """An aioquic client's Initial to an IP: the QUIC sniffer's SNI and `protocol: quic`."""
    n, e = len(env.flows()), len(env.w.events("udp"))
    r = env.w.dns("quic", SNIFF_IP, "443", sni)
    assert r["sent"], r
    got = wait_for(lambda: [x for x in env.w.events("udp")[e:] if x["port"] == 443], 5)
    assert got and {x["peer"] for x in got} == {via}, got  # type: ignore[union-attr]
    assert got[0]["size"] >= 1200, got  # type: ignore[index,operator]
    f = env.new_flow(n, lambda f: f.get("network") == "udp"
                     and f.get("destination") == f"{SNIFF_IP}:443", timeout=15)  # fmt: skip
    assert f["domain"] == sni, f
    assert f["outbound"] == ("proxy" if via == PROXY else "direct"), f


# -- leaks ------------------------------------------------------------------------------------


def test_no_dns_leaves_but_ztuns_own(env: Env, tmp_path: Path) -> None:
    """strict_route + hijack: on the client's uplink, every port-53 packet is ztun's own query
    to dnsmasq A (or its answer); nothing goes to the address the application asked, and the
    *.b.test query leaves only as SOCKS5 traffic to the proxy."""
    with Capture(env.w.t.client, "eth0", tmp_path / "leak.pcap") as cap:
        for i, (proto, asked) in enumerate([("udp", ASKED4), ("tcp", ASKED4), ("udp", ASKED6),
                                            ("tcp", ASKED6), ("udp", ASKED4)]):  # fmt: skip
            r = env.w.dns("query", proto, asked, f"leak{i}.a.test")
            assert r["answers"] == [A_TEST], r
        r = env.w.dns("query", "udp", ASKED4, "leak.b.test")
        assert r["answers"] == [B_TEST], r
        time.sleep(0.3)
    pkts = cap.packets()
    dns = [p for p in pkts if p.kind in ("udp", "tcp") and 53 in (p.sport, p.dport)]
    assert dns, "ztun's upstream queries should be on the uplink"
    for p in dns:
        out = (p.src, p.dst, p.dport) == (CLIENT4, DNS_A, 53)
        back = (p.src, p.dst, p.sport) == (DNS_A, CLIENT4, 53)
        assert out or back, f"port-53 packet that is not ztun's own query to dnsmasq A: {p}"
    assert not [p for p in pkts if ASKED4 in (p.src, p.dst) or ASKED6 in (p.src, p.dst)]
    assert not [p for p in pkts if DNS_B in (p.src, p.dst)], "dnsmasq B asked around the proxy"
    assert [p for p in pkts if p.kind == "tcp" and p.dst == PROXY and p.dport == PROXY_PORT]
    names = {q[1] for q in env.w.queries("A")}
    assert {f"leak{i}.a.test" for i in range(5)} <= names
    assert ("A", "leak.b.test", PROXY) in env.w.queries("B")


# -- server-speaks-first protocols ------------------------------------------------------------


def test_banner_not_held_by_sniffing(tmp_path: Path) -> None:
    """A server that speaks first (SSH banner) through the TUN: with `{action: sniff}` the
    banner may come at most BANNER_EXTRA_MS later than without it (sing-box holds such a
    flow for its 300 ms sniff timeout)."""
    _requirements()
    medians = {}
    with topology() as t, world(t, tmp_path, proxy=False) as w:
        for sniff in (False, True, False, True):
            z = start_ztun(t, tmp_path, ztun_config(sniff=sniff), f"ztun-banner-{sniff}")
            try:
                r = w.dns("banner", A_TEST, "22", "20")
                assert not r["errors"] and len(r["times_ms"]) == 20, r  # type: ignore[arg-type]
                medians.setdefault(sniff, []).append(float(r["median_ms"]))  # type: ignore[arg-type]
            finally:
                z.stop()
    with_sniff, without = min(medians[True]), min(medians[False])
    assert with_sniff - without < BANNER_EXTRA_MS, medians


# -- the upstream down ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["stopped", "killed"])
def test_upstream_down_servfail_in_bounded_time(env: Env, how: str) -> None:
    """dnsmasq A silent (SIGSTOP: ztun's upstream timeout runs out) or gone (killed: ICMP port
    unreachable comes back): the hijacked query gets SERVFAIL, within the timeout + MARGIN."""
    dnsmasq = env.w.procs["dnsmasq-A"]
    name = f"down-{how}.a.test"
    try:
        if how == "stopped":
            os.kill(dnsmasq.pid, signal.SIGSTOP)
        else:
            dnsmasq.stop(signal.SIGKILL)
        client_timeout = UPSTREAM_TIMEOUT + MARGIN + 5
        r = env.w.dns("query", "udp", ASKED4, name, "A", str(client_timeout))
        assert r["rcode"] == "SERVFAIL", r
        assert float(r["seconds"]) <= UPSTREAM_TIMEOUT + MARGIN, r  # type: ignore[arg-type]
    finally:
        if how == "stopped":
            os.kill(dnsmasq.pid, signal.SIGCONT)
        else:
            env.w.start_dnsmasq("A")
    # and once it is back, queries are answered again
    r = wait_for(lambda: env.w.dns("query", "udp", ASKED4, f"back-{how}.a.test")["answers"]
                 == [A_TEST], 10)  # fmt: skip
    assert r
