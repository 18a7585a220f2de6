"""Live reload (issue 14) on loopback, against real peers: SIGHUP, `ztun reload` and
`PUT /configs` while a transfer runs through the mixed inbound.

ztun (mixed inbound, Clash API), sing-box as the SOCKS5 server behind the `proxy` outbound and
http.server with a 24 MiB file all listen on 127.0.0.1. A transfer limited to 4 MiB/s keeps
going through each reload and must arrive sha256-exact on the route it started with, while new
flows take the new rules. The TUN side is tests/integration/test_reload_tun.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .peers import (
    REPO,
    Proc,
    curl_path,
    flow_lines,
    free_port,
    singbox_path,
    start_http,
    start_singbox,
    wait_for,
    wait_port,
    write_big_file,
)

pytestmark = [pytest.mark.singbox]

BIG = 24 * 1024 * 1024
RATE = "4M"  # bytes a second: the transfer lasts about 6 s, long enough to span a reload
#: The bound asserted on a reload of this small config (measured: ~0.05 s).
RELOAD_BOUND = 5.0

CONFIG = """\
log: {{level: info}}
inbounds:
  - {{type: mixed, tag: mixed-in, listen: 127.0.0.1, listen_port: {mixed}}}
outbounds:
  - {{type: direct, tag: direct}}
  - {{type: socks, tag: proxy, server: 127.0.0.1, server_port: {socks}}}
  - {{type: block, tag: block}}
route:
  rules:
    - {{clash_mode: Block, outbound: block}}
  final: {final}
experimental:
  clash_api: {{external_controller: "127.0.0.1:{api}"}}
"""


@dataclass
class Env:
    tmp: Path
    config: Path
    ports: dict[str, int]
    sha: str
    ztun: Proc

    def url(self, name: str = "big.bin") -> str:
        return f"http://127.0.0.1:{self.ports['http']}/{name}"

    def write(self, final: str, mixed: int | None = None, text: str | None = None) -> None:
        p = self.ports
        self.config.write_text(text if text is not None else CONFIG.format(
            mixed=mixed or p["mixed"], socks=p["socks"], final=final, api=p["api"]))  # fmt: skip

    def api(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports['api']}{path}", data=data,
                                     method=method)  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, json.loads(raw) if raw else None

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(self.tmp / "state"))
        return subprocess.run([sys.executable, "-m", "ztun", "reload", *args, str(self.config)],
                              capture_output=True, text=True, timeout=120, env=env)  # fmt: skip

    def reloads_done(self) -> int:
        return len(re.findall(r"reload \(\w+\): done in", self.ztun.text()))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    curl_path()
    singbox_path()
    tmp = tmp_path_factory.mktemp("reload")
    www = tmp / "www"
    www.mkdir()
    sha = write_big_file(www / "big.bin", BIG)
    (www / "small.txt").write_text("small\n")
    ports = {n: free_port() for n in ("http", "socks", "mixed", "mixed2", "api")}
    procs: list[Proc] = []
    try:
        procs.append(start_http(tmp, www, ports["http"]))
        procs.append(start_singbox(tmp, ports["socks"]))
        config = tmp / "ztun.yaml"
        e = Env(tmp, config, ports, sha, None)  # type: ignore[arg-type]
        e.write("direct")
        run_env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(tmp / "state"))
        e.ztun = Proc([sys.executable, "-m", "ztun", "run", str(config)], tmp / "ztun.log",
                      run_env)  # fmt: skip
        procs.append(e.ztun)
        wait_port(ports["mixed"], e.ztun.p)
        assert wait_for(lambda: "ztun started" in e.ztun.text(), 10)
        yield e
    finally:
        for p in reversed(procs):
            p.stop()


class Transfer:
    """A rate-limited curl whose output is hashed as it arrives."""

    def __init__(self, *args: str, prefix: tuple[str, ...] = ()) -> None:
        self.p = subprocess.Popen([*prefix, curl_path(), "-sS", "--max-time", "60",
                                   "--limit-rate", RATE, *args], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)  # fmt: skip
        self.h = hashlib.sha256()
        self.size = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        while chunk := self.p.stdout.read(1 << 16):
            self.h.update(chunk)
            self.size += len(chunk)

    def result(self) -> str:
        assert self.p.wait(70) == 0, self.p.stderr.read() if self.p.stderr else ""
        self.thread.join(10)
        return self.h.hexdigest()


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([curl_path(), "-sS", "--max-time", "10", *args],
                          capture_output=True, timeout=30)  # fmt: skip


def small_via(env: Env, port: int) -> dict[str, str]:
    """A new flow through the mixed inbound on `port`; its flow line."""
    before = len(flow_lines(env.ztun.text()))
    r = curl("--socks5-hostname", f"127.0.0.1:{port}", env.url("small.txt"))
    assert r.returncode == 0 and r.stdout == b"small\n", r.stderr
    lines = wait_for(lambda: flow_lines(env.ztun.text())[before:], 5)
    return lines[-1]  # type: ignore[no-any-return]


def reload_seconds(env: Env) -> float:
    return float(re.findall(r"reload \(\w+\): done in ([0-9.]+)s", env.ztun.text())[-1])


def test_sighup_switches_rules_and_restarts_the_changed_mixed_inbound(env: Env) -> None:
    p = env.ports
    assert small_via(env, p["mixed"])["outbound"] == "direct"
    # the clash mode survives a reload whose config still names it
    assert env.api("PATCH", "/configs", {"mode": "block"})[0] == 204
    assert env.api("PATCH", "/configs", {"mode": "Rule"})[0] == 204
    transfer = Transfer("--socks5-hostname", f"127.0.0.1:{p['mixed']}", env.url())
    assert wait_for(lambda: transfer.size > 1 << 20, 10)
    done = env.reloads_done()
    env.write("proxy", mixed=p["mixed2"])  # new rules and a new port: the inbound restarts
    os.kill(env.ztun.pid, signal.SIGHUP)
    assert wait_for(lambda: env.reloads_done() > done, 15), env.ztun.text()
    assert reload_seconds(env) < RELOAD_BOUND
    assert "restarted: mixed-in" in env.ztun.text()
    assert transfer.p.poll() is None, "the transfer should still be running"
    # new flows: the new port, the new rules; the old port is closed
    assert small_via(env, p["mixed2"])["outbound"] == "proxy"
    assert curl("--socks5-hostname", f"127.0.0.1:{p['mixed']}", env.url("small.txt")).returncode
    # the transfer that began before goes on to the end on its route
    assert transfer.result() == env.sha
    flow = wait_for(lambda: [f for f in flow_lines(env.ztun.text())
                             if int(f.get("down", "0")) >= BIG], 5)  # fmt: skip
    assert flow[-1]["outbound"] == "direct" and flow[-1]["end"] == "eof"


def test_bad_config_is_refused_with_its_errors_and_the_old_one_keeps_working(env: Env) -> None:
    p = env.ports
    env.write("proxy", mixed=p["mixed2"])
    env.api("PUT", "/configs", {})
    transfer = Transfer("--socks5-hostname", f"127.0.0.1:{p['mixed2']}", env.url())
    assert wait_for(lambda: transfer.size > 1 << 20, 10)
    env.write("nowhere", mixed=p["mixed2"])
    r = env.cli()  # through the API, which the run file names
    assert r.returncode == 1
    assert re.search(r"ztun\.yaml:\d+:\d+: route\.final: no outbound tagged 'nowhere'", r.stderr)
    assert "the running one stays" in r.stderr
    # the API answers 400 with the same errors
    status, body = env.api("PUT", "/configs", {})
    assert status == 400 and isinstance(body, dict)
    assert any("route.final" in e and re.search(r":\d+:\d+:", e) for e in body["errors"])
    # SIGHUP: refused too, logged with file:line:col
    r = env.cli("--signal")
    assert r.returncode == 1 and "route.final" in r.stderr
    assert re.search(r"ERROR reload \(SIGHUP\) refused .*\n  \S+ztun\.yaml:\d+:\d+: route\.final",
                     env.ztun.text())  # fmt: skip
    # a YAML that does not even parse
    env.write("", text="inbounds: [\n")
    status, body = env.api("PUT", "/configs", {})
    assert status == 400 and body["errors"]  # type: ignore[index]
    # the old config still routes, and the transfer never noticed
    assert small_via(env, p["mixed2"])["outbound"] == "proxy"
    assert transfer.result() == env.sha


def test_put_configs_and_ztun_reload_apply_a_good_config(env: Env) -> None:
    p = env.ports
    env.write("direct", mixed=p["mixed2"])
    status, body = env.api("PUT", "/configs", {})
    assert status == 204, body
    assert reload_seconds(env) < RELOAD_BOUND
    assert "inbounds kept: mixed-in" in env.ztun.text().rsplit("reload (API): reading", 1)[1]
    assert small_via(env, p["mixed2"])["outbound"] == "direct"
    env.write("proxy", mixed=p["mixed2"])
    r = env.cli()
    assert r.returncode == 0 and r.stdout.strip() == "reloaded", r.stderr
    assert small_via(env, p["mixed2"])["outbound"] == "proxy"
    env.write("direct", mixed=p["mixed2"])
    r = env.cli("--signal")  # SIGHUP, the outcome read back from the run file
    assert r.returncode == 0 and r.stdout.strip() == "reloaded", r.stderr
    assert small_via(env, p["mixed2"])["outbound"] == "direct"


def test_clash_mode_is_kept_across_a_reload(env: Env) -> None:
    p = env.ports
    assert env.api("PATCH", "/configs", {"mode": "Block"})[0] == 204
    env.write("direct", mixed=p["mixed2"])
    assert env.api("PUT", "/configs", {})[0] == 204
    _, configs = env.api("GET", "/configs")
    assert configs["mode"] == "Block"  # type: ignore[index]
    r = curl("--socks5-hostname", f"127.0.0.1:{p['mixed2']}", env.url("small.txt"))
    assert r.returncode != 0  # the Block rule holds
    assert env.api("PATCH", "/configs", {"mode": "Rule"})[0] == 204
    assert small_via(env, p["mixed2"])["outbound"] == "direct"


def test_reload_during_shutdown_is_ignored(env: Env) -> None:
    """The last test: it stops this ztun."""
    p = env.ports
    transfer = Transfer("--socks5-hostname", f"127.0.0.1:{p['mixed2']}", env.url())
    assert wait_for(lambda: transfer.size > 1 << 20, 10)
    os.kill(env.ztun.pid, signal.SIGTERM)
    assert wait_for(lambda: "SIGTERM: stopping" in env.ztun.text(), 5)
    os.kill(env.ztun.pid, signal.SIGHUP)
    assert env.ztun.p.wait(20) == 0
    text = env.ztun.text()
    assert "SIGHUP: ignored, ztun is stopping" in text
    assert not list((env.tmp / "state").glob("run-*.json"))  # the run file went with it
    transfer.p.kill()
