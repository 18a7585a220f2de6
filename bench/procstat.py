"""What the benchmarks read about a process they started: CPU time, RSS, a py-spy profile."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`, from /proc/<pid>/stat."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of `pid` in seconds: user space vs the kernel's work for it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_mib(pid: int, missing: float = float("nan")) -> float:
    """VmRSS of `pid` in MiB (`missing` when /proc has none, e.g. a zombie)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return missing


class Profiler:
    """py-spy on a process for the length of a `with` block; prints where the samples fell.

    `top` is how many leaf frames to print by self time; with `callees`, the functions with the
    most samples including their callees follow.
    """

    def __init__(
        self, pid: int, label: str, enabled: bool, out: Path, *, rate: int = 250, top: int = 15,
        callees: bool = True,
    ) -> None:  # fmt: skip
        self.pid, self.label, self.enabled, self.out = pid, label, enabled, out
        self.rate, self.top, self.callees = rate, top, callees
        self.p: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        if self.enabled:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            cmd = ["py-spy", "record", "--format", "raw", "--rate", str(self.rate),
                   "--nonblocking", "-o", str(self.out), "-p", str(self.pid)]  # fmt: skip
            self.p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.p is None:
            return
        self.p.send_signal(signal.SIGINT)
        self.p.wait(30)
        leaf_time: dict[str, int] = {}
        incl: dict[str, int] = {}
        total = 0
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            frames = stack.split(";")
            n = int(count)
            total += n
            leaf_time[frames[-1]] = leaf_time.get(frames[-1], 0) + n
            for f in {f.split(" (")[0] for f in frames}:
                incl[f] = incl.get(f, 0) + n
        print(f"profile {self.label}: {total} samples ({self.out}); top self time:")
        for leaf, n in sorted(leaf_time.items(), key=lambda kv: -kv[1])[: self.top]:
            print(f"  {100 * n / max(total, 1):5.1f}%  {leaf}")
        if self.callees:
            print("  including callees:")
            for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:25]:
                print(f"  {100 * n / max(total, 1):5.1f}%  {f}")
