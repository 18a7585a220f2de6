"""domain_regex: RE2 (linear time, Go's syntax), the errors `check` gives, and the fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ztun.check import check_file
from ztun.route import regex
from ztun.route.compile import compile_headless_rules, compile_router
from ztun.route.metadata import FlowMeta
from ztun.route.regex import RegexSet, pattern_error

#: Python's re needs ~2^n steps for `(a+)+$` on n a's and a non-matching tail; RE2 is linear.
CATASTROPHIC = ["(a+)+$", "^(a|aa)+$", "(x+x+)+y", "^(([a-z])+.)+[A-Z]([a-z])+$"]


@pytest.mark.parametrize("pattern", CATASTROPHIC)
def test_catastrophic_pattern_is_linear(pattern: str) -> None:
    matcher = compile_headless_rules([{"domain_regex": [pattern]}])
    name = "a" * 100_000 + "!"  # longer than any name, to show the matcher itself is linear
    start = time.perf_counter()
    for _ in range(10):
        assert not matcher.match(FlowMeta(domain=name))
    # Python's re would not finish this within the age of the universe; RE2 takes ~1 ms each.
    assert time.perf_counter() - start < 1.0


REFUSED = [r"(?=a)b", r"a(?!b)", r"(?<=a)b", r"(?<!a)b", r"(a)\1", r"(?P<n>a)(?P=n)", "(unclosed"]


@pytest.mark.parametrize("pattern", REFUSED)
def test_patterns_go_refuses_are_refused(pattern: str) -> None:
    assert pattern_error(pattern) is not None
    router, diagnostics = compile_router(
        {"route": {"rules": [{"domain_regex": ["ok", pattern], "action": "reject"}]}}
    )
    assert router is None or diagnostics
    assert [d.path for d in diagnostics] == [("route", "rules", 0, "domain_regex", 1)]
    assert "RE2 syntax" in diagnostics[0].message and pattern in diagnostics[0].message


def test_re2_syntax_python_lacks_is_accepted() -> None:
    for pattern in (r"\pL+\.com\z", r"^[[:alpha:]]+$", r"(?i)^MAIL\."):
        assert pattern_error(pattern) is None, pattern
    rules = compile_headless_rules([{"domain_regex": [r"^[[:digit:]]+\.com$"]}])
    assert rules.match(FlowMeta(domain="123.com"))
    assert not rules.match(FlowMeta(domain="dig.com"))


def test_regex_set_names_the_first_matching_pattern() -> None:
    patterns = [r"^x\.", r"ample", r"\.com$", r"^e"]
    matches = RegexSet(patterns)
    assert matches.first("example.com") == 1
    assert matches.first("x.org") == 0
    assert matches.first("nothing.org") is None
    assert RegexSet([]).first("a.com") is None


def test_regex_set_over_its_memory_falls_back_to_one_re2_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(regex, "SET_MAX_MEM", 1)  # no set compiles within one byte
    matches = RegexSet([r"^x\.", r"ample", r"(a+)+$"])
    assert matches._set is None
    assert matches.first("example.com") == 1
    assert matches.first("a" * 50_000 + "!") is None
    assert matches.first("aaa") == 2


def test_any_name_is_safe_to_match() -> None:
    matches = RegexSet([r"\.com$"])
    assert matches.first("\ud800.com") == 0  # a lone surrogate cannot raise
    assert matches.first("bücher.com") == 0
    assert matches.first("") is None


def test_rule_set_file_errors_name_the_set_and_the_rule(tmp_path: Path) -> None:
    (tmp_path / "set.json").write_text(
        json.dumps({"version": 3, "rules": [{"domain": "a.com"}, {"domain_regex": ["(?=x)"]}]})
    )
    (tmp_path / "c.yaml").write_text(
        "outbounds:\n  - {type: direct, tag: direct}\n"
        "route:\n"
        "  rule_set:\n"
        "    - {tag: hostile, type: local, path: set.json}\n"
        "  rules:\n"
        "    - {rule_set: hostile, outbound: direct}\n"
    )
    result = check_file(tmp_path / "c.yaml")
    [error] = result.errors
    assert error.mark is not None and error.mark.line == 5  # the rule set's entry
    assert "rule set 'hostile' (set.json), rule 1" in error.message
    assert "(?=x)" in error.message and "RE2" in error.message


def test_without_re2_python_re_is_used_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(regex, "ENGINE", "re")
    router, diagnostics = compile_router(
        {"route": {"rules": [
            {"domain_regex": [r"^a\."], "action": "reject"},
            {"domain_regex": [r"b$"], "action": "reject"},
        ]}}
    )  # fmt: skip
    assert router is not None
    assert [(d.severity, d.message) for d in diagnostics] == [
        ("warning", regex.FALLBACK_WARNING)
    ]
    assert RegexSet([r"^a\.", "x"]).first("a.com") == 0
    assert pattern_error("(?=x)") is None  # Python's re accepts what RE2 refuses
    assert pattern_error("(unclosed") is not None


def test_check_warns_when_re2_cannot_be_imported(tmp_path: Path) -> None:
    """A real import failure (re2 blocked in sys.modules), through the `ztun check` command."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "outbounds:\n  - {type: direct, tag: direct}\n"
        "route:\n  rules:\n    - {domain_regex: ['^ads\\.'], outbound: direct}\n"
    )
    code = (
        "import runpy, sys; sys.modules['re2'] = None; "
        f"sys.argv = ['ztun', 'check', {str(config)!r}]; "
        "runpy.run_module('ztun', run_name='__main__')"
    )
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=root, env=env, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    assert "c.yaml:5:" in said and "the google-re2 package is not installed" in said
