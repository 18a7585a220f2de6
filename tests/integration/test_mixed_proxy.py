"""ztun's mixed inbound against real peers: curl, sing-box (SOCKS5 with UDP ASSOCIATE),
http.server with a 100 MB file, TCP/UDP echo servers. Everything runs on 127.0.0.1.

One ztun process serves every test of this module; each inbound is routed by an `inbound` rule
to one outbound, so a test picks its path by the port it talks to.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ztun.address import Address
from ztun.proto.socks5 import Reply

from .peers import (
    REPO,
    Proc,
    Socks5Udp,
    curl_path,
    flow_lines,
    free_port,
    singbox_path,
    socks5_connect,
    start_http,
    start_singbox,
    start_ztun,
    tcp_half_close_server,
    udp_echo,
    wait_for,
    write_big_file,
)

BIG = 100 * 1024 * 1024
SB_USERS = [{"username": "sbuser", "password": "sbpass"}]


@dataclass
class Env:
    tmp: Path
    ports: dict[str, int]
    big_sha: str
    ztun: Proc
    singbox: Proc
    config: Path

    def url(self, name: str = "big.bin") -> str:
        return f"http://127.0.0.1:{self.ports['http']}/{name}"


CONFIG = """\
log: {{level: info}}
inbounds:
  - {{type: mixed, tag: mixed-in, listen_port: {direct}}}
  - {{type: mixed, tag: mixed-proxy, listen_port: {proxy}}}
  - type: mixed
    tag: mixed-auth
    listen_port: {auth}
    users: [{{username: alice, password: wonderland}}]
  - {{type: mixed, tag: mixed-badauth, listen_port: {badauth}}}
  - {{type: mixed, tag: mixed-silent, listen_port: {silent_in}}}
outbounds:
  - {{type: direct, tag: direct}}
  - {{type: socks, tag: proxy, server: 127.0.0.1, server_port: {singbox},
     username: sbuser, password: sbpass}}
  - {{type: socks, tag: proxy-badauth, server: 127.0.0.1, server_port: {singbox},
     username: sbuser, password: wrong}}
  - {{type: socks, tag: proxy-silent, server: 127.0.0.1, server_port: {silent},
     connect_timeout: 1s}}
  - {{type: block, tag: block}}
route:
  rules:
    - {{domain_suffix: blocked.test, outbound: block}}
    - {{ip_cidr: 127.0.0.2/32, outbound: block}}
    - {{inbound: [mixed-proxy, mixed-auth], outbound: proxy}}
    - {{inbound: mixed-badauth, outbound: proxy-badauth}}
    - {{inbound: mixed-silent, outbound: proxy-silent}}
  final: direct
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    curl_path()
    singbox_path()
    tmp = tmp_path_factory.mktemp("mixed")
    www = tmp / "www"
    www.mkdir()
    sha = write_big_file(www / "big.bin", BIG)
    (www / "small.txt").write_text("hello through ztun\n")
    names = ["http", "direct", "proxy", "auth", "badauth", "silent_in", "singbox", "silent",
             "udp_echo", "tcp_echo"]  # fmt: skip
    ports = {n: free_port() for n in names}
    procs: list[Proc] = []
    silent = socket.socket()
    silent.bind(("127.0.0.1", ports["silent"]))
    silent.listen(8)  # accepts in the kernel, never answers: a proxy that hangs
    try:
        procs.append(start_http(tmp, www, ports["http"]))
        sb = start_singbox(tmp, ports["singbox"], SB_USERS)
        procs.append(sb)
        z = start_ztun(tmp, CONFIG.format(**ports), ports["direct"])
        procs.append(z)
        for p in ("proxy", "auth", "badauth", "silent_in"):
            from .peers import wait_port

            wait_port(ports[p], z.p)
        with udp_echo(ports["udp_echo"]), tcp_half_close_server(ports["tcp_echo"]):
            yield Env(tmp, ports, sha, z, sb, tmp / "ztun.yaml")
    finally:
        for p in reversed(procs):
            p.stop()
        # sing-box may have been restarted by a test: Env.singbox is the live one.
        silent.close()


def curl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([curl_path(), "-sS", "--max-time", "30", *args],
                          capture_output=True, timeout=timeout)  # fmt: skip


def curl_sha(*args: str) -> str:
    r = curl(*args)
    assert r.returncode == 0, r.stderr.decode()
    return hashlib.sha256(r.stdout).hexdigest()


def status(*args: str) -> str:
    r = curl("-o", "/dev/null", "-w", "%{http_code}", *args)
    return r.stdout.decode()


# -- bulk TCP, byte-exact -----------------------------------------------------------------------


def test_direct_socks5_and_http_proxy_100mb(env: Env) -> None:
    p = env.ports["direct"]
    assert curl_sha("--socks5-hostname", f"127.0.0.1:{p}", env.url()) == env.big_sha
    assert curl_sha("-x", f"http://127.0.0.1:{p}", env.url()) == env.big_sha
    small = curl("-p", "-x", f"http://127.0.0.1:{p}", env.url("small.txt"))
    assert small.stdout == b"hello through ztun\n"
    socks4a = curl("--socks4a", f"127.0.0.1:{p}", env.url("small.txt"))
    assert socks4a.stdout == b"hello through ztun\n"


def test_socks_outbound_100mb(env: Env) -> None:
    p = env.ports["proxy"]
    assert curl_sha("--socks5-hostname", f"127.0.0.1:{p}", env.url()) == env.big_sha
    # A domain goes to the proxy unresolved: sing-box resolves "localhost" itself.
    url = f"http://localhost:{env.ports['http']}/small.txt"
    r = curl("-p", "-x", f"http://127.0.0.1:{p}", "--ipv4", url)
    assert r.stdout == b"hello through ztun\n", r.stderr


# -- half-close -----------------------------------------------------------------------------------


@pytest.mark.parametrize("inbound", ["direct", "proxy"])
def test_half_close(env: Env, inbound: str) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    s, code = socks5_connect(env.ports[inbound], Address("127.0.0.1", env.ports["tcp_echo"]))
    assert code == 0
    with s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)  # our FIN must reach the server, and its answer still come back
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    assert answer.decode().split() == [str(len(data)), hashlib.sha256(data).hexdigest()]


# -- UDP ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inbound", ["direct", "proxy"])
def test_udp_echo(env: Env, inbound: str) -> None:
    echo = Address("127.0.0.1", env.ports["udp_echo"])
    c = Socks5Udp(env.ports[inbound])
    try:
        for size in (1, 512, 1400, 8000):
            payload = os.urandom(size)
            src, reply = c.exchange(echo, payload)
            assert src == echo and reply == b"echo:" + payload
    finally:
        c.close()


def test_udp_via_socks_with_inbound_auth(env: Env) -> None:
    echo = Address("127.0.0.1", env.ports["udp_echo"])
    c = Socks5Udp(env.ports["auth"], "alice", "wonderland")
    try:
        assert c.exchange(echo, b"ping")[1] == b"echo:ping"
    finally:
        c.close()


# -- auth on both sides ---------------------------------------------------------------------------


def test_inbound_auth(env: Env) -> None:
    p = env.ports["auth"]
    url = env.url("small.txt")
    assert status("-x", f"http://127.0.0.1:{p}", url) == "407"
    assert status("-x", f"http://alice:nope@127.0.0.1:{p}", url) == "407"
    assert status("-x", f"http://alice:wonderland@127.0.0.1:{p}", url) == "200"
    assert status("-p", "-x", f"http://alice:wonderland@127.0.0.1:{p}", url) == "200"
    assert curl("--socks5-hostname", f"127.0.0.1:{p}", url).returncode != 0
    assert curl("--socks5-hostname", f"alice:nope@127.0.0.1:{p}", url).returncode != 0
    ok = curl("--socks5-hostname", f"alice:wonderland@127.0.0.1:{p}", url)
    assert ok.stdout == b"hello through ztun\n"
    assert curl("--socks4a", f"127.0.0.1:{p}", url).returncode != 0


def test_outbound_auth_refused(env: Env) -> None:
    p = env.ports["badauth"]
    assert status("-x", f"http://127.0.0.1:{p}", env.url("small.txt")) == "502"
    s, code = socks5_connect(p, Address("127.0.0.1", env.ports["http"]))
    s.close()
    assert code == Reply.GENERAL_FAILURE
    lines = wait_for(lambda: [f for f in flow_lines(env.ztun.text())
                              if f.get("outbound") == "proxy-badauth"])  # fmt: skip
    assert lines and all("auth" in f.get("error", "").lower() for f in lines)


# -- block, errors --------------------------------------------------------------------------------


def test_block(env: Env) -> None:
    p = env.ports["direct"]
    assert status("-x", f"http://127.0.0.1:{p}", "http://www.blocked.test/") == "403"
    s, code = socks5_connect(p, Address("x.blocked.test", 443))
    s.close()
    assert code == Reply.NOT_ALLOWED
    c = Socks5Udp(p)
    try:
        c.send(Address("127.0.0.2", env.ports["udp_echo"]), b"dropped")
        assert c.recv(0.3) is None
    finally:
        c.close()
    lines = wait_for(lambda: [f for f in flow_lines(env.ztun.text()) if f.get("end") == "blocked"
                              and f.get("network") == "udp"])  # fmt: skip
    assert lines and lines[0]["outbound"] == "block"


def test_unreachable_and_timeout(env: Env) -> None:
    closed = free_port()
    s, code = socks5_connect(env.ports["direct"], Address("127.0.0.1", closed))
    s.close()
    assert code == Reply.CONNECTION_REFUSED
    assert status("-x", f"http://127.0.0.1:{env.ports['direct']}",
                  f"http://127.0.0.1:{closed}/") == "502"  # fmt: skip
    # The proxy accepts TCP but never answers: connect_timeout (1s) → 504, one clear line.
    assert status("-x", f"http://127.0.0.1:{env.ports['silent_in']}", env.url("small.txt")) == "504"
    text = env.ztun.text()
    assert "Traceback" not in text
    assert any(f.get("outbound") == "proxy-silent" and "1s" in f.get("error", "")
               for f in flow_lines(text))  # fmt: skip


# -- the live path agrees with `ztun route` ---------------------------------------------------


def test_rules_match_ztun_route(env: Env) -> None:
    flows = [f for f in flow_lines(env.ztun.text()) if f.get("rule") not in (None, "-")]
    seen: dict[tuple[str, str, str], dict[str, str]] = {}
    for f in flows:
        seen.setdefault((f["inbound"], f["network"], f["destination"]), f)
    assert len(seen) >= 5
    for (inbound, network, destination), f in sorted(seen.items()):
        host, _, port = destination.rpartition(":")
        cmd = [sys.executable, "-m", "ztun", "route", str(env.config), host.strip("[]"),
               "--port", port, "--network", network, "--inbound", inbound, "--json"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=30)
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)
        assert str(answer["rule"]) == f["rule"], (destination, inbound, answer, f)
        assert (answer["outbound"] or "") == f["outbound"] or f["outbound"].startswith("reject")


# -- the proxy goes away and comes back (runs last: it restarts sing-box) ---------------------


def test_proxy_down_and_restart(env: Env) -> None:
    p = env.ports["proxy"]
    echo = Address("127.0.0.1", env.ports["udp_echo"])
    c = Socks5Udp(p)
    try:
        assert c.exchange(echo, b"before")[1] == b"echo:before"
        env.singbox.stop()
        # The association's control connection dies with the proxy: its flows end cleanly.
        assert wait_for(lambda: "session ended" in env.ztun.text(), 5)
        assert status("-x", f"http://127.0.0.1:{p}", env.url("small.txt")) == "502"
        s, code = socks5_connect(p, Address("127.0.0.1", env.ports["http"]))
        s.close()
        assert code == Reply.GENERAL_FAILURE
        c.send(echo, b"while down")
        assert c.recv(0.5) is None
        env.singbox = start_singbox(env.tmp, env.ports["singbox"], SB_USERS)
        # TCP works again, and the same client association re-associates upstream.
        assert status("-x", f"http://127.0.0.1:{p}", env.url("small.txt")) == "200"
        assert c.exchange(echo, b"after", tries=10)[1] == b"echo:after"
    finally:
        c.close()
        env.singbox.stop()
    text = env.ztun.text()
    assert "Traceback" not in text
    assert "cannot reach the proxy" in text
