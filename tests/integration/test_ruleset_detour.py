"""Remote rule sets downloaded through a `socks` outbound (`download_detour`), against the real
sing-box SOCKS5 server and a local HTTP server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztun.provider.ruleset import load_rule_sets

from .peers import Proc, free_port, start_http, start_singbox

pytestmark = pytest.mark.singbox

USER = {"username": "alice", "password": "s3cret"}


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[int, int]]:
    www = tmp_path / "www"
    www.mkdir()
    rules = {"version": 3, "rules": [{"domain_suffix": ["ads.example"]}]}
    (www / "ads.json").write_text(json.dumps(rules))
    http_port, socks_port = free_port(), free_port()
    procs: list[Proc] = []
    try:
        procs.append(start_http(tmp_path, www, http_port))
        procs.append(start_singbox(tmp_path, socks_port, users=[USER]))
        yield http_port, socks_port
    finally:
        for p in procs:
            p.stop()


def load(tmp_path: Path, http_port: int, outbound: dict[str, object]) -> object:
    entry = {"tag": "ads", "type": "remote", "url": f"http://127.0.0.1:{http_port}/ads.json",
             "download_detour": outbound["tag"]}  # fmt: skip
    return load_rule_sets([entry], base_dir=tmp_path, cache_dir=tmp_path / "cache",
                          timeout=5, outbounds=[outbound])  # fmt: skip


def socks(port: int, password: str) -> dict[str, object]:
    return {"type": "socks", "tag": "proxy", "server": "127.0.0.1", "server_port": port,
            "username": USER["username"], "password": password}  # fmt: skip


def test_download_through_the_socks_outbound(tmp_path: Path, peers: tuple[int, int]) -> None:
    http_port, socks_port = peers
    # The proxy demands a password: a wrong one proves the download really takes the detour.
    refused = load(tmp_path / "a", http_port, socks(socks_port, "wrong"))
    assert refused.sets["ads"] == []  # type: ignore[attr-defined]
    [d] = [d for d in refused.diagnostics if d.severity == "error"]  # type: ignore[attr-defined]
    assert "cannot download" in d.message and "proxy" in d.message
    loaded = load(tmp_path / "b", http_port, socks(socks_port, USER["password"]))
    assert loaded.diagnostics == []  # type: ignore[attr-defined]
    assert loaded.sets["ads"] == [{"domain_suffix": ["ads.example"]}]  # type: ignore[attr-defined]


def test_download_detour_to_a_block_outbound_is_an_error(tmp_path: Path) -> None:
    result = load(tmp_path, free_port(), {"type": "block", "tag": "block"})
    [d] = result.diagnostics  # type: ignore[attr-defined]
    assert d.path[-1] == "download_detour" and "block outbound" in d.message
