"""ztun's hijack-dns and sniffing against sing-box 1.14.4's, same topology, same run.

Needs root, /dev/net/tun, iproute2, dnsmasq and dnsperf (Debian). Each tunnel runs in a fresh
client/server namespace pair (tests/integration/netns.py; peers from dns_peers.py: dnsmasq A
at 203.0.113.53 in the server namespace, echo and banner targets), one at a time, with
auto_route + strict_route, stack system, a direct outbound and the DNS idiom

    rules: [{action: sniff}, {protocol: dns, action: hijack-dns}, {port: 53, action: hijack-dns}]
    dns:   servers [{type: udp, tag: dns-a, server: 203.0.113.53}], final dns-a

and measures:

- dnsperf (UDP, --clients clients, --outstanding queries in flight) against 198.51.100.200:53,
  where nothing listens: every answer comes through the tunnel's hijack from dnsmasq A.
  Queries/s, average and p99 latency (from dnsperf -v's per-query lines), loss. The query
  file has --names distinct names, so the first pass goes upstream and later passes can be
  answered from the tunnel's cache (both cache by default; --no-cache sets disable_cache);
- connections/s and p50/p99 setup with sniffing on: 64 in parallel, each sends an HTTP request
  (which the HTTP sniffer recognises at once) to a TCP echo and waits for the first byte;
- time to banner with sniffing on: a server that speaks first ("SSH-2.0-test"), connect until
  the banner, median and p99 (sing-box waits its 300 ms sniff timeout on such flows).

    python bench/bench_dns.py [--seconds 10] [--rounds 1] [--json out.json]
    python bench/bench_dns.py --only sing-box --seconds 3     # one tunnel
    python bench/bench_dns.py --print-configs                 # the two configs, nothing run
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from procstat import Profiler, cpu_split  # noqa: E402
from ratios import report  # noqa: E402

from tests.integration.dns_peers import (  # noqa: E402
    A_TEST,
    ASKED4,
    DNS_A,
    TUN_ADDR,
    World,
    world,
)
from tests.integration.netns import Topology, in_ns, topology, wait_tcp, wait_until  # noqa: E402
from tests.integration.peers import Proc, singbox_path  # noqa: E402

LOAD = str(REPO / "bench" / "tun_load.py")
ECHO = str(REPO / "tests" / "integration" / "tun_server.py")
CLIENT = str(REPO / "tests" / "integration" / "dns_client.py")
HTTP_PAYLOAD = r"GET / HTTP/1.1\r\nHost: bench.test\r\nUser-Agent: bench\r\n\r\n"

RULES = [
    {"action": "sniff"},
    {"protocol": "dns", "action": "hijack-dns"},
    {"port": 53, "action": "hijack-dns"},
]


def ztun_config(cache: bool) -> str:
    cfg: dict[str, Any] = {
        "log": {"level": os.environ.get("BENCH_LOG_LEVEL", "warn")},
        "inbounds": [{"type": "tun", "tag": "tun-in", "interface_name": "ztun0",
                      "address": TUN_ADDR, "mtu": 9000, "auto_route": True,
                      "strict_route": True, "stack": "system"}],
        "outbounds": [{"type": "direct", "tag": "direct"}],
        "dns": {"servers": [{"type": "udp", "tag": "dns-a", "server": DNS_A}], "final": "dns-a"},
        "route": {"rules": RULES, "final": "direct"},
    }  # fmt: skip
    if not cache:
        cfg["dns"]["disable_cache"] = True
    return json.dumps(cfg, indent=2)  # JSON is YAML


def singbox_config(cache: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "log": {"level": "warn"},
        "dns": {"servers": [{"type": "udp", "tag": "dns-a", "server": DNS_A}], "final": "dns-a"},
        "inbounds": [{"type": "tun", "tag": "tun-in", "interface_name": "ztun0",
                      "address": TUN_ADDR, "mtu": 9000, "auto_route": True,
                      "strict_route": True, "stack": "system"}],
        "outbounds": [{"type": "direct", "tag": "direct"}],
        "route": {"rules": RULES, "final": "direct", "auto_detect_interface": True,
                  "default_domain_resolver": "dns-a"},
    }  # fmt: skip
    if not cache:
        cfg["dns"]["disable_cache"] = True
    return cfg


def check_singbox(path: Path) -> None:
    r = subprocess.run([singbox_path(), "check", "-c", str(path)], capture_output=True,
                       text=True, timeout=30)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"sing-box check {path}: {r.stderr or r.stdout}")


def start(name: str, t: Topology, tmp: Path, cache: bool) -> Proc:
    env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(tmp / "state"))
    if name == "ztun":
        cfg = tmp / "ztun.yaml"
        cfg.write_text(ztun_config(cache))
        args = [sys.executable, "-m", "ztun", "run", str(cfg)]
    else:
        cfg = tmp / "sing-box.json"
        cfg.write_text(json.dumps(singbox_config(cache), indent=2))
        check_singbox(cfg)
        args = [singbox_path(), "run", "-c", str(cfg)]
    proc = Proc(["ip", "netns", "exec", t.client, *args], tmp / f"{name}.log", env)
    probe = [sys.executable, CLIENT, "query", "udp", ASKED4, "probe.a.test", "A", "1"]

    def ready() -> bool:
        # a hijacked answer from 198.51.100.200 can only come through the tunnel
        if proc.p.poll() is not None:
            raise RuntimeError(f"{name} exited: {proc.text()}")
        if "lookup 2022" not in in_ns(t.client, "ip", "rule").stdout:
            return False
        r = in_ns(t.client, *probe, check=False, timeout=10)
        return r.returncode == 0 and A_TEST in r.stdout

    try:
        if not wait_until(ready, 30):
            raise RuntimeError(f"{name} did not answer a hijacked query: {proc.text()[-3000:]}")
    except BaseException:
        proc.stop()
        raise
    return proc


STAT_RE = {
    "sent": re.compile(r"Queries sent:\s+(\d+)"),
    "completed": re.compile(r"Queries completed:\s+(\d+)"),
    "lost": re.compile(r"Queries lost:\s+(\d+)"),
    "qps": re.compile(r"Queries per second:\s+([\d.]+)"),
    "avg_s": re.compile(r"Average Latency \(s\):\s+([\d.]+)"),
}
LINE_RE = re.compile(r"^> (\S+) \S+ \S+ ([\d.]+)$", re.M)


def dnsperf(w: World, tmp: Path, seconds: float, names: int, clients: int,
            outstanding: int) -> dict[str, Any]:  # fmt: skip
    qfile = tmp / "queries.txt"
    qfile.write_text("".join(f"q{i}.a.test A\n" for i in range(names)))
    args = ["dnsperf", "-s", ASKED4, "-p", "53", "-d", str(qfile), "-l", str(seconds),
            "-c", str(clients), "-q", str(outstanding), "-t", "2", "-v"]  # fmt: skip
    r = in_ns(w.t.client, *args, timeout=seconds + 60)
    out = r.stdout
    res: dict[str, Any] = {}
    for k, rx in STAT_RE.items():
        m = rx.search(out)
        res[k] = float(m.group(1)) if m else float("nan")
    lat = sorted(float(m.group(2)) for m in LINE_RE.finditer(out))
    rcodes: dict[str, int] = {}
    for m in LINE_RE.finditer(out):
        rcodes[m.group(1)] = rcodes.get(m.group(1), 0) + 1
    return {
        "dns_qps": res["qps"],
        "dns_avg_ms": res["avg_s"] * 1e3,
        "dns_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e3 if lat else float("nan"),
        "dns_loss_pct": 100 * res["lost"] / res["sent"] if res["sent"] else float("nan"),
        "dns_noerror_pct": 100 * rcodes.get("NOERROR", 0) / max(1, len(lat)),
    }


def measure(name: str, w: World, tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    t = w.t
    proc = start(name, t, tmp, not args.no_cache)
    res: dict[str, Any] = {}
    try:
        print(f"{name}: dnsperf {args.seconds}s", file=sys.stderr, flush=True)
        u0, s0 = cpu_split(proc.pid)
        out_file = (args.profile or tmp) / f"{name}-dnsperf.txt"
        with Profiler(proc.pid, f"{name} dnsperf", bool(args.profile) and name == "ztun", out_file):
            res.update(dnsperf(w, tmp, args.seconds, args.names, args.clients, args.outstanding))
        u1, s1 = cpu_split(proc.pid)
        answered = max(1.0, res["dns_qps"] * args.seconds)
        res["cpu_us_per_query"] = (u1 - u0 + s1 - s0) / answered * 1e6
        # user space vs kernel: the syscalls' share is what no Python change can remove
        res["cpu_user_us_per_query"] = (u1 - u0) / answered * 1e6
        res["cpu_sys_us_per_query"] = (s1 - s0) / answered * 1e6
        time.sleep(1)
        print(f"{name}: connections with sniffing", file=sys.stderr, flush=True)
        secs = str(min(args.seconds, 5))
        out = in_ns(t.client, sys.executable, LOAD, "rate", A_TEST, "7", "64", secs,
                    HTTP_PAYLOAD, timeout=args.seconds + 60).stdout  # fmt: skip
        rate = json.loads(out)
        res["sniff_conn_per_s"] = rate["per_second"]
        res["sniff_setup_p50_ms"] = rate["p50_ms"]
        res["sniff_setup_p99_ms"] = rate["p99_ms"]
        res["sniff_conn_errors"] = rate["errors"]
        time.sleep(1)
        print(f"{name}: time to banner", file=sys.stderr, flush=True)
        out = in_ns(t.client, sys.executable, CLIENT, "banner", A_TEST, "22", str(args.banners),
                    timeout=120).stdout  # fmt: skip
        b = json.loads(out)
        times = b["times_ms"]
        res["banner_p50_ms"] = times[len(times) // 2] if times else float("nan")
        res["banner_p99_ms"] = times[min(len(times) - 1, int(len(times) * 0.99))] if times \
            else float("nan")  # fmt: skip
        res["banner_errors"] = len(b["errors"])
    except BaseException:
        print(f"--- {name} log ---\n{proc.text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        proc.stop()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10, help="per dnsperf run (default 10)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--names", type=int, default=5000, help="distinct names in the query file")
    ap.add_argument("--clients", type=int, default=4, help="dnsperf -c")
    ap.add_argument("--outstanding", type=int, default=100, help="dnsperf -q")
    ap.add_argument("--banners", type=int, default=200, help="connections for time to banner")
    ap.add_argument("--no-cache", action="store_true", help="dns.disable_cache in both")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", type=Path, metavar="DIR",
                    help="py-spy ztun during dnsperf, raw samples in DIR")  # fmt: skip
    ap.add_argument("--only", choices=["ztun", "sing-box"], help="measure one tunnel")
    ap.add_argument("--print-configs", action="store_true")
    args = ap.parse_args()
    if args.print_configs:
        print("# ztun\n" + ztun_config(not args.no_cache))
        print("# sing-box\n" + json.dumps(singbox_config(not args.no_cache), indent=2))
        return
    for tool in ("dnsmasq", "dnsperf", "ip"):
        if not shutil.which(tool):
            raise SystemExit(f"bench_dns.py needs {tool}")
    results: dict[str, list[dict[str, Any]]] = {"ztun": [], "sing-box": []}
    names = [n for n in ("sing-box", "ztun") if not args.only or n == args.only]
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            with tempfile.TemporaryDirectory(prefix="bench-dns-") as d, topology() as t:
                tmp = Path(os.environ.get("BENCH_TMP") or d)  # BENCH_TMP keeps the logs
                tmp.mkdir(parents=True, exist_ok=True)
                with world(t, tmp, proxy=False) as w:
                    echo = Proc(["ip", "netns", "exec", t.server, sys.executable, ECHO],
                                tmp / "echo.log")  # fmt: skip
                    try:
                        wait_tcp(t.server, "127.0.0.1", 7)
                        results[name].append(measure(name, w, tmp, args))
                    finally:
                        echo.stop()
    report(results, args.json)

if __name__ == "__main__":
    main()
