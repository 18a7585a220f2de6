"""The Clash API over TUN flows, in network namespaces: a TCP flow (the kernel stack and the
splice relay) and a UDP flow (the TUN's UDP sessions) are listed with exact counters, and
closing them through the API ends them."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netns import DIRECT4, Topology, in_ns, require_tun_environment, topology
from .peers import REPO, Proc
from .test_tun_linux import echo_server, start_ztun

pytestmark = [pytest.mark.netns]

API_PORT = 9090
CONFIG = f"""\
log: {{level: info}}
inbounds:
  - type: tun
    tag: tun-in
    interface_name: ztun0
    address: [198.18.0.1/30]
    auto_route: true
outbounds:
  - {{type: direct, tag: direct}}
route:
  final: direct
experimental:
  clash_api: {{external_controller: "127.0.0.1:{API_PORT}"}}
"""


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[tuple[Topology, Proc]]:
    require_tun_environment()
    with topology() as t, echo_server(t, tmp_path):
        z = start_ztun(t, tmp_path, config=CONFIG)
        try:
            yield t, z
        finally:
            z.stop()


def test_tun_flows_are_listed_counted_and_closed(ns: tuple[Topology, Proc]) -> None:
    t, z = ns
    r = in_ns(t.client, "env", f"PYTHONPATH={REPO}", sys.executable,
              str(Path(__file__).parent / "tun_api_client.py"), str(API_PORT), DIRECT4,
              check=False, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr + z.text()[-3000:]
    out = json.loads(r.stdout)
    assert out["tcp_echo_exact"] and out["udp_echo"] == "echo:hello"
    (tcp,) = out["tcp_listed"]
    assert tcp["metadata"]["type"] == "Tun" and tcp["metadata"]["inbound"] == "tun-in"
    assert tcp["metadata"]["destinationPort"] == "7" and tcp["chains"] == ["direct"]
    assert tcp["upload"] == tcp["download"] == 200_000
    (udp,) = out["udp_listed"]
    assert udp["upload"] == 5 and udp["download"] == len("echo:hello")
    assert out["tcp_delete"] == 204 and out["tcp_gone"]
    # the application's socket sees the end at once: a reset, or an EOF
    assert out["tcp_after_delete"] in ("ConnectionResetError", "b''"), out
    assert out["tcp_ended_in"] < 2.0
    assert out["udp_delete"] == 204 and out["udp_gone"]
    assert out["status"]["closedByApi"] == 2
    assert "end=closed" in z.text()
