"""Loading rule sets: inline, local files, remote downloads with a cache (local HTTP server)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ztun.errors import Diagnostic
from ztun.provider import ruleset as provider
from ztun.provider.ruleset import default_cache_dir, load_rule_sets
from ztun.route.srs import write_srs

SOURCE_A = json.dumps({"version": 2, "rules": [{"domain_suffix": "a.example"}]}).encode()
SOURCE_B = json.dumps({"version": 2, "rules": [{"domain_suffix": "b.example"}]}).encode()
DAY = 86400.0
T0 = 1_700_000_000.0


@dataclass
class Site:
    """What the test server serves, and what it was asked."""

    body: bytes = SOURCE_A
    etag: str | None = '"v1"'
    last_modified: str | None = None
    status: int = 200
    requests: list[dict[str, str]] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    site: Site

    def do_GET(self) -> None:
        site = self.server.site  # type: ignore[attr-defined]
        site.requests.append({k.lower(): v for k, v in self.headers.items()})
        if site.status != 200:
            self.send_error(site.status)
            return
        not_modified = (site.etag and self.headers.get("If-None-Match") == site.etag) or (
            site.last_modified and self.headers.get("If-Modified-Since") == site.last_modified
        )
        if not_modified:
            self.send_response(304)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(site.body)))
        if site.etag:
            self.send_header("ETag", site.etag)
        if site.last_modified:
            self.send_header("Last-Modified", site.last_modified)
        self.end_headers()
        self.wfile.write(site.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server:
    def __init__(self) -> None:
        self.site = Site()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.site = self.site  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()
        self.running = True

    def url(self, path: str = "/set.json") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)
            self.running = False


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    try:
        yield srv
    finally:
        srv.stop()


def remote(url: str, **extra: Any) -> dict[str, Any]:
    return {"tag": "r", "type": "remote", "url": url, **extra}


def load(entries: list[dict[str, Any]], tmp_path: Path, **kw: Any) -> Any:
    kw.setdefault("now", T0)
    kw.setdefault("timeout", 5.0)
    return load_rule_sets(entries, base_dir=tmp_path, cache_dir=tmp_path / "cache", **kw)


def messages(diags: list[Diagnostic], severity: str) -> list[str]:
    return [d.message for d in diags if d.severity == severity]


# -- inline and local ---------------------------------------------------------------------------


def test_inline_rules_are_passed_through(tmp_path: Path) -> None:
    rules = [{"domain": "a.com"}, {"type": "logical", "mode": "or", "rules": [{"port": 1}]}]
    result = load([{"tag": "i", "type": "inline", "rules": rules}], tmp_path)
    assert result.sets == {"i": rules}
    assert result.diagnostics == []


def test_local_files_in_every_format(tmp_path: Path) -> None:
    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "s.json").write_bytes(SOURCE_A)
    (tmp_path / "c.yaml").write_text("payload:\n  - DOMAIN,c.com\n  - GEOSITE,x\n")
    (tmp_path / "d.txt").write_text("\ufeff# list\nd.com\n.e.com\n")  # BOM is fine
    result = load(
        [
            {"tag": "s", "type": "local", "path": "sets/s.json"},
            {"tag": "c", "type": "local", "path": "c.yaml", "format": "clash"},
            {"tag": "d", "type": "local", "path": str(tmp_path / "d.txt"), "format": "domains"},
            {"tag": "ip", "type": "local", "path": "c.yaml", "format": "clash",
             "behavior": "domain"},
        ],
        tmp_path,
    )  # fmt: skip
    assert result.sets["s"] == [{"domain_suffix": ["a.example"]}]
    assert result.sets["c"] == [{"domain": ["c.com"]}]
    assert result.sets["d"] == [{"domain": ["d.com"], "domain_suffix": [".e.com"]}]
    (warning,) = [d for d in result.diagnostics if d.severity == "warning"]
    assert warning.path == ("route", "rule_set", 1, "path")
    assert "c.yaml: line 3: skipped 'GEOSITE,x'" in warning.message
    (error,) = [d for d in result.diagnostics if d.severity == "error"]
    assert error.path == ("route", "rule_set", 3, "path")
    assert "c.yaml: line 2:" in error.message  # DOMAIN,c.com is no domain pattern


def test_local_problems(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"version": 2, "rules": [{"port": "x"}]}')
    (tmp_path / "bin.json").write_bytes(b"SRS\x02\x78\xda....")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9.com\n")
    result = load(
        [
            {"tag": "missing", "type": "local", "path": "nope.json"},
            {"tag": "bad", "type": "local", "path": "bad.json"},
            {"tag": "srs", "type": "local", "path": "x.srs"},
            {"tag": "binfmt", "type": "local", "path": "bad.json", "format": "binary"},
            {"tag": "magic", "type": "local", "path": "bin.json"},
            {"tag": "latin1", "type": "local", "path": "latin1.txt", "format": "domains"},
            {"tag": "fmt", "type": "local", "path": "bad.json", "format": "yaml"},
            {"tag": "nopath", "type": "local"},
        ],
        tmp_path,
    )
    errors = {d.path: d.message for d in result.diagnostics if d.severity == "error"}
    assert "cannot read rule-set file" in errors[("route", "rule_set", 0, "path")]
    assert "No such file" in errors[("route", "rule_set", 0, "path")]
    assert 'rules[0].port: "x" is not a port' in errors[("route", "rule_set", 1, "path")]
    # A .srs name means format: binary; a missing .srs file is just missing.
    assert "cannot read rule-set file" in errors[("route", "rule_set", 2, "path")]
    assert "not a sing-box binary rule set" in errors[("route", "rule_set", 3, "path")]
    assert "set `format: binary`" in errors[("route", "rule_set", 4, "path")]
    assert "not UTF-8" in errors[("route", "rule_set", 5, "path")]
    assert "'yaml' is not a rule-set format" in errors[("route", "rule_set", 6, "format")]
    assert "needs 'path'" in errors[("route", "rule_set", 7, "path")]
    # Every tag is still defined, so rules naming it do not also fail as "unknown rule set".
    assert set(result.sets) == {"missing", "bad", "srs", "binfmt", "magic", "latin1", "fmt",
                                "nopath"}  # fmt: skip
    assert all(rules == [] for rules in result.sets.values())


def test_entry_problems(tmp_path: Path) -> None:
    result = load(
        [
            {"tag": "x", "type": "inline", "rules": []},
            {"tag": "x", "type": "inline", "rules": []},
            {"type": "inline", "rules": []},
            {"tag": "y", "type": "weird"},
            {"tag": "z", "type": "inline", "rules": {"domain": "a"}},
            {"tag": "w", "type": "local", "path": "w.txt", "format": "clash", "behavior": "x"},
        ],
        tmp_path,
    )
    errors = {d.path: d.message for d in result.diagnostics if d.severity == "error"}
    assert "used twice" in errors[("route", "rule_set", 1, "tag")]
    assert "needs a tag" in errors[("route", "rule_set", 2, "tag")]
    assert "not a rule-set type" in errors[("route", "rule_set", 3, "type")]
    assert "needs 'rules'" in errors[("route", "rule_set", 4, "rules")]
    assert "not a clash behavior" in errors[("route", "rule_set", 5, "behavior")]


def test_local_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provider, "MAX_RULE_SET_BYTES", 10)
    (tmp_path / "big.txt").write_text("a.com\n" * 5)
    result = load([{"tag": "b", "type": "local", "path": "big.txt", "format": "domains"}],
                  tmp_path)  # fmt: skip
    assert "larger than" in messages(result.diagnostics, "error")[0]


# -- remote -------------------------------------------------------------------------------------


def test_download_then_fresh_cache(server: Server, tmp_path: Path) -> None:
    first = load([remote(server.url())], tmp_path)
    assert first.sets == {"r": [{"domain_suffix": ["a.example"]}]}
    assert first.diagnostics == []
    assert len(server.site.requests) == 1
    assert server.site.requests[0]["user-agent"].startswith("ztun/")
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2 and cached[0].endswith(".data") and cached[1].endswith(".json")
    meta = json.loads((tmp_path / "cache" / cached[1]).read_text())
    assert meta["url"] == server.url() and meta["fetched_at"] == T0 and meta["etag"] == '"v1"'

    # Younger than update_interval (default 1d): no request at all.
    second = load([remote(server.url())], tmp_path, now=T0 + DAY - 1)
    assert second.sets == first.sets and second.diagnostics == []
    assert len(server.site.requests) == 1


def test_stale_cache_revalidated_with_304(server: Server, tmp_path: Path) -> None:
    load([remote(server.url(), update_interval="1h")], tmp_path)
    result = load([remote(server.url(), update_interval="1h")], tmp_path, now=T0 + 3601)
    assert result.sets == {"r": [{"domain_suffix": ["a.example"]}]}
    assert result.diagnostics == []
    assert len(server.site.requests) == 2
    assert server.site.requests[1]["if-none-match"] == '"v1"'
    # The 304 renewed the copy: an hour later it is fresh again, without a request.
    load([remote(server.url(), update_interval="1h")], tmp_path, now=T0 + 3601 + 3000)
    assert len(server.site.requests) == 2


def test_stale_cache_refreshed_with_new_content(server: Server, tmp_path: Path) -> None:
    load([remote(server.url())], tmp_path)
    server.site.body, server.site.etag = SOURCE_B, '"v2"'
    result = load([remote(server.url())], tmp_path, now=T0 + 2 * DAY)
    assert result.sets == {"r": [{"domain_suffix": ["b.example"]}]}
    assert len(server.site.requests) == 2
    # The new copy replaced the old one in the cache.
    server.stop()
    again = load([remote(server.url())], tmp_path, now=T0 + 2 * DAY + 1)
    assert again.sets == {"r": [{"domain_suffix": ["b.example"]}]}


def test_last_modified_validator(server: Server, tmp_path: Path) -> None:
    server.site.etag = None
    server.site.last_modified = "Tue, 14 Nov 2023 22:13:20 GMT"
    load([remote(server.url())], tmp_path)
    result = load([remote(server.url())], tmp_path, now=T0 + 2 * DAY)
    assert result.diagnostics == []
    assert server.site.requests[1]["if-modified-since"] == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert "if-none-match" not in server.site.requests[1]


def test_server_down_uses_cached_copy_with_warning(server: Server, tmp_path: Path) -> None:
    load([remote(server.url())], tmp_path)
    server.stop()
    result = load([remote(server.url())], tmp_path, now=T0 + 3 * DAY)
    assert result.sets == {"r": [{"domain_suffix": ["a.example"]}]}
    (warning,) = result.diagnostics
    assert warning.severity == "warning"
    assert warning.path == ("route", "rule_set", 0, "url")
    assert "cannot download" in warning.message and "cached 3d ago" in warning.message


def test_http_error_uses_cached_copy(server: Server, tmp_path: Path) -> None:
    load([remote(server.url())], tmp_path)
    server.site.status = 503
    result = load([remote(server.url())], tmp_path, now=T0 + 3 * DAY)
    assert result.sets == {"r": [{"domain_suffix": ["a.example"]}]}
    assert "HTTP 503" in messages(result.diagnostics, "warning")[0]


def test_no_cache_and_server_down_is_an_error(server: Server, tmp_path: Path) -> None:
    url = server.url()
    server.stop()
    result = load([remote(url)], tmp_path)
    assert result.sets == {"r": []}
    (error,) = result.diagnostics
    assert error.severity == "error" and error.path == ("route", "rule_set", 0, "url")
    assert f"cannot download {url}" in error.message and "no cached copy" in error.message


def test_no_cache_and_http_404_is_an_error(server: Server, tmp_path: Path) -> None:
    server.site.status = 404
    result = load([remote(server.url())], tmp_path)
    assert "HTTP 404" in messages(result.diagnostics, "error")[0]


def test_bad_download_keeps_the_good_cached_copy(server: Server, tmp_path: Path) -> None:
    load([remote(server.url())], tmp_path)
    server.site.body, server.site.etag = b"<html>captive portal</html>", '"v9"'
    result = load([remote(server.url())], tmp_path, now=T0 + 2 * DAY)
    assert result.sets == {"r": [{"domain_suffix": ["a.example"]}]}
    assert "downloaded copy is unusable" in messages(result.diagnostics, "warning")[0]
    # ... and without a cached copy, the parse error is the error.
    other = load([remote(server.url("/other.json"))], tmp_path, now=T0 + 2 * DAY)
    assert "not valid JSON" in messages(other.diagnostics, "error")[0]


def test_remote_formats_and_srs(server: Server, tmp_path: Path) -> None:
    server.site.body = b"payload:\n  - '+.c.example'\n"
    result = load([remote(server.url("/c.yaml"), format="clash", behavior="domain")], tmp_path)
    assert result.sets == {"r": [{"domain_suffix": ["c.example"]}]}
    # A URL whose path ends in .srs is read as format: binary.
    server.site.body = write_srs([{"domain_suffix": ["d.example"], "ip_cidr": ["198.51.100.0/24"]}])
    srs = load([remote(server.url("/geoip-cn.srs?x=1"))], tmp_path)
    assert srs.diagnostics == []
    assert srs.sets == {"r": [{"domain_suffix": ["d.example"], "ip_cidr": ["198.51.100.0/24"]}]}
    server.site.body = b"SRS\x02not zlib"
    broken = load([remote(server.url("/broken.srs"))], tmp_path)
    assert "compressed body is damaged" in messages(broken.diagnostics, "error")[0]


def test_remote_entry_problems(tmp_path: Path) -> None:
    result = load(
        [
            {"tag": "a", "type": "remote", "url": "ftp://example.com/x.json"},
            {
                "tag": "b",
                "type": "remote",
                "url": "http://127.0.0.1:9/x",
                "update_interval": "soon",
            },
            {"tag": "c", "type": "remote"},
        ],
        tmp_path,
    )
    errors = {d.path: d.message for d in result.diagnostics if d.severity == "error"}
    assert "not an http:// or https:// URL" in errors[("route", "rule_set", 0, "url")]
    assert "not a duration" in errors[("route", "rule_set", 1, "update_interval")]
    assert "needs 'url'" in errors[("route", "rule_set", 2, "url")]


def test_download_detour_to_direct_or_unknown_downloads_directly(
    server: Server, tmp_path: Path
) -> None:
    # An unknown tag is the validator's to report; a direct outbound is a plain download.
    # Downloads through a socks outbound: tests/integration/test_ruleset_detour.py.
    for detour in ("direct", "nowhere"):
        result = load([remote(server.url(), download_detour=detour)], tmp_path / detour)
        assert result.sets["r"] and result.diagnostics == []


def test_download_size_limit(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provider, "MAX_RULE_SET_BYTES", 16)
    result = load([remote(server.url())], tmp_path)
    assert "larger than" in messages(result.diagnostics, "error")[0]


def test_offline_never_downloads(server: Server, tmp_path: Path) -> None:
    result = load([remote(server.url())], tmp_path, offline=True)
    assert result.sets == {"r": []}
    (warning,) = result.diagnostics
    assert warning.severity == "warning"
    assert warning.message == "remote rule set not cached yet; not checked"
    assert server.site.requests == []
    load([remote(server.url())], tmp_path)  # now cache it
    stale = load([remote(server.url())], tmp_path, offline=True, now=T0 + 30 * DAY)
    assert stale.sets == {"r": [{"domain_suffix": ["a.example"]}]}
    assert stale.diagnostics == []
    assert len(server.site.requests) == 1


def test_corrupt_sidecar_means_no_cache(server: Server, tmp_path: Path) -> None:
    load([remote(server.url())], tmp_path)
    for sidecar in (tmp_path / "cache").glob("*.json"):
        sidecar.write_text("{not json")
    result = load([remote(server.url())], tmp_path, now=T0 + 1)
    assert result.diagnostics == []
    assert len(server.site.requests) == 2  # downloaded again, unconditionally
    assert "if-none-match" not in server.site.requests[1]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "ztun"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    assert default_cache_dir() == Path.home() / ".cache" / "ztun"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "ztun"
