"""Regression tests for what the fuzz run (bench/fuzz/run.py) found: each input it reported as
a crash, refused the documented way and within its bound now. Bounds are generous (the
machine is shared); the fuzz run itself allows 100 ms of CPU per input."""

from __future__ import annotations

import contextlib
import struct
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from ztun.config.loader import load_config_text
from ztun.dns.message import (
    MAX_MESSAGE,
    MAX_QUERY_RECORDS,
    formerr_for,
    parse_query,
    parse_response,
)
from ztun.errors import ConfigError, ProtocolError, ZtunError
from ztun.route.ruleset import MAX_YAML_DEPTH, parse_clash, parse_source


def _cpu(fn: Callable[..., object], *args: object) -> float:
    """CPU seconds of this thread for `fn(*args)`, a documented refusal included."""
    start = time.thread_time()
    with contextlib.suppress(ZtunError):
        fn(*args)
    return time.thread_time() - start


@pytest.mark.parametrize(
    "text",
    [
        # the fuzzer's input (ruleset_source), reduced: a comment, then a line that opens a
        # string of escaped quotes and never closes it
        '{"version": 2, # c\n "rules": [{"domain_keyword": ["say ' + '\\"hiay ' * 9000,
        # the same class: one unterminated string of escaped quotes before a slash
        '"' + '\\"' * 32000 + "/",
        # and before a trailing comma
        '{"a": "' + '\\"' * 32000 + ",]}",
    ],
    ids=["fuzzer-input", "slash-after", "trailing-comma-after"],
)
def test_source_json_with_unterminated_strings_is_refused_in_linear_time(text: str) -> None:
    # 64 KB here took 3.4 s (16 KB: 0.24 s) before the fix; 15 ms after.
    assert len(text) >= 60_000
    assert _cpu(parse_source, text) < 0.5


def _dns_message(flags: int, records: int) -> bytes:
    """A 12-byte header, the question a.example A, and `records` A records in the additional
    section (15 bytes each: root owner, type, class, TTL, 4-byte address)."""
    header = struct.pack("!HHHHHH", 0x1234, flags, 1, 0, 0, records)
    question = b"\x01a\x07example\x00\x00\x01\x00\x01"
    record = b"\x00" + struct.pack("!HHIH", 1, 1, 0, 4) + bytes([203, 0, 113, 5])
    return header + question + record * records


def test_dns_query_with_thousands_of_records_is_refused_before_parsing() -> None:
    # found by the fuzzer (dns_message): dnspython spent ~25 µs per record before the refusal,
    # ~100 ms for a 64 KB message; a client sends queries, so this runs on the event loop
    wire = _dns_message(0x0100, 4300)
    assert 60_000 < len(wire) <= MAX_MESSAGE
    with pytest.raises(ProtocolError, match="4300 records besides its question"):
        parse_query(wire)
    assert _cpu(parse_query, wire) < 0.005
    assert formerr_for(wire) is not None  # the client still gets its FORMERR
    # a query's few real records still parse: an OPT and a TSIG-sized handful
    assert parse_query(_dns_message(0x0100, MAX_QUERY_RECORDS)).id == 0x1234


def test_dns_response_cost_is_linear_and_bounded_by_the_message_size() -> None:
    # Responses come from the configured upstreams and may be 64 KB: dnspython reads them
    # whole, linear in the size (~1.6 µs a byte here): at most ~100 ms for the largest.
    small, large = _dns_message(0x8180, 430), _dns_message(0x8180, 4300)
    parse_response(small)
    assert _cpu(parse_response, large) < max(2.0, 30 * _cpu(parse_response, small))


@pytest.mark.parametrize(
    "text",
    ["[" * 4164 + "10", "{" * 3000, "a: " + "[x, " * 3000],
    ids=["fuzzer-input", "maps", "items"],
)
def test_deeply_nested_yaml_flow_collections_are_refused_in_linear_time(text: str) -> None:
    # found by the fuzzer (config): PyYAML's scanner is quadratic in flow nesting; 4164 `[`
    # took 0.9 s (14 s instrumented) before the refusal; now refused at depth 100 in ~5 ms
    with pytest.raises(ConfigError, match=r"nested too deeply \(over 100\)"):
        load_config_text(text)
    assert _cpu(load_config_text, text) < 0.1


def test_yaml_flow_nesting_up_to_the_limit_still_loads() -> None:
    loaded = load_config_text("log: {level: " + "[" * 99 + "x" + "]" * 99 + "}")
    assert loaded.data["log"]["level"] is not None


_CLASH_DEEP = {
    "flow": "'payload: ' + '[' * 40000",
    "block": "'payload:\\n' + '- ' * 50000 + 'x'",
    "items": "'payload: ' + '[a, ' * 40000",
}


@pytest.mark.parametrize("expr", _CLASH_DEEP.values(), ids=_CLASH_DEEP.keys())
def test_deeply_nested_clash_yaml_is_refused_not_a_segfault(expr: str) -> None:
    # found by the fuzz run (ruleset): libyaml's composer recurses in C, and a 40-100 KB
    # provider of nested `[` or `- ` killed the process (SIGSEGV), so in a child process here
    code = (
        "import time\n"
        "from ztun.route.ruleset import RuleSetError, parse_clash\n"
        f"text = {expr}\n"
        "start = time.thread_time()\n"
        "try:\n"
        "    parse_clash(text)\n"
        "except RuleSetError as exc:\n"
        "    print(exc, time.thread_time() - start)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-500:])
    message, seconds = proc.stdout.rsplit(" ", 1)
    assert "YAML nested too deeply" in message
    assert float(seconds) < 0.1


def test_clash_yaml_nesting_up_to_the_limit_still_loads() -> None:
    assert MAX_YAML_DEPTH == 100
    parsed = parse_clash("payload:\n  - DOMAIN,a.example\n" + "x: " + "[" * 99 + "]" * 99)
    assert parsed.rules


@pytest.mark.parametrize(
    "name", ["cycl" * 1300 + "e_a.yaml", "a" * 5000, "/" + "c" * 300 + ".yaml"],
    ids=["fuzzer-input", "profile-name", "absolute"],
)
def test_include_of_an_overlong_file_name_is_a_config_error(name: str) -> None:
    # found by the fuzzer (config): ENAMETOOLONG from is_file() escaped as a traceback
    with pytest.raises(ConfigError, match="include"):
        load_config_text(f"include: [{name}]")


def test_clash_line_of_thousands_of_parameters_warns_once() -> None:
    # found by the fuzzer (ruleset): one warning per ignored parameter, each quoting the whole
    # line: a 46 KB line of 17k commas made ~780 MB of warnings in 2 s
    entry = "DOMAIN,a.example" + ",x" * 20000
    parsed = parse_clash(entry + "\n", "classical")
    assert parsed.rules == [{"domain": ["a.example"]}]
    assert len(parsed.warnings) == 1
    assert "ignored parameter 'x', 'x', 'x' and 19997 more" in parsed.warnings[0]
    assert _cpu(parse_clash, entry, "classical") < 0.1
