"""The items on a flow's local owner: `process_name`, `process_path`, `process_path_regex`,
`user`, `user_id` (sing-box's meaning; an unknown owner matches none of them), and which
compiled routers ask their inbounds to look owners up."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ztun.dns.router import DnsRouter
from ztun.route.compile import compile_dns_router, compile_router
from ztun.route.metadata import FlowMeta
from ztun.route.ruleset import parse_source

OUTBOUNDS = [{"type": "direct", "tag": "direct"}, {"type": "block", "tag": "block"}]
CURL = FlowMeta(process_name="curl", process_path="/usr/bin/curl", process_user="alice",
                process_user_id=1000)  # fmt: skip
UNKNOWN = FlowMeta()


def router(*rules: dict[str, Any]) -> Any:
    data = {"outbounds": OUTBOUNDS, "route": {"rules": list(rules), "final": "direct"}}
    r, diagnostics = compile_router(data)
    assert r is not None, diagnostics
    return r


def outbound(r: Any, meta: FlowMeta) -> str:
    return str(r.decide(meta).action.outbound)


def test_each_item_matches_its_field_and_unknown_matches_none() -> None:
    for rule in ({"process_name": ["curl", "wget"]}, {"process_path": "/usr/bin/curl"},
                 {"process_path_regex": ["^/usr/(s)?bin/"]}, {"user": ["alice"]},
                 {"user_id": [1000]}):  # fmt: skip
        r = router({**rule, "outbound": "block"})
        assert outbound(r, CURL) == "block", rule
        assert outbound(r, UNKNOWN) == "direct", rule
        inverted = router({**rule, "invert": True, "outbound": "block"})
        assert outbound(inverted, UNKNOWN) == "block", rule  # sing-box: invert of no match


def test_items_and_with_each_other_and_the_rest() -> None:
    r = router({"process_name": "curl", "user_id": 0, "outbound": "block"})
    assert outbound(r, CURL) == "direct"  # curl, but uid 1000
    r = router({"process_name": "curl", "network": "udp", "outbound": "block"})
    assert outbound(r, CURL) == "direct"


def test_owner_needs_say_whether_a_lookup_is_worth_it() -> None:
    assert router({"ip_cidr": "203.0.113.0/24", "outbound": "block"}).owner_needs == frozenset()
    assert router({"user": "alice", "outbound": "block"}).owner_needs == {"user"}
    assert router({"user_id": 0, "outbound": "block"}).owner_needs == {"user"}
    assert router({"process_path_regex": "x", "outbound": "block"}).owner_needs == {"process"}
    nested = {"type": "logical", "mode": "or", "outbound": "block",
              "rules": [{"domain": "a.example"}, {"process_name": "curl"}]}  # fmt: skip
    assert router(nested).owner_needs == {"process"}
    r, _ = compile_router({"outbounds": OUTBOUNDS, "route": {
        "rule_set": [{"type": "inline", "tag": "s", "rules": [{"process_name": "curl"}]}],
        "rules": [{"rule_set": "s", "outbound": "block"}]}},
        rule_sets={"s": [{"process_name": "curl"}]})  # fmt: skip
    assert r is not None and r.owner_needs == {"process"}
    assert outbound(r, CURL) == "block" and outbound(r, UNKNOWN) == "direct"


def test_dns_rules_take_the_items() -> None:
    data = {"dns": {"servers": [{"type": "local", "tag": "a"}, {"type": "local", "tag": "b"}],
                    "rules": [{"user_id": 1000, "server": "b"}]}}  # fmt: skip
    r, diagnostics = compile_dns_router(data)
    assert isinstance(r, DnsRouter), diagnostics
    assert r.owner_needs == {"user"}
    assert r.decide(CURL.for_query("x.example", 1)).server == "b"
    assert r.decide(UNKNOWN.for_query("x.example", 1)).server == "a"


def test_bad_values_are_errors_with_paths() -> None:
    r, diagnostics = compile_router({"outbounds": OUTBOUNDS, "route": {"rules": [
        {"user_id": [-1, "x"], "process_path_regex": "(", "outbound": "block"}]}})  # fmt: skip
    assert r is None
    paths = {d.path for d in diagnostics}
    assert ("route", "rules", 0, "user_id", 0) in paths
    assert ("route", "rules", 0, "user_id", 1) in paths
    assert ("route", "rules", 0, "process_path_regex", 0) in paths


def test_rule_set_files_take_process_items_but_not_users() -> None:
    parsed = parse_source('{"version": 2, "rules": [{"process_name": ["curl"], '
                          '"process_path_regex": "^/opt/"}]}')  # fmt: skip
    assert parsed.rules[0]["process_name"] == ["curl"]
    for field in ("user", "user_id", "package_name"):
        try:
            parse_source(f'{{"version": 2, "rules": [{{"{field}": "x"}}]}}')
        except Exception as exc:  # a RuleSetError naming the field
            assert field in str(exc)
        else:
            raise AssertionError(f"{field} accepted in a rule set")


def test_explain_names_the_owner() -> None:
    r = router({"process_path_regex": "/curl$", "user": "alice", "outbound": "block"})
    reasons = " ".join(r.explain(CURL).reasons)
    assert "process_path_regex '/curl$' matches '/usr/bin/curl'" in reasons
    assert "user alice" in reasons


@given(st.one_of(st.none(), st.text(max_size=30)), st.one_of(st.none(), st.integers(0, 2**32)))
def test_matches_naive_model(name: str | None, uid: int | None) -> None:
    r = router({"process_name": ["curl", "zt-blocked"], "outbound": "block"},
               {"user_id": [0, 65534], "outbound": "block"})  # fmt: skip
    meta = FlowMeta(process_name=name, process_user_id=uid)
    expected = name in ("curl", "zt-blocked") or uid in (0, 65534)
    assert (outbound(r, meta) == "block") == expected


def test_with_owner_keeps_every_other_field() -> None:
    import dataclasses
    import ipaddress

    meta = FlowMeta(network="udp", destination=ipaddress.ip_address("203.0.113.9"),
                    destination_port=53, domain="a.example", source=ipaddress.ip_address(
                        "198.18.0.1"), source_port=5, inbound="tun-in", protocol="dns",
                    resolved=(ipaddress.ip_address("203.0.113.1"),), user="u", query_type=1,
                    outbound="direct")  # fmt: skip
    want = dataclasses.replace(meta, process_name="c", process_path="/c", process_user="r",
                               process_user_id=0)  # fmt: skip
    assert meta.with_owner("c", "/c", "r", 0) == want
    assert len(dataclasses.fields(FlowMeta)) == 16  # a new field must be added to with_owner
