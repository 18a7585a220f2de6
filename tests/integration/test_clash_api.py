"""The Clash API of a running `ztun run`, driven by a real HTTP/WebSocket client (aiohttp's),
with real flows: curl through the mixed inbound to a local server, SOCKS5 UDP to an echo server.

The JSON shapes are checked against the fields the Clash API documents (and dashboards read):

- `GET /version`: {version, premium, meta}
- `GET /configs`: {port, socks-port, redir-port, tproxy-port, mixed-port, allow-lan,
  bind-address, mode, mode-list, log-level, ipv6}; `PATCH /configs {"mode"}` → 204
- `GET /proxies`: {proxies: {name: {type, name, udp, history}}}, GLOBAL a Selector {now, all}
- `GET /rules`: {rules: [{type, payload, proxy}]}
- `GET /connections`: {downloadTotal, uploadTotal, connections: [{id, metadata: {network,
  type, sourceIP, destinationIP, sourcePort, destinationPort, host, dnsMode, processPath},
  upload, download, start, chains, rule, rulePayload}]} (ports are strings, `start` RFC 3339)
- `DELETE /connections`, `DELETE /connections/{id}` → 204
- `GET /traffic`: a stream of {up, down} a second; `/memory`: {inuse, oslimit};
  `/logs`: {type, payload}; as chunked HTTP (one object per line) or WebSocket messages
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from ztun.address import Address

from .api_peers import Api, SlowServer, slow_server
from .peers import (
    REPO,
    Proc,
    Socks5Udp,
    curl_path,
    flow_lines,
    free_port,
    start_ztun,
    udp_echo,
    wait_for,
)

CONFIG = """\
log: {{level: info}}
inbounds:
  - {{type: mixed, tag: mixed-in, listen: 127.0.0.1, listen_port: {mixed}}}
outbounds:
  - {{type: direct, tag: direct}}
  - {{type: block, tag: block}}
route:
  rules:
    - {{clash_mode: Block, outbound: block}}
  final: direct
experimental:
  clash_api: {{external_controller: "127.0.0.1:{api}"{extra}}}
"""

CONNECTION_KEYS = {"id", "metadata", "upload", "download", "start", "chains", "rule",
                   "rulePayload"}  # fmt: skip
METADATA_KEYS = {"network", "type", "sourceIP", "destinationIP", "sourcePort",
                 "destinationPort", "host", "dnsMode", "processPath"}  # fmt: skip


@dataclass
class Env:
    tmp: Path
    mixed: int
    api: Api
    ztun: Proc
    server: SlowServer

    def curl(self, url: str, out: Path) -> subprocess.Popen[bytes]:
        args = [curl_path(), "-s", "-o", str(out), "-x", f"http://127.0.0.1:{self.mixed}", url]
        return subprocess.Popen(args)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    curl_path()
    tmp = tmp_path_factory.mktemp("clash-api")
    mixed, api = free_port(), free_port()
    with slow_server() as server:
        ztun = start_ztun(tmp, CONFIG.format(mixed=mixed, api=api, extra=""), mixed)
        try:
            wait_for(lambda: _listening(api), 10)
            yield Env(tmp, mixed, Api(api), ztun, server)
        finally:
            ztun.stop()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def _open(env: Env, network: str = "tcp") -> list[dict]:
    return [c for c in env.api.get("/connections")["connections"]
            if c["metadata"]["network"] == network]  # fmt: skip


def test_plain_endpoints_have_the_clash_shapes(env: Env) -> None:
    version = env.api.get("/version")
    assert set(version) >= {"version", "premium", "meta"} and "ztun" in version["version"]

    configs = env.api.get("/configs")
    assert set(configs) >= {"port", "socks-port", "redir-port", "tproxy-port", "mixed-port",
                            "allow-lan", "bind-address", "mode", "mode-list", "log-level",
                            "ipv6"}  # fmt: skip
    assert configs["mixed-port"] == env.mixed and configs["allow-lan"] is False
    assert configs["mode"] == "Rule" and configs["mode-list"] == ["Rule", "Block"]

    proxies = env.api.get("/proxies")["proxies"]
    assert proxies["direct"] == {"type": "Direct", "name": "direct", "udp": True, "history": []}
    assert proxies["block"]["type"] == "Reject"
    assert proxies["GLOBAL"]["type"] == "Selector" and proxies["GLOBAL"]["now"] == "direct"
    assert proxies["GLOBAL"]["all"] == ["direct", "block"]
    assert env.api.get("/proxies/direct")["name"] == "direct"
    assert env.api.call("GET", "/proxies/nothing")[0] == 404

    rules = env.api.get("/rules")["rules"]
    assert all(set(r) == {"type", "payload", "proxy"} for r in rules)
    assert rules[0]["payload"] == "clash_mode=block" and rules[0]["proxy"] == "route(block)"
    assert rules[-1] == {"type": "final", "payload": "", "proxy": "route(direct)"}


def test_a_live_flow_is_listed_and_delete_ends_it(env: Env) -> None:
    out = env.tmp / "closed.bin"
    before = len(env.server.transfers)
    curl = env.curl(env.server.url(400, 50), out)  # 20 s if nothing ends it
    try:
        listed = wait_for(lambda: [c for c in _open(env) if c["download"] > 2000], 10)
        assert len(listed) == 1, listed
        c = listed[0]
        assert set(c) >= CONNECTION_KEYS
        m = c["metadata"]
        assert set(m) >= METADATA_KEYS
        assert m["network"] == "tcp" and m["type"] == "Mixed" and m["inbound"] == "mixed-in"
        assert m["sourceIP"] == "127.0.0.1" and m["destinationIP"] == "127.0.0.1"
        assert m["destinationPort"] == str(env.server.port) and m["sourcePort"].isdigit()
        assert c["chains"] == ["direct"] and c["rule"] == "final" and c["rulePayload"] == ""
        assert isinstance(c["upload"], int) and c["upload"] > 0
        started = datetime.fromisoformat(c["start"])
        assert abs(started.timestamp() - time.time()) < 30
        # the counters move while the flow runs
        later = wait_for(lambda: [x for x in _open(env) if x["download"] > c["download"]], 5)
        assert later, "download counter did not move"

        t0 = time.monotonic()
        status, _ = env.api.call("DELETE", f"/connections/{c['id']}")
        assert status == 204
        curl.wait(5)
        ended_in = time.monotonic() - t0
        assert curl.returncode != 0, "curl finished as if the transfer had completed"
        assert ended_in < 2.0, f"the flow took {ended_in:.2f}s to end"
        assert wait_for(lambda: not _open(env), 3)
        transfer = env.server.transfers[before]
        assert wait_for(lambda: transfer.done, 5), "the server side of the flow stayed open"
        line = wait_for(lambda: [f for f in flow_lines(env.ztun.text()) if f.get("end") ==
                                 "closed"], 3)  # fmt: skip
        assert line, env.ztun.text()[-2000:]
        # ztun's count lies between what curl got and what the server sent
        down = int(line[-1]["down"])
        assert out.stat().st_size <= down <= transfer.sent
        assert int(line[-1]["up"]) == transfer.received
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait()
    assert env.api.call("DELETE", f"/connections/{c['id']}")[0] == 404


def test_counters_match_the_bytes_moved(env: Env) -> None:
    before = env.api.get("/ztun/status")["outbounds"].get("direct",
                                                          {"upload": 0, "download": 0})
    first = len(env.server.transfers)
    out = env.tmp / "full.bin"
    curl = env.curl(env.server.url(300, 0), out)
    assert curl.wait(20) == 0
    assert out.stat().st_size == 300_000
    transfer = env.server.transfers[first]
    assert wait_for(lambda: transfer.done and not _open(env), 5)
    after = env.api.get("/ztun/status")["outbounds"]["direct"]
    assert after["download"] - before["download"] == transfer.sent
    assert after["upload"] - before["upload"] == transfer.received
    totals = env.api.get("/connections")
    assert totals["downloadTotal"] >= transfer.sent


def test_delete_all_ends_every_flow(env: Env) -> None:
    curls = [env.curl(env.server.url(400, 50), env.tmp / f"all{i}.bin") for i in range(3)]
    try:
        assert wait_for(lambda: len(_open(env)) == 3, 10), _open(env)
        assert env.api.call("DELETE", "/connections")[0] == 204
        for curl in curls:
            curl.wait(5)
            assert curl.returncode != 0
        assert wait_for(lambda: not _open(env), 3)
    finally:
        for curl in curls:
            if curl.poll() is None:
                curl.kill()
                curl.wait()
    status = env.api.get("/ztun/status")
    assert status["closedByApi"] >= 3


def test_udp_flows_are_tracked_and_closed(env: Env) -> None:
    port = free_port(socket.SOCK_DGRAM)
    with udp_echo(port):
        client = Socks5Udp(env.mixed)
        try:
            dest = Address("127.0.0.1", port)
            client.exchange(dest, b"ping")
            listed = wait_for(lambda: _open(env, "udp"), 5)
            assert len(listed) == 1
            c = listed[0]
            assert c["metadata"]["destinationPort"] == str(port)
            assert c["upload"] == 4 and c["download"] > 0 and c["chains"] == ["direct"]
            assert env.api.call("DELETE", f"/connections/{c['id']}")[0] == 204
            assert wait_for(lambda: not _open(env, "udp"), 3)
            # the association stays usable: the next datagram is a new flow
            client.exchange(dest, b"again")
            again = wait_for(lambda: _open(env, "udp"), 5)
            assert again and again[0]["id"] != c["id"] and again[0]["upload"] == 5
        finally:
            client.close()
    assert wait_for(lambda: not _open(env, "udp"), 5)


def test_streams_as_chunked_http_and_websocket(env: Env) -> None:
    traffic = env.api.chunked("/traffic", 2)
    assert all(set(t) == {"up", "down"} for t in traffic)
    memory = env.api.websocket("/memory", 2)
    assert all(m["inuse"] > 1_000_000 and m["oslimit"] == 0 for m in memory)
    assert all(set(m) == {"inuse", "oslimit"} for m in env.api.chunked("/memory", 1))
    snapshots = env.api.websocket("/connections?interval=200", 2)
    assert all({"downloadTotal", "uploadTotal", "connections"} <= set(s) for s in snapshots)

    # a flow while /logs is read: its log line arrives as {type, payload}
    import threading

    def make_flow() -> None:
        time.sleep(0.5)
        env.curl(env.server.url(1, 0), env.tmp / "log.bin").wait(10)

    thread = threading.Thread(target=make_flow)
    thread.start()
    try:
        lines = env.api.websocket("/logs?level=info", 1)
    finally:
        thread.join()
    assert lines[0]["type"] == "info" and "flow" in lines[0]["payload"]

    traffic = env.api.websocket("/traffic", 2)
    assert all(set(t) == {"up", "down"} for t in traffic)


def test_patch_configs_switches_the_mode(env: Env) -> None:
    try:
        assert env.api.call("PATCH", "/configs", {"mode": "block"})[0] == 204
        assert env.api.get("/configs")["mode"] == "Block"
        assert _status_through(env) != b"200"
        status, body = env.api.call("PATCH", "/configs", {"mode": "Nowhere"})
        assert status == 400 and "Rule" in body["message"]
        assert env.api.call("PATCH", "/configs", "not an object")[0] == 400
        # PUT reloads the same file: applied, and the mode it names survives the reload
        assert env.api.call("PUT", "/configs", {})[0] == 204
        assert env.api.get("/configs")["mode"] == "Block"
    finally:
        assert env.api.call("PATCH", "/configs", {"mode": "Rule"})[0] == 204
    assert _status_through(env) == b"200"


def _status_through(env: Env) -> bytes:
    """The HTTP status curl gets through the mixed inbound."""
    args = [curl_path(), "-s", "-o", "/dev/null", "-w", "%{http_code}", "-x",
            f"http://127.0.0.1:{env.mixed}", env.server.url(1, 0)]  # fmt: skip
    return subprocess.run(args, capture_output=True, timeout=10).stdout


def test_without_a_secret_only_loopback_pages_and_clients(env: Env) -> None:
    assert env.api.call("GET", "/version", headers={"Host": "rebound.example"})[0] == 403
    assert env.api.call("GET", "/version", headers={"Origin": "http://evil.example"})[0] == 403
    port = env.api.base.rsplit(":", 1)[1]
    ok = env.api.call("GET", "/version", headers={"Origin": f"http://127.0.0.1:{port}"})
    assert ok[0] == 200


def test_the_page_and_its_path_checks(env: Env) -> None:
    import urllib.request

    with urllib.request.urlopen(env.api.base + "/ui/", timeout=5) as r:
        page = r.read().decode()
    assert "<title>ztun status</title>" in page
    # self-contained: nothing loaded from elsewhere (no CDN, no external script or style)
    assert "src=" not in page and "<link" not in page and "://" not in page
    # no file outside the page's directory, however the path is spelt
    for path in ("/ui/../server.py", "/ui/%2e%2e/__init__.py", "/ui/..%2f__init__.py"):
        assert env.api.call("GET", path)[0] in (403, 404), path


def test_status_and_top_read_the_api(env: Env) -> None:
    curl = env.curl(env.server.url(200, 50), env.tmp / "cli.bin")
    try:
        assert wait_for(lambda: _open(env), 10)
        run = [sys.executable, "-m", "ztun"]
        cli_env = dict(os.environ, PYTHONPATH=str(REPO))
        api = env.api.base.removeprefix("http://")
        status = subprocess.run([*run, "status", "--api", api], capture_output=True, text=True,
                                timeout=30, env=cli_env)  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert "1 open" in status.stdout and "direct" in status.stdout
        top = subprocess.run([*run, "top", "--api", api, "--count", "2", "--interval", "0.5"],
                             capture_output=True, text=True, timeout=30, env=cli_env)  # fmt: skip
        assert top.returncode == 0, top.stderr
        assert top.stdout.count("connections 1") == 2 and "mixed-in" in top.stdout
        assert f"127.0.0.1:{env.server.port}" in top.stdout
        nobody = f"127.0.0.1:{free_port()}"
        missing = subprocess.run([*run, "status", "--api", nobody], capture_output=True,
                                 text=True, timeout=30, env=cli_env)  # fmt: skip
        assert missing.returncode == 1 and "cannot reach the API" in missing.stderr
    finally:
        curl.kill()
        curl.wait()


def test_the_secret_is_enforced(tmp_path: Path) -> None:
    mixed, api = free_port(), free_port()
    ui = tmp_path / "dashboard"
    ui.mkdir()
    (ui / "index.html").write_text("<p>my own dashboard</p>")
    extra = ', secret: "s3cret", external_ui: dashboard'
    ztun = start_ztun(tmp_path, CONFIG.format(mixed=mixed, api=api, extra=extra), mixed)
    try:
        assert wait_for(lambda: _listening(api), 10)
        assert Api(api).call("GET", "/version")[0] == 401
        assert Api(api, "wrong").call("GET", "/connections")[0] == 401
        assert Api(api, "s3cret").call("GET", "/version")[0] == 200
        assert Api(api).call("GET", "/version?token=s3cret")[0] == 200
        assert Api(api).call("DELETE", "/connections")[0] == 401
        assert Api(api, "s3cret").websocket("/memory", 1, query_token=True)[0]["inuse"] > 0
        # with a secret, the Host is not checked (it may be reached by any name)
        assert Api(api, "s3cret").call("GET", "/version", headers={"Host": "h.example"})[0] == 200
        # external_ui: the user's own page, without the secret (it holds no data)
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{api}/ui/", timeout=5) as r:
            assert b"my own dashboard" in r.read()
    finally:
        ztun.stop()
