"""`ztun dns`, run as a real process against a loopback DNS server: the rule and server, the
answer (records, TTLs, rcode, time, cache), --json, --no-query and the exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.unit.dns.dns_peers import DnsPeer, dns_peer

ROOT = Path(__file__).resolve().parents[3]
RECORDS = {"a.test": [("A", 300, ["203.0.113.1"]), ("AAAA", 120, ["2001:db8::1"])]}


def ztun(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "ztun", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture
def peer() -> DnsPeer:
    with dns_peer(RECORDS) as p:
        yield p  # type: ignore[misc]


def write_config(tmp_path: Path, port: int, rules: str = "") -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        outbounds:
          - {{type: direct, tag: direct}}
        dns:
          servers:
            - {{type: udp, tag: up, server: 127.0.0.1, server_port: {port}}}
            - {{type: hosts, tag: hosts, predefined: {{router.lan: 203.0.113.254}}}}
          final: up
        """)
        + rules
    )
    return path


def test_json_names_the_server_and_the_answer(tmp_path: Path, peer: DnsPeer) -> None:
    proc = ztun("dns", str(write_config(tmp_path, peer.port)), "a.test", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["query"] == {"name": "a.test", "type": "A", "inbound": None}
    assert (out["action"], out["server"], out["server_type"]) == ("route", "up", "udp")
    answer = out["answer"]
    assert (answer["rcode"], answer["cached"], answer["error"]) == ("NOERROR", False, None)
    assert [(r["type"], r["ttl"], r["data"]) for r in answer["records"]] == [
        ("A", 300, "203.0.113.1")
    ]
    assert 0 < answer["time_ms"] < 5000 and peer.count() == 1


def test_text_output_shows_records_with_ttls(tmp_path: Path, peer: DnsPeer) -> None:
    proc = ztun("dns", str(write_config(tmp_path, peer.port)), "a.test", "--type", "aaaa")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "query   a.test AAAA"
    assert any(line.startswith("server  up (udp 127.0.0.1:") for line in lines)
    assert any(line.startswith("answer  NOERROR in ") for line in lines)
    assert "  a.test  120  AAAA  2001:db8::1" in lines


def test_no_query_asks_nobody(tmp_path: Path, peer: DnsPeer) -> None:
    proc = ztun("dns", str(write_config(tmp_path, peer.port)), "a.test", "--no-query", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["server"] == "up" and "answer" not in out and peer.count() == 0


def test_a_silent_server_is_servfail_with_the_reason(tmp_path: Path, peer: DnsPeer) -> None:
    peer.silent = True
    cfg = str(write_config(tmp_path, peer.port))
    proc = ztun("dns", cfg, "a.test", "--timeout", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert "answer  SERVFAIL: no answer within 0.5s" in proc.stdout


def test_config_errors_and_bad_types(tmp_path: Path, peer: DnsPeer) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("dns:\n  servers:\n    - {type: udp, tag: up}\n")
    proc = ztun("dns", str(bad), "a.test")
    assert proc.returncode == 1 and "the config has errors" in proc.stderr
    proc = ztun("dns", str(write_config(tmp_path, peer.port)), "a.test", "--type", "NOPE")
    assert proc.returncode == 2 and "not a DNS record type" in proc.stderr
    empty = tmp_path / "empty.yaml"
    empty.write_text("outbounds:\n  - {type: direct, tag: direct}\n")
    proc = ztun("dns", str(empty), "a.test")
    assert proc.returncode == 1 and "no dns.servers" in proc.stderr


def test_rules_choose_the_server(tmp_path: Path, peer: DnsPeer) -> None:
    pytest.importorskip("ztun.dns.router", reason="the DNS rule engine (branch dnspure)")
    rules = "  rules:\n    - {domain_suffix: [lan], server: hosts}\n"
    proc = ztun("dns", str(write_config(tmp_path, peer.port, rules)), "router.lan", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["rule"]["index"] == 0 and out["server"] == "hosts"
    assert [r["data"] for r in out["answer"]["records"]] == ["203.0.113.254"]
    assert peer.count() == 0


def test_a_reject_rule_answers_refused(tmp_path: Path, peer: DnsPeer) -> None:
    pytest.importorskip("ztun.dns.router", reason="the DNS rule engine (branch dnspure)")
    rules = "  rules:\n    - {domain_suffix: [ads.test], action: reject}\n"
    proc = ztun("dns", str(write_config(tmp_path, peer.port, rules)), "x.ads.test")
    assert proc.returncode == 0, proc.stderr
    assert "action  reject" in proc.stdout and "answer  REFUSED in " in proc.stdout
    assert peer.count() == 0
