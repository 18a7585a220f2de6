"""The `ztun` command line, run as a real process: output, exit codes, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def ztun(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "ztun", *args],
        capture_output=True, text=True, input=stdin, cwd=cwd, timeout=60, check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "lan.txt").write_text("intranet.example\n")
    path = tmp_path / "config.yaml"
    path.write_text(
        textwrap.dedent("""\
        outbounds:
          - {type: direct, tag: direct}
          - {type: socks, tag: proxy, server: 198.51.100.1, server_port: 1080}
          - {type: block, tag: block}
        route:
          rule_set:
            - {tag: lan, type: local, format: domains, path: lan.txt}
          rules:
            - {rule_set: [lan], outbound: direct}
            - {domain_suffix: [ads.example], outbound: block}
            - {ip_cidr: [203.0.113.0/24], port: [443], outbound: proxy}
            - {network: [udp], action: reject}
          final: proxy
        """)
    )
    return path


def test_version_and_help() -> None:
    assert ztun("version").stdout.startswith("ztun ")
    out = ztun("--help").stdout
    for command in ("check", "route", "format", "schema", "profiles", "examples", "version"):
        assert command in out


def test_check_valid(config: Path) -> None:
    proc = ztun("check", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_reports_file_line_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        textwrap.dedent("""\
        outbounds:
          - {type: direct, tag: direct}
        route:
          rules:
            - ip_cidr: [198.51.100.0/24, 300.0.0.0/8]
              outbound: direct
            - domain_regex: ["(unclosed"]
              outbound: direct
            - port_range: ["90:80"]
              outbound: direct
        """)
    )
    proc = ztun("check", str(path))
    assert proc.returncode == 1
    err = proc.stderr
    assert f"{path}:5:" in err and "300.0.0.0/8" in err
    assert f"{path}:7:" in err and "regular expression" in err
    assert f"{path}:9:" in err
    as_json = json.loads(ztun("check", str(path), "--json").stdout)
    assert as_json["valid"] is False and as_json["errors"] >= 3
    assert {d["line"] for d in as_json["diagnostics"]} >= {5, 7, 9}


def test_check_several_files_lists_every_error_of_every_file(config: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("outbounds:\n  - {type: direct, tag: direct}\nroute: {final: nope}\n")
    missing = tmp_path / "missing.yaml"
    proc = ztun("check", str(config), str(bad), str(missing))
    assert proc.returncode == 1
    assert f"{bad}:3:" in proc.stderr and "missing.yaml" in proc.stderr
    assert str(config) not in proc.stderr  # the valid file says nothing
    assert "in 2 of 3 files" in proc.stderr
    out = json.loads(ztun("check", str(config), str(bad), str(missing), "--json").stdout)
    assert out["valid"] is False and out["errors"] == 2
    assert [(f["file"], f["valid"]) for f in out["files"]] == [
        (str(config), True), (str(bad), False), (str(missing), False)
    ]
    assert {d["file"] for d in out["diagnostics"]} == {str(bad), str(missing)}
    assert ztun("check", str(config), str(config)).returncode == 0


def test_check_missing_file(tmp_path: Path) -> None:
    proc = ztun("check", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 1 and "nope.yaml" in proc.stderr


def test_route_single(config: Path) -> None:
    proc = ztun("route", str(config), "203.0.113.5", "--port", "443")
    assert proc.returncode == 0, proc.stderr
    assert "outbound: proxy (socks)" in proc.stdout and "rule:     2" in proc.stdout
    proc = ztun("route", str(config), "www.intranet.example", "--json")
    answer = json.loads(proc.stdout)
    assert answer["outbound"] == "proxy" and answer["rule"] == "final"
    answer = json.loads(ztun("route", str(config), "intranet.example", "--json").stdout)
    assert answer["outbound"] == "direct" and answer["rule"] == 0
    assert "rule_set 'lan'" in answer["reasons"][0]
    # A domain is matched as a domain; --ip supplies what it resolved to.
    answer = json.loads(
        ztun(
            "route", str(config), "x.test", "--port", "443", "--ip", "203.0.113.9", "--json"
        ).stdout
    )
    assert answer["outbound"] == "proxy" and answer["rule"] == 2
    answer = json.loads(ztun("route", str(config), "x.test", "--network", "udp", "--json").stdout)
    assert answer["outbound"] is None and answer["action"] == "reject"


def test_route_batch_keeps_input_order(config: Path) -> None:
    queries = "203.0.113.5 443\nads.example\n\nx.ads.example 80 udp\nbad query here extra\n"
    proc = ztun("route", str(config), "--batch", "-", "--json", stdin=queries)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line.get("outbound") for line in lines[:3]] == ["proxy", "block", "block"]
    assert [line.get("rule") for line in lines[:3]] == [2, 1, 1]
    assert "error" in lines[3]
    assert proc.returncode == 1  # one query was malformed
    plain = ztun("route", str(config), "--batch", "-", stdin="203.0.113.5 443\n").stdout
    assert plain.strip().split("\t") == ["203.0.113.5 443", "proxy (socks)", "rule 2"]


def test_route_usage_errors(config: Path) -> None:
    assert ztun("route", str(config)).returncode == 2
    assert ztun("route", str(config), "not a domain!").returncode == 2
    assert ztun("route", str(config), "a.example", "--source", "x:y").returncode == 2


def test_route_on_invalid_config_points_to_check(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("outbounds: []\nroute: {rules: [{ip_cidr: [nope], outbound: x}]}\n")
    proc = ztun("route", str(path), "a.example")
    assert proc.returncode == 1 and "ztun check" in proc.stderr


def test_schema_and_format(config: Path) -> None:
    schema = json.loads(ztun("schema").stdout)
    assert schema["$schema"].endswith("2020-12/schema")
    formatted = ztun("format", str(config))
    assert formatted.returncode == 0 and "domain_suffix" in formatted.stdout


def test_profiles_lists_shipped_profiles() -> None:
    proc = ztun("profiles")
    assert proc.returncode == 0
    assert "bypass-private" in proc.stdout
    listed = json.loads(ztun("profiles", "--json").stdout)
    assert all(Path(p["path"]).is_file() for p in listed)


def test_profiles_fails_when_none_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # In-process: the only way to get no profiles is a broken install, simulated here.
    from typer.testing import CliRunner

    from ztun import cli
    from ztun.config import loader

    monkeypatch.setattr(loader, "PROFILE_DIR", tmp_path)
    for args in (["profiles"], ["profiles", "--json"]):
        result = CliRunner().invoke(cli.app, args)
        # `output` holds stderr too, in every click version (mix_stderr went away in 8.2)
        assert result.exit_code == 1 and "no shipped profiles found" in result.output


def test_examples_lists_shipped_examples_with_paths(tmp_path: Path) -> None:
    proc = ztun("examples", cwd=tmp_path)
    assert proc.returncode == 0
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert {"local-proxy", "tun-split", "profile-override"} <= set(names)
    path = ztun("examples", "local-proxy", cwd=tmp_path).stdout.strip()
    assert Path(path).is_absolute() and Path(path).name == "local-proxy.yaml"
    assert ztun("check", path, cwd=tmp_path).returncode == 0
    listed = json.loads(ztun("examples", "--json").stdout)
    assert {e["name"] for e in listed} == set(names) and all(e["description"] for e in listed)
    unknown = ztun("examples", "nope")
    assert unknown.returncode == 1 and "local-proxy" in unknown.stderr


def test_route_explains_process_and_user_rules(tmp_path: Path) -> None:
    path = tmp_path / "owner.yaml"
    path.write_text(textwrap.dedent("""\
        outbounds:
          - {type: direct, tag: direct}
          - {type: block, tag: block}
        route:
          rules:
            - {process_path_regex: ["^/opt/"], outbound: block}
            - {process_name: [curl], user: [alice], outbound: block}
            - {user_id: [65534], outbound: block}
        """))
    assert ztun("check", str(path)).returncode == 0
    dest = "203.0.113.5"
    answer = json.loads(ztun("route", str(path), dest, "--process", "/opt/x/app", "--json").stdout)
    assert answer["outbound"] == "block" and answer["rule"] == 0
    answer = json.loads(ztun("route", str(path), dest, "--process", "curl", "--process-user",
                             "alice", "--json").stdout)  # fmt: skip
    assert answer["rule"] == 1
    answer = json.loads(ztun("route", str(path), dest, "--uid", "65534", "--json").stdout)
    assert answer["rule"] == 2
    # No owner given: unknown, which matches no process or user item.
    assert json.loads(ztun("route", str(path), dest, "--json").stdout)["rule"] == "final"


def test_route_shows_the_member_a_group_gives_now(tmp_path: Path) -> None:
    cfg = tmp_path / "groups.yaml"
    cfg.write_text(
        "outbounds:\n"
        "  - {type: socks, tag: a, server: 198.51.100.1, server_port: 1080}\n"
        "  - {type: socks, tag: b, server: 198.51.100.2, server_port: 1080}\n"
        "  - {type: urltest, tag: auto, outbounds: [a, b]}\n"
        "  - {type: selector, tag: pick, outbounds: [auto, b]}\n"
        "route: {final: pick}\n"
        "experimental:\n"
        "  cache_file: {enabled: true, path: state.json}\n"
    )
    r = ztun("route", str(cfg), "example.com")
    assert r.returncode == 0, r.stderr
    assert "outbound: pick (selector) → auto (urltest) → a (socks)" in r.stdout
    assert "group:    pick uses auto now (default)" in r.stdout
    assert "group:    auto uses a now (first member, before any probe)" in r.stdout
    (tmp_path / "state.json").write_text('{"selected": {"pick": "b"}}')
    r = ztun("route", str(cfg), "example.com", "--json")
    found = json.loads(r.stdout)
    assert found["chain"] == ["pick", "b"] and found["group_now_from"] == {"pick": "cache file"}
    r = ztun("route", str(cfg), "--batch", "-", stdin="example.com 443\n")
    assert r.stdout == "example.com 443\tpick (selector) → b (socks)\tfinal\n"
