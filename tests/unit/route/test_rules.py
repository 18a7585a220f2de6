"""Rule semantics (groups, invert, logical rules, rule sets) and the router's walk."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.errors import ConfigError
from ztun.route.action import HijackDNS, Reject, Route, Sniff
from ztun.route.compile import compile_headless_rules, compile_router
from ztun.route.metadata import FlowMeta

ip = ipaddress.ip_address
OUTBOUNDS = [{"type": "direct", "tag": "direct"}, {"type": "socks", "tag": "proxy"},
             {"type": "block", "tag": "block"}]  # fmt: skip


def router(rules: list[dict[str, Any]], **route: Any) -> Any:
    r, diagnostics = compile_router(
        {"outbounds": OUTBOUNDS, "route": {"rules": rules, **route}},
        rule_sets=route.pop("sets", None),
    )
    assert r is not None, diagnostics
    return r


def decide(rules: list[dict[str, Any]], meta: FlowMeta, **kw: Any) -> Any:
    return router(rules, **kw).decide_all(meta)


# -- a naive model of a default rule without rule sets: OR within groups, AND across --------

GROUPS = {
    "domain": "dst", "domain_suffix": "dst", "ip_cidr": "dst",
    "port": "dport", "source_ip_cidr": "src", "source_port": "sport", "network": "other",
}  # fmt: skip


def naive(rule: dict[str, Any], meta: FlowMeta) -> bool:
    def hit(field: str, value: Any) -> bool:
        if field == "domain":
            return meta.domain == value
        if field == "domain_suffix":
            d = meta.domain or ""
            return d == value or d.endswith("." + value)
        if field == "ip_cidr":
            return meta.destination is not None and meta.destination in ipaddress.ip_network(value)
        if field == "source_ip_cidr":
            return meta.source is not None and meta.source in ipaddress.ip_network(value)
        if field == "port":
            return meta.destination_port == value
        if field == "source_port":
            return meta.source_port == value
        return meta.network == value

    groups: dict[str, bool] = {}
    other_ok = True
    for field, values in rule.items():
        if field == "invert":
            continue
        ok = any(hit(field, v) for v in values)
        group = GROUPS[field]
        if group == "other":
            other_ok = other_ok and ok
        else:
            groups[group] = groups.get(group, False) or ok
    result = other_ok and all(groups.values())
    return result != rule.get("invert", False)


FIELD_VALUES = {
    "domain": st.sampled_from(["a.example", "b.example"]),
    "domain_suffix": st.sampled_from(["example", "a.example"]),
    "ip_cidr": st.sampled_from(["198.51.100.0/24", "203.0.113.0/25"]),
    "port": st.sampled_from([80, 443]),
    "source_ip_cidr": st.sampled_from(["198.51.100.0/26", "2001:db8::/32"]),
    "source_port": st.sampled_from([1000, 2000]),
    "network": st.sampled_from(["tcp", "udp"]),
}
RULES = st.fixed_dictionaries(
    {},
    optional={k: st.lists(v, min_size=1, max_size=2) for k, v in FIELD_VALUES.items()}
    | {"invert": st.booleans()},
).filter(lambda r: any(k != "invert" for k in r))
METAS = st.builds(
    FlowMeta,
    network=st.sampled_from(["tcp", "udp"]),
    destination=st.sampled_from([None, ip("198.51.100.9"), ip("203.0.113.200")]),
    destination_port=st.sampled_from([80, 443, 8080]),
    domain=st.sampled_from([None, "a.example", "x.a.example", "b.example", "other.test"]),
    source=st.sampled_from([None, ip("198.51.100.3"), ip("2001:db8::5")]),
    source_port=st.sampled_from([1000, 2000, 3000]),
)


@settings(max_examples=400)
@given(RULES, METAS)
def test_default_rule_matches_naive_model(rule: dict[str, Any], meta: FlowMeta) -> None:
    matcher = compile_headless_rules([rule])
    assert matcher.match(meta) is naive(rule, meta)


def test_destination_fields_are_ored_then_anded_with_port() -> None:
    rules = [{"domain_suffix": ["example"], "ip_cidr": ["198.51.100.0/24"], "port": [443],
              "outbound": "proxy"}]  # fmt: skip
    assert decide(rules, FlowMeta(domain="a.example", destination_port=443)).outbound == "proxy"
    meta = FlowMeta(destination=ip("198.51.100.1"), destination_port=443)
    assert decide(rules, meta).outbound == "proxy"
    meta = FlowMeta(destination=ip("198.51.100.1"), destination_port=80)
    assert decide(rules, meta).outbound == "direct"


def test_first_match_wins_and_final() -> None:
    rules = [{"port": [443], "outbound": "proxy"}, {"port": [443], "outbound": "block"}]
    assert decide(rules, FlowMeta(destination_port=443)).rule_index == 0
    d = decide(rules, FlowMeta(destination_port=80), final="block")
    assert d.outbound == "block" and d.rule_index is None and d.rule == "final"
    # Without route.final the first outbound is the final one, as in sing-box.
    assert decide(rules, FlowMeta(destination_port=80)).outbound == "direct"


def test_logical_rules() -> None:
    rules = [
        {"type": "logical", "mode": "and", "rules": [{"port": [53]}, {"network": ["udp"]}],
         "outbound": "proxy"},
        {"type": "logical", "mode": "or", "invert": True,
         "rules": [{"port": [80]}, {"port": [443]}], "outbound": "block"},
    ]  # fmt: skip
    assert decide(rules, FlowMeta(network="udp", destination_port=53)).outbound == "proxy"
    assert decide(rules, FlowMeta(network="tcp", destination_port=53)).outbound == "block"
    assert decide(rules, FlowMeta(network="tcp", destination_port=443)).outbound == "direct"


def test_set_of_one_rule_merges_into_the_outer_groups() -> None:
    # sing-box 1.14.4: a one-rule set adds its entries to the naming rule's groups.
    sets = {"one": [{"ip_cidr": ["203.0.113.0/24"], "port": [22]}]}
    rules = [{"ip_cidr": ["198.51.100.0/24"], "port": [80], "rule_set": ["one"],
              "outbound": "proxy"}]  # fmt: skip
    r = router(rules, sets=sets)
    for dest, port, want in [
        ("198.51.100.1", 80, "proxy"), ("198.51.100.1", 22, "proxy"),
        ("203.0.113.1", 80, "proxy"), ("203.0.113.1", 22, "proxy"),
        ("203.0.113.1", 443, "direct"), ("192.0.2.1", 80, "direct"),
    ]:  # fmt: skip
        meta = FlowMeta(destination=ip(dest), destination_port=port)
        assert r.decide_all(meta).outbound == want, (dest, port)


def test_set_of_several_rules_is_one_condition() -> None:
    # ...while a set of two or more rules is matched rule by rule, alone, and ANDed.
    sets = {"s": [{"domain": ["b.example"]}, {"ip_cidr": ["203.0.113.0/24"], "port": [22]}]}
    r = router([{"port": [22, 80], "rule_set": ["s"], "outbound": "proxy"}], sets=sets)
    assert r.decide_all(FlowMeta(domain="b.example", destination_port=80)).outbound == "proxy"
    meta = FlowMeta(destination=ip("203.0.113.1"), destination_port=22)
    assert r.decide_all(meta).outbound == "proxy"
    meta = FlowMeta(destination=ip("203.0.113.1"), destination_port=80)
    assert r.decide_all(meta).outbound == "direct"  # the set's own port is not met
    assert r.decide_all(FlowMeta(domain="b.example", destination_port=443)).outbound == "direct"
    # The outer rule's own address fields do not stand in for the set.
    r = router([{"domain": ["a.example"], "rule_set": ["s"], "outbound": "proxy"}], sets=sets)
    assert r.decide_all(FlowMeta(domain="a.example")).outbound == "direct"


def test_rule_set_ip_cidr_match_source() -> None:
    sets = {"lan": [{"ip_cidr": ["198.51.100.0/24"]}]}
    rules = [{"rule_set": ["lan"], "rule_set_ip_cidr_match_source": True, "outbound": "proxy"}]
    r = router(rules, sets=sets)
    assert r.decide_all(FlowMeta(source=ip("198.51.100.4"))).outbound == "proxy"
    assert r.decide_all(FlowMeta(destination=ip("198.51.100.4"))).outbound == "direct"


def test_actions_and_sniff_resume() -> None:
    rules = [
        {"action": "route-options", "udp_timeout": "30s"},
        {"action": "sniff", "sniffer": ["tls"], "timeout": "100ms"},
        {"protocol": ["dns"], "action": "hijack-dns"},
        {"domain": ["blocked.example"], "action": "reject", "method": "drop"},
        {"port": [443], "outbound": "proxy", "override_port": 8443},
    ]
    r = router(rules)
    first = r.decide(FlowMeta(destination_port=443))
    assert isinstance(first.action, Sniff) and first.action.sniffers == ("tls",)
    assert first.action.timeout_ms == 100 and first.resume_at == 2
    assert first.options == {"udp_timeout": 30.0}
    sniffed = FlowMeta(destination_port=443, domain="blocked.example", protocol="tls")
    second = r.decide(sniffed, first.resume_at, first.options)
    assert second.action == Reject("drop") and second.rule_index == 3
    assert isinstance(r.decide_all(FlowMeta(protocol="dns")).action, HijackDNS)
    final = r.decide_all(FlowMeta(destination_port=443))
    assert final.action == Route("proxy", (("override_port", 8443),))
    assert final.options == {"udp_timeout": 30.0, "override_port": 8443}


def test_explain_names_the_matching_entries() -> None:
    sets = {"ads": [{"domain_suffix": ["ads.example"]}]}
    rules = [
        {"rule_set": ["ads"], "outbound": "block"},
        {"domain_keyword": ["video"], "port_range": ["400:500"], "outbound": "proxy"},
    ]
    r = router(rules, sets=sets)
    e = r.explain(FlowMeta(domain="x.ads.example"))
    assert "rule_set 'ads' rule 0" in e.reasons[0] and "ads.example" in e.reasons[0]
    e = r.explain(FlowMeta(domain="video.example", destination_port=443))
    assert "domain_keyword 'video'" in e.reasons[0] and "port_range '400:500'" in e.reasons[0]
    e = r.explain(FlowMeta(domain="none.example"))
    assert "route.final" in e.reasons[-1]


def diagnostics_for(rules: list[dict[str, Any]], **route: Any) -> list[tuple[str, tuple]]:
    _r, ds = compile_router({"outbounds": OUTBOUNDS, "route": {"rules": rules, **route}})
    return [(d.message, d.path) for d in ds]


def test_compile_errors_carry_paths() -> None:
    ds = diagnostics_for([
        {"ip_cidr": ["198.51.100.0/24", "300.1.1.1/8"], "outbound": "proxy"},
        {"domain_regex": ["(unclosed"], "outbound": "proxy"},
        {"port_range": ["90:80"], "outbound": "proxy"},
        {"port": [70000], "outbound": "proxy"},
        {"domain": ["a.example"]},
        {"domain": ["a.example"], "outbound": "nowhere"},
        {"rule_set": ["missing"], "outbound": "proxy"},
        {"geoip": ["cn"], "outbound": "proxy"},
        {"action": "teleport"},
        {"type": "logical", "mode": "xor", "rules": [{"port": [1]}], "outbound": "proxy"},
    ])  # fmt: skip
    paths = [p for _m, p in ds]
    assert ("route", "rules", 0, "ip_cidr", 1) in paths
    assert ("route", "rules", 1, "domain_regex", 0) in paths
    assert ("route", "rules", 2, "port_range", 0) in paths
    assert ("route", "rules", 3, "port", 0) in paths
    assert ("route", "rules", 4) in paths
    assert ("route", "rules", 5, "outbound") in paths
    assert ("route", "rules", 6, "rule_set", 0) in paths
    assert ("route", "rules", 7, "geoip") in paths
    assert ("route", "rules", 8, "action") in paths
    assert ("route", "rules", 9, "mode") in paths


def test_rules_after_a_catch_all_are_reported() -> None:
    ds = diagnostics_for(
        [{"outbound": "proxy"}, {"port": [80], "outbound": "direct"}], final="direct"
    )
    assert ("this rule can never match: rule 0 before it matches every flow",
            ("route", "rules", 1)) in ds  # fmt: skip
    assert any(p == ("route", "final") for _m, p in ds)
    # A non-final catch-all (sniff) hides nothing.
    assert diagnostics_for([{"action": "sniff"}, {"port": [80], "outbound": "direct"}]) == []


def test_headless_compile_raises_config_error() -> None:
    with pytest.raises(ConfigError):
        compile_headless_rules([{"ip_cidr": ["nope"]}])
