"""What the benchmarks read about a process they started: CPU time, RSS, a py-spy profile."""

from __future__ import annotations

import contextlib
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


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (ztun with workers: its supervisor and the workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and the processes below it (those that are still running)."""
    total = 0.0
    for p in process_tree(pid):
        # a process may end between the listing and the read
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += cpu_seconds(p)
    return total


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of `pid` and the processes below it: user space against the kernel's
    work for them."""
    user = system = 0.0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            u, s = cpu_split(p)
            user, system = user + u, system + s
    return user, system


def tree_pss_mib(pid: int, missing: float = float("nan")) -> float:
    """The proportional set size of `pid` and the processes below it, in MiB: pages shared
    between them (a fork's copy-on-write memory) count once in all, where a sum of their RSS
    would count them in each."""
    total, seen = 0, False
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    seen = True
                    break
        except (OSError, ValueError):
            pass
    return total / 1024 if seen else missing


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
