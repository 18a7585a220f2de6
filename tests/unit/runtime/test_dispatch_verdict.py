"""Dispatcher.verdict/route: sniff rules, names for IP destinations (reverse mapping and
FakeIP), hijack-dns, blocks — with the real rule compiler and fake outbounds (no sockets)."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

from ztun.address import Address, IPAddress
from ztun.dns.hijack import DnsHijack
from ztun.outbound.base import Counters
from ztun.route.compile import compile_router
from ztun.route.metadata import FlowMeta
from ztun.runtime.dispatch import Dispatcher
from ztun.stack.flow import Flow, Refused, SniffFirst, apply_sniffed, decide_datagram


class FakeOutbound:
    type = "fake"
    refuses_tcp = False
    drops_udp = False

    def __init__(self, tag: str, *, remote: bool = False, block: bool = False) -> None:
        self.tag = tag
        self.counters = Counters()
        self.resolves_remotely = remote
        self.refuses_tcp = self.drops_udp = block


DIRECT = FakeOutbound("direct")
PROXY = FakeOutbound("proxy", remote=True)
BLOCK = FakeOutbound("block", block=True)
OUTBOUNDS = {"direct": DIRECT, "proxy": PROXY, "block": BLOCK}


class FakeDns:
    def __init__(self) -> None:
        self.queries: list[bytes] = []

    async def exchange(self, query: bytes, meta: FlowMeta) -> bytes | None:
        self.queries.append(query)
        return b"answer:" + query


def dispatcher(rules: list[dict[str, Any]], names: Any = None) -> Dispatcher:
    data = {
        "outbounds": [{"type": "direct", "tag": t} for t in OUTBOUNDS],
        "route": {"rules": rules, "final": "direct"},
    }
    router, diagnostics = compile_router(data)
    assert router is not None, diagnostics
    return Dispatcher(router, OUTBOUNDS, dns_hijack=DnsHijack(FakeDns()), names=names)  # type: ignore[arg-type]


def flow(dest: str, port: int = 443, network: str = "tcp") -> Flow:
    ip = ipaddress.ip_address(dest)
    meta = FlowMeta(network=network, destination=ip, destination_port=port)  # type: ignore[arg-type]
    return Flow(meta, Address(dest, port), 0.0)


SNIFF_RULES = [
    {"action": "sniff"},
    {"protocol": "dns", "action": "hijack-dns"},
    {"domain_suffix": ["proxied.test"], "outbound": "proxy"},
    {"protocol": "tls", "outbound": "block"},
]


def test_a_sniff_rule_asks_to_sniff_once_then_routes_on_what_was_found() -> None:
    d = dispatcher(SNIFF_RULES)
    f = flow("203.0.113.9")
    ask = d.route(f, "tcp")
    assert isinstance(ask, SniffFirst) and ask.timeout == 0.3
    from ztun.sniff import Sniffed

    apply_sniffed(f, Sniffed("tls", "www.proxied.test"))
    assert d.route(f, "tcp") is PROXY
    assert f.meta.domain == "www.proxied.test" and f.meta.protocol == "tls"
    assert f.rule == "2" and f.outbound == "proxy"
    # Sniffed, nothing found: the walk goes on past the sniff rule to the final outbound.
    g = flow("203.0.113.9")
    assert isinstance(d.route(g, "tcp"), SniffFirst)
    apply_sniffed(g, None)
    assert d.route(g, "tcp") is DIRECT and g.rule == "final"


def test_sniffed_protocol_can_block_and_decide_skips_sniffing() -> None:
    d = dispatcher(SNIFF_RULES)
    f = flow("203.0.113.9")
    d.route(f, "tcp")
    from ztun.sniff import Sniffed

    apply_sniffed(f, Sniffed("tls", None))
    assert isinstance(d.route(f, "tcp"), Refused)  # block refuses TCP
    assert BLOCK.counters.blocked_tcp == 1
    # The mixed inbound's requests name their destination: no sniffing, the walk goes on.
    assert d.decide(flow("203.0.113.9")) is DIRECT


def test_a_dns_datagram_is_sniffed_and_hijacked() -> None:
    import dns.message

    d = dispatcher(SNIFF_RULES)
    f = flow("198.51.100.200", 53, "udp")
    query = dns.message.make_query("example.test", "A").to_wire()
    verdict = decide_datagram(d.route, f, "udp", query)
    assert verdict is d.dns_hijack and f.meta.protocol == "dns" and f.outbound == "hijack-dns"
    # Not DNS: routed on, to the final outbound.
    g = flow("198.51.100.200", 53, "udp")
    assert decide_datagram(d.route, g, "udp", b"\x00" * 3) is DIRECT


def test_names_for_ip_destinations_reverse_mapping_and_fakeip() -> None:
    names = {
        ipaddress.ip_address("203.0.113.20"): ("www.proxied.test", False),
        ipaddress.ip_address("198.18.128.5"): ("fake.proxied.test", True),
    }

    def lookup(ip: IPAddress) -> tuple[str, bool] | None:
        return names.get(ip)

    d = dispatcher([{"domain_suffix": ["proxied.test"], "outbound": "proxy"}], lookup)
    # Reverse mapping: the rule sees the domain; the proxy gets the name, not ztun's answer.
    f = flow("203.0.113.20")
    assert d.route(f, "tcp") is PROXY
    assert f.meta.domain == "www.proxied.test" and f.domain_from == "reverse"
    assert f.dest == Address("www.proxied.test", 443)
    # FakeIP: every outbound gets the name (the fake address means nothing outside ztun).
    g = flow("198.18.128.5")
    assert d.route(g, "tcp") is PROXY and g.dest == Address("fake.proxied.test", 443)
    # A direct flow keeps the IP the application resolved; unknown IPs have no name.
    d2 = dispatcher([], lookup)
    h = flow("203.0.113.20")
    assert d2.route(h, "tcp") is DIRECT and h.dest == Address("203.0.113.20", 443)
    assert h.meta.domain == "www.proxied.test"
    k = flow("203.0.113.99")
    assert d2.route(k, "tcp") is DIRECT and k.meta.domain is None


def test_hijack_answers_udp_in_process_and_tcp_over_a_socket_pair() -> None:
    async def main() -> None:
        fake = FakeDns()
        hijack = DnsHijack(fake)
        got: list[tuple[Address, bytes]] = []
        meta = FlowMeta(network="udp")
        session = await hijack.open_udp(meta, lambda a, p: got.append((a, p)), lambda w: None)
        asker = Address("198.51.100.200", 53)
        session.send(asker, b"q1")
        await asyncio.sleep(0.01)
        assert got == [(asker, b"answer:q1")]  # as from the server the client asked
        # TCP: RFC 7766 framing over the socket pair the relay would use.
        loop = asyncio.get_running_loop()
        sock = await hijack.connect_tcp(asker, FlowMeta())
        await loop.sock_sendall(sock, b"\x00\x02q2\x00\x02q3")
        want = b"\x00\x09answer:q2\x00\x09answer:q3"
        buf = b""
        while len(buf) < len(want):
            buf += await asyncio.wait_for(loop.sock_recv(sock, 100), 2)
        assert buf == want
        sock.close()
        session.close()
        await hijack.close()

    asyncio.run(main())


def test_override_destination_sends_the_flow_to_the_sniffed_name() -> None:
    from ztun.sniff import Sniffed

    rules = [{"action": "sniff", "override_destination": True}, *SNIFF_RULES[2:]]
    d = dispatcher(rules)
    f = flow("203.0.113.9")
    ask = d.route(f, "tcp")
    assert isinstance(ask, SniffFirst) and ask.override_destination
    apply_sniffed(f, Sniffed("tls", "www.proxied.test"), ask.override_destination)
    assert d.route(f, "tcp") is PROXY and f.dest == Address("www.proxied.test", 443)
    # Without it the outbound keeps the IP the application chose.
    g = flow("203.0.113.9")
    d2 = dispatcher(SNIFF_RULES)
    d2.route(g, "tcp")
    apply_sniffed(g, Sniffed("tls", "www.proxied.test"))
    assert d2.route(g, "tcp") is PROXY and g.dest == Address("203.0.113.9", 443)


class FakeFinder:
    """An owner lookup without sockets: answers from a table, counts its calls."""

    def __init__(self, owners: dict[int, Any]) -> None:
        self.owners = owners
        self.calls: list[tuple[Any, ...]] = []

    async def find(self, *args: Any) -> Any:
        from ztun.platform.linux.owner import UNKNOWN

        args = tuple(str(a) if hasattr(a, "packed") else a for a in args)
        self.calls.append(args)
        return self.owners.get(args[2], UNKNOWN)

    def close(self) -> None:
        pass


def test_owner_rules_ask_for_a_lookup_once_then_route_on_the_owner() -> None:
    from ztun.platform.linux.owner import Owner
    from ztun.stack.flow import LookupFirst

    d = dispatcher([{"process_name": "curl", "outbound": "proxy"},
                    {"user_id": 65534, "outbound": "block"}])  # fmt: skip
    finder = FakeFinder({40000: Owner(0, "root", 7, "/usr/bin/curl"), 40001: Owner(65534)})
    d.owners = finder  # type: ignore[assignment]

    def with_source(port: int) -> Flow:
        f = flow("203.0.113.9")
        f.meta = FlowMeta(network="tcp", destination=f.meta.destination, destination_port=443,
                          source=ipaddress.ip_address("198.18.0.1"), source_port=port)  # fmt: skip
        return f

    f = with_source(40000)
    assert isinstance(d.route(f, "tcp"), LookupFirst)
    asyncio.run(d.identify(f))
    assert d.route(f, "tcp") is PROXY and f.meta.process_name == "curl"
    asyncio.run(d.identify(f))  # cached for the life of the flow: no second lookup
    assert finder.calls == [("tcp", "198.18.0.1", 40000, "203.0.113.9", 443)]
    g = with_source(40001)
    asyncio.run(d.identify(g))
    assert isinstance(d.route(g, "tcp"), Refused)
    # Gone, or in another namespace: unknown, routed on by the other rules, no error.
    h = with_source(40002)
    asyncio.run(d.identify(h))
    assert d.route(h, "tcp") is DIRECT and h.meta.process_user_id is None
    # A UDP flow's first datagram comes back with the lookup request, for sniffing later.
    u = with_source(40000)
    u.meta = FlowMeta(network="udp", destination=u.meta.destination, destination_port=53,
                      source=u.meta.source, source_port=40000)  # fmt: skip
    assert decide_datagram(d.route, u, "udp", b"q") == LookupFirst(b"q")


def test_no_owner_rule_no_lookup() -> None:
    d = dispatcher([{"ip_cidr": "203.0.113.0/24", "outbound": "proxy"}])
    assert d.owners is None and d.route(flow("203.0.113.9"), "tcp") is PROXY


def test_a_failing_lookup_is_an_unknown_owner_not_an_error() -> None:
    d = dispatcher([{"user_id": 0, "outbound": "block"}])

    class Broken:
        async def find(self, *args: Any) -> Any:
            raise OSError("boom")

    d.owners = Broken()  # type: ignore[assignment]
    f = flow("203.0.113.9")
    f.meta = FlowMeta(network="tcp", destination=f.meta.destination, destination_port=443,
                      source=ipaddress.ip_address("198.18.0.1"), source_port=1)  # fmt: skip
    asyncio.run(d.identify(f))
    assert f.identified and d.route(f, "tcp") is DIRECT
    assert asyncio.run(d.owner_of_peer("tcp", ("127.0.0.1", 1), ("127.0.0.1", 2))) is None


def with_source(dest: str, port: int, network: str = "tcp", dport: int = 443) -> Flow:
    f = flow(dest, dport, network)
    f.meta = FlowMeta(network=network, destination=f.meta.destination,  # type: ignore[arg-type]
                      destination_port=dport, source=ipaddress.ip_address("198.18.0.1"),
                      source_port=port)  # fmt: skip
    return f


def test_a_flow_decided_before_any_owner_rule_is_never_looked_up() -> None:
    """The walk stops at the first rule that reads the owner, not before the first rule: a
    flow an earlier rule decides costs no lookup; one that reaches the rule is looked up, and
    the walk goes on from that rule with what was gathered on the way."""
    from ztun.platform.linux.owner import Owner
    from ztun.stack.flow import LookupFirst

    d = dispatcher([{"ip_cidr": "203.0.113.0/25", "outbound": "block"},
                    {"action": "route-options", "override_port": 8443},
                    {"process_name": "curl", "outbound": "proxy"},
                    {"ip_cidr": "203.0.113.128/25", "outbound": "proxy"}])  # fmt: skip
    finder = FakeFinder({40000: Owner(0, "root", 7, "/usr/bin/curl")})
    d.owners = finder  # type: ignore[assignment]
    early = with_source("203.0.113.9", 40000)
    assert isinstance(d.route(early, "tcp"), Refused) and finder.calls == []
    late = with_source("203.0.113.200", 40000)
    assert isinstance(d.route(late, "tcp"), LookupFirst)
    assert late.resume_at == 2 and late.gathered == {"override_port": 8443}
    asyncio.run(d.identify(late))
    assert d.route(late, "tcp") is PROXY
    assert late.decision is not None and late.decision.rule_index == 2
    assert late.dest == Address("203.0.113.200", 8443)  # the options gathered before the stop
    other = with_source("203.0.113.200", 40001)  # unknown owner: the later rules decide
    assert isinstance(d.route(other, "tcp"), LookupFirst)
    asyncio.run(d.identify(other))
    assert d.route(other, "tcp") is PROXY and other.decision.rule_index == 3  # type: ignore[union-attr]
    assert [c[2] for c in finder.calls] == [40000, 40001]


def test_owner_rules_in_rule_sets_and_logical_rules_stop_the_walk_too() -> None:
    data = {
        "outbounds": [{"type": "direct", "tag": t} for t in OUTBOUNDS],
        "route": {
            "rules": [
                {"ip_cidr": "203.0.113.0/25", "outbound": "block"},
                {"rule_set": "plain", "outbound": "proxy"},
                {"rule_set": "owners", "outbound": "proxy"},
                {"type": "logical", "mode": "or", "outbound": "block",
                 "rules": [{"user_id": 0}, {"port": 1}]},
            ],
            "rule_set": [{"type": "inline", "tag": "plain", "rules": [{"port": 25}]},
                         {"type": "inline", "tag": "owners",
                          "rules": [{"process_name": "curl"}]}],
        },
    }  # fmt: skip
    rule_sets = {"plain": [{"port": 25}], "owners": [{"process_name": "curl"}]}
    router, diagnostics = compile_router(data, rule_sets=rule_sets)
    assert router is not None, diagnostics
    assert router.first_owner_rule == 2
    logical_only = dict(data, route={**data["route"], "rules": data["route"]["rules"][3:]})  # type: ignore[dict-item]
    router2, _ = compile_router(logical_only, rule_sets=rule_sets)
    assert router2 is not None and router2.first_owner_rule == 0
    plain_only = dict(data, route={**data["route"], "rules": data["route"]["rules"][:2]})  # type: ignore[dict-item]
    router3, _ = compile_router(plain_only, rule_sets=rule_sets)
    assert router3 is not None and router3.first_owner_rule == 2  # == len(rules): no stop


def test_a_hijack_to_dns_rules_on_the_owner_is_looked_up_first() -> None:
    """DNS rules match a hijacked query with its flow's metadata: when they read the owner,
    the flow is looked up before it is handed to the DNS module, even with no route rule on
    the owner (and not when they do not)."""
    from ztun.platform.linux.owner import Owner
    from ztun.stack.flow import LookupFirst

    d = dispatcher([{"port": 53, "action": "hijack-dns"}])
    d.owners = FakeFinder({40000: Owner(0, "root", 7, "/usr/bin/dig")})  # type: ignore[assignment]
    plain = with_source("203.0.113.53", 40000, "udp", 53)
    assert decide_datagram(d.route, plain, "udp", b"q") is d.dns_hijack
    d.dns_needs_owner = True
    asked = with_source("203.0.113.53", 40000, "udp", 53)
    assert decide_datagram(d.route, asked, "udp", b"q") == LookupFirst(b"q")
    asyncio.run(d.identify(asked))
    assert decide_datagram(d.route, asked, "udp", b"q") is d.dns_hijack
    assert asked.meta.process_name == "dig"


def test_a_sniff_before_the_owner_rule_then_the_lookup() -> None:
    """sniff, then a rule on the owner: the datagram is sniffed first, and the lookup request
    that follows still carries it (TCP: runtime/sniff.py looks the owner up after sniffing)."""
    from ztun.platform.linux.owner import Owner
    from ztun.stack.flow import LookupFirst

    d = dispatcher([{"action": "sniff"}, {"protocol": "dns", "outbound": "block"},
                    {"process_name": "dig", "outbound": "proxy"}])  # fmt: skip
    d.owners = FakeFinder({40000: Owner(0, "root", 7, "/usr/bin/dig")})  # type: ignore[assignment]
    f = with_source("203.0.113.9", 40000, "udp", 5353)
    payload = b"not dns at all"
    assert decide_datagram(d.route, f, "udp", payload) == LookupFirst(payload)
    assert f.sniffed and f.resume_at == 2
    asyncio.run(d.identify(f))
    assert decide_datagram(d.route, f, "udp", payload) is PROXY


def test_a_reload_between_the_lookup_and_the_next_step_walks_the_new_rules() -> None:
    """A flow stopped for its owner (or its first bytes) resumes at a rule index of the rules
    it was walking; after a reload those are gone, so it walks the new rules from the start."""
    from ztun.platform.linux.owner import Owner
    from ztun.stack.flow import LookupFirst

    d = dispatcher([{"port": 25, "outbound": "block"}, {"port": 80, "outbound": "block"},
                    {"process_name": "curl", "outbound": "proxy"}])  # fmt: skip
    d.owners = FakeFinder({40000: Owner(0, "root", 7, "/usr/bin/curl")})  # type: ignore[assignment]
    f = with_source("203.0.113.9", 40000)
    assert isinstance(d.route(f, "tcp"), LookupFirst) and f.resume_at == 2
    d.router = dispatcher([{"port": 443, "outbound": "block"},
                           {"process_name": "curl", "outbound": "proxy"}]).router  # fmt: skip
    asyncio.run(d.identify(f))
    assert isinstance(d.route(f, "tcp"), Refused) and f.decision.rule_index == 0  # type: ignore[union-attr]
