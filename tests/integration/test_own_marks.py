"""Own traffic never loops into the TUN (auto_route): every socket ztun opens carries its
fwmark, so nothing depends on an excluded address staying right.

    client ns: ztun (tun, auto_route, IPv4; mixed on 127.0.0.1:2080; DNS 203.0.113.53)
    server ns: sing-box SOCKS5 on 203.0.113.22:1080, reached as 203.0.113.21:1080 (an nftables
               DNAT in the server namespace), so its UDP relay (bound to the address the TCP
               connection arrived on) has ANOTHER address than the one ztun dials; echo on
               port 7; a DNS server that answers each lookup of a name with the next of
               203.0.113.10 / 203.0.113.11.

Neither the SOCKS5 server, nor its relay, nor the DNS server, nor the name's addresses are
excluded from the TUN: without the mark each would be routed into it. nftables counters in the
client namespace's output hook show that no packet of ztun's went into the TUN, and that its
packets left by eth0 carrying the mark.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import need

from .netns import Topology, in_ns, require_tun_environment, topology, wait_tcp
from .peers import Proc, flow_lines, singbox_path
from .test_tun_linux import start_ztun

pytestmark = [pytest.mark.netns, pytest.mark.singbox]

SOCKS_DIALED = "203.0.113.21"  # what ztun's config says
SOCKS_REAL = "203.0.113.22"  # where sing-box listens, so its UDP relay's address
DNS_SERVER = "203.0.113.53"
ECHO = "203.0.113.10"  # UDP echo through the proxy; also the name's first address
FLIP = ("203.0.113.10", "203.0.113.11")
MARK = 0x2024

CONFIG = f"""\
log: {{level: info}}
inbounds:
  - type: tun
    tag: tun-in
    interface_name: ztun0
    address: [198.18.0.1/30]
    auto_route: true
  - {{type: mixed, tag: mixed-in, listen: 127.0.0.1, listen_port: 2080}}
dns:
  servers: [{{type: udp, tag: up, server: {DNS_SERVER}}}]
outbounds:
  - {{type: direct, tag: direct}}
  - {{type: socks, tag: proxy, server: {SOCKS_DIALED}, server_port: 1080}}
route:
  rules:
    - {{inbound: tun-in, ip_cidr: [{ECHO}/32], outbound: proxy}}
  final: direct
"""

# Counters in the client namespace, for packets that sockets of this namespace send (the
# output hook: what ztun writes into the TUN device itself does not pass there).
_OWN = ", ".join((SOCKS_DIALED, SOCKS_REAL, DNS_SERVER, FLIP[1]))
_TO_ETH0_MARKED = f'oifname "eth0" meta mark {MARK:#x}'
_RULES = {
    "own_into_tun": f'oifname "ztun0" ip daddr {{ {_OWN} }}',
    "marked_into_tun": 'oifname "ztun0" meta mark != 0',
    "app_into_tun": f'oifname "ztun0" ip daddr {ECHO} udp dport 7',
    "relay_marked": f"{_TO_ETH0_MARKED} ip daddr {SOCKS_REAL} udp dport != 53",
    "socks_marked": f"{_TO_ETH0_MARKED} ip daddr {SOCKS_DIALED} tcp dport 1080",
    "dns_marked": f"{_TO_ETH0_MARKED} ip daddr {DNS_SERVER} udp dport 53",
    "flip_marked": f"{_TO_ETH0_MARKED} ip daddr {FLIP[1]} tcp dport 7",
}
NFT_CLIENT = (
    "table inet ztun_marks_test {\n  chain out {\n"
    "    type filter hook output priority 0; policy accept;\n"
    + "".join(f'    {rule} counter comment "{name}"\n' for name, rule in _RULES.items())
    + "  }\n}\n"
)

NFT_SERVER = f"""\
table ip ztun_marks_test {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {SOCKS_DIALED} tcp dport 1080 dnat to {SOCKS_REAL}
  }}
}}
"""


def counters(ns: str) -> dict[str, int]:
    """Packets counted by each rule of the client's table, by the rule's comment."""
    text = in_ns(ns, "nft", "list", "table", "inet", "ztun_marks_test").stdout
    found = re.finditer(r'packets (\d+) bytes \d+ comment "(\w+)"', text)
    return {m.group(2): int(m.group(1)) for m in found}


@dataclass
class Env:
    t: Topology
    tmp: Path
    ztun: Proc
    dns: Proc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_tun_environment()
    need(shutil.which("nft"), "nft (nftables)")
    sb_bin = singbox_path()
    tmp = tmp_path_factory.mktemp("marks")
    sb_cfg = tmp / "sing-box.json"
    sb_cfg.write_text(json.dumps({
        "log": {"level": "warn"},
        "inbounds": [{"type": "socks", "tag": "in", "listen": SOCKS_REAL, "listen_port": 1080}],
        "outbounds": [{"type": "direct", "tag": "direct"}],
    }))  # fmt: skip
    procs: list[Proc] = []
    with topology() as t:
        try:
            s = t.server
            for a in (SOCKS_DIALED, SOCKS_REAL, DNS_SERVER, FLIP[1]):
                in_ns(s, "ip", "addr", "add", f"{a}/32", "dev", "lo")
            in_ns(s, "nft", "-f", "-", input=NFT_SERVER)
            in_ns(t.client, "nft", "-f", "-", input=NFT_CLIENT)
            procs.append(Proc(["ip", "netns", "exec", s, sb_bin, "run", "-c", str(sb_cfg)],
                              tmp / "sing-box.log"))  # fmt: skip
            procs.append(Proc(["ip", "netns", "exec", s, sys.executable,
                               str(Path(__file__).parent / "tun_server.py")],
                              tmp / "echo.log"))  # fmt: skip
            dns = Proc(["ip", "netns", "exec", s, sys.executable,
                        str(Path(__file__).parent / "flip_dns.py"), DNS_SERVER, *FLIP],
                       tmp / "dns.log")  # fmt: skip
            procs.append(dns)
            wait_tcp(s, SOCKS_REAL, 1080)
            wait_tcp(s, "127.0.0.1", 7)
            z = start_ztun(t, tmp, config=CONFIG)
            procs.append(z)
            yield Env(t, tmp, z, dns)
        finally:
            for p in reversed(procs):
                p.stop()


def test_nothing_keeps_the_proxy_or_its_relay_out_but_the_mark(env: Env) -> None:
    c = env.t.client
    rules = in_ns(c, "ip", "rule").stdout
    assert f"fwmark {MARK:#x} lookup main" in rules
    for a in (SOCKS_DIALED, SOCKS_REAL, DNS_SERVER):
        assert a not in rules
        # unmarked, each would go into the TUN; marked, by eth0
        assert "dev ztun0" in in_ns(c, "ip", "route", "get", a).stdout
        assert "dev eth0" in in_ns(c, "ip", "route", "get", a, "mark", hex(MARK)).stdout


UDP_CLIENT = """\
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 7))
ok = 0
for i in range(20):
    s.settimeout(1.0)
    try:
        s.send(b"ping %d" % i)
        ok += s.recv(100) == b"echo:ping %d" % i
    except OSError:
        pass
print(ok)
"""


def test_udp_through_a_relay_with_another_address_does_not_loop(env: Env) -> None:
    before = counters(env.t.client)
    r = in_ns(env.t.client, sys.executable, "-c", UDP_CLIENT, ECHO, timeout=60)
    assert int(r.stdout) >= 18, r.stdout + r.stderr
    after = counters(env.t.client)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["app_into_tun"] >= 18  # the application's datagrams went into the TUN
    assert delta["relay_marked"] >= 18  # ztun's went to the relay's other address, marked
    assert delta["socks_marked"] > 0
    assert delta["own_into_tun"] == 0 and delta["marked_into_tun"] == 0, delta
    # the relay really has another address than the one dialed
    assert SOCKS_DIALED != SOCKS_REAL
    # and the log has no flow that ztun's own traffic would have made through the TUN
    dests = [f.get("destination", "") for f in flow_lines(env.ztun.text())]
    assert not [d for d in dests if SOCKS_REAL in d or SOCKS_DIALED in d], dests


SOCKS_CLIENT = """\
import socket, sys, time
ok = 0
for i in range(int(sys.argv[1])):
    s = socket.create_connection(("127.0.0.1", 2080), 5)
    name = b"flip.test"
    request = b"\\x05\\x01\\x00\\x03" + bytes([len(name)]) + name + (7).to_bytes(2, "big")
    s.sendall(b"\\x05\\x01\\x00" + request)
    s.settimeout(5)
    got = b""
    while len(got) < 12:
        chunk = s.recv(100)
        if not chunk:
            break
        got += chunk
    if got[:4] == b"\\x05\\x00\\x05\\x00":
        s.sendall(b"hello")
        ok += s.recv(100) == b"hello"
    s.close()
    time.sleep(0.2)
print(ok)
"""


def test_direct_flow_to_a_name_whose_address_changes_does_not_loop(env: Env) -> None:
    before = counters(env.t.client)
    r = in_ns(env.t.client, sys.executable, "-c", SOCKS_CLIENT, "4", timeout=60)
    assert int(r.stdout) == 4, r.stdout + r.stderr + env.ztun.text()[-3000:]
    after = counters(env.t.client)
    delta = {k: after[k] - before.get(k, 0) for k in after}
    answers = [line.split()[1] for line in env.dns.text().splitlines() if "flip.test" in line]
    assert set(FLIP) <= set(answers), answers  # the name did change between lookups
    assert delta["dns_marked"] > 0  # the DNS transport's queries carried the mark
    assert delta["flip_marked"] > 0  # so did the connections to the name's new address
    assert delta["own_into_tun"] == 0 and delta["marked_into_tun"] == 0, delta
    time.sleep(0.2)
    looped = [f for f in flow_lines(env.ztun.text()) if f.get("inbound") == "tun-in"
              and any(a in f.get("destination", "") for a in (*FLIP[1:], DNS_SERVER))]  # fmt: skip
    assert looped == []
