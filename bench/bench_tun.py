"""ztun's tun inbound against sing-box 1.14.4's `tun` (stack: system), same topology, same run.

Needs root, /dev/net/tun, iproute2 and iperf3. Builds a client and a server namespace joined
by a veth (MTU 9000; see tests/integration/netns.py), runs one tunnel at a time in the client
namespace with auto_route and a direct outbound, and measures:

- iperf3 throughput up (client → server) and down (-R);
- CPU-seconds per GB of the tunnel (utime + stime from /proc over the iperf3 runs, of the
  process and every process below it: ztun's workers under `--mode redirect`);
- connections per second and p50/p99 setup time with 64 in parallel (connect until the first
  echoed byte, so the outbound connect is included), and the tunnel's CPU-µs per connection
  (the Python load client on the same cores can limit conn/s for both tunnels);
- RSS of the tunnel process with 1000 open connections (and the PSS of its process tree);
- UDP echo round trip p50.

With `--mode redirect` the TCP figures compare ztun's `auto_redirect` with sing-box's `redirect`
inbound behind a hand-made nftables redirect in the client namespace (sing-box's own
`auto_redirect` fails to start on this kernel: "flush nftables: netlink receive: ENOENT"). The
rule redirects TCP to the test prefix to sing-box's listener unless the connection carries the
mark sing-box's direct outbound sets, exactly what ztun's own table does for its sockets. UDP
has no redirect counterpart in sing-box there, so the UDP figure is left out in that mode.

    python bench/bench_tun.py [--seconds 5] [--rounds 1] [--json out.json]
    python bench/bench_tun.py --mode redirect [--seconds 5] [--rounds 1]
    python bench/bench_tun.py --only ztun --rounds 1 --profile   # py-spy over the iperf3 runs
    python bench/bench_tun.py --process-rule [--rounds 3]        # issue 16, see below
    python bench/bench_tun.py --udp-echo [--rounds 3] [--busy-poll 0]  # the UDP echo alone

`--process-rule` measures only connections per second (and CPU-µs per connection), of ztun
alone, with and without a `process_name` rule that matches nothing (so every flow pays for the
owner lookup: sock_diag, the /proc search, and the route after accept), rounds alternating;
it prints both medians and `with / without` (goal: ≥ 0.90).

`--udp-echo` measures only the UDP echo (3 × 2000 round trips per tunnel and round, rounds
alternating): p50, p99, and the tunnel's CPU-µs (user, system) per round trip. `--busy-poll D`
writes `busy_poll: D` into ztun's tun inbound (0 turns busy polling off; the default leaves the
key out), to see what busy polling buys and costs.

`--profile` needs py-spy: it samples ztun during each iperf3 run and the connection test, and
prints where the time went (self time per line, and the share of functions with callees).
ZTUN_TUN_OFFLOAD=0 in the environment makes ztun open the TUN without virtio-net offload.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from procstat import Profiler, cpu_split, rss_mib, tree_pss_mib  # noqa: E402
from procstat import tree_cpu_seconds as cpu_seconds  # noqa: E402
from ratios import report  # noqa: E402

from tests.integration.netns import (  # noqa: E402
    DIRECT4,
    Topology,
    in_ns,
    topology,
    wait_tcp,
    wait_until,
)
from tests.integration.peers import Proc, singbox_path  # noqa: E402

TUN_ADDR = ["198.18.0.1/30", "fdfe:dcba:9876::1/126"]
LOAD = str(REPO / "bench" / "tun_load.py")
ECHO = str(REPO / "tests" / "integration" / "tun_server.py")
RESULTS = REPO / "bench" / "results"

ZTUN_CONFIG = f"""\
log: {{level: {os.environ.get("BENCH_LOG_LEVEL", "warn")}}}
inbounds:
  - {{type: tun, tag: tun-in, interface_name: ztun0, address: {json.dumps(TUN_ADDR)},
     mtu: 9000, auto_route: true, stack: system}}
outbounds:
  - {{type: direct, tag: direct}}
"""
#: `--process-rule`: the same, with a rule every flow must look its owner up for.
ZTUN_PROCESS_CONFIG = ZTUN_CONFIG + """\
route:
  rules:
    - {process_name: [no-such-program], outbound: direct}
"""

#: ztun with auto_redirect: the same config with one more option.
ZTUN_REDIRECT_CONFIG = ZTUN_CONFIG.replace(
    "auto_route: true,", "auto_route: true, auto_redirect: true,"
)
assert ZTUN_REDIRECT_CONFIG != ZTUN_CONFIG

#: sing-box's `redirect` inbound, and the mark its outbound connections carry, which the hand-made
#: nftables rule below lets pass (or they would be redirected back into sing-box).
REDIRECT_PORT = 12345
REDIRECT_MARK = 0x2024
SINGBOX_REDIRECT_CONFIG = {
    "log": {"level": "warn"},
    "inbounds": [{"type": "redirect", "tag": "redirect-in", "listen": "127.0.0.1",
                  "listen_port": REDIRECT_PORT}],
    "outbounds": [{"type": "direct", "tag": "direct", "routing_mark": REDIRECT_MARK}],
}  # fmt: skip
SINGBOX_NFT = f"""\
table inet bench {{
    chain output {{
        type nat hook output priority -100; policy accept;
        meta mark {REDIRECT_MARK:#x} return
        ip daddr 203.0.113.0/24 meta l4proto tcp redirect to :{REDIRECT_PORT}
    }}
}}
"""

SINGBOX_CONFIG = {
    "log": {"level": "warn"},
    "inbounds": [
        {
            "type": "tun",
            "tag": "tun-in",
            "interface_name": "ztun0",
            "address": TUN_ADDR,
            "mtu": 9000,
            "auto_route": True,
            "stack": "system",
        }
    ],
    "outbounds": [{"type": "direct", "tag": "direct"}],
    "route": {"auto_detect_interface": True},
}


#: `--workers`: ztun's top-level `workers` ("auto": the key left out; with auto_redirect, auto
#: means the cores up to 4). CPU figures are of the tunnel's whole process tree either way.
ZTUN_WORKERS = "auto"
#: `--busy-poll`: the tun inbound's `busy_poll` (None: the key left out, ztun's default).
ZTUN_BUSY_POLL: str | None = None


def start(name: str, t: Topology, tmp: Path, mode: str = "tun") -> Proc:
    env = dict(os.environ, PYTHONPATH=str(REPO), ZTUN_STATE_DIR=str(tmp / "state"))
    redirect = mode == "redirect"
    if name.startswith("ztun"):
        cfg = tmp / f"{name}.yaml"
        if name == "ztun+process":
            cfg.write_text(ZTUN_PROCESS_CONFIG)
        else:
            text = ZTUN_REDIRECT_CONFIG if redirect else ZTUN_CONFIG
            if ZTUN_WORKERS != "auto":
                text = f"workers: {int(ZTUN_WORKERS)}\n" + text
            if ZTUN_BUSY_POLL is not None:
                poll = f"stack: system, busy_poll: {ZTUN_BUSY_POLL}}}"
                text = text.replace("stack: system}", poll)
            cfg.write_text(text)
        args = [sys.executable, "-m", "ztun", "run", str(cfg)]
    else:
        cfg = tmp / "sing-box.json"
        cfg.write_text(json.dumps(SINGBOX_REDIRECT_CONFIG if redirect else SINGBOX_CONFIG))
        args = [singbox_path(), "run", "-c", str(cfg)]
    proc = Proc(["ip", "netns", "exec", t.client, *args], tmp / f"{name}.log", env)
    probe = [sys.executable, LOAD, "udp", DIRECT4, "7", "1"]
    nft_added = False

    def ready() -> bool:
        # The client namespace reaches the server without a tunnel too: wait for the
        # tunnel's own rules, else the first test would run (partly) around it.
        nonlocal nft_added
        if proc.p.poll() is not None:
            raise RuntimeError(f"{name} exited: {proc.text()}")
        if redirect and not name.startswith("ztun"):
            # sing-box's redirect inbound: the redirect rule once it listens
            listening = f":{REDIRECT_PORT}" in in_ns(t.client, "ss", "-ltnH").stdout
            if listening and not nft_added:
                in_ns(t.client, "nft", "-f", "-", input=SINGBOX_NFT)
                nft_added = True
            return nft_added
        if "lookup 2022" not in in_ns(t.client, "ip", "rule").stdout:
            return False
        if redirect and "table inet ztun" not in in_ns(t.client, "nft", "list", "ruleset").stdout:
            return False
        r = in_ns(t.client, *probe, check=False, timeout=10)
        return r.returncode == 0 and '"lost": 0' in r.stdout

    try:
        if not wait_until(ready, 30):
            raise RuntimeError(f"{name} did not come up: {proc.text()}")
    except BaseException:
        proc.stop()
        raise
    return proc


def iperf(t: Topology, tmp: Path, seconds: float, reverse: bool, tries: int = 3) -> dict[str, Any]:
    """One iperf3 run against a fresh one-off server (an iperf3 server left "busy" by an
    earlier tunnel's test must not spoil the next); retried when iperf3 itself fails."""
    args = ["iperf3", "-c", DIRECT4, "-t", str(seconds), "-J"] + (["-R"] if reverse else [])
    error = ""
    for attempt in range(tries):
        server = Proc(["ip", "netns", "exec", t.server, "iperf3", "-s", "-1"], tmp / "iperf3.log")
        try:
            # Not a connect: iperf3 takes any connection for a test.
            wait_until(lambda: ":5201" in in_ns(t.server, "ss", "-ltnH").stdout, 15)
            out = json.loads(in_ns(t.client, *args, timeout=seconds + 30, check=False).stdout)
        finally:
            server.stop()
        if "sum_received" in out.get("end", {}):
            s = out["end"]["sum_received"]
            return {"bits_per_second": s["bits_per_second"], "bytes": s["bytes"],
                    "failed_runs": attempt}  # fmt: skip
        error = str(out.get("error", out))
        time.sleep(1)
    raise RuntimeError(f"iperf3 failed {tries} times: {error}")


def measure(
    name: str, t: Topology, tmp: Path, seconds: float, profile: bool = False, mode: str = "tun"
) -> dict[str, Any]:
    proc = start(name, t, tmp, mode)
    res: dict[str, Any] = {}
    try:
        pid = proc.pid
        for direction, rev in (("up", False), ("down", True)):
            print(f"{name}: iperf3 {direction}", file=sys.stderr, flush=True)
            with Profiler(
                pid, direction, profile and name == "ztun", RESULTS / f"profile-tun-{direction}.txt"
            ):
                c0 = cpu_seconds(pid)
                r = iperf(t, tmp, seconds, rev)
                cpu = cpu_seconds(pid) - c0  # includes failed runs: an upper bound then
            res[f"iperf_{direction}_gbit"] = r["bits_per_second"] / 1e9
            res[f"cpu_s_per_gb_{direction}"] = cpu / (r["bytes"] / 1e9)
            res[f"iperf_{direction}_failed_runs"] = r["failed_runs"]
        with Profiler(pid, "conn", profile and name == "ztun", RESULTS / "profile-tun-conn.txt"):
            c0 = cpu_seconds(pid)
            out = in_ns(t.client, sys.executable, LOAD, "rate", DIRECT4, "7", "64", str(seconds),
                        timeout=seconds + 60).stdout  # fmt: skip
            conn_cpu = cpu_seconds(pid) - c0
        rate = json.loads(out)
        res["conn_per_s"] = rate["per_second"]
        # The load client (Python, same 2 cores) can be what limits conn/s for both tunnels;
        # the tunnel's own CPU per connection says what it could carry.
        total = rate["connections"]
        res["cpu_us_per_conn"] = conn_cpu / total * 1e6 if total else float("nan")
        res["setup_p50_ms"] = rate["p50_ms"]
        res["setup_p99_ms"] = rate["p99_ms"]
        res["conn_errors"] = rate["errors"]
        time.sleep(1)
        holder = subprocess.Popen(["ip", "netns", "exec", t.client, sys.executable, LOAD, "hold",
                                   DIRECT4, "7", "1000"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert holder.stdout is not None and holder.stdin is not None
        line = holder.stdout.readline().strip()
        time.sleep(0.5)
        res["rss_mib_1000_conns"] = rss_mib(pid) if line == "ready" else float("nan")
        # With workers (auto_redirect), the flows are spread over processes: their PSS
        # together counts each shared page once.
        res["pss_mib_tree_1000_conns"] = tree_pss_mib(pid) if line == "ready" else float("nan")
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.communicate(timeout=60)
        if mode == "tun":  # no UDP counterpart behind sing-box's redirect inbound
            # The round trip of an idle tunnel, not one still closing the 1000 connections
            # above (ztun closes them on its one loop, which showed as a 1.5x p50).
            time.sleep(2)
            out = in_ns(t.client, sys.executable, LOAD, "udp", DIRECT4, "7", "2000",
                        timeout=120).stdout  # fmt: skip
            res["udp_p50_us"] = json.loads(out)["p50_us"]
    except BaseException:
        print(f"--- {name} log ---\n{proc.text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        proc.stop()
    return res


def measure_conns(name: str, t: Topology, tmp: Path, seconds: float) -> dict[str, Any]:
    """Connections per second only, and the tunnel's CPU per connection (`--process-rule`)."""
    proc = start(name, t, tmp)
    try:
        c0 = cpu_seconds(proc.pid)
        out = in_ns(t.client, sys.executable, LOAD, "rate", DIRECT4, "7", "64", str(seconds),
                    timeout=seconds + 60).stdout  # fmt: skip
        conn_cpu = cpu_seconds(proc.pid) - c0
    except BaseException:
        print(f"--- {name} log ---\n{proc.text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        proc.stop()
    rate = json.loads(out)
    total = rate["connections"]
    return {
        "conn_per_s": rate["per_second"],
        "cpu_us_per_conn": conn_cpu / total * 1e6 if total else float("nan"),
        "setup_p99_ms": rate["p99_ms"],
        "conn_errors": rate["errors"],
    }


def measure_udp_echo(name: str, t: Topology, tmp: Path) -> dict[str, Any]:
    """The UDP echo alone (`--udp-echo`): 3 × 2000 round trips, medians of their p50 and p99,
    and the tunnel's CPU per round trip (user and system)."""
    proc = start(name, t, tmp)
    try:
        time.sleep(1)
        p50s, p99s, count = [], [], 2000
        u0, s0 = cpu_split(proc.pid)
        for _ in range(3):
            out = json.loads(in_ns(t.client, sys.executable, LOAD, "udp", DIRECT4, "7",
                                   str(count), timeout=120).stdout)  # fmt: skip
            p50s.append(out["p50_us"])
            p99s.append(out["p99_us"])
        u1, s1 = cpu_split(proc.pid)
    except BaseException:
        print(f"--- {name} log ---\n{proc.text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        proc.stop()
    n = 3 * count
    return {
        "udp_p50_us": sorted(p50s)[1],
        "udp_p99_us": sorted(p99s)[1],
        "udp_cpu_us_per_echo": ((u1 - u0) + (s1 - s0)) / n * 1e6,
        "udp_user_us_per_echo": (u1 - u0) / n * 1e6,
        "udp_sys_us_per_echo": (s1 - s0) / n * 1e6,
    }


def process_rule_main(rounds: int, seconds: float, json_path: Path | None) -> None:
    """ztun with and without a process rule, rounds alternating (issue 16's figure)."""
    import tempfile

    names = ["ztun", "ztun+process"]
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for rnd in range(rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            with tempfile.TemporaryDirectory(prefix="bench-tun-") as d, topology() as t:
                tmp = Path(os.environ.get("BENCH_TMP") or d)
                echo = Proc(["ip", "netns", "exec", t.server, sys.executable, ECHO],
                            tmp / "echo.log")  # fmt: skip
                try:
                    wait_tcp(t.server, "127.0.0.1", 7)
                    results[name].append(measure_conns(name, t, tmp, seconds))
                finally:
                    echo.stop()
    median = {n: {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in rs[0]}
              for n, rs in results.items()}  # fmt: skip
    base, with_rule = median["ztun"]["conn_per_s"], median["ztun+process"]["conn_per_s"]
    summary = {"median": median, "with_over_without": with_rule / base if base else float("nan")}
    print(json.dumps(summary, indent=2))
    if json_path is not None:
        json_path.write_text(json.dumps({"rounds": results, **summary}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", choices=["ztun", "sing-box"], help="measure one tunnel")
    ap.add_argument("--profile", action="store_true", help="py-spy ztun during iperf3")
    ap.add_argument("--mode", choices=["tun", "redirect"], default="tun",
                    help="tun: both TUNs; redirect: ztun's auto_redirect against sing-box's "
                    "redirect inbound behind an nftables redirect")  # fmt: skip
    ap.add_argument("--workers", default="auto",
                    help="ztun's `workers` (a number, or auto: the key left out)")
    ap.add_argument("--process-rule", action="store_true",
                    help="conn/s of ztun with a process rule against without (issue 16)")
    ap.add_argument("--udp-echo", action="store_true",
                    help="the UDP echo alone, with the tunnels' CPU per round trip")
    ap.add_argument("--busy-poll", default=None,
                    help="ztun's tun `busy_poll` (e.g. 0 or 200us; default: the key left out)")
    args = ap.parse_args()
    global ZTUN_WORKERS, ZTUN_BUSY_POLL
    ZTUN_WORKERS = args.workers
    ZTUN_BUSY_POLL = args.busy_poll
    if args.process_rule:
        process_rule_main(args.rounds, args.seconds, args.json)
        return
    import tempfile

    results: dict[str, list[dict[str, Any]]] = {"ztun": [], "sing-box": []}
    names = [n for n in ("sing-box", "ztun") if not args.only or n == args.only]
    for rnd in range(args.rounds):
        for name in names if rnd % 2 == 0 else names[::-1]:
            # A fresh topology per measurement: the TIME_WAIT sockets of one tunnel's
            # connection test would otherwise slow the next one's connect() calls.
            with tempfile.TemporaryDirectory(prefix="bench-tun-") as d, topology() as t:
                tmp = Path(os.environ.get("BENCH_TMP") or d)  # BENCH_TMP keeps the logs
                echo = Proc(["ip", "netns", "exec", t.server, sys.executable, ECHO],
                            tmp / "echo.log")  # fmt: skip
                try:
                    wait_tcp(t.server, "127.0.0.1", 7)
                    if args.udp_echo:
                        results[name].append(measure_udp_echo(name, t, tmp))
                    else:
                        results[name].append(
                            measure(name, t, tmp, args.seconds, args.profile, args.mode)
                        )
                finally:
                    echo.stop()
    report(results, args.json)

if __name__ == "__main__":
    main()
