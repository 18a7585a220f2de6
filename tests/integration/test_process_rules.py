"""Routing by the flow's local process and user (`process_name`, `process_path_regex`,
`user`), in network namespaces, against real clients.

ztun (a TUN with auto_route, and a mixed inbound on loopback) runs in a client namespace;
HTTP and TCP/UDP echo run in a server namespace. Rules: the user `nobody` is blocked; a
program named `zt-blocked` (a copy of this Python) is blocked for TCP by name and for UDP by a
path regex; everything else goes direct. curl runs as root and as nobody (`setpriv`), the
Python client as itself and as `zt-blocked`; a client that exits before its lookup is routed as
unknown, without an error. The same TCP rule holds with auto_redirect (a second ztun, in
namespaces of its own), where the flow arrives through nftables instead of the TUN.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import need

from .netns import (
    DIRECT4,
    DIRECT6,
    Topology,
    in_ns,
    require_tun_environment,
    topology,
    wait_tcp,
    wait_until,
)
from .peers import Proc, flow_lines
from .test_tun_linux import start_ztun

pytestmark = [pytest.mark.netns]

HTTP_PORT = 8080
MIXED_PORT = 1080
#: a port the first rule sends direct, before any rule on the owner (nothing listens there)
EARLY_PORT = 9

CONFIG = f"""\
log: {{level: debug}}
inbounds:
  - type: tun
    tag: tun-in
    interface_name: ztun0
    address: [198.18.0.1/30, "fdfe:dcba:9876::1/126"]
    auto_route: true
    udp_timeout: 3s
  - {{type: mixed, tag: mixed-in, listen: 127.0.0.1, listen_port: {MIXED_PORT}}}
outbounds:
  - {{type: direct, tag: direct}}
  - {{type: block, tag: block}}
route:
  rules:
    - {{port: [{EARLY_PORT}], outbound: direct}}
    - {{user: [nobody], outbound: block}}
    - {{process_name: [zt-blocked], network: tcp, outbound: block}}
    - {{process_path_regex: ["/zt-blocked$"], network: udp, outbound: block}}
  final: direct
"""

#: The Python client: `NET HOST PORT MODE`; MODE "talk" echoes one message, "exit" sends and
#: exits at once (before ztun can look it up, most of the time). Prints one JSON line.
CLIENT = r"""
import json, os, socket, sys
net, host, port, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
kind = socket.SOCK_STREAM if net == "tcp" else socket.SOCK_DGRAM
s = socket.socket(fam, kind)
s.settimeout(1.5)
r = "timeout"
try:
    if net == "tcp":
        s.connect((host, port))
        if mode == "exit":
            print(json.dumps({"port": s.getsockname()[1]}), flush=True)
            os._exit(0)
        s.sendall(b"ping")
        data = s.recv(100)
        r = "ok" if data == b"ping" else "got %r" % data
    else:
        s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", 0))
        if mode == "exit":
            s.sendto(b"x", (host, port))
            print(json.dumps({"port": s.getsockname()[1]}), flush=True)
            os._exit(0)
        for _ in range(2):
            try:
                s.sendto(b"ping", (host, port))
                data, _ = s.recvfrom(100)
                r = "ok" if data == b"echo:ping" else "got %r" % data
                break
            except TimeoutError:
                continue
except OSError as e:
    r = "error %s" % e.errno
print(json.dumps({"result": r, "port": s.getsockname()[1]}))
"""

#: A SOCKS5 UDP ASSOCIATE client of the mixed inbound: `PROXY_PORT HOST PORT`; one echo.
SOCKS_UDP = r"""
import json, socket, struct, sys
proxy, host, port = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
c = socket.create_connection(("127.0.0.1", proxy), 3)
c.sendall(b"\x05\x01\x00")
assert c.recv(2) == b"\x05\x00"
c.sendall(b"\x05\x03\x00\x01" + bytes(4) + bytes(2))
rep = c.recv(10)
relay = (socket.inet_ntoa(rep[4:8]), struct.unpack(">H", rep[8:10])[0])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(1.5)
head = b"\x00\x00\x00\x01" + socket.inet_aton(host) + struct.pack(">H", port)
r = "timeout"
for _ in range(2):
    u.sendto(head + b"ping", relay)
    try:
        data, _ = u.recvfrom(200)
    except TimeoutError:
        continue
    r = "ok" if data[10:] == b"echo:ping" else "got %r" % data
    break
print(json.dumps({"result": r}))
"""


@dataclass
class Env:
    t: Topology
    tmp: Path
    ztun: Proc
    blocked_python: Path


def blocked_copy(tmp: Path) -> Path:
    """Another name for the same program: /proc/PID/exe gives the copy's path (a symlink
    would resolve to the original)."""
    blocked = tmp / "zt-blocked"
    shutil.copy2(sys.executable, blocked)
    return blocked


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_tun_environment()
    need(shutil.which("setpriv"), "setpriv (util-linux)")
    try:
        nobody = pwd.getpwuid(65534).pw_name
    except KeyError:
        nobody = None
    need(nobody if nobody == "nobody" else None, "the user nobody (uid 65534)")
    tmp = tmp_path_factory.mktemp("procrule")
    www = tmp / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello\n")
    blocked = blocked_copy(tmp)
    procs: list[Proc] = []
    with topology() as t:
        try:
            s = t.server
            procs.append(Proc(["ip", "netns", "exec", s, sys.executable, "-m", "http.server",
                               str(HTTP_PORT), "--bind", "::", "--directory", str(www)],
                              tmp / "http.log"))  # fmt: skip
            procs.append(Proc(["ip", "netns", "exec", s, sys.executable,
                               str(Path(__file__).parent / "tun_server.py")],
                              tmp / "echo.log"))  # fmt: skip
            for port in (HTTP_PORT, 7):
                wait_tcp(s, "127.0.0.1", port)
            z = start_ztun(t, tmp, config=CONFIG)
            procs.append(z)
            yield Env(t, tmp, z, blocked)
        finally:
            for p in reversed(procs):
                p.stop()


def python(env: Env, *args: str, blocked: bool = False) -> dict[str, object]:
    exe = str(env.blocked_python) if blocked else sys.executable
    r = in_ns(env.t.client, exe, "-c", CLIENT, *args, check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def curl(env: Env, *args: str, as_nobody: bool = False) -> tuple[int, str, float]:
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if as_nobody else []
    t0 = time.monotonic()
    r = in_ns(env.t.client, *prefix, "curl", "-sS", "--max-time", "10", *args, check=False,
              timeout=30)  # fmt: skip
    return r.returncode, r.stdout, time.monotonic() - t0


def url(host: str) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{HTTP_PORT}/hello.txt"


def lines_for(env: Env, port: int, timeout: float = 8.0) -> list[dict[str, str]]:
    """The flow lines of the flow from source port `port` (waiting for one)."""

    def found() -> list[dict[str, str]]:
        return [f for f in flow_lines(env.ztun.text())
                if f.get("source", "").endswith(f":{port}")]  # fmt: skip

    wait_until(lambda: bool(found()), timeout)
    return found()


@pytest.mark.parametrize("target", [DIRECT4, DIRECT6])
def test_curl_by_user(env: Env, target: str) -> None:
    code, body, took = curl(env, url(target))
    assert code == 0 and body == "hello\n", (code, body)
    # Bound: a flow that waits for its owner is not held up noticeably.
    assert took < 3.0, took
    code, body, _ = curl(env, url(target), as_nobody=True)
    assert code != 0 and body == "", (code, body)
    log = flow_lines(env.ztun.text())
    mine = [f for f in log if f.get("uid") == "65534" and f.get("outbound") == "block"]
    assert mine and mine[-1].get("process") == "curl", log[-3:]
    root = [f for f in log if f.get("uid") == "0" and f.get("process") == "curl"]
    assert root and root[-1]["outbound"] == "direct", log[-3:]
    assert root[-1]["process_path"].endswith("/curl")


@pytest.mark.parametrize("target", [DIRECT4, DIRECT6])
def test_tcp_by_process_name(env: Env, target: str) -> None:
    assert python(env, "tcp", target, "7", "talk")["result"] == "ok"
    r = python(env, "tcp", target, "7", "talk", blocked=True)
    assert r["result"] != "ok", r
    lines = lines_for(env, int(r["port"]))  # type: ignore[call-overload]
    assert lines and lines[0]["outbound"] == "block" and lines[0]["process"] == "zt-blocked"
    assert lines[0]["process_path"] == str(env.blocked_python)


@pytest.mark.parametrize("target", [DIRECT4, DIRECT6])
def test_flows_decided_before_the_owner_rules_are_not_looked_up(env: Env, target: str) -> None:
    """The first rule decides port 9 before any rule on the owner: even zt-blocked's flow
    there goes direct, and its line has no owner (no lookup ran); its flow to port 7 reaches
    the owner rules and is looked up (and blocked)."""
    early = python(env, "tcp", target, str(EARLY_PORT), "talk", blocked=True)
    line = lines_for(env, int(early["port"]))[0]  # type: ignore[call-overload]
    assert line["outbound"] == "direct" and line["rule"] == "0", line
    assert "uid" not in line and "process" not in line, line
    late = python(env, "tcp", target, "7", "talk", blocked=True)
    line = lines_for(env, int(late["port"]))[0]  # type: ignore[call-overload]
    assert line["outbound"] == "block" and line["process"] == "zt-blocked", line


@pytest.mark.parametrize("target", [DIRECT4, DIRECT6])
def test_udp_by_process_path_regex(env: Env, target: str) -> None:
    assert python(env, "udp", target, "7", "talk")["result"] == "ok"
    r = python(env, "udp", target, "7", "talk", blocked=True)
    assert r["result"] != "ok", r
    lines = lines_for(env, int(r["port"]))  # type: ignore[call-overload]
    assert lines and lines[0]["outbound"] == "block" and lines[0]["process"] == "zt-blocked"


def test_mixed_inbound_by_user(env: Env) -> None:
    proxy = ["-x", f"socks5h://127.0.0.1:{MIXED_PORT}"]
    code, body, _ = curl(env, *proxy, url(DIRECT4))
    assert code == 0 and body == "hello\n", (code, body)
    code, body, _ = curl(env, *proxy, url(DIRECT4), as_nobody=True)
    assert code != 0 and body == "", (code, body)
    log = flow_lines(env.ztun.text())
    mixed = [f for f in log if f.get("inbound") == "mixed-in"]
    assert any(f.get("uid") == "65534" and f["outbound"] == "block" for f in mixed), mixed
    assert any(f.get("process") == "curl" and f["outbound"] == "direct" for f in mixed), mixed


def test_mixed_inbound_udp_by_process(env: Env) -> None:
    """A UDP ASSOCIATE's flows have the owner of the client's control connection."""
    args = ("-c", SOCKS_UDP, str(MIXED_PORT), DIRECT4, "7")
    r = in_ns(env.t.client, sys.executable, *args, check=False, timeout=30)
    assert r.returncode == 0 and json.loads(r.stdout)["result"] == "ok", r.stdout + r.stderr
    r = in_ns(env.t.client, str(env.blocked_python), *args, check=False, timeout=30)
    assert r.returncode == 0 and json.loads(r.stdout)["result"] == "timeout", r.stdout + r.stderr
    lines = [f for f in flow_lines(env.ztun.text())
             if f.get("inbound") == "mixed-in" and f.get("network") == "udp"]  # fmt: skip
    assert any(f.get("process") == "zt-blocked" and f["outbound"] == "block" for f in lines)


@pytest.mark.parametrize("net", ["udp", "tcp"])
def test_process_gone_before_lookup(env: Env, net: str) -> None:
    """A client that exits at once: routed as unknown (direct) if its socket is gone by the
    lookup, by its name if not; never an error, and ztun goes on."""
    r = python(env, net, DIRECT4, "7", "exit", blocked=True)
    lines = lines_for(env, int(r["port"]))  # type: ignore[call-overload]
    assert lines, env.ztun.text()[-2000:]
    line = lines[0]
    if line.get("process") == "zt-blocked":
        assert line["outbound"] == "block"
    else:
        assert line["outbound"] == "direct" and "process" not in line, line
    assert "Traceback" not in env.ztun.text()
    assert env.ztun.p.poll() is None
    assert python(env, "udp", DIRECT4, "7", "talk")["result"] == "ok"


# -- auto_redirect ----------------------------------------------------------------------------

#: The TUN config with auto_redirect: TCP reaches ztun through nftables and its loopback
#: listener, and is routed once accepted (LookupFirst, as on the TUN).
REDIRECT_CONFIG = """\
log: {level: debug}
inbounds:
  - type: tun
    tag: tun-in
    interface_name: ztun0
    address: [198.18.0.1/30, "fdfe:dcba:9876::1/126"]
    auto_route: true
    auto_redirect: true
outbounds:
  - {type: direct, tag: direct}
  - {type: block, tag: block}
route:
  rules:
    - {process_name: [zt-blocked], network: tcp, outbound: block}
  final: direct
"""


@pytest.fixture(scope="module")
def redirect_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from .test_tun_redirect import require_nftables

    require_nftables()
    tmp = tmp_path_factory.mktemp("procrule-redirect")
    blocked = blocked_copy(tmp)
    procs: list[Proc] = []
    with topology() as t:
        try:
            procs.append(Proc(["ip", "netns", "exec", t.server, sys.executable,
                               str(Path(__file__).parent / "tun_server.py")],
                              tmp / "echo.log"))  # fmt: skip
            wait_tcp(t.server, "127.0.0.1", 7)
            z = start_ztun(t, tmp, "ztun-redirect", config=REDIRECT_CONFIG)
            procs.append(z)
            assert "auto_redirect" in z.text() and "auto_redirect is off" not in z.text()
            yield Env(t, tmp, z, blocked)
        finally:
            for p in reversed(procs):
                p.stop()


@pytest.mark.parametrize("target", [DIRECT4, DIRECT6])
def test_redirected_tcp_by_process_name(redirect_env: Env, target: str) -> None:
    """A redirected flow is routed by its owner as a TUN flow is: this Python direct, its
    copy named zt-blocked reset after the handshake; both went through nftables' redirect."""
    from .test_tun_redirect import redirected

    env = redirect_env
    family = "ipv6" if ":" in target else "ipv4"
    before = redirected(env.t)[family]
    mine = python(env, "tcp", target, "7", "talk")
    assert mine["result"] == "ok", mine
    r = python(env, "tcp", target, "7", "talk", blocked=True)
    assert r["result"] != "ok", r
    assert redirected(env.t)[family] == before + 2  # the redirect, not the TUN, carried both
    ok = lines_for(env, int(mine["port"]))  # type: ignore[call-overload]
    assert ok and ok[0]["outbound"] == "direct", ok
    assert ok[0]["process_path"] == os.path.realpath(sys.executable), ok
    refused = lines_for(env, int(r["port"]))  # type: ignore[call-overload]
    assert refused and refused[0]["outbound"] == "block", refused
    assert refused[0]["process"] == "zt-blocked" and refused[0]["end"] == "blocked", refused
    assert refused[0]["process_path"] == str(env.blocked_python)
    assert "Traceback" not in env.ztun.text()
