"""Rule-engine benchmark (issue 2): a big rule set, compile time, lookup speed, memory.

Generates a sing-box source rule set with 100k domain_suffix, 50k domain and 30k ip_cidr
entries (seeded, reproducible), a config that routes it to a proxy, and 20k queries (a mix of
hits and misses, domains and IPs). Reports:
- compile time (load + validate + compile, in-process),
- engine lookups/s and p50/p99 per-lookup time (Router.decide_all, no I/O),
- peak RSS of the process,
- wall time of the whole `ztun route --batch` process over the 20k queries (the issue's goal:
  under 3 s on a 2-core machine).

Run:  python bench/bench_rules.py [--queries 20000] [--out bench/results/rules.json]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ["alpha", "beta", "gamma", "delta", "cdn", "img", "api", "static", "video", "mail",
         "shop", "news", "cloud", "edge", "node", "data", "m", "www", "app", "login"]  # fmt: skip
TLDS = ["com", "net", "org", "io", "cn", "de", "test", "example"]


def make_domain(rng: random.Random) -> str:
    labels = [rng.choice(WORDS) + str(rng.randrange(10000)) for _ in range(rng.randint(1, 2))]
    return ".".join([*labels, rng.choice(TLDS)])


def generate(tmp: Path, n_queries: int, seed: int = 7) -> tuple[Path, Path]:
    rng = random.Random(seed)
    suffixes = sorted({make_domain(rng) for _ in range(100_000)})
    domains = sorted({make_domain(rng) for _ in range(50_000)})
    cidrs = set()
    while len(cidrs) < 30_000:
        if rng.random() < 0.8:
            net = ipaddress.ip_network((rng.getrandbits(32), rng.randint(12, 32)), strict=False)
        else:
            net = ipaddress.ip_network((rng.getrandbits(128), rng.randint(32, 64)), strict=False)
        cidrs.add(str(net))
    rule_set = {"version": 3, "rules": [
        {"domain_suffix": suffixes}, {"domain": domains}, {"ip_cidr": sorted(cidrs)},
    ]}  # fmt: skip
    (tmp / "big.json").write_text(json.dumps(rule_set))
    (tmp / "config.yaml").write_text(
        "outbounds:\n"
        "  - {type: direct, tag: direct}\n"
        "  - {type: socks, tag: proxy, server: 127.0.0.1, server_port: 1080}\n"
        "route:\n"
        "  rule_set:\n"
        "    - {tag: big, type: local, format: source, path: big.json}\n"
        "  rules:\n"
        "    - {ip_is_private: true, outbound: direct}\n"
        "    - {rule_set: [big], outbound: proxy}\n"
        "  final: direct\n"
    )
    queries = []
    suffix_list, domain_list, cidr_list = suffixes, domains, sorted(cidrs)
    for _ in range(n_queries):
        kind = rng.random()
        port = rng.choice([80, 443, 8080])
        if kind < 0.3:
            queries.append(f"{rng.choice(WORDS)}.{rng.choice(suffix_list)} {port}")
        elif kind < 0.45:
            queries.append(f"{rng.choice(domain_list)} {port}")
        elif kind < 0.7:
            queries.append(f"{make_domain(rng)} {port}")  # mostly misses
        elif kind < 0.85:
            net = ipaddress.ip_network(rng.choice(cidr_list))
            offset = rng.randrange(net.num_addresses)
            queries.append(f"{net.network_address + offset} {port} udp")
        else:
            queries.append(f"{ipaddress.IPv4Address(rng.getrandbits(32))} {port}")
    batch = tmp / "queries.txt"
    batch.write_text("\n".join(queries) + "\n")
    return tmp / "config.yaml", batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "rules.json"))
    args = parser.parse_args()
    from ztun.check import load_and_compile
    from ztun.query import parse_batch_line

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        config, batch = generate(tmp, args.queries)

        started = time.perf_counter()
        router = load_and_compile(config, offline=True).router
        compile_s = time.perf_counter() - started

        defaults = {"port": 0, "network": "tcp", "source": None, "source_port": 0,
                    "inbound": None, "protocol": None, "domain": None, "ips": [],
                    "user": None}  # fmt: skip
        metas = [parse_batch_line(line, defaults) for line in batch.read_text().splitlines()]
        timings = []
        clock = time.perf_counter_ns
        proxied = 0
        for meta in metas:
            t0 = clock()
            decision = router.decide_all(meta)
            timings.append(clock() - t0)
            proxied += decision.outbound == "proxy"
        total_s = sum(timings) / 1e9
        timings.sort()
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "ztun", "route", str(config), "--batch", str(batch)],
            capture_output=True, text=True, cwd=ROOT, check=False,
        )  # fmt: skip
        cli_s = time.perf_counter() - started
        lines = proc.stdout.count("\n")

    result = {
        "entries": {"domain_suffix": 100_000, "domain": 50_000, "ip_cidr": 30_000},
        "queries": len(metas),
        "proxied": proxied,
        "compile_s": round(compile_s, 3),
        "lookups_per_s": round(len(metas) / total_s),
        "lookup_p50_us": round(timings[len(timings) // 2] / 1000, 2),
        "lookup_p99_us": round(timings[int(len(timings) * 0.99)] / 1000, 2),
        "lookup_mean_us": round(statistics.fmean(timings) / 1000, 2),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "cli_batch_wall_s": round(cli_s, 3),
        "cli_batch_lines": lines,
        "cli_exit": proc.returncode,
        "goal": "cli_batch_wall_s < 3.0 and lookup_p50_us < 5.0",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)


if __name__ == "__main__":
    main()
