"""Load generators for bench_tun.py, run inside the client namespace; print one JSON line.

rate HOST PORT PARALLEL SECONDS [PAYLOAD]
                                  connections/s and setup time (connect until the first
                                  echoed byte) with PARALLEL workers; each sends PAYLOAD
                                  first (default "x"; bench_dns.py sends an HTTP request,
                                  which a sniffer recognises at once)
hold HOST PORT N                  open N echoing connections, print "ready", wait for a
                                  line on stdin, close them
udp HOST PORT COUNT               sequential 64-byte UDP echoes: p50 and p99 round trip
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import sys
import time


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


async def rate(
    host: str, port: int, parallel: int, seconds: float, payload: bytes = b"x"
) -> dict[str, object]:
    setups: list[float] = []
    errors = 0
    end = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                r, w = await asyncio.open_connection(host, port)
                w.write(payload)
                await r.readexactly(1)
                setups.append(time.monotonic() - t0)
                w.close()
            except (OSError, asyncio.IncompleteReadError):
                errors += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(parallel)))
    took = time.monotonic() - t0
    return {"connections": len(setups), "errors": errors, "per_second": len(setups) / took,
            "p50_ms": pct(setups, 0.5) * 1e3, "p99_ms": pct(setups, 0.99) * 1e3}  # fmt: skip


async def hold(host: str, port: int, n: int) -> dict[str, object]:
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection(host, port)
        w.write(b"x")
        await r.readexactly(1)
        conns.append(w)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    for w in conns:
        w.close()
    return {"held": len(conns)}


def udp(host: str, port: int, count: int) -> dict[str, object]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(1)
    rtts = []
    lost = 0
    for i in range(count):
        msg = i.to_bytes(4, "big") + bytes(60)
        t0 = time.perf_counter()
        s.send(msg)
        try:
            while s.recv(2048)[5:9] != msg[:4]:
                pass
        except TimeoutError:
            lost += 1
            continue
        rtts.append(time.perf_counter() - t0)
    return {"p50_us": pct(rtts, 0.5) * 1e6, "p99_us": pct(rtts, 0.99) * 1e6, "lost": lost}


def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cmd, host, port, *rest = sys.argv[1:]
    if cmd == "rate":
        payload = rest[2].encode().decode("unicode_escape").encode() if len(rest) > 2 else b"x"
        out = asyncio.run(rate(host, int(port), int(rest[0]), float(rest[1]), payload))
    elif cmd == "hold":
        out = asyncio.run(hold(host, int(port), int(rest[0])))
    elif cmd == "udp":
        out = udp(host, int(port), int(rest[0]))
    else:
        raise SystemExit(f"unknown command {cmd}")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
