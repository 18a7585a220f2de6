"""`ztun rule-set`: match, compile, decompile, convert, run as a real process.

The real sing-box reading what ztun writes is in tests/integration/test_srs_singbox.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.cli.test_cli import ztun
from ztun.route.srs import read_srs

SOURCE = {
    "version": 2,
    "rules": [
        {"domain_suffix": ["ads.example"], "ip_cidr": ["198.51.100.0/24"]},
        {"domain": ["exact.example"], "port": [443]},
        {"type": "logical", "mode": "or", "rules": [{"domain_keyword": ["track"]},
                                                     {"ip_cidr": ["2001:db8::/32"]}]},
    ],
}  # fmt: skip


def test_match_names_every_matching_rule(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps(SOURCE))
    proc = ztun("rule-set", "match", str(path), "x.ads.example")
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        'match rules[0]: {"domain_suffix": ["ads.example"], "ip_cidr": ["198.51.100.0/24"]}'
    ]
    assert ztun("rule-set", "match", str(path), "exact.example").stdout == ""
    hit = ztun("rule-set", "match", str(path), "exact.example", "--port", "443")
    assert hit.stdout.startswith("match rules[1]:")
    both = json.loads(ztun("rule-set", "match", str(path), "2001:db8::1", "--json").stdout)
    assert [m["index"] for m in both["matches"]] == [2]
    none = ztun("rule-set", "match", str(path), "other.example")
    assert none.returncode == 0 and "no rule of" in none.stderr
    bad = ztun("rule-set", "match", str(path), "not a name")
    assert bad.returncode == 2 and "neither an IP address nor a domain" in bad.stderr


def test_compile_then_decompile_and_match_the_binary(tmp_path: Path) -> None:
    path = tmp_path / "set.json"
    path.write_text(json.dumps(SOURCE))
    proc = ztun("rule-set", "compile", str(path))
    assert proc.returncode == 0, proc.stderr
    binary = tmp_path / "set.srs"
    assert binary.read_bytes()[:4] == b"SRS\x02"
    assert read_srs(binary.read_bytes()).rules[0]["domain_suffix"] == ["ads.example"]
    # A .srs name is read as binary; the answers are the source's.
    for query in ("x.ads.example", "198.51.100.9", "tracker.example", "2001:db8::5"):
        assert (ztun("rule-set", "match", str(binary), query).stdout
                == ztun("rule-set", "match", str(path), query).stdout != "")  # fmt: skip
    out = tmp_path / "back.json"
    assert ztun("rule-set", "decompile", str(binary), "-o", str(out)).returncode == 0
    back = json.loads(out.read_text())
    assert back["version"] == 2
    assert back["rules"][1] == {"domain": "exact.example", "port": 443}
    legacy = tmp_path / "legacy.srs"
    proc = ztun("rule-set", "compile", str(path), "--version", "1", "-o", str(legacy))
    assert proc.returncode == 0 and legacy.read_bytes()[:4] == b"SRS\x01"
    assert read_srs(legacy.read_bytes()).rules == read_srs(binary.read_bytes()).rules


def test_convert_clash_and_domain_lists(tmp_path: Path) -> None:
    clash = tmp_path / "ads.yaml"
    clash.write_text("payload:\n  - DOMAIN-SUFFIX,ads.example\n  - IP-CIDR,198.51.100.0/24\n"
                     "  - UID,1000\n")  # fmt: skip
    proc = ztun("rule-set", "convert", str(clash), "--type", "clash")
    assert proc.returncode == 0
    assert "skipped 'UID,1000'" in proc.stderr
    assert json.loads((tmp_path / "ads.json").read_text())["rules"] == [
        {"domain_suffix": "ads.example", "ip_cidr": "198.51.100.0/24"}
    ]
    domains = tmp_path / "list.txt"
    domains.write_text("a.example\n+.b.example\n")
    proc = ztun("rule-set", "convert", str(domains), "-t", "domains", "--binary")
    assert proc.returncode == 0
    assert read_srs((tmp_path / "list.srs").read_bytes()).rules == [
        {"domain": ["a.example"], "domain_suffix": ["b.example"]}
    ]


def test_errors_are_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "x.srs"
    broken.write_bytes(b"SRS\x02junk")
    for args in (("match", str(broken), "a.example"), ("decompile", str(broken)),
                 ("compile", str(broken))):  # fmt: skip
        proc = ztun("rule-set", *args)
        assert proc.returncode == 1
        assert "compressed body is damaged" in proc.stderr
    ztun_only = tmp_path / "z.json"
    ztun_only.write_text('{"version": 2, "rules": [{"geoip": "us"}]}')
    proc = ztun("rule-set", "compile", str(ztun_only))
    assert proc.returncode == 1 and "sing-box rule sets have no 'geoip'" in proc.stderr
    missing = ztun("rule-set", "decompile", str(tmp_path / "nope.srs"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    wrong = ztun("rule-set", "convert", str(ztun_only), "--type", "yaml")
    assert wrong.returncode == 2
