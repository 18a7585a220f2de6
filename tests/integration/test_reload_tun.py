"""Live reload (issue 14) with a TUN, in network namespaces: transfers through the TUN and the
mixed inbound keep going, sha256-exact, while the rules change; new flows take the new route
(direct → sing-box's SOCKS5); a refused config leaves the running one; a reload that keeps the
TUN's options keeps the device, its rules and routes; one that changes them restarts the TUN
and its routes come back as they were; the stop then restores the namespace exactly.

Each way in is used: `ztun reload` from outside the namespace (it finds ztun by its run file,
sends SIGHUP since the API is another namespace's, and reads the outcome back), `PUT /configs`
of the API inside the namespace, and a bare SIGHUP.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .netns import (
    DIRECT4,
    SERVER4,
    SNAPSHOT,
    Topology,
    in_ns,
    require_tun_environment,
    wait_tcp,
)
from .peers import REPO, Proc, flow_lines, singbox_path, wait_for, write_big_file
from .test_reload import BIG, RELOAD_BOUND, Transfer
from .test_tun_linux import HTTP_PORT, SOCKS_PORT, served_topology, start_ztun

pytestmark = [pytest.mark.netns, pytest.mark.singbox]

MIXED_PORT = 2080
API_PORT = 9090

CONFIG = """\
log: {{level: info}}
inbounds:
  - type: tun
    tag: tun-in
    interface_name: ztun0
    address: [198.18.0.1/30, "fdfe:dcba:9876::1/126"]
    auto_route: true
    udp_timeout: {udp_timeout}
    busy_poll: {busy_poll}
  - {{type: mixed, tag: mixed-in, listen: 127.0.0.1, listen_port: {mixed}}}
outbounds:
  - {{type: direct, tag: direct}}
  - {{type: socks, tag: proxy, server: {socks}, server_port: {socks_port}}}
route:
  rules: {rules}
  final: {final}
experimental:
  clash_api: {{external_controller: "127.0.0.1:{api}"}}
"""

TO_PROXY = f"[{{ip_cidr: [{DIRECT4}/32], outbound: proxy}}]"


def config_text(rules: str = "[]", final: str = "direct", udp_timeout: str = "30s",
                busy_poll: str = "200us") -> str:  # fmt: skip
    return CONFIG.format(udp_timeout=udp_timeout, busy_poll=busy_poll, mixed=MIXED_PORT,
                         socks=SERVER4,
                         socks_port=SOCKS_PORT, rules=rules, final=final,
                         api=API_PORT)  # fmt: skip


@dataclass
class Env:
    t: Topology
    tmp: Path
    sha: str
    ztun: Proc
    before: str

    @property
    def config(self) -> Path:
        return self.tmp / "ztun.yaml"

    def reload_cli(self) -> subprocess.CompletedProcess[str]:
        """`ztun reload` from outside the namespace: its API listens inside, so (without
        `--signal` even) it sends SIGHUP and reads the outcome from the run file."""
        env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(self.tmp / "state"))
        return subprocess.run([sys.executable, "-m", "ztun", "reload", str(self.config)],
                              capture_output=True, text=True, timeout=120, env=env)  # fmt: skip

    def put_configs(self) -> tuple[int, dict[str, object] | None]:
        """`PUT /configs` from inside the client namespace: (status, JSON body)."""
        r = in_ns(self.t.client, "curl", "-sS", "--max-time", "60", "-X", "PUT", "-d", "{}",
                  "-w", "\n%{http_code}", f"http://127.0.0.1:{API_PORT}/configs")  # fmt: skip
        body, _, status = r.stdout.rpartition("\n")
        return int(status), json.loads(body) if body.strip() else None

    def reloads(self) -> int:
        return len(re.findall(r"reload \(\w+\): (?:done|refused)", self.ztun.text()))

    def tun_index(self) -> str:
        return in_ns(self.t.client, "ip", "-o", "link", "show", "ztun0").stdout.split(":")[0]

    def routing(self) -> str:
        """The client's rules and routes (not the links: a new TUN has a new index, and a
        random IPv6 link-local address, which also moves its route in the listing)."""
        self.t.snapshot()  # waits until no IPv6 address is tentative
        text = "\n".join(in_ns(self.t.client, *cmd).stdout for cmd in SNAPSHOT[:4])
        text = re.sub(r"fe80::[0-9a-f:]+ dev ztun0", "fe80::(random) dev ztun0", text)
        return "\n".join(sorted(text.splitlines()))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_tun_environment()
    singbox_path()
    tmp = tmp_path_factory.mktemp("reload-tun")
    www = tmp / "www"
    www.mkdir()
    sha = write_big_file(www / "big.bin", BIG)
    (www / "small.txt").write_text("small\n")
    with served_topology(tmp, www) as (t, procs):
        before = t.snapshot()
        z = start_ztun(t, tmp, "ztun", config=config_text())
        procs.append(z)
        wait_tcp(t.client, "127.0.0.1", MIXED_PORT)
        yield Env(t, tmp, sha, z, before)


def url(name: str = "big.bin") -> str:
    return f"http://{DIRECT4}:{HTTP_PORT}/{name}"


def new_flow(env: Env, *via: str) -> dict[str, str]:
    """A new flow to DIRECT4 from the client namespace (through the TUN, or `via` the mixed
    inbound); its flow line."""
    before = len(flow_lines(env.ztun.text()))
    r = in_ns(env.t.client, "curl", "-sS", "--max-time", "10", *via, url("small.txt"),
              check=False)  # fmt: skip
    assert r.returncode == 0 and r.stdout == "small\n", r.stderr
    lines = wait_for(lambda: flow_lines(env.ztun.text())[before:], 5)
    return lines[-1]  # type: ignore[no-any-return]


MIXED = ("--socks5-hostname", f"127.0.0.1:{MIXED_PORT}")


def big_flows(env: Env) -> list[dict[str, str]]:
    return [f for f in flow_lines(env.ztun.text()) if int(f.get("down", "0")) >= BIG]


def test_transfers_go_on_while_new_flows_take_the_new_route(env: Env) -> None:
    assert new_flow(env)["outbound"] == "direct"
    index = env.tun_index()
    routing = env.routing()
    ns = ("ip", "netns", "exec", env.t.client)
    tun = Transfer(url(), prefix=ns)
    mixed = Transfer(*MIXED, url(), prefix=ns)
    assert wait_for(lambda: tun.size > 1 << 20 and mixed.size > 1 << 20, 10)
    env.config.write_text(config_text(rules=TO_PROXY))
    r = env.reload_cli()  # the run file names this ztun; no API: SIGHUP
    assert r.returncode == 0 and r.stdout.strip() == "reloaded", r.stderr + env.ztun.text()
    took = float(re.findall(r"reload \(SIGHUP\): done in ([0-9.]+)s", env.ztun.text())[-1])
    assert took < RELOAD_BOUND
    assert "inbounds kept: tun-in, mixed-in" in env.ztun.text()
    # the TUN, its rules and routes were kept as they were
    assert env.tun_index() == index and env.routing() == routing
    assert tun.p.poll() is None and mixed.p.poll() is None, "transfers should still run"
    assert new_flow(env)["outbound"] == "proxy"
    assert new_flow(env, *MIXED)["outbound"] == "proxy"
    assert tun.result() == env.sha and mixed.result() == env.sha
    assert wait_for(lambda: len(big_flows(env)) >= 2, 5)
    ended = sorted((f["inbound"], f["outbound"], f["end"]) for f in big_flows(env))
    assert ended == [("mixed-in", "direct", "eof"), ("tun-in", "direct", "eof")]


def test_a_refused_config_keeps_the_running_one(env: Env) -> None:
    ns = ("ip", "netns", "exec", env.t.client)
    tun = Transfer(url(), prefix=ns)
    assert wait_for(lambda: tun.size > 1 << 20, 10)
    env.config.write_text(config_text(rules=TO_PROXY, final="nowhere"))
    r = env.reload_cli()
    assert r.returncode == 1
    assert re.search(r"ztun\.yaml:\d+:\d+: route\.final: no outbound tagged 'nowhere'", r.stderr)
    status, body = env.put_configs()
    assert status == 400 and body is not None
    assert any(re.search(r"ztun\.yaml:\d+:\d+: route\.final", str(e))
               for e in body["errors"])  # type: ignore[union-attr]
    assert tun.p.poll() is None
    assert new_flow(env)["outbound"] == "proxy"
    assert new_flow(env, *MIXED)["outbound"] == "proxy"
    assert tun.result() == env.sha
    # and a good one through the API: new flows go direct again
    env.config.write_text(config_text())
    assert env.put_configs()[0] == 204
    assert new_flow(env)["outbound"] == "direct"


def test_changed_tun_options_restart_it_with_its_routes(env: Env) -> None:
    routing = env.routing()
    index = env.tun_index()
    done = env.reloads()
    env.config.write_text(config_text(rules=TO_PROXY, udp_timeout="45s"))
    os.kill(env.ztun.pid, signal.SIGHUP)
    assert wait_for(lambda: env.reloads() > done, 30), env.ztun.text()
    tail = env.ztun.text().rsplit("reload (SIGHUP): reading", 1)[1]
    assert "restarted: tun-in" in tail and "inbounds kept: mixed-in" in tail, tail
    took = float(re.findall(r"reload \(SIGHUP\): done in ([0-9.]+)s", tail)[-1])
    assert took < RELOAD_BOUND
    # a new device, and the same rules and routes as before
    assert env.tun_index() != index
    assert env.routing() == routing
    assert new_flow(env)["outbound"] == "proxy"
    assert new_flow(env, *MIXED)["outbound"] == "proxy"


def test_changed_busy_poll_applies_without_a_restart(env: Env) -> None:
    index = env.tun_index()
    done = env.reloads()
    env.config.write_text(config_text(rules=TO_PROXY, udp_timeout="45s", busy_poll="50us"))
    os.kill(env.ztun.pid, signal.SIGHUP)
    assert wait_for(lambda: env.reloads() > done, 30), env.ztun.text()
    tail = env.ztun.text().rsplit("reload (SIGHUP): reading", 1)[1]
    assert "inbounds kept: tun-in, mixed-in" in tail, tail
    assert "inbound tun-in: busy_poll is now 50 µs" in tail, tail
    assert env.tun_index() == index  # the same device: nothing was restarted
    assert new_flow(env)["outbound"] == "proxy"


def test_the_stop_after_reloads_restores_the_namespace(env: Env) -> None:
    assert env.ztun.stop(signal.SIGTERM, timeout=15) == 0, env.ztun.text()
    assert env.t.snapshot() == env.before, env.ztun.text()
    state = [p for p in (env.tmp / "state").glob("*") if not p.name.startswith(".")]
    assert state == []
