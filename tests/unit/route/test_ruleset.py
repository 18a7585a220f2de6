"""Rule-set parsers: sing-box source JSON, Clash rule providers, plain domain lists."""

from __future__ import annotations

import contextlib
import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztun.errors import ZtunError
from ztun.route.ruleset import (
    ParsedRuleSet,
    RuleSetError,
    normalize_headless_rules,
    parse_clash,
    parse_domains,
    parse_rule_set,
    parse_source,
)

# -- sing-box source ----------------------------------------------------------------------------


def test_source_listables_become_lists() -> None:
    text = json.dumps({
        "version": 3,
        "rules": [
            {"domain": "a.com", "domain_suffix": [".b.com", "c.com"], "ip_cidr": "10.0.0.0/8"},
            {"port": 443, "network": "tcp", "ip_is_private": True},
        ],
    })  # fmt: skip
    parsed = parse_source(text)
    assert parsed.rules == [
        {"domain": ["a.com"], "domain_suffix": [".b.com", "c.com"], "ip_cidr": ["10.0.0.0/8"]},
        {"port": [443], "network": ["tcp"], "ip_is_private": True},
    ]
    assert parsed.warnings == []


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5])
def test_source_versions_read_alike(version: int) -> None:
    text = json.dumps({"version": version, "rules": [{"domain_suffix": "a.com"}]})
    assert parse_source(text).rules == [{"domain_suffix": ["a.com"]}]


def test_source_logical_rules_nest() -> None:
    text = json.dumps({
        "version": 2,
        "rules": [{
            "type": "logical", "mode": "and", "invert": True,
            "rules": [{"domain": "a.com"}, {"type": "logical", "mode": "or",
                                            "rules": [{"port": [80, 443]}]}],
        }],
    })  # fmt: skip
    assert parse_source(text).rules == [{
        "type": "logical", "mode": "and", "invert": True,
        "rules": [{"domain": ["a.com"]},
                  {"type": "logical", "mode": "or", "rules": [{"port": [80, 443]}]}],
    }]  # fmt: skip


def test_source_accepts_comments_and_trailing_commas() -> None:
    text = """// sing-box tolerates these
    {
      "version": 2, # hash comment
      /* block
         comment */
      "rules": [
        {"domain": ["a.com", "b//c.com", "d#e.com",],},
      ],
    }
    """
    assert parse_source(text).rules == [{"domain": ["a.com", "b//c.com", "d#e.com"]}]


def test_source_type_default_and_null_fields() -> None:
    text = '{"version": 1, "rules": [{"type": "default", "domain": "a.com", "ip_cidr": null}]}'
    assert parse_source(text).rules == [{"domain": ["a.com"]}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2", "line 1: not valid JSON"),
        ("[]", "JSON object"),
        ('{"rules": []}', "missing 'version'"),
        ('{"version": "2", "rules": []}', "'version' must be an integer"),
        ('{"version": 6, "rules": []}', "unknown rule-set version 6"),
        ('{"version": 0, "rules": []}', "unknown rule-set version 0"),
        ('{"version": 2, "rules": [], "extra": 1}', "unknown top-level field 'extra'"),
        ('{"version": 2, "rules": {}}', "'rules' must be a list"),
        ('{"version": 2, "rules": [{}]}', "rules[0]: the rule has no match fields"),
        ('{"version": 2, "rules": [{"invert": true}]}', "no match fields"),
        ('{"version": 2, "rules": [{"domain": []}]}', "no match fields"),
        ('{"version": 2, "rules": [{"bogus": 1}]}', "rules[0].bogus: unknown field 'bogus'"),
        ('{"version": 2, "rules": [{"Domain": "a"}]}', "did you mean 'domain'"),
        ('{"version": 2, "rules": [{"wifi_ssid": "x"}]}', "'wifi_ssid' is not supported"),
        ('{"version": 2, "rules": [{"outbound": "x"}]}', "route-rule field"),
        ('{"version": 2, "rules": [{"rule_set": "x"}]}', "route-rule field"),
        ('{"version": 2, "rules": [{"domain": ""}]}', "rules[0].domain: empty strings"),
        ('{"version": 2, "rules": [{"domain": [null]}]}', "rules[0].domain[0]: must be a string"),
        ('{"version": 2, "rules": [{"domain": 5}]}', "must be a string"),
        ('{"version": 2, "rules": [{"port": "80"}]}', 'rules[0].port: "80" is not a port'),
        ('{"version": 2, "rules": [{"port": 70000}]}', "not a port"),
        ('{"version": 2, "rules": [{"port": true}]}', "not a port"),
        ('{"version": 2, "rules": [{"ip_cidr": ["1.2.3.4/33"]}]}', "ip_cidr[0]: '1.2.3.4/33'"),
        ('{"version": 2, "rules": [{"network": "sctp"}]}', "not a network"),
        ('{"version": 2, "rules": [{"invert": "yes", "domain": "a"}]}', "true or false"),
        ('{"version": 2, "rules": [{"ip_version": 5}]}', "4 or 6"),
        ('{"version": 2, "rules": [{"type": "weird"}]}', "unknown rule type"),
        ('{"version": 2, "rules": [{"type": "logical", "mode": "xor", '
         '"rules": [{"domain": "a"}]}]}', "not a logical mode"),
        ('{"version": 2, "rules": [{"type": "logical", "mode": "and", "rules": []}]}',
         "non-empty list"),
        ('{"version": 2, "rules": [{"type": "logical", "mode": "and", "domain": "a", '
         '"rules": [{"domain": "a"}]}]}', "unknown field in a logical rule"),
        ('{"version": 2, "rules": [5]}', "rules[0]: a rule must be a JSON object"),
    ],
)  # fmt: skip
def test_source_errors(text: str, message: str) -> None:
    with pytest.raises(RuleSetError) as info:
        parse_source(text)
    assert message in str(info.value)


def test_source_error_has_json_line() -> None:
    with pytest.raises(RuleSetError) as info:
        parse_source('{\n "version": 2,\n "rules": [\n  {"domain": "a" "b"}\n ]\n}')
    assert info.value.line == 4


def test_source_warns_about_upper_case_entries() -> None:
    parsed = parse_source('{"version": 2, "rules": [{"domain_suffix": "Example.COM"}]}')
    assert parsed.rules == [{"domain_suffix": ["Example.COM"]}]
    assert len(parsed.warnings) == 1 and "sing-box never matches it" in parsed.warnings[0]


def test_source_empty_rules_warn() -> None:
    assert parse_source('{"version": 2, "rules": []}').warnings
    assert parse_source('{"version": 2}').rules == []


def test_source_deep_nesting_is_an_error_not_a_crash() -> None:
    rule: dict = {"domain": "a.com"}
    for _ in range(40):
        rule = {"type": "logical", "mode": "and", "rules": [rule]}
    with pytest.raises(RuleSetError, match="nested"):
        parse_source(json.dumps({"version": 2, "rules": [rule]}))
    with pytest.raises(RuleSetError):
        parse_source("[" * 100_000)


def _escaped_quotes(n: int) -> list[str]:
    """Lines of n escaped quotes: inside a string (valid), and bare (an unterminated string)."""
    return [
        '{"version": 3, // c\n "rules": [{"domain_regex": ["' + '\\"' * n + '"]}]}',
        '{"version": 3, # c\n "rules": [' + '\\"' * n + "]}",
        '{"version": 3, /* c */ "rules": ["' + '\\"' * n + "]}",
    ]


def _parse_time(text: str) -> float:
    start = time.perf_counter()
    with contextlib.suppress(RuleSetError):
        parse_source(text)
    return time.perf_counter() - start


def test_source_with_a_line_of_escaped_quotes_parses_fast() -> None:
    # Before the string token could end at the end of its line, each of these took minutes.
    texts = _escaped_quotes(200_000)
    assert parse_source(texts[0]).rules == [{"domain_regex": ['"' * 200_000]}]
    for text in texts:
        assert _parse_time(text) < 0.5  # ~15 ms measured


def test_source_parse_time_grows_linearly() -> None:
    # Doubling the input twice quadruples a linear parser's time and multiplies a quadratic
    # one's by 16; the bound (8: under 2.9x per doubling) leaves room for a busy machine. Sizes
    # start at 500k, past the allocator's step near 300k that makes smaller inputs look superlinear.
    for small, large in zip(_escaped_quotes(500_000), _escaped_quotes(2_000_000), strict=True):
        best_small = min(_parse_time(small) for _ in range(2))
        best_large = min(_parse_time(large) for _ in range(2))
        assert best_large < 8 * best_small, (best_small, best_large)


def test_normalize_headless_rules_reports_path() -> None:
    with pytest.raises(RuleSetError, match=r"inline\[1\]\.port"):
        normalize_headless_rules([{"domain": "a"}, {"port": -1}], where="inline")


# -- Clash --------------------------------------------------------------------------------------

DOMAIN_YAML = """\
# a comment
payload:
  - '+.google.com'
  - '.blogger.com'
  - '*.*.microsoft.com'
  - 'books.itunes.apple.com'
  - 'Upper.Example.ORG'
  - '+.stun.*.*'
"""


def test_clash_domain_yaml() -> None:
    parsed = parse_clash(DOMAIN_YAML, "domain")
    assert parsed.rules == [{
        "domain": ["books.itunes.apple.com", "upper.example.org"],
        "domain_suffix": ["google.com", ".blogger.com"],
        "domain_regex": [r"^[^.]+\.[^.]+\.microsoft\.com$",
                         r"^(?:.+\.)?stun\.[^.]+\.[^.]+$"],
    }]  # fmt: skip


def test_clash_domain_text_form_equals_yaml() -> None:
    text = "\n".join(
        line.strip().removeprefix("- ").strip("'")
        for line in DOMAIN_YAML.splitlines()
        if line.strip().startswith("-")
    )
    text = "# comment\n// premium comment\n\n" + text
    assert parse_clash(text, "domain").rules == parse_clash(DOMAIN_YAML, "domain").rules


@pytest.mark.parametrize(
    ("pattern", "matches", "misses"),
    [
        ("*.example.com", ["a.example.com"], ["example.com", "a.b.example.com"]),
        ("+.example.com", ["example.com", "a.b.example.com"], ["xexample.com"]),
        (".example.com", ["a.example.com", "a.b.example.com"], ["example.com"]),
        ("a.*.example.com", ["a.b.example.com"], ["a.example.com", "a.b.c.example.com"]),
        ("example.com", ["example.com"], ["a.example.com"]),
    ],
)
def test_clash_domain_wildcards_mean_what_mihomo_means(
    pattern: str, matches: list[str], misses: list[str]
) -> None:
    (rule,) = parse_clash(pattern, "domain").rules

    def hit(name: str) -> bool:
        if name in rule.get("domain", []):
            return True
        for suffix in rule.get("domain_suffix", []):
            if suffix.startswith(".") and name.endswith(suffix):
                return True
            if name == suffix or name.endswith("." + suffix):
                return True
        return any(re.search(p, name) for p in rule.get("domain_regex", []))

    assert all(hit(n) for n in matches)
    assert not any(hit(n) for n in misses)


@pytest.mark.parametrize(
    "bad", ["example.com.", "a..com", "exa mple.com", "http://x.com", "+.+.a.com", "a.*b.com"]
)
def test_clash_domain_errors_name_the_line(bad: str) -> None:
    with pytest.raises(RuleSetError) as info:
        parse_clash(f"ok.com\n{bad}\n", "domain")
    assert info.value.line == 2


def test_clash_ipcidr() -> None:
    text = "payload:\n  - '192.168.1.0/24'\n  - 10.0.0.1\n  - '2001:db8::/32'\n  - 10.1.2.3/8\n"
    assert parse_clash(text, "ipcidr").rules == [
        {"ip_cidr": ["192.168.1.0/24", "10.0.0.1/32", "2001:db8::/32", "10.0.0.0/8"]}
    ]
    with pytest.raises(RuleSetError) as info:
        parse_clash("1.2.3.0/24\n10.0.0.0.1/32\n", "ipcidr")
    assert info.value.line == 2


CLASSICAL = """\
payload:
  - DOMAIN-SUFFIX,google.com
  - DOMAIN-KEYWORD,Google
  - DOMAIN,ad.com
  - DOMAIN-REGEX,^ab+c\\.com$
  - DOMAIN-REGEX,^ABC
  - SRC-IP-CIDR,192.168.1.201/32
  - IP-CIDR,127.0.0.0/8,no-resolve
  - IP-CIDR6,2620:0:2d0:200::7/32
  - IP-CIDR,10.0.0.0/8,src
  - GEOIP,CN
  - GEOIP,LAN,no-resolve
  - SRC-GEOIP,us
  - DST-PORT,80/443/1000-2000
  - SRC-PORT,7777
  - NETWORK,UDP
  - PROCESS-NAME,curl
  - IP-SUFFIX,8.8.8.8/24
  - GEOSITE,youtube
  - AND,((DOMAIN,baidu.com),(NETWORK,UDP))
  - OR,((DST-PORT,53),(NOT,((DOMAIN-SUFFIX,x.com))))
  - AND,((DOMAIN,a.com),(PROCESS-NAME,curl))
"""


def test_clash_classical_groups_and_logical_rules() -> None:
    parsed = parse_clash(CLASSICAL, "classical")
    assert parsed.rules == [
        {"domain_suffix": ["google.com"], "domain_keyword": ["google"], "domain": ["ad.com"],
         "domain_regex": [r"^ab+c\.com$", "(?i)^ABC"],
         "ip_cidr": ["127.0.0.0/8", "2620::/32"], "geoip": ["cn", "private"]},
        {"source_ip_cidr": ["192.168.1.201/32", "10.0.0.0/8"], "source_geoip": ["us"]},
        {"port": [80, 443], "port_range": ["1000:2000"]},
        {"source_port": [7777]},
        {"network": ["udp"]},
        {"process_name": ["curl"]},
        {"type": "logical", "mode": "and",
         "rules": [{"domain": ["baidu.com"]}, {"network": ["udp"]}]},
        {"type": "logical", "mode": "or",
         "rules": [{"port": [53]},
                   {"type": "logical", "mode": "and", "invert": True,
                    "rules": [{"domain_suffix": ["x.com"]}]}]},
        {"type": "logical", "mode": "and",
         "rules": [{"domain": ["a.com"]}, {"process_name": ["curl"]}]},
    ]  # fmt: skip
    joined = "\n".join(parsed.warnings)
    assert "line 18: skipped 'IP-SUFFIX,8.8.8.8/24'" in joined
    assert "line 19: skipped 'GEOSITE,youtube'" in joined
    assert len(parsed.warnings) == 2
    # One process type per rule: sing-box ANDs process_name with process_path.
    text = "PROCESS-NAME,a\nPROCESS-PATH,/usr/bin/b\nPROCESS-NAME,c\nPROCESS-PATH-REGEX,^/opt/\n"
    assert parse_clash(text).rules == [{"process_name": ["a", "c"]},
                                       {"process_path": ["/usr/bin/b"]},
                                       {"process_path_regex": ["^/opt/"]}]  # fmt: skip


def test_clash_classical_text_form() -> None:
    text = "# c\nDOMAIN-SUFFIX,a.com\n\nIP-CIDR,1.2.3.0/24,no-resolve\n"
    assert parse_clash(text).rules == [{"domain_suffix": ["a.com"], "ip_cidr": ["1.2.3.0/24"]}]


@pytest.mark.parametrize(
    "bad",
    ["example.com", "DOMAIN,", "IP-CIDR,1.2.3.4/99", "DST-PORT,http", "DST-PORT,9-1",
     "DST-PORT,70000", "GEOIP,china", "NETWORK,icmp", "DOMAIN-REGEX,(", "AND,(DOMAIN,a.com)",
     "AND,((DOMAIN,a.com)", "NOT,((DOMAIN,a.com),(DOMAIN,b.com))", "AND,()"],
)  # fmt: skip
def test_clash_classical_errors_name_the_line(bad: str) -> None:
    with pytest.raises(RuleSetError) as info:
        parse_clash(f"DOMAIN,ok.com\n{bad}\n")
    assert info.value.line == 2


def test_clash_yaml_errors() -> None:
    with pytest.raises(RuleSetError, match="'payload' must be a list"):
        parse_clash("payload: 5\n")
    with pytest.raises(RuleSetError, match="must be strings"):
        parse_clash("payload:\n  - {a: 1}\n")
    with pytest.raises(RuleSetError) as info:
        parse_clash("payload:\n  - 'a\n  - [\n")
    assert "YAML" in str(info.value)
    assert parse_clash("payload:\n", "domain").rules == []
    with pytest.raises(RuleSetError, match="behavior"):
        parse_clash("payload: []\n", "weird")


# -- plain domain lists -------------------------------------------------------------------------


def test_domains_list() -> None:
    text = "# ads\nads.example.com\n\n.tracker.net   # subdomains only\n+.Both.ORG.\nbücher.de\n"
    assert parse_domains(text) == ParsedRuleSet(
        [{"domain": ["ads.example.com", "xn--bcher-kva.de"],
          "domain_suffix": [".tracker.net", "both.org"]}],
        [],
    )  # fmt: skip


def test_domains_empty_list_warns() -> None:
    parsed = parse_domains("# nothing\n\n")
    assert parsed.rules == [] and parsed.warnings


@pytest.mark.parametrize(
    ("bad", "hint"),
    [("0.0.0.0 ads.com", "one domain per line"), ("*.ads.com", "format: clash"),
     ("a..com", "not a domain"), ("http://a.com/", "not a domain"), (".", "not a domain")],
)  # fmt: skip
def test_domains_errors(bad: str, hint: str) -> None:
    with pytest.raises(RuleSetError) as info:
        parse_domains(f"ok.com\n{bad}\n")
    assert info.value.line == 2 and hint in str(info.value)


def test_parse_rule_set_dispatches() -> None:
    assert parse_rule_set("a.com", "domains").rules == [{"domain": ["a.com"]}]
    assert parse_rule_set("a.com", "clash", "domain").rules == [{"domain": ["a.com"]}]
    with pytest.raises(RuleSetError, match="unknown rule-set format"):
        parse_rule_set("", "binary")  # type: ignore[arg-type]


# -- properties: any text gives a result or a RuleSetError ---------------------------------------

_JSONISH = st.text(alphabet='{}[]",:#/*\n tv0123456789abcdefghijklmnoprsuxy-_.\\', max_size=200)
_LINES = st.lists(
    st.text(alphabet="ABCDEFGIKLMNOPRSTUWXY-,.+*()/0123456789:abcdefglmnopqrstuwxyz #'\t\u00fc",
            max_size=40),
    max_size=12,
).map("\n".join)  # fmt: skip


def _parses_or_rule_set_error(parse: object, text: str) -> None:
    try:
        result = parse(text)  # type: ignore[operator]
    except RuleSetError:
        return
    assert isinstance(result, ParsedRuleSet)
    for rule in result.rules:
        assert isinstance(rule, dict) and rule


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), _JSONISH, st.text(st.characters(), max_size=50)))
def test_source_never_crashes(text: str) -> None:
    _parses_or_rule_set_error(parse_source, text)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-5, 70000) | st.sampled_from(
            ["a.com", "", "10.0.0.0/8", "tcp", "and", "logical", "::1", "x"]),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
            st.sampled_from(["domain", "port", "type", "mode", "rules", "invert", "ip_cidr",
                             "network", "ip_version", "query_type", "geoip", "bogus"]),
            inner, max_size=4),
        max_leaves=12,
    )
)  # fmt: skip
def test_source_structures_never_crash(rules: object) -> None:
    _parses_or_rule_set_error(parse_source, json.dumps({"version": 2, "rules": rules}))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), _LINES), st.sampled_from(["domain", "ipcidr", "classical"]))
def test_clash_never_crashes(text: str, behavior: str) -> None:
    _parses_or_rule_set_error(lambda t: parse_clash(t, behavior), text)
    _parses_or_rule_set_error(lambda t: parse_clash(t, behavior), "payload:\n" + "".join(
        f"  - {line}\n" for line in text.splitlines()))  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), _LINES))
def test_domains_never_crash(text: str) -> None:
    _parses_or_rule_set_error(parse_domains, text)


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_clash, "payload:\n  - DOMAIN,a\ud800b.com\n"),
        (lambda t: parse_clash(t, "domain"), "a\udfff.com"),
        (parse_domains, "a\udfff.com"),
        (parse_source, '{"version": 1, "rules": [{"domain": "\ud800"}]} \ud800'),
    ],
)
def test_lone_surrogates_are_rule_set_errors(parse: object, text: str) -> None:
    with pytest.raises(RuleSetError):
        parse(text)  # type: ignore[operator]


def test_rule_set_error_is_a_ztun_error() -> None:
    assert issubclass(RuleSetError, ZtunError)
    assert str(RuleSetError("bad", 3)) == "line 3: bad"


def test_clash_regex_re2_refuses_names_the_line() -> None:
    # Lookahead is RE2-invalid (as in sing-box); the error points at the provider's line.
    with pytest.raises(RuleSetError, match=r"line 2: .*\(\?=x\).*RE2"):
        parse_clash("DOMAIN,a.com\nDOMAIN-REGEX,(?=x)ads\n", "classical")
