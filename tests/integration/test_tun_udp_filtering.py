"""TUN `udp_filtering` in network namespaces: a third host sends a datagram to the outbound
port of a client's UDP session (as a forged DNS answer would). ztun's default drops and counts
it; `udp_filtering: endpoint_independent` delivers it, as from the third host (sing-box 1.14.4
does that for every session, measured)."""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

import pytest

from .netns import (
    DIRECT4,
    DIRECT6,
    Topology,
    in_ns,
    require_tun_environment,
    topology,
    wait_until,
)
from .peers import Proc
from .test_tun_linux import start_ztun, stop

pytestmark = [pytest.mark.netns]

#: the third host, on the server namespace's loopback (documentation addresses)
THIRD4, THIRD6 = "203.0.113.40", "2001:db8:2::40"
PORT, THIRD_PORT = 9999, 5353

CONFIG = """\
log: {{level: info}}
inbounds:
  - type: tun
    tag: tun-in
    interface_name: ztun0
    address: [198.18.0.1/30, "fdfe:dcba:9876::1/126"]
    auto_route: true
{extra}outbounds:
  - {{type: direct, tag: direct}}
"""

# The server answers the client's datagram, then the third host sends to the same outbound
# address and port, then the server sends a last datagram that tells the client it is over.
SERVER = """\
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
srv = socket.socket(fam, socket.SOCK_DGRAM)
srv.bind((sys.argv[1], int(sys.argv[3])))
third = socket.socket(fam, socket.SOCK_DGRAM)
third.bind((sys.argv[2], int(sys.argv[4])))
srv.settimeout(60)
print("ready", flush=True)
data, peer = srv.recvfrom(100)
srv.sendto(b"answer", peer)
third.sendto(b"injected", peer)
srv.sendto(b"last", peer)
print("peer", peer, flush=True)
"""

CLIENT = """\
import json, socket, sys, time
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"query", (sys.argv[1], int(sys.argv[2])))
got, end = [], None
while end is None or time.monotonic() < end:
    try:
        data, addr = s.recvfrom(100)
    except TimeoutError:
        break
    got.append([data.decode(), addr[0], addr[1]])
    if data == b"last":
        end = time.monotonic() + 0.5
        s.settimeout(0.5)
print(json.dumps(got))
"""


def exchange(t: Topology, tmp: Path, target: str, third: str) -> list[list[object]]:
    args = [target, third, str(PORT), str(THIRD_PORT)]
    server = Proc(["ip", "netns", "exec", t.server, sys.executable, "-c", SERVER, *args],
                  tmp / f"server-{target}.log")  # fmt: skip
    try:
        assert wait_until(lambda: "ready" in server.text(), 10), server.text()
        r = in_ns(t.client, sys.executable, "-c", CLIENT, target, str(PORT), timeout=30)
        return json.loads(r.stdout)  # type: ignore[no-any-return]
    finally:
        server.stop()


@pytest.mark.parametrize("filtering", [None, "endpoint_independent"])
def test_third_host_datagram(tmp_path: Path, filtering: str | None) -> None:
    require_tun_environment()
    extra = "" if filtering is None else f"    udp_filtering: {filtering}\n"
    with topology() as t:
        in_ns(t.server, "ip", "addr", "add", f"{THIRD4}/32", "dev", "lo")
        in_ns(t.server, "ip", "addr", "add", f"{THIRD6}/128", "dev", "lo", "nodad")
        z = start_ztun(t, tmp_path, config=CONFIG.format(extra=extra))
        try:
            for target, third in ((DIRECT4, THIRD4), (DIRECT6, THIRD6)):
                got = exchange(t, tmp_path, target, third)
                texts = [g[0] for g in got]
                assert ["answer", target, PORT] in got and texts[-1] == "last", got
                if filtering is None:
                    assert "injected" not in texts, got  # dropped by default
                else:
                    assert ["injected", third, THIRD_PORT] in got, got  # as from the third host
        finally:
            assert stop(z, signal.SIGTERM)[0] == 0, z.text()
        m = re.search(r"UDP datagrams filtered: (\d+)", z.text())
        assert m is not None, z.text()
        assert int(m.group(1)) == (2 if filtering is None else 0), z.text()
