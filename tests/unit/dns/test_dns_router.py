"""DNS rules: compiled by the route compiler, walked by DnsRouter; the legacy server form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.check import check_file
from ztun.config.legacy_dns import legacy_server, typed_text
from ztun.config.options import (
    FakeIPDNSServerOptions,
    HTTPSDNSServerOptions,
    TLSDNSServerOptions,
    build_options,
)
from ztun.dns.router import DnsRouter
from ztun.errors import ConfigError
from ztun.route.action import DnsRoute, Predefined, Reject
from ztun.route.compile import compile_dns_router
from ztun.route.metadata import FlowMeta

SERVERS = [
    {"type": "udp", "tag": "remote", "server": "198.51.100.53"},
    {"type": "local", "tag": "local"},
    {"type": "fakeip", "tag": "fake"},
]


def router(rules: list[Any], **dns: Any) -> DnsRouter:
    data = {"dns": {"servers": SERVERS, "rules": rules, **dns}, "outbounds": [
        {"type": "direct", "tag": "direct"}, {"type": "socks", "tag": "proxy"}]}  # fmt: skip
    compiled, diagnostics = compile_dns_router(data)
    assert [d for d in diagnostics if d.severity == "error"] == []
    assert compiled is not None
    return compiled


def q(domain: str, qtype: int = 1, **kw: Any) -> FlowMeta:
    return FlowMeta(network="udp", domain=domain, query_type=qtype, **kw)


def test_suffix_rule_picks_a_server_and_final_another() -> None:
    r = router([{"domain_suffix": ["lan", "home.arpa"], "server": "local"}], final="remote")
    d = r.decide(q("printer.LAN."))
    assert (d.server, d.rule_index, d.reject, d.predefined) == ("local", 0, None, None)
    final = r.decide(q("example.com"))
    assert (final.server, final.rule_index, final.rule) == ("remote", None, "final")
    assert router([]).decide(q("x.example")).server == "remote"  # the first server


def test_query_type_and_fakeip() -> None:
    r = router([{"query_type": ["A", "AAAA"], "server": "fake", "rewrite_ttl": 1}])
    a = r.decide(q("example.com", 28))
    assert a.server == "fake" and a.rewrite_ttl == 1
    assert r.decide(q("example.com", 65)).server == "remote"
    assert r.server_types == {"remote": "udp", "local": "local", "fake": "fakeip"}


def test_reject_and_predefined() -> None:
    r = router([
        {"domain": "ads.example", "action": "reject"},
        {"domain": "quiet.example", "action": "reject", "method": "drop"},
        {"query_type": "HTTPS", "action": "predefined", "rcode": "NOERROR"},
        {"domain": "fixed.example", "action": "predefined",
         "answer": ["fixed.example. IN A 203.0.113.1"], "ns": "example. IN NS ns.example."},
    ])  # fmt: skip
    assert r.decide(q("ads.example")).reject == Reject("default")
    assert r.decide(q("quiet.example")).reject == Reject("drop")
    https = r.decide(q("any.example", 65))
    assert https.predefined == Predefined("NOERROR") and https.server is None
    fixed = r.decide(q("fixed.example"))
    assert fixed.predefined == Predefined(
        "NOERROR", ("fixed.example. IN A 203.0.113.1",), ("example. IN NS ns.example.",), ()
    )
    assert isinstance(fixed.action, Predefined)


def test_logical_and_invert() -> None:
    r = router([{
        "type": "logical", "mode": "and", "server": "local",
        "rules": [{"domain_suffix": "corp.example"}, {"query_type": "A", "invert": True}],
    }])  # fmt: skip
    assert r.decide(q("git.corp.example", 28)).server == "local"
    assert r.decide(q("git.corp.example", 1)).server == "remote"


def test_inbound_and_outbound_items() -> None:
    r = router([
        {"outbound": "proxy", "server": "remote"},
        {"outbound": "any", "server": "local"},
        {"inbound": "tun-in", "server": "fake"},
    ], final="local")  # fmt: skip
    assert r.decide(q("a.example", outbound="proxy")).server == "remote"
    assert r.decide(q("a.example", outbound="direct")).rule_index == 1
    assert r.decide(q("a.example", inbound="tun-in")).server == "fake"
    assert r.decide(q("a.example")).rule_index is None


def test_route_options_gather_until_a_final_action() -> None:
    r = router([
        {"domain_suffix": "example", "action": "route-options", "disable_cache": True,
         "strategy": "ipv4_only"},
        {"domain": "v6.example", "action": "route-options", "strategy": "ipv6_only"},
        {"domain": "v6.example", "server": "local", "rewrite_ttl": 30},
    ])  # fmt: skip
    d = r.decide(q("v6.example"))
    assert (d.server, d.disable_cache, d.strategy) == ("local", True, "ipv6_only")
    assert d.rewrite_ttl == 30
    assert [i for i, _ in d.trace] == [0, 1, 2]
    final = r.decide(q("a.example"))
    assert (final.server, final.rule_index, final.disable_cache) == ("remote", None, True)
    assert final.action == DnsRoute("remote", True, None, "ipv4_only")


def test_explain() -> None:
    r = router([{"domain_suffix": "lan", "server": "local"}])
    e = r.explain(q("nas.lan"))
    assert e.decision.server == "local" and "rule 0 (route(local))" in e.reasons[0]
    assert "dns.final 'remote'" in r.explain(q("x.example")).reasons[-1]


def test_rule_sets_are_shared_with_route() -> None:
    data = {
        "dns": {"servers": SERVERS, "rules": [{"rule_set": "cn", "server": "local"}]},
        "route": {"rule_set": [{"type": "inline", "tag": "cn", "rules": []}]},
    }
    compiled, diagnostics = compile_dns_router(
        data, rule_sets={"cn": [{"domain_suffix": "cn"}]}
    )
    assert compiled is not None and diagnostics == []
    assert compiled.decide(q("www.example.cn")).server == "local"


@pytest.mark.parametrize(
    ("rule", "path", "text"),
    [
        ({"server": "nowhere"}, ("dns", "rules", 0, "server"), "unknown DNS server 'nowhere'"),
        ({"domain": "x", "action": "route"}, ("dns", "rules", 0, "server"), "no server"),
        ({"action": "reject", "method": "reply"}, ("dns", "rules", 0, "method"), "reject method"),
        ({"action": "predefined", "rcode": "BOGUS"}, ("dns", "rules", 0, "rcode"), "response code"),
        ({"action": "predefined", "answer": ["ok. IN A 203.0.113.1", "bad. IN A 1"]},
         ("dns", "rules", 0, "answer", 1), "zone-file"),
        ({"action": "predefined", "extra": "bad. IN AAAA x"},
         ("dns", "rules", 0, "extra"), "zone-file"),
        ({"action": "hijack-dns"}, ("dns", "rules", 0, "action"), "not a DNS rule action"),
        ({"query_type": "BOGUS", "server": "local"}, ("dns", "rules", 0, "query_type", 0),
         "query type"),
        ({"server": "local", "strategy": "v4"}, ("dns", "rules", 0, "strategy"), "strategy"),
    ],
)  # fmt: skip
def test_compile_errors_have_paths(rule: dict[str, Any], path: tuple[Any, ...], text: str) -> None:
    compiled, diagnostics = compile_dns_router({"dns": {"servers": SERVERS, "rules": [rule]}})
    assert compiled is None
    [error] = [d for d in diagnostics if d.severity == "error"]
    assert error.path == path and text in error.message


def test_compile_final_and_catch_all() -> None:
    bad, diagnostics = compile_dns_router({"dns": {"servers": SERVERS, "final": "gone"}})
    assert bad is None and diagnostics[0].path == ("dns", "final")
    r, diagnostics = compile_dns_router({"dns": {"servers": SERVERS, "final": "local", "rules": [
        {"server": "remote"}, {"domain": "x", "server": "local"}]}})  # fmt: skip
    assert r is not None
    assert [(d.severity, d.path) for d in diagnostics] == [
        ("warning", ("dns", "rules", 1)), ("warning", ("dns", "final"))]  # fmt: skip
    assert compile_dns_router({}) == (None, [])
    assert compile_dns_router({"dns": {}}) == (None, [])


# -- the legacy address form -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "typed"),
    [
        ("1.1.1.1", {"type": "udp", "server": "1.1.1.1"}),
        ("8.8.8.8:5353", {"type": "udp", "server": "8.8.8.8", "server_port": 5353}),
        ("udp://9.9.9.9:53", {"type": "udp", "server": "9.9.9.9"}),
        ("tcp://[2001:db8::53]:5353", {"type": "tcp", "server": "2001:db8::53",
                                       "server_port": 5353}),
        ("tls://1.1.1.1", {"type": "tls", "server": "1.1.1.1"}),
        ("tls://dns.example:8853", {"type": "tls", "server": "dns.example", "server_port": 8853}),
        ("https://dns.example/dns-query", {"type": "https", "server": "dns.example"}),
        ("https://dns.example:8443/q", {"type": "https", "server": "dns.example",
                                        "server_port": 8443, "path": "/q"}),
        ("2001:db8::1", {"type": "udp", "server": "2001:db8::1"}),
        ("local", {"type": "local"}),
        ("fakeip", {"type": "fakeip"}),
    ],
)  # fmt: skip
def test_legacy_server(address: str, typed: dict[str, Any]) -> None:
    assert legacy_server({"tag": "t", "address": address}) == {**typed, "tag": "t"}


@pytest.mark.parametrize(
    "address", ["quic://1.1.1.1", "dhcp://auto", "rcode://refused", "tls://1.1.1.1/x",
                "udp://1.1.1.1:0", "tcp://[::1", "tls://:853"],
)  # fmt: skip
def test_legacy_server_refuses(address: str) -> None:
    with pytest.raises(ValueError):
        legacy_server({"tag": "t", "address": address})


def test_legacy_servers_become_typed_options() -> None:
    opts = build_options({"dns": {"servers": [
        {"tag": "a", "address": "tls://1.1.1.1", "detour": "proxy"},
        {"tag": "b", "address": "https://dns.example/q"},
        {"tag": "c", "address": "fakeip"},
    ]}})  # fmt: skip
    a, b, c = opts.dns.servers
    assert a == TLSDNSServerOptions(tag="a", server="1.1.1.1", detour="proxy")
    assert b == HTTPSDNSServerOptions(tag="b", server="dns.example", path="/q")
    assert isinstance(c, FakeIPDNSServerOptions)
    with pytest.raises(ConfigError) as e:
        build_options({"dns": {"servers": [{"tag": "x", "address": "quic://1.1.1.1"}]}})
    assert e.value.diagnostics[0].path == ("dns", "servers", 0, "address")
    assert typed_text({"tag": "a", "address": "tls://1.1.1.1"}) == "{type: tls, server: 1.1.1.1}"


# -- through ztun check ------------------------------------------------------------------------

CONFIG = """\
outbounds:
  - {type: direct, tag: direct}
dns:
  servers:
    - {type: local, tag: local}
    - tag: secure
      address: tls://1.1.1.1
    - {tag: odd, address: "quic://1.1.1.1"}
  rules:
    - {domain_suffix: lan, server: local}
    - {domain_suffix: example, server: secure, outbound: direct}
    - {query_type: HTTPS, action: predefined, answer: "x. IN A 1"}
"""


def test_check_places_dns_diagnostics(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)
    result = check_file(path)
    found = {(d.severity, d.mark.line if d.mark else None): d.message for d in result.diagnostics}
    assert found[("warning", 7)] == (
        "dns.servers[1].address: the address: form is read as {type: tls, server: 1.1.1.1} "
        "(write that; the address form is deprecated in sing-box)"
    )
    assert "'quic://' servers are not supported" in found[("error", 8)]
    assert "zone-file" in found[("error", 12)]
    assert result.dns_router is None


def test_check_builds_the_dns_router(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.replace('    - {tag: odd, address: "quic://1.1.1.1"}\n', "").replace(
        ', answer: "x. IN A 1"', ""))  # fmt: skip
    result = check_file(path)
    assert result.errors == []
    assert result.dns_router is not None
    assert result.dns_router.decide(q("www.example", outbound="direct")).server == "secure"
    assert result.dns_router.server_types["secure"] == "tls"
    assert result.options is not None
    assert isinstance(result.options.dns.servers[1], TLSDNSServerOptions)


def test_check_warns_on_unknown_dns_rule_outbound(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.replace("outbound: direct", "outbound: [direct, proxx]").replace(
        '    - {tag: odd, address: "quic://1.1.1.1"}\n', "").replace(
        ', answer: "x. IN A 1"', ""))  # fmt: skip
    result = check_file(path)
    assert result.errors == []
    assert any("no outbound tagged 'proxx'" in w.message for w in result.warnings)


# -- any shape ---------------------------------------------------------------------------------

_KEYS = ["type", "tag", "rules", "server", "action", "method", "rcode", "answer", "ns", "extra",
         "domain", "query_type", "outbound", "mode", "invert", "address", "final", "servers",
         "strategy", "rewrite_ttl", "disable_cache"]  # fmt: skip
_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000),
    st.sampled_from(["local", "logical", "and", "reject", "predefined", "route-options", "drop",
                     "NXDOMAIN", "x. IN A 203.0.113.1", "tls://1.1.1.1", "quic://x", "A"]),
)  # fmt: skip
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(_VALUES)
def test_compile_dns_router_never_raises(dns: Any) -> None:
    compiled, diagnostics = compile_dns_router({"dns": dns})
    if any(d.severity == "error" for d in diagnostics):
        assert compiled is None
    if compiled is not None:
        compiled.decide(q("a.example"))
