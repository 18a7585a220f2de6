"""Outbound groups against real SOCKS5 servers in network namespaces (issue 15).

Server namespace: sing-box (SOCKS5, port 1081) and Debian's dante-server (port 1082) as the
two members (microsocks has its own test, test_socks_microsocks.py), plus the shared peers
(a web server on 8080, the TCP echo on 7). ztun runs in the client namespace with a mixed
inbound and the Clash API on loopback; no TUN is needed, so nothing is routed: the members are
reached over the veth.

- urltest: the member in use is killed; the first flow after that already goes through the
  other member (the bound asserted: that flow takes < 1 s end to end, its connect through the
  dead member is refused at once and retried).
- selector: a switch through the API moves new flows; interrupt_exist_connections ends the
  flows through the member it left (within 2 s), a selector without it leaves them open; with
  the selected member dead, flows fail until the switch; the choice survives a restart
  through experimental.cache_file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import need

from .netns import DIRECT4, SERVER4, Topology, in_ns, require_tun_environment, wait_tcp
from .peers import REPO, Proc, flow_lines, singbox_path, wait_for
from .test_tun_linux import HTTP_PORT, served_topology

pytestmark = [pytest.mark.netns, pytest.mark.singbox]

SINGBOX_PORT, DANTE_PORT = 1081, 1082
MIXED, MIXED_KEEP, API = 2080, 2081, 9090
ECHO = 7
#: the first flow after the member in use died, end to end (measured: ~10-30 ms)
FIRST_FLOW_BOUND = 1.0
#: how soon interrupt_exist_connections ends an open flow after the switch
INTERRUPT_BOUND = 2.0

MEMBERS = f"""\
  - {{type: socks, tag: proxy-a, server: {SERVER4}, server_port: {SINGBOX_PORT}}}
  - {{type: socks, tag: proxy-b, server: {SERVER4}, server_port: {DANTE_PORT}}}
"""


DANTE_CONF = f"""\
logoutput: stderr
internal: 0.0.0.0 port = {DANTE_PORT}
external: {SERVER4}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
"""


def _sbin(name: str) -> str | None:
    path = f"/usr/sbin/{name}"
    return path if os.path.exists(path) else None


@dataclass
class Env:
    t: Topology
    tmp: Path
    procs: list[Proc]
    members: dict[str, Proc]

    def start_members(self) -> None:
        """sing-box as proxy-a, dante as proxy-b (started again after a test killed one)."""
        s = self.t.server
        if "proxy-a" not in self.members or self.members["proxy-a"].p.poll() is not None:
            cfg = self.tmp / "sing-box-a.json"
            cfg.write_text(json.dumps({
                "log": {"level": "warn"},
                "inbounds": [{"type": "socks", "tag": "in", "listen": "0.0.0.0",
                              "listen_port": SINGBOX_PORT}],
                "outbounds": [{"type": "direct", "tag": "direct"}],
            }))  # fmt: skip
            self.members["proxy-a"] = Proc(
                ["ip", "netns", "exec", s, singbox_path(), "run", "-c", str(cfg)],
                self.tmp / "sing-box-a.log")  # fmt: skip
        if "proxy-b" not in self.members or self.members["proxy-b"].p.poll() is not None:
            cfg = self.tmp / "danted.conf"
            cfg.write_text(DANTE_CONF)
            danted = need(shutil.which("danted") or _sbin("danted"), "danted (dante-server)")
            self.members["proxy-b"] = Proc(
                ["ip", "netns", "exec", s, danted, "-f", str(cfg), "-N", "1"],
                self.tmp / "danted.log")  # fmt: skip
        for port in (SINGBOX_PORT, DANTE_PORT):
            wait_tcp(s, "127.0.0.1", port)

    def kill(self, member: str) -> None:
        """The member's server dies (SIGKILL for sing-box; dante's main process gets SIGTERM,
        so that it takes its worker processes along)."""
        self.members[member].stop(9 if member == "proxy-a" else 15)

    def ztun(self, name: str, config: str) -> Proc:
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(config)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = Proc(["ip", "netns", "exec", self.t.client, sys.executable, "-m", "ztun", "run",
                     str(cfg)], self.tmp / f"{name}.log", env)  # fmt: skip
        self.procs.append(proc)
        ok = wait_for(lambda: "ztun started" in proc.text() or proc.p.poll() is not None, 20)
        assert ok and proc.p.poll() is None, proc.text()
        return proc

    def curl(self, *args: str) -> tuple[int, str]:
        """(curl's exit code, what it wrote to stdout)."""
        r = in_ns(self.t.client, "curl", "-sS", "--max-time", "10", *args, check=False)
        return r.returncode, r.stdout

    def get(self, port: int = MIXED) -> tuple[str, float]:
        """(HTTP status, seconds) of a GET of the web server through ztun's mixed inbound."""
        _, out = self.curl("-o", "/dev/null", "-w", "%{http_code} %{time_total}",
                           "-x", f"socks5h://127.0.0.1:{port}",
                           f"http://{DIRECT4}:{HTTP_PORT}/")  # fmt: skip
        code, _, seconds = out.strip().rpartition("\n")[2].partition(" ")
        return code, float(seconds or 0)

    def api(self, method: str, path: str, body: object = None) -> tuple[int, object]:
        args = ["-X", method, "-o", "-", "-w", "\n%{http_code}", f"http://127.0.0.1:{API}{path}"]
        if body is not None:
            args += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        _, out = self.curl(*args)
        text, _, status = out.rpartition("\n")
        return int(status or 0), json.loads(text) if text.strip() else None

    def hold(self, port: int, name: str) -> Proc:
        script = str(Path(__file__).parent / "group_client.py")
        proc = Proc(["ip", "netns", "exec", self.t.client, sys.executable, script, "hold",
                     str(port), DIRECT4, str(ECHO)], self.tmp / f"{name}.log")  # fmt: skip
        self.procs.append(proc)
        assert wait_for(lambda: "open" in proc.text(), 10), proc.text()
        return proc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_tun_environment()
    singbox_path()
    need(shutil.which("danted") or _sbin("danted"), "danted (dante-server)")
    tmp = tmp_path_factory.mktemp("groups")
    www = tmp / "www"
    www.mkdir()
    (www / "index.html").write_text("hello\n")
    with served_topology(tmp, www) as (t, procs):
        e = Env(t, tmp, procs, {})
        try:
            e.start_members()
            yield e
        finally:
            for p in e.members.values():
                p.stop()


def web_flows(proc: Proc) -> list[dict[str, str]]:
    """ztun's flow lines of the GETs of the web server (not the echo flows held open)."""
    return [f for f in flow_lines(proc.text())
            if f.get("destination", "").endswith(f":{HTTP_PORT}")]  # fmt: skip


def get_through(env: Env, z: Proc) -> tuple[str, float, str]:
    """A GET through ztun: (HTTP status, seconds, the `outbound` of its flow line, which
    ztun writes when the flow has ended, maybe just after curl is done)."""
    before = len(web_flows(z))
    code, seconds = env.get()
    assert wait_for(lambda: len(web_flows(z)) > before, 5), z.text()
    return code, seconds, web_flows(z)[-1].get("outbound", "")


def test_urltest_first_flow_after_the_member_dies_goes_through_a_live_one(env: Env) -> None:
    env.start_members()
    z = env.ztun("urltest", f"""\
log: {{level: info}}
inbounds: [{{type: mixed, tag: mixed-in, listen: 127.0.0.1, listen_port: {MIXED}}}]
outbounds:
{MEMBERS}  - type: urltest
    tag: auto
    outbounds: [proxy-a, proxy-b]
    url: "http://{DIRECT4}:{HTTP_PORT}/"
    interval: 1m
route: {{final: auto}}
experimental: {{clash_api: {{external_controller: "127.0.0.1:{API}"}}}}
""")  # fmt: skip
    try:
        # both members probed (each has a delay in its history)
        def probed() -> object:
            _, found = env.api("GET", "/proxies")
            ps = found["proxies"]  # type: ignore[index]
            return all(ps[m]["history"] and ps[m]["history"][-1]["delay"] > 0
                       for m in ("proxy-a", "proxy-b")) and ps["auto"]["now"]  # fmt: skip
        now = wait_for(probed, 10)
        assert now in ("proxy-a", "proxy-b"), z.text()
        other = "proxy-b" if now == "proxy-a" else "proxy-a"
        assert get_through(env, z)[::2] == ("200", f"auto/{now}")

        env.kill(now)
        code, seconds, outbound = get_through(env, z)
        assert code == "200", z.text()
        assert outbound == f"auto/{other}", z.text()
        assert seconds < FIRST_FLOW_BOUND, seconds
        print(f"first flow after {now} died: {seconds * 1000:.0f} ms through {other}")
        _, found = env.api("GET", "/proxies/auto")
        assert found["now"] == other  # type: ignore[index]
        # the group delay endpoint probes every member: the dead one is left out
        status, delays = env.api("GET", "/group/auto/delay?timeout=2000")
        assert status == 200 and set(delays) == {other}, delays  # type: ignore[arg-type]
        status, one = env.api("GET", f"/proxies/{other}/delay?url=http://{DIRECT4}:{HTTP_PORT}/"
                                     "&timeout=2000")  # fmt: skip
        assert status == 200 and one["delay"] > 0  # type: ignore[index]
        status, _ = env.api("GET", f"/proxies/{now}/delay?timeout=500")
        assert status in (503, 504)

        # the dead member comes back: the backoff probes find it again (within ~1+2+4 s)
        env.start_members()
        assert wait_for(lambda: env.api("GET", f"/proxies/{now}")[1]["history"][-1]["delay"] > 0,  # type: ignore[index]
                        15), z.text()  # fmt: skip
    finally:
        z.stop()


def udp_through_the_group(env: Env) -> None:
    """A SOCKS5 UDP association through `pick` (now proxy-a, sing-box) reaches the UDP echo;
    /connections names the member that carries it, as for TCP. (Its flow line, written at
    debug level when the association closes, carries the same chain: a unit test checks.)"""
    script = str(Path(__file__).parent / "group_client.py")
    client = subprocess.Popen(["ip", "netns", "exec", env.t.client, sys.executable, script, "udp",
                               str(MIXED), DIRECT4, str(ECHO)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert client.stdout is not None and client.stdin is not None
        assert client.stdout.readline().strip() == "open"
        _, found = env.api("GET", "/connections")
        udp = [c for c in found["connections"]  # type: ignore[index]
               if c["metadata"]["network"] == "udp"]  # fmt: skip
        assert [c["chains"] for c in udp] == [["proxy-a", "pick"]], udp
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.wait(10) == 0
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(5)


def test_selector_switch_interrupt_and_cache_file(env: Env) -> None:
    env.start_members()
    config = f"""\
log: {{level: info}}
inbounds:
  - {{type: mixed, tag: mixed-in, listen: 127.0.0.1, listen_port: {MIXED}}}
  - {{type: mixed, tag: mixed-keep, listen: 127.0.0.1, listen_port: {MIXED_KEEP}}}
outbounds:
{MEMBERS}  - {{type: selector, tag: pick, outbounds: [proxy-a, proxy-b],
     interrupt_exist_connections: true}}
  - {{type: selector, tag: keep, outbounds: [proxy-a, proxy-b]}}
route:
  rules: [{{inbound: [mixed-keep], outbound: keep}}]
  final: pick
experimental:
  clash_api: {{external_controller: "127.0.0.1:{API}"}}
  cache_file: {{enabled: true, path: {env.tmp / "cache.json"}}}
"""  # fmt: skip
    z = env.ztun("selector", config)
    try:
        assert get_through(env, z)[::2] == ("200", "pick/proxy-a")
        held = env.hold(MIXED, "held-pick")
        kept = env.hold(MIXED_KEEP, "held-keep")
        _, found = env.api("GET", "/connections")
        chains = sorted(c["chains"] for c in found["connections"])  # type: ignore[index]
        assert chains == [["proxy-a", "keep"], ["proxy-a", "pick"]]
        udp_through_the_group(env)

        switched = time.monotonic()
        assert env.api("PUT", "/proxies/pick", {"name": "proxy-b"})[0] == 204
        assert env.api("PUT", "/proxies/keep", {"name": "proxy-b"})[0] == 204
        ended = wait_for(lambda: "ended" in held.text(), INTERRUPT_BOUND + 1)
        took = time.monotonic() - switched
        assert ended and took < INTERRUPT_BOUND, held.text()
        time.sleep(0.5)
        assert "ended" not in kept.text()  # no interrupt_exist_connections: left open
        print(f"interrupt ended the old flow {took * 1000:.0f} ms after the switch")
        assert get_through(env, z)[::2] == ("200", "pick/proxy-b")

        # bad switches: not a member, not a selector, no such group
        assert env.api("PUT", "/proxies/pick", {"name": "nope"})[0] == 400
        assert env.api("PUT", "/proxies/proxy-a", {"name": "proxy-b"})[0] == 400
        assert env.api("PUT", "/proxies/none", {"name": "proxy-b"})[0] == 404

        # the selected member dies: a selector does not move by itself, the switch does
        assert env.api("PUT", "/proxies/pick", {"name": "proxy-a"})[0] == 204
        env.kill("proxy-a")
        assert env.get()[0] != "200"
        assert env.api("PUT", "/proxies/pick", {"name": "proxy-b"})[0] == 204
        assert get_through(env, z)[::2] == ("200", "pick/proxy-b")
    finally:
        z.stop()
    # the choice outlives the run
    assert json.loads((env.tmp / "cache.json").read_text())["selected"] == {
        "pick": "proxy-b", "keep": "proxy-b"}  # fmt: skip
    z = env.ztun("selector-again", config)
    try:
        _, found = env.api("GET", "/proxies/pick")
        assert found["now"] == "proxy-b"  # type: ignore[index]
        assert get_through(env, z)[::2] == ("200", "pick/proxy-b")
    finally:
        z.stop()
