"""`clash_mode`: a rule that holds while the Clash API's mode is its value (sing-box's field),
compared case-insensitively; the API switches the mode at run time through `Router.mode`."""

from __future__ import annotations

from typing import Any

from ztun.route.compile import compile_router
from ztun.route.items import ClashMode
from ztun.route.metadata import FlowMeta

META = FlowMeta(network="tcp", domain="www.example.com", destination_port=443)


def router(default_mode: str | None = None, **extra: Any) -> Any:
    data: dict[str, Any] = {
        "outbounds": [{"type": "direct", "tag": "direct"}, {"type": "block", "tag": "block"},
                      {"type": "socks", "tag": "proxy", "server": "198.51.100.1",
                       "server_port": 1080}],
        "route": {"rules": [
            {"clash_mode": "Direct", "outbound": "direct"},
            {"clash_mode": "global", "outbound": "proxy"},
            {"type": "logical", "mode": "and", "rules": [
                {"clash_mode": "Block"}, {"domain_suffix": "example.com"}], "outbound": "block"},
        ], "final": "proxy"},
    }  # fmt: skip
    if default_mode is not None:
        data["experimental"] = {"clash_api": {"default_mode": default_mode}}
    found, diagnostics = compile_router(data)
    assert found is not None, diagnostics
    return found


def test_the_default_mode_is_rule_and_no_mode_rule_holds() -> None:
    r = router()
    assert r.mode.current == "Rule"
    assert r.mode.known == ["Rule", "Direct", "global", "Block"]
    assert r.decide(META).rule_index is None


def test_switching_the_mode_switches_the_rule() -> None:
    r = router()
    assert r.mode.set("direct") == "Direct"  # spelt as the rule spells it
    assert r.decide(META).action.outbound == "direct"
    assert r.mode.set("GLOBAL") == "global"
    assert r.decide(META).action.outbound == "proxy"
    assert r.mode.set("block") == "Block"
    assert r.decide(META).action.outbound == "block"
    other = FlowMeta(network="tcp", domain="other.test", destination_port=443)
    assert r.decide(other).rule_index is None  # the logical rule needs both


def test_an_unknown_mode_is_refused_and_changes_nothing() -> None:
    r = router()
    assert r.mode.set("Nowhere") is None
    assert r.mode.current == "Rule"


def test_default_mode_from_the_config() -> None:
    r = router("direct")
    assert r.mode.current == "direct"
    assert r.decide(META).action.outbound == "direct"
    assert r.mode.known[0] == "direct" and "Direct" not in r.mode.known


def test_explain_names_the_mode() -> None:
    r = router("Global")
    explanation = r.explain(META)
    assert any("clash_mode global" in reason.lower() for reason in explanation.reasons)


def test_the_cell_alone() -> None:
    cell = ClashMode("Rule", ["Global", "global", "Direct"])
    assert cell.known == ["Rule", "Global", "Direct"]


def test_dns_rules_read_the_same_mode_as_route_rules(tmp_path: Any) -> None:
    """`clash_mode` in dns.rules (sing-box has it there): one switch moves both routers."""
    from ztun.check import load_and_compile

    config = tmp_path / "c.yaml"
    config.write_text(
        "inbounds: [{type: mixed, tag: m, listen_port: 2080}]\n"
        "outbounds: [{type: direct, tag: direct}, {type: block, tag: block}]\n"
        "dns:\n"
        "  servers: [{type: udp, tag: a, server: 198.51.100.53},\n"
        "            {type: udp, tag: b, server: 198.51.100.54}]\n"
        "  rules: [{clash_mode: Global, server: b},\n"
        "          {type: logical, mode: and, rules: [{clash_mode: Block},\n"
        "           {domain_suffix: example.com}], action: reject}]\n"
        "route: {rules: [{clash_mode: Direct, outbound: direct}]}\n"
    )
    compiled = load_and_compile(config, offline=True)
    dns, mode = compiled.dns_router, compiled.router.mode
    assert dns is not None and compiled.options.dns.rules[0].clash_mode == "Global"
    query = FlowMeta(network="udp", domain="www.example.com")
    # the DNS rules' modes are modes the API offers too
    assert mode.known == ["Rule", "Direct", "Global", "Block"]
    assert dns.decide(query).server == "a"
    assert mode.set("global") == "Global"
    assert dns.decide(query).server == "b"
    mode.set("BLOCK")
    assert dns.decide(query).reject is not None
    mode.set("Rule")
    assert dns.decide(query).server == "a"
