"""Issue 13, UDP under load: a bounded burst of 1400-byte datagrams through the TUN, via the
SOCKS5 outbound (sing-box as the proxy) and direct, IPv4 and IPv6, echoed back by the far end.

What it proves: ztun's batched UDP path (one segmented send per burst of a session, commands
carried out per part of a read batch, big socket buffers) delivers most of a fast burst, and
what arrives is exact: no datagram corrupted, duplicated or reordered within its flow, in
either direction, with several flows' datagrams interleaved in each read batch. The fractions
asserted are generous (the shared 2-core machine runs other loads); the throughput figure
itself is bench/'s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .netns import (
    DIRECT4,
    DIRECT6,
    PROXY4,
    PROXY6,
    SERVER4,
    Topology,
    in_ns,
    require_tun_environment,
    topology,
)
from .peers import Proc, singbox_path
from .test_tun_linux import start_socks_server, start_ztun

pytestmark = [pytest.mark.netns, pytest.mark.singbox]

HERE = Path(__file__).parent
SOCKS_PORT = 1080
SINK_PORT = 9
COUNT = 20_000
SIZE = 1400
FLOWS = 4
#: Offered rate: the issue's 500 Mbit/s would measure the machine's other load as much as
#: ztun (the sender, the echoing sink and the proxy are Python and Go on the same 2 cores);
#: this is fast enough that datagrams meet in every read batch.
MBIT = 150
#: Generous: 62-83% arrived and 60-70% came back with the machine at a load average of 8,
#: the losses in the proxy's relay socket and, when ztun got no CPU, the TUN's queue.
MIN_DELIVERED = 0.4
MIN_ECHOED = 0.25

CONFIG = f"""\
log: {{level: info}}
inbounds:
  - type: tun
    tag: tun-in
    interface_name: ztun0
    address: [198.18.0.1/30, "fdfe:dcba:9876::1/126"]
    mtu: 9000
    auto_route: true
    udp_timeout: 30s
outbounds:
  - {{type: direct, tag: direct}}
  - {{type: socks, tag: proxy, server: {SERVER4}, server_port: {SOCKS_PORT}}}
route:
  rules:
    - {{ip_cidr: [{PROXY4}/32, "{PROXY6}/128"], outbound: proxy}}
  final: direct
"""


@dataclass
class Env:
    t: Topology
    tmp: Path
    ztun: Proc


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_tun_environment()
    singbox_path()  # before any namespace: a missing sing-box fails (or skips) here
    tmp = tmp_path_factory.mktemp("udpload")
    procs: list[Proc] = []
    with topology() as t:
        try:
            start_socks_server(t, tmp, procs)
            z = start_ztun(t, tmp, config=CONFIG)
            procs.append(z)
            yield Env(t, tmp, z)
        finally:
            for p in reversed(procs):
                p.stop()


def where_lost(t: Topology) -> str:
    """What a failure message needs to say where datagrams were lost: the TUN's drops, and
    every UDP socket's (`d`) in both namespaces."""
    return "\n".join([
        in_ns(t.client, "ip", "-s", "link", "show", "ztun0", check=False).stdout,
        in_ns(t.client, "ss", "-uamn", check=False).stdout,
        in_ns(t.server, "ss", "-uamn", check=False).stdout,
    ])  # fmt: skip


def burst(env: Env, target: str, gso: int = 1) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Send the burst to the sink on `target`: what the sender saw (with the echoes), what
    the sink saw, and what a failure message should show."""
    sink = subprocess.Popen(
        ["ip", "netns", "exec", env.t.server, sys.executable, str(HERE / "udp_burst.py"),
         "sink", target, str(SINK_PORT), "1.5", str(SIZE)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        r = in_ns(env.t.client, sys.executable, str(HERE / "udp_burst.py"), "send", target,
                  str(SINK_PORT), str(FLOWS), str(COUNT), str(SIZE), str(MBIT), str(gso),
                  timeout=120)  # fmt: skip
        sent = json.loads(r.stdout)
        out, err = sink.communicate(timeout=130)
    finally:
        if sink.poll() is None:
            sink.kill()  # only the sink this test started
            sink.wait()
    assert out.strip(), f"the sink printed nothing: {err}"
    got = json.loads(out.strip().splitlines()[-1])
    return sent, got, f"sent {sent}, arrived {got}\n{where_lost(env.t)}\n{env.ztun.text()[-2000:]}"


def check(sent: dict[str, Any], got: dict[str, Any], detail: str) -> None:
    echoes = sent["echoes"]
    assert sent["sent"] == COUNT, detail
    # Exact, both ways: nothing corrupted, duplicated or overtaken within its flow.
    for tally in (got, echoes):
        assert tally["corrupt"] == tally["duplicate"] == tally["reordered"] == 0, detail
    assert got["flows"] == FLOWS, detail
    assert got["received"] >= MIN_DELIVERED * COUNT, detail
    assert echoes["received"] >= MIN_ECHOED * COUNT, detail


@pytest.mark.parametrize("target", [PROXY4, PROXY6, DIRECT4])
def test_udp_burst_delivered_exact(env: Env, target: str) -> None:
    check(*burst(env, target))


@pytest.mark.parametrize("target", [PROXY4, DIRECT6])
def test_udp_segment_bursts_of_an_application(env: Env, target: str) -> None:
    """An application that sends with UDP_SEGMENT (as QUIC stacks do): with USO on the TUN
    ztun reads each send whole and relays its datagrams one by one, exact."""
    assert "offload on (TCP, UDP)" in env.ztun.text(), env.ztun.text()
    before = tun_packets(env.t)
    sent, got, detail = burst(env, target, gso=8)
    check(sent, got, detail)
    # Whole: the TUN handed ztun about one packet per 8 datagrams.
    assert tun_packets(env.t) - before < COUNT / 2, detail


def tun_packets(t: Topology) -> int:
    """Packets the TUN handed to ztun (and dropped) so far."""
    link = json.loads(in_ns(t.client, "ip", "-s", "-j", "link", "show", "ztun0").stdout)
    tx = link[0]["stats64"]["tx"]
    return int(tx["packets"]) + int(tx["dropped"])
