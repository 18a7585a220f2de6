"""Fields the schema accepts but `ztun run` does not execute: one warning per use, at its place."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ztun.check import check_file
from ztun.config.schema import schema as load_schema
from ztun.config.unexecuted import NOT_EXECUTED, not_executed
from ztun.errors import Diagnostic

USES_EVERYTHING = """\
outbounds:
  - {type: direct, tag: direct}
inbounds:
  - type: tun
    tag: tun-in
    address: 172.19.0.1/30
    strict_route: true
    route_address: [198.51.100.0/24]
    route_exclude_address: 203.0.113.0/24
dns:
  servers:
    - {type: local, tag: local}
route:
  auto_detect_interface: true
  default_interface: eth0
  default_mark: 0x2024
  rule_set:
    - type: inline
      tag: set
      rules:
        - {protocol: tls}
        - {query_type: A}
        - {network: [tcp, icmp]}
  rules:
    - action: sniff
      sniffer: [tls]
    - {port: 53, action: hijack-dns}
    - {protocol: [quic], action: reject, method: reply, no_drop: true}
    - type: logical
      mode: or
      rules:
        - {network: icmp}
        - {rule_set: set}
      action: route-options
      udp_timeout: 30s
      udp_connect: true
  final: direct
"""

#: (line, column, message start) of every warning USES_EVERYTHING gets, in file order: at the
#: key, or at the list item holding the value
EXPECTED = [
    (7, 5, "inbounds[0].strict_route: accepted but not yet executed"),
    (8, 5, "inbounds[0].route_address: accepted but not yet executed"),
    (9, 5, "inbounds[0].route_exclude_address: accepted but not yet executed"),
    (16, 3, "route.default_mark: accepted but not yet executed"),
    (23, 27, "route.rule_set[0].rules[2].network: icmp is accepted but not yet executed"),
    (28, 42, "route.rules[2].method: reply is accepted but not yet executed"),
    (28, 57, "route.rules[2].no_drop: accepted but not yet executed"),
    (32, 12, "route.rules[3].rules[0].network: icmp is accepted but not yet executed"),
    (35, 7, "route.rules[3].udp_timeout: accepted but not yet executed"),
    (36, 7, "route.rules[3].udp_connect: accepted but not yet executed"),
]


def check_text(tmp_path: Path, text: str) -> list[Diagnostic]:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    result = check_file(path)
    assert [str(d) for d in result.errors] == []
    assert result.router is not None  # warnings never stop a config from running
    return result.warnings


def test_every_use_is_one_warning_at_its_place(tmp_path: Path) -> None:
    warnings = check_text(tmp_path, USES_EVERYTHING)
    found = [(d.mark.line, d.mark.column, d.message) for d in warnings if d.mark]
    assert len(found) == len(warnings) == len(EXPECTED)
    for (line, column, message), (want_line, want_column, start) in zip(
        found, EXPECTED, strict=True
    ):
        assert message.startswith(start)
        assert (line, column) == (want_line, want_column), message
    for d in warnings:
        assert d.severity == "warning"
        assert d.mark is not None and d.mark.file.endswith("config.yaml")
        assert "`ztun run`: " in d.message and "\n" not in d.message


def test_the_warnings_say_what_happens_instead(tmp_path: Path) -> None:
    by_path = {d.path: d.message for d in check_text(tmp_path, USES_EVERYTHING)}
    assert "like `default`" in by_path[("route", "rules", 2, "method")]
    # The network monitor runs them now (issue 14).
    assert ("route", "auto_detect_interface") not in by_path
    assert ("route", "default_interface") not in by_path
    # DNS, hijack-dns, sniff and protocol run now (issue 11): no warning for them.
    assert ("dns",) not in by_path and ("route", "rules", 0, "action") not in by_path


def test_every_entry_is_found_by_the_config_that_uses_everything(tmp_path: Path) -> None:
    """USES_EVERYTHING stays complete when an entry is added to the table."""
    messages = [d.message for d in check_text(tmp_path, USES_EVERYTHING)]
    for entry in NOT_EXECUTED:
        sample = entry.message(("x",)).removeprefix("x: ")
        assert any(m.endswith(sample) for m in messages), entry


def schema_properties(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        found.update(node.get("properties", {}))
        for value in node.values():
            found |= schema_properties(value)
    elif isinstance(node, list):
        for value in node:
            found |= schema_properties(value)
    return found


def test_every_entry_names_a_field_the_schema_accepts() -> None:
    accepted = schema_properties(load_schema())
    assert {entry.key for entry in NOT_EXECUTED} <= accepted


CARRIED_OUT = """\
outbounds:
  - {type: direct, tag: direct}
inbounds:
  - type: tun
    tag: tun-in
    address: 172.19.0.1/30
    auto_route: true
    strict_route: true
    route_address: [198.51.100.0/24]
route:
  auto_detect_interface: true
  default_interface: eth0
  default_mark: 0x2024
  rules:
    - {network: [tcp, udp], port: 443, action: reject, method: drop}
    - {ip_cidr: 203.0.113.0/24, action: route-options, override_port: 8443}
  final: direct
"""


def test_what_runs_gets_no_warning(tmp_path: Path) -> None:
    """auto_route makes the tun's routing fields and default_mark act; the network monitor
    carries out auto_detect_interface and default_interface."""
    assert check_text(tmp_path, CARRIED_OUT) == []


@pytest.mark.parametrize(
    "data",
    [None, [], "dns", {"dns": None}, {"dns": {}}, {"route": []}, {"route": {"rules": "x"}},
     {"route": {"rules": [1, None, {"type": "logical", "rules": 5}]}},
     {"inbounds": [{"type": 4}, "tun", {"type": "tun", "strict_route": True}]},
     {"route": {"rule_set": [{"type": "inline", "rules": {"protocol": "tls"}}]}}],
)  # fmt: skip
def test_any_shape_is_walked_without_raising(data: Any) -> None:
    for path, message in not_executed(data):
        assert isinstance(path, tuple) and message


def test_run_logs_the_warnings_once_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ztun import box

    path = tmp_path / "config.yaml"
    path.write_text(
        "log: {timestamp: false}\n"
        "inbounds: [{type: mixed, tag: in, listen_port: 2080}]\n"
        "outbounds: [{type: direct, tag: direct}]\n"
        "route:\n  rules: [{port: 53, method: reply, action: reject}]\n"
    )

    async def serve(*args: object) -> int:  # the inbounds are not what this test is about
        return 0

    monkeypatch.setattr(box, "_serve", serve)
    # run() sets up the `ztun` logger for real: put it back so later tests' caplog still works
    logger = logging.getLogger("ztun")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    try:
        assert box.run(path) == 0
    finally:
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])  # setLevel, not the attribute: it clears the level cache
    lines = [line for line in capsys.readouterr().err.splitlines() if "not yet executed" in line]
    assert lines == [
        f"WARNING {path}:5:22: route.rules[0].method: reply is accepted but not yet "
        "executed by `ztun run`: it refuses like `default`"
    ]
