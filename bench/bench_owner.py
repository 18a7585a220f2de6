"""The owner lookup alone (issue 16): what `OwnerFinder.find` costs per flow, without a TUN.

A client process opens connections to a server in this process over loopback; the server
looks up the owner (sock_diag, then /proc) of every accepted connection's peer socket, as the
TUN does for every flow when a rule needs the process. Rounds alternate with and without the
lookup; the figure is the server's CPU per connection (the one that moves least with other
load on the machine), and what the lookup adds to it.

    python bench/bench_owner.py [--rounds 3] [--seconds 3]        # churn: 64 parallel
    python bench/bench_owner.py --hold 2000                        # a big fd table

churn: the client is bench/tun_load.py `rate` (64 workers connecting, echoing one byte,
closing), the client bench_tun.py's `--process-rule` uses. Reports CPU-µs per connection with
and without the lookup, the lookup's wall time (p50/p99), fd links read per lookup, and the
shares of lookups that read a whole fd table (a sweep) or had the worker thread search.

--hold N: the client holds N connections, then opens 200 more one at a time, each kept open;
reports the same per-lookup figures for a process with a big fd table. With --random, each
new connection follows the close of one held at random (the hard case: any fd may be the new
socket's).

No root needed; loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ztun.platform.linux.owner import OwnerFinder  # noqa: E402

LOAD = str(ROOT / "bench" / "tun_load.py")

HOLDER = r"""
import random, socket, sys
port, n, more, swap = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
print("ready", flush=True)
random.seed(1)
for _ in range(more):
    sys.stdin.readline()
    if swap:
        held.pop(random.randrange(len(held))).close()
    held.append(socket.create_connection(("127.0.0.1", port)))
    print("next", flush=True)
sys.stdin.readline()
"""


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))] if s else float("nan")


async def churn(seconds: float, lookup: bool) -> dict[str, Any]:
    finder = OwnerFinder(process=True) if lookup else None
    took: list[float] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if finder is not None:
            sock = w.get_extra_info("socket")
            peer, local = sock.getpeername(), sock.getsockname()
            t0 = time.perf_counter()
            await finder.find("tcp", peer[0], peer[1], local[0], local[1])
            took.append(time.perf_counter() - t0)
        w.write(await r.read(1))
        w.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=512)
    port = srv.sockets[0].getsockname()[1]
    c0 = cpu()
    client = await asyncio.create_subprocess_exec(
        sys.executable, LOAD, "rate", "127.0.0.1", str(port), "64", str(seconds),
        stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await client.communicate()
    used = cpu() - c0
    srv.close()
    rate = json.loads(out)
    n = rate["connections"]
    res: dict[str, Any] = {"connections": n, "per_second": round(rate["per_second"]),
                           "cpu_us_per_conn": round(used / n * 1e6, 1)}  # fmt: skip
    if finder is not None:
        res |= figures(finder, took)
        finder.close()
    return res


def figures(finder: OwnerFinder, took: list[float]) -> dict[str, Any]:
    n = len(took)
    return {
        "lookup_p50_us": round(pct(took, 0.5) * 1e6, 1),
        "lookup_p99_us": round(pct(took, 0.99) * 1e6, 1),
        "links_per_lookup": round(finder.links / n, 2),
        "searched_share": round(finder.searches / n, 4),
        "swept_share": round(finder.sweeps / n, 4),
        "found_share": round(finder.found / n, 4),
    }


async def hold(n: int, more: int, swap: bool = False) -> dict[str, Any]:
    finder = OwnerFinder(process=True)
    took: list[float] = []
    accepted: list[socket.socket] = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4096)
    port = srv.getsockname()[1]
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(port), str(n), str(more),
                               "1" if swap else "0"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdin is not None and holder.stdout is not None
    try:
        while len(accepted) < n:
            accepted.append(srv.accept()[0])
        assert holder.stdout.readline().strip() == "ready"
        for _ in range(more):
            holder.stdin.write("\n")
            holder.stdin.flush()
            conn = srv.accept()[0]
            accepted.append(conn)
            peer, local = conn.getpeername(), conn.getsockname()
            t0 = time.perf_counter()
            owner = await finder.find("tcp", peer[0], peer[1], local[0], local[1])
            took.append(time.perf_counter() - t0)
            assert owner.pid == holder.pid, owner
            assert holder.stdout.readline().strip() == "next"
        holder.stdin.write("\n")
        holder.stdin.flush()
    finally:
        holder.wait(10)
        for c in accepted:
            c.close()
        srv.close()
    res = {"held": n, "lookups": more, "random": swap} | figures(finder, took)
    finder.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--hold", type=int, default=0, help="hold N connections (a big fd table)")
    ap.add_argument("--random", action="store_true", help="with --hold: close one at random first")
    args = ap.parse_args()
    if args.hold:
        print(json.dumps(asyncio.run(hold(args.hold, 200, args.random)), indent=2))
        return
    rounds: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    for i in range(args.rounds):
        for name in ("without", "with") if i % 2 == 0 else ("with", "without"):
            rounds[name].append(asyncio.run(churn(args.seconds, name == "with")))
    median = {name: {k: pct([r[k] for r in rs], 0.5) for k in rs[0]}
              for name, rs in rounds.items()}  # fmt: skip
    added = median["with"]["cpu_us_per_conn"] - median["without"]["cpu_us_per_conn"]
    print(json.dumps({"rounds": rounds, "median": median,
                      "lookup_cpu_us": round(added, 1)}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
