"""auto_redirect in network namespaces (issue 13), IPv4 and IPv6, against real peers.

ztun (auto_route + auto_redirect) runs in the client namespace of tests/integration/netns.py;
sing-box (SOCKS5), http.server with a 100 MB file and a TCP echo run in the server namespace.
Rules as in test_tun_linux.py: .20 / ::20 through SOCKS5, .30 / ::30 blocked, the rest direct;
.40 / ::40 are in route_exclude_address. That TCP really took the redirect (not the TUN) is read
from the counters of ztun's nftables table.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import need

from .netns import (
    BLOCK4,
    BLOCK6,
    DIRECT4,
    DIRECT6,
    PROXY4,
    PROXY6,
    SERVER4,
    Topology,
    in_ns,
    require_tun_environment,
    topology,
    wait_tcp,
    wait_until,
)
from .peers import REPO, Proc, flow_lines, singbox_path, write_big_file
from .test_tun_linux import (
    BIG,
    CONFIG,
    SOCKS_PORT,
    start_server_peers,
    start_ztun,
    stop,
    url,
)

pytestmark = [pytest.mark.netns, pytest.mark.singbox]

ECHO_SERVER = Path(__file__).parent / "tun_server.py"
EXCLUDED4, EXCLUDED6 = "203.0.113.40", "2001:db8:2::40"

SNIFFED_BLOCK = "blocked.example"
#: test_tun_linux's config with auto_redirect, excluded prefixes, and a sniff rule first: a flow
#: whose HTTP Host is SNIFFED_BLOCK is blocked, whatever its address.
REDIRECT_CONFIG = CONFIG.replace(
    "    auto_route: true\n",
    "    auto_route: true\n    auto_redirect: true\n"
    f'    route_exclude_address: [{EXCLUDED4}/32, "{EXCLUDED6}/128"]\n',
).replace(
    "  rules:\n",
    "  rules:\n    - {{action: sniff}}\n"
    f"    - {{{{domain: [{SNIFFED_BLOCK}], outbound: block}}}}\n",
).format(socks=SERVER4, socks_port=SOCKS_PORT, proxy4=PROXY4, proxy6=PROXY6, block4=BLOCK4,
         block6=BLOCK6)  # fmt: skip

#: A table of someone else's (as Docker or firewalld would have), there before ztun starts.
FOREIGN = """\
table inet other {
    chain input {
        type filter hook input priority filter; policy accept;
        tcp dport 9999 counter accept
    }
}
"""


def require_nftables() -> None:
    require_tun_environment()
    from ztun.platform.linux import nftables

    need(None if nftables.unavailable() else "ok", "python3-nftables and libnftables")


def ruleset(t: Topology) -> str:
    return in_ns(t.client, "nft", "list", "ruleset").stdout


def snapshot(t: Topology) -> str:
    """Routes, rules, links (netns.py) and the whole nftables ruleset of the client."""
    return t.snapshot() + "\n--- nft\n" + ruleset(t)


def redirected(t: Topology) -> dict[str, int]:
    """Connections redirected so far, by family (the counters of ztun's table)."""
    out = in_ns(t.client, "nft", "-j", "list", "table", "inet", "ztun").stdout
    counts = {"ipv4": 0, "ipv6": 0}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if not rule:
            continue
        exprs = rule["expr"]
        family = next((e["match"]["right"] for e in exprs if "match" in e and
                       e["match"]["left"] == {"meta": {"key": "nfproto"}}), None)  # fmt: skip
        counter = next((e["counter"] for e in exprs if "counter" in e), None)
        if family and counter:
            counts[family] += counter["packets"]
    return counts


@dataclass
class Env:
    t: Topology
    tmp: Path
    sha: str
    ztun: Proc


def start(t: Topology, tmp: Path, name: str = "ztun") -> Proc:
    return start_ztun(t, tmp, name, config=REDIRECT_CONFIG)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_nftables()
    singbox_path()  # before any namespace: a missing sing-box fails (or skips) here
    tmp = tmp_path_factory.mktemp("redirect")
    www = tmp / "www"
    www.mkdir()
    sha = write_big_file(www / "big.bin", BIG)
    procs: list[Proc] = []
    with topology() as t:
        try:
            s = t.server
            in_ns(s, "ip", "addr", "add", f"{EXCLUDED4}/32", "dev", "lo")
            in_ns(s, "ip", "addr", "add", f"{EXCLUDED6}/128", "dev", "lo", "nodad")
            start_server_peers(t, tmp, www, procs)
            z = start(t, tmp)
            procs.append(z)
            yield Env(t, tmp, sha, z)
        finally:
            for p in reversed(procs):
                p.stop()


def curl_sha(env: Env, target: str) -> str:
    import hashlib

    p = subprocess.Popen(["ip", "netns", "exec", env.t.client, "curl", "-sS", "--max-time", "60",
                          url(target)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    h = hashlib.sha256()
    assert p.stdout is not None
    while chunk := p.stdout.read(1 << 20):
        h.update(chunk)
    assert p.wait(70) == 0, p.stderr.read() if p.stderr else ""
    return h.hexdigest()


def test_only_ztuns_table_is_added(env: Env) -> None:
    text = ruleset(env.t)
    assert text.count("table ") == 1 and "table inet ztun {" in text, text
    assert 'oifname "ztun0"' in text and "meta mark 0x00002024 return" in text, text
    assert "auto_redirect" in env.ztun.text()


@pytest.mark.parametrize("target,outbound", [(DIRECT4, "direct"), (PROXY4, "proxy"),
                                             (DIRECT6, "direct"), (PROXY6, "proxy")])  # fmt: skip
def test_curl_100mb_sha256_through_the_redirect(env: Env, target: str, outbound: str) -> None:
    family = "ipv6" if ":" in target else "ipv4"
    before = redirected(env.t)[family]
    seen = len([f for f in flow_lines(env.ztun.text()) if target in f.get("destination", "")
                and f.get("end") == "eof" and int(f.get("down", 0)) > BIG])  # fmt: skip
    assert curl_sha(env, target) == env.sha
    # One connection more took the redirect; the SOCKS5 server's connection (ztun's own, with
    # its mark) did not, or it would have looped back into ztun.
    assert redirected(env.t)[family] == before + 1

    def done() -> list[dict[str, str]]:  # the line comes once ztun saw both sides close
        return [f for f in flow_lines(env.ztun.text()) if target in f.get("destination", "")
                and f.get("end") == "eof" and int(f.get("down", 0)) > BIG]  # fmt: skip

    assert wait_until(lambda: len(done()) > seen, 5), env.ztun.text()[-2000:]
    assert done()[-1]["outbound"] == outbound


#: Connects, sends, and prints how the connection ended: "echo", "reset" or another result.
PROBE = """\
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 5)
    s.settimeout(5)
    s.sendall(b"hello")
    data = s.recv(100)
    print("echo" if data == b"hello" else "eof" if not data else "data")
except (ConnectionResetError, BrokenPipeError):
    print("reset")
"""


def probe(t: Topology, host: str, port: int = 7) -> str:
    return in_ns(t.client, sys.executable, "-c", PROBE, host, str(port)).stdout.strip()


@pytest.mark.parametrize("allowed,blocked", [(DIRECT4, BLOCK4), (DIRECT6, BLOCK6)])
def test_rules_apply_per_flow(env: Env, allowed: str, blocked: str) -> None:
    family = "ipv6" if ":" in allowed else "ipv4"
    before = redirected(env.t)[family]
    assert probe(env.t, allowed) == "echo"
    # Routed once the kernel accepted it: the block rule resets it after the handshake.
    assert probe(env.t, blocked) == "reset"
    assert redirected(env.t)[family] == before + 2
    def ended(host: str) -> list[dict[str, str]]:
        return [f for f in flow_lines(env.ztun.text()) if host in f.get("destination", "")
                and f.get("end") in ("eof", "blocked")]  # fmt: skip

    assert wait_until(lambda: ended(allowed) and ended(blocked), 5)
    ok, refused = ended(allowed), ended(blocked)
    assert ok[-1]["outbound"] == "direct" and ok[-1]["end"] == "eof"
    assert refused and refused[-1]["end"] == "blocked" and refused[-1]["outbound"] == "block"


@pytest.mark.parametrize("target", [EXCLUDED4, EXCLUDED6])
def test_route_exclude_address_is_not_redirected(env: Env, target: str) -> None:
    before = redirected(env.t)
    assert probe(env.t, target) == "echo"
    assert redirected(env.t) == before
    assert not [f for f in flow_lines(env.ztun.text()) if target in f.get("destination", "")]


@pytest.mark.parametrize("target", [DIRECT4, DIRECT6])
def test_sniffed_domain_is_routed(env: Env, target: str) -> None:
    """Sniffing works on a redirected flow as on a TUN flow: the Host header decides."""
    r = in_ns(env.t.client, "curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w",
              "%{http_code}", "-H", f"Host: {SNIFFED_BLOCK}", url(target, ""),
              check=False)  # fmt: skip
    assert r.returncode != 0 and r.stdout in ("", "000"), r
    lines = [f for f in flow_lines(env.ztun.text()) if f.get("domain") == SNIFFED_BLOCK and
             target in f.get("destination", "")]  # fmt: skip
    assert lines and lines[-1]["end"] == "blocked", lines
    r = in_ns(env.t.client, "curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w",
              "%{http_code}", "-H", "Host: allowed.example", url(target, ""))  # fmt: skip
    assert r.stdout == "200"


def test_a_direct_connection_to_the_listener_is_reset(env: Env) -> None:
    """Only what nftables redirected is served: conntrack reports the listener itself as the
    original destination of a direct connection, which must not connect to itself again."""
    text = ruleset(env.t)
    port = int(text.split("ipv4 meta l4proto tcp counter packets")[1].split("redirect to :")[1]
               .split()[0])  # fmt: skip
    flows = len(flow_lines(env.ztun.text()))
    assert probe(env.t, "127.0.0.1", port) == "reset"
    assert len(flow_lines(env.ztun.text())) == flows


# -- nothing left behind ---------------------------------------------------------------------


def with_foreign_table(t: Topology) -> None:
    in_ns(t.client, "nft", "-f", "-", input=FOREIGN)


def test_ruleset_and_routes_restored_after_sigint_and_sigterm(tmp_path: Path) -> None:
    require_nftables()
    with topology() as t:
        with_foreign_table(t)
        before = snapshot(t)
        for sig in (signal.SIGINT, signal.SIGTERM):
            z = start(t, tmp_path, f"ztun-{sig}")
            assert "table inet ztun" in ruleset(t) and "table inet other" in ruleset(t)
            code, took = stop(z, sig)
            assert code == 0, z.text()
            assert took < 10
            assert snapshot(t) == before, z.text()
        assert not list((tmp_path / "state").glob("*.json"))


def test_ruleset_and_routes_restored_after_sigkill_and_restart(tmp_path: Path) -> None:
    require_nftables()
    with topology() as t:
        with_foreign_table(t)
        before = snapshot(t)
        z = start(t, tmp_path, "ztun-killed")
        stop(z, signal.SIGKILL)
        assert "table inet ztun" in ruleset(t)  # the killed run's table is still there
        z2 = start(t, tmp_path, "ztun-restarted")
        text = z2.text()
        assert "removing the nftables table of a previous run" in text, text
        assert ruleset(t).count("table inet ztun") == 1
        assert "auto_redirect is off" not in text
        code, _ = stop(z2, signal.SIGTERM)
        assert code == 0, z2.text()
        assert snapshot(t) == before


def test_exit_without_stop_removes_the_table(tmp_path: Path) -> None:
    """The abort path (what a second signal and the interpreter's exit without stop() run)
    deletes the table as well as the routes."""
    require_nftables()
    with topology() as t:
        with_foreign_table(t)
        before = snapshot(t)
        env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(tmp_path / "state"))
        r = subprocess.run(["ip", "netns", "exec", t.client, sys.executable,
                            str(Path(__file__).parent / "atexit_redirect.py")],
                           capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("\n")[:2] == ["redirect installed", "exiting"], r.stdout + r.stderr
        assert snapshot(t) == before, r.stderr
        assert not list((tmp_path / "state").glob("*.json"))


def test_a_table_ztun_did_not_make_is_left_alone_and_tcp_uses_the_tun(tmp_path: Path) -> None:
    """A table named like ztun's but not recorded by ztun is never deleted: ztun says so in
    one line and TCP goes through the TUN."""
    require_nftables()
    with topology() as t:
        in_ns(t.client, "nft", "add", "table", "inet", "ztun")
        before = snapshot(t)
        echo = Proc(["ip", "netns", "exec", t.server, sys.executable, str(ECHO_SERVER)],
                    tmp_path / "echo.log")  # fmt: skip
        try:
            wait_tcp(t.server, "127.0.0.1", 7)
            z = start(t, tmp_path, "ztun-foreign")
            assert "auto_redirect is off" in z.text() and "did not record" in z.text(), z.text()
            assert probe(t, DIRECT4) == "echo"  # through the TUN
            code, _ = stop(z, signal.SIGTERM)
            assert code == 0, z.text()
        finally:
            echo.stop()
        assert snapshot(t) == before


STRICT = """\
log: {{level: info}}
inbounds:
  - type: tun
    tag: tun-in
    interface_name: ztun0
    address: [198.18.0.1/30]
    auto_route: true
    auto_redirect: true
    strict_route: {strict}
outbounds:
  - {{type: direct, tag: direct}}
"""


def test_strict_route_keeps_its_meaning(tmp_path: Path) -> None:
    """Without strict_route the LAN's own route wins, so a connection to the LAN is not
    redirected; with it the LAN goes through ztun, redirected like the rest."""
    require_nftables()
    with topology() as t:
        before = snapshot(t)
        echo = Proc(["ip", "netns", "exec", t.server, sys.executable, str(ECHO_SERVER)],
                    tmp_path / "echo.log")  # fmt: skip
        try:
            wait_tcp(t.server, "127.0.0.1", 7)
            for strict in (False, True):
                z = start_ztun(t, tmp_path, f"ztun-strict-{strict}",
                               config=STRICT.format(strict=str(strict).lower()))  # fmt: skip
                try:
                    assert probe(t, SERVER4) == "echo"
                    assert probe(t, DIRECT4) == "echo"
                    assert redirected(t)["ipv4"] == (2 if strict else 1)
                    wait_until(lambda: f"{DIRECT4}:7" in z.text() and (  # noqa: B023
                        not strict or f"{SERVER4}:7" in z.text()), 5)  # noqa: B023
                    through = [f["destination"] for f in flow_lines(z.text())]
                    assert (f"{SERVER4}:7" in through) == strict, through
                finally:
                    code, _ = stop(z, signal.SIGTERM)
                assert code == 0, z.text()
        finally:
            echo.stop()
        assert snapshot(t) == before


NO_LIBRARY = """\
import sys
import ztun.platform.linux.nftables as n
n.SYSTEM_MODULE_DIRS = ()
sys.modules["nftables"] = None  # `import nftables` fails as where none is installed
from ztun.launch import main
sys.argv[0] = "ztun"
main()
"""


def test_without_nftables_check_and_run_say_so_and_use_the_tun(tmp_path: Path) -> None:
    require_tun_environment()
    cfg = tmp_path / "z.yaml"
    cfg.write_text(REDIRECT_CONFIG)
    env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(tmp_path / "state"))
    r = subprocess.run([sys.executable, "-c", NO_LIBRARY, "check", str(cfg)], capture_output=True,
                       text=True, env=env, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if "auto_redirect" in x]
    assert len(lines) == 1 and "nftables cannot be used here (python3-nftables is not " \
        "installed), so `ztun run` keeps TCP on the TUN" in lines[0], r.stderr  # fmt: skip
    with topology() as t:
        before = snapshot(t)
        echo = Proc(["ip", "netns", "exec", t.server, sys.executable, str(ECHO_SERVER)],
                    tmp_path / "echo.log")  # fmt: skip
        z = Proc(["ip", "netns", "exec", t.client, sys.executable, "-c", NO_LIBRARY, "run",
                  str(cfg)], tmp_path / "z.log", env)  # fmt: skip
        try:
            wait_tcp(t.server, "127.0.0.1", 7)
            assert wait_until(lambda: "ztun started" in z.text() or z.p.poll() is not None, 20)
            assert z.p.poll() is None, z.text()
            assert "python3-nftables is not installed" in z.text()
            assert probe(t, DIRECT4) == "echo"
            assert "table inet ztun" not in ruleset(t)
            code, _ = stop(z, signal.SIGTERM)
            assert code == 0, z.text()
        finally:
            z.stop()
            echo.stop()
        assert snapshot(t) == before
