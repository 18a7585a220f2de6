"""The TUN inbound in network namespaces, against real peers.

One ztun (auto_route, IPv4 and IPv6) runs in a client namespace; sing-box (SOCKS5 with UDP
ASSOCIATE), http.server with a 100 MB file, TCP/UDP echo and iperf3 run in a server namespace.
Rules: 203.0.113.20 / 2001:db8:2::20 go through SOCKS5, .30 / ::30 are blocked, the rest is
direct. Route restoration (SIGTERM, SIGKILL + restart) runs in namespaces of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .netns import (
    BLOCK4,
    BLOCK6,
    DIRECT4,
    DIRECT6,
    PROXY4,
    PROXY6,
    SERVER4,
    SERVER6,
    Topology,
    in_ns,
    require_tun_environment,
    topology,
    wait_tcp,
    wait_until,
)
from .peers import REPO, Proc, flow_lines, singbox_path, wait_for, write_big_file

pytestmark = [pytest.mark.netns, pytest.mark.singbox]

BIG = 100 * 1024 * 1024
HTTP_PORT = 8080
SOCKS_PORT = 1080

CONFIG = """\
log: {{level: info}}
inbounds:
  - type: tun
    tag: tun-in
    interface_name: ztun0
    address: [198.18.0.1/30, "fdfe:dcba:9876::1/126"]
    auto_route: true
    udp_timeout: 30s
outbounds:
  - {{type: direct, tag: direct}}
  - {{type: socks, tag: proxy, server: {socks}, server_port: {socks_port}}}
  - {{type: block, tag: block}}
route:
  rules:
    - {{ip_cidr: [{proxy4}/32, "{proxy6}/128"], outbound: proxy}}
    - {{ip_cidr: [{block4}/32, "{block6}/128"], outbound: block}}
  final: direct
"""


def config_text() -> str:
    return CONFIG.format(socks=SERVER4, socks_port=SOCKS_PORT, proxy4=PROXY4, proxy6=PROXY6,
                         block4=BLOCK4, block6=BLOCK6)  # fmt: skip


def start_ztun(
    t: Topology, tmp: Path, name: str = "ztun", offload: bool = True, config: str | None = None
) -> Proc:
    cfg = tmp / f"{name}.yaml"
    cfg.write_text(config if config is not None else config_text())
    env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(tmp / "state"),
               ZTUN_TUN_OFFLOAD="1" if offload else "0")  # fmt: skip
    proc = Proc(["ip", "netns", "exec", t.client, sys.executable, "-m", "ztun", "run", str(cfg)],
                tmp / f"{name}.log", env)  # fmt: skip
    ok = wait_until(lambda: "ztun started" in proc.text() or proc.p.poll() is not None, 20)
    if not ok or proc.p.poll() is not None:
        proc.stop()  # a ztun that did not start never outlives the test's namespaces
        raise AssertionError(proc.text())
    return proc


def start_socks_server(t: Topology, tmp: Path, procs: list[Proc], *, wait: bool = True) -> None:
    """sing-box as a SOCKS5 server on SOCKS_PORT in the server namespace, into `procs`."""
    cfg = tmp / "sing-box.json"
    cfg.write_text(json.dumps({
        "log": {"level": "warn"},
        "inbounds": [{"type": "socks", "tag": "in", "listen": "::", "listen_port": SOCKS_PORT}],
        "outbounds": [{"type": "direct", "tag": "direct"}],
    }))  # fmt: skip
    procs.append(Proc(["ip", "netns", "exec", t.server, singbox_path(), "run", "-c", str(cfg)],
                      tmp / "sing-box.log"))  # fmt: skip
    if wait:
        wait_tcp(t.server, "127.0.0.1", SOCKS_PORT)


@contextlib.contextmanager
def echo_server(t: Topology, tmp: Path) -> Iterator[Proc]:
    """The TCP and UDP echo (tun_server.py, port 7) in the server namespace, up, for the
    block; stopped after it."""
    echo = Proc(["ip", "netns", "exec", t.server, sys.executable,
                 str(Path(__file__).parent / "tun_server.py")], tmp / "echo.log")  # fmt: skip
    try:
        wait_tcp(t.server, "127.0.0.1", 7)
        yield echo
    finally:
        echo.stop()


def start_server_peers(t: Topology, tmp: Path, www: Path, procs: list[Proc],
                       *, iperf: bool = False) -> None:
    """In the server namespace: sing-box as a SOCKS5 server (SOCKS_PORT), a web server for
    `www` (HTTP_PORT), the TCP echo (port 7) and, with `iperf`, iperf3 (5201); returns once
    each listens. Each goes into `procs` as it starts, for the caller to stop (reversed)."""
    s = t.server
    start_socks_server(t, tmp, procs, wait=False)
    procs.append(Proc(["ip", "netns", "exec", s, sys.executable, "-m", "http.server",
                       str(HTTP_PORT), "--bind", "::", "--directory", str(www)],
                      tmp / "http.log"))  # fmt: skip
    echo = str(Path(__file__).parent / "tun_server.py")
    procs.append(Proc(["ip", "netns", "exec", s, sys.executable, echo], tmp / "echo.log"))
    ports = [SOCKS_PORT, HTTP_PORT, 7]
    if iperf:
        procs.append(Proc(["ip", "netns", "exec", s, "iperf3", "-s", "-p", "5201"],
                          tmp / "iperf3.log"))  # fmt: skip
        ports.append(5201)
    for port in ports:
        wait_tcp(s, "127.0.0.1", port)


@contextlib.contextmanager
def served_topology(
    tmp: Path, www: Path, *, iperf: bool = False
) -> Iterator[tuple[Topology, list[Proc]]]:
    """A client/server topology with `start_server_peers` up, serving `www`: the topology and
    the list of processes, which the caller may add to (its ztun); every one is stopped,
    last first, before the namespaces go."""
    procs: list[Proc] = []
    with topology() as t:
        try:
            start_server_peers(t, tmp, www, procs, iperf=iperf)
            yield t, procs
        finally:
            for p in reversed(procs):
                p.stop()


@dataclass
class Env:
    t: Topology
    tmp: Path
    sha: str
    ztun: Proc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_tun_environment()
    singbox_path()  # before any namespace: a missing sing-box fails (or skips) here
    tmp = tmp_path_factory.mktemp("tun")
    www = tmp / "www"
    www.mkdir()
    sha = write_big_file(www / "big.bin", BIG)
    with served_topology(tmp, www, iperf=True) as (t, procs):
        z = start_ztun(t, tmp)
        procs.append(z)
        yield Env(t, tmp, sha, z)


def url(host: str, path: str = "big.bin") -> str:
    return f"http://[{host}]:{HTTP_PORT}/{path}" if ":" in host else \
        f"http://{host}:{HTTP_PORT}/{path}"  # fmt: skip


def curl_sha(env: Env, target: str) -> str:
    p = subprocess.Popen(["ip", "netns", "exec", env.t.client, "curl", "-sS", "--max-time", "60",
                          url(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    h = hashlib.sha256()
    assert p.stdout is not None
    while chunk := p.stdout.read(1 << 20):
        h.update(chunk)
    assert p.wait(70) == 0, p.stderr.read() if p.stderr else ""
    return h.hexdigest()


def client(env: Env, *args: str, timeout: float = 120) -> dict[str, object]:
    return json.loads(env.t.client_python("tun_client.py", *args, timeout=timeout))  # type: ignore[no-any-return]


# -- TCP --------------------------------------------------------------------------------------


@pytest.mark.parametrize("target,outbound", [(DIRECT4, "direct"), (PROXY4, "proxy"),
                                             (DIRECT6, "direct"), (PROXY6, "proxy")])  # fmt: skip
def test_curl_100mb_sha256(env: Env, target: str, outbound: str) -> None:
    assert curl_sha(env, target) == env.sha

    def ended() -> list[dict[str, str]]:
        return [f for f in flow_lines(env.ztun.text()) if target in f.get("destination", "")]

    # The line is written when ztun sees curl's FIN, which may be just after curl has exited.
    lines = wait_for(ended, 5)
    assert lines and lines[-1]["outbound"] == outbound and lines[-1]["end"] == "eof"
    assert int(lines[-1]["down"]) > BIG


@pytest.mark.parametrize("target", [BLOCK4, BLOCK6])
def test_blocked_destination_refused_at_once(env: Env, target: str) -> None:
    r = client(env, "refused", target, "80")
    assert r["how"] == "errno 111", r  # ECONNREFUSED: the RST came back on the SYN
    assert float(r["seconds"]) < 0.5  # type: ignore[arg-type]


@pytest.mark.parametrize("target", [DIRECT4, DIRECT6])
def test_failed_outbound_resets(env: Env, target: str) -> None:
    # nothing listens on port 9 of the server: the direct outbound is refused, ztun resets
    r = client(env, "refused", target, "9")
    assert r["how"] in ("errno 104", "errno 111"), r
    assert float(r["seconds"]) < 2  # type: ignore[arg-type]


#: Sends N random bytes to a TCP echo server while reading them back; prints whether the
#: echo was byte-exact (both directions through the TUN, with or without super-packets).
BULK_ECHO = """\
import hashlib, os, socket, sys, threading
host, n = sys.argv[1], int(sys.argv[2])
data = os.urandom(n)
s = socket.create_connection((host, 7), 10)
s.settimeout(30)
threading.Thread(target=lambda: (s.sendall(data), s.shutdown(socket.SHUT_WR))).start()
got = bytearray()
while chunk := s.recv(1 << 20):
    got += chunk
print("exact" if hashlib.sha256(got).digest() == hashlib.sha256(data).digest() else len(got))
"""


def bulk_echo(t: Topology, host: str, size: int = 32 << 20) -> str:
    return in_ns(t.client, sys.executable, "-c", BULK_ECHO, host, str(size),
                 timeout=90).stdout.strip()  # fmt: skip


def test_offload_on_by_default(env: Env) -> None:
    assert "offload on" in env.ztun.text(), env.ztun.text()


@pytest.mark.parametrize("target", [DIRECT4, DIRECT6])
def test_bulk_echo_exact(env: Env, target: str) -> None:
    assert bulk_echo(env.t, target) == "exact"


def test_plain_mode_without_offload(tmp_path: Path) -> None:
    """ZTUN_TUN_OFFLOAD=0: the TUN without virtio-net headers still carries TCP both ways
    byte-exact, UDP and ICMP (the fallback when a kernel refuses the offload ioctls)."""
    require_tun_environment()
    with topology() as t, echo_server(t, tmp_path):
        z = start_ztun(t, tmp_path, offload=False)
        try:
            assert "offload off" in z.text(), z.text()
            for target in (DIRECT4, DIRECT6):
                assert bulk_echo(t, target, 8 << 20) == "exact"
                r = json.loads(t.client_python("tun_client.py", "udp", target, "7", "1",
                                               "1400", "8000"))  # fmt: skip
                assert set(r.values()) == {"ok"}, r
            r = in_ns(t.client, "ping", "-c", "1", "-W", "2", "203.0.113.99", check=False)
            assert r.returncode == 0, r.stdout + r.stderr
        finally:
            assert stop(z, signal.SIGTERM)[0] == 0, z.text()


def test_1000_concurrent_connections(env: Env) -> None:
    r = client(env, "conns", DIRECT4, "7", "1000", timeout=180)
    assert r["opened"] == 1000 and r["served"] == 1000, r


def test_iperf3_both_directions(env: Env) -> None:
    for extra in ([], ["-R"]):
        out = in_ns(env.t.client, "iperf3", "-c", DIRECT4, "-p", "5201", "-t", "2", "-J",
                    *extra, timeout=60).stdout  # fmt: skip
        bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
        assert bps > 50e6, f"iperf3 {extra}: {bps / 1e6:.0f} Mbit/s"


# -- UDP and ICMP -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", [DIRECT4, PROXY4, DIRECT6, PROXY6])
def test_udp_echo(env: Env, target: str) -> None:
    sizes = ["1", "512", "1400", "8000"]
    if target == DIRECT4:
        sizes.append("30000")  # IPv4 fragments on the TUN are reassembled
    r = client(env, "udp", target, "7", *sizes)
    assert set(r.values()) == {"ok"}, r


@pytest.mark.parametrize("target", [BLOCK4, BLOCK6])
def test_blocked_udp_gets_port_unreachable(env: Env, target: str) -> None:
    r = client(env, "udp", target, "7", "10")
    assert r["10"] == "errno 111", r


@pytest.mark.parametrize("target", ["203.0.113.99", "2001:db8:ffff::1"])
def test_ping_answered(env: Env, target: str) -> None:
    r = in_ns(env.t.client, "ping", "-c", "3", "-i", "0.2", "-W", "2", target, check=False)
    assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr


# -- routes, and putting them back -------------------------------------------------------------


def test_auto_route_installed(env: Env) -> None:
    rules = in_ns(env.t.client, "ip", "rule").stdout
    assert "fwmark 0x2024 lookup main" in rules
    # No rule for the SOCKS5 server: its connections carry the mark (test_own_marks.py).
    assert f"to {SERVER4} lookup main" not in rules
    assert "lookup 2022" in rules and "suppress_prefixlength 0" in rules
    assert "lookup 2022" in in_ns(env.t.client, "ip", "-6", "rule").stdout
    assert "default dev ztun0" in in_ns(env.t.client, "ip", "route", "show", "table", "2022").stdout


def stop(proc: Proc, sig: int) -> tuple[int | None, float]:
    t0 = time.monotonic()
    code = proc.stop(sig, timeout=15)
    return code, time.monotonic() - t0


def test_routes_restored_after_sigterm_and_sigint(tmp_path: Path) -> None:
    require_tun_environment()
    with topology() as t:
        before = t.snapshot()
        for sig in (signal.SIGTERM, signal.SIGINT):
            z = start_ztun(t, tmp_path, f"ztun-{sig}")
            assert t.snapshot() != before
            code, took = stop(z, sig)
            assert code == 0, z.text()
            assert took < 10
            assert t.snapshot() == before, z.text()
        assert not list((tmp_path / "state").glob("*.json"))


def test_routes_restored_after_sigkill_and_restart(tmp_path: Path) -> None:
    require_tun_environment()
    with topology() as t:
        before = t.snapshot()
        z = start_ztun(t, tmp_path, "ztun-killed")
        stop(z, signal.SIGKILL)
        left = t.snapshot()
        assert "lookup 2022" in left  # the rules of the killed run are still there
        z2 = start_ztun(t, tmp_path, "ztun-restarted")
        assert "leftovers of a previous run" in z2.text()
        rules = in_ns(t.client, "ip", "rule").stdout
        assert rules.count("lookup 2022") == 1, rules  # not doubled
        code, _ = stop(z2, signal.SIGTERM)
        assert code == 0, z2.text()
        assert t.snapshot() == before


def test_open_flow_gets_fin_on_shutdown(tmp_path: Path) -> None:
    require_tun_environment()
    with topology() as t, echo_server(t, tmp_path):
        z = start_ztun(t, tmp_path)
        code = ("import socket,time\n"
                f"s=socket.create_connection(({DIRECT4!r},7),5)\n"
                "s.sendall(b'x'); assert s.recv(1)==b'x'\n"
                "print('open',flush=True)\n"
                "s.settimeout(10); t=time.monotonic(); d=s.recv(10)\n"
                "print('eof' if d==b'' else 'data')\n")  # fmt: skip
        p = subprocess.Popen(["ip", "netns", "exec", t.client, sys.executable, "-c", code],
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert p.stdout is not None and p.stdout.readline().strip() == "open"
        rc, _ = stop(z, signal.SIGTERM)
        out = p.communicate(timeout=15)[0]
        assert rc == 0 and out.startswith("eof"), out


def test_clear_error_without_tun_permission(tmp_path: Path) -> None:
    """Without CAP_NET_ADMIN (root's bounding set cut), `ztun run` says so in one sentence.

    Inside a namespace of its own all the same: should the capability survive, nothing
    touches the root namespace."""
    require_tun_environment()
    cfg = tmp_path / "z.yaml"
    cfg.write_text(config_text())
    env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(tmp_path / "state"))
    with topology() as t:
        r = subprocess.run(["ip", "netns", "exec", t.client, "setpriv",
                            "--bounding-set=-net_admin", sys.executable, "-m", "ztun", "run",
                            str(cfg)], capture_output=True, text=True, env=env,
                           timeout=30)  # fmt: skip
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip() == "ztun: creating a TUN device needs root (or CAP_NET_ADMIN)"


STRICT_CONFIG = """\
log: {{level: info}}
inbounds:
  - type: tun
    tag: tun-in
    interface_name: ztun0
    address: [198.18.0.1/30]
    auto_route: true
    strict_route: {strict}
outbounds:
  - {{type: direct, tag: direct}}
"""


def test_strict_route_keeps_lan_and_other_family_off_the_side_path(tmp_path: Path) -> None:
    """Without strict_route the LAN's own route wins over the TUN (sing-box's
    suppress_prefixlength rule); with it, the LAN goes through the TUN too and IPv6, which has
    no TUN address here, is unreachable instead of leaking around the TUN."""
    require_tun_environment()
    with topology() as t:
        before = t.snapshot()
        for strict in (False, True):
            cfg = STRICT_CONFIG.format(strict="true" if strict else "false")
            z = start_ztun(t, tmp_path, f"ztun-strict-{strict}", config=cfg)
            try:
                lan = in_ns(t.client, "ip", "route", "get", SERVER4).stdout
                v6 = in_ns(t.client, "ip", "-6", "route", "get", SERVER6, check=False)
                if strict:
                    assert "dev ztun0" in lan, lan
                    assert v6.returncode != 0 and "unreachable" in v6.stderr.lower(), v6
                else:
                    assert "dev ztun0" not in lan, lan
                    assert v6.returncode == 0 and "ztun0" not in v6.stdout, v6
            finally:
                code, _ = stop(z, signal.SIGTERM)
            assert code == 0, z.text()
            assert t.snapshot() == before, z.text()


# -- busy polling -------------------------------------------------------------------------------


def test_busy_poll_while_echoes_flow_and_never_when_idle(tmp_path: Path) -> None:
    """The default polls the loop during a stream of UDP round trips, and stops once they stop:
    an idle ztun uses no CPU. `busy_poll: 0` never polls. (What it buys is measured in
    bench/bench_tun.py --udp-echo, not here.)"""
    require_tun_environment()
    with topology() as t, echo_server(t, tmp_path):
        for name, poll in (("default", None), ("off", "0")):
            cfg = config_text()
            if poll is not None:
                cfg = cfg.replace("udp_timeout: 30s", f"udp_timeout: 30s\n    busy_poll: {poll}")
            z = start_ztun(t, tmp_path, name, config=cfg)
            try:
                for target in (DIRECT4, DIRECT6):
                    r = json.loads(t.client_python("tun_client.py", "echoes", target, "7",
                                                   "2000"))  # fmt: skip
                    assert r == {"exact": 2000}, r
                time.sleep(0.5)
                c0 = cpu_seconds(z.pid)
                time.sleep(2)
                idle = cpu_seconds(z.pid) - c0
                assert idle < 0.2, f"{name}: {idle:.2f} CPU-s in 2 s with no traffic"
            finally:
                assert stop(z, signal.SIGTERM)[0] == 0, z.text()
            polled = "busy polling:" in z.text()
            assert polled == (poll is None), z.text()[-2000:]


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` from /proc (bench/procstat.py reads it the same way)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
